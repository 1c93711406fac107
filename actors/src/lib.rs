//! # canopy-actors: the pure core of canopy
//!
//! Everything that decides a number lives here, with no Kafka, ScyllaDB or HTTP in sight:
//!
//! - [`record`]: decoding JSON/MessagePack records and the shape checks of docs/SPEC.md section 2.
//! - [`time`]: timestamps and DST-exact local bucket keys.
//! - [`agg`]: aggregates (`events`, `count`, `sum`, `min`, `max`) and subtree deltas.
//! - [`tenant`]: a tenant's bookkeeping and state checks (topology, suspensions, dedup).
//! - [`node`]: the node actor that owns one node's numbers and coalesces its children's deltas.
//! - [`coordinator`]: the tenant actor that drives rounds, moves, deletes and snapshots.
//! - [`engine`]: batches from a source to the tenants, dead letters, checkpoints, recovery.
//! - [`stats`]: the engine's counters, shared with coordinators and read by the adapters.
//! - [`packed`]: the compact encoding of a node's bucket set, as checkpoints write it.
//! - [`store`] and [`source`]: the ports the adapters of the `canopy` crate implement.
//!
//! ARCHITECTURE.md at the repository root explains how these fit together.

pub mod agg;
pub mod coordinator;
pub mod engine;
pub mod node;
pub mod packed;
pub mod record;
pub mod source;
pub mod stats;
pub mod store;
pub mod tenant;
pub mod time;
