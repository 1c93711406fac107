//! The node actor: one per node of every hierarchy. It owns the node's numbers (`own`, `subtree`
//! and their buckets), receives the events of its entity and the deltas of its children, and passes
//! one coalesced delta up per round (see ARCHITECTURE.md, "Rounds").

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::agg::{combine_extremes, Agg, Buckets, Delta, Granularity, MetricName, Scope};
use crate::engine::Stats;
use crate::record::Mode;
use crate::store::{BucketKind, BucketRow, NodeHeader, PackedBuckets};
use crate::tenant::NodeIx;

/// The numbers a node owns. This is exactly what a checkpoint persists for the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub own: Agg,
    /// Buckets of `own`, needed in `current` mode to recompute extremes when a child's subtree
    /// leaves. `None` while the node has never had children: then they equal `subtree.buckets`,
    /// and keeping a second copy for every leaf would double the memory of most nodes.
    pub own_buckets: Option<Buckets>,
    pub subtree: Delta,
}

impl NodeState {
    /// Reassembles a node from its stored header and bucket rows.
    pub fn from_rows(header: NodeHeader, buckets: &[BucketRow]) -> Self {
        let mut st = NodeState {
            own: header.own,
            own_buckets: header.own_buckets.then(Buckets::default),
            subtree: Delta {
                total: header.subtree,
                buckets: Buckets::default(),
            },
        };
        for b in buckets {
            let Some(agg) = &b.agg else { continue };
            let target = match b.kind {
                BucketKind::Subtree => &mut st.subtree.buckets,
                BucketKind::Own => match &mut st.own_buckets {
                    Some(o) => o,
                    None => continue,
                },
            };
            *target.0[b.granularity as usize].entry(b.key) = agg.clone();
        }
        st
    }

    pub fn header(&self) -> NodeHeader {
        NodeHeader {
            own: self.own.clone(),
            subtree: self.subtree.total.clone(),
            own_buckets: self.own_buckets.is_some(),
        }
    }

    /// How many buckets the node has, of both kinds.
    pub fn bucket_count(&self) -> usize {
        let own = self.own_buckets.as_ref();
        self.subtree
            .buckets
            .0
            .iter()
            .map(|m| m.len())
            .sum::<usize>()
            + own.map_or(0, |b| b.0.iter().map(|m| m.len()).sum())
    }

    /// The complete bucket set, encoded as [`PackedBuckets`] describes.
    pub fn pack_buckets(&self) -> PackedBuckets {
        let mut e = crate::packed::Encoder::with_capacity(self.bucket_count());
        for kind in [BucketKind::Subtree, BucketKind::Own] {
            let Some(b) = self.buckets_of(kind) else {
                continue;
            };
            for (g, map) in b.0.iter().enumerate() {
                for (key, agg) in map.iter() {
                    e.push(kind as u8, g as u8, *key, agg);
                }
            }
        }
        let (bytes, count) = e.finish();
        PackedBuckets { count, bytes }
    }

    fn buckets_of(&self, kind: BucketKind) -> Option<&Buckets> {
        match kind {
            BucketKind::Subtree => Some(&self.subtree.buckets),
            BucketKind::Own => self.own_buckets.as_ref(),
        }
    }
}

/// Bucket keys changed since the last snapshot, per (kind, granularity): what a checkpoint writes.
#[derive(Debug, Default)]
struct DirtyBuckets([Vec<u64>; 6]);

impl DirtyBuckets {
    fn slot(kind: BucketKind, g: usize) -> usize {
        kind as usize * 3 + g
    }

    fn mark(&mut self, kind: BucketKind, g: usize, key: u64) {
        let v = &mut self.0[Self::slot(kind, g)];
        if v.last() != Some(&key) {
            v.push(key);
        }
    }

    fn mark_all(&mut self, kind: BucketKind, b: &Buckets) {
        for g in 0..3 {
            for (k, _) in b.0[g].iter() {
                self.mark(kind, g, *k);
            }
        }
    }

    fn clear(&mut self) {
        for v in &mut self.0 {
            v.clear();
        }
    }

    /// Emits the current value (or a deletion) of every dirty bucket, then forgets them.
    fn drain(&mut self, st: &NodeState) -> Vec<BucketRow> {
        let mut out = Vec::new();
        for kind in [BucketKind::Subtree, BucketKind::Own] {
            for g in Granularity::ALL {
                let v = &mut self.0[Self::slot(kind, g as usize)];
                v.sort_unstable();
                v.dedup();
                for key in v.drain(..) {
                    let agg = st
                        .buckets_of(kind)
                        .and_then(|b| b.0[g as usize].get(&key))
                        .cloned();
                    out.push(BucketRow {
                        kind,
                        granularity: g,
                        key,
                        agg,
                    });
                }
            }
        }
        out
    }
}

/// What a node answers to a snapshot: its header and the buckets that changed, or all of
/// them packed (see [`PackedBuckets`]).
#[derive(Debug)]
pub struct NodeSnapshot {
    pub header: NodeHeader,
    pub buckets: Vec<BucketRow>,
    pub packed: Option<PackedBuckets>,
}

/// One accepted event as a node sees it: bucket keys already resolved in the tenant's zone.
#[derive(Debug, Clone)]
pub struct NodeEvent {
    pub keys: [Option<u64>; 3],
    pub metrics: Arc<[(MetricName, i64)]>,
}

/// Signals from node actors to their tenant coordinator.
#[derive(Debug)]
pub enum TenantSignal {
    /// A root finished its part of a round.
    RoundDone,
    /// A node actor stopped unexpectedly (panic or kill): the coordinator restarts it.
    NodeDown { id: ActorId, reason: String },
}

/// One change a node applied since its last snapshot, kept so that a restarted node can be
/// brought from its stored row to exactly the state it had (ARCHITECTURE.md, "Node restart").
/// Entries are the node's *inputs* after they took effect, not copies of its state, so keeping
/// them costs what the messages already cost: the events and deltas are moved in, not cloned.
#[derive(Debug)]
enum Entry {
    Round {
        events: Vec<NodeEvent>,
        expect: u32,
    },
    Child(Box<Delta>),
    /// A `Remove`, with the extremes it resolved by asking the children at the time (a replay
    /// must not ask again: the children have moved on since).
    Removed {
        gone: Arc<Delta>,
        extremes: Vec<(Scope, MetricName, (i64, i64))>,
    },
    Add(Arc<Delta>),
    Grow,
    /// The node's part of checkpoint `seq` was taken here, after pruning with `prune`.
    Snapshot {
        seq: u64,
        prune: [u64; 3],
    },
}

/// A node's journal. It lives outside the actor (the coordinator holds it too), so that it
/// survives the actor's panic or kill.
#[derive(Debug, Default)]
pub struct Journal {
    /// The node was created after snapshot `fresh_after`: a stored row from a checkpoint at or
    /// below it is not this node's (none, or an earlier node of the same name), and the node's
    /// base state is then the empty one.
    fresh_after: Option<u64>,
    entries: Vec<Entry>,
    /// The `seq` of the oldest snapshot marker in `entries`: lets every push check in O(1)
    /// whether a checkpoint that landed since makes a prefix droppable.
    oldest_marker: Option<u64>,
}

pub type JournalRef = Arc<Mutex<Journal>>;

impl Journal {
    /// The journal of a node restored from the store (its base is its stored row).
    pub fn restored() -> JournalRef {
        Arc::default()
    }

    /// The journal of a node created after snapshot `seq`.
    pub fn created_after(seq: u64) -> JournalRef {
        Arc::new(Mutex::new(Journal {
            fresh_after: Some(seq),
            ..Journal::default()
        }))
    }

    /// Whether a row stored by checkpoint `as_of` is this node's base (else: the empty state).
    pub fn base_is_stored(&self, as_of: u64) -> bool {
        self.fresh_after.is_none_or(|m| as_of > m)
    }

    /// Forgets everything up to the last snapshot. Called when a later checkpoint begins, which
    /// means every earlier one is durable: the store holds what those entries led to.
    pub fn settle(&mut self) {
        self.settle_through(u64::MAX);
    }

    /// Forgets everything up to the last snapshot marker of a checkpoint at or below `durable`,
    /// which is committed: a restart loads that checkpoint's row (or a later one) and replays
    /// only what follows its marker.
    fn settle_through(&mut self, durable: u64) {
        let Some(i) = self
            .entries
            .iter()
            .rposition(|e| matches!(e, Entry::Snapshot { seq, .. } if *seq <= durable))
        else {
            return;
        };
        self.entries.drain(..=i);
        self.oldest_marker = self.entries.iter().find_map(|e| match e {
            Entry::Snapshot { seq, .. } => Some(*seq),
            _ => None,
        });
    }

    /// Appends `e`, first dropping what checkpoint `durable` (the newest committed) covers.
    /// Without this, a busy node's journal held about two checkpoint intervals: entries
    /// were dropped only when the *next* checkpoint began.
    fn push(&mut self, e: Entry, durable: u64) {
        if self.oldest_marker.is_some_and(|m| m <= durable) {
            self.settle_through(durable);
        }
        if let Entry::Snapshot { seq, .. } = &e {
            self.oldest_marker.get_or_insert(*seq);
        }
        self.entries.push(e);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where a replay onto the row of checkpoint `as_of` starts: after the last snapshot that
    /// checkpoint already holds.
    fn replay_from(&self, as_of: u64) -> usize {
        self.entries
            .iter()
            .rposition(|e| matches!(e, Entry::Snapshot { seq, .. } if *seq <= as_of))
            .map_or(0, |i| i + 1)
    }
}

/// A checkpoint's request to every node of its round: each snapshots itself right after its
/// flush and sends the answer to `replies`, so the checkpoint costs no second message per node.
pub struct SnapshotCall {
    pub seq: u64,
    pub prune: [u64; 3],
    pub packed_max: Option<usize>,
    pub replies: UnboundedSender<(NodeIx, NodeSnapshot)>,
}

pub enum NodeMsg {
    /// The tenant's part of a round: this node's events, and how many children will send a delta.
    /// With `snapshot`, the round is a checkpoint's, and the node answers it once flushed.
    Round {
        events: Vec<NodeEvent>,
        expect: u32,
        snapshot: Option<Arc<SnapshotCall>>,
    },
    /// A child's coalesced delta for the current round.
    Child(Box<Delta>),
    /// The node's header and changed buckets for checkpoint `seq`, after dropping buckets
    /// older than `prune`; all its buckets packed instead while it has at most `packed_max`.
    Snapshot {
        seq: u64,
        prune: [u64; 3],
        packed_max: Option<usize>,
        reply: RpcReplyPort<NodeSnapshot>,
    },
    /// The node's whole state (tests and diagnostics).
    State(RpcReplyPort<NodeState>),
    /// The node's subtree (a move takes it from the old ancestors to the new ones).
    Subtree(RpcReplyPort<Delta>),
    /// A descendant's subtree leaves this node; `children` are its current children, asked for
    /// exact extremes wherever the leaving numbers may have set a min or max.
    Remove {
        gone: Arc<Delta>,
        children: Vec<ActorRef<NodeMsg>>,
        reply: RpcReplyPort<()>,
    },
    /// A descendant's subtree arrives under this node.
    Add {
        delta: Arc<Delta>,
        reply: RpcReplyPort<()>,
    },
    /// Extremes of the subtree at the given places (used by a parent's `Remove`).
    Extremes {
        wanted: Arc<Vec<(Scope, MetricName)>>,
        reply: RpcReplyPort<Vec<Option<(i64, i64)>>>,
    },
    SetParent(Option<ActorRef<NodeMsg>>),
    /// A first child is attached (sent on a quiescent tree, before the child's first delta):
    /// from now on `own` buckets must be kept apart from `subtree` buckets.
    Grow,
    /// Chaos testing: panic inside the handler, as a bug would.
    Crash,
}

pub struct NodeActor;

pub struct NodeArgs {
    pub ix: NodeIx,
    pub mode: Mode,
    /// The base state: empty, or the node's row as of checkpoint `replay_onto`.
    pub state: NodeState,
    pub parent: Option<ActorRef<NodeMsg>>,
    pub signals: UnboundedSender<TenantSignal>,
    pub journal: JournalRef,
    /// The engine's counters; `durable_seq` says which journal entries may go.
    pub stats: Arc<Stats>,
    /// A restart: `state` is the row of this checkpoint (or empty, see [`Journal::base_is_stored`]),
    /// and the journal's entries since that checkpoint's snapshot are replayed onto it.
    pub replay_onto: Option<u64>,
}

pub struct Node {
    ix: NodeIx,
    mode: Mode,
    state: NodeState,
    parent: Option<ActorRef<NodeMsg>>,
    signals: UnboundedSender<TenantSignal>,
    /// Not yet passed up: everything received since this node's last flush.
    pending: Delta,
    expect: Option<u32>,
    received: u32,
    /// The checkpoint to answer at this round's flush, if the round is a checkpoint's.
    snap: Option<Arc<SnapshotCall>>,
    dirty: DirtyBuckets,
    journal: JournalRef,
    stats: Arc<Stats>,
}

impl Node {
    fn journal(&self, e: Entry) {
        let durable = self.stats.durable_seq.load(Ordering::Acquire);
        self.journal.lock().expect("journal lock").push(e, durable);
    }

    fn apply(&mut self, e: &NodeEvent) {
        let m = &e.metrics[..];
        self.state.own.add_event(m);
        if let Some(b) = &mut self.state.own_buckets {
            b.add_event(&e.keys, m);
            for (g, k) in e.keys.iter().enumerate() {
                if let Some(k) = k {
                    self.dirty.mark(BucketKind::Own, g, *k);
                }
            }
        }
        self.pending.total.add_event(m);
        self.pending.buckets.add_event(&e.keys, m);
    }

    /// Once the node's own events and every expected child delta are in: merges what is
    /// pending into `subtree` and returns it, to be passed up.
    fn take_flush(&mut self) -> Option<Delta> {
        if self.expect != Some(self.received) {
            return None;
        }
        self.expect = None;
        self.received = 0;
        let d = std::mem::take(&mut self.pending);
        self.state.subtree.merge(&d);
        self.dirty.mark_all(BucketKind::Subtree, &d.buckets);
        Some(d)
    }

    fn maybe_flush(&mut self) -> Result<(), ActorProcessingErr> {
        let Some(d) = self.take_flush() else {
            return Ok(());
        };
        match &self.parent {
            Some(p) => p.send_message(NodeMsg::Child(Box::new(d)))?,
            None => self.signals.send(TenantSignal::RoundDone)?,
        }
        if let Some(c) = self.snap.take() {
            let snap = self.snapshot(c.seq, &c.prune, c.packed_max);
            // A closed channel means the checkpoint already failed; the tenant is rebuilt.
            let _ = c.replies.send((self.ix, snap));
        }
        Ok(())
    }

    /// The node's part of checkpoint `seq`: drops buckets older than `prune`, marks the journal,
    /// and returns the header with the changed buckets (or all of them packed).
    fn snapshot(&mut self, seq: u64, prune: &[u64; 3], packed_max: Option<usize>) -> NodeSnapshot {
        self.prune(prune);
        {
            // Checkpoint `seq` begins only once every earlier one is durable.
            let mut j = self.journal.lock().expect("journal lock");
            j.settle();
            j.push(Entry::Snapshot { seq, prune: *prune }, 0);
        }
        let (buckets, packed) = match packed_max {
            Some(max) if self.state.bucket_count() <= max => {
                self.dirty.clear();
                (Vec::new(), Some(self.state.pack_buckets()))
            }
            _ => (self.dirty.drain(&self.state), None),
        };
        NodeSnapshot {
            header: self.state.header(),
            buckets,
            packed,
        }
    }

    fn prune(&mut self, prune: &[u64; 3]) {
        for (kind, b) in [
            (BucketKind::Subtree, Some(&mut self.state.subtree.buckets)),
            (BucketKind::Own, self.state.own_buckets.as_mut()),
        ] {
            if let Some(b) = b {
                for (g, keys) in b.prune(prune).into_iter().enumerate() {
                    for k in keys {
                        self.dirty.mark(kind, g, k);
                    }
                }
            }
        }
    }

    fn grow(&mut self) -> bool {
        if self.mode == Mode::Current && self.state.own_buckets.is_none() {
            self.state.own_buckets = Some(self.state.subtree.buckets.clone());
            self.dirty
                .mark_all(BucketKind::Own, &self.state.subtree.buckets);
            return true;
        }
        false
    }

    /// Re-applies one journal entry. Nothing is sent: at a restart every round the entry took
    /// part in has completed, so its flush already reached the parent.
    fn replay(&mut self, e: &Entry) {
        match e {
            Entry::Round { events, expect } => {
                for ev in events {
                    self.apply(ev);
                }
                self.expect = Some(*expect);
                self.take_flush();
            }
            Entry::Child(d) => {
                self.pending.merge(d);
                self.received += 1;
                self.take_flush();
            }
            Entry::Removed { gone, extremes } => {
                self.dirty.mark_all(BucketKind::Subtree, &gone.buckets);
                self.state.subtree.subtract(gone);
                for (sc, m, mm) in extremes {
                    self.state.subtree.set_extremes(*sc, m, *mm);
                }
            }
            Entry::Add(d) => {
                self.state.subtree.merge(d);
                self.dirty.mark_all(BucketKind::Subtree, &d.buckets);
            }
            Entry::Grow => {
                self.grow();
            }
            Entry::Snapshot { prune, .. } => {
                self.prune(prune);
                // Those rows went into that checkpoint.
                self.dirty.clear();
            }
        }
    }

    fn own_extremes(&self, scope: Scope, metric: &str) -> Option<(i64, i64)> {
        let agg = match scope {
            Scope::Total => Some(&self.state.own),
            Scope::Bucket(g, k) => match &self.state.own_buckets {
                Some(b) => b.0[g as usize].get(&k),
                None => self.state.subtree.buckets.0[g as usize].get(&k),
            },
        };
        agg.and_then(|a| a.stat(metric)).map(|s| (s.min, s.max))
    }
}

#[ractor::async_trait]
impl Actor for NodeActor {
    type Msg = NodeMsg;
    type State = Node;
    type Arguments = NodeArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<NodeMsg>,
        a: NodeArgs,
    ) -> Result<Node, ActorProcessingErr> {
        let mut n = Node {
            ix: a.ix,
            mode: a.mode,
            state: a.state,
            parent: a.parent,
            signals: a.signals,
            pending: Delta::default(),
            expect: None,
            received: 0,
            snap: None,
            dirty: DirtyBuckets::default(),
            journal: a.journal,
            stats: a.stats,
        };
        if let Some(as_of) = a.replay_onto {
            let journal = n.journal.clone();
            let j = journal.lock().expect("journal lock");
            for e in &j.entries[j.replay_from(as_of)..] {
                n.replay(e);
            }
        }
        Ok(n)
    }

    async fn handle(
        &self,
        _me: ActorRef<NodeMsg>,
        msg: NodeMsg,
        s: &mut Node,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            // Each input is journaled once it took effect; nothing awaits in between, so a kill
            // cannot fall between the two. A panic while applying leaves it out, but then the
            // round fails and the tenant is rebuilt instead (see ARCHITECTURE.md).
            NodeMsg::Round {
                events,
                expect,
                snapshot,
            } => {
                for e in &events {
                    s.apply(e);
                }
                s.expect = Some(expect);
                s.snap = snapshot;
                s.journal(Entry::Round { events, expect });
                s.maybe_flush()?;
            }
            NodeMsg::Child(d) => {
                s.pending.merge(&d);
                s.received += 1;
                s.journal(Entry::Child(d));
                s.maybe_flush()?;
            }
            NodeMsg::Snapshot {
                seq,
                prune,
                packed_max,
                reply,
            } => {
                let _ = reply.send(s.snapshot(seq, &prune, packed_max));
            }
            NodeMsg::State(reply) => {
                let _ = reply.send(s.state.clone());
            }
            NodeMsg::Subtree(reply) => {
                let _ = reply.send(s.state.subtree.clone());
            }
            NodeMsg::Remove {
                gone,
                children,
                reply,
            } => {
                // Every bucket the leaving subtree touches changes (or disappears): persist them.
                s.dirty.mark_all(BucketKind::Subtree, &gone.buckets);
                let tainted = s.state.subtree.subtract(&gone);
                let mut resolved = Vec::new();
                if !tainted.is_empty() {
                    let wanted = Arc::new(tainted);
                    let mut acc: Vec<Option<(i64, i64)>> = wanted
                        .iter()
                        .map(|(sc, m)| s.own_extremes(*sc, m))
                        .collect();
                    for c in &children {
                        let w = wanted.clone();
                        let theirs = c
                            .call(|reply| NodeMsg::Extremes { wanted: w, reply }, None)
                            .await?
                            .success_or("child did not answer an extremes request")?;
                        for (a, t) in acc.iter_mut().zip(theirs) {
                            *a = combine_extremes(*a, t);
                        }
                    }
                    for ((sc, m), mm) in wanted.iter().zip(acc) {
                        if let Some(mm) = mm {
                            s.state.subtree.set_extremes(*sc, m, mm);
                            resolved.push((*sc, *m, mm));
                        }
                    }
                }
                s.journal(Entry::Removed {
                    gone,
                    extremes: resolved,
                });
                let _ = reply.send(());
            }
            NodeMsg::Add { delta, reply } => {
                s.state.subtree.merge(&delta);
                s.dirty.mark_all(BucketKind::Subtree, &delta.buckets);
                s.journal(Entry::Add(delta));
                let _ = reply.send(());
            }
            NodeMsg::Extremes { wanted, reply } => {
                let v = wanted
                    .iter()
                    .map(|(sc, m)| s.state.subtree.extremes(*sc, m))
                    .collect();
                let _ = reply.send(v);
            }
            NodeMsg::SetParent(p) => s.parent = p,
            NodeMsg::Grow => {
                if s.grow() {
                    s.journal(Entry::Grow);
                }
            }
            NodeMsg::Crash => panic!("chaos: node {} crashed on purpose", s.ix),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(seq: u64) -> Entry {
        Entry::Snapshot { seq, prune: [0; 3] }
    }

    fn kinds(j: &Journal) -> Vec<String> {
        j.entries
            .iter()
            .map(|e| match e {
                Entry::Snapshot { seq, .. } => format!("S{seq}"),
                Entry::Grow => "G".into(),
                _ => "?".into(),
            })
            .collect()
    }

    #[test]
    fn a_journal_drops_what_a_landed_checkpoint_covers_on_its_next_append() {
        let mut j = Journal::default();
        j.push(Entry::Grow, 0);
        j.push(marker(1), 0);
        j.push(Entry::Grow, 0);
        j.push(marker(2), 0);
        // Nothing is durable yet: everything stays.
        j.push(Entry::Grow, 0);
        assert_eq!(kinds(&j), ["G", "S1", "G", "S2", "G"]);
        // Checkpoint 1 landed: what its marker covers goes, the rest stays.
        j.push(Entry::Grow, 1);
        assert_eq!(kinds(&j), ["G", "S2", "G", "G"]);
        // A restart onto checkpoint 1's row replays everything left.
        assert_eq!(j.replay_from(1), 0);
        // Onto checkpoint 2's row: only what follows its marker.
        assert_eq!(j.replay_from(2), 2);
        // Checkpoint 2 landed: only the entries after its marker remain.
        j.push(Entry::Grow, 2);
        assert_eq!(kinds(&j), ["G", "G", "G"]);
        assert_eq!(j.oldest_marker, None);
        // A later marker is tracked again, and `settle` drops through it.
        j.push(marker(3), 2);
        j.push(Entry::Grow, 2);
        assert_eq!(j.oldest_marker, Some(3));
        j.settle();
        assert_eq!(kinds(&j), ["G"]);
    }
}
