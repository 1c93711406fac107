//! The store port. The core only needs to commit checkpoints atomically and load them back;
//! backends (the embedded redb store, ScyllaDB) live in the `canopy` crate.

use serde::{Deserialize, Serialize};

use crate::agg::{Agg, Granularity, KeySet};

use crate::tenant::TenantRow;
use crate::time::Micros;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer or refused for now (a node down, a timeout).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store I/O: {0}")]
    Io(String),
    /// The caller asked for something this backend does not do (a bug, not a fault to retry).
    #[error("not supported by this store: {0}")]
    Unsupported(String),
    /// The store's settings cannot work (a TLS file, a consistency name, a URI): retrying
    /// the same settings cannot help.
    #[error("store settings: {0}")]
    Settings(String),
    /// The store holds no canopy schema yet.
    #[error("keyspace {keyspace} has no canopy tables: run `canopy migrate` first")]
    NotMigrated { keyspace: String },
    /// The dead letters a checkpoint covers could not be made durable before it.
    #[error("dead letters: {0}")]
    DeadLetters(#[source] crate::source::SourceError),
    /// The background task committing a checkpoint ended without an answer (it panicked or
    /// was cancelled).
    #[error("checkpoint commit task: {0}")]
    CommitTask(String),
}

impl StoreError {
    /// Whether retrying the same operation may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable(_)
            | StoreError::Io(_)
            | StoreError::DeadLetters(_)
            | StoreError::CommitTask(_) => true,
            StoreError::Corrupt(_)
            | StoreError::Unsupported(_)
            | StoreError::Settings(_)
            | StoreError::NotMigrated { .. } => false,
        }
    }
}

/// Which aggregate a bucket row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BucketKind {
    Subtree = 0,
    Own = 1,
}

/// One bucket of one node. `agg: None` in a checkpoint deletes the row (emptied or out of retention).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BucketRow {
    pub kind: BucketKind,
    pub granularity: Granularity,
    pub key: u64,
    pub agg: Option<Agg>,
}

/// A node's totals (everything but its buckets).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeHeader {
    pub own: Agg,
    pub subtree: Agg,
    /// Whether `own` buckets are kept apart from `subtree` buckets (see [`crate::node::NodeState`]).
    pub own_buckets: bool,
}

/// How a checkpoint's bucket rows of one node apply to what the store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BucketWrite {
    /// Each row is the bucket's new value (`agg: None` deletes it). Node actors send `Fold`
    /// (with values in [`NodeRow::replace`]); stores take both.
    #[default]
    Replace,
    /// Each row is a delta, merged into the stored bucket (events, counts and sums add, min/max
    /// combine), or stored as is where there is none. With `copy_own`, the node got its first
    /// child in this interval: *before* folding, the store sets the node's `own` buckets to a
    /// copy of its stored `subtree` buckets (until then they were the same, see
    /// [`NodeHeader::own_buckets`]), and the `own` rows then fold onto that copy.
    Fold { copy_own: bool },
}

/// One node: its place in the topology, its totals, and bucket rows. In a checkpoint `buckets`
/// holds what changed since the previous checkpoint, applied as `write` says (and kept in
/// (kind, granularity, key) order); loaded, it holds every stored bucket (or none, when the
/// caller asked for headers only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    pub hierarchy: String,
    pub node: String,
    pub parent: Option<String>,
    pub header: NodeHeader,
    pub buckets: Rows,
    #[serde(default)]
    pub write: BucketWrite,
    /// In a checkpoint: bucket values applied after `buckets` (`agg: None` deletes), in (kind,
    /// granularity, key) order, at keys `buckets` does not have. A node hydrated for a move
    /// holds complete values there and writes them as such (the other buckets are deltas).
    /// Loaded: empty.
    #[serde(default)]
    pub replace: Rows,
}

/// Bucket rows, shared: a node's snapshot keeps the rows it hands to a checkpoint until that
/// commit lands (see `Sent` in [`crate::node`]), and sharing them instead of a copy of each
/// saves one copy of every checkpoint interval's deltas at the peak of a commit.
pub type Rows = std::sync::Arc<Vec<BucketRow>>;

/// What a store loads of a node: its header alone (a restart, a tenant restore: they replay
/// onto totals), its buckets too (a moved node, the dump, the audit), or its buckets at some
/// keys (of both kinds): a move needs the old chain's numbers where the moved subtree has
/// buckets, and reads only those, so it costs in proportion to the moved subtree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Load {
    Headers,
    Buckets,
    BucketsAt(std::sync::Arc<KeySet>),
}

/// Event ids accepted in one checkpoint interval, persisted as one row.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DedupBatch {
    pub seq: u64,
    pub ids: Vec<(Box<str>, Micros)>,
}

impl DedupBatch {
    pub fn max_ts(&self) -> Micros {
        self.ids
            .iter()
            .map(|(_, t)| *t)
            .max()
            .unwrap_or(Micros::MIN)
    }
}

/// What one tenant contributes to a checkpoint: only what changed since the previous one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantChanges {
    pub tenant: String,
    pub row: Option<TenantRow>,
    pub put_nodes: Vec<NodeRow>,
    pub delete_nodes: Vec<(String, String)>,
    pub dedup: Option<DedupBatch>,
    pub expire_dedup: Vec<u64>,
    /// Retention, per granularity (minute, hour, day): bucket keys below these are out of
    /// retention for this tenant (0: keep all). The store writes no bucket below them and
    /// drops the stored ones when it likes: the embedded store for every node at once, by
    /// time chunk, the Scylla store with each node's next write.
    #[serde(default)]
    pub retain_from: [u64; 3],
}

impl TenantChanges {
    pub fn rows(&self) -> usize {
        self.row.is_some() as usize
            + self
                .put_nodes
                .iter()
                .map(|n| 1 + n.buckets.len())
                .sum::<usize>()
            + self.delete_nodes.len()
            + self.dedup.is_some() as usize
            + self.expire_dedup.len()
    }
}

/// A checkpoint: every tenant's changes plus the source position they cover, committed at once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    /// Opaque to the store: the source's position (file offset, Kafka offsets...).
    pub source: Vec<u8>,
    pub tenants: Vec<TenantChanges>,
}

impl Checkpoint {
    pub fn rows(&self) -> usize {
        1 + self.tenants.iter().map(TenantChanges::rows).sum::<usize>()
    }
}

/// The last committed checkpoint's header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub seq: u64,
    pub source: Vec<u8>,
}

/// Everything stored for one tenant.
#[derive(Debug, Clone, Default)]
pub struct TenantImage {
    pub row: Option<TenantRow>,
    pub nodes: Vec<NodeRow>,
    pub dedup: Vec<DedupBatch>,
}

/// The state store. `commit` is atomic: a reader sees all of a checkpoint or none of it.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn meta(&self) -> Result<Option<CheckpointMeta>, StoreError>;
    async fn tenants(&self) -> Result<Vec<String>, StoreError>;
    async fn load_tenant(&self, tenant: &str, load: Load) -> Result<TenantImage, StoreError>;
    /// One node, read from one committed checkpoint (`as_of`): its header for a node actor that
    /// restarts (the journal since that checkpoint is replayed onto it), its buckets too for a
    /// node that a move needs complete.
    async fn load_node(
        &self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
        load: Load,
    ) -> Result<AsOf<Option<NodeRow>>, StoreError>;
    /// Commits `cp` atomically; returns what the backend wrote (`Stats::store_rows` and
    /// `Stats::store_bytes` count it). Idempotent: committing a checkpoint whose seq is already
    /// committed changes nothing (a retry after a commit that landed but reported an error must
    /// not fold its deltas twice).
    async fn commit(&self, cp: std::sync::Arc<Checkpoint>) -> Result<Written, StoreError>;
}

/// What a commit wrote: rows (or statements) and their bytes (keys and values as the backend
/// stores them), so that a checkpoint's cost is read off the store, not estimated from its
/// logical changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    pub rows: u64,
    pub bytes: u64,
}

impl Written {
    /// One row of `bytes` bytes.
    pub fn row(bytes: usize) -> Written {
        Written {
            rows: 1,
            bytes: bytes as u64,
        }
    }
}

impl std::ops::AddAssign for Written {
    fn add_assign(&mut self, o: Written) {
        self.rows += o.rows;
        self.bytes += o.bytes;
    }
}

/// An answer read from one committed checkpoint, named by its sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct AsOf<T> {
    pub as_of: u64,
    pub value: T,
}

/// One hierarchy of a tenant, as the query API lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct HierarchyInfo {
    pub hierarchy: String,
    pub mode: crate::record::Mode,
    pub nodes: u64,
}

/// A node with its children's ids, read together.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub parent: Option<String>,
    pub header: NodeHeader,
    pub children: Vec<String>,
}

/// An entity across the hierarchies it is a node of.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityView {
    pub suspended: bool,
    /// hierarchy → parent (None for a root), for every hierarchy the entity is a node of.
    pub hierarchies: Vec<(String, Option<String>)>,
}

/// The read port the query API uses. Each method answers one request from one snapshot of the
/// store, so an answer never mixes two checkpoints. `None` means "no such tenant, hierarchy, node
/// or entity" (the API turns every one of them into the same 404).
#[async_trait::async_trait]
pub trait StoreRead: Send + Sync + 'static {
    /// Tenants with stored state.
    async fn tenant_ids(&self) -> Result<AsOf<Vec<String>>, StoreError>;
    async fn hierarchies(
        &self,
        tenant: &str,
    ) -> Result<AsOf<Option<Vec<HierarchyInfo>>>, StoreError>;
    async fn node(
        &self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
    ) -> Result<AsOf<Option<NodeView>>, StoreError>;
    /// The children of `parent` (the roots when `parent` is None), each with its subtree total.
    async fn children(
        &self,
        tenant: &str,
        hierarchy: &str,
        parent: Option<&str>,
    ) -> Result<AsOf<Option<Vec<(String, Agg)>>>, StoreError>;
    /// A node's `subtree` buckets of one granularity, in key order.
    async fn series(
        &self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
        granularity: Granularity,
    ) -> Result<AsOf<Option<Vec<(u64, Agg)>>>, StoreError>;
    async fn entity(
        &self,
        tenant: &str,
        entity: &str,
    ) -> Result<AsOf<Option<EntityView>>, StoreError>;
}
