//! `canopy ingest` exits without tearing its actors down one by one once everything is durable
//! (src/main.rs, `Finished::Closed`). That shortcut is safe only if the embedded store was closed
//! first: a redb file left open needs a repair at the next open. These tests open the file the
//! way redb reports a repair, and check that the check itself sees one after a SIGKILL.

mod support;

use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use support::*;

/// Opens `data`'s redb file; returns whether redb had to repair it.
fn needed_repair(data: &Path) -> bool {
    let repaired = Rc::new(Cell::new(false));
    let flag = repaired.clone();
    let db = redb::Builder::new()
        .set_repair_callback(move |_| flag.set(true))
        .open(data.join(canopy::store::embedded::FILE_NAME))
        .expect("the store opens");
    drop(db);
    repaired.get()
}

fn stream(dir: &Path, events: &str) -> std::path::PathBuf {
    let input = dir.join("stream.ndjson");
    loadgen(
        &input,
        &[
            "--seed",
            "3",
            "--tenants",
            "3",
            "--depth",
            "5",
            "--fanout",
            "4",
            "--events",
            events,
        ],
    );
    input
}

#[test]
fn a_finished_ingest_leaves_a_cleanly_closed_store_and_the_same_dump() {
    let dir = tempfile::tempdir().unwrap();
    let input = stream(dir.path(), "60000");
    let data = dir.path().join("data");
    ingest(&input, &data, &["--checkpoint-every-records", "20000"]);
    assert!(
        !needed_repair(&data),
        "canopy ingest exited with its store still open"
    );
    // The process exited right after its final commit: the store holds every record.
    let (exp_dump, exp_dlq) = expected(&input);
    let dlq = data.with_extension("dlq.ndjson");
    compare(&exp_dump, &dump(&data), &exp_dlq, &dlq);
}

#[test]
fn the_repair_check_sees_a_store_left_open_by_a_killed_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let input = stream(dir.path(), "400000");
    let data = dir.path().join("data");
    let mut child = canopy()
        .args(["ingest", "--quiet", "--input"])
        .arg(&input)
        .arg("--data-dir")
        .arg(&data)
        .args(["--checkpoint-every-records", "20000"])
        .spawn()
        .unwrap();
    // Kill it once a first checkpoint is in the file (the file grows at each commit).
    let file = data.join(canopy::store::embedded::FILE_NAME);
    let started = Instant::now();
    while std::fs::metadata(&file).map_or(0, |m| m.len()) < 2 << 20 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "ingest finished before it could be killed: make the stream longer"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        needed_repair(&data),
        "a store left open by SIGKILL was not reported as needing repair"
    );
}
