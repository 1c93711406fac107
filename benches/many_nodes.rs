//! A million nodes, most of them idle: 10 tenants × 8-level trees with fan-out 5 (976,560 nodes),
//! then events on 5% of the leaves. Prints records/s over the whole stream (node records
//! included), peak RSS, the most node actors resident at once, activations and passivations
//! per second, and the time from opening the data directory again to the first checkpoint when
//! ten more events arrive (a resume: tenants load their topology and totals, no actor is spawned
//! for an idle node).
//!
//! `cargo bench --bench many_nodes`. `CANOPY_BENCH_EVENTS` (default 1,000,000),
//! `CANOPY_BENCH_TENANTS` (10), `CANOPY_BENCH_DEPTH` (8), `CANOPY_BENCH_ACTIVE` (0.05),
//! `CANOPY_BENCH_IDLE_CHECKPOINTS` (the passivation setting; default: the engine's).

use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy::cmd::ingest::{ingest_observed, IngestOptions};
use canopy::loadgen::{generate_file, LoadgenConfig};
use canopy::store::EmbeddedStore;
use canopy_actors::engine::EngineConfig;

#[path = "support/env.rs"]
mod env;
use env::env_or;

#[path = "support/cpu.rs"]
mod cpu;
use cpu::{cpu_secs, peak_rss_mb};

fn main() {
    canopy::tune_allocator();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let events: usize = env_or("CANOPY_BENCH_EVENTS", 1_000_000);
    let cfg = LoadgenConfig {
        events,
        tenants: env_or("CANOPY_BENCH_TENANTS", 10),
        depth: env_or("CANOPY_BENCH_DEPTH", 8),
        fanout: 5,
        active: env_or("CANOPY_BENCH_ACTIVE", 0.05),
        span_secs: events as i64 * 20 / 1000,
        ..Default::default()
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("stream.ndjson");
    let records = generate_file(&cfg, &input).unwrap();
    println!(
        "stream: {records} records ({events} events on {:.0}% of the leaves), {} nodes",
        cfg.active * 100.0,
        cfg.nodes()
    );
    let mut engine = EngineConfig::default();
    engine.tenant.passivate_idle_checkpoints = env_or(
        "CANOPY_BENCH_IDLE_CHECKPOINTS",
        engine.tenant.passivate_idle_checkpoints,
    );
    let opts = IngestOptions {
        input: input.clone(),
        dlq: Some(dir.path().join("dead.ndjson")),
        batch_size: 4096,
        engine,
        progress: false,
    };
    let data = dir.path().join("data");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let peak_resident = Arc::new(AtomicU64::new(0));
    let (t0, cpu0) = (Instant::now(), cpu_secs());
    let (_keep, never) = tokio::sync::watch::channel(false);
    let store = Arc::new(EmbeddedStore::open(&data).unwrap());
    let peak = peak_resident.clone();
    let rep = rt
        .block_on(ingest_observed(
            opts.clone(),
            store.clone(),
            never.clone(),
            move |stats| {
                let stats = stats.clone();
                tokio::spawn(async move {
                    loop {
                        peak.fetch_max(stats.resident_nodes.load(Relaxed), Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
            },
        ))
        .expect("ingest");
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    println!(
        "ingest: {:.0} records/s ({} records in {:.2} s), cpu {:.2} µs per record, peak RSS {:.0} MB",
        rep.records as f64 / secs,
        rep.records,
        secs,
        cpu * 1e6 / rep.records as f64,
        peak_rss_mb()
    );
    let (a, p) = (rep.activations, rep.passivations);
    println!(
        "node actors: at most {} resident; {a} activations ({:.0}/s), {p} passivations ({:.0}/s); {} checkpoints",
        peak_resident.load(Relaxed),
        a as f64 / secs,
        p as f64 / secs,
        rep.checkpoints
    );
    drop(store);
    // Resume: ten more events for one tenant, into the same data directory.
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&input)
            .unwrap();
        for i in 0..10 {
            writeln!(
                f,
                r#"{{"type":"event","tenant":"t0","event_id":"resume-{i}","entity":"t0-n1","ts":{},"metrics":{{"amount":1}}}}"#,
                cfg.start_ms + cfg.span_secs * 1000
            )
            .unwrap();
        }
    }
    let t1 = Instant::now();
    let store = Arc::new(EmbeddedStore::open(&data).unwrap());
    let first = Arc::new(AtomicU64::new(0));
    let seen = first.clone();
    let rep = rt
        .block_on(ingest_observed(opts, store, never, move |stats| {
            let stats = stats.clone();
            tokio::spawn(async move {
                loop {
                    if stats.checkpoints.load(Relaxed) > 0 {
                        seen.store(t1.elapsed().as_micros() as u64, Ordering::Relaxed);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }))
        .expect("resume");
    println!(
        "resume: {} records, first checkpoint {:.2} s after opening the data directory, {} activations",
        rep.records,
        first.load(Relaxed) as f64 / 1e6,
        rep.activations
    );
}
