//! The commands of the `canopy` binary, one module each. A command reads the configuration
//! tree and wires the adapters (sources, stores, the API) and the engine; the adapters take
//! their own option structs and know nothing of commands or of [`crate::config`].

pub mod audit;
pub mod demo;
pub mod dump;
pub mod ingest;
pub mod loadgen;
pub mod migrate;
pub mod produce;
pub mod run;
pub mod serve;

use crate::config::Config;
use crate::store::StoreUri;

/// How a command ended, when it succeeded.
pub enum Finished {
    /// The runtime may still hold tasks and stores: tear everything down in order.
    Running,
    /// Everything is durable and every store is closed: the process may simply exit.
    Closed,
}

/// `dump`, `audit` and `serve` read a store that must exist (the embedded one: Scylla says
/// itself when its keyspace has no tables).
fn require_store(cfg: &Config) -> anyhow::Result<()> {
    if cfg.store.uri == StoreUri::Embedded {
        crate::usage::require_store(&cfg.data_dir)?;
    }
    Ok(())
}
