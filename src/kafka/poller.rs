//! The consumer thread. It owns the rdkafka `BaseConsumer`, polls in batches, and hands each
//! partition's records to the runner over a bounded channel. When that channel is full it
//! pauses the assigned partitions (and keeps polling, so the group session stays alive)
//! instead of buffering without limit.
//!
//! Rebalances run inside `poll` on this thread (eager protocol): on revoke, the context asks
//! the runner to checkpoint and close the revoked partitions and waits for it, then commits
//! the offsets those checkpoints made durable before the partitions are released.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canopy_actors::record::{decode, Refusal};
use canopy_actors::source::{Input, Origin};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Records of one partition, in offset order.
pub struct Batch {
    pub partition: i32,
    pub inputs: Vec<Input>,
    /// The offset after the batch's last record.
    pub next_offset: i64,
}

/// What the consumer thread asks of the runner during a rebalance.
pub enum Control {
    /// Checkpoint and close these partitions, then reply with the offsets to commit.
    Revoke {
        partitions: Vec<i32>,
        reply: std_mpsc::SyncSender<Vec<(i32, i64)>>,
    },
    Assign {
        partitions: Vec<i32>,
    },
}

pub struct RunContext {
    pub topic: String,
    pub control: mpsc::UnboundedSender<Control>,
    /// Bumped on every revoke: batches buffered under an older epoch are dropped.
    pub epoch: AtomicU64,
    /// Whether the poll loop has paused the assignment for backpressure.
    pub paused: AtomicBool,
    pub revoke_timeout: Duration,
}

impl ClientContext for RunContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // End of a partition (`enable.partition.eof`) comes through here too; it is not an
        // error, and `poll_loop` reads it from `poll`.
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            return;
        }
        // librdkafka reconnects by itself; say so, loudly enough to be seen.
        metrics::counter!("canopy_kafka_errors_total").increment(1);
        warn!(%error, reason, "kafka client error (librdkafka retries with backoff)");
    }
}

fn partitions_of(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    tpl.elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect()
}

impl ConsumerContext for RunContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        self.epoch.fetch_add(1, Ordering::SeqCst);
        metrics::counter!("canopy_rebalances_total", "kind" => "revoke").increment(1);
        let partitions = partitions_of(tpl, &self.topic);
        // librdkafka keeps an application pause on a partition across a revoke and a later
        // assignment (it resets only its own rebalance pause), so a partition paused for
        // backpressure now would never be fetched again once assigned back. Lift the pause
        // here, before release: a resume right after an assignment would be worse, because
        // it bumps the partition's op version and librdkafka then drops the replies of the
        // assignment's own start-up requests (the partition never starts fetching).
        if self.paused.swap(false, Ordering::SeqCst) {
            if let Err(error) = consumer.resume(tpl) {
                warn!(%error, ?partitions, "lifting the backpressure pause before release failed");
            }
        }
        info!(
            ?partitions,
            "partitions revoked: checkpointing them before release"
        );
        let (reply, rx) = std_mpsc::sync_channel(1);
        if self
            .control
            .send(Control::Revoke { partitions, reply })
            .is_err()
        {
            return;
        }
        match rx.recv_timeout(self.revoke_timeout) {
            Ok(offsets) => {
                if let Err(e) = commit(consumer, &self.topic, &offsets, CommitMode::Sync) {
                    warn!(error = %e, "committing revoked partitions' offsets failed (the stores hold them)");
                }
            }
            Err(_) => warn!(
                "revoked partitions were not checkpointed in time; the next owner resumes from their stores"
            ),
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            metrics::counter!("canopy_rebalances_total", "kind" => "assign").increment(1);
            let partitions = partitions_of(tpl, &self.topic);
            info!(?partitions, "partitions assigned");
            let _ = self.control.send(Control::Assign { partitions });
        }
    }
}

pub fn commit(
    consumer: &BaseConsumer<RunContext>,
    topic: &str,
    offsets: &[(i32, i64)],
    mode: CommitMode,
) -> Result<(), KafkaError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    consumer.commit(&tpl, mode)
}

/// How often durable offsets are committed to the group (see `poll_loop`).
const COMMIT_EVERY: Duration = Duration::from_secs(5);

/// How often restored shards' offsets are compared with the group's (a failed lookup is
/// retried this much later).
const RESTORE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long a lookup of the group's committed offsets may block the poll loop.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(5);

/// The restored shards (partition → the offset its store covers) whose group offset is behind
/// that offset, or unset; they are taken out of `restored`, and so are partitions no longer
/// owned. Why: a shard restored at the end of its partition processes nothing new, so no
/// checkpoint would ever commit for it, and every lag monitor (they read committed offsets)
/// would report the whole partition as lag for good (issue 24: `-1001` after a restart).
/// The check keeps a group offset that is already ahead where it is.
fn behind_the_stores(
    consumer: &BaseConsumer<RunContext>,
    topic: &str,
    restored: &mut BTreeMap<i32, i64>,
) -> Vec<(i32, i64)> {
    let owned: Vec<i32> = consumer
        .assignment()
        .map(|a| partitions_of(&a, topic))
        .unwrap_or_default();
    restored.retain(|p, o| owned.contains(p) && *o > 0);
    if restored.is_empty() {
        return Vec::new();
    }
    let mut tpl = TopicPartitionList::new();
    for p in restored.keys() {
        tpl.add_partition(topic, *p);
    }
    let committed = match consumer.committed_offsets(tpl, COMMITTED_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "reading the group's committed offsets failed (retried)");
            return Vec::new();
        }
    };
    let mut due = Vec::new();
    for e in committed.elements_for_topic(topic) {
        if e.error().is_err() {
            continue; // retried at the next check
        }
        let Some(stored) = restored.remove(&e.partition()) else {
            continue;
        };
        let behind = match e.offset() {
            Offset::Offset(o) => o < stored,
            _ => true, // never committed
        };
        if behind {
            info!(partition = e.partition(), committed = ?e.offset(), stored,
                "the group's offset is behind the restored store: committing the store's");
            due.push((e.partition(), stored));
        }
    }
    due
}

/// How long the consumer thread waits for the runner before pausing the partitions.
const PAUSE_AFTER: Duration = Duration::from_secs(2);

pub struct PollerConfig {
    pub topic: String,
    pub batch_size: usize,
    pub linger: Duration,
}

/// Shared with the runner: the newest high watermark seen per partition (for lag), only for
/// partitions that a fetch has reported on since their assignment (see `poll_loop`).
pub type Watermarks = Arc<Mutex<BTreeMap<i32, i64>>>;

pub struct PollerHandles {
    pub data: mpsc::Sender<Batch>,
    /// Offsets made durable by checkpoints, to commit.
    pub commits: std_mpsc::Receiver<Vec<(i32, i64)>>,
    /// The offset each shard restored from its store, to commit if the group is behind it
    /// (see [`behind_the_stores`]).
    pub restored: std_mpsc::Receiver<(i32, i64)>,
    pub stop: Arc<AtomicBool>,
    pub watermarks: Watermarks,
}

fn input(
    m: &rdkafka::message::BorrowedMessage<'_>,
    origin: &mut Option<(i32, Arc<Origin>)>,
) -> Input {
    let raw = m.payload().unwrap_or_default().to_vec();
    let key = m.key().map(<[u8]>::to_vec);
    let mut decoded = decode(&raw);
    if let Ok(rec) = &decoded {
        if key.as_deref() != Some(rec.tenant().as_bytes()) {
            decoded = Err(Refusal::WrongKey {
                key: String::from_utf8_lossy(key.as_deref().unwrap_or_default()).into_owned(),
                tenant: rec.tenant().to_string(),
            });
        }
    }
    // Records of one partition share their topic and partition; only the key differs.
    let o = Arc::new(Origin {
        topic: m.topic().to_string(),
        partition: m.partition(),
        key,
    });
    *origin = Some((m.partition(), o.clone()));
    Input {
        tag: m.offset() as u64,
        origin: Some(o),
        raw,
        decoded,
    }
}

/// The high watermark the last fetch response reported. A `ListOffsets` request instead
/// (`fetch_watermarks`) queues behind the broker's long-polling fetches and times out.
fn cached_high_watermark(consumer: &BaseConsumer<RunContext>, topic: &str, p: i32) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; the call only reads
    // librdkafka's cached partition state into the two out-parameters.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            p,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// Backpressure by partition pause/resume, shaped around two librdkafka behaviours:
/// - Pausing or resuming a partition bumps its op version, and replies to older requests are
///   then dropped. A partition still starting up (its committed offset being fetched) that is
///   paused and resumed never starts fetching. So only partitions that have delivered a
///   record since their assignment are paused; one still starting is paused on its first
///   record if backpressure is still on (the memory this costs is bounded by librdkafka's
///   prefetch, `queued.max.messages.kbytes`).
/// - An application pause survives a revoke and a new assignment. The revoke callback lifts
///   it (`RunContext::paused`), before release.
#[derive(Default)]
struct Pauses {
    /// Partitions that delivered a record since the last rebalance.
    delivered: std::collections::BTreeSet<i32>,
    /// Partitions this loop has paused.
    paused: std::collections::BTreeSet<i32>,
}

impl Pauses {
    fn tpl(topic: &str, ps: impl IntoIterator<Item = i32>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for p in ps {
            tpl.add_partition(topic, p);
        }
        tpl
    }

    /// Backpressure on: pause every started partition not paused yet.
    fn pause(&mut self, consumer: &BaseConsumer<RunContext>, topic: &str) {
        let ps: Vec<i32> = self.delivered.difference(&self.paused).copied().collect();
        if !consumer.context().paused.swap(true, Ordering::SeqCst) {
            metrics::counter!("canopy_kafka_pauses_total").increment(1);
            debug!(partitions = ?ps, "engine busy: partitions paused");
        }
        if ps.is_empty() {
            return;
        }
        if let Err(error) = consumer.pause(&Self::tpl(topic, ps.iter().copied())) {
            warn!(%error, "pausing partitions failed");
        }
        self.paused.extend(ps);
    }

    /// A record from `p`: it has started; if backpressure is on, pause it now.
    fn delivered(&mut self, p: i32, consumer: &BaseConsumer<RunContext>, topic: &str) {
        if self.delivered.insert(p) && consumer.context().paused.load(Ordering::SeqCst) {
            self.pause(consumer, topic);
        }
    }

    /// Backpressure off: resume what this loop paused.
    fn resume(&mut self, consumer: &BaseConsumer<RunContext>, topic: &str) {
        if !consumer.context().paused.swap(false, Ordering::SeqCst) {
            return;
        }
        let ps = std::mem::take(&mut self.paused);
        if !ps.is_empty() {
            if let Err(error) = consumer.resume(&Self::tpl(topic, ps)) {
                warn!(%error, "resuming partitions failed");
            }
        }
    }

    /// After a revoke: the callback lifted the pauses; every partition starts afresh.
    fn reset(&mut self) {
        self.delivered.clear();
        self.paused.clear();
    }
}

/// Runs until `stop` is set, then commits what the runner last sent and leaves the group.
pub fn poll_loop(consumer: BaseConsumer<RunContext>, cfg: PollerConfig, h: PollerHandles) {
    let mut pauses = Pauses::default();
    let mut durable: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_commit = Instant::now();
    let mut pending: BTreeMap<i32, (Vec<Input>, i64, Instant)> = BTreeMap::new();
    let mut held: Option<Batch> = None;
    let mut epoch = consumer.context().epoch.load(Ordering::SeqCst);
    let mut last_marks = Instant::now() - Duration::from_secs(10);
    // Partitions a fetch has reported on (a record, or the end of the partition) since they
    // were assigned. Only their cached high watermark belongs to this assignment: librdkafka
    // keeps the one of an earlier assignment of the same partition until the first fetch, and
    // lag computed from it read 0 for a partition that had not been fetched yet (a test saw a
    // member report "caught up" 0.1 s after taking over a killed member's partition).
    let mut fetched: BTreeSet<i32> = BTreeSet::new();
    let mut last_error_log = Instant::now() - Duration::from_secs(10);
    let mut origin = None;
    let mut restored: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_restore_check = Instant::now() - RESTORE_CHECK_EVERY;
    while !h.stop.load(Ordering::SeqCst) {
        // Shards restored from their stores: commit what they cover where the group is behind,
        // at once rather than at the next COMMIT_EVERY.
        while let Ok((p, o)) = h.restored.try_recv() {
            restored.insert(p, o);
        }
        let mut commit_now = false;
        if !restored.is_empty() && last_restore_check.elapsed() >= RESTORE_CHECK_EVERY {
            last_restore_check = Instant::now();
            for (p, o) in behind_the_stores(&consumer, &cfg.topic, &mut restored) {
                let e = durable.entry(p).or_insert(o);
                *e = (*e).max(o);
                commit_now = true;
            }
        }
        // Offsets made durable are committed together, at most every COMMIT_EVERY: the
        // coordinator answers heartbeats behind commits, and a busy broker given one commit per
        // partition per checkpoint timed sessions out. Committed offsets only say where a
        // restart fetches from; the stores say what counts, so a late commit costs a few
        // skipped redeliveries, never a wrong number. Revokes and shutdown commit at once.
        while let Ok(offsets) = h.commits.try_recv() {
            for (p, o) in offsets {
                let e = durable.entry(p).or_insert(o);
                *e = (*e).max(o);
            }
        }
        if !durable.is_empty() && (commit_now || last_commit.elapsed() >= COMMIT_EVERY) {
            last_commit = Instant::now();
            // Only partitions still owned: a revoked one was committed by the revoke callback.
            let owned: Vec<i32> = consumer
                .assignment()
                .map(|a| partitions_of(&a, &cfg.topic))
                .unwrap_or_default();
            let offsets: Vec<(i32, i64)> = std::mem::take(&mut durable)
                .into_iter()
                .filter(|(p, _)| owned.contains(p))
                .collect();
            if let Err(e) = commit(&consumer, &cfg.topic, &offsets, CommitMode::Async) {
                warn!(error = %e, "offset commit failed (the next one covers it)");
            }
        }
        if let Some(mut b) = held.take() {
            // Wait a little for room before pausing: a pause makes librdkafka drop what it
            // prefetched for the partition and fetch it again on resume, which costs the broker
            // far more than a short wait (heartbeats run on librdkafka's own threads).
            let waited = Instant::now();
            let sent = loop {
                match h.data.try_send(b) {
                    Err(mpsc::error::TrySendError::Full(back))
                        if waited.elapsed() < PAUSE_AFTER =>
                    {
                        b = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    other => break other,
                }
            };
            match sent {
                Ok(()) => pauses.resume(&consumer, &cfg.topic),
                Err(mpsc::error::TrySendError::Full(b)) => {
                    held = Some(b);
                    pauses.pause(&consumer, &cfg.topic);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        let polled = consumer.poll(Duration::from_millis(if held.is_some() { 5 } else { 20 }));
        let now_epoch = consumer.context().epoch.load(Ordering::SeqCst);
        if now_epoch != epoch {
            // A revoke happened inside that poll: whatever was buffered belongs to partitions
            // that were checkpointed without it; it is fetched again by their next owner.
            // (The revoke callback lifted the pause.)
            epoch = now_epoch;
            pending.clear();
            held = None;
            pauses.reset();
            fetched.clear();
        }
        match polled {
            Some(Ok(m)) => {
                let p = m.partition();
                fetched.insert(p);
                pauses.delivered(p, &consumer, &cfg.topic);
                let inp = input(&m, &mut origin);
                let e = pending
                    .entry(p)
                    .or_insert_with(|| (Vec::with_capacity(cfg.batch_size), 0, Instant::now()));
                e.1 = m.offset() + 1;
                e.0.push(inp);
            }
            // Not an error: the fetch reached the end (`enable.partition.eof`), which makes the
            // partition's cached high watermark this assignment's.
            Some(Err(KafkaError::PartitionEOF(p))) => {
                fetched.insert(p);
            }
            Some(Err(e)) => {
                metrics::counter!("canopy_kafka_errors_total").increment(1);
                if last_error_log.elapsed() > Duration::from_secs(5) {
                    last_error_log = Instant::now();
                    warn!(error = %e, "kafka poll error (retrying)");
                }
            }
            None => {}
        }
        if held.is_none() {
            let ready = pending
                .iter()
                .find(|(_, (v, _, t))| v.len() >= cfg.batch_size || t.elapsed() >= cfg.linger)
                .map(|(p, _)| *p);
            if let Some(p) = ready {
                let (inputs, next_offset, _) = pending.remove(&p).expect("present");
                held = Some(Batch {
                    partition: p,
                    inputs,
                    next_offset,
                });
            }
        }
        if last_marks.elapsed() >= Duration::from_secs(1) {
            last_marks = Instant::now();
            if let Ok(a) = consumer.assignment() {
                let mut marks = BTreeMap::new();
                for e in a.elements_for_topic(&cfg.topic) {
                    if !fetched.contains(&e.partition()) {
                        continue;
                    }
                    if let Some(high) = cached_high_watermark(&consumer, &cfg.topic, e.partition())
                    {
                        marks.insert(e.partition(), high);
                    }
                }
                *h.watermarks.lock().expect("lock") = marks;
            }
        }
    }
    // Final commits (the runner sends them before setting `stop`), then leave the group.
    while let Ok(offsets) = h.commits.try_recv() {
        for (p, o) in offsets {
            let e = durable.entry(p).or_insert(o);
            *e = (*e).max(o);
        }
    }
    let offsets: Vec<(i32, i64)> = durable.into_iter().collect();
    if let Err(e) = commit(&consumer, &cfg.topic, &offsets, CommitMode::Sync) {
        warn!(error = %e, "final offset commit failed (the stores hold the offsets)");
    }
    consumer.unsubscribe();
    let _ = consumer.poll(Duration::from_millis(100));
}
