//! The embedded store: a redb database file in the data directory (the default backend).
//!
//! Layout (all values MessagePack). `node_pages`, `bucket_pages` and `child_pages` are sorted
//! maps kept many entries to a table row ([`super::pages`]): a checkpoint writes one row per
//! page it changes, not one per node, which is what keeps store writes per event low.
//! - `meta`: `"checkpoint"` → the last checkpoint's sequence number and source position
//! - `tenants`: tenant → [`TenantRow`]
//! - `node_pages`: (tenant, hierarchy, node) → (parent, totals: own and subtree, and the node's
//!   buckets inline while it has at most [`INLINE_MAX`] of them)
//! - `bucket_pages`: (tenant, hierarchy, node, kind, granularity, key) → one bucket's aggregate,
//!   for nodes whose buckets outgrew the inline set ("spilled"): a checkpoint then writes only
//!   the pages of the buckets that changed, so a busy root does not rewrite its history.
//! - `dedup`: (tenant, checkpoint seq) → the event ids accepted in that checkpoint interval
//! - `child_pages`: (tenant, hierarchy, parent or None for roots, child) → (): the query API's
//!   children and roots reads, kept in step with `node_pages` inside the same transaction
//! - `node_counts`: (tenant, hierarchy) → number of nodes
//!
//! One checkpoint is one redb write transaction, so a reader sees all of it or none of it.
//!
//! A checkpoint's buckets mostly come as deltas ([`BucketWrite::Fold`]): each is merged into the
//! stored bucket inside the commit's transaction (the inline set is decoded, folded and
//! re-encoded; a spilled bucket's entry is read, merged and rewritten), and buckets of written
//! nodes that fell out of retention ([`TenantChanges::retain_from`]) are dropped in the same
//! transaction (a range of the inline set; a key range of the spilled rows). A commit whose seq
//! is already stored changes nothing, so a retried commit never folds twice.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use canopy_actors::agg::Agg;
use canopy_actors::agg::Granularity;
use canopy_actors::packed::{self, SetBucket};
use canopy_actors::store::{
    AsOf, BucketKind, BucketRow, BucketWrite, Checkpoint, CheckpointMeta, DedupBatch, EntityView,
    HierarchyInfo, Load, NodeHeader, NodeRow, NodeView, Store, StoreError, StoreRead,
    TenantChanges, TenantImage,
};
use canopy_actors::tenant::TenantRow;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::pages::{self, KeyBuf, KeyReader};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
/// Node rows, many to a table row: key [`node_key`] → the node row (see [`pages`]).
const NODE_PAGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("node_pages");
const DEDUP: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dedup");
/// Spilled buckets, many to a table row: key [`bucket_key`] → one bucket's `Agg`.
const BUCKET_PAGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("bucket_pages");
/// The children index, many entries to a table row: key [`child_key`] → nothing.
const CHILD_PAGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("child_pages");
const COUNTS: TableDefinition<(&str, &str), u64> = TableDefinition::new("node_counts");

pub const FILE_NAME: &str = "canopy.redb";

/// The layout version, kept in `meta["format"]`: a data directory of another layout is refused
/// with a clear error at open instead of failing to decode rows later. Format 1 (no marker)
/// kept every bucket in its own row; format 2 kept inline sets as MessagePack arrays, over
/// twice the bytes of the compact encoding ([`canopy_actors::packed`]).
/// Format 3 kept one table row per node and per `children` index entry.
const FORMAT: &str = "4";

fn node_key(t: &str, h: &str, n: &str) -> Vec<u8> {
    KeyBuf::new().str(t).str(h).str(n).0
}

/// A spilled bucket's key: the node's key, then kind, granularity and the big-endian key, so
/// that a node's buckets, and those of one kind and granularity, are contiguous and in key order.
fn bucket_key(t: &str, h: &str, n: &str, kind: u8, g: u8, key: u64) -> Vec<u8> {
    let mut k = node_key(t, h, n);
    k.extend_from_slice(&[kind, g]);
    k.extend_from_slice(&key.to_be_bytes());
    k
}

/// The `(kind, granularity, key)` that follows the node's key in a bucket key.
fn bucket_suffix(rest: &[u8]) -> Result<(u8, u8, u64), StoreError> {
    match rest {
        [kd, g, key @ ..] if key.len() == 8 => Ok((
            *kd,
            *g,
            u64::from_be_bytes(key.try_into().expect("8 bytes")),
        )),
        _ => Err(StoreError::Corrupt(
            "a bucket key of the wrong length".into(),
        )),
    }
}

/// A spilled bucket as a row.
fn spilled_row(rest: &[u8], v: &[u8]) -> Result<BucketRow, StoreError> {
    let (kd, g, key) = bucket_suffix(rest)?;
    Ok(BucketRow {
        kind: kind(kd)?,
        granularity: granularity(g)?,
        key,
        agg: Some(rmp_serde::from_slice(v).map_err(corrupt)?),
    })
}

/// A spilled node's buckets, in key order.
fn spilled_rows<T: ReadableTable<&'static [u8], &'static [u8]>>(
    buckets: &T,
    t: &str,
    h: &str,
    n: &str,
) -> Result<Vec<BucketRow>, StoreError> {
    let prefix = node_key(t, h, n);
    let mut out = Vec::new();
    pages::scan_prefix(buckets, &prefix, |k, v| {
        out.push(spilled_row(&k[prefix.len()..], v)?);
        Ok(())
    })?;
    Ok(out)
}

fn children_prefix(t: &str, h: &str, parent: Option<&str>) -> Vec<u8> {
    KeyBuf::new().str(t).str(h).opt(parent).0
}

fn child_key(t: &str, h: &str, parent: Option<&str>, child: &str) -> Vec<u8> {
    KeyBuf::new().str(t).str(h).opt(parent).str(child).0
}

/// A node keeps its buckets inside its own row while it has at most this many (all kinds and
/// granularities together). Past it they move to `buckets` rows for good: rewriting a row of
/// this size costs about as much as a few separate bucket rows, and a long-lived busy node
/// (thousands of minute buckets) must not rewrite its whole history every checkpoint.
pub const INLINE_MAX: usize = 192;

/// One inline bucket: (kind, granularity, key) sorts like the `buckets` table's key.
type InlineBucket = SetBucket;

/// A node row's value: `(parent, header, inline buckets or None when spilled)`, the inline set
/// as a MessagePack `bin` holding its compact encoding ([`canopy_actors::packed`]).
#[derive(serde::Serialize)]
struct NodeValue<'a>(
    &'a Option<String>,
    &'a NodeHeader,
    Option<&'a serde_bytes::Bytes>,
);

#[derive(serde::Deserialize)]
struct StoredNode(Option<String>, NodeHeader, Option<serde_bytes::ByteBuf>);

impl StoredNode {
    fn decode(v: &[u8]) -> Result<Self, StoreError> {
        rmp_serde::from_slice(v).map_err(corrupt)
    }

    /// The inline set, decoded (`None`: the buckets are spilled to rows).
    fn inline(&self) -> Result<Option<Vec<InlineBucket>>, StoreError> {
        self.2.as_ref().map(|b| packed::decode(b)).transpose()
    }
}

/// What most uses of a node row need: its parent and its header (decoded, or skipped with
/// `IgnoredAny`), checking that a set or nil follows. The inline set, ~1 KB on the benchmark, is
/// not walked: a row is `[parent, header, set or nil]`, so the set's first byte says which.
/// (Decoding the set as `IgnoredAny` walked every bucket: ~2% of an ingest's CPU.)
struct RowPrefix<H> {
    parent: Option<String>,
    header: H,
}

fn row_prefix<H: serde::de::DeserializeOwned>(mut v: &[u8]) -> Result<RowPrefix<H>, StoreError> {
    use serde::Deserialize;
    let fields = rmp::decode::read_array_len(&mut v).map_err(corrupt)?;
    if fields != 3 {
        return Err(StoreError::Corrupt(format!(
            "a node row has {fields} fields instead of 3"
        )));
    }
    let mut de = rmp_serde::Deserializer::new(&mut v);
    let parent = Option::<String>::deserialize(&mut de).map_err(corrupt)?;
    let header = H::deserialize(&mut de).map_err(corrupt)?;
    drop(de);
    match v.first() {
        Some(0xc0 | 0xc4..=0xc6) => {}
        other => {
            return Err(StoreError::Corrupt(format!(
                "a node row's bucket set starts with {other:?}, neither bytes nor nil"
            )))
        }
    };
    Ok(RowPrefix { parent, header })
}

type Skip = serde::de::IgnoredAny;

/// An inline set as bucket rows (to spill it, or to load it).
fn bucket_rows(set: Vec<InlineBucket>) -> Result<Vec<BucketRow>, StoreError> {
    set.into_iter()
        .map(|(kd, g, key, a)| {
            Ok(BucketRow {
                kind: kind(kd)?,
                granularity: granularity(g)?,
                key,
                agg: Some(a),
            })
        })
        .collect()
}

/// Applies a node's checkpoint rows (sorted by kind, granularity, key) to its inline set, as
/// `write` says: values that replace, or deltas that fold (after the copy of `subtree` to `own`).
fn apply_inline(set: &mut Vec<InlineBucket>, changes: &[BucketRow], write: BucketWrite) {
    let fold = match write {
        BucketWrite::Replace => false,
        BucketWrite::Fold { copy_own } => {
            if copy_own {
                set.retain(|b| b.0 != BucketKind::Own as u8);
                let copies: Vec<InlineBucket> = set
                    .iter()
                    .filter(|b| b.0 == BucketKind::Subtree as u8)
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

/// Drops the buckets of an inline set below the retention cutoffs (0: none).
fn prune_inline(set: &mut Vec<InlineBucket>, retain_from: &[u64; 3]) {
    if retain_from.iter().any(|c| *c > 0) {
        set.retain(|(_, g, key, _)| *key >= retain_from[*g as usize % 3]);
    }
}

/// What a checkpoint does to one spilled bucket entry (several apply in order).
enum BucketOp {
    Put(Vec<u8>),
    Delete,
    Fold(Agg),
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
                         (node rows in pages, with compact inline bucket sets): ingest into a new data directory",
                        dir.join(FILE_NAME).display(),
                        other.unwrap_or("1")
                    )))
                }
            }
        }
        tx.open_table(TENANTS).map_err(io)?;
        tx.open_table(NODE_PAGES).map_err(io)?;
        tx.open_table(DEDUP).map_err(io)?;
        tx.open_table(BUCKET_PAGES).map_err(io)?;
        tx.open_table(CHILD_PAGES).map_err(io)?;
        tx.open_table(COUNTS).map_err(io)?;
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

/// Commits one checkpoint in one write transaction; returns the number of rows written
/// (inserted or deleted).
fn commit(db: &Database, cp: &Checkpoint) -> Result<u64, StoreError> {
    let tx = db.begin_write().map_err(io)?;
    let mut rows = 0u64;
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
            return Ok(0);
        }
        let mut tenants = tx.open_table(TENANTS).map_err(io)?;
        let mut nodes = tx.open_table(NODE_PAGES).map_err(io)?;
        let mut dedup = tx.open_table(DEDUP).map_err(io)?;
        let mut buckets = tx.open_table(BUCKET_PAGES).map_err(io)?;
        let mut children = tx.open_table(CHILD_PAGES).map_err(io)?;
        let mut counts = tx.open_table(COUNTS).map_err(io)?;
        for t in &cp.tenants {
            let tn = t.tenant.as_str();
            if let Some(row) = &t.row {
                rows += 1;
                tenants
                    .insert(tn, rmp_serde::to_vec(row).map_err(io)?.as_slice())
                    .map_err(io)?;
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
            rows += pages::apply(&mut nodes, &ops, |_, old, op| match op {
                NodeOp::Delete(h, n) => {
                    if let Some(old) = old {
                        let parent = row_prefix::<Skip>(old)?.parent;
                        ix.children
                            .push((child_key(tn, h, parent.as_deref(), n), false));
                        *ix.counts.entry(h).or_default() -= 1;
                    }
                    delete_bucket_rows(&buckets, &mut ix, tn, h, n)?;
                    Ok(None)
                }
                NodeOp::Put(n) => put_node(&buckets, &mut ix, t, n, old).map(Some),
            })?;
            // Stable: several changes of one key keep their order (copy, fold, prune).
            ix.buckets.sort_by(|a, b| a.0.cmp(&b.0));
            rows += pages::apply(&mut buckets, &ix.buckets, |_, old, op| match op {
                BucketOp::Put(v) => Ok(Some(v.clone())),
                BucketOp::Delete => Ok(None),
                BucketOp::Fold(d) => {
                    let mut agg = match old {
                        Some(v) => rmp_serde::from_slice::<Agg>(v).map_err(corrupt)?,
                        None => Agg::default(),
                    };
                    agg.merge(d);
                    Ok(Some(rmp_serde::to_vec(&agg).map_err(io)?))
                }
            })?;
            ix.children.sort_by(|a, b| a.0.cmp(&b.0));
            rows += pages::apply(&mut children, &ix.children, |_, _, add| {
                Ok(add.then(Vec::new))
            })?;
            for (h, d) in ix.counts {
                if d != 0 {
                    rows += 1;
                    add_count(&mut counts, tn, h, d)?;
                }
            }
            if let Some(b) = &t.dedup {
                rows += 1;
                dedup
                    .insert(
                        (tn, b.seq),
                        rmp_serde::to_vec(&b.ids).map_err(io)?.as_slice(),
                    )
                    .map_err(io)?;
            }
            rows += t.expire_dedup.len() as u64;
            for seq in &t.expire_dedup {
                dedup.remove((tn, *seq)).map_err(io)?;
            }
        }
        let mut meta = tx.open_table(META).map_err(io)?;
        let m = CheckpointMeta {
            seq: cp.seq,
            source: cp.source.clone(),
        };
        meta.insert("checkpoint", rmp_serde::to_vec(&m).map_err(io)?.as_slice())
            .map_err(io)?;
        rows += 1;
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
    /// Changes of spilled buckets, in the order they arose.
    buckets: Vec<(Vec<u8>, BucketOp)>,
}

/// The new row of a put node, given its stored row: its buckets folded (or replaced) and
/// pruned to retention, inline, or as changes of its spilled rows.
fn put_node<'a>(
    buckets: &redb::Table<&'static [u8], &'static [u8]>,
    ix: &mut IndexChanges<'a>,
    t: &TenantChanges,
    n: &'a NodeRow,
    old: Option<&[u8]>,
) -> Result<Vec<u8>, StoreError> {
    let tn = t.tenant.as_str();
    let (h, node) = (n.hierarchy.as_str(), n.node.as_str());
    let old = old.map(StoredNode::decode).transpose()?;
    let (old_parent, mut inline) = match old {
        Some(o) => {
            let inline = o.inline()?;
            (Some(o.0), inline)
        }
        None => (None, Some(Vec::new())),
    };
    place(ix, tn, n, old_parent.as_ref());
    let Some(set) = &mut inline else {
        spilled_changes(buckets, ix, t, n)?;
        return node_value(&n.parent, &n.header, None);
    };
    apply_inline(set, &n.buckets, n.write);
    prune_inline(set, &t.retain_from);
    if set.len() <= INLINE_MAX {
        return node_value(&n.parent, &n.header, inline.as_deref());
    }
    // Spill: a node that outgrows the inline set moves all its buckets to rows.
    for b in bucket_rows(std::mem::take(set))? {
        let k = bucket_key(tn, h, node, b.kind as u8, b.granularity as u8, b.key);
        let v = rmp_serde::to_vec(b.agg.as_ref().expect("stored bucket")).map_err(io)?;
        ix.buckets.push((k, BucketOp::Put(v)));
    }
    node_value(&n.parent, &n.header, None)
}

/// A spilled node's bucket changes: the copy of `subtree` to `own` (read from the rows as
/// committed), the rows as values or deltas, then the rows below retention deleted.
fn spilled_changes(
    buckets: &redb::Table<&'static [u8], &'static [u8]>,
    ix: &mut IndexChanges,
    t: &TenantChanges,
    n: &NodeRow,
) -> Result<(), StoreError> {
    let (tn, h, node) = (t.tenant.as_str(), n.hierarchy.as_str(), n.node.as_str());
    let fold = match n.write {
        BucketWrite::Replace => false,
        BucketWrite::Fold { copy_own } => {
            if copy_own {
                let own = node_key(tn, h, node);
                let mut own_prefix = own.clone();
                own_prefix.push(BucketKind::Own as u8);
                pages::scan_prefix(buckets, &own_prefix, |k, _| {
                    ix.buckets.push((k.to_vec(), BucketOp::Delete));
                    Ok(())
                })?;
                let mut sub_prefix = own;
                sub_prefix.push(BucketKind::Subtree as u8);
                let at = sub_prefix.len() - 1;
                pages::scan_prefix(buckets, &sub_prefix, |k, v| {
                    let mut copy = k.to_vec();
                    copy[at] = BucketKind::Own as u8;
                    ix.buckets.push((copy, BucketOp::Put(v.to_vec())));
                    Ok(())
                })?;
            }
            true
        }
    };
    for b in &n.buckets {
        let k = bucket_key(tn, h, node, b.kind as u8, b.granularity as u8, b.key);
        let op = match &b.agg {
            Some(a) if fold => BucketOp::Fold(a.clone()),
            Some(a) => BucketOp::Put(rmp_serde::to_vec(a).map_err(io)?),
            None => BucketOp::Delete,
        };
        ix.buckets.push((k, op));
    }
    for kind in [BucketKind::Subtree, BucketKind::Own] {
        for (g, cut) in t.retain_from.iter().enumerate() {
            if *cut == 0 {
                continue;
            }
            let from = bucket_key(tn, h, node, kind as u8, g as u8, 0);
            let to = bucket_key(tn, h, node, kind as u8, g as u8, *cut);
            pages::scan_range(buckets, &from, &to, |k, _| {
                ix.buckets.push((k.to_vec(), BucketOp::Delete));
                Ok(())
            })?;
        }
    }
    Ok(())
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

/// Deletes every spilled bucket of one node (as stored before this checkpoint).
fn delete_bucket_rows(
    buckets: &redb::Table<&'static [u8], &'static [u8]>,
    ix: &mut IndexChanges,
    t: &str,
    h: &str,
    n: &str,
) -> Result<(), StoreError> {
    let prefix = node_key(t, h, n);
    pages::scan_prefix(buckets, &prefix, |k, _| {
        ix.buckets.push((k.to_vec(), BucketOp::Delete));
        Ok(())
    })
}

/// A node row as the changed-buckets path writes it: the inline set (if any) encoded here.
fn node_value(
    parent: &Option<String>,
    header: &NodeHeader,
    set: Option<&[InlineBucket]>,
) -> Result<Vec<u8>, StoreError> {
    let set = set.map(packed::encode);
    let set = set.as_ref().map(|(b, _)| serde_bytes::Bytes::new(b));
    rmp_serde::to_vec(&NodeValue(parent, header, set)).map_err(io)
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
            let nodes = tx.open_table(NODE_PAGES).map_err(io)?;
            let prefix = KeyBuf::new().str(&tenant).0;
            pages::scan_prefix(&nodes, &prefix, |k, v| {
                let mut key = KeyReader::new(&k[prefix.len()..]);
                let (hierarchy, node) = (key.str()?, key.str()?);
                let (parent, header, buckets) = match load {
                    // The set is not even walked (`row_prefix`): a restore costs the nodes'
                    // totals, not their history.
                    Load::Headers => {
                        let p = row_prefix::<NodeHeader>(v)?;
                        (p.parent, p.header, Vec::new())
                    }
                    Load::Buckets => {
                        let row = StoredNode::decode(v)?;
                        let buckets = bucket_rows(row.inline()?.unwrap_or_default())?;
                        (row.0, row.1, buckets)
                    }
                };
                image.nodes.push(NodeRow {
                    hierarchy,
                    node,
                    parent,
                    header,
                    buckets,
                    write: BucketWrite::Replace,
                });
                Ok(())
            })?;
            if load == Load::Headers {
                load_dedup(&tx, &tenant, &mut image)?;
                return Ok(image);
            }
            // Bucket rows sort like node rows: attach them in one merge pass.
            let buckets = tx.open_table(BUCKET_PAGES).map_err(io)?;
            let mut i = 0;
            pages::scan_prefix(&buckets, &prefix, |k, v| {
                let mut key = KeyReader::new(&k[prefix.len()..]);
                let (h, n) = (key.str()?, key.str()?);
                let (h, n) = (h.as_str(), n.as_str());
                let t = &tenant;
                while i < image.nodes.len()
                    && (
                        image.nodes[i].hierarchy.as_str(),
                        image.nodes[i].node.as_str(),
                    ) < (h, n)
                {
                    i += 1;
                }
                let Some(node) = image
                    .nodes
                    .get_mut(i)
                    .filter(|x| x.hierarchy == h && x.node == n)
                else {
                    return Err(StoreError::Corrupt(format!(
                        "bucket row of unknown node {t}/{h}/{n}"
                    )));
                };
                node.buckets.push(spilled_row(key.rest(), v)?);
                Ok(())
            })?;
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
                    hierarchy: h,
                    node: n,
                    parent: p.parent,
                    header: p.header,
                    buckets: Vec::new(),
                    write: BucketWrite::Replace,
                }));
            }
            let row = StoredNode::decode(&v)?;
            let inline = row.inline()?;
            let StoredNode(parent, header, _) = row;
            let buckets = match inline {
                Some(set) => bucket_rows(set)?,
                None => {
                    let table = tx.open_table(BUCKET_PAGES).map_err(io)?;
                    spilled_rows(&table, &t, &h, &n)?
                }
            };
            Ok(Some(NodeRow {
                hierarchy: h,
                node: n,
                parent,
                header,
                buckets,
                write: BucketWrite::Replace,
            }))
        })
        .await
    }

    async fn commit(&self, cp: Arc<Checkpoint>) -> Result<u64, StoreError> {
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
            let inline = StoredNode::decode(&v)?.inline()?;
            let (kd, g) = (BucketKind::Subtree as u8, granularity as u8);
            if let Some(set) = inline {
                return Ok(Some(
                    set.into_iter()
                        .filter(|(k, gg, _, _)| (*k, *gg) == (kd, g))
                        .map(|(_, _, key, a)| (key, a))
                        .collect(),
                ));
            }
            let buckets = tx.open_table(BUCKET_PAGES).map_err(io)?;
            let mut prefix = node_key(&t, &h, &n);
            prefix.extend_from_slice(&[kd, g]);
            let mut out = Vec::new();
            pages::scan_prefix(&buckets, &prefix, |k, v| {
                let (_, _, key) = bucket_suffix(&k[prefix.len() - 2..])?;
                out.push((key, rmp_serde::from_slice(v).map_err(corrupt)?));
                Ok(())
            })?;
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
                .collect(),
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

    fn bucket_pages(s: &EmbeddedStore) -> usize {
        let tx = s.db.begin_read().unwrap();
        redb::ReadableTableMetadata::len(&tx.open_table(BUCKET_PAGES).unwrap()).unwrap() as usize
    }

    fn bucket_rows(s: &EmbeddedStore) -> usize {
        let tx = s.db.begin_read().unwrap();
        let t = tx.open_table(BUCKET_PAGES).unwrap();
        let mut n = 0;
        for e in t.iter().unwrap() {
            n += pages::entries(e.unwrap().1.value()).unwrap().len();
        }
        n
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
        for (k, a) in read {
            assert_eq!(a, agg(k));
        }
        loaded
    }

    #[tokio::test]
    async fn a_node_that_outgrows_the_inline_set_spills_its_buckets_to_rows() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        // A small node: one row, buckets inline.
        let written = s
            .commit(put(1, vec![node("small", &[1, 2, 3])]))
            .await
            .unwrap();
        assert_eq!(
            written, 4,
            "node page, children index page, node count, meta"
        );
        assert_eq!(bucket_rows(&s), 0);
        assert_eq!(keys_of(&s, "small").await, [1, 2, 3]);

        // Growing past INLINE_MAX moves every bucket to rows, which take several pages.
        let many: Vec<u64> = (1..=INLINE_MAX as u64 * 10).collect();
        let written = s.commit(put(2, vec![node("small", &many)])).await.unwrap();
        let pages = bucket_pages(&s);
        assert!(pages > 1, "{} buckets in {pages} page", many.len());
        assert_eq!(
            written,
            1 + pages as u64 + 1,
            "node page, bucket pages, meta"
        );
        assert_eq!(bucket_rows(&s), many.len());
        assert_eq!(keys_of(&s, "small").await, many);

        // Spilled: only the changed buckets are written; a `None` deletes one.
        let mut change = node("small", &[5, 10_000]);
        change.buckets.push(BucketRow {
            kind: BucketKind::Subtree,
            granularity: Granularity::Minute,
            key: 7,
            agg: None,
        });
        change.buckets.sort_by_key(|b| b.key);
        let written = s.commit(put(3, vec![change])).await.unwrap();
        assert_eq!(
            written, 3,
            "the first bucket page (7 goes; 5 is written as it was), the last (10,000), meta; \
             the node's row is unchanged, so its page is not rewritten"
        );
        let mut want: Vec<u64> = many.iter().copied().filter(|k| *k != 7).collect();
        want.push(10_000);
        assert_eq!(keys_of(&s, "small").await, want);

        // Deleted and created again in one checkpoint: small again, inline again.
        let again = TenantChanges {
            tenant: "t".into(),
            delete_nodes: vec![("h".into(), "small".into())],
            put_nodes: vec![node("small", &[42])],
            ..Default::default()
        };
        s.commit(cp(4, again)).await.unwrap();
        assert_eq!(bucket_rows(&s), 0, "the spilled rows went with the node");
        assert_eq!(keys_of(&s, "small").await, [42]);
    }

    #[tokio::test]
    async fn inline_buckets_take_changes_and_deletions() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.commit(put(1, vec![node("a", &[3, 1, 2])])).await.unwrap();
        let mut n = node("a", &[0, 2, 9]);
        n.buckets[1].agg = None;
        s.commit(put(2, vec![n])).await.unwrap();
        assert_eq!(keys_of(&s, "a").await, [0, 1, 3, 9]);
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
    fn a_row_prefix_reads_parent_header_and_spill_without_the_set() {
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
        // Sets of every bin-length encoding: bin8, bin16 and bin32 (past 65,535 bytes).
        for (parent, set) in [
            (None, Some(vec![])),
            (
                Some("p".to_string()),
                Some(vec![(0u8, 0u8, 60u64, agg(1)); 3]),
            ),
            (Some("q".to_string()), Some(vec![(0, 1, 7, agg(2)); 200])),
            (None, Some(vec![(1, 2, 9, agg(5)); 70_000])),
            (Some("r".to_string()), None),
        ] {
            let v = node_value(&parent, &header, set.as_deref()).unwrap();
            let p = row_prefix::<NodeHeader>(&v).unwrap();
            assert_eq!(p.parent, parent);
            assert_eq!(p.header, header);
            let skipped = row_prefix::<Skip>(&v).unwrap();
            assert_eq!(skipped.parent, parent);
        }
        // Not a node row: a clear error, not a guess.
        for bad in [
            rmp_serde::to_vec(&("p", 1)).unwrap(),
            rmp_serde::to_vec(&(Some("p"), &header, 5u8)).unwrap(),
            rmp_serde::to_vec(&(Some("p"), &header, vec![1u8, 2])).unwrap(),
            node_value(&Some("p".into()), &header, None).unwrap()[..6].to_vec(),
        ] {
            assert!(matches!(
                row_prefix::<NodeHeader>(&bad),
                Err(StoreError::Corrupt(_))
            ));
        }
    }
}
