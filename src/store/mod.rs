//! Store adapters: implementations of the core's [`canopy_actors::store::Store`] (write) and
//! [`canopy_actors::store::StoreRead`] (query) ports.

pub mod embedded;
pub mod multi;
mod pages;
pub mod scylla;

pub use embedded::EmbeddedStore;
pub use multi::{open_all, partition_dir, MultiRead};

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use canopy_actors::store::{Store, StoreError, StoreRead};

/// A backend serves both ports.
pub trait Backend: Store + StoreRead {}
impl<T: Store + StoreRead> Backend for T {}

/// The `store` section of the configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreOptions {
    /// `embedded` (redb in `data_dir`) or `scylla://host:port[,host:port]/keyspace`.
    pub uri: StoreUri,
    /// Memory the embedded store (redb) may use for its page cache, in MiB, per store file.
    /// Half of it bounds the pages a checkpoint holds before writing them out.
    pub embedded_cache_mb: usize,
    /// Scylla auth (empty: none).
    pub scylla_user: String,
    pub scylla_password: String,
    /// Consistency of every Scylla read and write (`local_quorum`, `quorum`, `one`...).
    pub scylla_consistency: String,
    /// Replication factor `canopy migrate` gives a new keyspace.
    pub scylla_replication_factor: u32,
    /// PEM file of the CA that signed the Scylla nodes' certificates; set, it turns TLS on
    /// (rustls; a node certificate must name the address canopy connects to).
    pub scylla_tls_ca_file: String,
    /// Client certificate and key (PEM) for nodes that require client authentication.
    pub scylla_tls_cert_file: String,
    pub scylla_tls_key_file: String,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            uri: StoreUri::Embedded,
            embedded_cache_mb: embedded::DEFAULT_CACHE_MB,
            scylla_user: String::new(),
            scylla_password: String::new(),
            scylla_consistency: "local_quorum".into(),
            scylla_replication_factor: 1,
            scylla_tls_ca_file: String::new(),
            scylla_tls_cert_file: String::new(),
            scylla_tls_key_file: String::new(),
        }
    }
}

/// `store.uri`, parsed once: which backend, and where a Scylla one is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StoreUri {
    /// redb files in the data directory.
    Embedded,
    Scylla {
        hosts: Vec<String>,
        keyspace: String,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("store.uri {uri:?}: {reason}")]
pub struct BadStoreUri {
    pub uri: String,
    pub reason: String,
}

impl FromStr for StoreUri {
    type Err = BadStoreUri;

    fn from_str(uri: &str) -> Result<Self, BadStoreUri> {
        let bad = |reason: String| BadStoreUri {
            uri: uri.to_string(),
            reason,
        };
        if uri == "embedded" {
            return Ok(StoreUri::Embedded);
        }
        if !uri.starts_with("scylla://") {
            return Err(bad(
                "expected `embedded` or `scylla://HOST:PORT/KEYSPACE`".into()
            ));
        }
        let (hosts, keyspace) = scylla::parse_uri(uri).map_err(|e| {
            bad(match e {
                StoreError::Settings(m) => m,
                e => e.to_string(),
            })
        })?;
        Ok(StoreUri::Scylla { hosts, keyspace })
    }
}

impl fmt::Display for StoreUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUri::Embedded => f.write_str("embedded"),
            StoreUri::Scylla { hosts, keyspace } => {
                write!(f, "scylla://{}/{keyspace}", hosts.join(","))
            }
        }
    }
}

impl TryFrom<String> for StoreUri {
    type Error = BadStoreUri;
    fn try_from(s: String) -> Result<Self, BadStoreUri> {
        s.parse()
    }
}

impl From<StoreUri> for String {
    fn from(u: StoreUri) -> String {
        u.to_string()
    }
}

pub fn scylla_options(s: &StoreOptions) -> scylla::ScyllaOptions {
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

/// Every store `opts` names: the embedded stores in `data_dir` (one, or one per partition
/// after `canopy run`), or the Scylla keyspace of `store.uri` and its partitions' keyspaces.
pub async fn open_all_stores(
    opts: &StoreOptions,
    data_dir: &Path,
) -> Result<Vec<(String, Arc<dyn Backend>)>, StoreError> {
    let StoreUri::Scylla { hosts, keyspace } = &opts.uri else {
        return Ok(open_all(data_dir, opts.embedded_cache_mb)?
            .into_iter()
            .map(|(n, s)| (n, Arc::new(s) as Arc<dyn Backend>))
            .collect());
    };
    // The keyspace of `store.uri` (`ingest`, `demo`) and the per-partition keyspaces `run`
    // made beside it, whichever exist.
    let scylla_opts = scylla_options(opts);
    let base = keyspace;
    let session = scylla::session(hosts, &scylla_opts).await?;
    let mut out = Vec::new();
    let main = scylla::ScyllaStore::on_session(session.clone(), base.clone(), &scylla_opts).await?;
    if main.is_migrated() {
        out.push((base.clone(), Arc::new(main) as Arc<dyn Backend>));
    }
    for (p, ks) in scylla::shard_keyspaces(&session, base).await? {
        let s = scylla::ScyllaStore::on_session(session.clone(), ks, &scylla_opts).await?;
        if s.is_migrated() {
            out.push((format!("partition-{p}"), Arc::new(s) as Arc<dyn Backend>));
        }
    }
    if out.is_empty() {
        return Err(StoreError::NotMigrated {
            keyspace: format!("{base} (and {base}_pN)"),
        });
    }
    Ok(out)
}

/// The one store a single engine writes (`ingest`, `demo`).
pub async fn open_single(
    opts: &StoreOptions,
    data_dir: &Path,
) -> Result<Arc<dyn Backend>, StoreError> {
    if opts.uri == StoreUri::Embedded {
        return Ok(Arc::new(EmbeddedStore::open_with(
            data_dir,
            opts.embedded_cache_mb,
        )?));
    }
    let mut all = open_all_stores(opts, data_dir).await?;
    Ok(all.remove(0).1)
}

/// Opens the store of one Kafka partition's shard for `canopy run`: `DATA_DIR/partition-N/`
/// with the embedded store, keyspace `{keyspace}_pN` (created on first use) with Scylla.
pub enum Shards {
    /// The data directory and the page cache of each store (MiB).
    Embedded(PathBuf, usize),
    Scylla {
        session: Arc<::scylla::client::session::Session>,
        base: String,
        opts: scylla::ScyllaOptions,
    },
}

impl Shards {
    pub async fn new(opts: &StoreOptions, data_dir: &Path) -> Result<Shards, StoreError> {
        match &opts.uri {
            StoreUri::Embedded => Ok(Shards::Embedded(
                data_dir.to_path_buf(),
                opts.embedded_cache_mb,
            )),
            StoreUri::Scylla { hosts, keyspace } => {
                let scylla_opts = scylla_options(opts);
                let session = scylla::session(hosts, &scylla_opts).await?;
                Ok(Shards::Scylla {
                    session,
                    base: keyspace.clone(),
                    opts: scylla_opts,
                })
            }
        }
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
