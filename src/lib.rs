//! # canopy
//!
//! The `canopy` binary's crate: the adapters around the pure core in `canopy-actors`.
//!
//! - [`api`]: the HTTP query API, `/metrics`, health and the dashboard.
//! - [`app`]: shutdown signals and the API server task, shared by the long-running commands.
//! - [`config`]: the one settings tree (defaults, file, `CANOPY_*`, flags).
//! - [`demo`]: `canopy demo`, everything in one process with a live generated workload.
//! - [`store`]: state store backends (the embedded redb store is the default).
//! - [`file_source`]: NDJSON file input and dead-letter file output for `canopy ingest`.
//! - [`audit`]: `canopy audit`, invariant checks of the stored state.
//! - [`dump`]: `canopy dump`, the stored numbers as NDJSON (the conformance format).
//! - [`ingest`]: wiring of source, engine, store and progress reporting for `canopy ingest`.
//! - [`kafka`]: `canopy run`: the Kafka source, per-partition shards, the dead-letter topic.
//! - [`loadgen`]: a synthetic multi-tenant workload (`canopy loadgen`).
//! - [`telemetry`]: logging setup.

pub mod api;
pub mod app;
pub mod audit;
pub mod config;
pub mod demo;
pub mod dump;
pub mod file_source;
pub mod ingest;
pub mod kafka;
pub mod loadgen;
pub mod store;
pub mod telemetry;

pub use canopy_actors as core;

/// mimalloc: node actors allocate and free many small aggregates from two worker threads, where
/// glibc's arenas contended measurably (lock waits and page faults in profiles).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
