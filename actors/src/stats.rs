//! The engine's counters, in their own module because the engine, the tenant coordinators
//! and the adapters (progress lines, the API's engine status) all update or read them.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Counters the engine updates as it goes (read by progress lines and the API).
#[derive(Debug, Default)]
pub struct Stats {
    pub records: AtomicU64,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub duplicates: AtomicU64,
    pub checkpoints: AtomicU64,
    pub store_commits: AtomicU64,
    pub store_rows: AtomicU64,
    pub store_retries: AtomicU64,
    pub tenant_restarts: AtomicU64,
    /// Node actors restarted alone (from their checkpoint row and journal).
    pub node_restarts: AtomicU64,
    pub chaos_kills: AtomicU64,
    pub last_checkpoint_seq: AtomicU64,
    /// The newest checkpoint whose commit has landed, set by the commit task the moment it
    /// does (`last_checkpoint_seq` follows when the engine awaits the commit). Node journals
    /// drop what it covers: they get this counter alone, shared.
    pub durable_seq: Arc<AtomicU64>,
    /// Bucket deltas node actors hold for the open checkpoint interval (each node adds what it
    /// created at its flushes; the engine zeroes it at a snapshot, which empties them). Bounded
    /// by `checkpoint_max_buckets`: what an interval costs in memory.
    pub interval_buckets: Arc<AtomicU64>,
    /// Time the engine stood still taking snapshots (each tenant's round and its dirty nodes'
    /// answers), in µs: where a checkpoint costs processing time.
    pub snapshot_micros: AtomicU64,
    /// Time the store spent committing checkpoints in the background, in µs.
    pub commit_micros: AtomicU64,
    /// Time the engine waited for a background commit to land (before the next checkpoint, a
    /// rebuild or the end of the run), in µs.
    pub commit_wait_micros: AtomicU64,
    /// Node actors alive in the process (the others are passivated), and how many times nodes
    /// were activated and passivated.
    pub resident_nodes: AtomicU64,
    pub activations: AtomicU64,
    pub passivations: AtomicU64,
    /// Logical changes handed to the store (node headers, bucket rows...), over all checkpoints.
    pub checkpoint_changes: AtomicU64,
    /// Bytes the store wrote (keys and values), over all checkpoints.
    pub store_bytes: AtomicU64,
}
