//! The ScyllaDB store, on the `scylla` driver: prepared statements, token-aware routing (the
//! driver's default load balancing), configurable consistency, optional auth.
//!
//! Data model (`schemas/cql/`): every state row carries the checkpoint that wrote it
//! (`version`). A commit
//! 1. range-deletes the versions superseded by the previous commit of this process (garbage
//!    only: readers never pick them, see below);
//! 2. writes the new versions: absolute values, so a retried commit writes the same cells
//!    again (no counters, no lightweight transactions, no read-before-write);
//! 3. moves the commit pointer (`meta`), the one write that makes the checkpoint visible;
//! 4. deletes the bucket partitions of nodes deleted in this checkpoint.
//!
//! Readers read the pointer first and take, per key, the newest version at or below it, so an
//! answer comes from one checkpoint. Every write carries `USING TIMESTAMP` derived from the
//! checkpoint (`seq * 8 + phase`): retries are idempotent, an old retry can never move the
//! pointer back, and step 4's partition delete (phase 2) spares the rows of a node re-created
//! in the same checkpoint (phase 3).
//!
//! Children and roots are read through the `children` index (`003_children.cql`): one
//! partition per parent, entries checked against the node rows as of the pointer (see
//! [`ScyllaStore::child_nodes`]). Entries are written when a node appears under a parent this
//! store has not indexed it under yet (`placed`, primed by `load_tenant`), and stale ones are
//! deleted by the next commit, like superseded versions.
//!
//! Known limits, not hidden: the hierarchy listing's node count scans the hierarchy's `nodes`
//! partition; a node deleted before this process loaded its tenant leaves a stale index entry
//! (never served, only skipped); between steps 3 and 4 a reader may still see a
//! deleted-and-re-created node's old buckets. TLS uses
//! rustls (`store.scylla_tls_*`); the driver names the server by the node's IP address, so
//! node certificates need IP subject-alternative names. This module has been compiled
//! here but never run against a Scylla node: none can run on the development machines. The
//! store suite (`tests/store_suite.rs`) runs it when `CANOPY_SCYLLA_URI` is set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use canopy_actors::agg::{Agg, Granularity};
use canopy_actors::store::{
    AsOf, BucketKind, BucketRow, Checkpoint, CheckpointMeta, DedupBatch, EntityView, HierarchyInfo,
    NodeHeader, NodeRow, NodeView, Store, StoreError, StoreRead, TenantImage,
};
use canopy_actors::tenant::TenantRow;
use futures::stream::{self, StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;

const KEYSPACE_CQL: &str = include_str!("../../schemas/cql/001_keyspace.cql");
const TABLES_CQL: &str = include_str!("../../schemas/cql/002_tables.cql");
const CHILDREN_CQL: &str = include_str!("../../schemas/cql/003_children.cql");
/// The `children` partition of a hierarchy's roots.
const ROOTS: &str = "";
/// Writes of one commit in flight at once.
const CONCURRENCY: usize = 64;

#[derive(Debug, Clone)]
pub struct ScyllaOptions {
    pub user: Option<String>,
    pub password: Option<String>,
    /// `one`, `local_one`, `quorum`, `local_quorum`, `all`...
    pub consistency: String,
    pub replication_factor: u32,
    /// TLS to the nodes (rustls); `None` is plain TCP.
    pub tls: Option<TlsOptions>,
}

/// PEM files for TLS: the CA that signed the nodes' certificates, and optionally a client
/// certificate and key for nodes that require client authentication.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub ca_file: PathBuf,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// The rustls client configuration the driver uses for every connection.
pub fn tls_config(t: &TlsOptions) -> Result<Arc<rustls::ClientConfig>, StoreError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls_err = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        StoreError::Unavailable(format!("scylla TLS: {what} {}: {e}", path.display()))
    };
    let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, StoreError> {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| tls_err("reading certificates from", path, &e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_err("parsing certificates in", path, &e))?;
        if certs.is_empty() {
            return Err(tls_err("no certificate in", path, &"empty PEM"));
        }
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&t.ca_file)? {
        roots
            .add(c)
            .map_err(|e| tls_err("a CA certificate in", &t.ca_file, &e))?;
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match (&t.cert_file, &t.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let k = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| tls_err("reading the private key", key, &e))?;
            builder
                .with_client_auth_cert(certs(cert)?, k)
                .map_err(|e| tls_err("the client certificate", cert, &e))?
        }
        _ => {
            return Err(StoreError::Unavailable(
                "scylla TLS: a client certificate needs both scylla_tls_cert_file and scylla_tls_key_file"
                    .into(),
            ))
        }
    };
    Ok(Arc::new(config))
}

/// One driver session for a cluster, shared by the stores of every keyspace on it.
pub async fn session(hosts: &[String], opts: &ScyllaOptions) -> Result<Arc<Session>, StoreError> {
    let mut b = SessionBuilder::new().known_nodes(hosts);
    if let (Some(u), Some(p)) = (&opts.user, &opts.password) {
        b = b.user(u, p);
    }
    if let Some(t) = &opts.tls {
        b = b.tls_context(Some(tls_config(t)?));
    }
    Ok(Arc::new(b.build().await.map_err(unavailable)?))
}

/// The keyspace of Kafka partition `p`'s shard (`canopy run`): `{base}_p{p}`. Each shard has
/// its own commit pointer and checkpoint sequence, as each embedded shard has its own file.
pub fn shard_keyspace(base: &str, p: i32) -> String {
    format!("{base}_p{p}")
}

/// The shard keyspaces of `base` that exist on the cluster, by partition.
pub async fn shard_keyspaces(
    session: &Session,
    base: &str,
) -> Result<Vec<(i32, String)>, StoreError> {
    let r = session
        .query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces", ())
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(corrupt)?;
    let prefix = format!("{base}_p");
    let mut out = Vec::new();
    for row in r.rows::<(String,)>().map_err(corrupt)? {
        let (name,) = row.map_err(corrupt)?;
        if let Some(Ok(p)) = name.strip_prefix(&prefix).map(str::parse::<i32>) {
            out.push((p, name));
        }
    }
    out.sort();
    Ok(out)
}

impl Default for ScyllaOptions {
    fn default() -> Self {
        ScyllaOptions {
            user: None,
            password: None,
            consistency: "local_quorum".into(),
            replication_factor: 1,
            tls: None,
        }
    }
}

fn consistency(s: &str) -> Result<Consistency, StoreError> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "any" => Consistency::Any,
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        other => {
            return Err(StoreError::Unavailable(format!(
                "unknown consistency {other:?}"
            )))
        }
    })
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// `scylla://host:port[,host:port...]/keyspace`
pub fn parse_uri(uri: &str) -> Result<(Vec<String>, String), StoreError> {
    let rest = uri
        .strip_prefix("scylla://")
        .ok_or_else(|| unavailable(format!("{uri:?} is not scylla://HOST:PORT/KEYSPACE")))?;
    let (hosts, ks) = rest
        .split_once('/')
        .ok_or_else(|| unavailable(format!("{uri:?} names no keyspace")))?;
    let valid = !ks.is_empty() && ks.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(unavailable(format!(
            "keyspace {ks:?} must be [A-Za-z0-9_]+"
        )));
    }
    Ok((
        hosts.split(',').map(str::to_string).collect(),
        ks.to_string(),
    ))
}

fn ts(seq: u64, phase: i64) -> i64 {
    seq as i64 * 8 + phase
}

struct Statements {
    pointer_get: PreparedStatement,
    pointer_set: PreparedStatement,
    tenant_index_put: PreparedStatement,
    tenant_index_all: PreparedStatement,
    tenant_put: PreparedStatement,
    tenant_get: PreparedStatement,
    tenant_gc: PreparedStatement,
    node_put: PreparedStatement,
    node_get: PreparedStatement,
    node_scan: PreparedStatement,
    node_gc: PreparedStatement,
    bucket_put: PreparedStatement,
    bucket_scan: PreparedStatement,
    bucket_series: PreparedStatement,
    bucket_gc: PreparedStatement,
    bucket_drop_node: PreparedStatement,
    dedup_put: PreparedStatement,
    dedup_del: PreparedStatement,
    dedup_scan: PreparedStatement,
    child_put: PreparedStatement,
    child_del: PreparedStatement,
    child_scan: PreparedStatement,
}

/// Keys the last commit wrote, whose older versions the next commit deletes.
#[derive(Default)]
struct Garbage {
    seq: u64,
    tenants: Vec<String>,
    nodes: Vec<(String, String, String)>,
    buckets: Vec<(String, String, String, i8, i8, i64)>,
    /// Index entries a move or delete left behind: (tenant, hierarchy, parent, child).
    children: Vec<(String, String, String, String)>,
}

/// (tenant, hierarchy, node).
type NodeKey = (String, String, String);

/// A node → the parent it is indexed under (`ROOTS` for a root).
type Placed = std::collections::HashMap<NodeKey, String>;

pub struct ScyllaStore {
    session: Arc<Session>,
    keyspace: String,
    replication: u32,
    consistency: Consistency,
    st: Option<Arc<Statements>>,
    garbage: Mutex<Garbage>,
    /// Where this store has indexed each node it wrote or loaded: an index entry is written
    /// only when a node appears or moves, not for every number update.
    placed: Mutex<Placed>,
}

impl ScyllaStore {
    /// Connects; statements are prepared by [`ScyllaStore::prepare`] (after `migrate` on a fresh
    /// cluster), which `open` does.
    pub async fn connect(uri: &str, opts: &ScyllaOptions) -> Result<Self, StoreError> {
        let (hosts, keyspace) = parse_uri(uri)?;
        let session = session(&hosts, opts).await?;
        Self::on_session(session, keyspace, opts).await
    }

    /// A store on keyspace `keyspace` over an existing session.
    pub async fn on_session(
        session: Arc<Session>,
        keyspace: String,
        opts: &ScyllaOptions,
    ) -> Result<Self, StoreError> {
        let mut s = ScyllaStore {
            session,
            keyspace,
            replication: opts.replication_factor,
            consistency: consistency(&opts.consistency)?,
            st: None,
            garbage: Mutex::new(Garbage::default()),
            placed: Mutex::new(Placed::new()),
        };
        if s.prepare(s.consistency).await.is_err() {
            // Tables missing: `migrate` comes first; `st` stays None until then.
        }
        Ok(s)
    }

    /// Whether the keyspace has canopy's tables (the statements could be prepared).
    pub fn is_migrated(&self) -> bool {
        self.st.is_some()
    }

    /// Connects and prepares, failing when the schema is missing.
    pub async fn open(uri: &str, opts: &ScyllaOptions) -> Result<Self, StoreError> {
        let s = Self::connect(uri, opts).await?;
        if s.st.is_none() {
            return Err(unavailable(format!(
                "keyspace {} has no canopy tables: run `canopy migrate` first",
                s.keyspace
            )));
        }
        Ok(s)
    }

    /// Applies `schemas/cql/*.cql` (idempotent) and prepares the statements.
    pub async fn migrate(&mut self) -> Result<(), StoreError> {
        for (id, name, text) in [
            (1, "001_keyspace", KEYSPACE_CQL),
            (2, "002_tables", TABLES_CQL),
            (3, "003_children", CHILDREN_CQL),
        ] {
            let text = text
                .replace("{keyspace}", &self.keyspace)
                .replace("{replication}", &self.replication.to_string());
            for stmt in text.split(';') {
                let body: String = stmt
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("--"))
                    .collect::<Vec<_>>()
                    .join("\n");
                if body.trim().is_empty() {
                    continue;
                }
                self.session
                    .query_unpaged(body, ())
                    .await
                    .map_err(|e| unavailable(format!("migration {name}: {e}")))?;
            }
            self.session
                .await_schema_agreement()
                .await
                .map_err(unavailable)?;
            let q = format!(
                "INSERT INTO {}.migrations (id, name) VALUES (?, ?)",
                self.keyspace
            );
            self.session
                .query_unpaged(q, (id as i32, name))
                .await
                .map_err(unavailable)?;
        }
        self.prepare(self.consistency).await
    }

    async fn prepare(&mut self, c: Consistency) -> Result<(), StoreError> {
        let k = &self.keyspace;
        let p = |q: String| {
            let session = self.session.clone();
            async move {
                let mut s = session.prepare(q).await.map_err(unavailable)?;
                s.set_consistency(c);
                Ok::<_, StoreError>(s)
            }
        };
        let st = Statements {
            pointer_get: p(format!("SELECT seq, source FROM {k}.meta WHERE id = 'checkpoint'")).await?,
            pointer_set: p(format!("UPDATE {k}.meta USING TIMESTAMP ? SET seq = ?, source = ? WHERE id = 'checkpoint'")).await?,
            tenant_index_put: p(format!("INSERT INTO {k}.tenant_index (bucket, tenant) VALUES (0, ?)")).await?,
            tenant_index_all: p(format!("SELECT tenant FROM {k}.tenant_index WHERE bucket = 0")).await?,
            tenant_put: p(format!("INSERT INTO {k}.tenants (tenant, version, row) VALUES (?, ?, ?) USING TIMESTAMP ?")).await?,
            tenant_get: p(format!("SELECT row FROM {k}.tenants WHERE tenant = ? AND version <= ? LIMIT 1")).await?,
            tenant_gc: p(format!("DELETE FROM {k}.tenants USING TIMESTAMP ? WHERE tenant = ? AND version < ?")).await?,
            node_put: p(format!("INSERT INTO {k}.nodes (tenant, hierarchy, node, version, present, parent, header) VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?")).await?,
            node_get: p(format!("SELECT present, parent, header FROM {k}.nodes WHERE tenant = ? AND hierarchy = ? AND node = ? AND version <= ? LIMIT 1")).await?,
            node_scan: p(format!("SELECT node, version, present, parent, header FROM {k}.nodes WHERE tenant = ? AND hierarchy = ?")).await?,
            node_gc: p(format!("DELETE FROM {k}.nodes USING TIMESTAMP ? WHERE tenant = ? AND hierarchy = ? AND node = ? AND version < ?")).await?,
            bucket_put: p(format!("INSERT INTO {k}.buckets (tenant, hierarchy, node, kind, granularity, key, version, agg) VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?")).await?,
            bucket_scan: p(format!("SELECT kind, granularity, key, version, agg FROM {k}.buckets WHERE tenant = ? AND hierarchy = ? AND node = ?")).await?,
            bucket_series: p(format!("SELECT key, version, agg FROM {k}.buckets WHERE tenant = ? AND hierarchy = ? AND node = ? AND kind = ? AND granularity = ?")).await?,
            bucket_gc: p(format!("DELETE FROM {k}.buckets USING TIMESTAMP ? WHERE tenant = ? AND hierarchy = ? AND node = ? AND kind = ? AND granularity = ? AND key = ? AND version < ?")).await?,
            bucket_drop_node: p(format!("DELETE FROM {k}.buckets USING TIMESTAMP ? WHERE tenant = ? AND hierarchy = ? AND node = ?")).await?,
            dedup_put: p(format!("INSERT INTO {k}.dedup (tenant, seq, ids) VALUES (?, ?, ?) USING TIMESTAMP ?")).await?,
            dedup_del: p(format!("DELETE FROM {k}.dedup WHERE tenant = ? AND seq = ?")).await?,
            dedup_scan: p(format!("SELECT seq, ids FROM {k}.dedup WHERE tenant = ?")).await?,
            child_put: p(format!("INSERT INTO {k}.children (tenant, hierarchy, parent, child) VALUES (?, ?, ?, ?) USING TIMESTAMP ?")).await?,
            child_del: p(format!("DELETE FROM {k}.children USING TIMESTAMP ? WHERE tenant = ? AND hierarchy = ? AND parent = ? AND child = ?")).await?,
            child_scan: p(format!("SELECT child FROM {k}.children WHERE tenant = ? AND hierarchy = ? AND parent = ?")).await?,
        };
        self.st = Some(Arc::new(st));
        Ok(())
    }

    fn st(&self) -> Result<&Statements, StoreError> {
        self.st
            .as_deref()
            .ok_or_else(|| unavailable("canopy tables missing: run `canopy migrate`"))
    }

    /// The committed checkpoint (0 before the first).
    async fn pointer(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let r = self
            .session
            .execute_unpaged(&self.st()?.pointer_get, ())
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?;
        let mut rows = r
            .rows::<(Option<i64>, Option<Vec<u8>>)>()
            .map_err(corrupt)?;
        match rows.next().transpose().map_err(corrupt)? {
            Some((Some(seq), src)) => Ok(Some((seq as u64, src.unwrap_or_default()))),
            _ => Ok(None),
        }
    }

    async fn as_of(&self) -> Result<u64, StoreError> {
        Ok(self.pointer().await?.map(|p| p.0).unwrap_or(0))
    }

    async fn tenant_row(&self, t: &str, at: u64) -> Result<Option<TenantRow>, StoreError> {
        let r = self
            .session
            .execute_unpaged(&self.st()?.tenant_get, (t, at as i64))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?;
        let mut rows = r.rows::<(Vec<u8>,)>().map_err(corrupt)?;
        match rows.next().transpose().map_err(corrupt)? {
            Some((b,)) => Ok(Some(rmp_serde::from_slice(&b).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    /// Every node of a hierarchy as of `at`: (node, parent, header).
    async fn hierarchy_nodes(
        &self,
        t: &str,
        h: &str,
        at: u64,
    ) -> Result<Vec<(String, Option<String>, NodeHeader)>, StoreError> {
        type Row = (String, i64, bool, Option<String>, Option<Vec<u8>>);
        let mut stream = self
            .session
            .execute_iter(self.st()?.node_scan.clone(), (t, h))
            .await
            .map_err(unavailable)?
            .rows_stream::<Row>()
            .map_err(corrupt)?;
        let mut out = Vec::new();
        let mut last: Option<String> = None;
        while let Some((node, version, present, parent, header)) =
            stream.try_next().await.map_err(unavailable)?
        {
            // Rows come by node, newest version first: the first at or below `at` wins.
            if version as u64 > at || last.as_deref() == Some(node.as_str()) {
                continue;
            }
            last = Some(node.clone());
            if present {
                let header = rmp_serde::from_slice(&header.unwrap_or_default()).map_err(corrupt)?;
                out.push((node, parent, header));
            }
        }
        Ok(out)
    }

    async fn node_at(
        &self,
        t: &str,
        h: &str,
        n: &str,
        at: u64,
    ) -> Result<Option<(Option<String>, NodeHeader)>, StoreError> {
        let r = self
            .session
            .execute_unpaged(&self.st()?.node_get, (t, h, n, at as i64))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?;
        let mut rows = r
            .rows::<(bool, Option<String>, Option<Vec<u8>>)>()
            .map_err(corrupt)?;
        match rows.next().transpose().map_err(corrupt)? {
            Some((true, parent, header)) => Ok(Some((
                parent,
                rmp_serde::from_slice(&header.unwrap_or_default()).map_err(corrupt)?,
            ))),
            _ => Ok(None),
        }
    }

    /// The children of `parent` (`None`: the roots) as of `at`, by name, with their headers.
    /// The index partition gives candidates; a candidate counts only if its node row as of `at`
    /// exists and names this parent, so entries of uncommitted checkpoints and stale entries of
    /// moves and deletes are skipped.
    async fn child_nodes(
        &self,
        t: &str,
        h: &str,
        parent: Option<&str>,
        at: u64,
    ) -> Result<Vec<(String, NodeHeader)>, StoreError> {
        let mut stream = self
            .session
            .execute_iter(
                self.st()?.child_scan.clone(),
                (t, h, parent.unwrap_or(ROOTS)),
            )
            .await
            .map_err(unavailable)?
            .rows_stream::<(String,)>()
            .map_err(corrupt)?;
        let mut candidates = Vec::new();
        while let Some((c,)) = stream.try_next().await.map_err(unavailable)? {
            candidates.push(c);
        }
        let checked: Vec<_> = stream::iter(candidates)
            .map(|c| async move {
                let n = self.node_at(t, h, &c, at).await?;
                Ok::<_, StoreError>((c, n))
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(checked
            .into_iter()
            .filter_map(|(c, n)| match n {
                Some((p, header)) if p.as_deref() == parent => Some((c, header)),
                _ => None,
            })
            .collect())
    }

    /// Bucket rows of a node as of `at`, newest version per key, emptied keys left out.
    async fn node_buckets(
        &self,
        t: &str,
        h: &str,
        n: &str,
        at: u64,
    ) -> Result<Vec<BucketRow>, StoreError> {
        type Row = (i8, i8, i64, i64, Option<Vec<u8>>);
        let mut stream = self
            .session
            .execute_iter(self.st()?.bucket_scan.clone(), (t, h, n))
            .await
            .map_err(unavailable)?
            .rows_stream::<Row>()
            .map_err(corrupt)?;
        let mut out = Vec::new();
        let mut last = None;
        while let Some((kind, g, key, version, agg)) =
            stream.try_next().await.map_err(unavailable)?
        {
            if version as u64 > at || last == Some((kind, g, key)) {
                continue;
            }
            last = Some((kind, g, key));
            let Some(agg) = agg else { continue };
            out.push(BucketRow {
                kind: if kind == 0 {
                    BucketKind::Subtree
                } else {
                    BucketKind::Own
                },
                granularity: *Granularity::ALL
                    .get(g as usize)
                    .ok_or_else(|| corrupt(format!("granularity {g}")))?,
                key: key as u64,
                agg: Some(rmp_serde::from_slice(&agg).map_err(corrupt)?),
            });
        }
        Ok(out)
    }

    async fn run_all(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        stream::iter(writes)
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }
}

type Write = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

/// One prepared write as a boxed future.
fn write<V>(
    session: &Arc<Session>,
    st: &Arc<Statements>,
    pick: fn(&Statements) -> &PreparedStatement,
    values: V,
) -> Write
where
    V: scylla::serialize::row::SerializeRow + Send + Sync + 'static,
{
    let (session, st) = (session.clone(), st.clone());
    Box::pin(async move {
        session
            .execute_unpaged(pick(&st), values)
            .await
            .map(|_| ())
            .map_err(unavailable)
    })
}

#[async_trait]
impl Store for ScyllaStore {
    async fn meta(&self) -> Result<Option<CheckpointMeta>, StoreError> {
        Ok(self
            .pointer()
            .await?
            .map(|(seq, source)| CheckpointMeta { seq, source }))
    }

    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.tenant_ids().await?.value)
    }

    async fn load_tenant(&self, tenant: &str) -> Result<TenantImage, StoreError> {
        let at = self.as_of().await?;
        let mut image = TenantImage {
            row: self.tenant_row(tenant, at).await?,
            ..Default::default()
        };
        let hierarchies: Vec<String> = image
            .row
            .as_ref()
            .map(|r| r.hierarchies.iter().map(|(h, _)| h.clone()).collect())
            .unwrap_or_default();
        for h in hierarchies {
            let found = self.hierarchy_nodes(tenant, &h, at).await?;
            {
                let mut placed = self.placed.lock().expect("lock");
                for (node, parent, _) in &found {
                    placed.insert(
                        (tenant.to_string(), h.clone(), node.clone()),
                        parent.clone().unwrap_or_else(|| ROOTS.to_string()),
                    );
                }
            }
            for (node, parent, header) in found {
                let buckets = self.node_buckets(tenant, &h, &node, at).await?;
                image.nodes.push(NodeRow {
                    hierarchy: h.clone(),
                    node,
                    parent,
                    header,
                    buckets,
                    packed: None,
                });
            }
        }
        let mut stream = self
            .session
            .execute_iter(self.st()?.dedup_scan.clone(), (tenant,))
            .await
            .map_err(unavailable)?
            .rows_stream::<(i64, Vec<u8>)>()
            .map_err(corrupt)?;
        while let Some((seq, ids)) = stream.try_next().await.map_err(unavailable)? {
            // Batches of a checkpoint that never committed are not part of the state.
            if seq as u64 <= at {
                image.dedup.push(DedupBatch {
                    seq: seq as u64,
                    ids: rmp_serde::from_slice(&ids).map_err(corrupt)?,
                });
            }
        }
        image.dedup.sort_by_key(|d| d.seq);
        Ok(image)
    }

    async fn load_node(
        &self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
    ) -> Result<AsOf<Option<NodeRow>>, StoreError> {
        let at = self.as_of().await?;
        let value = match self.node_at(tenant, hierarchy, node, at).await? {
            Some((parent, header)) => Some(NodeRow {
                hierarchy: hierarchy.to_string(),
                node: node.to_string(),
                parent,
                header,
                buckets: self.node_buckets(tenant, hierarchy, node, at).await?,
                packed: None,
            }),
            None => None,
        };
        Ok(AsOf { as_of: at, value })
    }

    async fn commit(&self, cp: Arc<Checkpoint>) -> Result<u64, StoreError> {
        let st = self
            .st
            .clone()
            .ok_or_else(|| unavailable("canopy tables missing: run `canopy migrate`"))?;
        let s = &self.session;
        let seq = cp.seq;
        // 1. Versions the previous commit superseded (garbage: readers never pick them).
        let old = std::mem::take(&mut *self.garbage.lock().expect("lock"));
        let mut w: Vec<Write> = Vec::new();
        if old.seq > 0 && old.seq < seq {
            let (v, t) = (old.seq as i64, ts(old.seq, 1));
            for tn in old.tenants {
                w.push(write(s, &st, |x| &x.tenant_gc, (t, tn, v)));
            }
            for (tn, h, n) in old.nodes {
                w.push(write(s, &st, |x| &x.node_gc, (t, tn, h, n, v)));
            }
            for (tn, h, n, k, g, key) in old.buckets {
                w.push(write(s, &st, |x| &x.bucket_gc, (t, tn, h, n, k, g, key, v)));
            }
        }
        // Stale index entries: any time at or after the previous commit's pointer (they were
        // never served, see `child_nodes`), and before this commit's re-insertions (phase 3).
        if old.seq < seq {
            let placed = self.placed.lock().expect("lock");
            for (tn, h, p, n) in old.children {
                // Indexed there again since (deleted and re-created under the same parent).
                if placed.get(&(tn.clone(), h.clone(), n.clone())) == Some(&p) {
                    continue;
                }
                w.push(write(s, &st, |x| &x.child_del, (ts(seq, 1), tn, h, p, n)));
            }
        }
        // Where nodes are indexed once this commit lands: applied to `placed` only then, so a
        // retried commit computes, and writes, the same entries again.
        let mut placed_now: std::collections::HashMap<NodeKey, Option<String>> =
            std::collections::HashMap::new();
        let indexed_at = |now: &std::collections::HashMap<NodeKey, Option<String>>,
                          key: &NodeKey| match now.get(key) {
            Some(p) => p.clone(),
            None => self.placed.lock().expect("lock").get(key).cloned(),
        };
        // 2. The new versions.
        let v = seq as i64;
        let mut garbage = Garbage {
            seq,
            ..Default::default()
        };
        let mut dropped = Vec::new();
        for tc in &cp.tenants {
            let tn = tc.tenant.clone();
            if let Some(row) = &tc.row {
                let b = rmp_serde::to_vec(row).map_err(corrupt)?;
                w.push(write(s, &st, |x| &x.tenant_index_put, (tn.clone(),)));
                w.push(write(
                    s,
                    &st,
                    |x| &x.tenant_put,
                    (tn.clone(), v, b, ts(seq, 3)),
                ));
                garbage.tenants.push(tn.clone());
            }
            for (h, n) in &tc.delete_nodes {
                let none: Option<String> = None;
                let no_header: Option<Vec<u8>> = None;
                w.push(write(
                    s,
                    &st,
                    |x| &x.node_put,
                    (
                        tn.clone(),
                        h.clone(),
                        n.clone(),
                        v,
                        false,
                        none,
                        no_header,
                        ts(seq, 2),
                    ),
                ));
                garbage.nodes.push((tn.clone(), h.clone(), n.clone()));
                dropped.push((tn.clone(), h.clone(), n.clone()));
                let key = (tn.clone(), h.clone(), n.clone());
                if let Some(p) = indexed_at(&placed_now, &key) {
                    garbage.children.push((tn.clone(), h.clone(), p, n.clone()));
                }
                placed_now.insert(key, None);
            }
            for n in &tc.put_nodes {
                // This store writes changed buckets one row each (`packed_buckets_max` is None).
                if n.packed.is_some() {
                    return Err(StoreError::Unsupported(format!(
                        "node {:?} came with packed buckets; this store takes changed buckets",
                        n.node
                    )));
                }
                let header = rmp_serde::to_vec(&n.header).map_err(corrupt)?;
                w.push(write(
                    s,
                    &st,
                    |x| &x.node_put,
                    (
                        tn.clone(),
                        n.hierarchy.clone(),
                        n.node.clone(),
                        v,
                        true,
                        n.parent.clone(),
                        Some(header),
                        ts(seq, 3),
                    ),
                ));
                garbage
                    .nodes
                    .push((tn.clone(), n.hierarchy.clone(), n.node.clone()));
                let key = (tn.clone(), n.hierarchy.clone(), n.node.clone());
                let want = n.parent.clone().unwrap_or_else(|| ROOTS.to_string());
                let was = indexed_at(&placed_now, &key);
                if was.as_ref() != Some(&want) {
                    w.push(write(
                        s,
                        &st,
                        |x| &x.child_put,
                        (
                            tn.clone(),
                            n.hierarchy.clone(),
                            want.clone(),
                            n.node.clone(),
                            ts(seq, 3),
                        ),
                    ));
                    if let Some(p) = was {
                        garbage
                            .children
                            .push((tn.clone(), n.hierarchy.clone(), p, n.node.clone()));
                    }
                    placed_now.insert(key, Some(want));
                }
                for b in &n.buckets {
                    let agg = b
                        .agg
                        .as_ref()
                        .map(rmp_serde::to_vec)
                        .transpose()
                        .map_err(corrupt)?;
                    let (k, g, key) = (b.kind as i8, b.granularity as i8, b.key as i64);
                    w.push(write(
                        s,
                        &st,
                        |x| &x.bucket_put,
                        (
                            tn.clone(),
                            n.hierarchy.clone(),
                            n.node.clone(),
                            k,
                            g,
                            key,
                            v,
                            agg,
                            ts(seq, 3),
                        ),
                    ));
                    garbage.buckets.push((
                        tn.clone(),
                        n.hierarchy.clone(),
                        n.node.clone(),
                        k,
                        g,
                        key,
                    ));
                }
            }
            if let Some(d) = &tc.dedup {
                let ids = rmp_serde::to_vec(&d.ids).map_err(corrupt)?;
                w.push(write(
                    s,
                    &st,
                    |x| &x.dedup_put,
                    (tn.clone(), d.seq as i64, ids, ts(seq, 3)),
                ));
            }
            for old_seq in &tc.expire_dedup {
                w.push(write(
                    s,
                    &st,
                    |x| &x.dedup_del,
                    (tn.clone(), *old_seq as i64),
                ));
            }
        }
        let mut rows = w.len() as u64 + 1;
        self.run_all(w).await?;
        // 3. The pointer: from here on readers see this checkpoint.
        write(
            s,
            &st,
            |x| &x.pointer_set,
            (ts(seq, 4), v, cp.source.clone()),
        )
        .await?;
        // 4. Buckets of deleted nodes (rows of a node re-created in this checkpoint are newer).
        let drops = dropped
            .into_iter()
            .map(|(tn, h, n)| write(s, &st, |x| &x.bucket_drop_node, (ts(seq, 2), tn, h, n)))
            .collect::<Vec<_>>();
        rows += drops.len() as u64;
        self.run_all(drops).await?;
        *self.garbage.lock().expect("lock") = garbage;
        let mut placed = self.placed.lock().expect("lock");
        for (key, p) in placed_now {
            match p {
                Some(p) => placed.insert(key, p),
                None => placed.remove(&key),
            };
        }
        Ok(rows)
    }
}

#[async_trait]
impl StoreRead for ScyllaStore {
    async fn tenant_ids(&self) -> Result<AsOf<Vec<String>>, StoreError> {
        let at = self.as_of().await?;
        let mut stream = self
            .session
            .execute_iter(self.st()?.tenant_index_all.clone(), ())
            .await
            .map_err(unavailable)?
            .rows_stream::<(String,)>()
            .map_err(corrupt)?;
        let mut out = Vec::new();
        while let Some((t,)) = stream.try_next().await.map_err(unavailable)? {
            // Listed by a checkpoint that has not committed yet: not visible.
            if self.tenant_row(&t, at).await?.is_some() {
                out.push(t);
            }
        }
        Ok(AsOf {
            as_of: at,
            value: out,
        })
    }

    async fn hierarchies(&self, t: &str) -> Result<AsOf<Option<Vec<HierarchyInfo>>>, StoreError> {
        let at = self.as_of().await?;
        let Some(row) = self.tenant_row(t, at).await? else {
            return Ok(AsOf {
                as_of: at,
                value: None,
            });
        };
        let mut out = Vec::new();
        for (h, mode) in row.hierarchies {
            let nodes = self.hierarchy_nodes(t, &h, at).await?.len() as u64;
            out.push(HierarchyInfo {
                hierarchy: h,
                mode,
                nodes,
            });
        }
        out.sort_by(|a, b| a.hierarchy.cmp(&b.hierarchy));
        Ok(AsOf {
            as_of: at,
            value: Some(out),
        })
    }

    async fn node(&self, t: &str, h: &str, n: &str) -> Result<AsOf<Option<NodeView>>, StoreError> {
        let at = self.as_of().await?;
        let Some((parent, header)) = self.node_at(t, h, n, at).await? else {
            return Ok(AsOf {
                as_of: at,
                value: None,
            });
        };
        let children = self
            .child_nodes(t, h, Some(n), at)
            .await?
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        Ok(AsOf {
            as_of: at,
            value: Some(NodeView {
                parent,
                header,
                children,
            }),
        })
    }

    async fn children(
        &self,
        t: &str,
        h: &str,
        parent: Option<&str>,
    ) -> Result<AsOf<Option<Vec<(String, Agg)>>>, StoreError> {
        let at = self.as_of().await?;
        let known = match parent {
            Some(p) => self.node_at(t, h, p, at).await?.is_some(),
            None => self
                .tenant_row(t, at)
                .await?
                .is_some_and(|r| r.hierarchies.iter().any(|(x, _)| x == h)),
        };
        if !known {
            return Ok(AsOf {
                as_of: at,
                value: None,
            });
        }
        let kids = self
            .child_nodes(t, h, parent, at)
            .await?
            .into_iter()
            .map(|(c, header)| (c, header.subtree))
            .collect();
        Ok(AsOf {
            as_of: at,
            value: Some(kids),
        })
    }

    async fn series(
        &self,
        t: &str,
        h: &str,
        n: &str,
        g: Granularity,
    ) -> Result<AsOf<Option<Vec<(u64, Agg)>>>, StoreError> {
        let at = self.as_of().await?;
        if self.node_at(t, h, n, at).await?.is_none() {
            return Ok(AsOf {
                as_of: at,
                value: None,
            });
        }
        let mut stream = self
            .session
            .execute_iter(
                self.st()?.bucket_series.clone(),
                (t, h, n, BucketKind::Subtree as i8, g as i8),
            )
            .await
            .map_err(unavailable)?
            .rows_stream::<(i64, i64, Option<Vec<u8>>)>()
            .map_err(corrupt)?;
        let mut out = BTreeMap::new();
        let mut last = None;
        while let Some((key, version, agg)) = stream.try_next().await.map_err(unavailable)? {
            if version as u64 > at || last == Some(key) {
                continue;
            }
            last = Some(key);
            if let Some(a) = agg {
                out.insert(key as u64, rmp_serde::from_slice(&a).map_err(corrupt)?);
            }
        }
        Ok(AsOf {
            as_of: at,
            value: Some(out.into_iter().collect()),
        })
    }

    async fn entity(&self, t: &str, e: &str) -> Result<AsOf<Option<EntityView>>, StoreError> {
        let at = self.as_of().await?;
        let Some(row) = self.tenant_row(t, at).await? else {
            return Ok(AsOf {
                as_of: at,
                value: None,
            });
        };
        let mut hierarchies = Vec::new();
        for (h, _) in &row.hierarchies {
            if let Some((p, _)) = self.node_at(t, h, e, at).await? {
                hierarchies.push((h.clone(), p));
            }
        }
        hierarchies.sort();
        let suspended = row.suspended.iter().any(|s| s == e);
        if hierarchies.is_empty() && !suspended {
            return Ok(AsOf {
                as_of: at,
                value: None,
            });
        }
        Ok(AsOf {
            as_of: at,
            value: Some(EntityView {
                suspended,
                hierarchies,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    fn opts(ca: &str, cert: Option<&str>, key: Option<&str>) -> TlsOptions {
        TlsOptions {
            ca_file: fixture(ca),
            cert_file: cert.map(fixture),
            key_file: key.map(fixture),
        }
    }

    #[test]
    fn tls_config_loads_a_ca_and_an_optional_client_certificate() {
        tls_config(&opts("ca.pem", None, None)).expect("CA only");
        let c = tls_config(&opts("ca.pem", Some("client.pem"), Some("client.key")))
            .expect("CA and client certificate");
        assert!(c.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn tls_config_errors_name_the_file_and_the_problem() {
        let e = tls_config(&opts("missing.pem", None, None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
        // A key file holds no certificate.
        let e = tls_config(&opts("client.key", None, None))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no certificate in") && e.contains("client.key"),
            "{e}"
        );
        let e = tls_config(&opts("ca.pem", Some("client.pem"), None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("scylla_tls_key_file"), "{e}");
        // The key does not match the certificate's public key (the CA's certificate).
        let e = tls_config(&opts("ca.pem", Some("ca.pem"), Some("client.key")));
        assert!(e.is_err(), "a mismatched key is refused");
    }

    #[test]
    fn shard_keyspaces_are_named_per_partition() {
        assert_eq!(shard_keyspace("canopy", 7), "canopy_p7");
        let (_, ks) = parse_uri("scylla://127.0.0.1:9042/canopy").unwrap();
        assert_eq!(shard_keyspace(&ks, 0), "canopy_p0");
    }
}
