//! Store adapters: implementations of the core's [`canopy_actors::store::Store`] (write) and
//! [`canopy_actors::store::StoreRead`] (query) ports.

pub mod embedded;
pub mod multi;
mod pages;
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
        tls: (!s.scylla_tls_ca_file.is_empty()).then(|| scylla::TlsOptions {
            ca_file: s.scylla_tls_ca_file.clone().into(),
            cert_file: (!s.scylla_tls_cert_file.is_empty())
                .then(|| s.scylla_tls_cert_file.clone().into()),
            key_file: (!s.scylla_tls_key_file.is_empty())
                .then(|| s.scylla_tls_key_file.clone().into()),
        }),
    }
}

/// Every store the configuration names: the embedded stores in `data_dir` (one, or one per
/// partition after `canopy run`), or the Scylla keyspace of `store.uri`.
pub async fn open_configured(cfg: &Config) -> Result<Vec<(String, Arc<dyn Backend>)>, StoreError> {
    if cfg.store.uri == "embedded" {
        return Ok(open_all(&cfg.data_dir, cfg.store.embedded_cache_mb)?
            .into_iter()
            .map(|(n, s)| (n, Arc::new(s) as Arc<dyn Backend>))
            .collect());
    }
    if cfg.store.uri.starts_with("scylla://") {
        // The keyspace of `store.uri` (`ingest`, `demo`) and the per-partition keyspaces
        // `run` made beside it, whichever exist.
        let opts = scylla_options(cfg);
        let (hosts, base) = scylla::parse_uri(&cfg.store.uri)?;
        let session = scylla::session(&hosts, &opts).await?;
        let mut out = Vec::new();
        let main = scylla::ScyllaStore::on_session(session.clone(), base.clone(), &opts).await?;
        if main.is_migrated() {
            out.push((base.clone(), Arc::new(main) as Arc<dyn Backend>));
        }
        for (p, ks) in scylla::shard_keyspaces(&session, &base).await? {
            let s = scylla::ScyllaStore::on_session(session.clone(), ks, &opts).await?;
            if s.is_migrated() {
                out.push((format!("partition-{p}"), Arc::new(s) as Arc<dyn Backend>));
            }
        }
        if out.is_empty() {
            return Err(StoreError::Unavailable(format!(
                "keyspace {base} (and {base}_pN) has no canopy tables: run `canopy migrate` first"
            )));
        }
        return Ok(out);
    }
    Err(StoreError::Unavailable(format!(
        "store.uri = {:?}: expected `embedded` or `scylla://HOST:PORT/KEYSPACE`",
        cfg.store.uri
    )))
}

/// The one store a single engine writes (`ingest`, `demo`).
pub async fn open_single(cfg: &Config) -> Result<Arc<dyn Backend>, StoreError> {
    if cfg.store.uri == "embedded" {
        return Ok(Arc::new(EmbeddedStore::open_with(
            &cfg.data_dir,
            cfg.store.embedded_cache_mb,
        )?));
    }
    let mut all = open_configured(cfg).await?;
    Ok(all.remove(0).1)
}

/// Opens the store of one Kafka partition's shard for `canopy run`: `DATA_DIR/partition-N/`
/// with the embedded store, keyspace `{keyspace}_pN` (created on first use) with Scylla.
pub enum Shards {
    /// The data directory and the page cache of each store (MiB).
    Embedded(std::path::PathBuf, usize),
    Scylla {
        session: Arc<::scylla::client::session::Session>,
        base: String,
        opts: scylla::ScyllaOptions,
    },
}

impl Shards {
    pub async fn new(cfg: &Config) -> Result<Shards, StoreError> {
        if cfg.store.uri == "embedded" {
            return Ok(Shards::Embedded(
                cfg.data_dir.clone(),
                cfg.store.embedded_cache_mb,
            ));
        }
        let (hosts, base) = scylla::parse_uri(&cfg.store.uri)?;
        let opts = scylla_options(cfg);
        let session = scylla::session(&hosts, &opts).await?;
        Ok(Shards::Scylla {
            session,
            base,
            opts,
        })
    }

    pub async fn open(&self, partition: i32) -> Result<Arc<dyn Backend>, StoreError> {
        match self {
            Shards::Embedded(dir, cache_mb) => Ok(Arc::new(EmbeddedStore::open_with(
                &partition_dir(dir, partition),
                *cache_mb,
            )?)),
            Shards::Scylla {
                session,
                base,
                opts,
            } => {
                let ks = scylla::shard_keyspace(base, partition);
                let mut s = scylla::ScyllaStore::on_session(session.clone(), ks, opts).await?;
                if !s.is_migrated() {
                    // Idempotent (`IF NOT EXISTS`): two owners racing here both succeed.
                    s.migrate().await?;
                }
                Ok(Arc::new(s))
            }
        }
    }
}

/// Closes `store` once this is its last handle (an embedded store then releases its file
/// lock and marks the file cleanly closed, so the next open needs no repair). Returns false if
/// other handles remain after `within`: the caller then lets the runtime drop them in order.
pub async fn close(store: Arc<dyn Backend>, within: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    // Nothing can take a new handle from the stopped actors that still hold one, so a count of
    // one cannot grow again before the drop below.
    while Arc::strong_count(&store) > 1 {
        if tokio::time::Instant::now() >= deadline {
            tracing::debug!(
                handles = Arc::strong_count(&store),
                "store still shared at exit"
            );
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    drop(store);
    true
}
