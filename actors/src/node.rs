//! The node actor: one per node of every hierarchy. It owns the node's numbers, receives the
//! events of its entity and the deltas of its children, and passes one coalesced delta up per
//! round (see ARCHITECTURE.md, "Rounds").
//!
//! A node keeps its totals (`own`, `subtree`) and only the buckets that changed since its last
//! snapshot, as deltas: the store holds the buckets and folds each checkpoint's deltas into them
//! (ARCHITECTURE.md, "Node state"). So its memory follows what happens in one checkpoint
//! interval, not the event time it has seen. A move needs exact buckets (min/max after a
//! subtree leaves): the coordinator then *hydrates* the nodes involved with their stored
//! buckets, and until its next snapshot such a node holds its complete buckets and writes the
//! changed ones as absolute values.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::agg::{combine_extremes, Agg, Buckets, Delta, Granularity, MetricName, Scope};
use crate::record::Mode;
use crate::store::{BucketKind, BucketRow, BucketWrite, NodeHeader, Rows};
use crate::tenant::NodeIx;

/// A node's numbers. In a node actor the buckets are those of the current checkpoint interval
/// (deltas, and complete values where a move hydrated it); as a *view* (tests, the dump) they
/// are all of them.
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
        let mut st = NodeState::from_header(header);
        st.put_rows(buckets);
        st
    }

    /// A node from its stored header, with no buckets (what a node actor starts from).
    pub fn from_header(header: NodeHeader) -> Self {
        NodeState {
            own: header.own,
            own_buckets: header.own_buckets.then(Buckets::default),
            subtree: Delta {
                total: header.subtree,
                buckets: Buckets::default(),
            },
        }
    }

    fn put_rows(&mut self, buckets: &[BucketRow]) {
        for b in buckets {
            let Some(agg) = &b.agg else { continue };
            let target = match b.kind {
                BucketKind::Subtree => &mut self.subtree.buckets,
                BucketKind::Own => match &mut self.own_buckets {
                    Some(o) => o,
                    None => continue,
                },
            };
            *target.0[b.granularity as usize].entry(b.key) = agg.clone();
        }
    }

    pub fn header(&self) -> NodeHeader {
        NodeHeader {
            own: self.own.clone(),
            subtree: self.subtree.total.clone(),
            own_buckets: self.own_buckets.is_some(),
        }
    }

    /// How many buckets the node holds, of both kinds.
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
}

/// A node's complete buckets: what the store holds for it once every commit so far landed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FullBuckets {
    pub subtree: Buckets,
    pub own: Option<Buckets>,
}

impl FullBuckets {
    /// The buckets of a stored row (empty: no stored row, or not this node's).
    pub fn from_rows(own_kept: bool, rows: &[BucketRow]) -> Self {
        let mut st = NodeState {
            own_buckets: own_kept.then(Buckets::default),
            ..NodeState::default()
        };
        st.put_rows(rows);
        FullBuckets {
            subtree: st.subtree.buckets,
            own: st.own_buckets,
        }
    }

    /// A copy of the buckets at `keys`.
    fn restrict(&self, keys: &KeySet) -> FullBuckets {
        FullBuckets {
            subtree: restrict(&self.subtree, keys),
            own: self.own.as_ref().map(|o| restrict(o, keys)),
        }
    }

    /// Applies one interval's changes exactly as a store applies a [`BucketWrite::Fold`] with
    /// its `replace` rows: the copy of `subtree` to `own` first (if asked), then the deltas
    /// merged, and the buckets at `c.full` set to the values the changes hold (or removed).
    fn fold(&mut self, c: &Changes) {
        if c.copy_own {
            self.own = Some(self.subtree.clone());
        }
        // A key held complete carries its value, not a delta: what was below it goes first, and
        // the merge that follows sets it.
        remove_keys(&mut self.subtree, &c.full);
        if let Some(o) = &mut self.own {
            remove_keys(o, &c.full);
        }
        self.subtree.merge(&c.subtree);
        if let Some(o) = &c.own {
            self.own.get_or_insert_with(Buckets::default).merge(o);
        }
    }
}

/// Where a node holds complete values instead of deltas (see [`Node::hydrate_at`]).
pub use crate::agg::KeySet;

/// The keys of every bucket in `b`.
pub fn keys_of(b: &Buckets) -> KeySet {
    std::array::from_fn(|g| b.0[g].iter().map(|(k, _)| *k).collect())
}

fn holds(keys: &KeySet, g: usize, k: u64) -> bool {
    keys[g].binary_search(&k).is_ok()
}

pub fn keys_empty(keys: &KeySet) -> bool {
    keys.iter().all(Vec::is_empty)
}

/// The keys of `keys` not in `have`.
fn keys_minus(keys: &KeySet, have: &KeySet) -> KeySet {
    std::array::from_fn(|g| {
        keys[g]
            .iter()
            .copied()
            .filter(|k| !holds(have, g, *k))
            .collect()
    })
}

fn keys_union(into: &mut KeySet, add: &KeySet) {
    for g in 0..3 {
        if add[g].is_empty() {
            continue;
        }
        into[g].extend_from_slice(&add[g]);
        into[g].sort_unstable();
        into[g].dedup();
    }
}

fn restrict(b: &Buckets, keys: &KeySet) -> Buckets {
    let mut out = Buckets::default();
    for g in 0..3 {
        out.0[g].0 = b.0[g]
            .iter()
            .filter(|(k, _)| holds(keys, g, **k))
            .map(|(k, a)| (*k, a.clone()))
            .collect();
    }
    out
}

fn remove_keys(b: &mut Buckets, keys: &KeySet) {
    for g in 0..3 {
        if !keys[g].is_empty() {
            b.0[g].0.retain(|(k, _)| !holds(keys, g, *k));
        }
    }
}

/// Removes the buckets at `keys` from `b` and returns them.
fn take_keys(b: &mut Buckets, keys: &KeySet) -> Buckets {
    let taken = restrict(b, keys);
    remove_keys(b, keys);
    taken
}

/// One interval's bucket changes of a node, as a [`BucketWrite::Fold`] carries them: deltas,
/// except at the keys of `full`, where the buckets hold complete values (a move hydrated them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Changes {
    subtree: Buckets,
    own: Option<Buckets>,
    copy_own: bool,
    full: KeySet,
}

/// One interval's changes as its snapshot sent them: the checkpoint's rows themselves, shared
/// with it. A node keeps them as `sent` until that commit is known to have landed: a hydration
/// that reads the store before it lands must add them (see [`Node::base`]). Until 2026-12-07
/// `sent` kept the changes as buckets and the checkpoint a copy of them as rows: at the peak of
/// a commit, every interval delta was held twice.
#[derive(Debug, Default)]
struct Sent {
    /// Deltas to fold.
    rows: Rows,
    /// Values at the keys of `full` (`None`: the bucket is gone).
    replace: Rows,
    copy_own: bool,
    /// The node kept `own` buckets apart (then `Changes::own` is `Some`, even if empty).
    own_kept: bool,
    full: KeySet,
}

impl Sent {
    /// The changes the rows carry (a move needs them as buckets, to fold onto stored ones).
    fn changes(&self) -> Changes {
        let mut c = Changes {
            subtree: Buckets::default(),
            own: self.own_kept.then(Buckets::default),
            copy_own: self.copy_own,
            full: self.full.clone(),
        };
        for b in self.rows.iter().chain(self.replace.iter()) {
            let Some(agg) = &b.agg else { continue };
            let target = match b.kind {
                BucketKind::Subtree => &mut c.subtree,
                BucketKind::Own => match &mut c.own {
                    Some(o) => o,
                    None => continue,
                },
            };
            *target.0[b.granularity as usize].entry(b.key) = agg.clone();
        }
        c
    }
}

/// What a node answers to a snapshot: its header and its bucket rows, applied as `write` says,
/// then the values of the buckets it held complete (`replace`, see [`crate::store::NodeRow`]).
#[derive(Debug)]
pub struct NodeSnapshot {
    pub header: NodeHeader,
    pub buckets: Rows,
    pub replace: Rows,
    pub write: BucketWrite,
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
    /// The node's own events of a round (a round without any is not journaled).
    Round {
        events: Vec<NodeEvent>,
    },
    /// Children's deltas: consecutive ones, across rounds, are merged into one entry (see
    /// [`Journal::push`]).
    Child(Box<Delta>),
    /// A `Remove`, with the extremes it resolved by asking the children at the time (a replay
    /// must not ask again: the children have moved on since).
    Removed {
        gone: Arc<Delta>,
        extremes: Vec<(Scope, MetricName, (i64, i64))>,
    },
    Add(Arc<Delta>),
    Grow,
    /// The node was hydrated at `keys`: its complete buckets there before this interval's
    /// changes (the stored row, plus what its last snapshot sent if that commit had not landed
    /// when it was read).
    Hydrated {
        keys: Arc<KeySet>,
        base: Arc<FullBuckets>,
    },
    /// The node's part of checkpoint `seq` was taken here. `after` is the state it left: the
    /// totals and the changes it sent (shared with `sent`). A journal starts with the newest
    /// such marker and nothing before it (see [`Journal::close`]).
    Snapshot {
        seq: u64,
        after: Option<Arc<Closed>>,
    },
}

/// A node's state right after a snapshot: its totals and what the snapshot sent. Everything
/// else is empty then (no deltas, nothing pending, nothing held complete).
#[derive(Debug)]
struct Closed {
    header: NodeHeader,
    sent: Arc<Sent>,
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
    /// The `Child` entry the next child delta merges into: the last one, unless an entry that
    /// does not commute with adding deltas (a snapshot marker, a move, a hydration) came since.
    children_at: Option<usize>,
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
        self.children_at = self.children_at.and_then(|c| c.checked_sub(i + 1));
        self.oldest_marker = self.entries.iter().find_map(|e| match e {
            Entry::Snapshot { seq, .. } => Some(*seq),
            _ => None,
        });
    }

    /// Appends `e`, first dropping what checkpoint `durable` (the newest committed) covers.
    /// Without this, a busy node's journal held about two checkpoint intervals: entries
    /// were dropped only when the *next* checkpoint began.
    ///
    /// A child's delta is merged into the previous `Child` entry where nothing but own events
    /// came between: replayed, both only add to `subtree` (a restart happens between rounds,
    /// so every round in the journal completed), and adding commutes. An internal node's
    /// journal then holds about one delta per checkpoint interval instead of every message
    /// its children sent: on the 83-hour stream, messages kept until their checkpoint landed
    /// were the largest part of the process's memory after the actors themselves.
    fn push(&mut self, e: Entry, durable: u64) {
        if self.oldest_marker.is_some_and(|m| m <= durable) {
            self.settle_through(durable);
        }
        match e {
            Entry::Child(d) => {
                if let Some(Entry::Child(acc)) = self.children_at.map(|i| &mut self.entries[i]) {
                    acc.merge(&d);
                    return;
                }
                self.children_at = Some(self.entries.len());
                self.entries.push(Entry::Child(d));
            }
            Entry::Round { .. } => self.entries.push(e),
            e => {
                if let Entry::Snapshot { seq, .. } = &e {
                    self.oldest_marker.get_or_insert(*seq);
                }
                self.children_at = None;
                self.entries.push(e);
            }
        }
    }

    /// Checkpoint `seq` was taken, leaving the node in state `after`: everything before goes.
    /// The checkpoint before it is durable (a checkpoint begins only once every earlier one
    /// is), so a restart loads that row or a later one: onto the older row, the marker itself
    /// restores the state the interval led to; onto row `seq`, the replay starts after it.
    /// Without this, the interval's entries (its events and its children's deltas, about as
    /// large as the deltas the node sent) stayed until the commit landed, next to `sent` and
    /// the checkpoint's rows.
    fn close(&mut self, seq: u64, after: Arc<Closed>) {
        self.entries.clear();
        self.children_at = None;
        self.oldest_marker = Some(seq);
        self.entries.push(Entry::Snapshot {
            seq,
            after: Some(after),
        });
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
    pub replies: UnboundedSender<(NodeIx, NodeSnapshot)>,
}

/// The reason a node actor is stopped on purpose (deleted, passivated, its tenant stopping):
/// the supervisor ignores such stops.
pub const STOP_REASON: &str = "canopy:stop";

pub enum NodeMsg {
    /// The tenant's part of a round: this node's events, how many children will send a delta,
    /// and where its own delta goes (the parent's actor as of this round: parents are activated
    /// and passivated, so a node learns its parent's current actor from each round).
    /// With `snapshot`, the round is a checkpoint's, and the node answers it once flushed.
    Round {
        events: Vec<NodeEvent>,
        expect: u32,
        parent: Option<ActorRef<NodeMsg>>,
        snapshot: Option<Arc<SnapshotCall>>,
    },
    /// A child's coalesced delta for the current round.
    Child(Box<Delta>),
    /// The node's header and bucket rows for checkpoint `seq`.
    Snapshot {
        seq: u64,
        reply: RpcReplyPort<NodeSnapshot>,
    },
    /// The node's complete numbers (tests), given its stored buckets as of
    /// checkpoint `as_of`; the node stays as it is.
    #[cfg(feature = "test-hooks")]
    View {
        stored: FullBuckets,
        as_of: u64,
        reply: RpcReplyPort<NodeState>,
    },
    /// Hold complete buckets at `keys` until the next snapshot, given the stored ones there as of
    /// checkpoint `as_of` (empty for a node the store has no row of): a move is about to take a
    /// subtree with buckets at those keys out of this node or to ask it for extremes there.
    Hydrate {
        keys: Arc<KeySet>,
        stored: FullBuckets,
        as_of: u64,
    },
    /// The node's subtree, complete (a move takes it from the old ancestors to the new ones),
    /// given its stored buckets as of checkpoint `as_of`; the node stays as it is.
    Subtree {
        stored: FullBuckets,
        as_of: u64,
        reply: RpcReplyPort<Delta>,
    },
    /// A descendant's subtree leaves this node; `children` are its current children, asked for
    /// exact extremes wherever the leaving numbers may have set a min or max. Only for a node
    /// hydrated at the keys of `gone`'s buckets, whose children are hydrated there too.
    Remove {
        gone: Arc<Delta>,
        children: Vec<ActorRef<NodeMsg>>,
        reply: RpcReplyPort<()>,
    },
    /// A descendant's subtree arrives under this node: a delta like any other.
    Add {
        delta: Arc<Delta>,
        reply: RpcReplyPort<()>,
    },
    /// Extremes of the subtree at the given places (used by a parent's `Remove`). Only for a
    /// node hydrated at the bucket places asked.
    Extremes {
        wanted: Arc<Vec<(Scope, MetricName)>>,
        reply: RpcReplyPort<Vec<Option<(i64, i64)>>>,
    },
    /// Idle, with its state durable: reply with the header and stop (see ARCHITECTURE.md, "Life
    /// cycle of a node actor"). A node that still holds something not durable answers `None`
    /// and stays.
    Passivate {
        replies: UnboundedSender<(NodeIx, Option<NodeHeader>)>,
    },
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
    /// The base state: empty, or the node's stored header as of checkpoint `replay_onto`.
    pub state: NodeState,
    pub signals: UnboundedSender<TenantSignal>,
    pub journal: JournalRef,
    /// The newest checkpoint known durable (the engine's `Stats::durable_seq`): journal entries
    /// it covers may go.
    pub durable_seq: Arc<AtomicU64>,
    /// The engine's count of bucket deltas held for the open interval
    /// (`Stats::interval_buckets`), which this node adds to.
    pub interval_buckets: Arc<AtomicU64>,
    /// A restart: `state` is the header of this checkpoint (or empty, see
    /// [`Journal::base_is_stored`]), and the journal's entries since that checkpoint's snapshot
    /// are replayed onto it.
    pub replay_onto: Option<u64>,
}

pub struct Node {
    ix: NodeIx,
    mode: Mode,
    /// Totals, and the buckets: this interval's deltas, except at the keys of `full`.
    state: NodeState,
    /// Keys whose buckets (both kinds) the node holds complete until its next snapshot (a move
    /// needed them); its snapshot writes them as values.
    full: KeySet,
    /// The node got its first child in this interval, so the store must copy its
    /// `subtree` buckets to `own` before folding this interval's deltas.
    copy_own: bool,
    /// What the last snapshot sent, until that commit is known to have landed.
    sent: Option<(u64, Arc<Sent>)>,
    parent: Option<ActorRef<NodeMsg>>,
    signals: UnboundedSender<TenantSignal>,
    /// Not yet passed up: everything received since this node's last flush.
    pending: Delta,
    expect: Option<u32>,
    received: u32,
    /// The checkpoint to answer at this round's flush, if the round is a checkpoint's.
    snap: Option<Arc<SnapshotCall>>,
    journal: JournalRef,
    durable_seq: Arc<AtomicU64>,
    interval_buckets: Arc<AtomicU64>,
    /// How many of this interval's buckets the node has added to `interval_buckets`.
    counted: usize,
}

impl Node {
    fn journal(&self, e: Entry) {
        let durable = self.durable_seq.load(Ordering::Acquire);
        self.journal.lock().expect("journal lock").push(e, durable);
    }

    /// Forgets what the last snapshot sent once its commit landed. Called only from round
    /// messages: the coordinator reads a node's stored row for a hydration or a view between
    /// rounds, and what it read must be combined with `sent` exactly as it was when read.
    fn forget_landed(&mut self) {
        if let Some((seq, _)) = &self.sent {
            if self.durable_seq.load(Ordering::Acquire) >= *seq {
                self.sent = None;
            }
        }
    }

    fn apply(&mut self, e: &NodeEvent) {
        let m = &e.metrics[..];
        self.state.own.add_event(m);
        if let Some(b) = &mut self.state.own_buckets {
            b.add_event(&e.keys, m);
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
        Some(d)
    }

    fn maybe_flush(&mut self) -> Result<(), ActorProcessingErr> {
        let Some(d) = self.take_flush() else {
            return Ok(());
        };
        self.count_buckets();
        match &self.parent {
            Some(p) => p.send_message(NodeMsg::Child(Box::new(d)))?,
            None => self.signals.send(TenantSignal::RoundDone)?,
        }
        if let Some(c) = self.snap.take() {
            let snap = self.snapshot(c.seq);
            // A closed channel means the checkpoint already failed; the tenant is rebuilt.
            let _ = c.replies.send((self.ix, snap));
        }
        Ok(())
    }

    /// Adds the buckets this interval created since the last count to the engine's count (once
    /// per flush: a round's events and children's deltas are in by then). A move's removals
    /// are not taken back: the count bounds memory, and the snapshot zeroes it.
    fn count_buckets(&mut self) {
        let n = self.state.bucket_count();
        if n > self.counted {
            self.interval_buckets
                .fetch_add((n - self.counted) as u64, Ordering::Relaxed);
            self.counted = n;
        }
    }

    /// The node's part of checkpoint `seq`: closes the interval and the journal with it.
    fn snapshot(&mut self, seq: u64) -> NodeSnapshot {
        let snap = self.close_interval(seq);
        let sent = self
            .sent
            .as_ref()
            .expect("a closed interval is sent")
            .1
            .clone();
        let after = Arc::new(Closed {
            header: snap.header.clone(),
            sent,
        });
        self.journal.lock().expect("journal lock").close(seq, after);
        snap
    }

    /// Hands this interval's buckets to checkpoint `seq` and starts the next interval empty:
    /// the deltas to fold, and the values of the buckets held complete. They are kept as `sent`
    /// until the commit lands.
    fn close_interval(&mut self, seq: u64) -> NodeSnapshot {
        self.counted = 0;
        let header = self.state.header();
        let sent = Arc::new(
            Changes {
                subtree: std::mem::take(&mut self.state.subtree.buckets),
                own: self.state.own_buckets.as_mut().map(std::mem::take),
                copy_own: std::mem::take(&mut self.copy_own),
                full: std::mem::take(&mut self.full),
            }
            .into_sent(),
        );
        let snap = NodeSnapshot {
            header,
            buckets: sent.rows.clone(),
            replace: sent.replace.clone(),
            write: BucketWrite::Fold {
                copy_own: sent.copy_own,
            },
        };
        self.sent = Some((seq, sent));
        snap
    }

    fn grow(&mut self) -> bool {
        if self.mode == Mode::Current && self.state.own_buckets.is_none() {
            // Until now own buckets equalled subtree buckets: in memory that is this interval's
            // deltas (and the complete values at `full`, which stay complete); the store copies
            // the rest.
            self.state.own_buckets = Some(self.state.subtree.buckets.clone());
            self.copy_own = true;
            return true;
        }
        false
    }

    /// The node's complete buckets before this interval's changes, given its stored ones as of
    /// checkpoint `as_of`: plus what the last snapshot sent, if that commit had not landed.
    fn base(&self, stored: FullBuckets, as_of: u64) -> FullBuckets {
        match &self.sent {
            Some((seq, c)) if as_of < *seq => {
                let mut b = stored;
                b.fold(&c.changes());
                b
            }
            _ => stored,
        }
    }

    /// This interval's changes as a store would fold them.
    fn changes(&self) -> Changes {
        Changes {
            subtree: self.state.subtree.buckets.clone(),
            own: self.state.own_buckets.clone(),
            copy_own: self.copy_own,
            full: self.full.clone(),
        }
    }

    /// The complete buckets, given the stored ones as of checkpoint `as_of`, without changing
    /// the node.
    fn complete(&self, stored: FullBuckets, as_of: u64) -> FullBuckets {
        let mut full = self.base(stored, as_of);
        full.fold(&self.changes());
        full
    }

    /// From deltas to complete values at `keys`, given `base`, the complete buckets there before
    /// this interval's changes. Keys already complete stay as they are. Until the next snapshot,
    /// what arrives at those keys adds to complete values, and the snapshot writes them as values.
    fn hydrate_at(&mut self, keys: &KeySet, base: &FullBuckets) {
        let new = keys_minus(keys, &self.full);
        if keys_empty(&new) {
            return;
        }
        let c = Changes {
            subtree: take_keys(&mut self.state.subtree.buckets, &new),
            own: self.state.own_buckets.as_mut().map(|o| take_keys(o, &new)),
            copy_own: self.copy_own,
            full: KeySet::default(),
        };
        let mut full = base.restrict(&new);
        full.fold(&c);
        // The keys were just taken out: merging puts the complete values in their place.
        self.state.subtree.buckets.merge(&full.subtree);
        if let (Some(o), Some(f)) = (&mut self.state.own_buckets, &full.own) {
            o.merge(f);
        }
        keys_union(&mut self.full, &new);
    }

    /// The complete numbers, without changing the node.
    #[cfg(feature = "test-hooks")]
    fn view(&self, stored: FullBuckets, as_of: u64) -> NodeState {
        let full = self.complete(stored, as_of);
        NodeState {
            own: self.state.own.clone(),
            own_buckets: full.own,
            subtree: Delta {
                total: self.state.subtree.total.clone(),
                buckets: full.subtree,
            },
        }
    }

    /// Whether everything the node holds is in its stored row: no deltas of this interval,
    /// nothing sent that has not landed, nothing pending, nothing held complete. Only then may
    /// it stop and come back from its header alone.
    fn is_settled(&self) -> bool {
        keys_empty(&self.full)
            && !self.copy_own
            && self.sent.is_none()
            && self.pending.is_empty()
            && self.expect.is_none()
            && self.state.subtree.buckets.is_empty()
            && self
                .state
                .own_buckets
                .as_ref()
                .is_none_or(Buckets::is_empty)
    }

    /// Fails unless the node holds complete values at every bucket place of `b`.
    fn must_hold(&self, b: &Buckets, what: &str) -> Result<(), ActorProcessingErr> {
        for g in 0..3 {
            if let Some((k, _)) = b.0[g].iter().find(|(k, _)| !holds(&self.full, g, **k)) {
                return Err(format!(
                    "node {} got {what} at bucket {g}/{k} without being hydrated there first",
                    self.ix
                )
                .into());
            }
        }
        Ok(())
    }

    /// Re-applies one journal entry. Nothing is sent: at a restart every round the entry took
    /// part in has completed, so its flush already reached the parent, and the deltas of a
    /// round (own events, children's) go straight to `subtree` as its flush put them.
    fn replay(&mut self, e: &Entry) {
        match e {
            Entry::Round { events } => {
                for ev in events {
                    self.apply(ev);
                }
                let d = std::mem::take(&mut self.pending);
                self.add(&d);
            }
            Entry::Child(d) => self.add(d),
            Entry::Removed { gone, extremes } => {
                self.state.subtree.subtract(gone);
                for (sc, m, mm) in extremes {
                    self.state.subtree.set_extremes(*sc, m, *mm);
                }
            }
            Entry::Add(d) => self.add(d),
            Entry::Grow => {
                self.grow();
            }
            Entry::Hydrated { keys, base } => self.hydrate_at(keys, base),
            Entry::Snapshot {
                seq,
                after: Some(after),
            } => {
                // The state the snapshot left; what it sent went into that checkpoint (still in
                // flight, or it would not be replayed) and becomes `sent` again.
                self.state = NodeState::from_header(after.header.clone());
                self.copy_own = false;
                self.full = KeySet::default();
                self.sent = Some((*seq, after.sent.clone()));
            }
            Entry::Snapshot { seq, after: None } => {
                self.close_interval(*seq);
            }
        }
    }

    fn add(&mut self, d: &Delta) {
        self.state.subtree.merge(d);
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

impl Changes {
    /// The bucket rows, in (kind, granularity, key) order, with the aggregates moved, not
    /// copied: the deltas to fold, and the values at the keys held complete (`None` where the
    /// bucket is gone).
    fn into_sent(self) -> Sent {
        let own_kept = self.own.is_some();
        let mut rows = Vec::new();
        let mut replace = Vec::new();
        for (kind, b) in [
            (BucketKind::Subtree, Some(self.subtree)),
            (BucketKind::Own, self.own),
        ] {
            let Some(b) = b else { continue };
            for (g, m) in Granularity::ALL.into_iter().zip(b.0) {
                let gi = g as usize;
                let row = |key: u64, agg: Option<Agg>| BucketRow {
                    kind,
                    granularity: g,
                    key,
                    agg,
                };
                for key in &self.full[gi] {
                    if m.get(key).is_none() {
                        replace.push(row(*key, None));
                    }
                }
                for (key, agg) in m.0 {
                    if holds(&self.full, gi, key) {
                        replace.push(row(key, Some(agg)));
                    } else {
                        rows.push(row(key, Some(agg)));
                    }
                }
            }
        }
        // `rows` came in order (kinds, then granularities, then each map's sorted keys);
        // `replace` mixes deleted keys in.
        debug_assert!(rows.is_sorted_by_key(|b| (b.kind, b.granularity as u8, b.key)));
        replace.sort_unstable_by_key(|b| (b.kind, b.granularity as u8, b.key));
        Sent {
            rows: Arc::new(rows),
            replace: Arc::new(replace),
            copy_own: self.copy_own,
            own_kept,
            full: self.full,
        }
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
            full: KeySet::default(),
            copy_own: false,
            sent: None,
            parent: None,
            signals: a.signals,
            pending: Delta::default(),
            expect: None,
            received: 0,
            snap: None,
            journal: a.journal,
            durable_seq: a.durable_seq,
            interval_buckets: a.interval_buckets,
            counted: 0,
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
        me: ActorRef<NodeMsg>,
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
                parent,
                snapshot,
            } => {
                s.parent = parent;
                s.forget_landed();
                for e in &events {
                    s.apply(e);
                }
                s.expect = Some(expect);
                s.snap = snapshot;
                if !events.is_empty() {
                    s.journal(Entry::Round { events });
                }
                s.maybe_flush()?;
            }
            NodeMsg::Child(d) => {
                s.forget_landed();
                s.pending.merge(&d);
                s.received += 1;
                s.journal(Entry::Child(d));
                s.maybe_flush()?;
            }
            NodeMsg::Snapshot { seq, reply } => {
                let _ = reply.send(s.snapshot(seq));
            }
            #[cfg(feature = "test-hooks")]
            NodeMsg::View {
                stored,
                as_of,
                reply,
            } => {
                let _ = reply.send(s.view(stored, as_of));
            }
            NodeMsg::Hydrate {
                keys,
                stored,
                as_of,
            } => {
                let new = keys_minus(&keys, &s.full);
                if !keys_empty(&new) {
                    let base = Arc::new(s.base(stored, as_of).restrict(&new));
                    let keys = Arc::new(new);
                    s.hydrate_at(&keys, &base);
                    s.journal(Entry::Hydrated { keys, base });
                }
            }
            NodeMsg::Subtree {
                stored,
                as_of,
                reply,
            } => {
                let _ = reply.send(Delta {
                    total: s.state.subtree.total.clone(),
                    buckets: s.complete(stored, as_of).subtree,
                });
            }
            NodeMsg::Remove {
                gone,
                children,
                reply,
            } => {
                // Every bucket the leaving subtree touches changes (or disappears): they are held
                // complete, and the snapshot writes their values.
                s.must_hold(&gone.buckets, "a remove")?;
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
                s.add(&delta);
                s.journal(Entry::Add(delta));
                let _ = reply.send(());
            }
            NodeMsg::Extremes { wanted, reply } => {
                for (sc, _) in wanted.iter() {
                    if let Scope::Bucket(g, k) = sc {
                        if !holds(&s.full, *g as usize, *k) {
                            return Err(format!(
                                "node {} got an extremes request at bucket {g:?}/{k} without being hydrated there first",
                                s.ix
                            )
                            .into());
                        }
                    }
                }
                let v = wanted
                    .iter()
                    .map(|(sc, m)| s.state.subtree.extremes(*sc, m))
                    .collect();
                let _ = reply.send(v);
            }
            NodeMsg::Passivate { replies } => {
                s.forget_landed();
                if s.is_settled() {
                    let _ = replies.send((s.ix, Some(s.state.header())));
                    me.stop(Some(STOP_REASON.into()));
                } else {
                    let _ = replies.send((s.ix, None));
                }
            }
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
        Entry::Snapshot { seq, after: None }
    }

    fn kinds(j: &Journal) -> Vec<String> {
        j.entries
            .iter()
            .map(|e| match e {
                Entry::Snapshot { seq, .. } => format!("S{seq}"),
                Entry::Grow => "G".into(),
                Entry::Child(d) => format!("C{}", d.total.events),
                Entry::Round { events } => format!("R{}", events.len()),
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

    #[test]
    fn a_snapshot_leaves_only_its_marker_which_restores_the_state_it_left() {
        let mut j = Journal::default();
        j.push(child(1), 0);
        j.push(round(2), 0);
        j.push(marker(1), 0);
        j.push(child(4), 0);
        let header = NodeHeader {
            own: Agg::default(),
            subtree: Agg {
                events: 5,
                ..Agg::default()
            },
            own_buckets: false,
        };
        let sent = Arc::new(Sent::default());
        j.close(
            2,
            Arc::new(Closed {
                header: header.clone(),
                sent: sent.clone(),
            }),
        );
        assert_eq!(kinds(&j), ["S2"]);
        // Onto checkpoint 1's row (2 still in flight) the marker itself is replayed; onto
        // checkpoint 2's row, nothing is.
        assert_eq!(j.replay_from(1), 0);
        assert_eq!(j.replay_from(2), 1);
        j.push(child(8), 0);
        assert_eq!(kinds(&j), ["S2", "C8"]);
        // Checkpoint 2 landed: the marker goes at the next append (which merges into C8).
        j.push(child(16), 2);
        assert_eq!(kinds(&j), ["C24"]);
        assert_eq!(
            Arc::strong_count(&sent),
            1,
            "the journal let go of what was sent"
        );
    }

    fn child(events: u64) -> Entry {
        Entry::Child(Box::new(Delta {
            total: Agg {
                events,
                ..Agg::default()
            },
            ..Delta::default()
        }))
    }

    fn round(events: usize) -> Entry {
        let e = NodeEvent {
            keys: [None; 3],
            metrics: Arc::from(Vec::<(MetricName, i64)>::new()),
        };
        Entry::Round {
            events: vec![e; events],
        }
    }

    #[test]
    fn children_deltas_merge_across_rounds_but_not_across_a_marker_or_a_topology_change() {
        let mut j = Journal::default();
        j.push(child(1), 0);
        j.push(round(2), 0);
        j.push(child(2), 0);
        j.push(child(4), 0);
        assert_eq!(kinds(&j), ["C7", "R2"]);
        j.push(marker(1), 0);
        j.push(child(8), 0);
        assert_eq!(kinds(&j), ["C7", "R2", "S1", "C8"]);
        j.push(Entry::Grow, 0);
        j.push(child(16), 0);
        j.push(child(32), 0);
        assert_eq!(kinds(&j), ["C7", "R2", "S1", "C8", "G", "C48"]);
        // Dropping a landed prefix leaves no merge target pointing into it.
        j.push(child(64), 1);
        assert_eq!(kinds(&j), ["C8", "G", "C112"]);
        j.push(marker(2), 1);
        j.push(child(1), 2);
        assert_eq!(kinds(&j), ["C1"]);
        j.push(child(1), 2);
        assert_eq!(kinds(&j), ["C2"]);
    }
}
