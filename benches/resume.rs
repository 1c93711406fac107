//! Time from SIGKILL to resumed processing, for a ~100,000-node state (issue 3).
//!
//! `canopy ingest` runs on the ingest bench's stream (5 tenants × 7-level trees, 97,655
//! nodes; checkpoints every 100 ms) and is killed with SIGKILL once `CANOPY_BENCH_KILL_AFTER_S`
//! seconds (default 5: the whole stream now ingests in ~8–10 s) have passed and a checkpoint has landed. The same command is then
//! started again. Printed, measured from the restart:
//! - *store open*: the engine has read the last checkpoint (`resuming from checkpoint`);
//! - *restored*: every tenant's actors are rebuilt from the store (`tenant restored`);
//! - *resumed*: the next checkpoint has committed, i.e. records after the checkpoint's
//!   position were processed and are durable again. This is an upper bound on "processing
//!   resumed" by at most one checkpoint interval and one commit.
//!
//! With the state size (redb file). `CANOPY_BENCH_EVENTS` changes the stream length.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use canopy::loadgen::{generate_file, LoadgenConfig};

#[path = "support/env.rs"]
mod env;
use env::env_or;

/// Starts `canopy ingest` and forwards its stderr lines (with arrival times) to a channel.
fn start(
    input: &std::path::Path,
    data: &std::path::Path,
) -> (Child, mpsc::Receiver<(Instant, String)>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_canopy"))
        .arg("ingest")
        .arg("--input")
        .arg(input)
        .arg("--data-dir")
        .arg(data)
        .args(["--checkpoint-interval-ms", "100"])
        .env(
            "RUST_LOG",
            "info,canopy_actors::engine=debug,canopy_actors::coordinator=debug",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("canopy starts");
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for a log line containing `needle`; returns when it arrived.
fn wait_for(rx: &mpsc::Receiver<(Instant, String)>, needle: &str, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((t, l)) if l.contains(needle) => return t,
            Ok(_) => {}
            Err(e) => panic!("no log line with {needle:?} within {within:?}: {e}"),
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let events: usize = env_or("CANOPY_BENCH_EVENTS", 1_000_000);
    let kill_after = Duration::from_secs(env_or("CANOPY_BENCH_KILL_AFTER_S", 5));
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("stream.ndjson");
    let data = dir.path().join("data");
    let cfg = LoadgenConfig {
        events,
        ..Default::default()
    };
    let nodes = cfg.nodes();
    let records = generate_file(&cfg, &input).unwrap();
    println!(
        "stream: {records} records, {nodes} nodes, depth {}",
        cfg.depth
    );

    let (mut first, rx) = start(&input, &data);
    let started = Instant::now();
    wait_for(&rx, "checkpoint committed", Duration::from_secs(300));
    if let Some(rest) = kill_after.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    assert!(
        first.try_wait().unwrap().is_none(),
        "ingest finished before the kill: use a longer stream or a shorter CANOPY_BENCH_KILL_AFTER_S"
    );
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let killed_at = started.elapsed();
    let state_mb = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum::<u64>() as f64
        / 1e6;

    let (mut second, rx) = start(&input, &data);
    let restarted = Instant::now();
    let opened = wait_for(&rx, "resuming from checkpoint", Duration::from_secs(300));
    // Every tenant rebuilt from the store, then a checkpoint of new work.
    let mut restored = opened;
    for _ in 0..cfg.tenants {
        restored = wait_for(
            &rx,
            "tenant restored from checkpoint",
            Duration::from_secs(300),
        );
    }
    let resumed = wait_for(&rx, "checkpoint committed", Duration::from_secs(300));
    let _ = second.kill();
    let _ = second.wait();
    println!(
        "killed with SIGKILL after {:.1} s of ingest; state on disk {state_mb:.0} MB",
        killed_at.as_secs_f64()
    );
    println!(
        "restart → store open: {:.2} s; → all {} tenants restored ({nodes} nodes): {:.2} s; → resumed (next checkpoint committed): {:.2} s",
        (opened - restarted).as_secs_f64(),
        cfg.tenants,
        (restored - restarted).as_secs_f64(),
        (resumed - restarted).as_secs_f64()
    );
}
