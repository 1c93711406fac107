//! # canopy
//!
//! The `canopy` binary's crate: the adapters around the pure core in `canopy-actors`.
//!
//! - [`cmd`]: the commands, one module each (`ingest`, `run`, `demo`, `serve`, `dump`, `audit`,
//!   `migrate`, `produce`, `loadgen`): the only code that reads [`config`] and wires the rest.
//! - [`config`]: the one settings tree (defaults, file, `CANOPY_*`, flags), made of the
//!   adapters' and the engine's own option structs.
//! - [`app`]: shutdown signals and the API server task, shared by the long-running commands.
//!
//! Adapters, which take their own option structs:
//!
//! - [`api`]: the HTTP query API, `/metrics`, health and the dashboard.
//! - [`store`]: state store backends (the embedded redb store is the default; Scylla) and the
//!   typed `store.uri`.
//! - [`file_source`]: NDJSON file input and dead-letter file output for `canopy ingest`.
//! - [`demo_source`]: the live generated workload of `canopy demo`.
//! - [`kafka`]: the Kafka consumer thread, the dead-letter topic, the producer.
//!
//! And: [`loadgen`] (a synthetic multi-tenant workload), [`telemetry`] (logging and metrics
//! setup), [`usage`] (usage mistakes, exit 2, told apart from failures, exit 1).

pub mod api;
pub mod app;
pub mod cmd;
pub mod config;
pub mod demo_source;
pub mod file_source;
pub mod kafka;
pub mod loadgen;
pub mod store;
pub mod telemetry;
pub mod usage;

pub use canopy_actors as core;

/// mimalloc: node actors allocate and free many small aggregates from two worker threads, where
/// glibc's arenas contended measurably (lock waits and page faults in profiles).
/// The `system-alloc` feature leaves the system allocator in place, for heap profilers that
/// intercept malloc (heaptrack).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps freed memory in the process instead of returning it to the OS (mimalloc's
/// `purge_delay = -1`). Call once, first thing in `main`.
///
/// Why: the engine frees most of what it allocates within a checkpoint interval (node
/// journals, deltas, snapshot rows) and allocates as much again in the next one. With
/// mimalloc's default (purge after 1 s, in 2 MB transparent huge pages), that memory went
/// back to the OS and was faulted in and zeroed again every interval: 30% of the ingest
/// benchmark's profile was the kernel zeroing pages (`clear_page_erms`). Without purging, the
/// same benchmark ran at 87–105k records/s against 73–85k, at 15–18 µs of CPU per record
/// against 19–22 (interleaved runs, 2026-12-02). The cost: the resident size stays at its
/// peak (3.6–3.8 GB on that benchmark either way, since the peak is reached at the end).
///
/// And without transparent huge pages. mimalloc asks the kernel for 2 MB pages on its arenas
/// (`madvise`), so every first touch zeroed 2 MB and a sparsely used region stayed resident
/// whole: on the million-node stream nearly all of the resident set was huge pages, and the
/// kernel's zeroing took 9–10 s of system time. With 4 KB pages: 10.1–10.4 s and 2.41–2.53 GB
/// against 13.2–14.5 s and 2.84–2.99 GB; the 50-minute benchmark 5.9–7.2 s against 8.1–8.5 s
/// (interleaved runs, 2026-12-08; docs/performance.md).
pub fn tune_allocator() {
    // mimalloc's option numbers are stable (a retired option keeps its slot, renamed
    // `deprecated_*`). libmimalloc-sys names 14 (`eager_commit_delay`) and 16
    // (`use_numa_nodes`) but not 15 (`mi_option_purge_delay` in mimalloc.h, v3) nor 43
    // (`mi_option_allow_thp`).
    #[cfg(not(feature = "system-alloc"))]
    {
        const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
        const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;
        // SAFETY: mi_option_set only stores an integer in mimalloc's option table.
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
            libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
        }
    }
    // mimalloc reads `allow_thp` when it starts, before `main`; what it would then do is this
    // (for the whole process: the arenas it mapped already, and redb's buffers).
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE only sets a flag on the calling process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
