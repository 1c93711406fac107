//! `canopy loadgen`: a synthetic multi-tenant workload as NDJSON.
//!
//! Each tenant gets `hierarchies` trees of `depth` levels and `fanout` children per node (the
//! second and later hierarchies reuse the same entities under shuffled parents, so one event counts
//! in several hierarchies), then a stream of events with occasional moves, deletes, re-creations,
//! suspensions, duplicates and bad records. The same seed gives the same stream.

use std::io::Write;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct LoadgenConfig {
    pub seed: u64,
    pub tenants: usize,
    pub hierarchies: usize,
    pub depth: usize,
    pub fanout: usize,
    pub events: usize,
    /// Share of records after the set-up that change the hierarchy (moves, deletes, re-creations).
    pub churn: f64,
    /// Share of records that are refused (malformed, unknown entity, bad metric...).
    pub bad: f64,
    /// Share of events that repeat an earlier event id.
    pub duplicates: f64,
    /// Share of records that suspend or resume an entity.
    pub suspensions: f64,
    /// Event-time span of the stream, in seconds.
    pub span_secs: i64,
    /// Share of events that arrive late: their `ts` is up to `late_max_secs` behind the stream's
    /// event time (late beyond a granularity's retention, they count in totals only).
    pub late: f64,
    pub late_max_secs: i64,
    /// Below 1: events go to this share of the leaves only, spread evenly over each tree (most
    /// nodes of a large platform are idle at any moment).
    pub active: f64,
    /// Event time of the first event (ms since the epoch).
    pub start_ms: i64,
    /// Whether some hierarchies are `attributed`.
    pub attributed: bool,
    /// Events carry the wall-clock time instead of spreading over `span_secs` (the demo).
    pub live: bool,
    /// Churn and suspensions that keep the system's shape (the demo, issue 26): at most
    /// [`LoadgenConfig::steady_cap`] entities suspended per tenant and nodes deleted per
    /// hierarchy, only leaves deleted, and moves within a level. Without it, random
    /// suspend/resume and deletes accumulate: the refused share grows and the trees shrink
    /// the longer the stream runs.
    pub steady: bool,
}

impl Default for LoadgenConfig {
    fn default() -> Self {
        LoadgenConfig {
            seed: 1,
            tenants: 5,
            hierarchies: 1,
            depth: 7,
            fanout: 5,
            events: 1_000_000,
            churn: 0.0005,
            bad: 0.001,
            duplicates: 0.001,
            suspensions: 0.0005,
            span_secs: 2 * 3600,
            late: 0.0,
            late_max_secs: 0,
            active: 1.0,
            // 2026-11-01T04:30:00Z: the stream crosses New York's fall-back at 06:00Z.
            start_ms: 1_793_507_400_000,
            attributed: true,
            live: false,
            steady: false,
        }
    }
}

const ZONES: [&str; 6] = [
    "UTC",
    "America/New_York",
    "Asia/Tokyo",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
];

struct Hier {
    name: String,
    /// node index → parent index (None = root); `alive[i]` says whether the node exists.
    parent: Vec<Option<usize>>,
    alive: Vec<bool>,
}

impl Hier {
    fn is_ancestor(&self, a: usize, mut n: usize) -> bool {
        while let Some(p) = self.parent[n] {
            if p == a {
                return true;
            }
            n = p;
        }
        false
    }
    fn has_children(&self, n: usize) -> bool {
        self.parent
            .iter()
            .enumerate()
            .any(|(i, p)| *p == Some(n) && self.alive[i])
    }
}

struct TenantGen {
    id: String,
    nodes: usize,
    hiers: Vec<Hier>,
    next_event: u64,
    /// With `steady`: the entities suspended now.
    suspended: Vec<usize>,
}

fn node_name(t: &str, i: usize) -> String {
    format!("{t}-n{i}")
}

impl LoadgenConfig {
    /// Nodes of one hierarchy tree (levels `0..depth`, `fanout` children each).
    /// Nodes of a tree's last level.
    pub fn leaves_per_tree(&self) -> usize {
        self.fanout.max(1).pow(self.depth.saturating_sub(1) as u32)
    }

    pub fn nodes_per_tree(&self) -> usize {
        (0..self.depth).map(|l| self.fanout.pow(l as u32)).sum()
    }

    /// With `steady`: the most entities suspended at once per tenant, and the most nodes
    /// deleted at once per hierarchy (a few per thousand nodes).
    pub fn steady_cap(&self) -> usize {
        (self.nodes_per_tree() / 500).max(1)
    }

    /// Nodes of the whole stream: every tenant's every hierarchy.
    pub fn nodes(&self) -> usize {
        self.tenants * self.hierarchies * self.nodes_per_tree()
    }
}

/// Writes the stream to a new file at `path`; returns the number of records written.
pub fn generate_file(cfg: &LoadgenConfig, path: &std::path::Path) -> std::io::Result<u64> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    let n = generate(cfg, &mut w)?;
    w.flush()?;
    Ok(n)
}

/// Writes the stream; returns the number of records written.
pub fn generate(cfg: &LoadgenConfig, out: &mut impl Write) -> std::io::Result<u64> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut n = 0u64;
    let mut line = |out: &mut dyn Write, v: serde_json::Value| -> std::io::Result<()> {
        serde_json::to_writer(&mut *out, &v)?;
        out.write_all(b"\n")?;
        n += 1;
        Ok(())
    };
    let per_tree = cfg.nodes_per_tree();
    let mut tenants = Vec::new();
    for ti in 0..cfg.tenants {
        let id = format!("t{ti}");
        let zone = ZONES[(cfg.seed as usize + ti) % ZONES.len()];
        line(
            out,
            json!({"type": "define_tenant", "tenant": id, "timezone": zone}),
        )?;
        let mut hiers = Vec::new();
        for hi in 0..cfg.hierarchies {
            let name = format!("h{hi}");
            let mode = if cfg.attributed && hi % 2 == 1 {
                "attributed"
            } else {
                "current"
            };
            line(
                out,
                json!({"type": "define_hierarchy", "tenant": id, "hierarchy": name, "mode": mode}),
            )?;
            // Breadth-first numbering: node i's parent is (i-1)/fanout in the first hierarchy;
            // later hierarchies pick a random node of the previous level.
            let mut parent = vec![None; per_tree];
            let mut level_start = 0;
            let mut level_len = 1;
            while level_start + level_len < per_tree {
                let next_start = level_start + level_len;
                let next_len = (level_len * cfg.fanout).min(per_tree - next_start);
                for i in next_start..next_start + next_len {
                    parent[i] = Some(if hi == 0 {
                        (i - 1) / cfg.fanout
                    } else {
                        level_start + rng.random_range(0..level_len)
                    });
                }
                level_start = next_start;
                level_len = next_len;
            }
            for (i, p) in parent.iter().enumerate() {
                let mut rec = json!({"type": "upsert_node", "tenant": id, "hierarchy": name, "node": node_name(&id, i)});
                if let Some(p) = p {
                    rec["parent"] = json!(node_name(&id, *p));
                }
                line(out, rec)?;
            }
            hiers.push(Hier {
                name,
                alive: vec![true; per_tree],
                parent,
            });
        }
        tenants.push(TenantGen {
            id,
            nodes: per_tree,
            hiers,
            next_event: 0,
            suspended: Vec::new(),
        });
    }
    let mut recent: Vec<(usize, String, String, serde_json::Value)> = Vec::new();
    for e in 0..cfg.events {
        let ti = rng.random_range(0..tenants.len());
        let t = &mut tenants[ti];
        let mut ts_ms = if cfg.live {
            jiff::Timestamp::now().as_millisecond()
        } else {
            cfg.start_ms + (e as i64 * cfg.span_secs * 1000) / cfg.events.max(1) as i64
        };
        // Drawn only when asked for, so that streams without late events stay what they were.
        if cfg.late > 0.0 && rng.random_bool(cfg.late.min(1.0)) {
            ts_ms -= rng.random_range(0..=cfg.late_max_secs.max(0) * 1000);
        }
        let r: f64 = rng.random();
        if r < cfg.bad {
            line(out, bad_record(&mut rng, &t.id))?;
            continue;
        }
        let r = r - cfg.bad;
        if r < cfg.churn {
            if cfg.steady {
                steady_churn(&mut rng, cfg, t, &mut line, out)?;
            } else {
                churn(&mut rng, t, &mut line, out)?;
            }
            continue;
        }
        let r = r - cfg.churn;
        if r < cfg.suspensions && cfg.steady {
            // Suspend up to the cap, then resume one of those suspended: the suspended share
            // stays at the cap instead of drifting towards half of the entities.
            let (typ, ent) = if t.suspended.len() < cfg.steady_cap() {
                let e = rng.random_range(0..t.nodes);
                if !t.suspended.contains(&e) {
                    t.suspended.push(e);
                }
                ("suspend_entity", e)
            } else {
                let k = rng.random_range(0..t.suspended.len());
                ("resume_entity", t.suspended.swap_remove(k))
            };
            line(
                out,
                json!({"type": typ, "tenant": t.id, "entity": node_name(&t.id, ent)}),
            )?;
            continue;
        }
        if r < cfg.suspensions {
            let ent = node_name(&t.id, rng.random_range(0..t.nodes));
            let typ = if rng.random_bool(0.5) {
                "suspend_entity"
            } else {
                "resume_entity"
            };
            line(out, json!({"type": typ, "tenant": t.id, "entity": ent}))?;
            continue;
        }
        let r = r - cfg.suspensions;
        if r < cfg.duplicates && !recent.is_empty() {
            let (_, tid, both, ts) = recent[rng.random_range(0..recent.len())].clone();
            let (eid, ent) = both.split_once('|').expect("id|entity");
            line(
                out,
                json!({"type": "event", "tenant": tid, "event_id": eid, "entity": ent, "ts": ts}),
            )?;
            continue;
        }
        t.next_event += 1;
        let eid = format!("e{}", t.next_event);
        // Mostly leaves and lower levels, like real sales: pick uniformly among all nodes (or
        // among the active leaves).
        let ent = if cfg.active < 1.0 {
            let leaves = cfg.leaves_per_tree();
            let active = ((leaves as f64 * cfg.active).ceil() as usize).clamp(1, leaves);
            let k = rng.random_range(0..active);
            node_name(&t.id, t.nodes - leaves + k * (leaves / active))
        } else {
            node_name(&t.id, rng.random_range(0..t.nodes))
        };
        let ts = match rng.random_range(0..4) {
            0 => json!(ts_ms),
            1 => json!(rfc3339(ts_ms, 0, rng.random_bool(0.5))),
            2 => json!(rfc3339(ts_ms, 9 * 3600, false)),
            _ => json!(rfc3339(ts_ms, -(5 * 3600 + 30 * 60), true)),
        };
        let mut metrics = serde_json::Map::new();
        metrics.insert("amount".into(), json!(rng.random_range(-1000i64..100_000)));
        if rng.random_bool(0.5) {
            metrics.insert("items".into(), json!(rng.random_range(0..10)));
        }
        if rng.random_bool(0.01) {
            metrics.insert(
                "big".into(),
                json!(if rng.random_bool(0.5) {
                    i64::MAX
                } else {
                    i64::MIN
                }),
            );
        }
        let rec = json!({"type": "event", "tenant": t.id, "event_id": eid, "entity": ent, "ts": ts, "metrics": metrics});
        if recent.len() < 64 {
            recent.push((ti, t.id.clone(), format!("{eid}|{ent}"), rec["ts"].clone()));
        } else if rng.random_bool(0.05) {
            let k = rng.random_range(0..recent.len());
            recent[k] = (ti, t.id.clone(), format!("{eid}|{ent}"), rec["ts"].clone());
        }
        line(out, rec)?;
    }
    Ok(n)
}

fn rfc3339(ms: i64, offset_secs: i64, frac: bool) -> String {
    let local = ms / 1000 + offset_secs;
    let days = local.div_euclid(86_400);
    let secs = local.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    );
    if frac {
        s.push_str(&format!(".{:03}", ms.rem_euclid(1000)));
    }
    if offset_secs == 0 {
        s.push('Z');
    } else {
        let a = offset_secs.abs();
        s.push_str(&format!(
            "{}{:02}:{:02}",
            if offset_secs < 0 { '-' } else { '+' },
            a / 3600,
            (a % 3600) / 60
        ));
    }
    s
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn churn(
    rng: &mut StdRng,
    t: &mut TenantGen,
    line: &mut impl FnMut(&mut dyn Write, serde_json::Value) -> std::io::Result<()>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let hi = rng.random_range(0..t.hiers.len());
    let h = &mut t.hiers[hi];
    let n = rng.random_range(1..t.nodes);
    let name = node_name(&t.id, n);
    match rng.random_range(0..10) {
        // Delete (a leaf, usually); a node with children gets `has_children`.
        0..=1 => {
            line(
                out,
                json!({"type": "delete_node", "tenant": t.id, "hierarchy": h.name, "node": name}),
            )?;
            if h.alive[n] && !h.has_children(n) {
                h.alive[n] = false;
            }
        }
        // Re-create a deleted node (or move an existing one) under a random live node.
        _ => {
            let p = rng.random_range(0..t.nodes);
            line(
                out,
                json!({"type": "upsert_node", "tenant": t.id, "hierarchy": h.name, "node": name, "parent": node_name(&t.id, p)}),
            )?;
            let valid = h.alive[p] && p != n && !(h.alive[n] && h.is_ancestor(n, p));
            if valid {
                h.alive[n] = true;
                h.parent[n] = Some(p);
            }
        }
    }
    Ok(())
}

/// The first node index of each level of a tree, and the level's length.
fn levels(cfg: &LoadgenConfig) -> Vec<(usize, usize)> {
    let per_tree = cfg.nodes_per_tree();
    let (mut out, mut start, mut len) = (Vec::new(), 0, 1);
    while start < per_tree {
        let l = len.min(per_tree - start);
        out.push((start, l));
        start += l;
        len *= cfg.fanout.max(1);
    }
    out
}

/// Churn that keeps the trees' shape: a leaf deleted while fewer than the cap are, else a
/// deleted node re-created, or a node moved under another node of its parent's level. Every
/// record is valid for the engine (no `has_children` or `cycle` refusals from churn).
fn steady_churn(
    rng: &mut StdRng,
    cfg: &LoadgenConfig,
    t: &mut TenantGen,
    line: &mut impl FnMut(&mut dyn Write, serde_json::Value) -> std::io::Result<()>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let lv = levels(cfg);
    if lv.len() < 2 {
        return Ok(());
    }
    let level_of = |i: usize| lv.iter().rposition(|(s, _)| *s <= i).expect("a level");
    let hi = rng.random_range(0..t.hiers.len());
    let h = &mut t.hiers[hi];
    // A random live node of level `l`, if one is found in a few tries.
    let live_at = |h: &Hier, rng: &mut StdRng, l: usize| {
        let (s, n) = lv[l];
        (0..16)
            .map(|_| s + rng.random_range(0..n))
            .find(|&i| h.alive[i])
    };
    let deleted: Vec<usize> = (lv[1].0..t.nodes).filter(|&i| !h.alive[i]).collect();
    let rec = match rng.random_range(0..10) {
        0..=3 if deleted.len() < cfg.steady_cap() => {
            let leaf = (0..16)
                .map(|_| rng.random_range(lv[1].0..t.nodes))
                .find(|&i| h.alive[i] && !h.has_children(i));
            leaf.map(|n| {
                h.alive[n] = false;
                json!({"type": "delete_node", "tenant": t.id, "hierarchy": h.name, "node": node_name(&t.id, n)})
            })
        }
        0..=3 => {
            let n = deleted[rng.random_range(0..deleted.len())];
            live_at(h, rng, level_of(n) - 1).map(|p| {
                h.alive[n] = true;
                h.parent[n] = Some(p);
                json!({"type": "upsert_node", "tenant": t.id, "hierarchy": h.name, "node": node_name(&t.id, n), "parent": node_name(&t.id, p)})
            })
        }
        _ => {
            let n = rng.random_range(lv[1].0..t.nodes);
            let p = live_at(h, rng, level_of(n) - 1);
            match p {
                // A parent one level up cannot be below `n`: no cycle.
                Some(p) if h.alive[n] && h.parent[n] != Some(p) => {
                    h.parent[n] = Some(p);
                    Some(
                        json!({"type": "upsert_node", "tenant": t.id, "hierarchy": h.name, "node": node_name(&t.id, n), "parent": node_name(&t.id, p)}),
                    )
                }
                _ => None,
            }
        }
    };
    match rec {
        Some(r) => line(out, r),
        None => Ok(()),
    }
}

fn bad_record(rng: &mut StdRng, t: &str) -> serde_json::Value {
    match rng.random_range(0..8) {
        0 => json!("just a string"),
        1 => json!({"type": "teleport", "tenant": t}),
        2 => json!({"type": "event", "tenant": t, "event_id": "x", "entity": "nobody", "ts": 0}),
        3 => {
            json!({"type": "event", "tenant": t, "event_id": "x", "entity": format!("{t}-n0"), "ts": 0, "metrics": {"amount": 12.5}})
        }
        4 => {
            json!({"type": "event", "tenant": t, "event_id": "x", "entity": format!("{t}-n0"), "ts": "yesterday"})
        }
        5 => json!({"type": "define_tenant", "tenant": t, "timezone": "Mars/Olympus"}),
        6 => {
            json!({"type": "upsert_node", "tenant": t, "hierarchy": "h0", "node": "x", "parent": "nobody"})
        }
        _ => {
            json!({"type": "event", "tenant": t, "event_id": "x", "entity": format!("{t}-n0"), "ts": 0, "metrics": {"bad name!": 1}})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0, 0, false), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(1_793_507_400_123, 9 * 3600, true),
            "2026-11-01T13:30:00.123+09:00"
        );
        assert_eq!(
            rfc3339(1_793_507_400_000, -(5 * 3600 + 1800), false),
            "2026-10-31T23:00:00-05:30"
        );
    }

    #[test]
    fn same_seed_same_stream() {
        let cfg = LoadgenConfig {
            events: 500,
            depth: 3,
            fanout: 3,
            tenants: 2,
            ..Default::default()
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        generate(&cfg, &mut a).unwrap();
        generate(&cfg, &mut b).unwrap();
        assert_eq!(a, b);
        let c2 = LoadgenConfig { seed: 2, ..cfg };
        let mut c = Vec::new();
        generate(&c2, &mut c).unwrap();
        assert_ne!(a, c);
    }
}
