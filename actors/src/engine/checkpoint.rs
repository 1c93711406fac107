//! Checkpoints: when one is due, the snapshot of every tenant, the background commit and its
//! retries with back-off.

use super::dispatch::{answer, ask, call};
use super::*;

/// Bucket deltas per pending event assumed before any event reached the nodes (see
/// [`Engine::buckets_over_budget`]): high rather than low, since it only bounds the first round.
const UNOBSERVED_BUCKETS_PER_EVENT: f64 = 16.0;

impl Engine {
    /// Whether to take a checkpoint now. The interval is a floor, not a deadline: while the
    /// previous commit is still running, a checkpoint that is only due by time is put off
    /// rather than waited for (the next one then covers more records, and a slow store gets
    /// fewer, larger commits instead of stalling ingestion). The record count is the hard
    /// bound: past `checkpoint_every_records` the checkpoint is taken and waits for the store,
    /// which bounds the replay log, and memory, while the store is slow or down. So is the
    /// count of bucket deltas held (`checkpoint_max_buckets`), which bounds what one interval,
    /// and the one being committed, hold in memory whatever the records' keys.
    pub fn checkpoint_due(&self) -> bool {
        self.since_checkpoint > 0
            && (self.since_checkpoint >= self.cfg.checkpoint_every_records
                || self.buckets_over_budget()
                || (self.last_checkpoint.elapsed()
                    >= Duration::from_millis(self.cfg.checkpoint_interval_ms)
                    && self.commit_finished()))
    }

    /// Whether the interval holds, or will once the coordinators' pending events reach the
    /// nodes, `checkpoint_max_buckets` bucket deltas. The nodes count what they hold; a
    /// coordinator holds up to a round of events (`round_max_events`) before they reach them,
    /// each worth the interval's buckets per event so far (the last interval's at first).
    fn buckets_over_budget(&self) -> bool {
        let max = self.cfg.checkpoint_max_buckets;
        if max == 0 {
            return false;
        }
        let held = self.stats.interval_buckets.load(Ordering::Relaxed);
        let pending: u64 = self.tenants.values().map(|h| h.pending).sum();
        held as f64 + pending as f64 * self.buckets_per_event(held) >= max as f64
    }

    fn buckets_per_event(&self, held: u64) -> f64 {
        if self.interval_events > 0 {
            held as f64 / self.interval_events as f64
        } else if self.buckets_per_event > 0.0 {
            self.buckets_per_event
        } else {
            // Nothing observed yet: an event on a fresh leaf of a deep tree creates up to ~20.
            UNOBSERVED_BUCKETS_PER_EVENT
        }
    }

    /// Takes a checkpoint and waits until it is durable.
    pub async fn checkpoint(&mut self) -> Result<(), EngineError> {
        self.begin_checkpoint().await?;
        self.await_commit().await
    }

    /// Takes a checkpoint: every tenant's changes, the dead letters made durable, and the source
    /// position, committed in one atomic store write. The commit runs in the background while
    /// ingestion goes on; at most one is in flight (the next checkpoint, a tenant rebuild and the
    /// end of the run wait for it), and it is retried with back-off until it lands.
    pub async fn begin_checkpoint(&mut self) -> Result<(), EngineError> {
        self.await_commit().await?;
        let started = Instant::now();
        let seq = self.snap_seq + 1;
        let span = info_span!("checkpoint", seq);
        let names: Vec<String> = self.tenants.keys().cloned().collect();
        // Every tenant snapshots at once (they are independent actors); the replies are then
        // collected in turn, and a tenant that failed is rebuilt and asked again.
        let asked: Vec<_> = names
            .into_iter()
            .map(|t| {
                let a = ask(&self.tenants[&t].actor, |reply| CoordMsg::Snapshot {
                    seq,
                    reply,
                });
                (t, a)
            })
            .collect();
        let mut changes = Vec::with_capacity(asked.len());
        for (tenant, asked) in asked {
            let mut reply = answer(asked).instrument(span.clone()).await;
            loop {
                match reply {
                    Ok(c) => {
                        changes.push(c);
                        break;
                    }
                    Err(e) => {
                        self.recover(&tenant, e, None).await?;
                        let Some(h) = self.tenants.get(&tenant) else {
                            break; // parked: it has nothing to checkpoint
                        };
                        let actor = h.actor.clone();
                        reply = call(&actor, |reply| CoordMsg::Snapshot { seq, reply })
                            .instrument(span.clone())
                            .await;
                    }
                }
            }
        }
        // Every node answered, so none holds a delta of the closed interval any more (no round
        // runs before ingestion resumes), and the snapshot rounds sent every pending event.
        let held = self.stats.interval_buckets.swap(0, Ordering::Relaxed);
        let pending: u64 = self
            .tenants
            .values_mut()
            .map(|h| std::mem::take(&mut h.pending))
            .sum();
        let events = self.interval_events + pending;
        if events > 0 {
            self.buckets_per_event = held as f64 / events as f64;
        }
        debug!(
            seq,
            held,
            events,
            buckets_per_event = self.buckets_per_event,
            "interval closed"
        );
        self.interval_events = 0;
        let snapshot_time = started.elapsed();
        let snapshot_ms = snapshot_time.as_millis() as u64;
        self.stats
            .snapshot_micros
            .fetch_add(micros(snapshot_time), Ordering::Relaxed);
        let flush = self.dead.sync().await?;
        let dead_letters_durable = flush.durable;
        let mut behind = self.behind.clone();
        for p in &self.parked {
            behind.insert(p.tenant.clone(), p.behind);
        }
        let position = Position {
            source: self
                .parked
                .first()
                .map_or_else(|| self.position.clone(), |p| p.from.clone()),
            dead_letters: flush.position,
            through: self.through,
            behind,
        };
        self.stored_source = position.source.clone();
        let source = rmp_serde::to_vec(&position).expect("position encodes");
        let cp = Arc::new(Checkpoint {
            seq,
            source,
            tenants: changes.into_iter().filter(|c| c.rows() > 0).collect(),
        });
        // What changed, in logical rows (a node header, a bucket...); the backend reports what it
        // physically wrote.
        let changes = cp.rows() as u64;
        self.stats
            .checkpoint_changes
            .fetch_add(changes, Ordering::Relaxed);
        let (store, cfg, stats) = (self.store.clone(), self.cfg.clone(), self.stats.clone());
        let task = tokio::spawn(
            async move {
                let t = Instant::now();
                // The dead letters this checkpoint covers must be durable before it is.
                dead_letters_durable
                    .await
                    .map_err(StoreError::DeadLetters)?;
                let written = retry_counted(&cfg, "commit checkpoint", &stats, || async {
                    let t = Instant::now();
                    let r = store.commit(cp.clone()).await;
                    metrics::histogram!("canopy_store_commit_seconds")
                        .record(t.elapsed().as_secs_f64());
                    r
                })
                .await?;
                stats.durable_seq.fetch_max(seq, Ordering::Release);
                stats
                    .commit_micros
                    .fetch_add(micros(t.elapsed()), Ordering::Relaxed);
                debug!(
                    seq,
                    changes,
                    rows = written.rows,
                    bytes = written.bytes,
                    snapshot_ms,
                    commit_ms = t.elapsed().as_millis() as u64,
                    "checkpoint committed"
                );
                Ok(written)
            }
            .instrument(span),
        );
        self.inflight = Some(Inflight {
            seq,
            position,
            started,
            task,
        });
        self.snap_seq = seq;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Whether no checkpoint commit is running (so `await_commit` returns at once).
    pub fn commit_finished(&self) -> bool {
        self.inflight.as_ref().is_none_or(|i| i.task.is_finished())
    }

    /// Waits for the checkpoint being committed, if any, then forgets the replay log it covers.
    pub async fn await_commit(&mut self) -> Result<(), EngineError> {
        // Await through a reference so that a cancelled wait leaves the commit tracked.
        let Some(running) = self.inflight.as_mut() else {
            return Ok(());
        };
        let waited = Instant::now();
        let done = (&mut running.task).await;
        self.stats
            .commit_wait_micros
            .fetch_add(micros(waited.elapsed()), Ordering::Relaxed);
        let inf = self.inflight.take().expect("in-flight commit");
        let written = match done {
            Ok(r) => r?,
            Err(e) => return Err(StoreError::CommitTask(e.to_string()).into()),
        };
        for h in self.tenants.values_mut() {
            h.log.retain(|(tag, _)| *tag >= inf.seq);
        }
        self.seq = inf.seq;
        self.committed = inf.position;
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.stats.store_commits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .store_rows
            .fetch_add(written.rows, Ordering::Relaxed);
        self.stats
            .store_bytes
            .fetch_add(written.bytes, Ordering::Relaxed);
        self.stats
            .last_checkpoint_seq
            .store(inf.seq, Ordering::Relaxed);
        metrics::histogram!("canopy_checkpoint_seconds")
            .record(inf.started.elapsed().as_secs_f64());
        metrics::histogram!("canopy_checkpoint_rows").record(written.rows as f64);
        Ok(())
    }
}

pub(super) async fn retry<T, F, Fut>(cfg: &EngineConfig, what: &str, f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    retry_counted(cfg, what, &Stats::default(), f).await
}

/// Retries a store operation with exponential back-off while its error is transient. Ingestion
/// waits meanwhile: nothing runs ahead of a checkpoint that has not landed.
pub async fn retry_counted<T, F, Fut>(
    cfg: &EngineConfig,
    what: &str,
    stats: &Stats,
    mut f: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(cfg.retry_initial_ms);
    let mut attempt = 0u32;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => {
                attempt += 1;
                stats.store_retries.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("canopy_store_retries_total").increment(1);
                warn!(operation = what, attempt, error = %e, delay_ms = delay.as_millis() as u64, "store operation failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(cfg.retry_max_ms));
            }
            Err(e) => return Err(e),
        }
    }
}
