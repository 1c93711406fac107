//! SIGTERM during `canopy ingest`: a final checkpoint, exit 0, and resuming loses nothing (the
//! final results equal the reference model's).

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn sigterm_mid_stream_exits_0_after_a_final_checkpoint_and_resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("stream.ndjson");
    loadgen(
        &input,
        &[
            "--seed",
            "9",
            "--tenants",
            "2",
            "--hierarchies",
            "2",
            "--depth",
            "4",
            "--fanout",
            "4",
            "--events",
            "300000",
            "--churn",
            "0.002",
            "--bad",
            "0.01",
        ],
    );
    let (exp_dump, exp_dlq) = expected(&input);
    let data = dir.path().join("data");
    let dlq = dir.path().join("dead.ndjson");
    let cmd = || {
        let mut c = canopy();
        c.args(["ingest", "--quiet", "--input"])
            .arg(&input)
            .arg("--data-dir")
            .arg(&data)
            .arg("--dlq")
            .arg(&dlq)
            // Long intervals: whatever is durable at the end came from the final checkpoint.
            .args(["--checkpoint-interval-ms", "60000", "--batch-size", "1024"])
            .stderr(Stdio::piped());
        c
    };
    let mut interrupted = 0;
    let mut durable = 0u64;
    let mut delay = Duration::from_millis(400);
    for _ in 0..20 {
        if interrupted == 3 {
            break;
        }
        let mut child = cmd().spawn().unwrap();
        let started = Instant::now();
        while started.elapsed() < delay && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        if child.try_wait().unwrap().is_none() {
            let pid = child.id().to_string();
            assert!(std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success());
        }
        let out = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "exit after SIGTERM: {}\n{}",
            out.status,
            tail(&log, 3000)
        );
        if log.contains("stopped by a signal after a final checkpoint") {
            // No periodic checkpoint ran (60 s interval): what is stored now was written by the
            // final one, and it must hold more events than the previous stop did.
            let events = stored_events(&data);
            assert!(
                events > durable,
                "after SIGTERM {events} events stored, before {durable}"
            );
            durable = events;
            interrupted += 1;
        } else {
            // It finished before the signal: start over with an earlier signal.
            std::fs::remove_dir_all(&data).unwrap();
            std::fs::remove_file(&dlq).ok();
            interrupted = 0;
            durable = 0;
            delay /= 2;
        }
    }
    assert_eq!(
        interrupted, 3,
        "could not interrupt ingest mid-stream three times in a row"
    );
    let out = cmd().output().unwrap();
    assert!(out.status.success());
    compare(&exp_dump, &dump(&data), &exp_dlq, &dlq);
}

/// Accepted events in the store: Σ own.events over every stored node of the first hierarchy.
fn stored_events(data: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(dump(data)).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["hierarchy"] == "h0")
        .map(|v| v["own"]["events"].as_u64().unwrap())
        .sum()
}
