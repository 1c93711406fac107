//! The tenant coordinator: one actor per tenant. It validates the tenant's records in order
//! ([`Tenant::apply`]), spawns and links the node actors, drives rounds (the coalescing flush),
//! performs moves and deletes on a quiescent tree, and takes the tenant's part of a checkpoint.
//!
//! Node actors are linked to a small per-tenant supervisor actor rather than to the coordinator
//! itself, because the coordinator awaits rounds inside its handlers and so could not take
//! supervision events while a round is in flight; the supervisor forwards them as signals.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::concurrency::oneshot;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::{debug, info, warn};

use crate::node::{
    keys_empty, keys_of, FullBuckets, Journal, JournalRef, KeySet, NodeActor, NodeArgs, NodeEvent,
    NodeMsg, NodeSnapshot, NodeState, SnapshotCall, TenantSignal, STOP_REASON,
};
use crate::record::{Mode, Record, Refusal};
use crate::stats::Stats;
use crate::store::{
    BucketWrite, DedupBatch, Load, NodeHeader, NodeRow, Store, StoreError, TenantChanges,
};
use crate::tenant::{Effect, NodeIx, Tenant, TenantSettings};

/// Records of one tenant, tagged by their position in the source (line number, offset...).
pub type TaggedBatch = Arc<Vec<(u64, Record)>>;

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// The tenant's actor tree broke (a node failed past its restart limit, or broke the
    /// round protocol): the engine rebuilds the tenant from its checkpoint.
    #[error("node actor failed: {0}")]
    NodeFailed(String),
    #[error("loading the tenant from the store: {0}")]
    Store(#[from] StoreError),
    #[error("spawning the tenant coordinator: {0}")]
    Spawn(String),
    #[error("tenant coordinator stopped before answering")]
    CoordinatorStopped,
    #[error("tenant coordinator unreachable")]
    CoordinatorUnreachable,
    #[error("tenant coordinator did not answer")]
    CoordinatorSilent,
}

#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub refused: Vec<(u64, Refusal)>,
    pub accepted: u64,
    pub duplicates: u64,
    /// Events accepted and not yet sent to the nodes (waiting for a round), and events the
    /// nodes got in rounds since the last answer: the engine estimates from them the bucket
    /// deltas the interval will hold (see `Engine::checkpoint_due`).
    pub pending_events: u64,
    pub sent_events: u64,
}

pub enum CoordMsg {
    Process {
        batch: TaggedBatch,
        reply: RpcReplyPort<Result<BatchOutcome, TenantError>>,
    },
    Snapshot {
        seq: u64,
        reply: RpcReplyPort<Result<TenantChanges, TenantError>>,
    },
    /// Chaos testing: a random live node actor, if any.
    RandomNode(RpcReplyPort<Option<ActorRef<NodeMsg>>>),
    /// Tests: the state of one node, after settling.
    #[cfg(feature = "test-hooks")]
    NodeState {
        hierarchy: String,
        node: String,
        reply: RpcReplyPort<Option<NodeState>>,
    },
    /// Tests: one node's actor.
    #[cfg(feature = "test-hooks")]
    NodeRef {
        hierarchy: String,
        node: String,
        reply: RpcReplyPort<Option<ActorRef<NodeMsg>>>,
    },
    /// Waits until the node actor `id` has been reported down and dealt with (restarted, or the
    /// tenant failed): lets chaos kills and tests wait for the restart they caused.
    AwaitDown {
        id: ActorId,
        reply: RpcReplyPort<Result<(), TenantError>>,
    },
}

pub struct CoordArgs {
    pub tenant: String,
    pub settings: TenantSettings,
    pub store: Arc<dyn Store>,
    /// The last snapshot the engine took: nodes created from now on are newer than it.
    pub snap_seq: u64,
    pub stats: Arc<Stats>,
}

pub struct Coordinator;

/// The coordinator actor's state: the tenant's bookkeeping and its node actors.
pub struct CoordinatorState {
    tenant: Tenant,
    actors: Vec<Option<ActorRef<NodeMsg>>>,
    pending: Vec<Vec<NodeEvent>>,
    touched: Vec<NodeIx>,
    pending_events: usize,
    /// Events sent to the nodes in rounds since the last batch answer (see [`BatchOutcome`]).
    sent_events: u64,
    oldest_pending: Option<std::time::Instant>,
    mark: Vec<u64>,
    expect: Vec<u32>,
    generation: u64,
    dirty: HashSet<NodeIx>,
    deleted: Vec<(String, String)>,
    stored_dedup: VecDeque<(u64, i64)>,
    signals: UnboundedReceiver<TenantSignal>,
    signals_tx: UnboundedSender<TenantSignal>,
    supervisor: ActorRef<()>,
    broken: Option<String>,
    store: Arc<dyn Store>,
    stats: Arc<Stats>,
    /// Each live node's journal (see [`Journal`]), by slot.
    journals: Vec<Option<JournalRef>>,
    /// Live node actors by id, to know which node a supervision event is about.
    ids: HashMap<ActorId, NodeIx>,
    /// Recent restarts per node, for the restart intensity limit.
    restarts: HashMap<NodeIx, VecDeque<Instant>>,
    /// Node actors reported down and dealt with, for `AwaitDown` (cleared at each snapshot).
    handled_down: HashSet<ActorId>,
    /// The last snapshot this tenant took part in (or the engine's, at spawn).
    last_snap: u64,
    /// The nodes of the last snapshot: their journals are settled at the next one.
    snapshotted: Vec<NodeIx>,
    /// Nodes spawned but not yet known to have started (see [`CoordinatorState::spawn_node`]).
    starting: Vec<NodeStart>,
    /// Nodes without an actor (passivated, restored, or created and not yet addressed): what
    /// they hold besides their stored buckets. A slot has an actor or a parked entry, never both.
    parked: Vec<Option<Parked>>,
    /// The last checkpoint each node took part in (was dirty in), for idle passivation.
    last_dirty: Vec<u64>,
}

/// A node without an actor. Its buckets are in the store (or it has none yet); what an actor
/// would hold beyond them is this: its totals, and the changes its next row must carry.
#[derive(Debug, Clone, Default)]
struct Parked {
    /// The totals as of its last row, or as created (`None`: empty, which is what a created
    /// node has; a million created nodes then cost no header each).
    header: Option<Box<NodeHeader>>,
    /// Created after this snapshot: a stored row of its name from a checkpoint at or below it
    /// belongs to an earlier node (see [`Journal::created_after`]).
    fresh_after: Option<u64>,
    /// Got its first child while parked (`current` mode): its next row keeps `own` buckets
    /// apart, and the store copies its `subtree` buckets to `own` first.
    grow: bool,
}

impl Parked {
    fn stored(header: NodeHeader) -> Self {
        Parked {
            header: Some(Box::new(header)),
            ..Parked::default()
        }
    }

    fn header(&self) -> NodeHeader {
        self.header.as_deref().cloned().unwrap_or_default()
    }

    fn journal(&self) -> JournalRef {
        match self.fresh_after {
            Some(seq) => Journal::created_after(seq),
            None => Journal::restored(),
        }
    }

    /// Its row for a checkpoint, the same as its actor would have sent: no bucket changes.
    fn row(&mut self) -> (NodeHeader, BucketWrite) {
        let mut header = self.header();
        let copy_own = std::mem::take(&mut self.grow);
        header.own_buckets |= copy_own;
        if copy_own {
            self.header = Some(Box::new(header.clone()));
        }
        (header, BucketWrite::Fold { copy_own })
    }
}

type NodeStart =
    ractor::concurrency::JoinHandle<Result<ractor::concurrency::JoinHandle<()>, ractor::SpawnErr>>;

/// Forwards node failures to the coordinator's signal channel.
struct NodeSupervisor;

#[ractor::async_trait]
impl Actor for NodeSupervisor {
    type Msg = ();
    type State = UnboundedSender<TenantSignal>;
    type Arguments = UnboundedSender<TenantSignal>;

    async fn pre_start(
        &self,
        _: ActorRef<()>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<()>,
        evt: SupervisionEvent,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (id, reason) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (
                cell.get_id(),
                format!("node actor {} panicked: {err}", cell.get_id()),
            ),
            SupervisionEvent::ActorTerminated(cell, _, reason)
                if reason.as_deref() != Some(STOP_REASON) =>
            {
                let why = format!(
                    "node actor {} stopped: {}",
                    cell.get_id(),
                    reason.unwrap_or_else(|| "no reason".into())
                );
                (cell.get_id(), why)
            }
            _ => return Ok(()),
        };
        warn!(actor = %id, reason = %reason, "node actor down");
        let _ = tx.send(TenantSignal::NodeDown { id, reason });
        Ok(())
    }
}

impl CoordinatorState {
    /// Restarts every node reported down since the last look. Called only where the tree is
    /// quiescent (no round, move or snapshot in flight), which is what a node restart needs.
    async fn check(&mut self) -> Result<(), TenantError> {
        if let Some(r) = &self.broken {
            return Err(TenantError::NodeFailed(r.clone()));
        }
        while let Ok(sig) = self.signals.try_recv() {
            self.on_signal(sig).await?;
        }
        Ok(())
    }

    async fn on_signal(&mut self, sig: TenantSignal) -> Result<(), TenantError> {
        match sig {
            TenantSignal::NodeDown { id, reason } => self.restart_node(id, reason).await,
            // A round's leftovers cannot arrive at a quiescent point: something is off.
            TenantSignal::RoundDone => Err(self.fail("round signal outside a round".into())),
        }
    }

    /// Brings node actor `id` back: its row from the last committed checkpoint, then its
    /// journal since that checkpoint replayed onto it (ARCHITECTURE.md, "Node restart"). A node
    /// that keeps failing escalates: the tenant fails and the engine rebuilds it.
    async fn restart_node(&mut self, id: ActorId, reason: String) -> Result<(), TenantError> {
        self.handled_down.insert(id);
        let Some(ix) = self.ids.remove(&id) else {
            // Not a live node (one already replaced or deleted): nothing to bring back.
            return Ok(());
        };
        let s = self.tenant.settings;
        let window = Duration::from_millis(s.node_restart_window_ms);
        let recent = self.restarts.entry(ix).or_default();
        recent.retain(|t| t.elapsed() < window);
        if recent.len() >= s.node_max_restarts as usize {
            let n = recent.len();
            return Err(self.fail(format!(
                "node {} restarted {n} times within {} ms, escalating to a tenant rebuild; last failure: {reason}",
                self.tenant.slot(ix).name,
                s.node_restart_window_ms
            )));
        }
        recent.push_back(Instant::now());
        let (hierarchy, name) = self.names(ix);
        let stored = match self
            .store
            .load_node(&self.tenant.id, &hierarchy, &name, Load::Headers)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Err(self.fail(format!(
                    "node {name} is down ({reason}) and its stored row could not be read: {e}"
                )))
            }
        };
        let journal = self.journals[ix as usize]
            .clone()
            .expect("live node has a journal");
        let base = if journal
            .lock()
            .expect("journal")
            .base_is_stored(stored.as_of)
        {
            match stored.value {
                Some(row) => NodeState::from_header(row.header),
                None => {
                    return Err(self.fail(format!(
                        "node {name} is down ({reason}) and checkpoint {} has no row for it",
                        stored.as_of
                    )))
                }
            }
        } else {
            NodeState::default()
        };
        self.spawn_node(ix, base, journal, Some(stored.as_of))?;
        self.started().await?;
        let me = self.actor(ix).clone();
        // Its children learn the new actor from their next round. A `Grow` still in the dead actor's mailbox was lost with it; no child delta can have
        // arrived since (it would have come in a round, after the `Grow`), so sending it again
        // is exact, and a no-op if it had been applied.
        if !self.tenant.slot(ix).children.is_empty() && me.send_message(NodeMsg::Grow).is_err() {
            return Err(self.fail(format!("node {ix} is gone")));
        }
        self.stats.node_restarts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("canopy_actor_restarts_total", "kind" => "node").increment(1);
        info!(tenant = %self.tenant.id, hierarchy = %hierarchy, node = %name, as_of = stored.as_of, reason = %reason, "node actor restarted from its checkpoint and journal");
        Ok(())
    }

    /// Waits for node actor `id`'s failure to be reported, and deals with it.
    async fn await_down(&mut self, id: ActorId) -> Result<(), TenantError> {
        self.check().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.handled_down.remove(&id) {
            match tokio::time::timeout_at(deadline, self.signals.recv()).await {
                Ok(Some(sig)) => self.on_signal(sig).await?,
                Ok(None) => return Err(self.fail("signal channel closed".into())),
                Err(_) => return Err(self.fail(format!("node actor {id} was not reported down"))),
            }
        }
        Ok(())
    }

    /// Node `ix`'s hierarchy and name (what the store keys it by).
    fn names(&self, ix: NodeIx) -> (String, String) {
        let slot = self.tenant.slot(ix);
        (
            self.tenant.hierarchies[slot.hierarchy as usize]
                .name
                .clone(),
            slot.name.to_string(),
        )
    }

    fn fail(&mut self, why: String) -> TenantError {
        self.broken = Some(why.clone());
        TenantError::NodeFailed(why)
    }

    fn actor(&self, ix: NodeIx) -> &ActorRef<NodeMsg> {
        self.actors[ix as usize]
            .as_ref()
            .expect("live node has an actor")
    }

    fn grow(&mut self) {
        let n = self.tenant.slots.len();
        if self.actors.len() < n {
            self.actors.resize(n, None);
            self.journals.resize(n, None);
            self.pending.resize_with(n, Vec::new);
            self.mark.resize(n, 0);
            self.expect.resize(n, 0);
            self.parked.resize(n, None);
            self.last_dirty.resize(n, 0);
        }
    }

    /// Node `ix` with an actor: a parked node is spawned from its parked entry (its buckets are
    /// in the store, its journal empty: everything it held was durable or is in the entry).
    fn activate(&mut self, ix: NodeIx) -> Result<(), TenantError> {
        if self.actors[ix as usize].is_some() {
            return Ok(());
        }
        let Some(p) = self.parked[ix as usize].take() else {
            return Err(self.fail(format!("node {ix} has neither an actor nor a parked state")));
        };
        self.spawn_node(ix, NodeState::from_header(p.header()), p.journal(), None)?;
        // A first child that came while it was parked: the actor keeps `own` apart from now on
        // and has the store copy them, exactly as if the `Grow` had reached it then.
        if p.grow && self.actor(ix).send_message(NodeMsg::Grow).is_err() {
            return Err(self.fail(format!("node {ix} is gone")));
        }
        self.stats.activations.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("canopy_node_activations_total").increment(1);
        Ok(())
    }

    /// Passivates the nodes idle for `passivate_idle_checkpoints` checkpoints, and, while the
    /// process holds more than `max_resident_nodes` node actors, the least recently active of
    /// the others that took no part in checkpoint `seq`. Runs at the end of a snapshot: the
    /// tree is quiescent and every earlier checkpoint is durable, so such a node holds nothing
    /// its stored row lacks.
    async fn passivate(&mut self, seq: u64) -> Result<(), TenantError> {
        let s = self.tenant.settings;
        let idle = s.passivate_idle_checkpoints.max(1);
        let mut candidates: Vec<(u64, NodeIx)> = Vec::new();
        for (ix, a) in self.actors.iter().enumerate() {
            let ix = ix as NodeIx;
            if a.is_some() && self.last_dirty[ix as usize] < seq {
                candidates.push((self.last_dirty[ix as usize], ix));
            }
        }
        let resident = self.stats.resident_nodes.load(Ordering::Relaxed);
        let over = resident.saturating_sub(s.max_resident_nodes as u64) as usize;
        let idle_n = candidates.iter().filter(|(d, _)| seq - d >= idle).count();
        let take = idle_n.max(over.min(candidates.len()));
        if take == 0 {
            return Ok(());
        }
        if take < candidates.len() {
            candidates.select_nth_unstable(take);
            candidates.truncate(take);
        }
        let (tx, mut rx) = unbounded_channel();
        for &(_, ix) in &candidates {
            let msg = NodeMsg::Passivate {
                replies: tx.clone(),
            };
            if self.actor(ix).send_message(msg).is_err() {
                return Err(self.fail(format!("node {ix} is gone")));
            }
        }
        drop(tx);
        let mut gone = 0u64;
        for _ in 0..candidates.len() {
            let Some((ix, header)) = rx.recv().await else {
                return Err(self.fail("a node did not answer a passivation".into()));
            };
            let Some(header) = header else { continue };
            if let Some(a) = self.actors[ix as usize].take() {
                self.ids.remove(&a.get_id());
            }
            self.parked[ix as usize] = Some(Parked::stored(header));
            self.journals[ix as usize] = None;
            self.restarts.remove(&ix);
            gone += 1;
        }
        self.stats.resident_nodes.fetch_sub(gone, Ordering::Relaxed);
        self.stats.passivations.fetch_add(gone, Ordering::Relaxed);
        metrics::counter!("canopy_node_passivations_total").increment(gone);
        metrics::gauge!("canopy_node_actors_resident")
            .set(self.stats.resident_nodes.load(Ordering::Relaxed) as f64);
        Ok(())
    }

    /// Spawns node `ix` without waiting for it to start: its mailbox takes messages at once, and
    /// [`CoordinatorState::started`] waits for the start later, before anything waits on the node's answer
    /// to a round. Awaiting each spawn costs a task handoff and a wake-up per node: for 97,655
    /// actors alone, 1.6 s against 0.22 s this way (`cargo bench --bench actor_floor`).
    fn spawn_node(
        &mut self,
        ix: NodeIx,
        state: NodeState,
        journal: JournalRef,
        replay_onto: Option<u64>,
    ) -> Result<(), TenantError> {
        self.grow();
        let args = NodeArgs {
            ix,
            mode: self.tenant.mode_of(ix),
            state,
            signals: self.signals_tx.clone(),
            journal: journal.clone(),
            durable_seq: self.stats.durable_seq.clone(),
            interval_buckets: self.stats.interval_buckets.clone(),
            replay_onto,
        };
        let (actor, start) = ractor::ActorRuntime::spawn_linked_instant(
            None,
            NodeActor,
            args,
            self.supervisor.get_cell(),
        )
        .map_err(|e| self.fail(format!("spawning a node actor: {e}")))?;
        self.starting.push(start);
        self.ids.insert(actor.get_id(), ix);
        // A restart replaces a dead actor: the count already holds the slot.
        if self.actors[ix as usize].is_none() {
            let resident = self.stats.resident_nodes.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::gauge!("canopy_node_actors_resident").set(resident as f64);
        }
        self.actors[ix as usize] = Some(actor);
        self.journals[ix as usize] = Some(journal);
        Ok(())
    }

    /// Waits until every node spawned since the last call has started. A node whose start failed
    /// is not linked to the supervisor (ractor links it once `pre_start` returns), so no
    /// `NodeDown` would ever report it: the tenant fails here instead.
    async fn started(&mut self) -> Result<(), TenantError> {
        for h in std::mem::take(&mut self.starting) {
            let why = match h.await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            return Err(self.fail(format!("a node actor did not start: {why}")));
        }
        Ok(())
    }

    /// Whether `rec` must wait for the pending events to settle. Only a move or delete in an
    /// `attributed` hierarchy does: there, numbers belong to the ancestors an event was accepted
    /// under. In `current` mode numbers follow the current topology, so pending events may as well
    /// flow up the new chain: a moved subtree's flushed numbers move with `Remove`/`Add` and its
    /// pending ones take the new path at the next round; a deleted leaf's pending events are
    /// dropped with it. (See ARCHITECTURE.md, "Topology changes".)
    fn settle_before(&self, rec: &Record) -> bool {
        if self.touched.is_empty() {
            return false;
        }
        match rec {
            Record::UpsertNode {
                hierarchy, node, ..
            }
            | Record::DeleteNode {
                hierarchy, node, ..
            } => {
                self.tenant.hierarchy_mode(hierarchy) == Some(Mode::Attributed)
                    && self.tenant.node_ix(hierarchy, node).is_some()
            }
            _ => false,
        }
    }

    /// Sends every node its pending events and waits until the coalesced deltas reached the roots.
    async fn round(&mut self) -> Result<(), TenantError> {
        self.run_round(None).await.map(drop)
    }

    /// A round; with `snap` (a checkpoint's), every involved node also snapshots itself right
    /// after its flush. Returns `None` if no node had events, else the involved nodes'
    /// snapshots (empty without `snap`); the involved nodes are those marked with the new
    /// `generation`.
    async fn run_round(
        &mut self,
        snap: Option<u64>,
    ) -> Result<Option<Vec<(NodeIx, NodeSnapshot)>>, TenantError> {
        self.started().await?;
        if self.touched.is_empty() {
            return Ok(None);
        }
        // Every pending event ends up in one delta per ancestor: the coalescing ratio is
        // events coalesced / deltas sent.
        metrics::counter!("canopy_events_coalesced_total").increment(self.pending_events as u64);
        self.sent_events += self.pending_events as u64;
        self.pending_events = 0;
        self.oldest_pending = None;
        self.generation += 1;
        let g = self.generation;
        let mut involved = Vec::with_capacity(self.touched.len() * 2);
        for n in std::mem::take(&mut self.touched) {
            // A node deleted since it was touched (its slot empty, or reused by a new node that
            // has no events yet) has nothing to send.
            if self.mark[n as usize] == g || self.pending[n as usize].is_empty() {
                continue;
            }
            self.mark[n as usize] = g;
            self.expect[n as usize] = 0;
            involved.push(n);
            let mut c = n;
            while let Some(p) = self.tenant.slot(c).parent {
                if self.mark[p as usize] == g {
                    self.expect[p as usize] += 1;
                    break;
                }
                self.mark[p as usize] = g;
                self.expect[p as usize] = 1;
                involved.push(p);
                c = p;
            }
        }
        let mut roots = 0usize;
        let (call, mut replies) = match snap {
            Some(seq) => {
                let (tx, rx) = unbounded_channel();
                let call = SnapshotCall { seq, replies: tx };
                (Some(Arc::new(call)), Some(rx))
            }
            None => (None, None),
        };
        // Every involved node has an actor before any of them flushes to its parent.
        for &n in &involved {
            self.activate(n)?;
        }
        self.started().await?;
        for &n in &involved {
            let parent = match self.tenant.slot(n).parent {
                Some(p) => Some(self.actor(p).clone()),
                None => {
                    roots += 1;
                    None
                }
            };
            let events = std::mem::take(&mut self.pending[n as usize]);
            let msg = NodeMsg::Round {
                events,
                expect: self.expect[n as usize],
                parent,
                snapshot: call.clone(),
            };
            if self.actor(n).send_message(msg).is_err() {
                return Err(self.fail(format!("node {n} is gone")));
            }
            self.dirty.insert(n);
        }
        metrics::counter!("canopy_deltas_sent_total").increment(involved.len() as u64);
        while roots > 0 {
            match self.signals.recv().await {
                Some(TenantSignal::RoundDone) => roots -= 1,
                // Mid-round a restarted node could not tell which deltas it still owes: the
                // tenant is rebuilt instead (ARCHITECTURE.md, "Node restart").
                Some(TenantSignal::NodeDown { reason, .. }) => {
                    return Err(self.fail(format!("{reason} (during a round)")))
                }
                None => return Err(self.fail("signal channel closed".into())),
            }
        }
        // The nodes hold the only senders now: if one dies before answering, the channel closes.
        drop(call);
        let mut snaps = Vec::new();
        if let Some(rx) = &mut replies {
            snaps.reserve_exact(involved.len());
            while snaps.len() < involved.len() {
                match rx.recv().await {
                    Some(s) => snaps.push(s),
                    None => return Err(self.fail("a node did not answer a snapshot".into())),
                }
            }
        }
        Ok(Some(snaps))
    }

    async fn call<T: Send + 'static>(
        &mut self,
        ix: NodeIx,
        f: impl FnOnce(RpcReplyPort<T>) -> NodeMsg,
    ) -> Result<T, TenantError> {
        self.activate(ix)?;
        let actor = self.actor(ix).clone();
        match actor.call(f, None).await {
            Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
            _ => Err(self.fail(format!("node {ix} did not answer"))),
        }
    }

    /// Tells a node's parent that it has a child (it then keeps its own buckets apart). A
    /// parked parent is not activated for it: its next row carries the change.
    fn grow_parent(&mut self, node: NodeIx) -> Result<(), TenantError> {
        if let Some(p) = self.tenant.slot(node).parent {
            let mode = self.tenant.mode_of(p);
            match &mut self.parked[p as usize] {
                Some(parked) => {
                    let kept_apart = parked.header.as_ref().is_some_and(|h| h.own_buckets);
                    if mode == Mode::Current && !kept_apart {
                        parked.grow = true;
                    }
                }
                None => {
                    if self.actor(p).send_message(NodeMsg::Grow).is_err() {
                        return Err(self.fail(format!("node {p} is gone")));
                    }
                }
            }
            // Its header (own buckets kept apart) must reach the next checkpoint.
            self.dirty.insert(p);
        }
        Ok(())
    }

    /// Takes `gone` out of the old chain (exact extremes) and adds it to the new one.
    async fn move_numbers(
        &mut self,
        node: NodeIx,
        from: Option<NodeIx>,
        to: Option<NodeIx>,
    ) -> Result<(), TenantError> {
        // The numbers that move are the moved node's stored buckets plus those in memory.
        // Taking them out of the old chain needs exact extremes where they have buckets: those
        // nodes and their children hold complete values at those keys until the next snapshot.
        // The new chain only adds, a delta like any other. So a move costs in proportion to the
        // moved subtree's buckets (times the old chain's nodes), not to the old chain's history.
        self.activate(node)?;
        let (stored, as_of) = self.stored_buckets(node, None).await?;
        let gone = Arc::new(
            self.call(node, |reply| NodeMsg::Subtree {
                stored,
                as_of,
                reply,
            })
            .await?,
        );
        if gone.is_empty() {
            return Ok(());
        }
        let keys = Arc::new(keys_of(&gone.buckets));
        let mut old_chain: Vec<NodeIx> = from.into_iter().collect();
        if let Some(f) = from {
            old_chain.extend(self.tenant.ancestors(f));
        }
        for &a in &old_chain {
            self.hydrate(a, &keys).await?;
            for c in self.tenant.slot(a).children.clone() {
                self.hydrate(c, &keys).await?;
            }
        }
        for a in old_chain {
            let children: Vec<_> = self
                .tenant
                .slot(a)
                .children
                .iter()
                .map(|c| self.actor(*c).clone())
                .collect();
            let g = gone.clone();
            self.call(a, |reply| NodeMsg::Remove {
                gone: g,
                children,
                reply,
            })
            .await?;
            self.dirty.insert(a);
        }
        let mut new_chain: Vec<NodeIx> = to.into_iter().collect();
        if let Some(t) = to {
            new_chain.extend(self.tenant.ancestors(t));
        }
        for a in new_chain {
            let d = gone.clone();
            self.call(a, |reply| NodeMsg::Add { delta: d, reply })
                .await?;
            self.dirty.insert(a);
        }
        Ok(())
    }

    /// Node `ix`'s stored buckets (all of them, or those at `keys`), and the checkpoint they were
    /// read from. A node created since the last snapshot has none (a stored row of its name
    /// belongs to an earlier node).
    async fn stored_buckets(
        &mut self,
        ix: NodeIx,
        keys: Option<&Arc<KeySet>>,
    ) -> Result<(FullBuckets, u64), TenantError> {
        let journal = self.journals[ix as usize]
            .clone()
            .expect("live node has a journal");
        if !journal
            .lock()
            .expect("journal")
            .base_is_stored(self.last_snap)
        {
            return Ok((FullBuckets::default(), self.last_snap));
        }
        let (hierarchy, name) = self.names(ix);
        let load = match keys {
            Some(k) => Load::BucketsAt(k.clone()),
            None => Load::Buckets,
        };
        let r = match self
            .store
            .load_node(&self.tenant.id, &hierarchy, &name, load)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Err(self.fail(format!(
                    "the stored buckets of node {name} could not be read: {e}"
                )))
            }
        };
        let stored = match r.value {
            // A keyed load holds only those keys.
            Some(row) if journal.lock().expect("journal").base_is_stored(r.as_of) => {
                FullBuckets::from_rows(row.header.own_buckets, &row.buckets)
            }
            _ => FullBuckets::default(),
        };
        Ok((stored, r.as_of))
    }

    /// Makes node `ix` hold complete values at `keys` until the next snapshot (a move needs
    /// them). Nothing runs on the node between the read and its `Hydrate`: it is between
    /// rounds, and it combines what was read with what it sent last exactly as it was at the
    /// read.
    async fn hydrate(&mut self, ix: NodeIx, keys: &Arc<KeySet>) -> Result<(), TenantError> {
        self.activate(ix)?;
        if keys_empty(keys) {
            return Ok(());
        }
        let (stored, as_of) = self.stored_buckets(ix, Some(keys)).await?;
        if self
            .actor(ix)
            .send_message(NodeMsg::Hydrate {
                keys: keys.clone(),
                stored,
                as_of,
            })
            .is_err()
        {
            return Err(self.fail(format!("node {ix} is gone")));
        }
        // Its next snapshot writes those values and returns it to deltas.
        self.dirty.insert(ix);
        metrics::counter!("canopy_node_hydrations_total").increment(1);
        Ok(())
    }

    async fn process(&mut self, batch: &[(u64, Record)]) -> Result<BatchOutcome, TenantError> {
        self.check().await?;
        let mut out = BatchOutcome::default();
        for (tag, rec) in batch {
            if self.settle_before(rec) {
                // In an attributed hierarchy a topology change decides which ancestors later
                // numbers belong to: settle every event accepted under the old topology first.
                self.round().await?;
            }
            let effect = match self.tenant.apply(rec) {
                Ok(e) => e,
                Err(r) => {
                    out.refused.push((*tag, r));
                    continue;
                }
            };
            out.accepted += 1;
            match effect {
                Effect::None => {}
                Effect::Duplicate => {
                    out.accepted -= 1;
                    out.duplicates += 1;
                }
                Effect::Event {
                    nodes,
                    keys,
                    metrics,
                } => {
                    for n in nodes {
                        let list = &mut self.pending[n as usize];
                        if list.is_empty() {
                            self.touched.push(n);
                        }
                        list.push(NodeEvent {
                            keys,
                            metrics: metrics.clone(),
                        });
                    }
                    self.pending_events += 1;
                    self.oldest_pending
                        .get_or_insert_with(std::time::Instant::now);
                }
                Effect::Create { node } => {
                    self.grow();
                    self.grow_parent(node)?;
                    // Parked until something is addressed to it: most nodes of a large tree
                    // are quiet, and an actor costs ~5 KB and a spawn.
                    self.parked[node as usize] = Some(Parked {
                        fresh_after: Some(self.last_snap),
                        ..Parked::default()
                    });
                    self.dirty.insert(node);
                }
                Effect::Move { node, from } => {
                    let to = self.tenant.slot(node).parent;
                    self.grow_parent(node)?;
                    if self.tenant.mode_of(node) == Mode::Current {
                        self.move_numbers(node, from, to).await?;
                    }
                    // Its next round names its new parent, and its next row (written by its
                    // actor, or from its parked entry) names it too.
                    self.dirty.insert(node);
                }
                Effect::Delete { node, parent } => {
                    if self.tenant.mode_of(node) == Mode::Current {
                        self.move_numbers(node, parent, None).await?;
                    }
                    let slot = self.tenant.slot(node);
                    self.deleted.push((
                        self.tenant.hierarchies[slot.hierarchy as usize]
                            .name
                            .clone(),
                        slot.name.to_string(),
                    ));
                    // Events of the node still pending here are part of its numbers, which
                    // leave with it (current mode; attributed settled them before the delete).
                    self.pending[node as usize].clear();
                    if let Some(a) = self.actors[node as usize].take() {
                        self.ids.remove(&a.get_id());
                        a.stop(Some(STOP_REASON.into()));
                        self.stats.resident_nodes.fetch_sub(1, Ordering::Relaxed);
                    }
                    self.parked[node as usize] = None;
                    self.journals[node as usize] = None;
                    self.restarts.remove(&node);
                    self.dirty.remove(&node);
                    self.tenant.release(node);
                }
            }
        }
        // Every node this batch created has started by the time the batch is answered.
        self.started().await?;
        // Coalescing: a round flushes many events at once; bounded by count and by age.
        let s = &self.tenant.settings;
        let old = self
            .oldest_pending
            .is_some_and(|t| t.elapsed().as_millis() as u64 >= s.round_interval_ms);
        if self.pending_events >= s.round_max_events || old {
            self.round().await?;
        }
        out.pending_events = self.pending_events as u64;
        out.sent_events = std::mem::take(&mut self.sent_events);
        Ok(out)
    }

    async fn snapshot(&mut self, seq: u64) -> Result<TenantChanges, TenantError> {
        self.check().await?;
        let t0 = Instant::now();
        let retain_from = self
            .tenant
            .settings
            .retention
            .prune_cutoffs(self.tenant.watermark.unwrap_or(0));
        // The round's nodes answer the checkpoint as they flush; only dirty nodes without
        // events in it (moved, grown, created, hydrated) are asked separately below.
        let in_round = self.run_round(Some(seq)).await?;
        // What the snapshot round sent belongs to the interval it closes.
        self.sent_events = 0;
        let round_ms = t0.elapsed().as_millis() as u64;
        // Checkpoint `seq` begins only once every earlier one is durable: the journals of nodes
        // snapshotted last time and quiet since can let go of what they hold (the dirty ones
        // do it themselves at their snapshot).
        for n in std::mem::take(&mut self.snapshotted) {
            if !self.dirty.contains(&n) {
                if let Some(j) = self.journals.get(n as usize).and_then(Option::as_ref) {
                    j.lock().expect("journal").settle();
                }
            }
        }
        let g = self.generation;
        let answered = |n: NodeIx| in_round.is_some() && self.mark[n as usize] == g;
        let mut waits = Vec::new();
        let mut parked_rows = Vec::new();
        for &n in &self.dirty {
            if answered(n) {
                continue;
            }
            if let Some(p) = &mut self.parked[n as usize] {
                let (header, write) = p.row();
                parked_rows.push((
                    n,
                    NodeSnapshot {
                        header,
                        buckets: Default::default(),
                        replace: Default::default(),
                        write,
                    },
                ));
                continue;
            }
            let (tx, rx) = oneshot();
            if self
                .actor(n)
                .send_message(NodeMsg::Snapshot {
                    seq,
                    reply: tx.into(),
                })
                .is_err()
            {
                return Err(self.fail(format!("node {n} is gone")));
            }
            waits.push((n, rx));
        }
        let mut snaps = in_round.unwrap_or_default();
        snaps.reserve_exact(waits.len() + parked_rows.len());
        snaps.append(&mut parked_rows);
        for (n, rx) in waits {
            match rx.await {
                Ok(s) => snaps.push((n, s)),
                Err(_) => return Err(self.fail(format!("node {n} did not answer a snapshot"))),
            }
        }
        let mut put_nodes = Vec::with_capacity(snaps.len());
        for (n, snap) in snaps {
            let slot = self.tenant.slot(n);
            put_nodes.push(NodeRow {
                hierarchy: self.tenant.hierarchies[slot.hierarchy as usize]
                    .name
                    .clone(),
                node: slot.name.to_string(),
                parent: slot.parent.map(|p| self.tenant.slot(p).name.to_string()),
                header: snap.header,
                buckets: snap.buckets,
                write: snap.write,
                replace: snap.replace,
            });
        }
        // `round_ms` includes the snapshots of the round's nodes; `rest_ms` is the other dirty nodes'.
        debug!(
            round_ms,
            rest_ms = t0.elapsed().as_millis() as u64 - round_ms,
            nodes = put_nodes.len(),
            "tenant snapshot"
        );
        let dedup = if self.tenant.new_ids.is_empty() {
            None
        } else {
            let b = DedupBatch {
                seq,
                ids: std::mem::take(&mut self.tenant.new_ids),
            };
            self.stored_dedup.push_back((seq, b.max_ts()));
            Some(b)
        };
        let mut expire_dedup = Vec::new();
        let t = &self.tenant;
        self.stored_dedup.retain(|(s, max)| {
            let keep = !t.dedup_batch_expired(*max);
            if !keep {
                expire_dedup.push(*s);
            }
            keep
        });
        self.tenant.sweep_dedup();
        let row = self.tenant.row_dirty.then(|| self.tenant.row());
        self.tenant.row_dirty = false;
        self.snapshotted = self.dirty.drain().collect();
        for &n in &self.snapshotted {
            self.last_dirty[n as usize] = seq;
        }
        self.last_snap = seq;
        self.passivate(seq).await?;
        self.handled_down.clear();
        Ok(TenantChanges {
            tenant: self.tenant.id.clone(),
            row,
            put_nodes,
            delete_nodes: std::mem::take(&mut self.deleted),
            dedup,
            expire_dedup,
            retain_from,
        })
    }

    async fn restore(&mut self, store: &dyn Store) -> Result<(), TenantError> {
        let image = store.load_tenant(&self.tenant.id, Load::Headers).await?;
        let Some(row) = image.row else { return Ok(()) };
        let topo: Vec<(String, String, Option<String>)> = image
            .nodes
            .iter()
            .map(|n| (n.hierarchy.clone(), n.node.clone(), n.parent.clone()))
            .collect();
        let ids = image
            .dedup
            .iter()
            .flat_map(|b| b.ids.iter().cloned())
            .collect::<Vec<_>>();
        self.tenant = Tenant::restore(
            self.tenant.id.clone(),
            self.tenant.settings,
            row,
            &topo,
            ids,
        );
        self.stored_dedup = image.dedup.iter().map(|b| (b.seq, b.max_ts())).collect();
        // No actor is spawned: every node starts passivated, with its stored totals, and is
        // activated when something is addressed to it. Resume time follows the active set.
        self.grow();
        let restored = image.nodes.len();
        for row in image.nodes {
            let ix = self
                .tenant
                .node_ix(&row.hierarchy, &row.node)
                .expect("restored node");
            self.parked[ix as usize] = Some(Parked::stored(row.header));
        }
        debug!(tenant = %self.tenant.id, nodes = restored, "tenant restored from checkpoint (nodes parked)");
        Ok(())
    }
}

#[ractor::async_trait]
impl Actor for Coordinator {
    type Msg = CoordMsg;
    type State = CoordinatorState;
    type Arguments = CoordArgs;

    async fn pre_start(
        &self,
        me: ActorRef<CoordMsg>,
        a: CoordArgs,
    ) -> Result<CoordinatorState, ActorProcessingErr> {
        let (tx, rx) = unbounded_channel();
        let (supervisor, _) =
            Actor::spawn_linked(None, NodeSupervisor, tx.clone(), me.get_cell()).await?;
        let mut c = CoordinatorState {
            tenant: Tenant::new(a.tenant, a.settings),
            actors: Vec::new(),
            pending: Vec::new(),
            touched: Vec::new(),
            pending_events: 0,
            sent_events: 0,
            oldest_pending: None,
            mark: Vec::new(),
            expect: Vec::new(),
            generation: 0,
            dirty: HashSet::new(),
            deleted: Vec::new(),
            stored_dedup: VecDeque::new(),
            signals: rx,
            signals_tx: tx,
            supervisor,
            broken: None,
            store: a.store.clone(),
            stats: a.stats,
            journals: Vec::new(),
            ids: HashMap::new(),
            restarts: HashMap::new(),
            handled_down: HashSet::new(),
            last_snap: a.snap_seq,
            snapshotted: Vec::new(),
            starting: Vec::new(),
            parked: Vec::new(),
            last_dirty: Vec::new(),
        };
        c.restore(&*a.store).await?;
        Ok(c)
    }

    async fn post_stop(
        &self,
        _: ActorRef<CoordMsg>,
        c: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        let mut n = 0;
        for a in c.actors.iter().flatten() {
            a.stop(Some(STOP_REASON.into()));
            n += 1;
        }
        c.stats.resident_nodes.fetch_sub(n, Ordering::Relaxed);
        c.supervisor.stop(Some(STOP_REASON.into()));
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<CoordMsg>,
        msg: CoordMsg,
        c: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CoordMsg::Process { batch, reply } => {
                let r = c.process(&batch).await;
                let _ = reply.send(r);
            }
            CoordMsg::Snapshot { seq, reply } => {
                let r = c.snapshot(seq).await;
                let _ = reply.send(r);
            }
            CoordMsg::RandomNode(reply) => {
                let live: Vec<_> = c.actors.iter().flatten().collect();
                let pick = if live.is_empty() {
                    None
                } else {
                    Some(live[rand::random_range(0..live.len())].clone())
                };
                let _ = reply.send(pick);
            }
            #[cfg(feature = "test-hooks")]
            CoordMsg::NodeState {
                hierarchy,
                node,
                reply,
            } => {
                // Settle pending events so that the answer reflects every accepted record.
                if let Err(e) = c.round().await {
                    warn!(error = %e, "round failed while reading a node state");
                }
                let st = match c.tenant.node_ix(&hierarchy, &node) {
                    Some(ix) if c.activate(ix).is_err() => None,
                    Some(ix) => match c.stored_buckets(ix, None).await {
                        Ok((stored, as_of)) => {
                            let (tx, rx) = oneshot();
                            let _ = c.actor(ix).send_message(NodeMsg::View {
                                stored,
                                as_of,
                                reply: tx.into(),
                            });
                            rx.await.ok()
                        }
                        Err(e) => {
                            warn!(error = %e, "reading a node's stored buckets failed");
                            None
                        }
                    },
                    None => None,
                };
                let _ = reply.send(st);
            }
            #[cfg(feature = "test-hooks")]
            CoordMsg::NodeRef {
                hierarchy,
                node,
                reply,
            } => {
                let r = match c.tenant.node_ix(&hierarchy, &node) {
                    Some(ix) => c.activate(ix).ok().map(|()| c.actor(ix).clone()),
                    None => None,
                };
                let _ = reply.send(r);
            }
            CoordMsg::AwaitDown { id, reply } => {
                let r = c.await_down(id).await;
                let _ = reply.send(r);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<CoordMsg>,
        evt: SupervisionEvent,
        c: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, e) = evt {
            c.broken = Some(format!("node supervisor failed: {e}"));
        }
        Ok(())
    }
}

/// Spawns a tenant coordinator, restoring the tenant from the store.
pub async fn spawn_tenant(
    tenant: &str,
    settings: TenantSettings,
    store: Arc<dyn Store>,
    snap_seq: u64,
    stats: Arc<Stats>,
    supervisor: Option<ActorCell>,
) -> Result<ActorRef<CoordMsg>, TenantError> {
    let args = CoordArgs {
        tenant: tenant.to_string(),
        settings,
        store,
        snap_seq,
        stats,
    };
    let r = match supervisor {
        Some(s) => Actor::spawn_linked(None, Coordinator, args, s).await,
        None => Actor::spawn(None, Coordinator, args).await,
    };
    r.map(|(a, _)| a)
        .map_err(|e| TenantError::Spawn(e.to_string()))
}
