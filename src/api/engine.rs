//! `GET /v1/engine`: the engine panel of the dashboard (issue 26). What an operator watching
//! canopy needs to see at a glance: records taken, the last checkpoint and its age, records
//! waiting for a checkpoint, dead letters by reason, resident node actors, restarts, and a
//! `stale` flag when checkpoints stop while records wait.
//!
//! The numbers come from the engines of this process ([`Stats`], attached by `demo` and `run`)
//! and, for dead letters by reason and consumer lag, from the process's Prometheus recorder
//! (the same numbers `/metrics` shows). `serve` runs no engine: its answer says so.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::Json;
use canopy_actors::stats::Stats;
use serde::Serialize;
use std::sync::atomic::Ordering;
use utoipa::ToSchema;

use super::auth::Access;
use super::error::ApiError;
use super::v1::ErrorAnswer;
use super::ApiState;

/// Records waiting for a checkpoint longer than this (or three checkpoint intervals, if
/// longer) make the engine `stale`: the numbers the API serves stopped following the input.
pub const STALE_FLOOR: Duration = Duration::from_secs(10);

/// How often the watcher looks for a new durable checkpoint: the resolution of its age.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// One engine as the watcher last saw it.
struct Watched {
    stats: Weak<Stats>,
    durable_seq: u64,
    /// `Stats::records` when `durable_seq` was first seen: what that checkpoint covers, near
    /// enough (records taken in the sampling interval count as waiting).
    records_at: u64,
}

#[derive(Default)]
struct Seen {
    engines: Vec<Watched>,
    /// When the newest durable checkpoint of any engine was first seen (wall clock, for the
    /// page; and monotonic, for the age).
    at: Option<(SystemTime, Instant)>,
    /// When the first engine was attached: the age of "no checkpoint yet".
    since: Option<Instant>,
    /// Records taken by the watched engines at each sample of the last [`RATE_WINDOW`].
    taken: std::collections::VecDeque<(Instant, u64)>,
}

/// Records per second are measured over this window (sampled, not the browser's clock: a
/// page polling irregularly still shows the engine's rate).
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// The process's engines, watched for checkpoints. Shared by the engine runner (which
/// attaches) and the API (which reads).
pub struct EngineStatus {
    checkpoint_interval: Duration,
    seen: Mutex<Seen>,
}

impl EngineStatus {
    pub fn new(checkpoint_interval_ms: u64) -> Arc<Self> {
        Arc::new(EngineStatus {
            checkpoint_interval: Duration::from_millis(checkpoint_interval_ms),
            seen: Mutex::new(Seen::default()),
        })
    }

    /// Watches `stats` from now on, until its engine is dropped (weakly held: a Kafka
    /// partition's engine goes at a revoke). Must run inside a tokio runtime: the first attach
    /// starts the watcher task.
    pub fn attach(self: &Arc<Self>, stats: &Arc<Stats>) {
        let mut s = self.seen.lock().expect("engine status lock");
        let first = s.since.is_none();
        s.since.get_or_insert_with(Instant::now);
        s.engines.push(Watched {
            stats: Arc::downgrade(stats),
            durable_seq: stats.durable_seq.load(Ordering::Acquire),
            records_at: stats.records.load(Ordering::Acquire),
        });
        drop(s);
        if first {
            let me = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(WATCH_EVERY);
                while let Some(me) = me.upgrade() {
                    me.sample();
                    drop(me);
                    tick.tick().await;
                }
            });
        }
    }

    /// Notes engines whose durable checkpoint moved, and forgets dropped engines.
    fn sample(&self) {
        let mut s = self.seen.lock().expect("engine status lock");
        let mut moved = false;
        let mut records = 0;
        s.engines.retain_mut(|w| {
            let Some(st) = w.stats.upgrade() else {
                return false;
            };
            records += st.records.load(Ordering::Acquire);
            let seq = st.durable_seq.load(Ordering::Acquire);
            if seq != w.durable_seq {
                w.durable_seq = seq;
                w.records_at = st.records.load(Ordering::Acquire);
                moved = true;
            }
            true
        });
        let now = Instant::now();
        if moved {
            s.at = Some((SystemTime::now(), now));
        }
        while s.taken.front().is_some_and(|(t, _)| now - *t > RATE_WINDOW) {
            s.taken.pop_front();
        }
        s.taken.push_back((now, records));
    }

    /// Records per second over the samples of the window (0 until it spans a second).
    fn rate(s: &Seen) -> u64 {
        match (s.taken.front(), s.taken.back()) {
            (Some((t0, r0)), Some((t1, r1))) if *t1 - *t0 >= Duration::from_secs(1) => {
                (r1.saturating_sub(*r0) as f64 / (*t1 - *t0).as_secs_f64()).round() as u64
            }
            _ => 0,
        }
    }

    fn answer(&self, metrics: Option<&str>) -> EngineAnswer {
        self.sample();
        let s = self.seen.lock().expect("engine status lock");
        let mut a = EngineAnswer {
            engine: s.since.is_some(),
            checkpoint_interval_ms: self.checkpoint_interval.as_millis() as u64,
            records_per_sec: Self::rate(&s),
            ..Default::default()
        };
        for w in &s.engines {
            let Some(st) = w.stats.upgrade() else {
                continue;
            };
            let records = st.records.load(Ordering::Acquire);
            a.records += records;
            a.accepted += st.accepted.load(Ordering::Acquire);
            a.refused += st.refused.load(Ordering::Acquire);
            a.duplicates += st.duplicates.load(Ordering::Acquire);
            a.checkpoints += st.checkpoints.load(Ordering::Acquire);
            a.checkpoint_seq = a.checkpoint_seq.max(w.durable_seq);
            a.records_waiting += records.saturating_sub(w.records_at);
            a.resident_nodes += st.resident_nodes.load(Ordering::Acquire);
            a.node_restarts += st.node_restarts.load(Ordering::Acquire);
            a.tenant_restarts += st.tenant_restarts.load(Ordering::Acquire);
            a.store_retries += st.store_retries.load(Ordering::Acquire);
        }
        let now = Instant::now();
        let age = match (s.at, s.since) {
            (Some((wall, at)), _) => {
                a.checkpoint_at_ms = wall
                    .duration_since(UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_millis() as u64);
                Some(now - at)
            }
            (None, Some(since)) => Some(now - since),
            (None, None) => None,
        };
        a.checkpoint_age_ms = age.map(|d| d.as_millis() as u64);
        a.stale = a.engine
            && age.is_some_and(|age| is_stale(age, self.checkpoint_interval, a.records_waiting));
        if let Some(text) = metrics {
            a.dead_letters = by_label(text, "canopy_dead_letters_total", "reason");
            a.consumer_lag = sum_of(text, "canopy_consumer_lag");
        }
        a
    }
}

/// Stale: records wait for a checkpoint, and none has landed for three checkpoint intervals
/// (at least [`STALE_FLOOR`]). An idle engine takes no checkpoints and is not stale.
pub fn is_stale(age: Duration, interval: Duration, records_waiting: u64) -> bool {
    records_waiting > 0 && age > (interval * 3).max(STALE_FLOOR)
}

/// The samples of `family` in Prometheus text, as (labels, value), NaN skipped.
fn samples<'a>(text: &'a str, family: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |l| {
        let rest = l.strip_prefix(family)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let v: f64 = value.trim().parse().ok()?;
        (!v.is_nan()).then_some((labels, v))
    })
}

/// A counter's samples summed by one label's value.
fn by_label(text: &str, family: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let key = format!("{label}=\"");
    for (labels, v) in samples(text, family) {
        let Some(start) = labels.find(&key) else {
            continue;
        };
        let rest = &labels[start + key.len()..];
        let Some(end) = rest.find('"') else { continue };
        *out.entry(rest[..end].to_string()).or_default() += v as u64;
    }
    out
}

/// A gauge summed over its series; None when it has none (no Kafka partition, or lag unknown).
fn sum_of(text: &str, family: &str) -> Option<u64> {
    let mut any = false;
    let total: f64 = samples(text, family)
        .inspect(|_| any = true)
        .map(|(_, v)| v.max(0.0))
        .sum();
    any.then_some(total as u64)
}

/// The engine panel's numbers. Counts are summed over the process's engines (one for `demo`,
/// one per owned partition for `run`, none for `serve`).
#[derive(Serialize, ToSchema, Default, Debug)]
pub struct EngineAnswer {
    /// False in `serve`, which only reads the store: the other numbers are then zero.
    pub engine: bool,
    pub records: u64,
    /// Records taken per second over the last 5 s.
    pub records_per_sec: u64,
    pub accepted: u64,
    pub refused: u64,
    pub duplicates: u64,
    pub checkpoints: u64,
    /// The newest durable checkpoint (the `as_of` of the answers that read it).
    pub checkpoint_seq: u64,
    /// When it was seen to land (ms since the epoch); null before the first.
    pub checkpoint_at_ms: Option<u64>,
    /// Since it landed (or since the engine started, before the first); null without engine.
    pub checkpoint_age_ms: Option<u64>,
    pub checkpoint_interval_ms: u64,
    /// Records taken but not yet covered by a durable checkpoint.
    pub records_waiting: u64,
    /// Records wait and no checkpoint landed for 3 intervals (at least 10 s).
    pub stale: bool,
    /// Refused records by reason, since the process started.
    pub dead_letters: BTreeMap<String, u64>,
    /// Kafka records not yet processed, over the owned partitions; null when unknown.
    pub consumer_lag: Option<u64>,
    pub resident_nodes: u64,
    pub node_restarts: u64,
    pub tenant_restarts: u64,
    pub store_retries: u64,
}

/// Any valid token may read it: the numbers are the process's, with no tenant's ids or data.
#[utoipa::path(get, path = "/v1/engine", security(("bearer" = [])),
    responses((status = 200, body = EngineAnswer), (status = 401, body = ErrorAnswer)))]
pub async fn engine(
    State(st): State<Arc<ApiState>>,
    _access: Access,
) -> Result<Json<EngineAnswer>, ApiError> {
    let text = st.metrics.as_ref().map(|h| h.render());
    Ok(Json(st.engine.answer(text.as_deref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_only_while_records_wait_past_three_intervals_or_the_floor() {
        let s = Duration::from_secs;
        assert!(!is_stale(s(3600), s(1), 0), "an idle engine is not stale");
        assert!(!is_stale(s(9), s(1), 5), "within the floor");
        assert!(is_stale(s(11), s(1), 5));
        assert!(!is_stale(s(50), s(20), 5), "within three intervals");
        assert!(is_stale(s(61), s(20), 5));
    }

    #[test]
    fn reads_counters_by_label_and_gauges_summed() {
        let text = "# TYPE canopy_dead_letters_total counter\n\
            canopy_dead_letters_total{reason=\"suspended\"} 7\n\
            canopy_dead_letters_total{reason=\"malformed\"} 2\n\
            canopy_dead_letters_total_x{reason=\"other\"} 9\n\
            canopy_consumer_lag{partition=\"0\"} 5\n\
            canopy_consumer_lag{partition=\"1\"} NaN\n\
            canopy_consumer_lag{partition=\"2\"} 3\n";
        let d = by_label(text, "canopy_dead_letters_total", "reason");
        assert_eq!(d.len(), 2);
        assert_eq!(d["suspended"], 7);
        assert_eq!(d["malformed"], 2);
        assert_eq!(sum_of(text, "canopy_consumer_lag"), Some(8));
        assert_eq!(sum_of(text, "canopy_nothing"), None);
    }

    #[tokio::test]
    async fn a_durable_checkpoint_resets_the_age_and_the_waiting_records() {
        let status = EngineStatus::new(1000);
        let none = status.answer(None);
        assert!(!none.engine && none.checkpoint_age_ms.is_none());
        let stats = Arc::new(Stats::default());
        status.attach(&stats);
        stats.records.store(10, Ordering::Release);
        let a = status.answer(None);
        assert!(a.engine && a.records_waiting == 10 && a.checkpoint_at_ms.is_none());
        stats.durable_seq.store(1, Ordering::Release);
        let a = status.answer(None);
        assert_eq!((a.checkpoint_seq, a.records_waiting), (1, 0));
        assert!(a.checkpoint_at_ms.is_some() && a.checkpoint_age_ms.unwrap() < 1000);
        drop(stats);
        assert_eq!(
            status.answer(None).records,
            0,
            "a dropped engine is forgotten"
        );
    }

    #[test]
    fn the_rate_spans_the_window() {
        let t = Instant::now();
        let mut s = Seen::default();
        assert_eq!(EngineStatus::rate(&s), 0);
        s.taken.push_back((t, 100));
        s.taken.push_back((t + Duration::from_millis(500), 600));
        assert_eq!(EngineStatus::rate(&s), 0, "less than a second");
        s.taken.push_back((t + Duration::from_secs(2), 4100));
        assert_eq!(EngineStatus::rate(&s), 2000);
    }
}
