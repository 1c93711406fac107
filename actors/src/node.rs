//! The node actor: one per node of every hierarchy. It owns the node's numbers (`own`, `subtree`
//! and their buckets), receives the events of its entity and the deltas of its children, and passes
//! one coalesced delta up per round (see ARCHITECTURE.md, "Rounds").

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::agg::{combine_extremes, Agg, Buckets, Delta, MetricName, Scope};
use crate::record::Mode;
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
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec(self).expect("node state encodes")
    }

    pub fn decode(b: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(b)
    }
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
    /// A node actor stopped unexpectedly (panic or kill); the tenant must be rebuilt.
    NodeDown { reason: String },
}

pub enum NodeMsg {
    /// The tenant's part of a round: this node's events, and how many children will send a delta.
    Round {
        events: Vec<NodeEvent>,
        expect: u32,
    },
    /// A child's coalesced delta for the current round.
    Child(Box<Delta>),
    /// The node's whole state, encoded, after dropping buckets older than `prune` (checkpoint).
    Snapshot {
        prune: [u64; 3],
        reply: RpcReplyPort<Vec<u8>>,
    },
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
    pub state: NodeState,
    pub parent: Option<ActorRef<NodeMsg>>,
    pub signals: UnboundedSender<TenantSignal>,
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
}

impl Node {
    fn apply(&mut self, e: &NodeEvent) {
        let m = &e.metrics[..];
        self.state.own.add_event(m);
        if let Some(b) = &mut self.state.own_buckets {
            b.add_event(&e.keys, m);
        }
        self.pending.total.add_event(m);
        self.pending.buckets.add_event(&e.keys, m);
    }

    fn maybe_flush(&mut self) -> Result<(), ActorProcessingErr> {
        if self.expect != Some(self.received) {
            return Ok(());
        }
        self.expect = None;
        self.received = 0;
        let d = std::mem::take(&mut self.pending);
        self.state.subtree.merge(&d);
        match &self.parent {
            Some(p) => p.send_message(NodeMsg::Child(Box::new(d)))?,
            None => self.signals.send(TenantSignal::RoundDone)?,
        }
        Ok(())
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
        Ok(Node {
            ix: a.ix,
            mode: a.mode,
            state: a.state,
            parent: a.parent,
            signals: a.signals,
            pending: Delta::default(),
            expect: None,
            received: 0,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<NodeMsg>,
        msg: NodeMsg,
        s: &mut Node,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Round { events, expect } => {
                for e in &events {
                    s.apply(e);
                }
                s.expect = Some(expect);
                s.maybe_flush()?;
            }
            NodeMsg::Child(d) => {
                s.pending.merge(&d);
                s.received += 1;
                s.maybe_flush()?;
            }
            NodeMsg::Snapshot { prune, reply } => {
                s.state.subtree.buckets.prune(&prune);
                if let Some(b) = &mut s.state.own_buckets {
                    b.prune(&prune);
                }
                let _ = reply.send(s.state.encode());
            }
            NodeMsg::Subtree(reply) => {
                let _ = reply.send(s.state.subtree.clone());
            }
            NodeMsg::Remove {
                gone,
                children,
                reply,
            } => {
                let tainted = s.state.subtree.subtract(&gone);
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
                        }
                    }
                }
                let _ = reply.send(());
            }
            NodeMsg::Add { delta, reply } => {
                s.state.subtree.merge(&delta);
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
                if s.mode == Mode::Current && s.state.own_buckets.is_none() {
                    s.state.own_buckets = Some(s.state.subtree.buckets.clone());
                }
            }
            NodeMsg::Crash => panic!("chaos: node {} crashed on purpose", s.ix),
        }
        Ok(())
    }
}
