//! Ingest throughput: records/s of `canopy ingest` on a generated stream with 7-level
//! hierarchies (~100,000 nodes), and store writes per accepted event.
//!
//! `cargo bench --bench ingest` runs the full-size case (1,000,000 events, 5 tenants × 97,656
//! nodes... see `LoadgenConfig::default`). `CANOPY_BENCH_EVENTS` and `CANOPY_BENCH_CHECKPOINT_MS`
//! change the size and the checkpoint interval, `CANOPY_BENCH_CHECKPOINT_RECORDS` the record
//! count that forces one, `CANOPY_BENCH_BATCH` the source batch size. This is a throughput
//! harness, not a criterion micro-benchmark: one run of a million records is the measurement.

use std::sync::Arc;
use std::time::Instant;

use canopy::cmd::ingest::{ingest, IngestOptions};
use canopy::loadgen::{generate_file, LoadgenConfig};
use canopy::store::EmbeddedStore;
use canopy_actors::engine::EngineConfig;

#[path = "support/env.rs"]
mod env;
use env::env_or;

#[path = "support/cpu.rs"]
mod cpu;
use cpu::cpu_secs;

fn main() {
    // As the `canopy` binary does.
    canopy::tune_allocator();
    // `cargo bench -- --list` / `--no-run` style invocations from harnesses: do nothing.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let events: usize = env_or("CANOPY_BENCH_EVENTS", 1_000_000);
    let checkpoint_ms: u64 = env_or("CANOPY_BENCH_CHECKPOINT_MS", 1000);
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("stream.ndjson");
    let cfg = LoadgenConfig {
        events,
        ..Default::default()
    };
    let nodes = cfg.nodes();
    let records = generate_file(&cfg, &input).unwrap();
    let bytes = std::fs::metadata(&input).unwrap().len();
    println!(
        "stream: {records} records ({events} events), {nodes} nodes, depth {}, {:.1} MB",
        cfg.depth,
        bytes as f64 / 1e6
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("data")).unwrap());
    let defaults = EngineConfig::default();
    let engine = EngineConfig {
        checkpoint_interval_ms: checkpoint_ms,
        // A fixed count (with a long interval) makes the work of two runs the same: with time
        // checkpoints, a faster run takes fewer of them, which makes it faster still.
        checkpoint_every_records: env_or(
            "CANOPY_BENCH_CHECKPOINT_RECORDS",
            defaults.checkpoint_every_records,
        ),
        ..defaults
    };
    let opts = IngestOptions {
        input: input.clone(),
        dlq: Some(dir.path().join("dead.ndjson")),
        batch_size: env_or("CANOPY_BENCH_BATCH", 4096),
        engine,
        progress: false,
    };
    let (t, cpu) = (Instant::now(), cpu_secs());
    let (_keep, never) = tokio::sync::watch::channel(false);
    let rep = rt.block_on(ingest(opts, store, never)).expect("ingest");
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "ingest: {:.0} records/s ({} records in {:.2} s, checkpoint every {checkpoint_ms} ms)",
        rep.records as f64 / secs,
        rep.records,
        secs
    );
    println!(
        "cpu: {cpu:.2} s user+system ({:.2} µs per record, {:.0}% of {cores} cores)",
        cpu * 1e6 / rep.records as f64,
        100.0 * cpu / secs / cores as f64
    );
    println!(
        "store: {} commits ({:.5} per accepted event), {} rows ({:.3} rows per accepted event), {} checkpoints",
        rep.store_commits,
        rep.store_commits as f64 / rep.accepted.max(1) as f64,
        rep.store_rows,
        rep.store_rows as f64 / rep.accepted.max(1) as f64,
        rep.checkpoints
    );
    println!(
        "checkpoints: processing stopped {:.2} s for snapshots (rounds included), waited {:.2} s for commits; commits took {:.2} s in the background",
        rep.snapshot.as_secs_f64(),
        rep.commit_wait.as_secs_f64(),
        rep.commit.as_secs_f64()
    );
}
