//! The fold: each record applied, by brute force, to a plain in-memory picture of every tenant
//! (docs/SPEC.md sections 1 to 6). Nothing is incremental except what the contract makes
//! incremental: `attributed` subtrees are fixed at acceptance, and retention is decided at
//! acceptance; `current` subtrees are summed from the nodes at the end.

use std::collections::{BTreeMap, BTreeSet};

use jiff::tz::TimeZone;

use crate::json::{self, Num, J};
use crate::time::{self, MICROS_PER_SEC};

pub const GRANULARITIES: [&str; 3] = ["minute", "hour", "day"];
/// Default retention of minute, hour and day buckets behind the watermark (section 6).
pub const RETENTION_SECS: [i64; 3] = [48 * 3600, 35 * 86_400, 400 * 86_400];
const MAX_ID_BYTES: usize = 256;

/// Why a record is refused (section 2). `wrong_key` is Kafka's alone and not modelled.
pub type Reason = &'static str;

/// One metric's numbers; `count` is never 0 (an absent metric has no entry).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    count: u64,
    sum: i128,
    min: i64,
    max: i64,
}

/// AGG of section 4.
#[derive(Debug, Clone, Default, PartialEq)]
struct Agg {
    events: u64,
    metrics: BTreeMap<String, Stat>,
}

impl Agg {
    fn add_event(&mut self, metrics: &BTreeMap<String, i64>) {
        self.events += 1;
        for (name, &v) in metrics {
            let one = Stat {
                count: 1,
                sum: v.into(),
                min: v,
                max: v,
            };
            self.add_stat(name, one);
        }
    }

    fn merge(&mut self, other: &Agg) {
        self.events += other.events;
        for (name, s) in &other.metrics {
            self.add_stat(name, *s);
        }
    }

    fn add_stat(&mut self, name: &str, s: Stat) {
        let e = self.metrics.entry(name.to_string()).or_insert(Stat {
            count: 0,
            sum: 0,
            min: s.min,
            max: s.max,
        });
        e.count += s.count;
        e.sum += s.sum;
        e.min = e.min.min(s.min);
        e.max = e.max.max(s.max);
    }

    fn to_json(&self) -> J {
        let metrics = self
            .metrics
            .iter()
            .map(|(name, s)| {
                let stat = [
                    ("count", J::int(s.count.into())),
                    ("sum", J::int(s.sum)),
                    ("min", J::int(s.min.into())),
                    ("max", J::int(s.max.into())),
                ];
                (name.clone(), obj(stat))
            })
            .collect();
        obj([
            ("events", J::int(self.events.into())),
            ("metrics", J::Obj(metrics)),
        ])
    }
}

fn obj<const N: usize>(fields: [(&str, J); N]) -> J {
    J::Obj(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// Buckets of one granularity by key.
type Buckets = BTreeMap<String, Agg>;

#[derive(Default)]
struct Node {
    parent: Option<String>,
    own: Agg,
    /// Buckets of the node's own events, per granularity (`current` mode sums them up).
    own_buckets: [Buckets; 3],
    /// `attributed` mode: everything counted for this node at acceptance.
    attributed: Agg,
    attributed_buckets: [Buckets; 3],
}

struct Hierarchy {
    attributed: bool,
    nodes: BTreeMap<String, Node>,
}

impl Hierarchy {
    fn children<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a str> {
        self.nodes
            .iter()
            .filter(move |(_, n)| n.parent.as_deref() == Some(node))
            .map(|(id, _)| id.as_str())
    }

    /// The node and its ancestors, nearest first.
    fn chain(&self, node: &str) -> Vec<String> {
        let mut out = vec![node.to_string()];
        while let Some(p) = &self.nodes[out.last().unwrap()].parent {
            out.push(p.clone());
        }
        out
    }

    /// `subtree` and its buckets (section 4).
    fn subtree(&self, node: &str) -> (Agg, [Buckets; 3]) {
        if self.attributed {
            let n = &self.nodes[node];
            return (n.attributed.clone(), n.attributed_buckets.clone());
        }
        let (mut agg, mut buckets) = (Agg::default(), <[Buckets; 3]>::default());
        let mut stack = vec![node];
        while let Some(id) = stack.pop() {
            let n = &self.nodes[id];
            agg.merge(&n.own);
            for (g, own) in n.own_buckets.iter().enumerate() {
                for (key, a) in own {
                    buckets[g].entry(key.clone()).or_default().merge(a);
                }
            }
            stack.extend(self.children(id));
        }
        (agg, buckets)
    }
}

struct Tenant {
    zone_name: String,
    zone: TimeZone,
    had_event: bool,
    hierarchies: BTreeMap<String, Hierarchy>,
    suspended: BTreeSet<String>,
    /// Every accepted event id: the model never forgets (the contract only asks for at least
    /// the dedup horizon; tests whose streams repeat ids later give the engine a long horizon).
    seen: BTreeSet<String>,
    watermark: Option<i64>,
}

impl Default for Tenant {
    fn default() -> Self {
        Tenant {
            zone_name: "UTC".into(),
            zone: TimeZone::UTC,
            had_event: false,
            hierarchies: BTreeMap::new(),
            suspended: BTreeSet::new(),
            seen: BTreeSet::new(),
            watermark: None,
        }
    }
}

impl Tenant {
    fn entity_exists(&self, e: &str) -> bool {
        self.hierarchies.values().any(|h| h.nodes.contains_key(e))
    }
}

/// The model's state after a stream.
#[derive(Default)]
pub struct Model {
    tenants: BTreeMap<String, Tenant>,
    /// Accepted events ignored as duplicates.
    pub duplicates: u64,
}

/// What the model expects from a stream: the dump (one row per node, in dump order), the dead
/// letters as (line, reason), and each tenant's final watermark in ms.
pub struct Expected {
    pub dump: Vec<J>,
    pub dead_letters: Vec<(u64, Reason)>,
    pub watermarks: BTreeMap<String, i64>,
    pub duplicates: u64,
}

/// Folds an NDJSON input (section 9: lines split at `\n`, numbered from 1, blank lines skipped
/// but counted).
pub fn fold(input: &[u8]) -> Expected {
    let mut m = Model::default();
    let mut dead_letters = Vec::new();
    for (i, line) in input.split(|&b| b == b'\n').enumerate() {
        if std::str::from_utf8(line).is_ok_and(|s| s.trim().is_empty()) {
            continue;
        }
        if let Err(reason) = m.apply(line) {
            dead_letters.push((i as u64 + 1, reason));
        }
    }
    Expected {
        dump: m.dump(),
        dead_letters,
        watermarks: m.watermarks(),
        duplicates: m.duplicates,
    }
}

/// An identifier: a non-empty string of at most 256 bytes.
fn id(v: Option<&J>) -> Result<&str, Reason> {
    match v.and_then(J::str) {
        Some(s) if !s.is_empty() && s.len() <= MAX_ID_BYTES => Ok(s),
        _ => Err("malformed"),
    }
}

/// An optional field: absent and `null` are the same.
fn optional<'a>(rec: &'a J, key: &str) -> Option<&'a J> {
    rec.get(key).filter(|v| **v != J::Null)
}

fn metric_name_ok(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c))
}

/// Decodes a record: MessagePack when the first byte marks a map, JSON otherwise (section 1).
fn decode(bytes: &[u8]) -> Option<J> {
    match bytes.first() {
        Some(0x80..=0x8f | 0xde | 0xdf) => json::parse_msgpack(bytes),
        _ => json::parse(std::str::from_utf8(bytes).ok()?),
    }
}

const TYPES: [&str; 7] = [
    "define_tenant",
    "define_hierarchy",
    "upsert_node",
    "delete_node",
    "suspend_entity",
    "resume_entity",
    "event",
];

impl Model {
    /// Applies one record; `Err` is its refusal reason. Checks run in section 2's order: the
    /// shape of the whole record first, then the state.
    pub fn apply(&mut self, bytes: &[u8]) -> Result<(), Reason> {
        let rec = decode(bytes).ok_or("malformed")?;
        let J::Obj(_) = rec else {
            return Err("malformed");
        };
        let typ = rec.get("type").and_then(J::str).ok_or("malformed")?;
        if !TYPES.contains(&typ) {
            return Err("unknown_type");
        }
        let tenant = id(rec.get("tenant"))?.to_string();
        match typ {
            "event" => self.event(&tenant, &rec),
            "define_tenant" => {
                let zone_name = match optional(&rec, "timezone") {
                    None => "UTC",
                    Some(v) => v.str().filter(|s| !s.is_empty()).ok_or("malformed")?,
                };
                let zone = time::zone(zone_name).ok_or("unknown_timezone")?;
                let t = self.tenants.entry(tenant).or_default();
                if t.had_event && t.zone_name != zone_name {
                    return Err("timezone_locked");
                }
                t.zone_name = zone_name.to_string();
                t.zone = zone;
                Ok(())
            }
            "define_hierarchy" => {
                let name = id(rec.get("hierarchy"))?;
                let attributed = match optional(&rec, "mode").map(J::str) {
                    None | Some(Some("current")) => false,
                    Some(Some("attributed")) => true,
                    Some(_) => return Err("malformed"),
                };
                let t = self.tenants.entry(tenant).or_default();
                match t.hierarchies.get(name) {
                    Some(h) if h.attributed != attributed => Err("hierarchy_mode_locked"),
                    Some(_) => Ok(()),
                    None => {
                        t.hierarchies.insert(
                            name.to_string(),
                            Hierarchy {
                                attributed,
                                nodes: BTreeMap::new(),
                            },
                        );
                        Ok(())
                    }
                }
            }
            "upsert_node" => {
                let h_name = id(rec.get("hierarchy"))?;
                let node = id(rec.get("node"))?;
                let parent = optional(&rec, "parent").map(|p| id(Some(p))).transpose()?;
                let h = self
                    .tenants
                    .get(&tenant)
                    .and_then(|t| t.hierarchies.get(h_name));
                if let Some(p) = parent {
                    let Some(h) = h.filter(|h| h.nodes.contains_key(p)) else {
                        return Err("unknown_parent");
                    };
                    // Under itself or under a descendant: the node would be its own ancestor.
                    if h.nodes.contains_key(node) && h.chain(p).iter().any(|a| a == node) {
                        return Err("cycle");
                    }
                }
                let t = self.tenants.entry(tenant).or_default();
                let h = t
                    .hierarchies
                    .entry(h_name.to_string())
                    .or_insert(Hierarchy {
                        attributed: false,
                        nodes: BTreeMap::new(),
                    });
                // A move only changes the pointer: `current` subtrees are summed at the end,
                // `attributed` ones keep what was counted.
                h.nodes.entry(node.to_string()).or_default().parent = parent.map(str::to_string);
                Ok(())
            }
            "delete_node" => {
                let h_name = id(rec.get("hierarchy"))?;
                let node = id(rec.get("node"))?;
                let h = self
                    .tenants
                    .get_mut(&tenant)
                    .and_then(|t| t.hierarchies.get_mut(h_name));
                let Some(h) = h.filter(|h| h.nodes.contains_key(node)) else {
                    return Err("unknown_node");
                };
                if h.children(node).next().is_some() {
                    return Err("has_children");
                }
                h.nodes.remove(node);
                Ok(())
            }
            "suspend_entity" | "resume_entity" => {
                let entity = id(rec.get("entity"))?;
                let t = self
                    .tenants
                    .get_mut(&tenant)
                    .filter(|t| t.entity_exists(entity))
                    .ok_or("unknown_entity")?;
                if typ == "suspend_entity" {
                    t.suspended.insert(entity.to_string());
                } else {
                    t.suspended.remove(entity);
                }
                Ok(())
            }
            _ => unreachable!("every type in TYPES is handled"),
        }
    }

    fn event(&mut self, tenant: &str, rec: &J) -> Result<(), Reason> {
        let event_id = id(rec.get("event_id"))?;
        let entity = id(rec.get("entity"))?;
        let ts = time::parse_ts(rec.get("ts").ok_or("malformed")?).ok_or("malformed")?;
        let metrics = self::metrics(optional(rec, "metrics"))?;
        let t = self
            .tenants
            .get_mut(tenant)
            .filter(|t| t.entity_exists(entity))
            .ok_or("unknown_entity")?;
        if t.suspended.contains(entity) {
            return Err("suspended");
        }
        if !t.seen.insert(event_id.to_string()) {
            self.duplicates += 1;
            return Ok(());
        }
        t.had_event = true;
        let watermark = t.watermark.map_or(ts, |w| w.max(ts));
        t.watermark = Some(watermark);
        let keys = time::bucket_keys(&t.zone, ts);
        // Retention at acceptance (section 6): the watermark moves first.
        let kept: Vec<usize> = (0..3)
            .filter(|&g| watermark - ts <= RETENTION_SECS[g] * MICROS_PER_SEC)
            .collect();
        for h in t.hierarchies.values_mut() {
            if !h.nodes.contains_key(entity) {
                continue;
            }
            let chain = h.chain(entity);
            let n = h.nodes.get_mut(entity).unwrap();
            n.own.add_event(&metrics);
            for &g in &kept {
                n.own_buckets[g]
                    .entry(keys[g].clone())
                    .or_default()
                    .add_event(&metrics);
            }
            if h.attributed {
                for a in &chain {
                    let n = h.nodes.get_mut(a).unwrap();
                    n.attributed.add_event(&metrics);
                    for &g in &kept {
                        n.attributed_buckets[g]
                            .entry(keys[g].clone())
                            .or_default()
                            .add_event(&metrics);
                    }
                }
            }
        }
        Ok(())
    }

    /// Dump rows (section 8), sorted by tenant, hierarchy and node.
    pub fn dump(&self) -> Vec<J> {
        let mut rows = Vec::new();
        for (t_name, t) in &self.tenants {
            for (h_name, h) in &t.hierarchies {
                for (node, n) in &h.nodes {
                    let (subtree, buckets) = h.subtree(node);
                    let buckets = GRANULARITIES
                        .iter()
                        .zip(&buckets)
                        .map(|(g, b)| {
                            (
                                g.to_string(),
                                J::Obj(b.iter().map(|(k, a)| (k.clone(), a.to_json())).collect()),
                            )
                        })
                        .collect();
                    rows.push(obj([
                        ("tenant", J::string(t_name)),
                        ("hierarchy", J::string(h_name)),
                        ("node", J::string(node)),
                        ("parent", n.parent.as_deref().map_or(J::Null, J::string)),
                        ("own", n.own.to_json()),
                        ("subtree", subtree.to_json()),
                        ("buckets", J::Obj(buckets)),
                    ]));
                }
            }
        }
        rows
    }

    /// Each tenant's watermark (ms since the epoch), for tenants with an accepted event.
    pub fn watermarks(&self) -> BTreeMap<String, i64> {
        self.tenants
            .iter()
            .filter_map(|(name, t)| Some((name.clone(), t.watermark?.div_euclid(1000))))
            .collect()
    }
}

/// An event's `metrics` (absent or `null`: none). Any bad name, non-number or integer outside
/// i64 is `malformed`; only then does a fraction or exponent make it `non_integer_metric`.
fn metrics(v: Option<&J>) -> Result<BTreeMap<String, i64>, Reason> {
    let Some(v) = v else {
        return Ok(BTreeMap::new());
    };
    let J::Obj(m) = v else {
        return Err("malformed");
    };
    let mut out = BTreeMap::new();
    let mut fraction = false;
    for (name, v) in m {
        if !metric_name_ok(name) {
            return Err("malformed");
        }
        match v {
            J::Num(Num::Int(i)) => {
                out.insert(name.clone(), i64::try_from(*i).map_err(|_| "malformed")?);
            }
            J::Num(Num::Float(_)) => fraction = true,
            _ => return Err("malformed"),
        }
    }
    if fraction {
        return Err("non_integer_metric");
    }
    Ok(out)
}
