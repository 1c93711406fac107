//! The floor under `ingest`: what one ractor actor per node costs on this machine before canopy
//! does any work. It spawns the benchmark's tree shape (5 tenants × 7 levels × fanout 5 = 97,655
//! actors, linked to one supervisor per tenant, as the engine does), then runs rounds in which
//! every leaf gets one message and every node sends one message to its parent once all its
//! children have (canopy's round shape, with empty payloads). It prints the time and CPU of each
//! phase and the resident memory, so a reader can tell how much of `ingest`'s time is the actor
//! runtime itself.
//!
//! `CANOPY_FLOOR_INSTANT=1` spawns with `spawn_linked_instant` (no wait for `pre_start`) instead
//! of awaiting each spawn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

#[path = "support/cpu.rs"]
mod cpu;
use cpu::cpu_secs;

const TENANTS: usize = 5;
const DEPTH: usize = 7;
const FANOUT: usize = 5;
const ROUNDS: usize = 3;

fn rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / 1e6
}

enum Msg {
    Round { expect: u32 },
    Child,
}

struct Node;

struct NodeState {
    parent: Option<ActorRef<Msg>>,
    expect: Option<u32>,
    received: u32,
    done: UnboundedSender<()>,
}

impl NodeState {
    fn maybe_flush(&mut self) -> Result<(), ActorProcessingErr> {
        if self.expect != Some(self.received) {
            return Ok(());
        }
        self.expect = None;
        self.received = 0;
        match &self.parent {
            Some(p) => p.send_message(Msg::Child)?,
            None => self.done.send(())?,
        }
        Ok(())
    }
}

#[ractor::async_trait]
impl Actor for Node {
    type Msg = Msg;
    type State = NodeState;
    type Arguments = (Option<ActorRef<Msg>>, UnboundedSender<()>);

    async fn pre_start(
        &self,
        _: ActorRef<Msg>,
        (parent, done): Self::Arguments,
    ) -> Result<NodeState, ActorProcessingErr> {
        Ok(NodeState {
            parent,
            expect: None,
            received: 0,
            done,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Msg>,
        msg: Msg,
        s: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Round { expect } => {
                s.expect = Some(expect);
                s.maybe_flush()?;
            }
            Msg::Child => {
                s.received += 1;
                s.maybe_flush()?;
            }
        }
        Ok(())
    }
}

struct Supervisor(Arc<AtomicU64>);

#[ractor::async_trait]
impl Actor for Supervisor {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<()>,
        _: SupervisionEvent,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn main() {
    canopy::tune_allocator();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let instant = std::env::var("CANOPY_FLOOR_INSTANT").is_ok_and(|v| v == "1");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let per_tenant: usize = (0..DEPTH).map(|l| FANOUT.pow(l as u32)).sum();
        let rss0 = rss_mb();
        let (t, c) = (Instant::now(), cpu_secs());
        let (done_tx, mut done_rx) = unbounded_channel();
        let mut tenants = Vec::new();
        for _ in 0..TENANTS {
            let (sup, _) = Actor::spawn(None, Supervisor(Arc::default()), ())
                .await
                .unwrap();
            // Breadth-first: node i's parent is (i - 1) / FANOUT.
            let mut nodes: Vec<ActorRef<Msg>> = Vec::with_capacity(per_tenant);
            let mut starts = Vec::new();
            for i in 0..per_tenant {
                let parent = (i > 0).then(|| nodes[(i - 1) / FANOUT].clone());
                let args = (parent, done_tx.clone());
                let a = if instant {
                    let (a, h) =
                        ractor::ActorRuntime::spawn_linked_instant(None, Node, args, sup.get_cell()).unwrap();
                    starts.push(h);
                    a
                } else {
                    Actor::spawn_linked(None, Node, args, sup.get_cell())
                        .await
                        .unwrap()
                        .0
                };
                nodes.push(a);
            }
            for h in starts {
                h.await.unwrap().unwrap();
            }
            tenants.push((sup, nodes));
        }
        let n = TENANTS * per_tenant;
        println!(
            "spawn: {n} actors in {:.2} s ({:.2} s cpu, {:.1} µs cpu per actor), rss +{:.0} MB ({:.1} KB per actor){}",
            t.elapsed().as_secs_f64(),
            cpu_secs() - c,
            (cpu_secs() - c) * 1e6 / n as f64,
            rss_mb() - rss0,
            (rss_mb() - rss0) * 1e3 / n as f64,
            if instant { " [instant]" } else { "" }
        );
        let leaves_from = per_tenant - FANOUT.pow(DEPTH as u32 - 1);
        for r in 0..ROUNDS {
            let (t, c) = (Instant::now(), cpu_secs());
            for (_, nodes) in &tenants {
                for (i, a) in nodes.iter().enumerate() {
                    let expect = if i >= leaves_from { 0 } else { FANOUT as u32 };
                    a.send_message(Msg::Round { expect }).unwrap();
                }
            }
            for _ in 0..TENANTS {
                done_rx.recv().await.unwrap();
            }
            let cpu = cpu_secs() - c;
            // Every node gets its Round, and every non-root node sends one Child.
            let msgs = 2 * n - TENANTS;
            println!(
                "round {r}: {msgs} messages in {:.3} s ({:.2} s cpu, {:.2} µs cpu per message)",
                t.elapsed().as_secs_f64(),
                cpu,
                cpu * 1e6 / msgs as f64
            );
        }
        for (sup, nodes) in tenants {
            for a in nodes {
                a.stop(None);
            }
            sup.stop(None);
        }
    });
}
