//! The floor under `ingest`: what one ractor actor per node costs on this machine before canopy
//! does any work. It spawns the benchmark's tree shape (5 tenants × 7 levels × fanout 5 = 97,655
//! actors, linked to one supervisor per tenant, as the engine does), then runs rounds in which
//! every involved node gets one message and sends one to its parent once all its involved
//! children have (canopy's round shape, with empty payloads). It prints the time and CPU of each
//! phase and the resident memory, so a reader can tell how much of `ingest`'s time is the actor
//! runtime itself.
//!
//! It also measures the other fixed cost, decoding the benchmark's NDJSON stream on one thread
//! (`record::decode`, as the file reader does), and then prints the **budget**: the CPU seconds
//! that 2 cores have for the benchmark's records at the target rate (`CANOPY_FLOOR_TARGET`,
//! 500,000 records/s by default), and which share of it these floors take before canopy
//! aggregates a number, checks a duplicate or writes a row.
//!
//! The rounds follow the checkpoint cadence of a run at the target rate
//! (`CANOPY_FLOOR_CHECKPOINT_MS`, 1000 by default; 100 is issue #3's): a run of the benchmark at
//! 500,000 records/s lasts 2.2 s, so at 1 s checkpoints it takes 3 rounds (at 1 s, 2 s and the
//! end) and at 100 ms 22, each carrying the events of its stretch of the run on uniformly chosen
//! nodes (as `canopy loadgen` chooses them). Only nodes with events and their ancestors take part
//! in a round, as in the engine. The rounds are planned before the clock starts.
//!
//! The tree is spawned twice: first as a run of `canopy ingest` starts, into memory that no actor
//! used before, then, after the first tree stopped, into the memory it left (the allocator keeps
//! it): the spawn without the kernel's first-touch cost, which is slow on this VM.
//! The budget is printed for both.
//!
//! Spawns use `spawn_linked_instant` (no wait for `pre_start`), as the coordinator does;
//! `CANOPY_FLOOR_AWAIT=1` awaits each spawn instead, as it did until 2026-12-02.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

#[path = "support/env.rs"]
mod env;
use env::env_or;

#[path = "support/cpu.rs"]
mod cpu;
use cpu::cpu_secs;

const TENANTS: usize = 5;
const DEPTH: usize = 7;
const FANOUT: usize = 5;

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

/// Decodes every line of the benchmark stream on this thread, as the file reader does.
/// Returns (records, events, CPU seconds).
fn decode_floor() -> (usize, usize, f64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("stream.ndjson");
    let cfg = canopy::loadgen::LoadgenConfig::default();
    canopy::loadgen::generate_file(&cfg, &path).expect("generate the stream");
    let text = std::fs::read(&path).expect("read the stream");
    let c = cpu_secs();
    let (mut records, mut ok) = (0usize, 0usize);
    for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        records += 1;
        ok += usize::from(std::hint::black_box(canopy_actors::record::decode(line)).is_ok());
    }
    let cpu = cpu_secs() - c;
    // The decoder must have seen real records, or this would be the floor of a blank loop.
    assert!(ok * 2 > records, "only {ok} of {records} lines decoded");
    (records, cfg.events, cpu)
}

/// Nodes of one round and the number of involved children of each (`None`: not involved),
/// for `events` uniformly chosen nodes of one tenant's tree (node i's parent is (i - 1) / FANOUT).
fn plan_round(rng: &mut impl Rng, events: usize, per_tenant: usize) -> Vec<Option<u32>> {
    let mut expect: Vec<Option<u32>> = vec![None; per_tenant];
    for _ in 0..events {
        let mut i = rng.random_range(0..per_tenant);
        if expect[i].is_some() {
            continue;
        }
        expect[i] = Some(0);
        // Each newly involved node adds one expected delta to its parent; the walk stops at
        // the first parent that was already involved (its own parent counted it then).
        while i != 0 {
            let p = (i - 1) / FANOUT;
            match &mut expect[p] {
                Some(e) => {
                    *e += 1;
                    break;
                }
                None => {
                    expect[p] = Some(1);
                    i = p;
                }
            }
        }
    }
    expect
}

type Tree = Vec<(ActorRef<()>, Vec<ActorRef<Msg>>)>;

/// Spawns the benchmark's tree, one supervisor per tenant; returns it with its CPU seconds.
async fn spawn_tree(
    per_tenant: usize,
    await_spawns: bool,
    done_tx: &UnboundedSender<()>,
    label: &str,
) -> (Tree, f64) {
    let rss0 = rss_mb();
    let (t, c) = (Instant::now(), cpu_secs());
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
            let a = if await_spawns {
                Actor::spawn_linked(None, Node, args, sup.get_cell())
                    .await
                    .unwrap()
                    .0
            } else {
                let (a, h) =
                    ractor::ActorRuntime::spawn_linked_instant(None, Node, args, sup.get_cell())
                        .unwrap();
                starts.push(h);
                a
            };
            nodes.push(a);
        }
        for h in starts {
            h.await.unwrap().unwrap();
        }
        tenants.push((sup, nodes));
    }
    let n = TENANTS * per_tenant;
    let cpu = cpu_secs() - c;
    println!(
        "spawn ({label}): {n} actors in {:.2} s ({cpu:.2} s cpu, {:.1} µs cpu per actor), rss +{:.0} MB ({:.1} KB per actor){}",
        t.elapsed().as_secs_f64(),
        cpu * 1e6 / n as f64,
        rss_mb() - rss0,
        (rss_mb() - rss0) * 1e3 / n as f64,
        if await_spawns { " [awaited]" } else { "" }
    );
    (tenants, cpu)
}

/// Stops every actor of the tree and waits until all are gone (their memory is then free for
/// the next spawn: the allocator keeps it, see `canopy::tune_allocator`).
async fn stop_tree(tree: Tree) {
    for (sup, nodes) in &tree {
        for a in nodes {
            a.stop(None);
        }
        sup.stop(None);
    }
    for (sup, nodes) in tree {
        for a in nodes {
            a.wait(None).await.unwrap();
        }
        sup.wait(None).await.unwrap();
    }
}

fn main() {
    canopy::tune_allocator();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let await_spawns = std::env::var("CANOPY_FLOOR_AWAIT").is_ok_and(|v| v == "1");
    let target: f64 = env_or("CANOPY_FLOOR_TARGET", 500_000.0);
    let checkpoint_ms: f64 = env_or("CANOPY_FLOOR_CHECKPOINT_MS", 1000.0);

    let (records, events, decode_cpu) = decode_floor();
    println!(
        "decode: {records} records in {decode_cpu:.2} s cpu on one thread ({:.2} µs per record)",
        decode_cpu * 1e6 / records as f64
    );
    // A run at the target rate takes a checkpoint every `checkpoint_ms` and one at the end;
    // each round carries the events of its stretch of the run (the last one a shorter one).
    let run_ms = records as f64 / target * 1000.0;
    let mut bounds: Vec<f64> = (1..)
        .map(|k| k as f64 * checkpoint_ms)
        .take_while(|t| *t < run_ms)
        .collect();
    bounds.push(run_ms);
    let mut from = 0.0;
    let per_round: Vec<usize> = bounds
        .iter()
        .map(|t| {
            let e = (events as f64 * (t - from) / run_ms).round() as usize;
            from = *t;
            e
        })
        .collect();
    let per_tenant: usize = (0..DEPTH).map(|l| FANOUT.pow(l as u32)).sum();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let plans: Vec<Vec<Vec<Option<u32>>>> = per_round
        .iter()
        .map(|e| {
            (0..TENANTS)
                .map(|_| plan_round(&mut rng, e / TENANTS, per_tenant))
                .collect()
        })
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (fresh_cpu, reused_cpu, rounds_cpu) = rt.block_on(async move {
        let (done_tx, mut done_rx) = unbounded_channel();
        let (tree, fresh_cpu) = spawn_tree(per_tenant, await_spawns, &done_tx, "fresh").await;
        // The same tree again in the memory the first one used: the cost without first touch.
        stop_tree(tree).await;
        let (tree, reused_cpu) = spawn_tree(per_tenant, await_spawns, &done_tx, "reused").await;
        let (t, c) = (Instant::now(), cpu_secs());
        let mut msgs = 0usize;
        for round in &plans {
            let mut roots = 0;
            for ((_, nodes), plan) in tree.iter().zip(round) {
                roots += usize::from(plan[0].is_some());
                for (a, e) in nodes.iter().zip(plan) {
                    if let Some(expect) = e {
                        a.send_message(Msg::Round { expect: *expect }).unwrap();
                        // Its Round, and its delta up (a root's is the done signal below).
                        msgs += 2;
                    }
                }
            }
            for _ in 0..roots {
                // A node actor that failed would leave its root waiting: fail instead of hanging.
                tokio::time::timeout(std::time::Duration::from_secs(60), done_rx.recv())
                    .await
                    .expect("a round did not finish within 60 s")
                    .unwrap();
            }
        }
        let rounds_cpu = cpu_secs() - c;
        println!(
            "rounds: {} ({:?} events; checkpoints every {checkpoint_ms} ms at {target} records/s), {msgs} messages in {:.2} s ({rounds_cpu:.2} s cpu, {:.2} µs cpu per message)",
            plans.len(),
            per_round,
            t.elapsed().as_secs_f64(),
            rounds_cpu * 1e6 / msgs.max(1) as f64
        );
        stop_tree(tree).await;
        (fresh_cpu, reused_cpu, rounds_cpu)
    });
    let budget = 2.0 * run_ms / 1000.0;
    println!("budget at {target} records/s on 2 cores: {budget:.2} s cpu for {records} records");
    for (label, spawn_cpu) in [("fresh", fresh_cpu), ("reused", reused_cpu)] {
        let floor = decode_cpu + spawn_cpu + rounds_cpu;
        println!(
            "  with the {label}-memory spawn, the floors take {floor:.2} s ({:.0}%: decode {decode_cpu:.2}, \
             spawn {spawn_cpu:.2}, rounds {rounds_cpu:.2}), leaving {:.2} s ({:.2} µs per record) for everything else",
            100.0 * floor / budget,
            budget - floor,
            (budget - floor) * 1e6 / records as f64
        );
    }
}
