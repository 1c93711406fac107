//! Store rows written per checkpoint and per accepted event for the public conformance
//! workload (`tests/fixtures/conformance/input.ndjson`), at several checkpoint cadences, on the
//! embedded store. It writes one row per page of dirty nodes (many nodes to a page), per page of
//! changed `children` index entries and per changed node count, plus spilled bucket rows, the
//! changed tenant rows, the dedup batch and the pointer. Scylla writes more: one row per dirty
//! node and per changed bucket, plus the next commit's range deletes of superseded versions.
//!
//! `cargo bench --bench store_rows`

use std::sync::Arc;

use canopy::cmd::ingest::{ingest, IngestOptions};
use canopy::store::EmbeddedStore;
use canopy_actors::engine::EngineConfig;

fn main() {
    // As the `canopy` binary does.
    canopy::tune_allocator();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let input = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/conformance/input.ndjson");
    if !input.exists() {
        println!("store_rows bench SKIPPED: {} is missing", input.display());
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for every in [100u64, 1_000, 5_000, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let opts = IngestOptions {
            input: input.clone(),
            dlq: None,
            batch_size: 100,
            engine: EngineConfig {
                checkpoint_every_records: every,
                checkpoint_interval_ms: 3_600_000,
                ..Default::default()
            },
            progress: false,
        };
        let (_keep, never) = tokio::sync::watch::channel(false);
        let r = rt.block_on(ingest(opts, store, never)).unwrap();
        println!(
            "checkpoint every {every:>7} records: {:>3} checkpoints, {:>7.1} rows per checkpoint, {:.3} rows per accepted event ({} accepted)",
            r.checkpoints,
            r.store_rows as f64 / r.checkpoints.max(1) as f64,
            r.store_rows as f64 / r.accepted.max(1) as f64,
            r.accepted
        );
    }
}
