//! The engine: pulls batches from a [`Source`], fans each tenant's records out to its coordinator,
//! writes dead letters, and takes checkpoints. It is also where failure handling lives: a tenant
//! whose node actor died is rebuilt from its last checkpoint and its records since then replayed.
//! See ARCHITECTURE.md for the protocol.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::concurrency::oneshot;
use ractor::ActorRef;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::coordinator::{spawn_tenant, BatchOutcome, CoordMsg, TaggedBatch, TenantError};
use crate::node::NodeMsg;
use crate::record::{Record, Refusal};
use crate::source::{DeadLetter, DeadLetters, Input, Source, SourceError};
use crate::stats::Stats;
use crate::store::{Checkpoint, Store, StoreError};
use crate::tenant::TenantSettings;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Take a checkpoint at least this often (milliseconds of wall time).
    pub checkpoint_interval_ms: u64,
    /// ... or after this many records, whichever comes first.
    pub checkpoint_every_records: u64,
    /// Kill a random node actor after every N records (chaos testing; 0 = off).
    pub chaos_kill_every: u64,
    /// A tenant whose rebuild fails this many times in a row, without completing a batch in
    /// between, is parked (it keeps failing on the same work).
    pub max_restarts: u32,
    /// Store commit retries: first back-off and its ceiling.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// A section of its own in the configuration tree (`tenant`, beside `engine`): not part of
    /// this one's serialized form.
    #[serde(skip)]
    pub tenant: TenantSettings,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            checkpoint_interval_ms: 1000,
            checkpoint_every_records: 1_000_000,
            chaos_kill_every: 0,
            max_restarts: 5,
            retry_initial_ms: 50,
            retry_max_ms: 5000,
            tenant: TenantSettings::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}", parked_message(.0))]
    TenantsParked(Vec<(String, String)>),
    #[error("tenant {0:?}: {1}")]
    Tenant(String, TenantError),
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn parked_message(parked: &[(String, String)]) -> String {
    let list: Vec<String> = parked.iter().map(|(t, e)| format!("{t:?} ({e})")).collect();
    format!(
        "{} tenant(s) parked after repeated failures: {}. The other tenants' records were \
         processed; the parked tenants' records were kept (the checkpoint resumes from the last \
         one they are durable in), so running the same command again retries them",
        parked.len(),
        list.join("; ")
    )
}

/// What the engine stores as the source position: where a restart reads the source from, and the
/// dead-letter output's position, so that both resume together. While a tenant is parked, `source`
/// stays at the last checkpoint that tenant is durable in, so that its records are read again on
/// a restart; `through` and `behind` then tell which of the re-read records the others already
/// applied (ARCHITECTURE.md, "Parking").
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Position {
    source: Vec<u8>,
    dead_letters: Vec<u8>,
    /// The highest record tag processed: every tenant not in `behind` applied every record up to
    /// it, and every dead letter up to it is written.
    #[serde(default)]
    through: u64,
    #[serde(default)]
    behind: BTreeMap<String, Behind>,
}

/// How far a tenant that is behind `through` got (a parked one, or one retried after parking).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Behind {
    /// Its stored state covers its records up to this tag.
    applied: u64,
    /// Its dead letters are written up to this tag.
    lettered: u64,
}

/// A tenant that kept failing: its coordinator is stopped and its records are skipped (not
/// applied, not dead-lettered) until a restart retries them.
#[derive(Debug)]
struct Parked {
    tenant: String,
    error: String,
    /// The source position of the last committed checkpoint when it was parked.
    from: Vec<u8>,
    behind: Behind,
}

/// A checkpoint whose commit is running in the background.
struct Inflight {
    seq: u64,
    position: Position,
    started: Instant,
    /// Resolves to the rows the store wrote.
    task: tokio::task::JoinHandle<Result<u64, StoreError>>,
}

struct TenantHandle {
    actor: ActorRef<CoordMsg>,
    /// Batches processed since the last committed checkpoint: replayed if the tenant is rebuilt.
    /// Each batch is tagged with the sequence number of the last snapshot taken before it: a
    /// committed checkpoint `s` covers exactly the batches tagged below `s`.
    log: Vec<(u64, TaggedBatch)>,
    /// Consecutive rebuilds without a completed batch.
    restarts: u32,
}

pub struct Engine {
    cfg: EngineConfig,
    store: Arc<dyn Store>,
    dead: Box<dyn DeadLetters>,
    tenants: HashMap<String, TenantHandle>,
    pub stats: Arc<Stats>,
    /// The last committed checkpoint.
    seq: u64,
    /// The last snapshot taken (committed, or being committed by `inflight`).
    snap_seq: u64,
    inflight: Option<Inflight>,
    position: Vec<u8>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    until_chaos: u64,
    /// The position stored by the last committed checkpoint.
    committed: Position,
    /// The source position the last checkpoint taken stores (held back while a tenant is parked).
    stored_source: Vec<u8>,
    /// Re-read records with a tag up to this were processed before (see [`Position`]); set only
    /// when a tenant was behind, since otherwise the source resumes exactly after the checkpoint.
    window: Option<u64>,
    /// The highest tag processed so far.
    through: u64,
    /// Tenants catching up on re-read records (parked in an earlier run, retried now).
    behind: BTreeMap<String, Behind>,
    /// Parked tenants, in the order they were parked (the first has the earliest `from`).
    parked: Vec<Parked>,
}

impl Engine {
    /// Opens the engine on a store, resuming the source and dead letters from the last checkpoint.
    /// For sources the engine pulls from ([`Engine::run`]).
    pub async fn open(
        cfg: EngineConfig,
        store: Arc<dyn Store>,
        source: &mut dyn Source,
        dead: Box<dyn DeadLetters>,
    ) -> Result<Self, EngineError> {
        let (seq, pos) = load_position(&cfg, store.as_ref()).await?;
        source
            .resume(pos.as_ref().map(|p| p.source.as_slice()))
            .await?;
        Self::resume(cfg, store, dead, seq, pos).await
    }

    /// Opens the engine on a store for a source that pushes its records ([`Engine::process`],
    /// [`Engine::set_position`]): returns the source position the last checkpoint stores (none
    /// before the first), from which that source must deliver.
    pub async fn restore(
        cfg: EngineConfig,
        store: Arc<dyn Store>,
        dead: Box<dyn DeadLetters>,
    ) -> Result<(Self, Option<Vec<u8>>), EngineError> {
        let (seq, pos) = load_position(&cfg, store.as_ref()).await?;
        let source = pos.as_ref().map(|p| p.source.clone());
        Ok((Self::resume(cfg, store, dead, seq, pos).await?, source))
    }

    async fn resume(
        cfg: EngineConfig,
        store: Arc<dyn Store>,
        mut dead: Box<dyn DeadLetters>,
        seq: u64,
        pos: Option<Position>,
    ) -> Result<Self, EngineError> {
        let committed = pos.clone().unwrap_or_default();
        if !committed.behind.is_empty() {
            let names: Vec<&String> = committed.behind.keys().collect();
            warn!(tenants = ?names, through = committed.through, "retrying tenants parked by an earlier run: re-reading their records");
        }
        dead.resume(pos.as_ref().map(|p| p.dead_letters.as_slice()))
            .await?;
        if pos.is_some() {
            info!(checkpoint = seq, "resuming from checkpoint");
        }
        let until_chaos = cfg.chaos_kill_every;
        Ok(Engine {
            cfg,
            store,
            dead,
            tenants: HashMap::new(),
            stats: Arc::new(Stats::default()),
            seq,
            snap_seq: seq,
            inflight: None,
            position: pos.map(|p| p.source).unwrap_or_default(),
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            until_chaos,
            stored_source: committed.source.clone(),
            window: (!committed.behind.is_empty()).then_some(committed.through),
            through: committed.through,
            behind: committed.behind.clone(),
            committed,
            parked: Vec::new(),
        })
    }

    /// Runs the source to its end (or forever), then takes a final checkpoint.
    pub async fn run(&mut self, source: &mut dyn Source) -> Result<(), EngineError> {
        while let Some(batch) = source.next_batch().await? {
            self.process(batch.inputs).await?;
            self.position = batch.position;
            if self.checkpoint_due() {
                self.begin_checkpoint().await?;
            }
        }
        self.checkpoint().await?;
        if !self.parked.is_empty() {
            return Err(EngineError::TenantsParked(self.parked()));
        }
        Ok(())
    }

    /// Parked tenants and why.
    pub fn parked(&self) -> Vec<(String, String)> {
        self.parked
            .iter()
            .map(|p| (p.tenant.clone(), p.error.clone()))
            .collect()
    }

    /// The source position the last checkpoint taken stores: where a restart reads from, behind
    /// the processed position while a tenant is parked (a consumer commits this, not its own).
    pub fn stored_source(&self) -> &[u8] {
        &self.stored_source
    }

    /// Whether to take a checkpoint now. The interval is a floor, not a deadline: while the
    /// previous commit is still running, a checkpoint that is only due by time is put off
    /// rather than waited for (the next one then covers more records, and a slow store gets
    /// fewer, larger commits instead of stalling ingestion). The record count is the hard
    /// bound: past `checkpoint_every_records` the checkpoint is taken and waits for the store,
    /// which bounds the replay log, and memory, while the store is slow or down.
    pub fn checkpoint_due(&self) -> bool {
        self.since_checkpoint > 0
            && (self.since_checkpoint >= self.cfg.checkpoint_every_records
                || (self.last_checkpoint.elapsed()
                    >= Duration::from_millis(self.cfg.checkpoint_interval_ms)
                    && self.commit_finished()))
    }

    /// Marks the records up to `position` as processed (for sources that deliver out of band).
    pub fn set_position(&mut self, position: Vec<u8>) {
        self.position = position;
    }

    /// Processes one batch of inputs: every tenant's records in order, tenants in parallel.
    /// With chaos on, the batch is cut so that a node actor dies after every N records.
    pub async fn process(&mut self, mut inputs: Vec<Input>) -> Result<(), EngineError> {
        if self.cfg.chaos_kill_every == 0 {
            return self.process_chunk(inputs).await;
        }
        while !inputs.is_empty() {
            let take = (self.until_chaos as usize).min(inputs.len());
            let rest = inputs.split_off(take);
            self.process_chunk(inputs).await?;
            inputs = rest;
            self.until_chaos -= take as u64;
            if self.until_chaos == 0 {
                self.chaos_kill().await?;
                self.until_chaos = self.cfg.chaos_kill_every;
            }
        }
        Ok(())
    }

    async fn process_chunk(&mut self, inputs: Vec<Input>) -> Result<(), EngineError> {
        let n = inputs.len() as u64;
        let mut by_tenant: BTreeMap<String, Vec<(u64, Record)>> = BTreeMap::new();
        let mut refused: Vec<(u64, Refusal)> = Vec::new();
        let mut raw: HashMap<u64, (Vec<u8>, Option<Arc<crate::source::Origin>>)> = HashMap::new();
        let last_tag = inputs.last().map(|i| i.tag);
        let mut skipped = 0u64;
        for inp in inputs {
            let tag = inp.tag;
            // A record read again after a restart that the tenants ahead already applied: only a
            // tenant that is behind takes it (see `Position`).
            let again = self.window.is_some_and(|w| tag <= w);
            match inp.decoded {
                Ok(rec) => {
                    let t = rec.tenant();
                    let take = !self.parked.iter().any(|p| p.tenant == t)
                        && (!again || self.behind.get(t).is_some_and(|b| tag > b.applied));
                    if !take {
                        skipped += 1;
                        continue;
                    }
                    by_tenant.entry(t.to_string()).or_default().push((tag, rec))
                }
                Err(_) if again => {
                    skipped += 1;
                    continue;
                }
                Err(r) => refused.push((tag, r)),
            }
            raw.insert(tag, (inp.raw, inp.origin));
        }
        if skipped > 0 {
            metrics::counter!("canopy_records_skipped_total").increment(skipped);
        }
        // Records that did not decode name no tenant; they count under the empty tenant label.
        let refused_undecoded = refused.len() as u64;
        let mut calls = Vec::with_capacity(by_tenant.len());
        let snap_seq = self.snap_seq;
        for (tenant, recs) in by_tenant {
            metrics::counter!("canopy_records_total", "tenant" => tenant.clone())
                .increment(recs.len() as u64);
            let batch: TaggedBatch = Arc::new(recs);
            let h = self.tenant(&tenant).await?;
            h.log.push((snap_seq, batch.clone()));
            calls.push((tenant, batch));
        }
        let outcomes = self.dispatch(calls).await?;
        for (tenant, mut o) in outcomes {
            // A tenant catching up wrote its dead letters up to `lettered` before it was parked.
            if let Some(b) = self.behind.get(&tenant) {
                o.refused.retain(|(tag, _)| *tag > b.lettered);
            }
            self.stats.accepted.fetch_add(o.accepted, Ordering::Relaxed);
            self.stats
                .duplicates
                .fetch_add(o.duplicates, Ordering::Relaxed);
            metrics::counter!("canopy_duplicates_total").increment(o.duplicates);
            refused.extend(o.refused);
        }
        refused.sort_by_key(|(tag, _)| *tag);
        for (tag, r) in &refused {
            let (bytes, origin) = raw
                .get(tag)
                .map(|(b, o)| (b.as_slice(), o.as_deref()))
                .unwrap_or((&[], None));
            self.dead
                .write(DeadLetter {
                    tag: *tag,
                    backlog: self.window.is_some_and(|w| *tag <= w),
                    origin,
                    refusal: r,
                    raw: bytes,
                })
                .await?;
            metrics::counter!("canopy_dead_letters_total", "reason" => r.reason()).increment(1);
        }
        self.stats
            .refused
            .fetch_add(refused.len() as u64, Ordering::Relaxed);
        self.stats.records.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("canopy_records_total", "tenant" => "").increment(refused_undecoded);
        self.since_checkpoint += n;
        if let Some(t) = last_tag {
            self.through = self.through.max(t);
            if self.window.is_none_or(|w| t >= w) {
                // Past the re-read records: nobody is behind any more but the parked.
                self.behind.clear();
            } else {
                for b in self.behind.values_mut() {
                    b.applied = b.applied.max(t);
                    b.lettered = b.lettered.max(t);
                }
            }
        }
        Ok(())
    }

    /// A coordinator for `tenant`, restored from the store.
    async fn spawn(&self, tenant: &str) -> Result<ActorRef<CoordMsg>, TenantError> {
        spawn_tenant(
            tenant,
            self.cfg.tenant,
            self.store.clone(),
            self.snap_seq,
            self.stats.clone(),
            None,
        )
        .await
    }

    async fn tenant(&mut self, tenant: &str) -> Result<&mut TenantHandle, EngineError> {
        if !self.tenants.contains_key(tenant) {
            let actor = self
                .spawn(tenant)
                .await
                .map_err(|e| EngineError::Tenant(tenant.into(), e))?;
            self.tenants.insert(
                tenant.to_string(),
                TenantHandle {
                    actor,
                    log: Vec::new(),
                    restarts: 0,
                },
            );
        }
        Ok(self.tenants.get_mut(tenant).expect("just inserted"))
    }

    /// Sends every tenant its batch and collects the outcomes; rebuilds tenants that failed.
    async fn dispatch(
        &mut self,
        calls: Vec<(String, TaggedBatch)>,
    ) -> Result<Vec<(String, BatchOutcome)>, EngineError> {
        let mut waits = Vec::with_capacity(calls.len());
        for (tenant, batch) in calls {
            let asked = ask(&self.tenants[&tenant].actor, |reply| CoordMsg::Process {
                batch: batch.clone(),
                reply,
            });
            waits.push((tenant, batch, asked));
        }
        let mut out = Vec::with_capacity(waits.len());
        for (tenant, batch, asked) in waits {
            let o = match answer(asked).await {
                Ok(o) => o,
                Err(e) => self.recover(&tenant, e, Some(batch)).await?,
            };
            if let Some(h) = self.tenants.get_mut(&tenant) {
                h.restarts = 0;
            }
            out.push((tenant, o));
        }
        Ok(out)
    }

    /// Rebuilds a tenant from its last checkpoint and replays what it processed since; then, if
    /// given, processes `retry` afresh and returns its outcome.
    async fn recover(
        &mut self,
        tenant: &str,
        mut err: TenantError,
        retry: Option<TaggedBatch>,
    ) -> Result<BatchOutcome, EngineError> {
        // The rebuilt tenant loads the store: let a checkpoint still being written land first, so
        // that the log entries it covers can be told apart from those to replay.
        self.await_commit().await?;
        loop {
            let h = self.tenants.get_mut(tenant).expect("known tenant");
            h.restarts += 1;
            if h.restarts > self.cfg.max_restarts {
                let restarts = h.restarts;
                self.park(tenant, restarts, err.to_string(), retry.as_ref());
                return Ok(BatchOutcome::default());
            }
            self.stats.tenant_restarts.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("canopy_actor_restarts_total", "kind" => "tenant").increment(1);
            warn!(tenant, error = %err, attempt = h.restarts, "rebuilding tenant from its last checkpoint");
            h.actor.stop(Some("rebuild".into()));
            if h.restarts > 1 {
                // The last rebuild failed too: give a failing dependency (the store) time.
                let ms = self
                    .cfg
                    .retry_initial_ms
                    .saturating_mul(1 << (h.restarts - 2).min(16))
                    .min(self.cfg.retry_max_ms);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let actor = match self.spawn(tenant).await {
                Ok(a) => a,
                Err(e) => {
                    // Counts as a failed rebuild: retried, and parked past the limit.
                    err = e;
                    continue;
                }
            };
            let h = self.tenants.get_mut(tenant).expect("known tenant");
            h.actor = actor.clone();
            // The log ends with `retry` when a batch failed: replay everything before it quietly.
            let mut replay: Vec<TaggedBatch> = h.log.iter().map(|(_, b)| b.clone()).collect();
            if let (Some(r), Some(last)) = (&retry, replay.last()) {
                if Arc::ptr_eq(r, last) {
                    replay.pop();
                }
            }
            let mut failed = None;
            for b in replay.into_iter().chain(retry.clone()) {
                match call(&actor, |reply| CoordMsg::Process {
                    batch: b.clone(),
                    reply,
                })
                .await
                {
                    Ok(o) => {
                        if retry.as_ref().is_some_and(|r| Arc::ptr_eq(r, &b)) {
                            return Ok(o);
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                Some(e) => err = e,
                None => return Ok(BatchOutcome::default()),
            }
        }
    }

    /// Kills a random node actor: half the time by `kill` (the task is aborted), half the time
    /// by a panic inside its handler. Half the kills are then waited for, so that the node is
    /// restarted alone; the others land whenever they land, possibly while the next batch's
    /// round runs, which rebuilds the tenant instead. Both must keep the numbers exact.
    /// Parks a tenant that keeps failing: stops it and skips its records from now on, while the
    /// stored source position stays where its state is durable, so nothing of it is lost.
    fn park(&mut self, tenant: &str, restarts: u32, error: String, failed: Option<&TaggedBatch>) {
        let Some(h) = self.tenants.remove(tenant) else {
            return;
        };
        h.actor.stop(Some("parked".into()));
        let applied = self
            .committed
            .behind
            .get(tenant)
            .map_or(self.committed.through, |b| b.applied);
        // Dead letters were written for every batch it completed (all but the failed one).
        let done = h
            .log
            .iter()
            .filter(|(_, b)| failed.is_none_or(|f| !Arc::ptr_eq(f, b)))
            .filter_map(|(_, b)| b.last().map(|(tag, _)| *tag))
            .max()
            .unwrap_or(0);
        let was = self.behind.remove(tenant).unwrap_or_default();
        let lettered = applied.max(done).max(was.lettered);
        let error = format!("{restarts} rebuilds failed in a row; last: {error}");
        tracing::error!(tenant, error = %error, applied, "tenant parked: its records are skipped and kept for a retry; the other tenants go on");
        metrics::counter!("canopy_tenants_parked_total").increment(1);
        self.parked.push(Parked {
            tenant: tenant.to_string(),
            error,
            from: self.committed.source.clone(),
            behind: Behind { applied, lettered },
        });
        metrics::gauge!("canopy_tenants_parked").set(self.parked.len() as f64);
    }

    async fn chaos_kill(&mut self) -> Result<(), EngineError> {
        let names: Vec<String> = self.tenants.keys().cloned().collect();
        if names.is_empty() {
            return Ok(());
        }
        let tenant = names[rand::random_range(0..names.len())].clone();
        let actor = self.tenants[&tenant].actor.clone();
        if let Ok(Some(node)) = call_plain(&actor, CoordMsg::RandomNode).await {
            self.stats.chaos_kills.fetch_add(1, Ordering::Relaxed);
            info!(tenant = %tenant, "chaos: killing a node actor");
            self.kill(
                &tenant,
                node,
                rand::random_bool(0.5),
                rand::random_bool(0.5),
            )
            .await?;
        }
        Ok(())
    }

    async fn kill(
        &mut self,
        tenant: &str,
        node: ActorRef<NodeMsg>,
        panic: bool,
        wait: bool,
    ) -> Result<(), EngineError> {
        let id = node.get_id();
        if panic {
            let _ = node.send_message(NodeMsg::Crash);
        } else {
            node.kill();
        }
        if wait {
            let actor = self.tenants[tenant].actor.clone();
            if let Err(e) = call(&actor, |reply| CoordMsg::AwaitDown { id, reply }).await {
                self.recover(tenant, e, None).await?;
            }
        }
        Ok(())
    }

    /// Kills one node actor (by panic or abort) and waits until its tenant dealt with it:
    /// restarted the node, or, past the restart intensity limit, rebuilt the tenant. For tests.
    pub async fn kill_node(
        &mut self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
        panic: bool,
    ) -> Result<(), EngineError> {
        let Some(h) = self.tenants.get(tenant) else {
            return Ok(());
        };
        let actor = h.actor.clone();
        let found = call_plain(&actor, |reply| CoordMsg::NodeRef {
            hierarchy: hierarchy.into(),
            node: node.into(),
            reply,
        })
        .await
        .ok()
        .flatten();
        match found {
            Some(n) => self.kill(tenant, n, panic, true).await,
            None => Ok(()),
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
                if stats.measure_bytes.load(Ordering::Relaxed) {
                    let bytes = rmp_serde::to_vec(&*cp).map_or(0, |v| v.len() as u64);
                    stats.checkpoint_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                // The dead letters this checkpoint covers must be durable before it is.
                dead_letters_durable
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("dead letters: {e}")))?;
                let rows = retry_counted(&cfg, "commit checkpoint", &stats, || async {
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
                    rows,
                    snapshot_ms,
                    commit_ms = t.elapsed().as_millis() as u64,
                    "checkpoint committed"
                );
                Ok(rows)
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
        let rows = match done {
            Ok(r) => r?,
            Err(e) => return Err(StoreError::Io(format!("checkpoint commit task: {e}")).into()),
        };
        for h in self.tenants.values_mut() {
            h.log.retain(|(tag, _)| *tag >= inf.seq);
        }
        self.seq = inf.seq;
        self.committed = inf.position;
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.stats.store_commits.fetch_add(1, Ordering::Relaxed);
        self.stats.store_rows.fetch_add(rows, Ordering::Relaxed);
        self.stats
            .last_checkpoint_seq
            .store(inf.seq, Ordering::Relaxed);
        metrics::histogram!("canopy_checkpoint_seconds")
            .record(inf.started.elapsed().as_secs_f64());
        metrics::histogram!("canopy_checkpoint_rows").record(rows as f64);
        Ok(())
    }

    /// Stops every tenant's actors.
    pub async fn shutdown(&mut self) {
        for (_, h) in self.tenants.drain() {
            h.actor.stop(None);
        }
    }

    /// The live state of one node, for tests (settled: every round completes before a reply).
    pub async fn node_state(
        &mut self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
    ) -> Option<crate::node::NodeState> {
        let actor = self.tenants.get(tenant)?.actor.clone();
        call_plain(&actor, |reply| CoordMsg::NodeState {
            hierarchy: hierarchy.into(),
            node: node.into(),
            reply,
        })
        .await
        .ok()
        .flatten()
    }
}

/// A request sent to a coordinator without waiting for it (`None`: it could not be sent), so
/// that several coordinators work at once; [`answer`] then waits for the reply.
type Asked<T> = Option<ractor::concurrency::OneshotReceiver<Result<T, TenantError>>>;

fn ask<T>(
    actor: &ActorRef<CoordMsg>,
    f: impl FnOnce(ractor::RpcReplyPort<Result<T, TenantError>>) -> CoordMsg,
) -> Asked<T> {
    let (tx, rx) = oneshot();
    actor.send_message(f(tx.into())).is_ok().then_some(rx)
}

async fn answer<T>(asked: Asked<T>) -> Result<T, TenantError> {
    match asked {
        Some(rx) => rx
            .await
            .unwrap_or_else(|_| Err(TenantError::NodeDown("coordinator stopped".into()))),
        None => Err(TenantError::NodeDown("coordinator unreachable".into())),
    }
}

async fn call<T: Send + 'static>(
    actor: &ActorRef<CoordMsg>,
    f: impl FnOnce(ractor::RpcReplyPort<Result<T, TenantError>>) -> CoordMsg,
) -> Result<T, TenantError> {
    match actor.call(f, None).await {
        Ok(ractor::rpc::CallResult::Success(r)) => r,
        _ => Err(TenantError::NodeDown(
            "tenant coordinator did not answer".into(),
        )),
    }
}

async fn call_plain<T: Send + 'static>(
    actor: &ActorRef<CoordMsg>,
    f: impl FnOnce(ractor::RpcReplyPort<T>) -> CoordMsg,
) -> Result<T, ()> {
    match actor.call(f, None).await {
        Ok(ractor::rpc::CallResult::Success(r)) => Ok(r),
        _ => Err(()),
    }
}

/// The last checkpoint's sequence number and position (none before the first checkpoint).
async fn load_position(
    cfg: &EngineConfig,
    store: &dyn Store,
) -> Result<(u64, Option<Position>), EngineError> {
    let meta = retry(cfg, "load checkpoint", || store.meta()).await?;
    Ok(match meta {
        Some(m) => {
            let p: Position = rmp_serde::from_slice(&m.source)
                .map_err(|e| StoreError::Corrupt(format!("checkpoint position: {e}")))?;
            (m.seq, Some(p))
        }
        None => (0, None),
    })
}

async fn retry<T, F, Fut>(cfg: &EngineConfig, what: &str, f: F) -> Result<T, StoreError>
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
