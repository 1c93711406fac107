//! The tenant coordinator: one actor per tenant. It validates the tenant's records in order
//! ([`Tenant::apply`]), spawns and links the node actors, drives rounds (the coalescing flush),
//! performs moves and deletes on a quiescent tree, and takes the tenant's part of a checkpoint.
//!
//! Node actors are linked to a small per-tenant supervisor actor rather than to the coordinator
//! itself, because the coordinator awaits rounds inside its handlers and so could not take
//! supervision events while a round is in flight; the supervisor forwards them as signals.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use ractor::concurrency::oneshot;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::{debug, warn};

use crate::node::{NodeActor, NodeArgs, NodeEvent, NodeMsg, NodeState, TenantSignal};
use crate::record::{Mode, Record, Refusal};
use crate::store::{DedupBatch, NodeRow, Store, StoreError, TenantChanges};
use crate::tenant::{Effect, NodeIx, Tenant, TenantSettings};

/// Records of one tenant, tagged by their position in the source (line number, offset...).
pub type TaggedBatch = Arc<Vec<(u64, Record)>>;

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("node actor failed: {0}")]
    NodeDown(String),
    #[error("loading the tenant from the store: {0}")]
    Store(#[from] StoreError),
    #[error("stored state of node {0:?} is corrupt: {1}")]
    Corrupt(String, String),
}

#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub refused: Vec<(u64, Refusal)>,
    pub accepted: u64,
    pub duplicates: u64,
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
    /// Test/diagnostic: the state of one node, after settling.
    NodeState {
        hierarchy: String,
        node: String,
        reply: RpcReplyPort<Option<NodeState>>,
    },
}

pub struct CoordArgs {
    pub tenant: String,
    pub settings: TenantSettings,
    pub store: Arc<dyn Store>,
}

pub struct Coordinator;

pub struct Coord {
    t: Tenant,
    actors: Vec<Option<ActorRef<NodeMsg>>>,
    pending: Vec<Vec<NodeEvent>>,
    touched: Vec<NodeIx>,
    pending_events: usize,
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
}

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
        let reason = match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                format!("node actor {} panicked: {err}", cell.get_id())
            }
            SupervisionEvent::ActorTerminated(cell, _, reason)
                if reason.as_deref() != Some(STOP_REASON) =>
            {
                format!(
                    "node actor {} stopped: {}",
                    cell.get_id(),
                    reason.unwrap_or_else(|| "no reason".into())
                )
            }
            _ => return Ok(()),
        };
        metrics::counter!("canopy_actor_restarts_total", "kind" => "node").increment(1);
        warn!(reason = %reason, "node actor down; the tenant will be rebuilt from its checkpoint");
        let _ = tx.send(TenantSignal::NodeDown { reason });
        Ok(())
    }
}

const STOP_REASON: &str = "canopy:stop";

impl Coord {
    fn check(&mut self) -> Result<(), TenantError> {
        if let Some(r) = &self.broken {
            return Err(TenantError::NodeDown(r.clone()));
        }
        while let Ok(sig) = self.signals.try_recv() {
            if let TenantSignal::NodeDown { reason } = sig {
                self.broken = Some(reason.clone());
                return Err(TenantError::NodeDown(reason));
            }
        }
        Ok(())
    }

    fn fail(&mut self, why: String) -> TenantError {
        self.broken = Some(why.clone());
        TenantError::NodeDown(why)
    }

    fn actor(&self, ix: NodeIx) -> &ActorRef<NodeMsg> {
        self.actors[ix as usize]
            .as_ref()
            .expect("live node has an actor")
    }

    fn grow(&mut self) {
        let n = self.t.slots.len();
        if self.actors.len() < n {
            self.actors.resize(n, None);
            self.pending.resize_with(n, Vec::new);
            self.mark.resize(n, 0);
            self.expect.resize(n, 0);
        }
    }

    async fn spawn_node(&mut self, ix: NodeIx, state: NodeState) -> Result<(), TenantError> {
        self.grow();
        let parent = self.t.slot(ix).parent.map(|p| self.actor(p).clone());
        let args = NodeArgs {
            ix,
            mode: self.t.mode_of(ix),
            state,
            parent,
            signals: self.signals_tx.clone(),
        };
        let (actor, _) = Actor::spawn_linked(None, NodeActor, args, self.supervisor.get_cell())
            .await
            .map_err(|e| self.fail(format!("spawning a node actor: {e}")))?;
        self.actors[ix as usize] = Some(actor);
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
                self.t.hierarchy_mode(hierarchy) == Some(Mode::Attributed)
                    && self.t.node_ix(hierarchy, node).is_some()
            }
            _ => false,
        }
    }

    /// Sends every node its pending events and waits until the coalesced deltas reached the roots.
    async fn round(&mut self) -> Result<(), TenantError> {
        if self.touched.is_empty() {
            return Ok(());
        }
        // Every pending event ends up in one delta per ancestor: the coalescing ratio is
        // events coalesced / deltas sent.
        metrics::counter!("canopy_events_coalesced_total").increment(self.pending_events as u64);
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
            while let Some(p) = self.t.slot(c).parent {
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
        for &n in &involved {
            if self.t.slot(n).parent.is_none() {
                roots += 1;
            }
            let events = std::mem::take(&mut self.pending[n as usize]);
            let msg = NodeMsg::Round {
                events,
                expect: self.expect[n as usize],
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
                Some(TenantSignal::NodeDown { reason }) => return Err(self.fail(reason)),
                None => return Err(self.fail("signal channel closed".into())),
            }
        }
        Ok(())
    }

    async fn call<T: Send + 'static>(
        &mut self,
        ix: NodeIx,
        f: impl FnOnce(RpcReplyPort<T>) -> NodeMsg,
    ) -> Result<T, TenantError> {
        let actor = self.actor(ix).clone();
        match actor.call(f, None).await {
            Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
            _ => Err(self.fail(format!("node {ix} did not answer"))),
        }
    }

    /// Tells a node's parent that it has a child (it then keeps its own buckets apart).
    fn grow_parent(&mut self, node: NodeIx) -> Result<(), TenantError> {
        if let Some(p) = self.t.slot(node).parent {
            if self.actor(p).send_message(NodeMsg::Grow).is_err() {
                return Err(self.fail(format!("node {p} is gone")));
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
        let gone = Arc::new(self.call(node, NodeMsg::Subtree).await?);
        if gone.is_empty() {
            return Ok(());
        }
        let mut old_chain: Vec<NodeIx> = from.into_iter().collect();
        if let Some(f) = from {
            old_chain.extend(self.t.ancestors(f));
        }
        for a in old_chain {
            let children: Vec<_> = self
                .t
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
            new_chain.extend(self.t.ancestors(t));
        }
        for a in new_chain {
            let d = gone.clone();
            self.call(a, |reply| NodeMsg::Add { delta: d, reply })
                .await?;
            self.dirty.insert(a);
        }
        Ok(())
    }

    async fn process(&mut self, batch: &[(u64, Record)]) -> Result<BatchOutcome, TenantError> {
        self.check()?;
        let mut out = BatchOutcome::default();
        for (tag, rec) in batch {
            if self.settle_before(rec) {
                // In an attributed hierarchy a topology change decides which ancestors later
                // numbers belong to: settle every event accepted under the old topology first.
                self.round().await?;
            }
            let effect = match self.t.apply(rec) {
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
                    self.grow_parent(node)?;
                    self.spawn_node(node, NodeState::default()).await?;
                    self.dirty.insert(node);
                }
                Effect::Move { node, from } => {
                    let to = self.t.slot(node).parent;
                    self.grow_parent(node)?;
                    if self.t.mode_of(node) == Mode::Current {
                        self.move_numbers(node, from, to).await?;
                    }
                    let p = to.map(|p| self.actor(p).clone());
                    if self
                        .actor(node)
                        .send_message(NodeMsg::SetParent(p))
                        .is_err()
                    {
                        return Err(self.fail(format!("node {node} is gone")));
                    }
                    self.dirty.insert(node);
                }
                Effect::Delete { node, parent } => {
                    if self.t.mode_of(node) == Mode::Current {
                        self.move_numbers(node, parent, None).await?;
                    }
                    let slot = self.t.slot(node);
                    self.deleted.push((
                        self.t.hierarchies[slot.hierarchy as usize].name.clone(),
                        slot.name.clone(),
                    ));
                    // Events of the node still pending here are part of its numbers, which
                    // leave with it (current mode; attributed settled them before the delete).
                    self.pending[node as usize].clear();
                    if let Some(a) = self.actors[node as usize].take() {
                        a.stop(Some(STOP_REASON.into()));
                    }
                    self.dirty.remove(&node);
                    self.t.release(node);
                }
            }
        }
        // Coalescing: a round flushes many events at once; bounded by count and by age.
        let s = &self.t.settings;
        let old = self
            .oldest_pending
            .is_some_and(|t| t.elapsed().as_millis() as u64 >= s.round_interval_ms);
        if self.pending_events >= s.round_max_events || old {
            self.round().await?;
        }
        Ok(out)
    }

    async fn snapshot(&mut self, seq: u64) -> Result<TenantChanges, TenantError> {
        self.check()?;
        self.round().await?;
        let prune = self
            .t
            .settings
            .retention
            .prune_cutoffs(self.t.watermark.unwrap_or(0));
        let mut waits = Vec::with_capacity(self.dirty.len());
        for &n in &self.dirty {
            let (tx, rx) = oneshot();
            if self
                .actor(n)
                .send_message(NodeMsg::Snapshot {
                    prune,
                    reply: tx.into(),
                })
                .is_err()
            {
                return Err(self.fail(format!("node {n} is gone")));
            }
            waits.push((n, rx));
        }
        let mut put_nodes = Vec::with_capacity(waits.len());
        for (n, rx) in waits {
            let snap = match rx.await {
                Ok(s) => s,
                Err(_) => return Err(self.fail(format!("node {n} did not answer a snapshot"))),
            };
            let slot = self.t.slot(n);
            put_nodes.push(NodeRow {
                hierarchy: self.t.hierarchies[slot.hierarchy as usize].name.clone(),
                node: slot.name.clone(),
                parent: slot.parent.map(|p| self.t.slot(p).name.clone()),
                header: snap.header,
                buckets: snap.buckets,
            });
        }
        let dedup = if self.t.new_ids.is_empty() {
            None
        } else {
            let b = DedupBatch {
                seq,
                ids: std::mem::take(&mut self.t.new_ids),
            };
            self.stored_dedup.push_back((seq, b.max_ts()));
            Some(b)
        };
        let mut expire_dedup = Vec::new();
        let t = &self.t;
        self.stored_dedup.retain(|(s, max)| {
            let keep = !t.dedup_batch_expired(*max);
            if !keep {
                expire_dedup.push(*s);
            }
            keep
        });
        self.t.sweep_dedup();
        let row = self.t.row_dirty.then(|| self.t.row());
        self.t.row_dirty = false;
        self.dirty.clear();
        Ok(TenantChanges {
            tenant: self.t.id.clone(),
            row,
            put_nodes,
            delete_nodes: std::mem::take(&mut self.deleted),
            dedup,
            expire_dedup,
        })
    }

    async fn restore(&mut self, store: &dyn Store) -> Result<(), TenantError> {
        let image = store.load_tenant(&self.t.id).await?;
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
        self.t = Tenant::restore(self.t.id.clone(), self.t.settings, row, &topo, ids);
        self.stored_dedup = image.dedup.iter().map(|b| (b.seq, b.max_ts())).collect();
        // Parents first, so that every child is spawned knowing its parent's actor.
        let mut states: HashMap<NodeIx, NodeState> = HashMap::new();
        for n in &image.nodes {
            let ix = self
                .t
                .node_ix(&n.hierarchy, &n.node)
                .expect("restored node");
            states.insert(ix, NodeState::from_rows(n.header.clone(), &n.buckets));
        }
        let mut queue: VecDeque<NodeIx> = self
            .t
            .live_nodes()
            .filter(|n| self.t.slot(*n).parent.is_none())
            .collect();
        while let Some(n) = queue.pop_front() {
            let st = states.remove(&n).unwrap_or_default();
            self.spawn_node(n, st).await?;
            queue.extend(self.t.slot(n).children.iter().copied());
        }
        debug!(tenant = %self.t.id, nodes = image.nodes.len(), "tenant restored from checkpoint");
        Ok(())
    }
}

#[ractor::async_trait]
impl Actor for Coordinator {
    type Msg = CoordMsg;
    type State = Coord;
    type Arguments = CoordArgs;

    async fn pre_start(
        &self,
        me: ActorRef<CoordMsg>,
        a: CoordArgs,
    ) -> Result<Coord, ActorProcessingErr> {
        let (tx, rx) = unbounded_channel();
        let (supervisor, _) =
            Actor::spawn_linked(None, NodeSupervisor, tx.clone(), me.get_cell()).await?;
        let mut c = Coord {
            t: Tenant::new(a.tenant, a.settings),
            actors: Vec::new(),
            pending: Vec::new(),
            touched: Vec::new(),
            pending_events: 0,
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
        };
        c.restore(&*a.store).await?;
        Ok(c)
    }

    async fn post_stop(
        &self,
        _: ActorRef<CoordMsg>,
        c: &mut Coord,
    ) -> Result<(), ActorProcessingErr> {
        for a in c.actors.iter().flatten() {
            a.stop(Some(STOP_REASON.into()));
        }
        c.supervisor.stop(Some(STOP_REASON.into()));
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<CoordMsg>,
        msg: CoordMsg,
        c: &mut Coord,
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
            CoordMsg::NodeState {
                hierarchy,
                node,
                reply,
            } => {
                // Settle pending events so that the answer reflects every accepted record.
                if let Err(e) = c.round().await {
                    warn!(error = %e, "round failed while reading a node state");
                }
                let st = match c.t.node_ix(&hierarchy, &node) {
                    Some(ix) => {
                        let (tx, rx) = oneshot();
                        let _ = c.actor(ix).send_message(NodeMsg::State(tx.into()));
                        rx.await.ok()
                    }
                    None => None,
                };
                let _ = reply.send(st);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<CoordMsg>,
        evt: SupervisionEvent,
        c: &mut Coord,
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
    supervisor: Option<ActorCell>,
) -> Result<ActorRef<CoordMsg>, TenantError> {
    let args = CoordArgs {
        tenant: tenant.to_string(),
        settings,
        store,
    };
    let r = match supervisor {
        Some(s) => Actor::spawn_linked(None, Coordinator, args, s).await,
        None => Actor::spawn(None, Coordinator, args).await,
    };
    r.map(|(a, _)| a)
        .map_err(|e| TenantError::NodeDown(format!("spawning the tenant coordinator: {e}")))
}
