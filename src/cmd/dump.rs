//! `canopy dump`: every node as one JSON line, sorted by tenant, hierarchy, node (docs/SPEC.md §8).

use std::io::Write;

use canopy_actors::agg::{AggJson, Granularity};
use canopy_actors::node::NodeState;
use canopy_actors::store::{Load, NodeRow, Store, StoreError};
use canopy_actors::time::{BucketKey, Retention};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::config::Config;
use crate::store::open_all_stores;

struct BucketsJson<'a>(&'a canopy_actors::agg::Buckets);

impl Serialize for BucketsJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct One<'a>(&'a canopy_actors::agg::BucketMap);
        impl Serialize for One<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(self.0.len()))?;
                for (k, a) in self.0.iter() {
                    m.serialize_entry(&BucketKey(*k).format(), &AggJson(a))?;
                }
                m.end()
            }
        }
        let mut m = s.serialize_map(Some(3))?;
        for g in Granularity::ALL {
            m.serialize_entry(g.name(), &One(self.0.get(g)))?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct DumpRow<'a> {
    tenant: &'a str,
    hierarchy: &'a str,
    node: &'a str,
    parent: &'a Option<String>,
    own: AggJson<'a>,
    subtree: AggJson<'a>,
    buckets: BucketsJson<'a>,
}

/// The command: every store `cfg` names, dumped to stdout.
pub async fn run(cfg: &Config) -> anyhow::Result<()> {
    super::require_store(cfg)?;
    let stores = open_all_stores(&cfg.store, &cfg.data_dir).await?;
    let refs: Vec<&dyn Store> = stores.iter().map(|(_, s)| s.as_ref() as _).collect();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    match dump(&refs, cfg.tenant.retention, &mut out).await {
        // `canopy dump | head`: the reader closing the pipe is not a failure.
        Err(DumpError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r.map(|_| ())?),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("node {0}: {1}")]
    Corrupt(String, String),
    #[error("writing the dump: {0}")]
    Io(#[from] std::io::Error),
}

pub fn write_row(out: &mut impl Write, tenant: &str, n: &NodeRow) -> Result<(), DumpError> {
    let st = NodeState::from_rows(n.header.clone(), &n.buckets);
    let row = DumpRow {
        tenant,
        hierarchy: &n.hierarchy,
        node: &n.node,
        parent: &n.parent,
        own: AggJson(&st.own),
        subtree: AggJson(&st.subtree.total),
        buckets: BucketsJson(&st.subtree.buckets),
    };
    serde_json::to_writer(&mut *out, &row).map_err(std::io::Error::from)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Writes every node of `stores` to `out`, sorted by tenant, hierarchy, node. (Several stores:
/// the per-partition stores of `canopy run`; a tenant lives in one of them.)
///
/// Buckets below the tenant's retention cutoffs (`Retention::prune_cutoffs` of its watermark,
/// what a checkpoint drops from the nodes it writes) are left out: a node not written since
/// they expired still holds them, and the dump shows the same buckets whichever nodes a
/// checkpoint happened to write.
pub async fn dump(
    stores: &[&dyn Store],
    retention: Retention,
    out: &mut impl Write,
) -> Result<u64, DumpError> {
    let mut tenants = Vec::new();
    for (i, s) in stores.iter().enumerate() {
        tenants.extend(s.tenants().await?.into_iter().map(|t| (t, i)));
    }
    tenants.sort();
    let mut n = 0;
    for (t, i) in tenants {
        let mut image = stores[i].load_tenant(&t, Load::Buckets).await?;
        image
            .nodes
            .sort_by(|a, b| (&a.hierarchy, &a.node).cmp(&(&b.hierarchy, &b.node)));
        let watermark = image.row.as_ref().and_then(|r| r.watermark);
        let cut = retention.prune_cutoffs(watermark.unwrap_or(0));
        for node in &mut image.nodes {
            std::sync::Arc::make_mut(&mut node.buckets)
                .retain(|b| b.key >= cut[b.granularity as usize]);
        }
        for node in &image.nodes {
            write_row(out, &t, node)?;
            n += 1;
        }
    }
    out.flush()?;
    Ok(n)
}
