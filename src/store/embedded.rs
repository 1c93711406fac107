//! The embedded store: a redb database file in the data directory (the default backend).
//!
//! Layout (all values MessagePack):
//! - `meta`: `"checkpoint"` → the last checkpoint's sequence number and source position
//! - `tenants`: tenant → [`TenantRow`]
//! - `nodes`: (tenant, hierarchy, node) → (parent, encoded node state)
//! - `dedup`: (tenant, checkpoint seq) → the event ids accepted in that checkpoint interval
//!
//! One checkpoint is one redb write transaction, so a reader sees all of it or none of it.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use canopy_actors::store::{
    Checkpoint, CheckpointMeta, DedupBatch, NodeRow, Store, StoreError, TenantImage,
};
use canopy_actors::tenant::TenantRow;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const NODES: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("nodes");
const DEDUP: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dedup");

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
                nodes
                    .remove((t.tenant.as_str(), h.as_str(), n.as_str()))
                    .map_err(io)?;
            }
            for n in &t.put_nodes {
                let v = rmp_serde::to_vec(&(&n.parent, serde_bytes::Bytes::new(&n.state)))
                    .map_err(io)?;
                nodes
                    .insert(
                        (t.tenant.as_str(), n.hierarchy.as_str(), n.node.as_str()),
                        v.as_slice(),
                    )
                    .map_err(io)?;
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
struct StoredNode(Option<String>, serde_bytes::ByteBuf);

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
                let StoredNode(parent, state) =
                    rmp_serde::from_slice(v.value()).map_err(corrupt)?;
                image.nodes.push(NodeRow {
                    hierarchy: h.to_string(),
                    node: n.to_string(),
                    parent,
                    state: state.into_vec(),
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

    async fn commit(&self, cp: &Checkpoint) -> Result<(), StoreError> {
        let cp = cp.clone();
        self.blocking(move |db| commit(db, &cp)).await
    }
}
