//! Store adapters: implementations of the core's [`canopy_actors::store::Store`] (write) and
//! [`canopy_actors::store::StoreRead`] (query) ports.

pub mod embedded;
pub mod multi;
pub mod scylla;

pub use embedded::EmbeddedStore;
pub use multi::{open_all, partition_dir, MultiRead};

use std::sync::Arc;

use canopy_actors::store::{Store, StoreError, StoreRead};

use crate::config::Config;

/// A backend serves both ports.
pub trait Backend: Store + StoreRead {}
impl<T: Store + StoreRead> Backend for T {}

pub fn scylla_options(cfg: &Config) -> scylla::ScyllaOptions {
    let s = &cfg.store;
    scylla::ScyllaOptions {
        user: (!s.scylla_user.is_empty()).then(|| s.scylla_user.clone()),
        password: (!s.scylla_password.is_empty()).then(|| s.scylla_password.clone()),
        consistency: s.scylla_consistency.clone(),
        replication_factor: s.scylla_replication_factor,
    }
}

/// Every store the configuration names: the embedded stores in `data_dir` (one, or one per
/// partition after `canopy run`), or the Scylla keyspace of `store.uri`.
pub async fn open_configured(cfg: &Config) -> Result<Vec<(String, Arc<dyn Backend>)>, StoreError> {
    if cfg.store.uri == "embedded" {
        return Ok(open_all(&cfg.data_dir)?
            .into_iter()
            .map(|(n, s)| (n, Arc::new(s) as Arc<dyn Backend>))
            .collect());
    }
    if cfg.store.uri.starts_with("scylla://") {
        let s = scylla::ScyllaStore::open(&cfg.store.uri, &scylla_options(cfg)).await?;
        return Ok(vec![(
            "scylla".to_string(),
            Arc::new(s) as Arc<dyn Backend>,
        )]);
    }
    Err(StoreError::Unavailable(format!(
        "store.uri = {:?}: expected `embedded` or `scylla://HOST:PORT/KEYSPACE`",
        cfg.store.uri
    )))
}

/// The one store a single engine writes (`ingest`, `demo`).
pub async fn open_single(cfg: &Config) -> Result<Arc<dyn Backend>, StoreError> {
    if cfg.store.uri == "embedded" {
        return Ok(Arc::new(EmbeddedStore::open(&cfg.data_dir)?));
    }
    let mut all = open_configured(cfg).await?;
    Ok(all.remove(0).1)
}
