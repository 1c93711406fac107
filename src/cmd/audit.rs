//! `canopy audit`: checks the invariants of the stored state.
//!
//! For `current` hierarchies: every node's `subtree` equals its `own` plus the `subtree` of
//! each child, in the totals and in every bucket (events, count and sum exactly; min and max as
//! the extremes of the parts). For `attributed` hierarchies numbers never move, so only
//! `subtree ⊇ own` holds: at least as many events. For every node: its parent exists.

use std::collections::HashMap;

use canopy_actors::agg::{Agg, BucketMap, Granularity};
use canopy_actors::node::NodeState;
use canopy_actors::record::Mode;
use canopy_actors::store::{Load, Store, StoreError};
use canopy_actors::time::{BucketKey, Retention};

use crate::config::Config;
use crate::store::open_all_stores;

#[derive(Debug, Default)]
pub struct AuditReport {
    pub nodes: u64,
    pub violations: Vec<String>,
}

fn sum_into(into: &mut BucketMap, b: &BucketMap) {
    into.merge(b);
}

/// The command: every store `cfg` names, audited; an error when any invariant is violated.
pub async fn run(cfg: &Config) -> anyhow::Result<()> {
    super::require_store(cfg)?;
    let (mut nodes, mut violations) = (0, 0);
    for (_, store) in open_all_stores(&cfg.store, &cfg.data_dir).await? {
        let rep = audit(store.as_ref()).await?;
        for v in &rep.violations {
            println!("violation: {v}");
        }
        nodes += rep.nodes;
        violations += rep.violations.len();
    }
    println!("audit: {nodes} nodes checked, {violations} violations");
    if violations > 0 {
        anyhow::bail!("{violations} invariant violations");
    }
    Ok(())
}

pub async fn audit(store: &dyn Store) -> Result<AuditReport, StoreError> {
    let mut rep = AuditReport::default();
    let mut tenants = store.tenants().await?;
    tenants.sort();
    for t in tenants {
        let img = store.load_tenant(&t, Load::Buckets).await?;
        let modes: HashMap<String, Mode> = img
            .row
            .as_ref()
            .map(|r| r.hierarchies.iter().cloned().collect())
            .unwrap_or_default();
        let states: HashMap<(&str, &str), NodeState> = img
            .nodes
            .iter()
            .map(|n| {
                (
                    (n.hierarchy.as_str(), n.node.as_str()),
                    NodeState::from_rows(n.header.clone(), &n.buckets),
                )
            })
            .collect();
        let wm = img.row.as_ref().and_then(|r| r.watermark).unwrap_or(0);
        let cutoffs = Retention::default().prune_cutoffs(wm);
        let mut children: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
        for n in &img.nodes {
            rep.nodes += 1;
            if let Some(p) = &n.parent {
                if !states.contains_key(&(n.hierarchy.as_str(), p.as_str())) {
                    rep.violations.push(format!(
                        "{t}/{}/{}: parent {p:?} does not exist",
                        n.hierarchy, n.node
                    ));
                }
                children
                    .entry((n.hierarchy.as_str(), p.as_str()))
                    .or_default()
                    .push(&n.node);
            }
        }
        for n in &img.nodes {
            let here = format!("{t}/{}/{}", n.hierarchy, n.node);
            let st = &states[&(n.hierarchy.as_str(), n.node.as_str())];
            let kids = children
                .get(&(n.hierarchy.as_str(), n.node.as_str()))
                .cloned()
                .unwrap_or_default();
            match modes.get(&n.hierarchy).copied().unwrap_or(Mode::Current) {
                Mode::Attributed => {
                    if st.subtree.total.events < st.own.events {
                        rep.violations.push(format!(
                            "{here}: attributed subtree has fewer events than own"
                        ));
                    }
                }
                Mode::Current => {
                    let mut total: Agg = st.own.clone();
                    let own_b = match (&st.own_buckets, kids.is_empty()) {
                        (Some(b), _) => b.clone(),
                        (None, true) => st.subtree.buckets.clone(),
                        (None, false) => {
                            rep.violations
                                .push(format!("{here}: has children but no separate own buckets"));
                            continue;
                        }
                    };
                    let mut buckets = own_b;
                    for c in &kids {
                        let cs = &states[&(n.hierarchy.as_str(), *c)];
                        total.merge(&cs.subtree.total);
                        for g in 0..3 {
                            sum_into(&mut buckets.0[g], &cs.subtree.buckets.0[g]);
                        }
                    }
                    if total != st.subtree.total {
                        rep.violations.push(format!(
                            "{here}: subtree {} != own + children {}",
                            st.subtree.total.to_json(),
                            total.to_json()
                        ));
                    }
                    // Nodes prune expired buckets when they are next checkpointed, not all at once:
                    // compare only what is inside retention.
                    let mut got_all = st.subtree.buckets.clone();
                    buckets.prune(&cutoffs);
                    got_all.prune(&cutoffs);
                    for g in Granularity::ALL {
                        let (want, got) = (buckets.get(g), got_all.get(g));
                        if want != got {
                            let bad = want
                                .iter()
                                .map(|(k, _)| *k)
                                .chain(got.iter().map(|(k, _)| *k))
                                .find(|k| want.get(k) != got.get(k))
                                .map(|k| BucketKey(k).format())
                                .unwrap_or_default();
                            rep.violations.push(format!(
                                "{here}: {} bucket {bad} != own + children",
                                g.name()
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(rep)
}
