//! What the engine relies on from an actor's mailbox, which `vendor/ractor` patches
//! (`lazy_mpsc`, see `vendor/README.md`): messages from one sender arrive in the order sent,
//! none is lost or doubled under concurrent senders, a busy mailbox does not starve other
//! tasks, and a stopped actor refuses messages instead of dropping them silently.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

enum Msg {
    /// A sequence number from sender `from`.
    Seq {
        from: usize,
        n: u64,
    },
    Report(RpcReplyPort<(u64, u64, bool)>),
}

struct Collector;

struct State {
    next: Vec<u64>,
    sum: u64,
    count: u64,
    in_order: bool,
}

#[ractor::async_trait]
impl Actor for Collector {
    type Msg = Msg;
    type State = State;
    type Arguments = usize;

    async fn pre_start(
        &self,
        _: ActorRef<Msg>,
        senders: usize,
    ) -> Result<State, ActorProcessingErr> {
        Ok(State {
            next: vec![0; senders],
            sum: 0,
            count: 0,
            in_order: true,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Msg>,
        msg: Msg,
        s: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Seq { from, n } => {
                s.in_order &= s.next[from] == n;
                s.next[from] = n + 1;
                s.sum += n;
                s.count += 1;
            }
            Msg::Report(reply) => {
                let _ = reply.send((s.count, s.sum, s.in_order));
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_deliver_every_message_once_and_in_order_per_sender() {
    const SENDERS: usize = 4;
    const EACH: u64 = 50_000;
    let (actor, handle) = Actor::spawn(None, Collector, SENDERS).await.unwrap();
    let mut tasks = Vec::new();
    for from in 0..SENDERS {
        let a = actor.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..EACH {
                a.send_message(Msg::Seq { from, n }).unwrap();
                if n % 1000 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    // Another task must keep running while the mailbox is flooded (the receive spends tokio's
    // cooperative budget, so the actor's loop yields).
    let ticker = tokio::spawn(async {
        let mut ticks = 0u32;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            ticks += 1;
        }
        ticks
    });
    for t in tasks {
        t.await.unwrap();
    }
    let (count, sum, in_order) = ractor::call!(actor, Msg::Report).unwrap();
    assert_eq!(count, SENDERS as u64 * EACH, "every message arrived once");
    assert_eq!(sum, SENDERS as u64 * (EACH * (EACH - 1) / 2));
    assert!(in_order, "messages of one sender arrived in the order sent");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), ticker)
            .await
            .expect("another task was starved")
            .unwrap(),
        20
    );
    actor.stop(None);
    handle.await.unwrap();
}

#[tokio::test]
async fn a_stopped_actor_refuses_messages() {
    let (actor, handle) = Actor::spawn(None, Collector, 1).await.unwrap();
    actor.send_message(Msg::Seq { from: 0, n: 0 }).unwrap();
    let (count, _, _) = ractor::call!(actor, Msg::Report).unwrap();
    assert_eq!(count, 1);
    actor.stop(None);
    handle.await.unwrap();
    assert!(
        actor.send_message(Msg::Seq { from: 0, n: 1 }).is_err(),
        "a send to a stopped actor fails"
    );
}
