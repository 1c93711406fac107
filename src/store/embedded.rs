//! The embedded store: a redb database file in the data directory (the default backend).
//!
//! Layout (all values MessagePack):
//! - `meta`: `"checkpoint"` → the last checkpoint's sequence number and source position
//! - `tenants`: tenant → [`TenantRow`]
//! - `nodes`: (tenant, hierarchy, node) → (parent, totals: own and subtree)
//! - `buckets`: (tenant, hierarchy, node, kind, granularity, key) → one bucket's aggregate; a
//!   checkpoint writes only the buckets that changed, so a busy root does not rewrite its history
//! - `dedup`: (tenant, checkpoint seq) → the event ids accepted in that checkpoint interval
//!
//! One checkpoint is one redb write transaction, so a reader sees all of it or none of it.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use canopy_actors::agg::Granularity;
use canopy_actors::store::{
    BucketKind, BucketRow, Checkpoint, CheckpointMeta, DedupBatch, NodeHeader, NodeRow, Store,
    StoreError, TenantImage,
};
use canopy_actors::tenant::TenantRow;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const NODES: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("nodes");
const DEDUP: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dedup");
type BucketKey<'a> = (&'a str, &'a str, &'a str, u8, u8, u64);
const BUCKETS: TableDefinition<BucketKey, &[u8]> = TableDefinition::new("buckets");

pub const FILE_NAME: &str = "canopy.redb";

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

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let db = Database::create(dir.join(FILE_NAME)).map_err(io)?;
        let tx = db.begin_write().map_err(io)?;
        tx.open_table(META).map_err(io)?;
        tx.open_table(TENANTS).map_err(io)?;
        tx.open_table(NODES).map_err(io)?;
        tx.open_table(DEDUP).map_err(io)?;
        tx.open_table(BUCKETS).map_err(io)?;
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

fn commit(db: &Database, cp: &Checkpoint) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(io)?;
    {
        let mut tenants = tx.open_table(TENANTS).map_err(io)?;
        let mut nodes = tx.open_table(NODES).map_err(io)?;
        let mut dedup = tx.open_table(DEDUP).map_err(io)?;
        let mut buckets = tx.open_table(BUCKETS).map_err(io)?;
        for t in &cp.tenants {
            if let Some(row) = &t.row {
                tenants
                    .insert(
                        t.tenant.as_str(),
                        rmp_serde::to_vec(row).map_err(io)?.as_slice(),
                    )
                    .map_err(io)?;
            }
            // Deletes first: a node deleted and created again in one interval ends up present.
            for (h, n) in &t.delete_nodes {
                let (t, h, n) = (t.tenant.as_str(), h.as_str(), n.as_str());
                nodes.remove((t, h, n)).map_err(io)?;
                let mut doomed = Vec::new();
                for e in buckets
                    .range((t, h, n, 0u8, 0u8, 0u64)..=(t, h, n, u8::MAX, u8::MAX, u64::MAX))
                    .map_err(io)?
                {
                    let (k, _) = e.map_err(io)?;
                    let (_, _, _, kd, g, key) = k.value();
                    doomed.push((kd, g, key));
                }
                for (kd, g, key) in doomed {
                    buckets.remove((t, h, n, kd, g, key)).map_err(io)?;
                }
            }
            for n in &t.put_nodes {
                let v = rmp_serde::to_vec(&(&n.parent, &n.header)).map_err(io)?;
                let (tn, h, node) = (t.tenant.as_str(), n.hierarchy.as_str(), n.node.as_str());
                nodes.insert((tn, h, node), v.as_slice()).map_err(io)?;
                for b in &n.buckets {
                    let k = (tn, h, node, b.kind as u8, b.granularity as u8, b.key);
                    match &b.agg {
                        Some(a) => {
                            buckets
                                .insert(k, rmp_serde::to_vec(a).map_err(io)?.as_slice())
                                .map_err(io)?;
                        }
                        None => {
                            buckets.remove(k).map_err(io)?;
                        }
                    }
                }
            }
            if let Some(b) = &t.dedup {
                dedup
                    .insert(
                        (t.tenant.as_str(), b.seq),
                        rmp_serde::to_vec(&b.ids).map_err(io)?.as_slice(),
                    )
                    .map_err(io)?;
            }
            for seq in &t.expire_dedup {
                dedup.remove((t.tenant.as_str(), *seq)).map_err(io)?;
            }
        }
        let mut meta = tx.open_table(META).map_err(io)?;
        let m = CheckpointMeta {
            seq: cp.seq,
            source: cp.source.clone(),
        };
        meta.insert("checkpoint", rmp_serde::to_vec(&m).map_err(io)?.as_slice())
            .map_err(io)?;
    }
    tx.commit().map_err(io)?;
    Ok(())
}

#[derive(serde::Deserialize)]
struct StoredNode(Option<String>, NodeHeader);

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

    async fn load_tenant(&self, tenant: &str) -> Result<TenantImage, StoreError> {
        let tenant = tenant.to_string();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(io)?;
            let mut image = TenantImage::default();
            let tenants = tx.open_table(TENANTS).map_err(io)?;
            if let Some(v) = tenants.get(tenant.as_str()).map_err(io)? {
                image.row = Some(rmp_serde::from_slice::<TenantRow>(v.value()).map_err(corrupt)?);
            }
            let nodes = tx.open_table(NODES).map_err(io)?;
            for e in nodes.range((tenant.as_str(), "", "")..).map_err(io)? {
                let (k, v) = e.map_err(io)?;
                let (t, h, n) = k.value();
                if t != tenant {
                    break;
                }
                let StoredNode(parent, header) =
                    rmp_serde::from_slice(v.value()).map_err(corrupt)?;
                image.nodes.push(NodeRow {
                    hierarchy: h.to_string(),
                    node: n.to_string(),
                    parent,
                    header,
                    buckets: Vec::new(),
                });
            }
            // Bucket rows sort like node rows: attach them in one merge pass.
            let buckets = tx.open_table(BUCKETS).map_err(io)?;
            let mut i = 0;
            for e in buckets
                .range((tenant.as_str(), "", "", 0u8, 0u8, 0u64)..)
                .map_err(io)?
            {
                let (k, v) = e.map_err(io)?;
                let (t, h, n, kd, g, key) = k.value();
                if t != tenant {
                    break;
                }
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
                node.buckets.push(BucketRow {
                    kind: kind(kd)?,
                    granularity: granularity(g)?,
                    key,
                    agg: Some(rmp_serde::from_slice(v.value()).map_err(corrupt)?),
                });
            }
            let dedup = tx.open_table(DEDUP).map_err(io)?;
            for e in dedup.range((tenant.as_str(), 0u64)..).map_err(io)? {
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
            Ok(image)
        })
        .await
    }

    async fn commit(&self, cp: Arc<Checkpoint>) -> Result<(), StoreError> {
        self.blocking(move |db| commit(db, &cp)).await
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
            metrics: Vec::new(),
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
        let img = s.load_tenant("t").await.unwrap();
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
        let img = s.load_tenant("t").await.unwrap();
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
        let img = s.load_tenant("t").await.unwrap();
        assert_eq!(
            img.nodes[0]
                .buckets
                .iter()
                .map(|b| b.key)
                .collect::<Vec<_>>(),
            [9]
        );
    }
}
