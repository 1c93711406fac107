//! The embedded store: a redb database file in the data directory (the default backend).
//!
//! Layout (all values MessagePack). `node_pages`, `bucket_chunks` and `child_pages` are sorted
//! maps kept many entries to a table row ([`super::pages`]): a checkpoint writes one row per
//! page it changes, not one per node or bucket.
//! - `meta`: `"checkpoint"` → the last checkpoint's sequence number and source position
//! - `tenants`: tenant → [`TenantRow`]
//! - `node_pages`: (tenant, hierarchy, node) → (parent, totals: own and subtree, the node's
//!   buckets inline while it has at most [`INLINE_MAX`], and its [`Spans`]: which time chunks
//!   may hold its buckets once they spilled)
//! - `bucket_chunks`: (tenant, granularity, time chunk, hierarchy, node) → a spilled node's
//!   buckets of that granularity and chunk, both kinds, as one compact set ([`packed`]). **Time
//!   first**: a chunk is an hour of minute buckets, six hours of hour buckets, a day of day
//!   buckets ([`CHUNK_MINUTES`]). New buckets of every node land in the few most recent chunks,
//!   so a checkpoint rewrites the sets, and the pages, of the chunks its buckets fall in,
//!   whatever history the nodes have; reading a node's series is one lookup per chunk of its
//!   span.
//! - `retention`: tenant → the retention cutoffs last committed (bucket keys per granularity)
//! - `dedup`: (tenant, checkpoint seq) → the event ids accepted in that checkpoint interval
//! - `child_pages`: (tenant, hierarchy, parent or None for roots, child) → (): the query API's
//!   children and roots reads, kept in step with `node_pages` inside the same transaction
//! - `node_counts`: (tenant, hierarchy) → number of nodes
//!
//! One checkpoint is one redb write transaction, so a reader sees all of it or none of it.
//!
//! A checkpoint's buckets mostly come as deltas ([`BucketWrite::Fold`]): each is merged into the
//! stored bucket inside the commit's transaction (the node's inline set, or its set of that
//! chunk, is decoded, folded and re-encoded).
//! Retention ([`TenantChanges::retain_from`]) is a range delete of whole chunks below the
//! cutoffs, for every node of the tenant at once, plus a read filter: buckets below the cutoff
//! that share a chunk with retained ones are never returned and go with their chunk. A commit
//! whose seq is already stored changes nothing, so a retried commit never folds twice.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use canopy_actors::agg::Agg;
use canopy_actors::agg::{Granularity, KeySet};
use canopy_actors::packed::{self, SetBucket};
use canopy_actors::store::{
    AsOf, BucketKind, BucketRow, BucketWrite, Checkpoint, CheckpointMeta, DedupBatch, EntityView,
    HierarchyInfo, Load, NodeHeader, NodeRow, NodeView, Store, StoreError, StoreRead, TenantImage,
    Written,
};
use canopy_actors::tenant::TenantRow;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::pages::{self, KeyBuf, KeyReader};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
/// Node rows, many to a table row: key [`node_key`] → the node row (see [`pages`]).
const NODE_PAGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("node_pages");
const DEDUP: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dedup");
/// Bucket sets, many to a table row: key [`node_chunk_prefix`] → a node's buckets of one chunk.
const BUCKET_CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("bucket_chunks");
/// The children index, many entries to a table row: key [`child_key`] → nothing.
const CHILD_PAGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("child_pages");
const COUNTS: TableDefinition<(&str, &str), u64> = TableDefinition::new("node_counts");
/// Tenant → the retention cutoffs (`[u64; 3]`) the last commit applied.
const RETENTION: TableDefinition<&str, &[u8]> = TableDefinition::new("retention");

pub const FILE_NAME: &str = "canopy.redb";

/// The layout version, kept in `meta["format"]`: a data directory of another layout is refused
/// with a clear error at open instead of failing to decode rows later. Format 1 (no marker)
/// kept every bucket in its own row; format 2 kept inline sets as MessagePack arrays;
/// format 3 kept one table row per node and per `children` index entry; format 4 kept a
/// node's buckets inline in its row, or node by node in their own pages once it had many.
const FORMAT: &str = "5";

/// The width of a time chunk per granularity, in minutes of local time (bucket keys carry
/// local minutes). Wider chunks mean fewer seeks to read a long series; narrower ones mean
/// fewer bytes rewritten when a checkpoint adds a bucket to every node of a chunk (a chunk's
/// pages hold every node's buckets of that time, and a checkpoint touching most nodes rewrites
/// them). At full retention a series read is at most 48 + 140 + 400 seeks.
pub const CHUNK_MINUTES: [u64; 3] = [60, 6 * 60, 24 * 60];

/// The time chunk of a bucket key of granularity `g` (monotonic in the key).
fn chunk_of(g: u8, key: u64) -> u64 {
    (key >> 20) / CHUNK_MINUTES[g as usize % 3]
}

fn node_key(t: &str, h: &str, n: &str) -> Vec<u8> {
    KeyBuf::new().str(t).str(h).str(n).0
}

/// The first key of a tenant's chunk of one granularity.
fn chunk_prefix(t: &str, g: u8, chunk: u64) -> Vec<u8> {
    let mut k = KeyBuf::new().str(t).0;
    k.push(g);
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

/// The key of one node's bucket set of one chunk.
fn node_chunk_prefix(t: &str, g: u8, chunk: u64, h: &str, n: &str) -> Vec<u8> {
    let mut k = chunk_prefix(t, g, chunk);
    k.extend_from_slice(&KeyBuf::new().str(h).str(n).0);
    k
}

/// A set's key after its tenant prefix: `(granularity, hierarchy, node)`.
fn parse_set_key(rest: &[u8]) -> Result<(u8, String, String), StoreError> {
    let short = || StoreError::Corrupt("a bucket set key too short".into());
    let (&g, rest) = rest.split_first().ok_or_else(short)?;
    let mut r = KeyReader::new(rest.get(8..).ok_or_else(short)?);
    let (h, n) = (r.str()?, r.str()?);
    if !r.rest().is_empty() {
        return Err(StoreError::Corrupt("a bucket set key too long".into()));
    }
    Ok((g, h, n))
}

fn children_prefix(t: &str, h: &str, parent: Option<&str>) -> Vec<u8> {
    KeyBuf::new().str(t).str(h).opt(parent).0
}

fn child_key(t: &str, h: &str, parent: Option<&str>, child: &str) -> Vec<u8> {
    KeyBuf::new().str(t).str(h).opt(parent).str(child).0
}

/// Per granularity, the first and last time chunk that may hold a node's buckets (a
/// superset: emptied buckets do not shrink it; retention does). Reads of a node's buckets seek
/// each chunk of its span above the retention cutoff, and no other.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Spans([Option<(u64, u64)>; 3]);

impl Spans {
    fn add(&mut self, g: u8, chunk: u64) {
        let s = &mut self.0[g as usize % 3];
        *s = Some(match *s {
            Some((lo, hi)) => (lo.min(chunk), hi.max(chunk)),
            None => (chunk, chunk),
        });
    }

    /// The chunks of granularity `g` that may hold buckets at or above the cutoff.
    fn chunks(&self, g: u8, cut: &[u64; 3]) -> std::ops::RangeInclusive<u64> {
        match self.0[g as usize % 3] {
            Some((lo, hi)) => lo.max(chunk_of(g, cut[g as usize % 3]))..=hi,
            #[allow(clippy::reversed_empty_ranges)]
            None => 1..=0,
        }
    }

    /// Forgets chunks that retention removed.
    fn clamp(&mut self, cut: &[u64; 3]) {
        for g in 0..3u8 {
            let c = chunk_of(g, cut[g as usize]);
            let s = &mut self.0[g as usize];
            *s = s.and_then(|(lo, hi)| (hi >= c).then_some((lo.max(c), hi)));
        }
    }
}

/// A node row's value: `(parent, header, inline set or None once spilled, spans)`, the inline
/// set as a MessagePack `bin` holding its compact encoding ([`packed`]).
#[derive(serde::Serialize)]
struct NodeValue<'a>(
    &'a Option<String>,
    &'a NodeHeader,
    Option<&'a serde_bytes::Bytes>,
    &'a Spans,
);

#[derive(serde::Deserialize)]
struct StoredNode(
    Option<String>,
    NodeHeader,
    Option<serde_bytes::ByteBuf>,
    Spans,
);

impl StoredNode {
    fn decode(v: &[u8]) -> Result<Self, StoreError> {
        rmp_serde::from_slice(v).map_err(corrupt)
    }

    /// The inline set, decoded (`None`: the buckets are spilled to chunk sets).
    fn inline(&self) -> Result<Option<Vec<SetBucket>>, StoreError> {
        self.2.as_ref().map(|b| packed::decode(b)).transpose()
    }
}

/// A node keeps its buckets inside its own row while it has at most this many (all kinds and
/// granularities together); past it they move to chunk sets for good. Most nodes are leaves
/// with a few buckets: one row rewrite per checkpoint is their cheapest form, and it stays
/// bounded (~1 KB). A node with more would rewrite its growing history at every checkpoint.
pub const INLINE_MAX: usize = 64;

/// Applies a node's checkpoint rows (sorted by kind, granularity, key) to its inline set, as
/// `write` says: values that replace, or deltas that fold (after the copy of `subtree` to `own`).
fn apply_inline(set: &mut Vec<SetBucket>, changes: &[BucketRow], write: BucketWrite) {
    let fold = match write {
        BucketWrite::Replace => false,
        BucketWrite::Fold { copy_own } => {
            if copy_own {
                set.retain(|b| b.0 != BucketKind::Own as u8);
                let copies: Vec<SetBucket> = set
                    .iter()
                    .map(|(_, g, k, a)| (BucketKind::Own as u8, *g, *k, a.clone()))
                    .collect();
                set.extend(copies);
            }
            true
        }
    };
    for b in changes {
        let k = (b.kind as u8, b.granularity as u8, b.key);
        let at = set.binary_search_by(|(kd, g, key, _)| (*kd, *g, *key).cmp(&k));
        match (&b.agg, at) {
            (Some(a), Ok(i)) if fold => set[i].3.merge(a),
            (Some(a), Ok(i)) => set[i].3 = a.clone(),
            (Some(a), Err(i)) => set.insert(i, (k.0, k.1, k.2, a.clone())),
            (None, Ok(i)) => {
                set.remove(i);
            }
            (None, Err(_)) => {}
        }
    }
}

/// What most uses of a node row need: its parent and its header (decoded, or skipped with
/// `IgnoredAny`).
struct RowPrefix<H> {
    parent: Option<String>,
    header: H,
}

fn row_prefix<H: serde::de::DeserializeOwned>(mut v: &[u8]) -> Result<RowPrefix<H>, StoreError> {
    use serde::Deserialize;
    let fields = rmp::decode::read_array_len(&mut v).map_err(corrupt)?;
    if fields != 4 {
        return Err(StoreError::Corrupt(format!(
            "a node row has {fields} fields instead of 4"
        )));
    }
    let mut de = rmp_serde::Deserializer::new(&mut v);
    let parent = Option::<String>::deserialize(&mut de).map_err(corrupt)?;
    let header = H::deserialize(&mut de).map_err(corrupt)?;
    Ok(RowPrefix { parent, header })
}

type Skip = serde::de::IgnoredAny;

/// What a checkpoint does to a node's bucket set of one chunk (several apply in order).
enum BucketOp<'a> {
    /// Every bucket goes (the node is deleted).
    Clear,
    /// The `own` buckets become a copy of the `subtree` ones (`copy_own`).
    CopyOwn,
    /// A value that replaces the stored one.
    Set(u8, u64, &'a Agg),
    /// A bucket of an inline set that spills (boxed: an `Agg` inline would double the size of
    /// every change, and a long run's commit holds millions).
    Spill(u8, u64, Box<Agg>),
    /// The bucket goes.
    Delete(u8, u64),
    /// A delta merged into the stored value.
    Fold(u8, u64, &'a Agg),
}

/// One change of a bucket set, sorted by the parts of its set's key in key order
/// (granularity, chunk, node) before any key bytes exist: a checkpoint carries millions on a
/// long run, and sorting byte keys, or cloning deltas into them, cost more than the fold.
struct BucketChange<'a> {
    g: u8,
    chunk: u64,
    /// Index into [`IndexChanges::names`]: nodes are numbered in key order.
    node: u32,
    /// Arrival order: changes of one set apply in the order they arose.
    seq: u32,
    op: BucketOp<'a>,
}

/// Applies changes, in order, to a set of one granularity (sorted by kind, key).
fn apply_set(set: &mut Vec<SetBucket>, g: u8, changes: &[BucketChange]) {
    let find = |set: &[SetBucket], kind: u8, key: u64| {
        set.binary_search_by(|(kd, _, k, _)| (*kd, *k).cmp(&(kind, key)))
    };
    for c in changes {
        match &c.op {
            BucketOp::Clear => set.clear(),
            BucketOp::CopyOwn => {
                let own = BucketKind::Own as u8;
                set.retain(|b| b.0 != own);
                let copies: Vec<SetBucket> = set
                    .iter()
                    .map(|(_, _, k, a)| (own, g, *k, a.clone()))
                    .collect();
                set.extend(copies);
            }
            BucketOp::Set(kind, key, a) => match find(set, *kind, *key) {
                Ok(i) => set[i].3 = (*a).clone(),
                Err(i) => set.insert(i, (*kind, g, *key, (*a).clone())),
            },
            BucketOp::Spill(kind, key, a) => match find(set, *kind, *key) {
                Ok(i) => set[i].3 = (**a).clone(),
                Err(i) => set.insert(i, (*kind, g, *key, (**a).clone())),
            },
            BucketOp::Fold(kind, key, a) => match find(set, *kind, *key) {
                Ok(i) => set[i].3.merge(a),
                Err(i) => set.insert(i, (*kind, g, *key, (*a).clone())),
            },
            BucketOp::Delete(kind, key) => {
                if let Ok(i) = find(set, *kind, *key) {
                    set.remove(i);
                }
            }
        }
    }
}

#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// The default page cache (`store.embedded_cache_mb`). redb's own default is 1 GiB, and a
/// checkpoint of the ingest benchmark (~95,000 node rows) fills it: the process then held
/// ~600 MB more than with 64 MiB, for no measurable gain in speed (128 leaves room for the
/// query API's reads). On this kind of machine first
/// touching memory is slow (about a second per GB), so memory not held is time saved.
pub const DEFAULT_CACHE_MB: usize = 128;

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, with the default page cache.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, DEFAULT_CACHE_MB)
    }

    /// Opens (or creates) the store in `dir` with a page cache of `cache_mb` MiB.
    pub fn open_with(dir: &Path, cache_mb: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let db = redb::Builder::new()
            .set_cache_size(cache_mb.max(1) << 20)
            .create(dir.join(FILE_NAME))
            .map_err(io)?;
        let tx = db.begin_write().map_err(io)?;
        {
            let mut meta = tx.open_table(META).map_err(io)?;
            let format = meta
                .get("format")
                .map_err(io)?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            let used = meta.get("checkpoint").map_err(io)?.is_some();
            match format.as_deref() {
                Some(FORMAT) => {}
                None if !used => {
                    meta.insert("format", FORMAT.as_bytes()).map_err(io)?;
                }
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "{} was written in store format {} and this canopy reads format {FORMAT} \
                         (buckets kept by time chunk): ingest into a new data directory",
                        dir.join(FILE_NAME).display(),
                        other.unwrap_or("1")
                    )))
                }
            }
        }
        tx.open_table(TENANTS).map_err(io)?;
        tx.open_table(NODE_PAGES).map_err(io)?;
        tx.open_table(DEDUP).map_err(io)?;
        tx.open_table(BUCKET_CHUNKS).map_err(io)?;
        tx.open_table(CHILD_PAGES).map_err(io)?;
        tx.open_table(COUNTS).map_err(io)?;
        tx.open_table(RETENTION).map_err(io)?;
        tx.commit().map_err(io)?;
        Ok(EmbeddedStore { db: Arc::new(db) })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(io)?
    }
}

/// The retention cutoffs a tenant's last commit applied (zeros: none yet).
fn stored_cut<T: ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    tenant: &str,
) -> Result<[u64; 3], StoreError> {
    match t.get(tenant).map_err(io)? {
        Some(v) => rmp_serde::from_slice(v.value()).map_err(corrupt),
        None => Ok([0; 3]),
    }
}

/// Commits one checkpoint in one write transaction; returns the rows written (inserted or
/// deleted) and their bytes (keys and values; a deletion's key).
fn commit(db: &Database, cp: &Checkpoint) -> Result<Written, StoreError> {
    let tx = db.begin_write().map_err(io)?;
    let mut rows = Written::default();
    {
        // Already committed (a retry after a commit that landed but reported an error): folding
        // its deltas again would count them twice.
        let stored = {
            let meta = tx.open_table(META).map_err(io)?;
            let v = meta.get("checkpoint").map_err(io)?;
            v.map(|v| rmp_serde::from_slice::<CheckpointMeta>(v.value()))
                .transpose()
                .map_err(corrupt)?
        };
        if stored.is_some_and(|m| m.seq >= cp.seq) {
            return Ok(Written::default());
        }
        let mut tenants = tx.open_table(TENANTS).map_err(io)?;
        let mut nodes = tx.open_table(NODE_PAGES).map_err(io)?;
        let mut dedup = tx.open_table(DEDUP).map_err(io)?;
        let mut buckets = tx.open_table(BUCKET_CHUNKS).map_err(io)?;
        let mut children = tx.open_table(CHILD_PAGES).map_err(io)?;
        let mut counts = tx.open_table(COUNTS).map_err(io)?;
        let mut retention = tx.open_table(RETENTION).map_err(io)?;
        for t in &cp.tenants {
            let tn = t.tenant.as_str();
            if let Some(row) = &t.row {
                let v = rmp_serde::to_vec(row).map_err(io)?;
                rows += Written::row(tn.len() + v.len());
                tenants.insert(tn, v.as_slice()).map_err(io)?;
            }
            // Cutoffs only move forward: a checkpoint never brings back what one dropped.
            let old_cut = stored_cut(&retention, tn)?;
            let mut cut = old_cut;
            for (c, new) in cut.iter_mut().zip(t.retain_from) {
                *c = (*c).max(new);
            }
            // Deletes before puts of the same key (a stable sort): a node deleted and created
            // again in one interval ends up present.
            let mut ops: Vec<(Vec<u8>, NodeOp)> =
                Vec::with_capacity(t.delete_nodes.len() + t.put_nodes.len());
            for (h, n) in &t.delete_nodes {
                ops.push((node_key(tn, h, n), NodeOp::Delete(h, n)));
            }
            for n in &t.put_nodes {
                ops.push((node_key(tn, &n.hierarchy, &n.node), NodeOp::Put(n)));
            }
            ops.sort_by(|a, b| a.0.cmp(&b.0));
            let mut ix = IndexChanges::default();
            // Every bucket row may become a change: growing the vector as they come costs a
            // copy and fresh pages per doubling (a long run's commit holds millions).
            ix.buckets.reserve(
                t.put_nodes
                    .iter()
                    .map(|n| n.buckets.len() + n.replace.len())
                    .sum(),
            );
            // Node numbers in key order (a node deleted and created again keeps one number).
            let mut numbers = Vec::with_capacity(ops.len());
            for (i, (k, op)) in ops.iter().enumerate() {
                if i == 0 || ops[i - 1].0 != *k {
                    ix.names.push(match op {
                        NodeOp::Delete(h, n) => (*h, *n),
                        NodeOp::Put(n) => (n.hierarchy.as_str(), n.node.as_str()),
                    });
                }
                numbers.push(ix.names.len() as u32 - 1);
            }
            let mut at = 0;
            rows += pages::apply(&mut nodes, &ops, |_, old, op| {
                let node = numbers[at];
                at += 1;
                match op {
                    NodeOp::Delete(h, n) => {
                        if let Some(old) = old {
                            let old = StoredNode::decode(old)?;
                            ix.children
                                .push((child_key(tn, h, old.0.as_deref(), n), false));
                            *ix.counts.entry(h).or_default() -= 1;
                            delete_buckets(&mut ix, node, &old.3, &cut);
                        }
                        Ok(None)
                    }
                    NodeOp::Put(n) => put_node(&mut ix, tn, &cut, (n, node), old).map(Some),
                }
            })?;
            rows += apply_buckets(&mut buckets, tn, &cut, &mut ix)?;
            if cut != old_cut {
                // Whole chunks below the cutoffs go, for every node of the tenant; what is
                // below a cutoff inside its chunk is filtered out by reads until the chunk goes.
                for g in 0..3u8 {
                    let (from, to) = (old_cut[g as usize], cut[g as usize]);
                    if chunk_of(g, to) > chunk_of(g, from) {
                        rows += pages::delete_range(
                            &mut buckets,
                            &chunk_prefix(tn, g, chunk_of(g, from)),
                            &chunk_prefix(tn, g, chunk_of(g, to)),
                        )?;
                    }
                }
                let v = rmp_serde::to_vec(&cut).map_err(io)?;
                rows += Written::row(tn.len() + v.len());
                retention.insert(tn, v.as_slice()).map_err(io)?;
            }
            ix.children.sort_by(|a, b| a.0.cmp(&b.0));
            rows += pages::apply(&mut children, &ix.children, |_, _, add| {
                Ok(add.then(Vec::new))
            })?;
            for (h, d) in ix.counts {
                if d != 0 {
                    rows += Written::row(tn.len() + h.len() + 8);
                    add_count(&mut counts, tn, h, d)?;
                }
            }
            if let Some(b) = &t.dedup {
                let v = rmp_serde::to_vec(&b.ids).map_err(io)?;
                rows += Written::row(tn.len() + 8 + v.len());
                dedup.insert((tn, b.seq), v.as_slice()).map_err(io)?;
            }
            for seq in &t.expire_dedup {
                rows += Written::row(tn.len() + 8);
                dedup.remove((tn, *seq)).map_err(io)?;
            }
        }
        let mut meta = tx.open_table(META).map_err(io)?;
        let m = CheckpointMeta {
            seq: cp.seq,
            source: cp.source.clone(),
        };
        let v = rmp_serde::to_vec(&m).map_err(io)?;
        rows += Written::row("checkpoint".len() + v.len());
        meta.insert("checkpoint", v.as_slice()).map_err(io)?;
    }
    tx.commit().map_err(io)?;
    Ok(rows)
}

/// One node change of a checkpoint, by node key.
enum NodeOp<'a> {
    Delete(&'a str, &'a str),
    Put(&'a NodeRow),
}

/// What a checkpoint's node changes do to the index tables, applied after the node pages.
#[derive(Default)]
struct IndexChanges<'a> {
    /// `children` entries to add (true) or remove, in the order they arose.
    children: Vec<(Vec<u8>, bool)>,
    /// Node count change per hierarchy.
    counts: std::collections::BTreeMap<&'a str, i64>,
    /// Bucket changes, in the order they arose.
    buckets: Vec<BucketChange<'a>>,
    /// (hierarchy, node) by node number.
    names: Vec<(&'a str, &'a str)>,
}

impl<'a> IndexChanges<'a> {
    fn bucket(&mut self, node: u32, g: u8, chunk: u64, op: BucketOp<'a>) {
        let seq = self.buckets.len() as u32;
        self.buckets.push(BucketChange {
            g,
            chunk,
            node,
            seq,
            op,
        });
    }
}

/// Applies a tenant's bucket changes: sorted by their set's key parts, then given byte keys
/// (built in one buffer) and merged into the chunks' pages, one set decoded and re-encoded per
/// (node, chunk) touched.
fn apply_buckets(
    buckets: &mut redb::Table<&'static [u8], &'static [u8]>,
    tn: &str,
    cut: &[u64; 3],
    ix: &mut IndexChanges,
) -> Result<Written, StoreError> {
    ix.buckets
        .sort_unstable_by_key(|c| (c.g, c.chunk, c.node, c.seq));
    let sets: Vec<&[BucketChange]> = ix
        .buckets
        .chunk_by(|a, b| (a.g, a.chunk, a.node) == (b.g, b.chunk, b.node))
        .collect();
    let mut bytes = Vec::with_capacity(sets.len() * 48);
    let mut ends = Vec::with_capacity(sets.len());
    let mut node = (u32::MAX, Vec::new());
    for set in &sets {
        let c = &set[0];
        if c.node != node.0 {
            let (h, n) = ix.names[c.node as usize];
            node = (c.node, KeyBuf::new().str(h).str(n).0);
        }
        bytes.extend_from_slice(&chunk_prefix(tn, c.g, c.chunk));
        bytes.extend_from_slice(&node.1);
        ends.push(bytes.len());
    }
    let mut start = 0;
    let keyed: Vec<(&[u8], &[BucketChange])> = sets
        .iter()
        .zip(&ends)
        .map(|(set, &end)| {
            let k = &bytes[start..end];
            start = end;
            (k, *set)
        })
        .collect();
    pages::apply(buckets, &keyed, |_, old, changes| {
        let g = changes[0].g;
        let mut set = match old {
            Some(v) => packed::decode(v)?,
            None => Vec::new(),
        };
        apply_set(&mut set, g, changes);
        let from = cut[g as usize % 3];
        set.retain(|b| b.2 >= from);
        Ok((!set.is_empty()).then(|| packed::encode(&set).0))
    })
}

/// The new row of a put node, given its stored row; its bucket changes go to `ix.buckets`:
/// the copy of `subtree` to `own` first (for `copy_own`, read as committed), then the rows as
/// values or deltas. Rows below the retention cutoff are not written.
fn put_node<'a>(
    ix: &mut IndexChanges<'a>,
    tn: &str,
    cut: &[u64; 3],
    (n, number): (&'a NodeRow, u32),
    old: Option<&[u8]>,
) -> Result<Vec<u8>, StoreError> {
    let (old_parent, mut inline, mut spans) = match old.map(StoredNode::decode).transpose()? {
        Some(o) => (Some(o.0.clone()), o.inline()?, o.3),
        None => (None, Some(Vec::new()), Spans::default()),
    };
    place(ix, tn, n, old_parent.as_ref());
    if let Some(set) = &mut inline {
        apply_inline(set, &n.buckets, n.write);
        apply_inline(set, &n.replace, BucketWrite::Replace);
        set.retain(|(_, g, key, _)| *key >= cut[*g as usize % 3]);
        if set.len() <= INLINE_MAX {
            return node_value(&n.parent, &n.header, Some(set), &spans);
        }
        // Spill: every bucket moves to its chunk's set, for good.
        for (kind, g, key, agg) in std::mem::take(set) {
            let chunk = chunk_of(g, key);
            spans.add(g, chunk);
            ix.bucket(number, g, chunk, BucketOp::Spill(kind, key, Box::new(agg)));
        }
        return node_value(&n.parent, &n.header, None, &spans);
    }
    let fold = match n.write {
        BucketWrite::Replace => false,
        BucketWrite::Fold { copy_own } => {
            if copy_own {
                for g in 0..3u8 {
                    for chunk in spans.chunks(g, cut) {
                        ix.bucket(number, g, chunk, BucketOp::CopyOwn);
                    }
                }
            }
            true
        }
    };
    // The values of `replace` come after the deltas: within a set, changes apply in order.
    let rows = n.buckets.iter().map(|b| (b, fold));
    for (b, fold) in rows.chain(n.replace.iter().map(|b| (b, false))) {
        let g = b.granularity as u8;
        if b.key < cut[g as usize] {
            continue;
        }
        let kind = b.kind as u8;
        let op = match &b.agg {
            Some(a) if fold => BucketOp::Fold(kind, b.key, a),
            Some(a) => BucketOp::Set(kind, b.key, a),
            None => BucketOp::Delete(kind, b.key),
        };
        let chunk = chunk_of(g, b.key);
        spans.add(g, chunk);
        ix.bucket(number, g, chunk, op);
    }
    spans.clamp(cut);
    node_value(&n.parent, &n.header, None, &spans)
}

/// Keeps the `children` index and `node_counts` in step with a node put, given the parent
/// its stored row had (`None`: no stored row). Most puts are number updates and change nothing.
fn place<'a>(
    ix: &mut IndexChanges<'a>,
    tn: &str,
    n: &'a NodeRow,
    old_parent: Option<&Option<String>>,
) {
    let (h, node) = (n.hierarchy.as_str(), n.node.as_str());
    match old_parent {
        Some(p) if *p == n.parent => return,
        Some(p) => ix
            .children
            .push((child_key(tn, h, p.as_deref(), node), false)),
        None => *ix.counts.entry(h).or_default() += 1,
    }
    ix.children
        .push((child_key(tn, h, n.parent.as_deref(), node), true));
}

/// Deletes every stored bucket of one node (as stored before this checkpoint).
fn delete_buckets(ix: &mut IndexChanges, number: u32, spans: &Spans, cut: &[u64; 3]) {
    for g in 0..3u8 {
        for chunk in spans.chunks(g, cut) {
            ix.bucket(number, g, chunk, BucketOp::Clear);
        }
    }
}

/// One node's stored buckets at or above the cutoffs, in (kind, granularity, key) order: of
/// every kind and granularity, or of one (`only`).
fn node_buckets<T: ReadableTable<&'static [u8], &'static [u8]>>(
    buckets: &T,
    (t, h, n): (&str, &str, &str),
    row: &StoredNode,
    cut: &[u64; 3],
    only: Option<(BucketKind, Granularity)>,
    at: Option<&KeySet>,
) -> Result<Vec<BucketRow>, StoreError> {
    let wanted = |kd: u8, g: u8, key: u64| {
        key >= cut[g as usize % 3]
            && only.is_none_or(|(k, og)| (k as u8, og as u8) == (kd, g))
            && at.is_none_or(|a| a[g as usize % 3].binary_search(&key).is_ok())
    };
    let mut out = Vec::new();
    if let Some(set) = row.inline()? {
        for (kd, g, key, agg) in set {
            if wanted(kd, g, key) {
                out.push(set_row(kd, g, key, agg)?);
            }
        }
        return Ok(out);
    }
    for g in 0..3u8 {
        if only.is_some_and(|(_, og)| og as u8 != g) {
            continue;
        }
        // Keyed: only the chunks that hold one of the keys (keys are sorted, so are their chunks).
        let mut chunks: Vec<u64> = match at {
            Some(a) => a[g as usize].iter().map(|k| chunk_of(g, *k)).collect(),
            None => row.3.chunks(g, cut).collect(),
        };
        chunks.dedup();
        for chunk in chunks {
            let Some(v) = pages::get(buckets, &node_chunk_prefix(t, g, chunk, h, n))? else {
                continue;
            };
            for (kd, g, key, agg) in packed::decode(&v)? {
                if wanted(kd, g, key) {
                    out.push(set_row(kd, g, key, agg)?);
                }
            }
        }
    }
    out.sort_by_key(|b| (b.kind, b.granularity as u8, b.key));
    Ok(out)
}

fn set_row(kd: u8, g: u8, key: u64, agg: Agg) -> Result<BucketRow, StoreError> {
    Ok(BucketRow {
        kind: kind(kd)?,
        granularity: granularity(g)?,
        key,
        agg: Some(agg),
    })
}

fn node_value(
    parent: &Option<String>,
    header: &NodeHeader,
    set: Option<&[SetBucket]>,
    spans: &Spans,
) -> Result<Vec<u8>, StoreError> {
    let set = set.map(packed::encode);
    let set = set.as_ref().map(|(b, _)| serde_bytes::Bytes::new(b));
    rmp_serde::to_vec(&NodeValue(parent, header, set, spans)).map_err(io)
}

fn add_count(
    counts: &mut redb::Table<(&str, &str), u64>,
    t: &str,
    h: &str,
    d: i64,
) -> Result<(), StoreError> {
    let now = counts
        .get((t, h))
        .map_err(io)?
        .map(|v| v.value())
        .unwrap_or(0);
    let next = now
        .checked_add_signed(d)
        .ok_or_else(|| StoreError::Corrupt(format!("node count of {t}/{h} below zero")))?;
    if next == 0 {
        counts.remove((t, h)).map_err(io)?;
    } else {
        counts.insert((t, h), next).map_err(io)?;
    }
    Ok(())
}

fn kind(k: u8) -> Result<BucketKind, StoreError> {
    match k {
        0 => Ok(BucketKind::Subtree),
        1 => Ok(BucketKind::Own),
        _ => Err(StoreError::Corrupt(format!("bucket kind {k}"))),
    }
}

fn granularity(g: u8) -> Result<Granularity, StoreError> {
    Granularity::ALL
        .get(g as usize)
        .copied()
        .ok_or_else(|| StoreError::Corrupt(format!("granularity {g}")))
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn meta(&self) -> Result<Option<CheckpointMeta>, StoreError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(io)?;
            let t = tx.open_table(META).map_err(io)?;
            match t.get("checkpoint").map_err(io)? {
                Some(v) => Ok(Some(rmp_serde::from_slice(v.value()).map_err(corrupt)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(io)?;
            let t = tx.open_table(TENANTS).map_err(io)?;
            let mut out = Vec::new();
            for e in t.iter().map_err(io)? {
                let (k, _) = e.map_err(io)?;
                out.push(k.value().to_string());
            }
            Ok(out)
        })
        .await
    }

    async fn load_tenant(&self, tenant: &str, load: Load) -> Result<TenantImage, StoreError> {
        let tenant = tenant.to_string();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(io)?;
            let mut image = TenantImage::default();
            let tenants = tx.open_table(TENANTS).map_err(io)?;
            if let Some(v) = tenants.get(tenant.as_str()).map_err(io)? {
                image.row = Some(rmp_serde::from_slice::<TenantRow>(v.value()).map_err(corrupt)?);
            }
            let cut = stored_cut(&tx.open_table(RETENTION).map_err(io)?, &tenant)?;
            let nodes = tx.open_table(NODE_PAGES).map_err(io)?;
            let prefix = KeyBuf::new().str(&tenant).0;
            pages::scan_prefix(&nodes, &prefix, |k, v| {
                let mut key = KeyReader::new(&k[prefix.len()..]);
                let (hierarchy, node) = (key.str()?, key.str()?);
                let (p, buckets) = match load {
                    // A restore costs the nodes' totals, not their history.
                    Load::Headers => (row_prefix::<NodeHeader>(v)?, Vec::new()),
                    // Keys name one node's buckets: a tenant load reads them all.
                    Load::Buckets | Load::BucketsAt(_) => {
                        let row = StoredNode::decode(v)?;
                        let mut buckets = Vec::new();
                        for (kd, g, key, agg) in row.inline()?.unwrap_or_default() {
                            if key >= cut[g as usize % 3] {
                                buckets.push(set_row(kd, g, key, agg)?);
                            }
                        }
                        let p = RowPrefix {
                            parent: row.0,
                            header: row.1,
                        };
                        (p, buckets)
                    }
                };
                image.nodes.push(NodeRow {
                    replace: Default::default(),
                    hierarchy,
                    node,
                    parent: p.parent,
                    header: p.header,
                    buckets: buckets.into(),
                    write: BucketWrite::Replace,
                });
                Ok(())
            })?;
            if load == Load::Headers {
                load_dedup(&tx, &tenant, &mut image)?;
                return Ok(image);
            }
            // One pass over the tenant's chunks, each bucket handed to its (spilled) node.
            let at: HashMap<(String, String), usize> = image
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| ((n.hierarchy.clone(), n.node.clone()), i))
                .collect();
            let buckets = tx.open_table(BUCKET_CHUNKS).map_err(io)?;
            pages::scan_prefix(&buckets, &prefix, |k, v| {
                let (g, h, n) = parse_set_key(&k[prefix.len()..])?;
                let node = (h, n);
                let Some(&i) = at.get(&node) else {
                    let (h, n) = node;
                    return Err(StoreError::Corrupt(format!(
                        "bucket set of unknown node {tenant}/{h}/{n}"
                    )));
                };
                for (kd, _, key, agg) in packed::decode(v)? {
                    if key >= cut[g as usize % 3] {
                        Arc::make_mut(&mut image.nodes[i].buckets).push(set_row(kd, g, key, agg)?);
                    }
                }
                Ok(())
            })?;
            for n in &mut image.nodes {
                Arc::make_mut(&mut n.buckets).sort_by_key(|b| (b.kind, b.granularity as u8, b.key));
            }
            load_dedup(&tx, &tenant, &mut image)?;
            Ok(image)
        })
        .await
    }

    async fn load_node(
        &self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
        load: Load,
    ) -> Result<AsOf<Option<NodeRow>>, StoreError> {
        let (t, h, n) = (tenant.to_string(), hierarchy.to_string(), node.to_string());
        self.read(move |tx| {
            let nodes = tx.open_table(NODE_PAGES).map_err(io)?;
            let Some(v) = pages::get(&nodes, &node_key(&t, &h, &n))? else {
                return Ok(None);
            };
            if load == Load::Headers {
                let p = row_prefix::<NodeHeader>(&v)?;
                return Ok(Some(NodeRow {
                    replace: Default::default(),
                    hierarchy: h,
                    node: n,
                    parent: p.parent,
                    header: p.header,
                    buckets: Default::default(),
                    write: BucketWrite::Replace,
                }));
            }
            let row = StoredNode::decode(&v)?;
            let cut = stored_cut(&tx.open_table(RETENTION).map_err(io)?, &t)?;
            let table = tx.open_table(BUCKET_CHUNKS).map_err(io)?;
            let at = match &load {
                Load::BucketsAt(k) => Some(&**k),
                _ => None,
            };
            let buckets = node_buckets(&table, (&t, &h, &n), &row, &cut, None, at)?;
            let StoredNode(parent, header, ..) = row;
            Ok(Some(NodeRow {
                replace: Default::default(),
                hierarchy: h,
                node: n,
                parent,
                header,
                buckets: buckets.into(),
                write: BucketWrite::Replace,
            }))
        })
        .await
    }

    async fn commit(&self, cp: Arc<Checkpoint>) -> Result<Written, StoreError> {
        self.blocking(move |db| commit(db, &cp)).await
    }
}

fn load_dedup(
    tx: &redb::ReadTransaction,
    tenant: &str,
    image: &mut TenantImage,
) -> Result<(), StoreError> {
    let dedup = tx.open_table(DEDUP).map_err(io)?;
    for e in dedup.range((tenant, 0u64)..).map_err(io)? {
        let (k, v) = e.map_err(io)?;
        let (t, seq) = k.value();
        if t != tenant {
            break;
        }
        image.dedup.push(DedupBatch {
            seq,
            ids: rmp_serde::from_slice(v.value()).map_err(corrupt)?,
        });
    }
    Ok(())
}

fn as_of(tx: &redb::ReadTransaction) -> Result<u64, StoreError> {
    let t = tx.open_table(META).map_err(io)?;
    match t.get("checkpoint").map_err(io)? {
        Some(v) => Ok(rmp_serde::from_slice::<CheckpointMeta>(v.value())
            .map_err(corrupt)?
            .seq),
        None => Ok(0),
    }
}

fn tenant_row(tx: &redb::ReadTransaction, tenant: &str) -> Result<Option<TenantRow>, StoreError> {
    let t = tx.open_table(TENANTS).map_err(io)?;
    let row = t.get(tenant).map_err(io)?;
    row.map(|v| rmp_serde::from_slice::<TenantRow>(v.value()).map_err(corrupt))
        .transpose()
}

type PageTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

fn stored_header(
    nodes: &PageTable,
    (t, h, n): (&str, &str, &str),
) -> Result<Option<RowPrefix<NodeHeader>>, StoreError> {
    let v = pages::get(nodes, &node_key(t, h, n))?;
    v.map(|v| row_prefix(&v)).transpose()
}

fn child_ids(
    tx: &redb::ReadTransaction,
    t: &str,
    h: &str,
    parent: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    let children = tx.open_table(CHILD_PAGES).map_err(io)?;
    let prefix = children_prefix(t, h, parent);
    let mut out = Vec::new();
    pages::scan_prefix(&children, &prefix, |k, _| {
        out.push(KeyReader::new(&k[prefix.len()..]).str()?);
        Ok(())
    })?;
    Ok(out)
}

impl EmbeddedStore {
    /// Runs one read in one redb read transaction: a snapshot of one committed checkpoint.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<AsOf<T>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(io)?;
            Ok(AsOf {
                as_of: as_of(&tx)?,
                value: f(&tx)?,
            })
        })
        .await
    }
}

#[async_trait]
impl StoreRead for EmbeddedStore {
    async fn tenant_ids(&self) -> Result<AsOf<Vec<String>>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(TENANTS).map_err(io)?;
            let mut out = Vec::new();
            for e in t.iter().map_err(io)? {
                out.push(e.map_err(io)?.0.value().to_string());
            }
            Ok(out)
        })
        .await
    }

    async fn hierarchies(
        &self,
        tenant: &str,
    ) -> Result<AsOf<Option<Vec<HierarchyInfo>>>, StoreError> {
        let tenant = tenant.to_string();
        self.read(move |tx| {
            let Some(row) = tenant_row(tx, &tenant)? else {
                return Ok(None);
            };
            let counts = tx.open_table(COUNTS).map_err(io)?;
            let mut out = Vec::new();
            for (h, mode) in row.hierarchies {
                let nodes = counts
                    .get((tenant.as_str(), h.as_str()))
                    .map_err(io)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                out.push(HierarchyInfo {
                    hierarchy: h,
                    mode,
                    nodes,
                });
            }
            out.sort_by(|a, b| a.hierarchy.cmp(&b.hierarchy));
            Ok(Some(out))
        })
        .await
    }

    async fn node(
        &self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
    ) -> Result<AsOf<Option<NodeView>>, StoreError> {
        let (t, h, n) = (tenant.to_string(), hierarchy.to_string(), node.to_string());
        self.read(move |tx| {
            let nodes = tx.open_table(NODE_PAGES).map_err(io)?;
            let Some(RowPrefix { parent, header, .. }) = stored_header(&nodes, (&t, &h, &n))?
            else {
                return Ok(None);
            };
            Ok(Some(NodeView {
                parent,
                header,
                children: child_ids(tx, &t, &h, Some(&n))?,
            }))
        })
        .await
    }

    async fn children(
        &self,
        tenant: &str,
        hierarchy: &str,
        parent: Option<&str>,
    ) -> Result<AsOf<Option<Vec<(String, Agg)>>>, StoreError> {
        let (t, h) = (tenant.to_string(), hierarchy.to_string());
        let p = parent.map(str::to_string);
        self.read(move |tx| {
            let nodes = tx.open_table(NODE_PAGES).map_err(io)?;
            match &p {
                Some(p) => {
                    if pages::get(&nodes, &node_key(&t, &h, p))?.is_none() {
                        return Ok(None);
                    }
                }
                None => {
                    let known = tenant_row(tx, &t)?
                        .is_some_and(|r| r.hierarchies.iter().any(|(x, _)| *x == h));
                    if !known {
                        return Ok(None);
                    }
                }
            }
            let mut out = Vec::new();
            for c in child_ids(tx, &t, &h, p.as_deref())? {
                let Some(RowPrefix { header, .. }) = stored_header(&nodes, (&t, &h, &c))? else {
                    return Err(StoreError::Corrupt(format!(
                        "children index names missing node {t}/{h}/{c}"
                    )));
                };
                out.push((c, header.subtree));
            }
            Ok(Some(out))
        })
        .await
    }

    async fn series(
        &self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
        granularity: Granularity,
    ) -> Result<AsOf<Option<Vec<(u64, Agg)>>>, StoreError> {
        let (t, h, n) = (tenant.to_string(), hierarchy.to_string(), node.to_string());
        self.read(move |tx| {
            let nodes = tx.open_table(NODE_PAGES).map_err(io)?;
            let Some(v) = pages::get(&nodes, &node_key(&t, &h, &n))? else {
                return Ok(None);
            };
            let row = StoredNode::decode(&v)?;
            let cut = stored_cut(&tx.open_table(RETENTION).map_err(io)?, &t)?;
            let table = tx.open_table(BUCKET_CHUNKS).map_err(io)?;
            let only = Some((BucketKind::Subtree, granularity));
            let out = node_buckets(&table, (&t, &h, &n), &row, &cut, only, None)?
                .into_iter()
                .map(|b| (b.key, b.agg.expect("stored bucket")))
                .collect();
            Ok(Some(out))
        })
        .await
    }

    async fn entity(
        &self,
        tenant: &str,
        entity: &str,
    ) -> Result<AsOf<Option<EntityView>>, StoreError> {
        let (t, e) = (tenant.to_string(), entity.to_string());
        self.read(move |tx| {
            let Some(row) = tenant_row(tx, &t)? else {
                return Ok(None);
            };
            let nodes = tx.open_table(NODE_PAGES).map_err(io)?;
            let mut hierarchies = Vec::new();
            for (h, _) in &row.hierarchies {
                if let Some(v) = pages::get(&nodes, &node_key(&t, h, &e))? {
                    hierarchies.push((h.clone(), row_prefix::<Skip>(&v)?.parent));
                }
            }
            hierarchies.sort();
            let suspended = row.suspended.iter().any(|s| *s == e);
            if hierarchies.is_empty() && !suspended {
                return Ok(None);
            }
            Ok(Some(EntityView {
                suspended,
                hierarchies,
            }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_actors::agg::Agg;
    use canopy_actors::store::TenantChanges;

    fn agg(n: u64) -> Agg {
        Agg {
            events: n,
            metrics: Default::default(),
        }
    }

    fn node(name: &str, keys: &[u64]) -> NodeRow {
        NodeRow {
            replace: Default::default(),
            hierarchy: "h".into(),
            node: name.into(),
            parent: None,
            header: NodeHeader::default(),
            buckets: keys
                .iter()
                .map(|k| BucketRow {
                    kind: BucketKind::Subtree,
                    granularity: Granularity::Minute,
                    key: *k,
                    agg: Some(agg(*k)),
                })
                .collect::<Vec<_>>()
                .into(),
            write: BucketWrite::Replace,
        }
    }

    fn cp(seq: u64, changes: TenantChanges) -> Arc<Checkpoint> {
        Arc::new(Checkpoint {
            seq,
            source: vec![],
            tenants: vec![changes],
        })
    }

    #[tokio::test]
    async fn deleting_a_node_deletes_its_bucket_rows() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let put = TenantChanges {
            tenant: "t".into(),
            put_nodes: vec![node("a", &[1, 2, 3]), node("ab", &[4])],
            ..Default::default()
        };
        s.commit(cp(1, put)).await.unwrap();
        let img = s.load_tenant("t", Load::Buckets).await.unwrap();
        assert_eq!(
            img.nodes
                .iter()
                .map(|n| n.buckets.len())
                .collect::<Vec<_>>(),
            [3, 1]
        );
        let del = TenantChanges {
            tenant: "t".into(),
            delete_nodes: vec![("h".into(), "a".into())],
            ..Default::default()
        };
        s.commit(cp(2, del)).await.unwrap();
        let img = s.load_tenant("t", Load::Buckets).await.unwrap();
        assert_eq!(img.nodes.len(), 1);
        assert_eq!(img.nodes[0].node, "ab");
        assert_eq!(img.nodes[0].buckets.len(), 1, "only ab's bucket is left");
        // Re-created in the same checkpoint as its deletion: only the new rows remain.
        let again = TenantChanges {
            tenant: "t".into(),
            delete_nodes: vec![("h".into(), "ab".into())],
            put_nodes: vec![node("ab", &[9])],
            ..Default::default()
        };
        s.commit(cp(3, again)).await.unwrap();
        let img = s.load_tenant("t", Load::Buckets).await.unwrap();
        assert_eq!(
            img.nodes[0]
                .buckets
                .iter()
                .map(|b| b.key)
                .collect::<Vec<_>>(),
            [9]
        );
    }

    /// A checkpoint that only puts `rows`.
    fn put(seq: u64, rows: Vec<NodeRow>) -> Arc<Checkpoint> {
        cp(
            seq,
            TenantChanges {
                tenant: "t".into(),
                put_nodes: rows,
                ..Default::default()
            },
        )
    }

    /// Every bucket entry stored, visible or not.
    fn stored_entries(s: &EmbeddedStore) -> usize {
        let tx = s.db.begin_read().unwrap();
        let t = tx.open_table(BUCKET_CHUNKS).unwrap();
        let mut n = 0;
        for e in t.iter().unwrap() {
            for (_, set) in pages::entries(e.unwrap().1.value()).unwrap() {
                n += packed::decode(set).unwrap().len();
            }
        }
        n
    }

    /// The key of the minute bucket that starts `m` minutes after the epoch (UTC).
    fn minute(m: u64) -> u64 {
        canopy_actors::time::BucketKey::new(m as i64 * 60, 0).0
    }

    async fn keys_of(s: &EmbeddedStore, name: &str) -> Vec<u64> {
        let img = s.load_tenant("t", Load::Buckets).await.unwrap();
        let n = img.nodes.iter().find(|n| n.node == name).unwrap();
        let loaded: Vec<u64> = n.buckets.iter().map(|b| b.key).collect();
        let read = s
            .series("t", "h", name, Granularity::Minute)
            .await
            .unwrap()
            .value
            .unwrap();
        assert_eq!(
            read.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            loaded,
            "series read and load agree"
        );
        let one = s
            .load_node("t", "h", name, Load::Buckets)
            .await
            .unwrap()
            .value
            .unwrap();
        assert_eq!(one.buckets, n.buckets, "node load and tenant load agree");
        for (k, a) in read {
            assert_eq!(a, agg(k));
        }
        loaded
    }

    #[tokio::test]
    async fn buckets_of_many_chunks_read_back_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        // Five hours of minutes (more than an inline set holds), written out of order, beside
        // a neighbour with the same keys.
        let mut keys: Vec<u64> = (0..300).rev().step_by(3).map(minute).collect();
        assert!(keys.len() > INLINE_MAX);
        keys.rotate_left(11);
        s.commit(put(1, vec![node("a", &keys), node("b", &keys)]))
            .await
            .unwrap();
        let mut want = keys.clone();
        want.sort();
        assert_eq!(keys_of(&s, "a").await, want);
        assert_eq!(keys_of(&s, "b").await, want);

        // A change, a new chunk far ahead and a deletion.
        let mut change = node("a", &[keys[3], minute(10_000)]);
        Arc::make_mut(&mut change.buckets).push(BucketRow {
            kind: BucketKind::Subtree,
            granularity: Granularity::Minute,
            key: want[0],
            agg: None,
        });
        Arc::make_mut(&mut change.buckets).sort_by_key(|b| b.key);
        s.commit(put(2, vec![change])).await.unwrap();
        let mut now: Vec<u64> = want[1..].to_vec();
        now.push(minute(10_000));
        assert_eq!(keys_of(&s, "a").await, now);
        assert_eq!(keys_of(&s, "b").await, want, "the neighbour is untouched");

        // Deleted and created again in one checkpoint: only the new buckets remain.
        let again = TenantChanges {
            tenant: "t".into(),
            delete_nodes: vec![("h".into(), "a".into())],
            put_nodes: vec![node("a", &[minute(42)])],
            ..Default::default()
        };
        s.commit(cp(3, again)).await.unwrap();
        assert_eq!(keys_of(&s, "a").await, [minute(42)]);
        assert_eq!(
            stored_entries(&s),
            want.len(),
            "a's old sets went with it; the new a is inline"
        );
    }

    /// The property the layout exists for: what a checkpoint writes follows the buckets it
    /// touches, not the history the nodes have.
    #[tokio::test]
    async fn a_checkpoint_rewrites_the_chunks_it_touches_not_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let names: Vec<String> = (0..40).map(|i| format!("node-{i:03}")).collect();
        let mut written = Vec::new();
        for h in 0..120u64 {
            // Every node gets a bucket of a new hour: each checkpoint touches every node.
            let rows = names
                .iter()
                .map(|n| node(n, &[minute(h * 60 + 5)]))
                .collect();
            written.push(s.commit(put(h + 1, rows)).await.unwrap());
        }
        assert_eq!(
            stored_entries(&s),
            40 * 120,
            "every node spilled; the history is all there"
        );
        // Inline (up to INLINE_MAX buckets) a node rewrites its whole set, a bounded amount;
        // spilled, a checkpoint writes the chunk it touches.
        let (early, late) = (written[INLINE_MAX + 5], written[119]);
        assert!(
            late.rows <= early.rows + 1,
            "rows written per checkpoint grew with history: {early:?} early, {late:?} at the end ({written:?})"
        );
        assert!(
            late.bytes <= 2 * early.bytes,
            "bytes written per checkpoint grew with history: {early:?} early, {late:?} at the end"
        );
    }

    #[tokio::test]
    async fn retention_drops_whole_chunks_and_hides_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        // Minutes 0..300 every 2 minutes: five hour chunks, spilled; b small, inline.
        let keys: Vec<u64> = (0..300).step_by(2).map(minute).collect();
        s.commit(put(1, vec![node("a", &keys), node("b", &keys[..3])]))
            .await
            .unwrap();
        assert_eq!(stored_entries(&s), keys.len());
        let retain = |seq, from: u64| {
            cp(
                seq,
                TenantChanges {
                    tenant: "t".into(),
                    retain_from: [minute(from), 0, 0],
                    ..Default::default()
                },
            )
        };
        let from = |m: u64| keys.iter().filter(|k| **k >= minute(m)).count();
        // Minute 150 is inside the third chunk: the first two go, and what is below 150 in the
        // third is no longer returned, for every node, written or not.
        s.commit(retain(2, 150)).await.unwrap();
        let visible: Vec<u64> = keys.iter().copied().filter(|k| *k >= minute(150)).collect();
        assert_eq!(keys_of(&s, "a").await, visible);
        assert_eq!(keys_of(&s, "b").await, Vec::<u64>::new());
        assert_eq!(stored_entries(&s), from(120), "chunks 0 and 1 are gone");
        // A late delta below the cutoff is not written.
        s.commit(put(3, vec![node("a", &[minute(100), minute(290)])]))
            .await
            .unwrap();
        assert_eq!(keys_of(&s, "a").await, visible);
        // The cutoff moves past the third chunk: it goes too.
        s.commit(retain(4, 180)).await.unwrap();
        assert_eq!(stored_entries(&s), from(180));
        // A cutoff never moves back.
        s.commit(retain(5, 0)).await.unwrap();
        assert_eq!(keys_of(&s, "a").await, from_keys(&visible, minute(180)));
    }

    /// `copy_own` on a spilled node: its own buckets become its stored subtree buckets, then
    /// the own deltas fold onto them, chunk by chunk.
    #[tokio::test]
    async fn a_spilled_node_copies_subtree_to_own_then_folds() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let keys: Vec<u64> = (0..200).step_by(2).map(minute).collect();
        assert!(keys.len() > INLINE_MAX);
        s.commit(put(1, vec![node("p", &keys)])).await.unwrap();
        let row = |kind, key, n| BucketRow {
            kind,
            granularity: Granularity::Minute,
            key,
            agg: Some(agg(n)),
        };
        let mut grow = node("p", &[]);
        grow.write = BucketWrite::Fold { copy_own: true };
        grow.buckets = vec![
            row(BucketKind::Subtree, keys[5], 1),
            row(BucketKind::Own, keys[5], 1),
            row(BucketKind::Own, minute(1_000), 7),
        ]
        .into();
        s.commit(put(2, vec![grow])).await.unwrap();
        let got = s
            .load_node("t", "h", "p", Load::Buckets)
            .await
            .unwrap()
            .value
            .unwrap()
            .buckets;
        let events = |kind| -> Vec<(u64, u64)> {
            got.iter()
                .filter(|b| b.kind == kind)
                .map(|b| (b.key, b.agg.as_ref().unwrap().events))
                .collect()
        };
        let mut want: Vec<(u64, u64)> = keys.iter().map(|k| (*k, *k)).collect();
        want[5].1 += 1;
        assert_eq!(events(BucketKind::Subtree), want);
        want.push((minute(1_000), 7));
        assert_eq!(
            events(BucketKind::Own),
            want,
            "own = the stored subtree + own deltas"
        );
    }

    fn from_keys(keys: &[u64], from: u64) -> Vec<u64> {
        keys.iter().copied().filter(|k| *k >= from).collect()
    }

    #[tokio::test]
    async fn a_store_of_another_format_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.commit(cp(1, TenantChanges::default())).await.unwrap();
        drop(s);
        assert!(
            EmbeddedStore::open(dir.path()).is_ok(),
            "own format reopens"
        );
        // A format-1 store: checkpoints, no marker.
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META).unwrap().remove("format").unwrap();
            tx.commit().unwrap();
        }
        let err = EmbeddedStore::open(dir.path())
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("store format 1") && err.contains("new data directory"),
            "{err}"
        );
        // A format-2 store: inline sets as MessagePack arrays.
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("format", "2".as_bytes())
                .unwrap();
            tx.commit().unwrap();
        }
        let err = EmbeddedStore::open(dir.path())
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("store format 2"), "{err}");
    }

    #[test]
    fn a_node_row_reads_back_whole_and_by_prefix() {
        use canopy_actors::agg::Stat;
        let agg = |v: i64| Agg {
            events: 1,
            metrics: [("amount".into(), Stat::of(v))].into_iter().collect(),
        };
        let header = NodeHeader {
            own: agg(3),
            subtree: agg(-7),
            own_buckets: true,
        };
        let mut wide = Spans::default();
        wide.add(0, u64::MAX);
        wide.add(0, 0);
        wide.add(2, 1 << 40);
        let set = vec![(0u8, 0u8, minute(1), agg(1)), (1, 2, minute(1440), agg(2))];
        for (parent, inline, spans) in [
            (None, Some(vec![]), Spans::default()),
            (Some("p".to_string()), Some(set), Spans::default()),
            (Some("q".to_string()), None, wide),
        ] {
            let v = node_value(&parent, &header, inline.as_deref(), &spans).unwrap();
            let p = row_prefix::<NodeHeader>(&v).unwrap();
            assert_eq!(p.parent, parent);
            assert_eq!(p.header, header);
            let skipped = row_prefix::<Skip>(&v).unwrap();
            assert_eq!(skipped.parent, parent);
            let whole = StoredNode::decode(&v).unwrap();
            assert_eq!(whole.inline().unwrap(), inline);
            assert_eq!((whole.0, whole.1, whole.3), (parent, header.clone(), spans));
        }
        // Not a node row: a clear error, not a guess.
        for bad in [
            rmp_serde::to_vec(&("p", 1)).unwrap(),
            node_value(&Some("p".into()), &header, None, &wide).unwrap()[..6].to_vec(),
        ] {
            assert!(matches!(
                row_prefix::<NodeHeader>(&bad),
                Err(StoreError::Corrupt(_))
            ));
        }
        let odd = rmp_serde::to_vec(&(Some("p"), &header, 5u8, 6u8)).unwrap();
        assert!(matches!(
            StoredNode::decode(&odd),
            Err(StoreError::Corrupt(_))
        ));
    }

    /// A long run's commit holds millions of changes: an `Agg` (or a key) inside each would
    /// multiply the commit's memory.
    #[test]
    fn a_bucket_change_stays_small() {
        let size = std::mem::size_of::<BucketChange>();
        assert!(size <= 56, "{size} bytes");
    }

    #[test]
    fn spans_clamp_to_retention_and_list_chunks_above_the_cutoff() {
        let mut s = Spans::default();
        assert!(s.chunks(0, &[0; 3]).is_empty());
        s.add(0, 3);
        s.add(0, 9);
        s.add(1, 4);
        let cut = [minute(5 * 60), 0, 0];
        assert_eq!(s.chunks(0, &cut), 5..=9);
        assert_eq!(s.chunks(1, &cut), 4..=4);
        s.clamp(&cut);
        assert_eq!(s.0[0], Some((5, 9)));
        s.clamp(&[minute(10 * 60), 0, 0]);
        assert_eq!(s.0[0], None, "every chunk of the span is below the cutoff");
        assert_eq!(s.0[1], Some((4, 4)));
    }
}
