//! The ScyllaDB store, on the `scylla` driver: prepared statements, token-aware routing (the
//! driver's default load balancing), configurable consistency, optional auth.
//!
//! Data model (`schemas/cql/`): every state row carries the checkpoint that wrote it
//! (`version`). Readers read the commit pointer (`meta`) first and take, per key, the newest
//! version at or below it, so an answer comes from one checkpoint. Every write carries
//! `USING TIMESTAMP ts(seq, phase) = seq * 8 + phase` (1: garbage, 2: deletions, 3: new
//! versions, 4: the pointer): a retry rewrites the same cells, an old retry can never move the
//! pointer back, and a phase-2 delete spares the rows the same checkpoint writes (phase 3).
//!
//! Node actors do not keep their buckets: a checkpoint's bucket rows are mostly *deltas*
//! ([`BucketWrite::Fold`]) that the store merges into what it holds. A commit of checkpoint
//! `seq`
//! 0. reads the pointer. At or past `seq`, the checkpoint has landed already (a retry after a
//!    commit that landed but reported an error): nothing is folded or written again; only the
//!    deleted nodes' partition deletes (step 5, which may not have run) are issued again, and
//!    the store's own bookkeeping is brought up to date;
//! 1. reads, for every node it puts, the *base*: the node's buckets as of the pointer (newest
//!    version ≤ pointer, never a version `seq` a failed attempt of this commit wrote, so a retry
//!    computes and writes the same values). One read per node, nodes concurrently
//!    (`CONCURRENCY`): a fold reads the keys it touches (one multi-column `IN` slice of the
//!    node's partition, `IN_MAX` keys per query); a fold with `copy_own` reads the whole
//!    partition instead (once in a node's life: when it gets its first child); `Replace` rows
//!    read nothing. A node this store does not know to exist (it neither loaded nor wrote it)
//!    is looked up first (one point read of its node row); a node that does not exist as of the
//!    pointer, or that this checkpoint deletes and puts again, has an empty base;
//! 2. range-deletes the versions superseded by the previous commit of this process (garbage
//!    only: readers never pick them);
//! 3. writes the new versions, absolute values as before (no counters, no lightweight
//!    transactions): a fold row's base merged with its delta ([`Agg::merge`]); for
//!    `copy_own`, a kind-1 row per stored subtree bucket (its copy) and a null version per
//!    stored own bucket the copy lacks, with the kind-1 deltas merged onto the copy. Also, at
//!    phase 2: the retention range deletes (below), and a partition delete for a node that did
//!    not exist as of the pointer (rows left from an earlier life of the node, should step 5
//!    of its deletion never have run, must not come back with it);
//! 4. moves the commit pointer, the one write that makes the checkpoint visible;
//! 5. deletes the bucket partitions of nodes deleted in this checkpoint (phase 2: the rows of a
//!    node re-created in the same checkpoint are phase 3).
//!
//! Retention (`TenantChanges::retain_from`): buckets with keys below a granularity's cutoff go
//! from every node the checkpoint puts. No row below the cutoff is written, and the stored ones
//! go with one clustering range tombstone per (kind, granularity),
//! `DELETE ... WHERE tenant = ? AND hierarchy = ? AND node = ? AND kind = ? AND
//! granularity = ? AND key < ?` at phase 2 (a slice on the last restricted clustering column,
//! which Cassandra ≥ 3.0 and Scylla accept). Chosen over null versions because it needs no
//! read (null versions need each node's keys below the cutoff, a range read per (kind,
//! granularity)) and it also removes the null versions that emptied and expired buckets left,
//! which nothing else deletes, so partitions stay bounded by retention. The price: a tombstone
//! is not versioned, so a reader still at the previous pointer sees out-of-retention buckets
//! go slightly early (and so does everyone, if the commit then fails); docs/SPEC.md section 6
//! lets buckets out of retention be dropped at any time. The store remembers per node the cutoffs it last applied
//! (next to `placed`) and writes a tombstone only when a cutoff moved: for the minute
//! granularity about once a minute per dirty node, not once per checkpoint.
//!
//! Cost per checkpoint: one pointer read; per put node one read (a fold; none for `Replace`),
//! plus one point read the first time this process sees a node it did not load, plus a
//! whole-partition read when the node gets its first child. Writes: one node row, one row per
//! bucket written (touched keys, plus the copy for `copy_own`), two range tombstones per
//! granularity whose cutoff moved, one partition delete per new node, plus index entries, the
//! tenant row and the dedup batch when they change, and the pointer; the next commit adds as
//! many garbage range deletes.
//!
//! Consistency: a fold builds on what it reads, so reads must see the previous commit's writes.
//! The configured consistency is used for both (default `local_quorum`); with `one` and a
//! replication factor above 1 a fold may read a stale base and the error stays, and the
//! idempotence check may miss a landed commit and fold it twice.
//!
//! Children and roots are read through the `children` index (`003_children.cql`): one
//! partition per parent, entries checked against the node rows as of the pointer (see
//! [`ScyllaStore::child_nodes`]). Entries are written when a node appears under a parent this
//! store has not indexed it under yet (`placed`, primed by `load_tenant`), and stale ones are
//! deleted by the next commit, like superseded versions.
//!
//! Known limits, not hidden: the hierarchy listing's node count scans the hierarchy's `nodes`
//! partition; a node deleted before this process loaded its tenant leaves a stale index entry
//! (never served, only skipped); between steps 4 and 5 a reader may still see a
//! deleted-and-re-created node's old buckets; the garbage of a commit is not collected if the
//! process dies, or the commit is retried, before the next one. A checkpoint that never
//! committed because its process died leaves its version-`seq` rows behind, and the next
//! process commits a *different* checkpoint under the same `seq` (the engine resumes at
//! pointer + 1): where both write a cell they tie on timestamp (the larger value wins), and
//! leftover rows the new checkpoint does not rewrite become visible with it, later folds
//! building on them. Fixing that needs the abandoned attempt's keys (say, a list of the nodes a
//! commit touches, written to `meta` before its rows and cleaned up by the next process's
//! first commit) and timestamps that let the clean-up lose to the new writes. TLS uses
//! rustls (`store.scylla_tls_*`); the driver names the server by the node's IP address, so
//! node certificates need IP subject-alternative names. This module has been compiled
//! here but never run against a Scylla node: none can run on the development machines. The
//! store suite (`tests/store_suite.rs`) runs it when `CANOPY_SCYLLA_URI` is set.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use canopy_actors::agg::{Agg, Granularity, KeySet};
use canopy_actors::store::{
    AsOf, BucketKind, BucketRow, BucketWrite, Checkpoint, CheckpointMeta, DedupBatch, EntityView,
    HierarchyInfo, Load, NodeHeader, NodeRow, NodeView, Store, StoreError, StoreRead, TenantImage,
    Written,
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
/// Writes (and base reads) of one commit in flight at once.
const CONCURRENCY: usize = 64;
/// Keys per base read: Scylla refuses a query whose clustering restrictions expand to more
/// than `max_clustering_key_restrictions_per_query` ranges (100 by default).
const IN_MAX: usize = 100;

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
        StoreError::Settings(format!("scylla TLS: {what} {}: {e}", path.display()))
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
            return Err(StoreError::Settings(
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
            return Err(StoreError::Settings(format!(
                "unknown consistency {other:?}"
            )))
        }
    })
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn settings(e: impl std::fmt::Display) -> StoreError {
    StoreError::Settings(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// `scylla://host:port[,host:port...]/keyspace`
pub fn parse_uri(uri: &str) -> Result<(Vec<String>, String), StoreError> {
    let rest = uri
        .strip_prefix("scylla://")
        .ok_or_else(|| settings(format!("{uri:?} is not scylla://HOST:PORT/KEYSPACE")))?;
    let (hosts, ks) = rest
        .split_once('/')
        .ok_or_else(|| settings(format!("{uri:?} names no keyspace")))?;
    let valid = !ks.is_empty() && ks.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(settings(format!("keyspace {ks:?} must be [A-Za-z0-9_]+")));
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
    bucket_get: PreparedStatement,
    bucket_series: PreparedStatement,
    bucket_gc: PreparedStatement,
    bucket_drop_node: PreparedStatement,
    bucket_drop_before: PreparedStatement,
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

/// What this store knows of a node that exists as of its last commit (or its tenant's load).
#[derive(Debug, Clone)]
struct Known {
    /// The parent it is indexed under (`ROOTS` for a root).
    parent: String,
    /// Per granularity, the retention cutoff whose range tombstones this store wrote last for
    /// the node (0: none, or not known). Every row written to the node since is at or above
    /// it, so a checkpoint with the same cutoff has nothing of the node to drop.
    retained: [u64; 3],
}

/// The nodes this store knows to exist, as of its last commit.
type Placed = HashMap<NodeKey, Known>;

/// A bucket's clustering key as stored: (kind, granularity, key).
type BucketId = (i8, i8, i64);

const SUBTREE: i8 = BucketKind::Subtree as i8;
const OWN: i8 = BucketKind::Own as i8;

/// What a put node had as of the pointer, as far as its bucket writes are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    /// It existed: folds build on its stored buckets.
    Stored,
    /// It did not exist: nothing stored counts (rows left from an earlier life of the node are
    /// dropped by a partition delete at phase 2).
    Absent,
    /// This checkpoint deletes it and puts it again: nothing stored counts (step 5 drops the
    /// old rows).
    Recreated,
}

/// A put node's bucket writes, computed before the commit writes anything.
struct NodePlan {
    base: Base,
    /// Rows at version `seq`: absolute values (`None`: deleted), in (kind, granularity, key)
    /// order, none below the retention cutoff.
    buckets: Vec<(BucketId, Option<Agg>)>,
}

fn bucket_id(b: &BucketRow) -> BucketId {
    (b.kind as i8, b.granularity as i8, b.key as i64)
}

/// A stored bucket as a row.
fn bucket_row((kind, g, key): BucketId, agg: Agg) -> Result<BucketRow, StoreError> {
    Ok(BucketRow {
        kind: if kind == SUBTREE {
            BucketKind::Subtree
        } else {
            BucketKind::Own
        },
        granularity: *Granularity::ALL
            .get(g as usize)
            .ok_or_else(|| corrupt(format!("granularity {g}")))?,
        key: key as u64,
        agg: Some(agg),
    })
}

/// Whether a bucket is inside retention (`cut[g]` 0: everything is).
fn retained(cut: &[u64; 3], g: i8, key: i64) -> bool {
    let c = cut[g as usize];
    c == 0 || key >= c as i64
}

/// The rows a put node writes at version `seq`, from its checkpoint rows and `stored`, its
/// live buckets as of the pointer (the touched keys for a fold, all of them for `copy_own`;
/// empty for a new node). Pure, so that a retried commit, reading the same base, writes the
/// same values.
fn bucket_writes(
    n: &NodeRow,
    stored: &HashMap<BucketId, Agg>,
    cut: &[u64; 3],
) -> Result<Vec<(BucketId, Option<Agg>)>, StoreError> {
    let mut out: BTreeMap<BucketId, Option<Agg>> = BTreeMap::new();
    match n.write {
        BucketWrite::Replace => {
            for b in n.buckets.iter() {
                out.insert(bucket_id(b), b.agg.clone());
            }
        }
        BucketWrite::Fold { copy_own } => {
            if copy_own {
                // Own buckets stored before are replaced: deleted, unless the copy has the key.
                for (&(k, g, key), _) in stored.iter().filter(|((k, ..), _)| *k == OWN) {
                    out.insert((k, g, key), None);
                }
                for (&(_, g, key), a) in stored.iter().filter(|((k, ..), _)| *k == SUBTREE) {
                    out.insert((OWN, g, key), Some(a.clone()));
                }
            }
            for b in n.buckets.iter() {
                let Some(delta) = &b.agg else {
                    return Err(StoreError::Unsupported(format!(
                        "node {:?}: a folded bucket row without an aggregate",
                        n.node
                    )));
                };
                let id = bucket_id(b);
                let mut v = match out.get(&id) {
                    // Written already in this checkpoint (the copy, or a repeated row).
                    Some(v) => v.clone().unwrap_or_default(),
                    // With `copy_own`, own keys the copy lacks start empty.
                    None if copy_own && id.0 == OWN => Agg::default(),
                    None => stored.get(&id).cloned().unwrap_or_default(),
                };
                v.merge(delta);
                out.insert(id, Some(v));
            }
        }
    }
    // Values of buckets the node held complete (a move hydrated it): they replace whatever the
    // fold left there.
    for b in n.replace.iter() {
        out.insert(bucket_id(b), b.agg.clone());
    }
    // Out of retention: not written (the stored rows go with the range tombstones).
    out.retain(|&(_, g, key), _| retained(cut, g, key));
    Ok(out.into_iter().collect())
}

pub struct ScyllaStore {
    session: Arc<Session>,
    keyspace: String,
    replication: u32,
    consistency: Consistency,
    st: Option<Arc<Statements>>,
    garbage: Mutex<Garbage>,
    /// The nodes this store wrote or loaded: where each is indexed (an index entry is written
    /// only when a node appears or moves, not for every number update), the retention cutoffs
    /// applied to it, and that it exists (a node not in here is looked up before a fold).
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

    fn not_migrated(&self) -> StoreError {
        StoreError::NotMigrated {
            keyspace: self.keyspace.clone(),
        }
    }

    /// Whether the keyspace has canopy's tables (the statements could be prepared).
    pub fn is_migrated(&self) -> bool {
        self.st.is_some()
    }

    /// Connects and prepares, failing when the schema is missing.
    pub async fn open(uri: &str, opts: &ScyllaOptions) -> Result<Self, StoreError> {
        let s = Self::connect(uri, opts).await?;
        if s.st.is_none() {
            return Err(s.not_migrated());
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
                .query_unpaged(q, (id, name))
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
            bucket_get: p(format!("SELECT kind, granularity, key, version, agg FROM {k}.buckets WHERE tenant = ? AND hierarchy = ? AND node = ? AND (kind, granularity, key) IN ?")).await?,
            bucket_series: p(format!("SELECT key, version, agg FROM {k}.buckets WHERE tenant = ? AND hierarchy = ? AND node = ? AND kind = ? AND granularity = ?")).await?,
            bucket_gc: p(format!("DELETE FROM {k}.buckets USING TIMESTAMP ? WHERE tenant = ? AND hierarchy = ? AND node = ? AND kind = ? AND granularity = ? AND key = ? AND version < ?")).await?,
            bucket_drop_node: p(format!("DELETE FROM {k}.buckets USING TIMESTAMP ? WHERE tenant = ? AND hierarchy = ? AND node = ?")).await?,
            bucket_drop_before: p(format!("DELETE FROM {k}.buckets USING TIMESTAMP ? WHERE tenant = ? AND hierarchy = ? AND node = ? AND kind = ? AND granularity = ? AND key < ?")).await?,
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
        self.st.as_deref().ok_or_else(|| self.not_migrated())
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
            let agg = rmp_serde::from_slice(&agg).map_err(corrupt)?;
            out.push(bucket_row((kind, g, key), agg)?);
        }
        Ok(out)
    }

    /// A node's bucket rows at `keys` (of both kinds) as of `at`, in (kind, granularity, key)
    /// order.
    async fn node_buckets_at(
        &self,
        t: &str,
        h: &str,
        n: &str,
        keys: &KeySet,
        at: u64,
    ) -> Result<Vec<BucketRow>, StoreError> {
        let ids: Vec<BucketId> = [SUBTREE, OWN]
            .into_iter()
            .flat_map(|kind| {
                (0..3).flat_map(move |g| keys[g].iter().map(move |k| (kind, g as i8, *k as i64)))
            })
            .collect();
        let mut found: Vec<_> = self
            .buckets_at(t, h, n, &ids, at)
            .await?
            .into_iter()
            .collect();
        found.sort_unstable_by_key(|(id, _)| *id);
        found
            .into_iter()
            .map(|(id, agg)| bucket_row(id, agg))
            .collect()
    }

    /// The live values of bucket keys `keys` of a node as of `at`: one slice of the node's
    /// partition per `IN_MAX` keys (every version of each key; the newest at or below `at`
    /// counts, so versions a failed attempt of the running commit wrote are ignored).
    async fn buckets_at(
        &self,
        t: &str,
        h: &str,
        n: &str,
        keys: &[BucketId],
        at: u64,
    ) -> Result<HashMap<BucketId, Agg>, StoreError> {
        type Row = (i8, i8, i64, i64, Option<Vec<u8>>);
        let st = self.st()?;
        // Per key, the newest version at or below `at` seen so far (the order of rows within
        // an `IN` answer is not relied on).
        let mut newest: HashMap<BucketId, (i64, Option<Vec<u8>>)> = HashMap::new();
        for chunk in keys.chunks(IN_MAX) {
            let mut stream = self
                .session
                .execute_iter(st.bucket_get.clone(), (t, h, n, chunk.to_vec()))
                .await
                .map_err(unavailable)?
                .rows_stream::<Row>()
                .map_err(corrupt)?;
            while let Some((kind, g, key, version, agg)) =
                stream.try_next().await.map_err(unavailable)?
            {
                if version as u64 > at {
                    continue;
                }
                match newest.get(&(kind, g, key)) {
                    Some((v, _)) if *v >= version => {}
                    _ => {
                        newest.insert((kind, g, key), (version, agg));
                    }
                }
            }
        }
        newest
            .into_iter()
            .filter_map(|(id, (_, agg))| Some((id, agg?)))
            .map(|(id, agg)| Ok((id, rmp_serde::from_slice(&agg).map_err(corrupt)?)))
            .collect()
    }

    /// Reads what a put node's bucket writes build on and computes them (step 1 of a commit).
    /// `known`: this store knows the node exists as of `at`; `recreated`: the checkpoint
    /// deletes it too.
    async fn plan_node(
        &self,
        t: &str,
        n: &NodeRow,
        cut: &[u64; 3],
        known: bool,
        recreated: bool,
        at: u64,
    ) -> Result<NodePlan, StoreError> {
        let (h, node) = (n.hierarchy.as_str(), n.node.as_str());
        let base = if recreated {
            Base::Recreated
        } else if known || (at > 0 && self.node_at(t, h, node, at).await?.is_some()) {
            Base::Stored
        } else {
            Base::Absent
        };
        let stored = match (base, n.write) {
            (Base::Stored, BucketWrite::Fold { copy_own: true }) => self
                .node_buckets(t, h, node, at)
                .await?
                .into_iter()
                .filter_map(|b| Some((bucket_id(&b), b.agg?)))
                .collect(),
            (Base::Stored, BucketWrite::Fold { copy_own: false }) => {
                let mut keys: Vec<BucketId> = n
                    .buckets
                    .iter()
                    .map(bucket_id)
                    .filter(|&(_, g, key)| retained(cut, g, key))
                    .collect();
                keys.sort_unstable();
                keys.dedup();
                if keys.is_empty() {
                    HashMap::new()
                } else {
                    self.buckets_at(t, h, node, &keys, at).await?
                }
            }
            _ => HashMap::new(),
        };
        Ok(NodePlan {
            base,
            buckets: bucket_writes(n, &stored, cut)?,
        })
    }

    /// The rest of a checkpoint that has committed already (the pointer is at `cp.seq`): a
    /// retry after a commit that landed but reported an error. Its rows are not written again
    /// (a fold would count twice); the partition deletes of its deleted nodes, which run after
    /// the pointer write, are issued again (phase 2 of `cp.seq`: they spare anything written
    /// since), and `placed` learns what the commit did.
    async fn finish_landed(
        &self,
        st: &Arc<Statements>,
        cp: &Checkpoint,
    ) -> Result<Written, StoreError> {
        let s = &self.session;
        let seq = cp.seq;
        let drops: Vec<Write> = cp
            .tenants
            .iter()
            .flat_map(|tc| {
                tc.delete_nodes.iter().map(move |(h, n)| {
                    write(
                        s,
                        st,
                        |x| &x.bucket_drop_node,
                        (ts(seq, 2), tc.tenant.clone(), h.clone(), n.clone()),
                    )
                })
            })
            .collect();
        let rows = self.run_all(drops).await?;
        let mut placed = self.placed.lock().expect("lock");
        for tc in &cp.tenants {
            for (h, n) in &tc.delete_nodes {
                placed.remove(&(tc.tenant.clone(), h.clone(), n.clone()));
            }
            for n in &tc.put_nodes {
                // Indexed under its parent by that commit (or before it). The cutoffs it
                // applied are not known here: the next put of the node writes them again.
                placed.insert(
                    (tc.tenant.clone(), n.hierarchy.clone(), n.node.clone()),
                    Known {
                        parent: n.parent.clone().unwrap_or_else(|| ROOTS.to_string()),
                        retained: [0; 3],
                    },
                );
            }
        }
        Ok(rows)
    }

    /// Runs `writes`, `CONCURRENCY` at a time; returns what they wrote.
    async fn run_all(&self, writes: Vec<Write>) -> Result<Written, StoreError> {
        let done = Written {
            rows: writes.len() as u64,
            bytes: writes.iter().map(|w| w.bytes).sum(),
        };
        stream::iter(writes.into_iter().map(|w| w.run))
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| done)
    }
}

/// One prepared write, and the bytes of the values it binds (what a commit reports written).
struct Write {
    bytes: u64,
    run: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>,
}

impl std::future::IntoFuture for Write {
    type Output = Result<(), StoreError>;
    type IntoFuture =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        self.run
    }
}

/// A put node's plan being read (boxed: a closure over the checkpoint's borrowed rows inside
/// the stream trips the compiler's `Send` check of the commit future).
type PlanTask<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<NodePlan, StoreError>> + Send + 'a>>;

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
    // Serialized once more only to be measured: a statement's values are a few keys and one
    // encoded bucket set, and the round trip costs far more than this copy.
    let bytes = {
        let specs = pick(st).get_variable_col_specs();
        let ctx = scylla::serialize::row::RowSerializationContext::from_specs(specs.as_slice());
        let mut buf = Vec::new();
        let mut w = scylla::serialize::writers::RowWriter::new(&mut buf);
        values
            .serialize(&ctx, &mut w)
            .map_or(0, |_| buf.len() as u64)
    };
    let (session, st) = (session.clone(), st.clone());
    Write {
        bytes,
        run: Box::pin(async move {
            session
                .execute_unpaged(pick(&st), values)
                .await
                .map(|_| ())
                .map_err(unavailable)
        }),
    }
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

    async fn load_tenant(&self, tenant: &str, load: Load) -> Result<TenantImage, StoreError> {
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
                        Known {
                            parent: parent.clone().unwrap_or_else(|| ROOTS.to_string()),
                            retained: [0; 3],
                        },
                    );
                }
            }
            for (node, parent, header) in found {
                // Headers only: the bucket partitions are not read (a restart costs the node
                // rows, not the retained buckets).
                let buckets = match load {
                    Load::Headers => Vec::new(),
                    // Keys name one node's buckets: a tenant load reads them all.
                    Load::Buckets | Load::BucketsAt(_) => {
                        self.node_buckets(tenant, &h, &node, at).await?
                    }
                };
                image.nodes.push(NodeRow {
                    replace: Default::default(),
                    hierarchy: h.clone(),
                    node,
                    parent,
                    header,
                    buckets: buckets.into(),
                    write: BucketWrite::default(),
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
        load: Load,
    ) -> Result<AsOf<Option<NodeRow>>, StoreError> {
        let at = self.as_of().await?;
        let value = match self.node_at(tenant, hierarchy, node, at).await? {
            Some((parent, header)) => Some(NodeRow {
                replace: Default::default(),
                hierarchy: hierarchy.to_string(),
                node: node.to_string(),
                parent,
                header,
                buckets: match load {
                    Load::Headers => Vec::new(),
                    Load::Buckets => self.node_buckets(tenant, hierarchy, node, at).await?,
                    Load::BucketsAt(keys) => {
                        self.node_buckets_at(tenant, hierarchy, node, &keys, at)
                            .await?
                    }
                }
                .into(),
                write: BucketWrite::default(),
            }),
            None => None,
        };
        Ok(AsOf { as_of: at, value })
    }

    async fn commit(&self, cp: Arc<Checkpoint>) -> Result<Written, StoreError> {
        let st = self.st.clone().ok_or_else(|| self.not_migrated())?;
        let s = &self.session;
        let seq = cp.seq;
        // 0. Committed already: a later checkpoint has committed since (nothing of this one is
        // left to do), or this one landed and its commit reported an error.
        let at = self.as_of().await?;
        if at > seq {
            return Ok(Written::default());
        }
        if at == seq {
            return self.finish_landed(&st, &cp).await;
        }
        // 1. What the put nodes had as of the pointer, and what they write: a read per node,
        // nodes concurrently. Decided from `placed` as it stands, which only a successful
        // commit changes, so a retry plans the same.
        let mut tasks: Vec<PlanTask<'_>> = Vec::new();
        {
            let placed = self.placed.lock().expect("lock");
            for tc in &cp.tenants {
                let deleted: HashSet<(&str, &str)> = tc
                    .delete_nodes
                    .iter()
                    .map(|(h, n)| (h.as_str(), n.as_str()))
                    .collect();
                for n in &tc.put_nodes {
                    let key = (tc.tenant.clone(), n.hierarchy.clone(), n.node.clone());
                    let known = placed.contains_key(&key);
                    let recreated = deleted.contains(&(n.hierarchy.as_str(), n.node.as_str()));
                    tasks.push(Box::pin(self.plan_node(
                        &tc.tenant,
                        n,
                        &tc.retain_from,
                        known,
                        recreated,
                        at,
                    )));
                }
            }
        }
        let plans: Vec<NodePlan> = stream::iter(tasks)
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        let mut plans = plans.into_iter();
        // 2. Versions the previous commit superseded (garbage: readers never pick them).
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
                if placed
                    .get(&(tn.clone(), h.clone(), n.clone()))
                    .map(|k| &k.parent)
                    == Some(&p)
                {
                    continue;
                }
                w.push(write(s, &st, |x| &x.child_del, (ts(seq, 1), tn, h, p, n)));
            }
        }
        // Where nodes are indexed, and the cutoffs applied to them, once this commit lands:
        // applied to `placed` only then, so a retried commit computes, and writes, the same.
        let mut placed_now: HashMap<NodeKey, Option<String>> = HashMap::new();
        let mut retained_now: HashMap<NodeKey, [u64; 3]> = HashMap::new();
        let indexed_at = |now: &HashMap<NodeKey, Option<String>>, key: &NodeKey| match now.get(key)
        {
            Some(p) => p.clone(),
            None => self
                .placed
                .lock()
                .expect("lock")
                .get(key)
                .map(|k| k.parent.clone()),
        };
        // 3. The new versions.
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
            let cut = tc.retain_from;
            for n in &tc.put_nodes {
                let plan = plans.next().expect("a plan per put node");
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
                // Retention: range tombstones for the cutoffs that moved since this store last
                // applied them to the node. A node that did not exist, or that step 5 empties,
                // has no stored row to drop (and none below the cutoff is written).
                let applied = match plan.base {
                    Base::Stored => self
                        .placed
                        .lock()
                        .expect("lock")
                        .get(&key)
                        .map_or([0; 3], |k| k.retained),
                    Base::Absent | Base::Recreated => cut,
                };
                for g in 0..3 {
                    if cut[g] == 0 || cut[g] == applied[g] {
                        continue;
                    }
                    for kind in [SUBTREE, OWN] {
                        w.push(write(
                            s,
                            &st,
                            |x| &x.bucket_drop_before,
                            (
                                ts(seq, 2),
                                tn.clone(),
                                n.hierarchy.clone(),
                                n.node.clone(),
                                kind,
                                g as i8,
                                cut[g] as i64,
                            ),
                        ));
                    }
                }
                retained_now.insert(key.clone(), cut);
                // Rows of an earlier life of the node must not come back with it.
                if plan.base == Base::Absent {
                    w.push(write(
                        s,
                        &st,
                        |x| &x.bucket_drop_node,
                        (ts(seq, 2), tn.clone(), n.hierarchy.clone(), n.node.clone()),
                    ));
                }
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
                for ((k, g, key), agg) in plan.buckets {
                    let agg = agg
                        .as_ref()
                        .map(rmp_serde::to_vec)
                        .transpose()
                        .map_err(corrupt)?;
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
        let mut rows = self.run_all(w).await?;
        // 4. The pointer: from here on readers see this checkpoint.
        let pointer = write(
            s,
            &st,
            |x| &x.pointer_set,
            (ts(seq, 4), v, cp.source.clone()),
        );
        rows += Written {
            rows: 1,
            bytes: pointer.bytes,
        };
        pointer.await?;
        // 5. Buckets of deleted nodes (rows of a node re-created in this checkpoint are newer).
        let drops = dropped
            .into_iter()
            .map(|(tn, h, n)| write(s, &st, |x| &x.bucket_drop_node, (ts(seq, 2), tn, h, n)))
            .collect::<Vec<_>>();
        rows += self.run_all(drops).await?;
        *self.garbage.lock().expect("lock") = garbage;
        let mut placed = self.placed.lock().expect("lock");
        for (key, p) in placed_now {
            match p {
                Some(parent) => {
                    placed
                        .entry(key)
                        .or_insert_with(|| Known {
                            parent: String::new(),
                            retained: [0; 3],
                        })
                        .parent = parent;
                }
                None => {
                    placed.remove(&key);
                }
            }
        }
        for (key, cut) in retained_now {
            if let Some(k) = placed.get_mut(&key) {
                k.retained = cut;
            }
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

    // -- bucket_writes: what a put node writes, given its base (tests begin)

    /// One event per value of metric `m`.
    fn agg(values: &[i64]) -> Agg {
        let m = canopy_actors::agg::MetricName::intern("m");
        let mut a = Agg::default();
        for v in values {
            a.add_event(&[(m, *v)]);
        }
        a
    }

    fn row(kind: BucketKind, g: Granularity, key: u64, agg: Option<Agg>) -> BucketRow {
        BucketRow {
            kind,
            granularity: g,
            key,
            agg,
        }
    }

    fn node(write: BucketWrite, buckets: Vec<BucketRow>) -> NodeRow {
        NodeRow {
            replace: Default::default(),
            hierarchy: "h".into(),
            node: "n".into(),
            parent: None,
            header: NodeHeader::default(),
            buckets: buckets.into(),
            write,
        }
    }

    const FOLD: BucketWrite = BucketWrite::Fold { copy_own: false };
    const COPY: BucketWrite = BucketWrite::Fold { copy_own: true };
    const S: BucketKind = BucketKind::Subtree;
    const O: BucketKind = BucketKind::Own;
    const MIN: Granularity = Granularity::Minute;
    const HOUR: Granularity = Granularity::Hour;

    #[test]
    fn a_fold_merges_onto_the_stored_bucket_and_creates_a_missing_one() {
        let stored = HashMap::from([((SUBTREE, 0, 10), agg(&[1, 2]))]);
        let n = node(
            FOLD,
            vec![
                row(S, MIN, 10, Some(agg(&[5]))),
                row(S, MIN, 11, Some(agg(&[3]))),
            ],
        );
        let out = bucket_writes(&n, &stored, &[0; 3]).unwrap();
        assert_eq!(
            out,
            vec![
                ((SUBTREE, 0, 10), Some(agg(&[1, 2, 5]))),
                ((SUBTREE, 0, 11), Some(agg(&[3]))),
            ]
        );
        let s = out[0].1.as_ref().unwrap().stat("m").copied().unwrap();
        assert_eq!((s.count, s.sum, s.min, s.max), (3, 8, 1, 5));
    }

    #[test]
    fn copy_own_replaces_the_own_buckets_with_the_subtree_copy_then_folds() {
        let stored = HashMap::from([
            ((SUBTREE, 0, 10), agg(&[1])),
            ((SUBTREE, 1, 20), agg(&[2])),
            ((OWN, 0, 9), agg(&[7])),
            ((OWN, 0, 10), agg(&[8])),
        ]);
        let n = node(
            COPY,
            vec![
                row(S, MIN, 10, Some(agg(&[4]))),
                row(O, MIN, 10, Some(agg(&[4]))),
                row(O, MIN, 12, Some(agg(&[6]))),
            ],
        );
        let out = bucket_writes(&n, &stored, &[0; 3]).unwrap();
        assert_eq!(
            out,
            vec![
                ((SUBTREE, 0, 10), Some(agg(&[1, 4]))),
                // Stored before, not in the copy: deleted.
                ((OWN, 0, 9), None),
                // The copy (not the old own value 8), then the delta.
                ((OWN, 0, 10), Some(agg(&[1, 4]))),
                ((OWN, 0, 12), Some(agg(&[6]))),
                ((OWN, 1, 20), Some(agg(&[2]))),
            ]
        );
    }

    #[test]
    fn without_copy_own_own_deltas_fold_onto_the_stored_own_buckets() {
        let stored = HashMap::from([((SUBTREE, 0, 10), agg(&[1])), ((OWN, 0, 10), agg(&[8]))]);
        let n = node(FOLD, vec![row(O, MIN, 10, Some(agg(&[4])))]);
        let out = bucket_writes(&n, &stored, &[0; 3]).unwrap();
        assert_eq!(out, vec![((OWN, 0, 10), Some(agg(&[8, 4])))]);
    }

    #[test]
    fn nothing_below_the_retention_cutoff_is_written() {
        let cut = [10, 0, 0];
        let n = node(
            BucketWrite::Replace,
            vec![
                row(S, MIN, 9, Some(agg(&[1]))),
                row(S, MIN, 9, None),
                row(S, MIN, 10, None),
                row(S, HOUR, 3, Some(agg(&[1]))),
            ],
        );
        let out = bucket_writes(&n, &HashMap::new(), &cut).unwrap();
        assert_eq!(
            out,
            vec![((SUBTREE, 0, 10), None), ((SUBTREE, 1, 3), Some(agg(&[1])))]
        );
        let stored = HashMap::from([((SUBTREE, 0, 5), agg(&[1])), ((SUBTREE, 0, 12), agg(&[2]))]);
        let n = node(COPY, vec![row(S, MIN, 4, Some(agg(&[3])))]);
        let out = bucket_writes(&n, &stored, &cut).unwrap();
        assert_eq!(out, vec![((OWN, 0, 12), Some(agg(&[2])))]);
    }

    #[test]
    fn replace_rows_are_written_as_they_come_and_a_fold_row_needs_an_aggregate() {
        let stored = HashMap::from([((SUBTREE, 0, 10), agg(&[1, 2]))]);
        let n = node(
            BucketWrite::Replace,
            vec![row(S, MIN, 10, Some(agg(&[5]))), row(S, MIN, 11, None)],
        );
        assert_eq!(
            bucket_writes(&n, &stored, &[0; 3]).unwrap(),
            vec![
                ((SUBTREE, 0, 10), Some(agg(&[5]))),
                ((SUBTREE, 0, 11), None)
            ]
        );
        let n = node(FOLD, vec![row(S, MIN, 10, None)]);
        assert!(matches!(
            bucket_writes(&n, &stored, &[0; 3]),
            Err(StoreError::Unsupported(_))
        ));
    }

    // -- (tests end)

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
