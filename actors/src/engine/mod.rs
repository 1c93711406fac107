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

mod chaos;
mod checkpoint;
mod dispatch;
mod recovery;

use checkpoint::retry;
pub use checkpoint::retry_counted;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Take a checkpoint at least this often (milliseconds of wall time).
    pub checkpoint_interval_ms: u64,
    /// ... or after this many records, whichever comes first.
    pub checkpoint_every_records: u64,
    /// ... or once node actors hold this many bucket deltas for the open interval. Memory
    /// follows buckets, not records: a record creates up to ~20 new buckets where its keys are
    /// fresh (sparse leaves, a new hour) and almost none where they coalesce, so a record count
    /// alone lets an interval over sparse keys hold several times the memory of a dense one.
    /// 0: no bound.
    pub checkpoint_max_buckets: u64,
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
            checkpoint_max_buckets: 2_000_000,
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
    task: tokio::task::JoinHandle<Result<crate::store::Written, StoreError>>,
}

struct TenantHandle {
    actor: ActorRef<CoordMsg>,
    /// Batches processed since the last committed checkpoint: replayed if the tenant is rebuilt.
    /// Each batch is tagged with the sequence number of the last snapshot taken before it: a
    /// committed checkpoint `s` covers exactly the batches tagged below `s`.
    log: Vec<(u64, TaggedBatch)>,
    /// Consecutive rebuilds without a completed batch.
    restarts: u32,
    /// Events the coordinator holds for its next round, as of its last answer.
    pending: u64,
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
    /// Events the nodes got in rounds this interval, and the bucket deltas per such event the
    /// last interval ended with: what `checkpoint_max_buckets` is checked against.
    interval_events: u64,
    buckets_per_event: f64,
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
            interval_events: 0,
            buckets_per_event: 0.0,
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

    /// Marks the records up to `position` as processed (for sources that deliver out of band).
    pub fn set_position(&mut self, position: Vec<u8>) {
        self.position = position;
    }

    /// Stops every tenant's actors and waits until each coordinator has dropped its state (and
    /// with it its handle on the store): a caller can open the store again at once (an embedded
    /// store's file lock is held until the last handle goes).
    pub async fn shutdown(&mut self) {
        for (tenant, h) in self.tenants.drain() {
            // An error other than the timeout is an actor already gone: nothing to wait for.
            let stopped = h.actor.stop_and_wait(None, Some(Duration::from_secs(10)));
            if let Err(ractor::RactorErr::Timeout) = stopped.await {
                warn!(tenant, "a tenant coordinator did not stop within 10 s");
            }
        }
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
