//! A tenant's bookkeeping: time zone, hierarchies and their topology, suspended entities,
//! dedup memory and watermark. Pure logic: it validates one record against the state of
//! docs/SPEC.md sections 2 and 3 and says what the node actors must do ([`Effect`]); it never touches numbers.
//!
//! Nodes are addressed by a dense index (`NodeIx`) so that round planning walks vectors, not maps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::agg::MetricName;
use crate::record::{Mode, Record, Refusal};
use crate::time::{zone, BucketCache, Micros, Retention};

pub type NodeIx = u32;

/// Settings that shape a tenant's behaviour.
/// Serialized as the configuration's `tenant` section: a key left out keeps its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TenantSettings {
    /// Event ids are remembered at least this long behind the watermark (docs/SPEC.md section 3: default 1 h).
    pub dedup_horizon_secs: i64,
    /// Its keys sit in the `tenant` section itself (`retention_minute_secs`...).
    #[serde(flatten)]
    pub retention: Retention,
    /// A round (the coalescing flush up the tree) runs once this many events are pending...
    pub round_max_events: usize,
    /// ... or once the oldest pending event waited this long, whichever comes first.
    pub round_interval_ms: u64,
    /// A node actor restarted this many times within `node_restart_window_ms` escalates: its
    /// next failure rebuilds the whole tenant from its checkpoint instead.
    pub node_max_restarts: u32,
    pub node_restart_window_ms: u64,
    /// A node actor that took part in none of this many checkpoints is passivated: stopped,
    /// its totals kept by the coordinator, activated again when something is addressed to it.
    /// 1 passivates every node idle at a checkpoint.
    pub passivate_idle_checkpoints: u64,
    /// Beyond this many node actors in the process, the least recently active of the idle ones
    /// are passivated at each checkpoint, however recently they were active.
    pub max_resident_nodes: usize,
}

impl Default for TenantSettings {
    fn default() -> Self {
        TenantSettings {
            dedup_horizon_secs: 3600,
            retention: Retention::default(),
            // A round costs about the same whether it carries 65,536 or 262,144 events once
            // most leaves are touched; a pending event costs ~64 bytes per hierarchy holding
            // its entity, so this bounds a tenant's pending list to ~17 MB per hierarchy.
            round_max_events: 262_144,
            round_interval_ms: 1000,
            node_max_restarts: 3,
            node_restart_window_ms: 10_000,
            // A minute at the default checkpoint interval: Akka Sharding's 2 minutes and
            // Orleans' 15 are for remote activations; here an activation is a ~5 µs spawn.
            passivate_idle_checkpoints: 60,
            // ~6–7 KB per actor: ~1.5 GB of actors at most.
            max_resident_nodes: 250_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Slot {
    pub hierarchy: u32,
    pub name: Box<str>,
    pub parent: Option<NodeIx>,
    pub children: Vec<NodeIx>,
}

#[derive(Debug, Clone)]
pub struct Hierarchy {
    pub name: String,
    pub mode: Mode,
    pub by_name: NameIndex,
}

/// A hierarchy's nodes by name. The index holds slot numbers only and hashes the names the
/// slots hold, so a name is stored once: a `HashMap<String, NodeIx>` beside the slots, with a
/// second map counting each entity's hierarchies, held every name three times (~190 bytes a
/// node, 188 MB of a million-node process).
#[derive(Debug, Clone, Default)]
pub struct NameIndex {
    table: hashbrown::HashTable<NodeIx>,
    hasher: std::collections::hash_map::RandomState,
}

impl NameIndex {
    fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(name)
    }

    fn name(slots: &[Option<Slot>], ix: NodeIx) -> &str {
        &slots[ix as usize]
            .as_ref()
            .expect("an indexed slot is live")
            .name
    }

    pub fn get(&self, slots: &[Option<Slot>], name: &str) -> Option<NodeIx> {
        self.table
            .find(self.hash(name), |&ix| Self::name(slots, ix) == name)
            .copied()
    }

    /// Indexes slot `ix` under the name it holds (not indexed yet).
    fn insert(&mut self, slots: &[Option<Slot>], ix: NodeIx) {
        let h = self.hash(Self::name(slots, ix));
        // Rehashing on growth: the table is borrowed, so the hasher is taken apart from it.
        let hasher = &self.hasher;
        self.table
            .insert_unique(h, ix, |&i| hasher.hash_one(Self::name(slots, i)));
    }

    /// Forgets `name` (its slot must still hold it).
    fn remove(&mut self, slots: &[Option<Slot>], name: &str) {
        let h = self.hash(name);
        if let Ok(e) = self
            .table
            .find_entry(h, |&ix| Self::name(slots, ix) == name)
        {
            e.remove();
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// What a record asks of the node actors.
#[derive(Debug)]
pub enum Effect {
    /// Only the tenant's own bookkeeping changed.
    None,
    /// A duplicate event: ignored, counted in a metric.
    Duplicate,
    /// An accepted event, to be counted on these nodes (one per hierarchy holding the entity).
    Event {
        nodes: Vec<NodeIx>,
        keys: [Option<u64>; 3],
        metrics: Arc<[(MetricName, i64)]>,
    },
    Create {
        node: NodeIx,
    },
    /// `node` moved from `from` to its current parent (topology already updated).
    Move {
        node: NodeIx,
        from: Option<NodeIx>,
    },
    /// `node` was deleted from under `parent` (topology already updated; slot freed after use).
    Delete {
        node: NodeIx,
        parent: Option<NodeIx>,
    },
}

/// The persisted part of a tenant (the topology lives in the node rows).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantRow {
    pub timezone: String,
    pub had_event: bool,
    pub watermark: Option<Micros>,
    pub hierarchies: Vec<(String, Mode)>,
    pub suspended: Vec<String>,
}

pub struct Tenant {
    pub id: String,
    pub settings: TenantSettings,
    tz_name: String,
    cache: BucketCache,
    pub had_event: bool,
    pub watermark: Option<Micros>,
    pub hierarchies: Vec<Hierarchy>,
    hier_by_name: HashMap<String, u32>,
    pub slots: Vec<Option<Slot>>,
    free: Vec<NodeIx>,
    pub suspended: HashSet<String>,
    /// event id → ts, for dedup within the horizon.
    seen: HashMap<Box<str>, Micros>,
    /// ids accepted since the last checkpoint (persisted with it).
    pub new_ids: Vec<(Box<str>, Micros)>,
    seen_high_water: usize,
    metric_names: HashSet<MetricName>,
    /// Set when anything of the tenant row changed since the last checkpoint.
    pub row_dirty: bool,
}

impl Tenant {
    pub fn new(id: String, settings: TenantSettings) -> Self {
        Tenant {
            id,
            settings,
            tz_name: "UTC".into(),
            cache: BucketCache::new(TimeZone::UTC),
            had_event: false,
            watermark: None,
            hierarchies: Vec::new(),
            hier_by_name: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            suspended: HashSet::new(),
            seen: HashMap::new(),
            new_ids: Vec::new(),
            seen_high_water: 1024,
            metric_names: HashSet::new(),
            row_dirty: true,
        }
    }

    pub fn timezone(&self) -> &str {
        &self.tz_name
    }

    pub fn tz(&self) -> &TimeZone {
        self.cache.tz()
    }

    pub fn slot(&self, ix: NodeIx) -> &Slot {
        self.slots[ix as usize].as_ref().expect("live node")
    }

    pub fn mode_of(&self, ix: NodeIx) -> Mode {
        self.hierarchies[self.slot(ix).hierarchy as usize].mode
    }

    /// The mode of a defined hierarchy.
    pub fn hierarchy_mode(&self, hierarchy: &str) -> Option<Mode> {
        let h = *self.hier_by_name.get(hierarchy)?;
        Some(self.hierarchies[h as usize].mode)
    }

    pub fn node_ix(&self, hierarchy: &str, node: &str) -> Option<NodeIx> {
        let h = *self.hier_by_name.get(hierarchy)?;
        self.hierarchies[h as usize].by_name.get(&self.slots, node)
    }

    /// The entity's node in each hierarchy that has it (none: an unknown entity).
    fn entity_nodes(&self, entity: &str) -> Vec<NodeIx> {
        self.hierarchies
            .iter()
            .filter_map(|h| h.by_name.get(&self.slots, entity))
            .collect()
    }

    fn has_entity(&self, entity: &str) -> bool {
        self.hierarchies
            .iter()
            .any(|h| h.by_name.get(&self.slots, entity).is_some())
    }

    pub fn live_nodes(&self) -> impl Iterator<Item = NodeIx> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .map(|(i, _)| i as NodeIx)
    }

    pub fn row(&self) -> TenantRow {
        let mut suspended: Vec<String> = self.suspended.iter().cloned().collect();
        suspended.sort();
        TenantRow {
            timezone: self.tz_name.clone(),
            had_event: self.had_event,
            watermark: self.watermark,
            hierarchies: self
                .hierarchies
                .iter()
                .map(|h| (h.name.clone(), h.mode))
                .collect(),
            suspended,
        }
    }

    /// Rebuilds a tenant from its stored row, nodes (hierarchy, node, parent) and dedup ids.
    pub fn restore(
        id: String,
        settings: TenantSettings,
        row: TenantRow,
        nodes: &[(String, String, Option<String>)],
        ids: impl IntoIterator<Item = (Box<str>, Micros)>,
    ) -> Self {
        let mut t = Tenant::new(id, settings);
        t.set_zone(row.timezone.clone());
        t.had_event = row.had_event;
        t.watermark = row.watermark;
        for (h, mode) in row.hierarchies {
            t.add_hierarchy(h, mode);
        }
        t.suspended = row.suspended.into_iter().collect();
        for (h, n, _) in nodes {
            let hix = match t.hier_by_name.get(h) {
                Some(i) => *i,
                None => t.add_hierarchy(h.clone(), Mode::Current),
            };
            t.alloc(hix, n.clone(), None);
        }
        for (h, n, p) in nodes {
            if let Some(p) = p {
                let (c, p) = (
                    t.node_ix(h, n).expect("restored"),
                    t.node_ix(h, p).expect("parent restored"),
                );
                t.link(c, Some(p));
            }
        }
        for (id, ts) in ids {
            t.seen.insert(id, ts);
        }
        t.seen_high_water = (t.seen.len() * 2).max(1024);
        t.row_dirty = false;
        t
    }

    fn set_zone(&mut self, name: String) {
        let tz = zone(&name).unwrap_or(TimeZone::UTC);
        self.cache = BucketCache::new(tz);
        self.tz_name = name;
    }

    fn add_hierarchy(&mut self, name: String, mode: Mode) -> u32 {
        let ix = self.hierarchies.len() as u32;
        self.hier_by_name.insert(name.clone(), ix);
        self.hierarchies.push(Hierarchy {
            name,
            mode,
            by_name: NameIndex::default(),
        });
        ix
    }

    fn alloc(&mut self, h: u32, name: String, parent: Option<NodeIx>) -> NodeIx {
        let slot = Slot {
            hierarchy: h,
            name: name.into(),
            parent: None,
            children: Vec::new(),
        };
        let ix = match self.free.pop() {
            Some(ix) => {
                self.slots[ix as usize] = Some(slot);
                ix
            }
            None => {
                self.slots.push(Some(slot));
                (self.slots.len() - 1) as NodeIx
            }
        };
        self.hierarchies[h as usize].by_name.insert(&self.slots, ix);
        self.link(ix, parent);
        ix
    }

    fn link(&mut self, ix: NodeIx, parent: Option<NodeIx>) {
        if let Some(old) = self.slot(ix).parent {
            let ch = &mut self.slots[old as usize].as_mut().expect("live").children;
            ch.retain(|c| *c != ix);
        }
        self.slots[ix as usize].as_mut().expect("live").parent = parent;
        if let Some(p) = parent {
            self.slots[p as usize]
                .as_mut()
                .expect("live")
                .children
                .push(ix);
        }
    }

    /// Frees a deleted node's slot once the node actors are done with it.
    pub fn release(&mut self, ix: NodeIx) {
        self.slots[ix as usize] = None;
        self.free.push(ix);
    }

    /// The chain of ancestors of `ix`, nearest first (excluding `ix`).
    pub fn ancestors(&self, ix: NodeIx) -> Vec<NodeIx> {
        let mut out = Vec::new();
        let mut cur = self.slot(ix).parent;
        while let Some(p) = cur {
            out.push(p);
            cur = self.slot(p).parent;
        }
        out
    }

    fn intern(&mut self, name: &str) -> MetricName {
        if let Some(n) = self.metric_names.get(name) {
            return *n;
        }
        let n = MetricName::intern(name);
        self.metric_names.insert(n);
        n
    }

    /// Validates and applies one record to the bookkeeping. Numbers are the node actors' job:
    /// the returned [`Effect`] says what they must do.
    pub fn apply(&mut self, rec: &Record) -> Result<Effect, Refusal> {
        match rec {
            Record::Event {
                event_id,
                entity,
                ts,
                metrics,
                ..
            } => {
                let ts = *ts;
                let nodes = self.entity_nodes(entity);
                if nodes.is_empty() {
                    return Err(Refusal::UnknownEntity(entity.clone()));
                }
                if self.suspended.contains(entity) {
                    return Err(Refusal::Suspended(entity.clone()));
                }
                if self.seen.contains_key(event_id.as_str()) {
                    return Ok(Effect::Duplicate);
                }
                let id: Box<str> = event_id.as_str().into();
                self.seen.insert(id.clone(), ts);
                self.new_ids.push((id, ts));
                if !self.had_event {
                    self.had_event = true;
                    self.row_dirty = true;
                }
                let wm = self.watermark.map_or(ts, |w| w.max(ts));
                if Some(wm) != self.watermark {
                    self.watermark = Some(wm);
                    self.row_dirty = true;
                }
                let all = self.cache.keys(ts);
                // In µs, not whole seconds: an event 48 h and half a second behind is more than
                // 48 h behind (docs/SPEC.md section 6), and truncating kept its minute bucket.
                let behind = wm - ts;
                let r = self.settings.retention;
                let within = |secs: i64| behind <= secs.saturating_mul(1_000_000);
                let keys = [
                    within(r.minute_secs).then_some(all[0].0),
                    within(r.hour_secs).then_some(all[1].0),
                    within(r.day_secs).then_some(all[2].0),
                ];
                let mut metrics: Vec<(MetricName, i64)> =
                    metrics.iter().map(|(n, v)| (self.intern(n), *v)).collect();
                // Sorted once here, a long list merges into each of the node's aggregates in
                // one pass without a sort of its own (`Agg::add_event`).
                if metrics.len() > 4 {
                    metrics.sort_unstable_by_key(|a| a.0);
                }
                let metrics: Arc<[(MetricName, i64)]> = metrics.into();
                Ok(Effect::Event {
                    nodes,
                    keys,
                    metrics,
                })
            }
            Record::DefineTenant { timezone, .. } => {
                let name = timezone.as_deref().unwrap_or("UTC");
                if zone(name).is_none() {
                    return Err(Refusal::UnknownTimezone(name.into()));
                }
                if self.had_event && name != self.tz_name {
                    return Err(Refusal::TimezoneLocked {
                        current: self.tz_name.clone(),
                        requested: name.into(),
                    });
                }
                if name != self.tz_name {
                    self.set_zone(name.into());
                    self.row_dirty = true;
                }
                Ok(Effect::None)
            }
            Record::DefineHierarchy {
                hierarchy, mode, ..
            } => {
                if let Some(&h) = self.hier_by_name.get(hierarchy) {
                    let current = self.hierarchies[h as usize].mode;
                    if current != *mode {
                        return Err(Refusal::HierarchyModeLocked {
                            hierarchy: hierarchy.clone(),
                            current: current.name(),
                            requested: mode.name(),
                        });
                    }
                    return Ok(Effect::None);
                }
                self.add_hierarchy(hierarchy.clone(), *mode);
                self.row_dirty = true;
                Ok(Effect::None)
            }
            Record::UpsertNode {
                hierarchy,
                node,
                parent,
                ..
            } => {
                let h = self.hier_by_name.get(hierarchy).copied();
                let parent_ix = match parent {
                    None => None,
                    Some(p) => match h
                        .and_then(|h| self.hierarchies[h as usize].by_name.get(&self.slots, p))
                    {
                        Some(ix) => Some(ix),
                        None => {
                            return Err(Refusal::UnknownParent {
                                hierarchy: hierarchy.clone(),
                                parent: p.clone(),
                            })
                        }
                    },
                };
                let existing =
                    h.and_then(|h| self.hierarchies[h as usize].by_name.get(&self.slots, node));
                if let (Some(ix), Some(p)) = (existing, parent_ix) {
                    if p == ix || self.ancestors(p).contains(&ix) {
                        return Err(Refusal::Cycle {
                            node: node.clone(),
                            parent: parent.clone().unwrap_or_default(),
                        });
                    }
                }
                let h = match h {
                    Some(h) => h,
                    None => {
                        self.row_dirty = true;
                        self.add_hierarchy(hierarchy.clone(), Mode::Current)
                    }
                };
                match existing {
                    None => Ok(Effect::Create {
                        node: self.alloc(h, node.clone(), parent_ix),
                    }),
                    Some(ix) => {
                        let from = self.slot(ix).parent;
                        if from == parent_ix {
                            return Ok(Effect::None);
                        }
                        self.link(ix, parent_ix);
                        Ok(Effect::Move { node: ix, from })
                    }
                }
            }
            Record::DeleteNode {
                hierarchy, node, ..
            } => {
                let Some(ix) = self.node_ix(hierarchy, node) else {
                    return Err(Refusal::UnknownNode {
                        hierarchy: hierarchy.clone(),
                        node: node.clone(),
                    });
                };
                if !self.slot(ix).children.is_empty() {
                    return Err(Refusal::HasChildren(node.clone()));
                }
                let parent = self.slot(ix).parent;
                self.link(ix, None);
                let h = self.slot(ix).hierarchy as usize;
                self.hierarchies[h].by_name.remove(&self.slots, node);
                Ok(Effect::Delete { node: ix, parent })
            }
            Record::SuspendEntity { entity, .. } | Record::ResumeEntity { entity, .. }
                if !self.has_entity(entity) =>
            {
                Err(Refusal::UnknownEntity(entity.clone()))
            }
            Record::SuspendEntity { entity, .. } => {
                self.row_dirty |= self.suspended.insert(entity.clone());
                Ok(Effect::None)
            }
            Record::ResumeEntity { entity, .. } => {
                self.row_dirty |= self.suspended.remove(entity);
                Ok(Effect::None)
            }
        }
    }

    /// Forgets ids older than the horizon when the memory has doubled since the last sweep.
    pub fn sweep_dedup(&mut self) {
        if self.seen.len() < self.seen_high_water {
            return;
        }
        if let Some(wm) = self.watermark {
            let cut = wm - self.settings.dedup_horizon_secs * 1_000_000;
            self.seen.retain(|_, ts| *ts >= cut);
        }
        self.seen_high_water = (self.seen.len() * 2).max(1024);
    }

    /// Whether a stored dedup batch whose newest id has `max_ts` is past the horizon.
    pub fn dedup_batch_expired(&self, max_ts: Micros) -> bool {
        self.watermark
            .is_some_and(|wm| max_ts < wm - self.settings.dedup_horizon_secs * 1_000_000)
    }

    /// Names of the hierarchies and nodes, for diagnostics and the API.
    pub fn topology(&self) -> BTreeMap<String, usize> {
        self.hierarchies
            .iter()
            .map(|h| (h.name.clone(), h.by_name.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Tenant {
        Tenant::new("t".into(), TenantSettings::default())
    }
    fn up(h: &str, n: &str, p: Option<&str>) -> Record {
        Record::UpsertNode {
            tenant: "t".into(),
            hierarchy: h.into(),
            node: n.into(),
            parent: p.map(Into::into),
        }
    }
    fn del(h: &str, n: &str) -> Record {
        Record::DeleteNode {
            tenant: "t".into(),
            hierarchy: h.into(),
            node: n.into(),
        }
    }
    fn ev(id: &str, e: &str) -> Record {
        Record::Event {
            tenant: "t".into(),
            event_id: id.into(),
            entity: e.into(),
            ts: 0,
            metrics: vec![],
        }
    }
    fn reason(r: Result<Effect, Refusal>) -> &'static str {
        match r {
            Ok(Effect::Duplicate) => "duplicate",
            Ok(_) => "ok",
            Err(e) => e.reason(),
        }
    }

    #[test]
    fn every_state_refusal() {
        let mut t = t();
        assert_eq!(reason(t.apply(&up("h", "b", Some("a")))), "unknown_parent");
        assert_eq!(reason(t.apply(&up("h", "a", None))), "ok");
        assert_eq!(reason(t.apply(&up("h", "b", Some("a")))), "ok");
        assert_eq!(reason(t.apply(&up("h", "a", Some("b")))), "cycle");
        assert_eq!(reason(t.apply(&up("h", "a", Some("a")))), "cycle");
        assert_eq!(reason(t.apply(&del("h", "zz"))), "unknown_node");
        assert_eq!(reason(t.apply(&del("h", "a"))), "has_children");
        assert_eq!(reason(t.apply(&ev("1", "nobody"))), "unknown_entity");
        assert_eq!(
            reason(t.apply(&Record::SuspendEntity {
                tenant: "t".into(),
                entity: "nobody".into()
            })),
            "unknown_entity"
        );
        assert_eq!(
            reason(t.apply(&Record::SuspendEntity {
                tenant: "t".into(),
                entity: "b".into()
            })),
            "ok"
        );
        assert_eq!(reason(t.apply(&ev("1", "b"))), "suspended");
        assert_eq!(
            reason(t.apply(&Record::ResumeEntity {
                tenant: "t".into(),
                entity: "b".into()
            })),
            "ok"
        );
        let tz = |z: &str| Record::DefineTenant {
            tenant: "t".into(),
            timezone: Some(z.into()),
        };
        assert_eq!(reason(t.apply(&tz("Mars/Olympus"))), "unknown_timezone");
        assert_eq!(reason(t.apply(&tz("Asia/Tokyo"))), "ok");
        assert_eq!(reason(t.apply(&ev("1", "b"))), "ok");
        assert_eq!(
            reason(t.apply(&tz("Asia/Tokyo"))),
            "ok",
            "same zone after events is fine"
        );
        assert_eq!(reason(t.apply(&tz("UTC"))), "timezone_locked");
        let hm = |m: Mode| Record::DefineHierarchy {
            tenant: "t".into(),
            hierarchy: "h".into(),
            mode: m,
        };
        assert_eq!(reason(t.apply(&hm(Mode::Current))), "ok");
        assert_eq!(
            reason(t.apply(&hm(Mode::Attributed))),
            "hierarchy_mode_locked"
        );
    }

    #[test]
    fn dedup_counts_only_accepted_ids() {
        let mut t = t();
        t.apply(&up("h", "a", None)).unwrap();
        t.apply(&Record::SuspendEntity {
            tenant: "t".into(),
            entity: "a".into(),
        })
        .unwrap();
        assert_eq!(reason(t.apply(&ev("1", "a"))), "suspended");
        t.apply(&Record::ResumeEntity {
            tenant: "t".into(),
            entity: "a".into(),
        })
        .unwrap();
        assert_eq!(
            reason(t.apply(&ev("1", "a"))),
            "ok",
            "a refused record does not use up its id"
        );
        assert_eq!(reason(t.apply(&ev("1", "a"))), "duplicate");
        t.apply(&Record::SuspendEntity {
            tenant: "t".into(),
            entity: "a".into(),
        })
        .unwrap();
        assert_eq!(
            reason(t.apply(&ev("1", "a"))),
            "suspended",
            "a refused duplicate keeps its reason"
        );
    }

    #[test]
    fn dedup_forgets_only_past_the_horizon() {
        let mut t = t();
        t.settings.dedup_horizon_secs = 10;
        t.apply(&up("h", "a", None)).unwrap();
        let at = |id: &str, s: i64| Record::Event {
            tenant: "t".into(),
            event_id: id.into(),
            entity: "a".into(),
            ts: s * 1_000_000,
            metrics: vec![],
        };
        for i in 0..2000 {
            t.apply(&at(&format!("e{i}"), i)).unwrap();
        }
        t.sweep_dedup();
        assert_eq!(
            reason(t.apply(&at("e1995", 0))),
            "duplicate",
            "inside the horizon"
        );
        assert_eq!(
            reason(t.apply(&at("e5", 0))),
            "ok",
            "past the horizon the id may be forgotten"
        );
    }

    #[test]
    fn delete_and_recreate_reuses_nothing_but_the_name() {
        let mut t = t();
        t.apply(&up("h", "a", None)).unwrap();
        t.apply(&up("h", "b", Some("a"))).unwrap();
        let Effect::Delete { node, parent } = t.apply(&del("h", "b")).unwrap() else {
            panic!()
        };
        assert_eq!(parent, t.node_ix("h", "a"));
        t.release(node);
        assert_eq!(reason(t.apply(&ev("1", "b"))), "unknown_entity");
        assert!(matches!(
            t.apply(&up("h", "b", None)).unwrap(),
            Effect::Create { .. }
        ));
    }
}
