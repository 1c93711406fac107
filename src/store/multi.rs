//! Several embedded stores seen as one: `canopy run` keeps one store per Kafka partition
//! (`DIR/partition-N/`), so that a partition's state moves between processes with the
//! partition. Tenants never span stores (records are keyed by tenant), so a tenant's answer
//! comes from the one store that has it, and `as_of` is that store's checkpoint.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use canopy_actors::agg::{Agg, Granularity};
use canopy_actors::store::{AsOf, EntityView, HierarchyInfo, NodeView, StoreError, StoreRead};

use super::EmbeddedStore;

/// The data directory of one partition's store.
pub fn partition_dir(data_dir: &Path, partition: i32) -> std::path::PathBuf {
    data_dir.join(format!("partition-{partition}"))
}

/// Opens every embedded store in `dir`: the single store of `ingest`/`demo`
/// (`DIR/canopy.redb`) and the per-partition stores of `run` (`DIR/partition-N/`).
pub fn open_all(dir: &Path, cache_mb: usize) -> Result<Vec<(String, EmbeddedStore)>, StoreError> {
    let mut out = Vec::new();
    if dir.join(super::embedded::FILE_NAME).exists() {
        out.push(("main".to_string(), EmbeddedStore::open_with(dir, cache_mb)?));
    }
    let mut parts: Vec<(i32, std::path::PathBuf)> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let n = name.strip_prefix("partition-")?.parse().ok()?;
                e.path()
                    .join(super::embedded::FILE_NAME)
                    .exists()
                    .then(|| (n, e.path()))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(StoreError::Io(e.to_string())),
    };
    parts.sort();
    for (n, p) in parts {
        out.push((
            format!("partition-{n}"),
            EmbeddedStore::open_with(&p, cache_mb)?,
        ));
    }
    if out.is_empty() {
        // An empty directory: a fresh single store, as before `run` existed.
        out.push(("main".to_string(), EmbeddedStore::open_with(dir, cache_mb)?));
    }
    Ok(out)
}

#[derive(Default)]
pub struct MultiRead {
    stores: RwLock<BTreeMap<String, Arc<dyn StoreRead>>>,
}

impl MultiRead {
    pub fn insert(&self, name: String, store: Arc<dyn StoreRead>) {
        self.stores.write().expect("lock").insert(name, store);
    }

    pub fn remove(&self, name: &str) {
        self.stores.write().expect("lock").remove(name);
    }

    fn all(&self) -> Vec<Arc<dyn StoreRead>> {
        self.stores
            .read()
            .expect("lock")
            .values()
            .cloned()
            .collect()
    }
}

/// The first store's answer that is `Some`, or `None` with the largest `as_of` seen.
macro_rules! first {
    ($self:ident, $s:ident => $call:expr) => {{
        let mut as_of = 0;
        let mut found = None;
        for $s in $self.all() {
            let r = $call.await?;
            if r.value.is_some() {
                found = Some(r);
                break;
            }
            as_of = as_of.max(r.as_of);
        }
        Ok(found.unwrap_or(AsOf { as_of, value: None }))
    }};
}

#[async_trait]
impl StoreRead for MultiRead {
    async fn tenant_ids(&self) -> Result<AsOf<Vec<String>>, StoreError> {
        let mut out = AsOf {
            as_of: 0,
            value: Vec::new(),
        };
        for s in self.all() {
            let r = s.tenant_ids().await?;
            out.as_of = out.as_of.max(r.as_of);
            out.value.extend(r.value);
        }
        out.value.sort();
        out.value.dedup();
        Ok(out)
    }

    async fn hierarchies(&self, t: &str) -> Result<AsOf<Option<Vec<HierarchyInfo>>>, StoreError> {
        first!(self, s => s.hierarchies(t))
    }

    async fn node(&self, t: &str, h: &str, n: &str) -> Result<AsOf<Option<NodeView>>, StoreError> {
        first!(self, s => s.node(t, h, n))
    }

    async fn children(
        &self,
        t: &str,
        h: &str,
        parent: Option<&str>,
    ) -> Result<AsOf<Option<Vec<(String, Agg)>>>, StoreError> {
        first!(self, s => s.children(t, h, parent))
    }

    async fn series(
        &self,
        t: &str,
        h: &str,
        n: &str,
        g: Granularity,
    ) -> Result<AsOf<Option<Vec<(u64, Agg)>>>, StoreError> {
        first!(self, s => s.series(t, h, n, g))
    }

    async fn entity(&self, t: &str, e: &str) -> Result<AsOf<Option<EntityView>>, StoreError> {
        first!(self, s => s.entity(t, e))
    }
}
