//! The long run: the ingest benchmark's shape (5 tenants, 7 levels, fan-out 5, 97,655 nodes)
//! with events far apart in event time, so that the run covers days and every node's buckets
//! reach retention. Prints records/s per quarter of the run, CPU per record, peak RSS, and the
//! changes and the bytes the store wrote per checkpoint at the start and at the end of the run: with bounded state
//! the last quarter runs as fast as the first and a late checkpoint weighs what an early one does.
//!
//! `cargo bench --bench long_run`. `CANOPY_BENCH_EVENTS` (default 2,000,000) and
//! `CANOPY_BENCH_SPACING_MS` (default 150: ~83 hours) set the stream; `CANOPY_BENCH_SPACING_MS=3`
//! with 1,000,000 events is the 50-minute benchmark. `CANOPY_BENCH_CHECKPOINT_MS` sets the
//! checkpoint interval (default 1000).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canopy::cmd::ingest::{ingest_observed, IngestOptions};
use canopy::loadgen::{generate_file, LoadgenConfig};
use canopy::store::EmbeddedStore;
use canopy_actors::engine::EngineConfig;
use canopy_actors::stats::Stats;

#[path = "support/env.rs"]
mod env;
use env::env_or;

#[path = "support/cpu.rs"]
mod cpu;
use cpu::{cpu_secs, peak_rss_mb};

/// One sample of the run: elapsed seconds, records processed, checkpoints committed, their
/// changes and the bytes the store wrote for them so far.
#[derive(Clone, Copy, Default)]
struct Sample {
    secs: f64,
    records: u64,
    durable: u64,
    changes: u64,
    bytes: u64,
}

fn sample(s: &Stats, t0: Instant) -> Sample {
    Sample {
        secs: t0.elapsed().as_secs_f64(),
        records: s.records.load(Relaxed),
        durable: s.checkpoints.load(Relaxed),
        changes: s.checkpoint_changes.load(Relaxed),
        bytes: s.store_bytes.load(Relaxed),
    }
}

fn main() {
    canopy::tune_allocator();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let events: usize = env_or("CANOPY_BENCH_EVENTS", 2_000_000);
    let spacing_ms: i64 = env_or("CANOPY_BENCH_SPACING_MS", 150);
    let checkpoint_ms: u64 = env_or("CANOPY_BENCH_CHECKPOINT_MS", 1000);
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("stream.ndjson");
    let cfg = LoadgenConfig {
        events,
        span_secs: events as i64 * spacing_ms / 1000,
        ..Default::default()
    };
    let records = generate_file(&cfg, &input).unwrap();
    println!(
        "stream: {records} records ({events} events {spacing_ms} ms apart: {:.1} h of event time), {} nodes",
        cfg.span_secs as f64 / 3600.0,
        cfg.nodes()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("data")).unwrap());
    let opts = IngestOptions {
        input,
        dlq: Some(dir.path().join("dead.ndjson")),
        batch_size: env_or("CANOPY_BENCH_BATCH", 4096),
        engine: EngineConfig {
            checkpoint_interval_ms: checkpoint_ms,
            ..EngineConfig::default()
        },
        progress: false,
    };
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let (t0, cpu0) = (Instant::now(), cpu_secs());
    let (_keep, never) = tokio::sync::watch::channel(false);
    let sink = samples.clone();
    let rep = rt
        .block_on(ingest_observed(opts, store, never, move |stats| {
            let stats = stats.clone();
            tokio::spawn(async move {
                loop {
                    sink.lock().unwrap().push(sample(&stats, t0));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }))
        .expect("ingest");
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    let samples = samples.lock().unwrap().clone();
    println!(
        "ingest: {:.0} records/s over the run ({} records in {:.2} s); cpu {:.2} µs per record; peak RSS {:.0} MB",
        rep.records as f64 / secs,
        rep.records,
        secs,
        cpu * 1e6 / rep.records as f64,
        peak_rss_mb()
    );
    // Records/s in each quarter of the records: the time from the sample that reached q/4 of
    // them to the one that reached (q+1)/4.
    let at = |n: u64| -> f64 {
        samples
            .iter()
            .find(|s| s.records >= n)
            .map_or(secs, |s| s.secs)
    };
    let total = rep.records;
    let rates: Vec<String> = (0..4)
        .map(|q| {
            let (a, b) = (total * q / 4, total * (q + 1) / 4);
            let (ta, tb) = (if q == 0 { 0.0 } else { at(a) }, at(b).min(secs));
            format!("{:.0}", (b - a) as f64 / (tb - ta).max(1e-3))
        })
        .collect();
    println!("records/s by quarter of the records: {}", rates.join(" / "));
    // Per checkpoint: the changes and bytes of the checkpoints that landed in the first and in
    // the last quarter of the run's records.
    let mut per_cp = Vec::new();
    let mut prev = Sample::default();
    for s in &samples {
        if s.durable > prev.durable {
            let n = (s.durable - prev.durable) as f64;
            per_cp.push((
                s.records,
                (s.changes - prev.changes) as f64 / n,
                (s.bytes - prev.bytes) as f64 / n,
            ));
            prev = *s;
        }
    }
    let quarter = |lo: u64, hi: u64| {
        let v: Vec<_> = per_cp
            .iter()
            .filter(|(r, _, _)| *r > lo && *r <= hi)
            .collect();
        let n = v.len().max(1) as f64;
        (
            v.len(),
            v.iter().map(|x| x.1).sum::<f64>() / n,
            v.iter().map(|x| x.2).sum::<f64>() / n,
        )
    };
    let show = |(n, c, b): (usize, f64, f64)| match n {
        0 => "none landed".to_string(),
        n => format!("{n}, {c:.0} changes and {:.1} MB each", b / 1e6),
    };
    println!(
        "checkpoints landed in the first quarter of the records: {}; in the last: {}",
        show(quarter(0, total / 4)),
        show(quarter(total * 3 / 4, total))
    );
    let list: Vec<String> = per_cp
        .iter()
        .map(|(_, c, b)| format!("{:.0}k/{:.0}", c / 1e3, b / 1e6))
        .collect();
    println!(
        "per checkpoint as they landed (thousand changes / MB written): {}",
        list.join(" ")
    );
    // The final checkpoint covers what was left at the end of the input: the one before it is
    // the last of a whole interval.
    if per_cp.len() >= 3 {
        let (first, last) = (per_cp[0], per_cp[per_cp.len() - 2]);
        println!(
            "bytes per checkpoint: first {:.1} MB, last whole interval {:.1} MB ({:.2}×)",
            first.2 / 1e6,
            last.2 / 1e6,
            last.2 / first.2
        );
    }
    println!(
        "checkpoints: {} in all; processing stopped {:.2} s for snapshots, waited {:.2} s for commits; commits took {:.2} s in the background; {} store rows",
        rep.checkpoints,
        rep.snapshot.as_secs_f64(),
        rep.commit_wait.as_secs_f64(),
        rep.commit.as_secs_f64(),
        rep.store_rows
    );
}
