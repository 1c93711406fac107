//! Drives the actor tree in-process (no file, no broker, no database): records go straight into
//! the engine, and node states are read back from the live actors.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use canopy_actors::agg::{Agg, Granularity};
use canopy_actors::engine::{Engine, EngineConfig};
use canopy_actors::record::decode_json;
use canopy_actors::source::{DiscardDeadLetters, Input, Source, SourceBatch, SourceError};
use canopy_actors::store::{
    AsOf, BucketKind, BucketRow, BucketWrite, Checkpoint, CheckpointMeta, Load, NodeRow, Store,
    StoreError, TenantImage, Written,
};

/// A store that keeps checkpoints in memory: enough for driving the core in a unit test.
#[derive(Default)]
struct MemStore {
    cps: Mutex<Vec<Checkpoint>>,
}

#[async_trait::async_trait]
impl Store for MemStore {
    async fn meta(&self) -> Result<Option<CheckpointMeta>, StoreError> {
        Ok(self.cps.lock().unwrap().last().map(|c| CheckpointMeta {
            seq: c.seq,
            source: c.source.clone(),
        }))
    }
    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
    async fn load_tenant(&self, tenant: &str, load: Load) -> Result<TenantImage, StoreError> {
        Ok(image(&self.cps.lock().unwrap(), tenant, load))
    }
    async fn load_node(
        &self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
        load: Load,
    ) -> Result<AsOf<Option<NodeRow>>, StoreError> {
        // One lock: the row and the checkpoint it is from must agree.
        let cps = self.cps.lock().unwrap();
        let value = image(&cps, tenant, load)
            .nodes
            .into_iter()
            .find(|n| n.hierarchy == hierarchy && n.node == node);
        Ok(AsOf {
            as_of: cps.last().map_or(0, |c| c.seq),
            value,
        })
    }
    async fn commit(&self, cp: Arc<Checkpoint>) -> Result<Written, StoreError> {
        let mut cps = self.cps.lock().unwrap();
        // Idempotent, as the port asks: a checkpoint already committed is not folded again.
        if cps.last().is_some_and(|c| c.seq >= cp.seq) {
            return Ok(Written::default());
        }
        cps.push((*cp).clone());
        // Nothing is encoded here: the rows are the logical changes, the bytes are not measured.
        Ok(Written {
            rows: cp.rows() as u64,
            bytes: 0,
        })
    }
}

type Key = (u8, u8, u64);

/// A tenant as the checkpoints so far leave it: bucket rows replace or fold, in commit order,
/// then buckets of written nodes below the retention cutoffs go (the store port's contract,
/// written out a second time, independently of the embedded store).
fn image(cps: &[Checkpoint], tenant: &str, load: Load) -> TenantImage {
    let mut img = TenantImage::default();
    let mut nodes: HashMap<(String, String), (NodeRow, std::collections::BTreeMap<Key, Agg>)> =
        HashMap::new();
    for cp in cps {
        for t in cp.tenants.iter().filter(|t| t.tenant == tenant) {
            if t.row.is_some() {
                img.row = t.row.clone();
            }
            for d in &t.delete_nodes {
                nodes.remove(d);
            }
            for n in &t.put_nodes {
                let e = nodes
                    .entry((n.hierarchy.clone(), n.node.clone()))
                    .or_insert_with(|| (n.clone(), Default::default()));
                e.0.parent = n.parent.clone();
                e.0.header = n.header.clone();
                let fold = match n.write {
                    BucketWrite::Replace => false,
                    BucketWrite::Fold { copy_own } => {
                        if copy_own {
                            let own = BucketKind::Own as u8;
                            e.1.retain(|k, _| k.0 != own);
                            let copies: Vec<(Key, Agg)> =
                                e.1.iter()
                                    .map(|(k, a)| ((own, k.1, k.2), a.clone()))
                                    .collect();
                            e.1.extend(copies);
                        }
                        true
                    }
                };
                let values = n.replace.iter().map(|b| (b, false));
                for (b, fold) in n.buckets.iter().map(|b| (b, fold)).chain(values) {
                    let k = (b.kind as u8, b.granularity as u8, b.key);
                    match (&b.agg, fold) {
                        (Some(a), true) => e.1.entry(k).or_default().merge(a),
                        (Some(a), false) => {
                            e.1.insert(k, a.clone());
                        }
                        (None, _) => {
                            e.1.remove(&k);
                        }
                    }
                }
                e.1.retain(|k, _| k.2 >= t.retain_from[k.1 as usize]);
            }
            for s in &t.expire_dedup {
                img.dedup.retain(|d| d.seq != *s);
            }
            img.dedup.extend(t.dedup.clone());
        }
    }
    img.nodes = nodes
        .into_values()
        .map(|(mut row, b)| {
            row.buckets = match &load {
                Load::Headers => Vec::<BucketRow>::new(),
                Load::Buckets | Load::BucketsAt(_) => b
                    .into_iter()
                    .filter(|((_, g, key), _)| match &load {
                        Load::BucketsAt(k) => k[*g as usize].binary_search(key).is_ok(),
                        _ => true,
                    })
                    .map(|((kind, g, key), agg)| BucketRow {
                        kind: if kind == 0 {
                            BucketKind::Subtree
                        } else {
                            BucketKind::Own
                        },
                        granularity: Granularity::ALL[g as usize],
                        key,
                        agg: Some(agg),
                    })
                    .collect(),
            }
            .into();
            row
        })
        .collect();
    img
}

struct NoSource;
#[async_trait::async_trait]
impl Source for NoSource {
    async fn resume(&mut self, _: Option<&[u8]>) -> Result<(), SourceError> {
        Ok(())
    }
    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError> {
        Ok(None)
    }
}

fn inputs(lines: &[&str]) -> Vec<Input> {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| Input {
            tag: i as u64 + 1,
            origin: None,
            raw: l.as_bytes().to_vec(),
            decoded: decode_json(l),
        })
        .collect()
}

fn ev(id: &str, e: &str, v: i64) -> String {
    format!(
        r#"{{"type":"event","tenant":"t","event_id":"{id}","entity":"{e}","ts":"2026-11-21T10:00:00Z","metrics":{{"x":{v}}}}}"#
    )
}
fn up(n: &str, p: Option<&str>) -> String {
    match p {
        Some(p) => format!(
            r#"{{"type":"upsert_node","tenant":"t","hierarchy":"h","node":"{n}","parent":"{p}"}}"#
        ),
        None => format!(r#"{{"type":"upsert_node","tenant":"t","hierarchy":"h","node":"{n}"}}"#),
    }
}

async fn engine(store: Arc<MemStore>) -> Engine {
    Engine::open(
        EngineConfig::default(),
        store,
        &mut NoSource,
        Box::new(DiscardDeadLetters),
    )
    .await
    .unwrap()
}

async fn extremes(e: &mut Engine, node: &str) -> Option<(i64, i64, u64)> {
    let st = e.node_state("t", "h", node).await.expect("node exists");
    st.subtree.total.stat("x").map(|s| (s.min, s.max, s.count))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_max_stay_exact_when_a_subtree_moves_away_and_is_deleted() {
    let store = Arc::new(MemStore::default());
    let mut e = engine(store.clone()).await;
    let setup = [
        up("root", None),
        up("a", Some("root")),
        up("b", Some("root")),
        up("a1", Some("a")),
        up("b1", Some("b")),
    ];
    let evs = [
        ev("1", "a1", 100),
        ev("2", "a", 5),
        ev("3", "b1", 50),
        ev("4", "b", -7),
        ev("5", "root", 20),
    ];
    let lines: Vec<&str> = setup.iter().chain(evs.iter()).map(String::as_str).collect();
    e.process(inputs(&lines)).await.unwrap();
    assert_eq!(extremes(&mut e, "root").await, Some((-7, 100, 5)));
    assert_eq!(extremes(&mut e, "a").await, Some((5, 100, 2)));

    // a1 (holding the max, 100) moves under b: a's and root's max must drop exactly.
    let mv = up("a1", Some("b"));
    e.process(inputs(&[&mv])).await.unwrap();
    assert_eq!(
        extremes(&mut e, "a").await,
        Some((5, 5, 1)),
        "a lost its max holder"
    );
    assert_eq!(extremes(&mut e, "b").await, Some((-7, 100, 3)));
    assert_eq!(
        extremes(&mut e, "root").await,
        Some((-7, 100, 5)),
        "root keeps everything"
    );

    // b's min holder is b itself; b1 (50) and a1 (100) are removed by delete then move.
    let del = r#"{"type":"delete_node","tenant":"t","hierarchy":"h","node":"b1"}"#;
    e.process(inputs(&[del])).await.unwrap();
    assert_eq!(extremes(&mut e, "b").await, Some((-7, 100, 2)));
    assert_eq!(
        extremes(&mut e, "root").await,
        Some((-7, 100, 4)),
        "deleted numbers leave the ancestors"
    );
    let to_root = up("a1", None);
    e.process(inputs(&[&to_root])).await.unwrap();
    assert_eq!(extremes(&mut e, "b").await, Some((-7, -7, 1)));
    assert_eq!(
        extremes(&mut e, "root").await,
        Some((-7, 20, 3)),
        "max recomputed from what remains"
    );

    // A checkpoint, then a rebuilt engine on the same store sees the same numbers.
    e.checkpoint().await.unwrap();
    e.shutdown().await;
    let mut e2 = engine(store).await;
    e2.process(inputs(&[&ev("6", "a", 1)])).await.unwrap();
    assert_eq!(extremes(&mut e2, "root").await, Some((-7, 20, 4)));
    assert_eq!(extremes(&mut e2, "a1").await, Some((100, 100, 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributed_numbers_stay_with_the_chain_they_were_accepted_under() {
    let store = Arc::new(MemStore::default());
    let mut e = engine(store).await;
    let def = r#"{"type":"define_hierarchy","tenant":"t","hierarchy":"h","mode":"attributed"}"#;
    let (s1, s2, s3) = (up("p", None), up("q", None), up("c", Some("p")));
    let (e1, mv, e2) = (ev("1", "c", 10), up("c", Some("q")), ev("2", "c", 3));
    e.process(inputs(&[def, &s1, &s2, &s3, &e1, &mv, &e2]))
        .await
        .unwrap();
    assert_eq!(
        extremes(&mut e, "p").await,
        Some((10, 10, 1)),
        "p keeps what was accepted under it"
    );
    assert_eq!(
        extremes(&mut e, "q").await,
        Some((3, 3, 1)),
        "q only sees later events"
    );
    assert_eq!(extremes(&mut e, "c").await, Some((3, 10, 2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_mode_pending_events_follow_moves_and_leave_with_deletes() {
    // No round runs between these records (one batch, far below the round limits), so the moves
    // and deletes meet events still pending in the coordinator.
    let store = Arc::new(MemStore::default());
    let mut e = engine(store).await;
    let lines = [
        up("root", None),
        up("a", Some("root")),
        up("b", Some("root")),
        up("a1", Some("a")),
        up("b1", Some("b")),
        ev("1", "a1", 100),
        ev("2", "b1", 50),
        up("a1", Some("b")), // a1 moves with its pending 100
        ev("3", "a1", 7),
        r#"{"type":"delete_node","tenant":"t","hierarchy":"h","node":"b1"}"#.to_string(),
        up("b1", Some("a")), // created again (its slot may be reused): starts empty
        ev("4", "b1", 9),
        ev("5", "b", 1),
    ];
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    e.process(inputs(&lines)).await.unwrap();
    assert_eq!(extremes(&mut e, "a1").await, Some((7, 100, 2)));
    assert_eq!(
        extremes(&mut e, "b").await,
        Some((1, 100, 3)),
        "a1's numbers, pending ones too, count under its new parent; b1's old 50 left with it"
    );
    assert_eq!(extremes(&mut e, "b1").await, Some((9, 9, 1)));
    assert_eq!(extremes(&mut e, "a").await, Some((9, 9, 1)));
    assert_eq!(extremes(&mut e, "root").await, Some((1, 100, 4)));
}

type Gate =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>> + Send + Sync>;

type ReadCheck = Box<dyn Fn(&str) -> Result<(), StoreError> + Send + Sync>;

/// A [`MemStore`] with faults: its commits first pass through `gate`, which can fail them (a
/// flaky store) or hold them (a stalled one), and its reads of a tenant through `reads`,
/// which can fail them (a tenant whose state cannot be read).
struct GatedStore {
    inner: MemStore,
    gate: Gate,
    reads: ReadCheck,
}

impl GatedStore {
    fn new(gate: Gate) -> Self {
        GatedStore {
            inner: MemStore::default(),
            gate,
            reads: Box::new(|_| Ok(())),
        }
    }

    fn failing_reads(reads: ReadCheck) -> Self {
        GatedStore {
            reads,
            ..GatedStore::new(Box::new(|| Box::pin(async { Ok(()) })))
        }
    }
}

#[async_trait::async_trait]
impl Store for GatedStore {
    async fn meta(&self) -> Result<Option<CheckpointMeta>, StoreError> {
        self.inner.meta().await
    }
    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        self.inner.tenants().await
    }
    async fn load_tenant(&self, tenant: &str, load: Load) -> Result<TenantImage, StoreError> {
        (self.reads)(tenant)?;
        self.inner.load_tenant(tenant, load).await
    }
    async fn load_node(
        &self,
        tenant: &str,
        hierarchy: &str,
        node: &str,
        load: Load,
    ) -> Result<AsOf<Option<NodeRow>>, StoreError> {
        (self.reads)(tenant)?;
        self.inner.load_node(tenant, hierarchy, node, load).await
    }
    async fn commit(&self, cp: Arc<Checkpoint>) -> Result<Written, StoreError> {
        (self.gate)().await?;
        self.inner.commit(cp).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_store_writes_are_retried_and_nothing_is_lost_or_doubled() {
    // Fails the first three commits with a transient error, counting every attempt.
    let attempts = Arc::new(Mutex::new(0u32));
    let seen = attempts.clone();
    let store = Arc::new(GatedStore::new(Box::new(move || {
        let n = {
            let mut a = seen.lock().unwrap();
            *a += 1;
            *a
        };
        Box::pin(async move {
            if n <= 3 {
                Err(StoreError::Unavailable("injected write failure".into()))
            } else {
                Ok(())
            }
        })
    })));
    let cfg = EngineConfig {
        retry_initial_ms: 1,
        retry_max_ms: 4,
        ..Default::default()
    };
    let mut e = Engine::open(
        cfg.clone(),
        store.clone(),
        &mut NoSource,
        Box::new(DiscardDeadLetters),
    )
    .await
    .unwrap();
    let (a, b) = (up("root", None), up("a", Some("root")));
    let evs: Vec<String> = (0..50)
        .map(|i| ev(&i.to_string(), if i % 2 == 0 { "a" } else { "root" }, i))
        .collect();
    let mut lines: Vec<&str> = vec![&a, &b];
    lines.extend(evs.iter().map(String::as_str));
    e.process(inputs(&lines)).await.unwrap();
    e.checkpoint().await.unwrap();
    assert_eq!(*attempts.lock().unwrap(), 4, "three failures, then success");
    e.shutdown().await;
    // A fresh engine on what was committed: every event exactly once.
    let mut e2 = Engine::open(cfg, store, &mut NoSource, Box::new(DiscardDeadLetters))
        .await
        .unwrap();
    let dup = ev("0", "a", 0);
    e2.process(inputs(&[&dup])).await.unwrap();
    assert_eq!(
        extremes(&mut e2, "root").await,
        Some((0, 49, 50)),
        "the duplicate is ignored after restore"
    );
    assert_eq!(extremes(&mut e2, "a").await, Some((0, 48, 25)));
}

/// A store whose commits wait while the returned sender's value is `false` (a stalled store).
fn valve(open: bool) -> (tokio::sync::watch::Sender<bool>, Arc<GatedStore>) {
    let (tx, rx) = tokio::sync::watch::channel(open);
    let store = Arc::new(GatedStore::new(Box::new(move || {
        let mut open = rx.clone();
        Box::pin(async move {
            while !*open.borrow() {
                open.changed().await.unwrap();
            }
            Ok(())
        })
    })));
    (tx, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_stops_ingestion_one_checkpoint_ahead() {
    // Commits hang until the store comes back (`tx` sends true).
    let (tx, store) = valve(false);
    let mut e = Engine::open(
        EngineConfig::default(),
        store.clone(),
        &mut NoSource,
        Box::new(DiscardDeadLetters),
    )
    .await
    .unwrap();
    let root = up("root", None);
    e.process(inputs(&[&root])).await.unwrap();
    // The first checkpoint's commit hangs in the background; processing may go on...
    e.begin_checkpoint().await.unwrap();
    let ev1 = ev("1", "root", 1);
    e.process(inputs(&[&ev1])).await.unwrap();
    // ...but the next checkpoint waits for the stalled one: nothing runs further ahead.
    let blocked =
        tokio::time::timeout(std::time::Duration::from_millis(300), e.begin_checkpoint()).await;
    assert!(
        blocked.is_err(),
        "a second checkpoint must wait while the store is stalled"
    );
    tx.send(true).unwrap();
    e.checkpoint().await.unwrap();
    assert_eq!(
        store.inner.cps.lock().unwrap().len(),
        2,
        "both checkpoints landed once the store came back"
    );
    assert_eq!(
        e.stats
            .checkpoints
            .load(std::sync::atomic::Ordering::Relaxed),
        2,
        "the cancelled wait lost no commit"
    );
    assert_eq!(extremes(&mut e, "root").await, Some((1, 1, 1)));
}

/// A small random stream over two hierarchies of tenant "t" (`h` current, `g` attributed):
/// nodes appear, move and are deleted between events spread over several hours, so that
/// journals hold rounds, child deltas, removals, additions and `Grow`s.
fn churn(seed: u64, len: usize) -> (Vec<String>, Vec<(String, String)>) {
    let mut x = seed;
    let mut rnd = move |n: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    let mut lines = vec![
        r#"{"type":"define_hierarchy","tenant":"t","hierarchy":"g","mode":"attributed"}"#
            .to_string(),
    ];
    let names: Vec<String> = (0..12).map(|i| format!("n{i}")).collect();
    let mut live: Vec<bool> = vec![false; names.len()];
    let node = |h: &str, n: &str, p: Option<&str>| match p {
        Some(p) => format!(
            r#"{{"type":"upsert_node","tenant":"t","hierarchy":"{h}","node":"{n}","parent":"{p}"}}"#
        ),
        None => format!(r#"{{"type":"upsert_node","tenant":"t","hierarchy":"{h}","node":"{n}"}}"#),
    };
    for (i, n) in names.iter().enumerate().take(4) {
        let p = (i > 0).then(|| names[(i - 1) / 2].as_str());
        for h in ["h", "g"] {
            lines.push(node(h, n, p));
        }
        live[i] = true;
    }
    for k in 0..len {
        let i = rnd(names.len() as u64) as usize;
        let r = rnd(100);
        if r < 70 && live[i] {
            let ts = format!("2026-11-21T{:02}:{:02}:00Z", 8 + rnd(4), rnd(60));
            lines.push(format!(
                r#"{{"type":"event","tenant":"t","event_id":"e{k}","entity":"{}","ts":"{ts}","metrics":{{"x":{}}}}}"#,
                names[i],
                rnd(1000) as i64 - 300
            ));
        } else if r < 92 {
            // Create or move under a random earlier node (earlier index: no cycles), or to a root.
            let p = rnd(i as u64 + 1) as usize;
            let parent = (p < i && live[p]).then(|| names[p].as_str());
            for h in ["h", "g"] {
                lines.push(node(h, &names[i], parent));
            }
            live[i] = true;
        } else if live[i] {
            for h in ["h", "g"] {
                lines.push(format!(
                    r#"{{"type":"delete_node","tenant":"t","hierarchy":"{h}","node":"{}"}}"#,
                    names[i]
                ));
            }
        }
    }
    let all = names
        .iter()
        .flat_map(|n| [("h".to_string(), n.clone()), ("g".to_string(), n.clone())])
        .collect();
    (lines, all)
}

fn small_rounds() -> EngineConfig {
    let mut cfg = EngineConfig::default();
    // Several rounds per batch: journals then hold many rounds and child deltas.
    cfg.tenant.round_max_events = 7;
    cfg
}

async fn engine_with(store: Arc<MemStore>, cfg: EngineConfig) -> Engine {
    Engine::open(cfg, store, &mut NoSource, Box::new(DiscardDeadLetters))
        .await
        .unwrap()
}

/// Every node of `nodes` has the same state in both engines (or is absent from both).
async fn same_states(a: &mut Engine, b: &mut Engine, nodes: &[(String, String)]) -> usize {
    let mut compared = 0;
    for (h, n) in nodes {
        let (x, y) = (a.node_state("t", h, n).await, b.node_state("t", h, n).await);
        assert_eq!(x, y, "node {h}/{n}");
        compared += x.is_some() as usize;
    }
    compared
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_restarted_alone_with_exactly_its_state() {
    kills_restart_single_nodes_exactly(small_rounds()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_idle_node_passivated_kills_still_restart_single_nodes_exactly() {
    let mut cfg = small_rounds();
    cfg.tenant.passivate_idle_checkpoints = 1;
    let e = kills_restart_single_nodes_exactly(cfg).await;
    let (p, a) = (
        e.stats.passivations.load(Relaxed),
        e.stats.activations.load(Relaxed),
    );
    assert!(p > 10 && a > 10, "{p} passivations and {a} activations");
}

/// Kills nodes of one engine now and then, and compares every node with an engine without kills.
async fn kills_restart_single_nodes_exactly(cfg: EngineConfig) -> Engine {
    let (lines, nodes) = churn(7, 900);
    let batches: Vec<&[String]> = lines.chunks(60).collect();
    // The reference neither loses nodes nor passivates them.
    let mut reference = engine_with(Arc::new(MemStore::default()), small_rounds()).await;
    let mut e = engine_with(Arc::new(MemStore::default()), cfg).await;
    let mut kills = 0u64;
    for (i, b) in batches.iter().enumerate() {
        let b: Vec<&str> = b.iter().map(String::as_str).collect();
        reference.process(inputs(&b)).await.unwrap();
        e.process(inputs(&b)).await.unwrap();
        // Checkpoints now and then, some left in flight, so that restarts meet journals that
        // span a committed checkpoint, an uncommitted one, or none.
        match i % 4 {
            // Twice in a row: the second finds every node idle (with passivation on, every
            // node is then passivated, and the next batch activates those it addresses).
            1 => {
                e.checkpoint().await.unwrap();
                e.checkpoint().await.unwrap();
            }
            3 => e.begin_checkpoint().await.unwrap(),
            _ => {}
        }
        // Kill a few nodes, by panic and by abort: roots, inner nodes, leaves, nodes created
        // since the last checkpoint.
        for k in 0..3 {
            let (h, n) = &nodes[(i * 5 + k * 7) % nodes.len()];
            if e.node_state("t", h, n).await.is_some() {
                e.kill_node("t", h, n, (i + k) % 2 == 0).await.unwrap();
                kills += 1;
            }
        }
    }
    let compared = same_states(&mut reference, &mut e, &nodes).await;
    assert!(compared >= 8, "only {compared} live nodes compared");
    let s = &e.stats;
    assert!(kills >= 20, "only {kills} kills");
    assert_eq!(
        s.node_restarts.load(Relaxed),
        kills,
        "every kill restarted one node"
    );
    assert_eq!(s.tenant_restarts.load(Relaxed), 0, "no tenant was rebuilt");
    e
}

/// A journal lets go of what a checkpoint covers as soon as that checkpoint lands, not before:
/// while the next one is still committing, a restarted node loads the last landed row and must
/// find every entry since that checkpoint's marker (including those before the marker of the
/// one in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_a_checkpoint_commits_replays_from_the_last_landed_one() {
    let (lines, nodes) = churn(5, 900);
    let batches: Vec<&[String]> = lines.chunks(60).collect();
    let (open, store) = valve(true);
    let mut e = Engine::open(
        small_rounds(),
        store,
        &mut NoSource,
        Box::new(DiscardDeadLetters),
    )
    .await
    .unwrap();
    let mut reference = engine_with(Arc::new(MemStore::default()), small_rounds()).await;
    let mut kills = 0u64;
    for (i, b) in batches.iter().enumerate() {
        let b: Vec<&str> = b.iter().map(String::as_str).collect();
        reference.process(inputs(&b)).await.unwrap();
        e.process(inputs(&b)).await.unwrap();
        match i % 3 {
            // A checkpoint that lands.
            0 => {
                open.send(true).unwrap();
                e.checkpoint().await.unwrap();
            }
            // One whose commit hangs: its snapshot markers are in the journals.
            1 => {
                open.send(false).unwrap();
                e.begin_checkpoint().await.unwrap();
            }
            // Still hanging: the nodes journaled this batch; kill some of them.
            _ => {
                for k in 0..6 {
                    let (h, n) = &nodes[(i * 3 + k * 5) % nodes.len()];
                    if e.node_state("t", h, n).await.is_some() {
                        e.kill_node("t", h, n, k % 2 == 0).await.unwrap();
                        kills += 1;
                    }
                }
            }
        }
    }
    open.send(true).unwrap();
    let compared = same_states(&mut reference, &mut e, &nodes).await;
    assert!(compared >= 8, "only {compared} live nodes compared");
    assert!(kills >= 20, "only {kills} kills");
    assert_eq!(e.stats.node_restarts.load(Relaxed), kills);
    assert_eq!(
        e.stats.tenant_restarts.load(Relaxed),
        0,
        "no tenant was rebuilt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_keeps_failing_escalates_to_a_tenant_rebuild() {
    let (lines, nodes) = churn(11, 300);
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let (first, rest) = lines.split_at(lines.len() / 2);
    let mut reference = engine_with(Arc::new(MemStore::default()), small_rounds()).await;
    let mut e = engine_with(Arc::new(MemStore::default()), small_rounds()).await;
    for x in [&mut reference, &mut e] {
        x.process(inputs(first)).await.unwrap();
    }
    e.checkpoint().await.unwrap();
    let limit = EngineConfig::default().tenant.node_max_restarts as u64;
    let mut live = None;
    for (h, n) in nodes.iter().filter(|(h, _)| h == "h") {
        if e.node_state("t", h, n).await.is_some() {
            live = Some((h.clone(), n.clone()));
            break;
        }
    }
    let (h, n) = live.expect("a live node of h");
    let (h, n) = (h.as_str(), n.as_str());
    for _ in 0..=limit {
        e.kill_node("t", h, n, false).await.unwrap();
    }
    let s = &e.stats;
    assert_eq!(
        s.node_restarts.load(Relaxed),
        limit,
        "restarted alone up to the limit"
    );
    assert_eq!(
        s.tenant_restarts.load(Relaxed),
        1,
        "then the tenant was rebuilt"
    );
    for x in [&mut reference, &mut e] {
        x.process(inputs(rest)).await.unwrap();
    }
    same_states(&mut reference, &mut e, &nodes).await;
}

/// Batches of lines; the position is the number of batches consumed.
struct Batches {
    batches: Vec<Vec<Input>>,
    next: usize,
}

impl Batches {
    fn new(lines: &[String], size: usize) -> Self {
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let mut all = inputs(&refs);
        let mut batches = Vec::new();
        while !all.is_empty() {
            let rest = all.split_off(size.min(all.len()));
            batches.push(std::mem::replace(&mut all, rest));
        }
        Batches { batches, next: 0 }
    }
}

#[async_trait::async_trait]
impl Source for Batches {
    async fn resume(&mut self, position: Option<&[u8]>) -> Result<(), SourceError> {
        self.next = position.map_or(0, |p| u64::from_le_bytes(p.try_into().unwrap()) as usize);
        Ok(())
    }
    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError> {
        let Some(b) = self.batches.get_mut(self.next) else {
            return Ok(None);
        };
        self.next += 1;
        Ok(Some(SourceBatch {
            inputs: std::mem::take(b),
            position: (self.next as u64).to_le_bytes().to_vec(),
        }))
    }
}

/// Dead letters kept in memory as (tag, reason); resumes by truncating, like the file.
#[derive(Clone, Default)]
struct Letters(Arc<Mutex<Vec<(u64, &'static str)>>>);

#[async_trait::async_trait]
impl canopy_actors::source::DeadLetters for Letters {
    async fn resume(&mut self, p: Option<&[u8]>) -> Result<(), SourceError> {
        let n = p.map_or(0, |p| u64::from_le_bytes(p.try_into().unwrap()) as usize);
        self.0.lock().unwrap().truncate(n);
        Ok(())
    }
    async fn write(
        &mut self,
        dl: canopy_actors::source::DeadLetter<'_>,
    ) -> Result<(), SourceError> {
        self.0.lock().unwrap().push((dl.tag, dl.refusal.reason()));
        Ok(())
    }
    async fn sync(&mut self) -> Result<canopy_actors::source::Flush, SourceError> {
        let n = self.0.lock().unwrap().len() as u64;
        Ok(canopy_actors::source::Flush::ready(
            n.to_le_bytes().to_vec(),
        ))
    }
}

/// Two tenants' churn streams, interleaved line by line.
fn two_tenants() -> (Vec<String>, Vec<(String, String)>) {
    let (good, nodes) = churn(3, 400);
    let (bad, _) = churn(5, 400);
    let mut lines = Vec::new();
    let mut it = (
        good.iter()
            .map(|l| l.replace(r#""tenant":"t""#, r#""tenant":"good""#)),
        bad.iter()
            .map(|l| l.replace(r#""tenant":"t""#, r#""tenant":"bad""#)),
    );
    loop {
        match (it.0.next(), it.1.next()) {
            (None, None) => break,
            (a, b) => lines.extend(a.into_iter().chain(b)),
        }
    }
    (lines, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_that_keeps_failing_is_parked_the_others_go_on_and_a_rerun_retries_it() {
    let (lines, nodes) = two_tenants();
    let cfg = EngineConfig {
        retry_initial_ms: 1,
        retry_max_ms: 4,
        ..small_rounds()
    };
    // The reference: everything, nothing failing.
    let want = Letters::default();
    let ref_store = Arc::new(MemStore::default());
    let mut reference = Engine::open(
        cfg.clone(),
        ref_store.clone(),
        &mut Batches::new(&lines, 50),
        Box::new(want.clone()),
    )
    .await
    .unwrap();
    reference.run(&mut Batches::new(&lines, 50)).await.unwrap();

    // Every read of tenant `bad` fails while `broken` is set: each rebuild of it fails.
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = broken.clone();
    let store = Arc::new(GatedStore::failing_reads(Box::new(move |tenant| {
        if tenant == "bad" && flag.load(Relaxed) {
            return Err(StoreError::Corrupt(
                "injected: tenant bad is unreadable".into(),
            ));
        }
        Ok(())
    })));
    let got = Letters::default();
    let mut src = Batches::new(&lines, 50);
    let mut e = Engine::open(cfg.clone(), store.clone(), &mut src, Box::new(got.clone()))
        .await
        .unwrap();
    let mut n = 0;
    while let Some(b) = src.next_batch().await.unwrap() {
        e.process(b.inputs).await.unwrap();
        e.set_position(b.position);
        n += 1;
        if n % 3 == 0 {
            e.checkpoint().await.unwrap();
        }
        if n == 5 {
            // From now on every rebuild of `bad` fails: a node of it dies, its restart cannot
            // read the store, the tenant rebuilds fail, and it is parked.
            broken.store(true, Relaxed);
            e.kill_node("bad", "h", "n0", true).await.unwrap();
            assert_eq!(e.parked().len(), 1, "bad is parked");
        }
    }
    e.checkpoint().await.unwrap();
    // `good` went on to the end of the stream while `bad` was parked.
    for (h, node) in &nodes {
        assert_eq!(
            e.node_state("good", h, node).await,
            reference.node_state("good", h, node).await,
            "good/{h}/{node}"
        );
    }
    assert!(
        e.node_state("bad", "h", "n0").await.is_none(),
        "bad is stopped"
    );
    let parked = e.parked();
    assert_eq!(parked[0].0, "bad");
    assert!(parked[0].1.contains("injected"), "{parked:?}");
    e.shutdown().await;

    // The store is readable again: the same stream, rerun, retries `bad` from its last durable
    // checkpoint, and `good`, already complete, applies nothing twice.
    broken.store(false, Relaxed);
    let mut src = Batches::new(&lines, 50);
    let mut e = Engine::open(cfg, store.clone(), &mut src, Box::new(got.clone()))
        .await
        .unwrap();
    e.run(&mut src).await.unwrap();
    for t in ["good", "bad"] {
        let (x, y) = (stored(&store.inner, t).await, stored(&ref_store, t).await);
        assert!(x.len() >= 8, "{t}: {} nodes", x.len());
        assert_eq!(x, y, "tenant {t}");
    }
    let mut a = got.0.lock().unwrap().clone();
    let mut b = want.0.lock().unwrap().clone();
    assert!(!b.is_empty(), "the stream has refused records");
    a.sort();
    b.sort();
    assert_eq!(a, b, "every dead letter once");
    assert!(e.stats.tenant_restarts.load(Relaxed) == 0);
}

/// A tenant's stored nodes: (hierarchy, node) → (parent, state).
async fn stored(
    s: &MemStore,
    tenant: &str,
) -> std::collections::BTreeMap<(String, String), (Option<String>, canopy_actors::node::NodeState)>
{
    s.load_tenant(tenant, Load::Buckets)
        .await
        .unwrap()
        .nodes
        .into_iter()
        .map(|n| {
            let st = canopy_actors::node::NodeState::from_rows(n.header, &n.buckets);
            ((n.hierarchy, n.node), (n.parent, st))
        })
        .collect()
}

/// A tree of 21 nodes (a root, 4 branches, 16 leaves) and events on its leaves, 7 minutes
/// apart: most events open new minute buckets on every level, some new hours and days.
fn spread(len: usize) -> (Vec<String>, Vec<(String, String)>) {
    let mut lines = vec![up("r", None)];
    let mut nodes = vec!["r".to_string()];
    for a in 0..4 {
        lines.push(up(&format!("a{a}"), Some("r")));
        nodes.push(format!("a{a}"));
        for l in 0..4 {
            lines.push(up(&format!("l{a}{l}"), Some(&format!("a{a}"))));
            nodes.push(format!("l{a}{l}"));
        }
    }
    for k in 0..len {
        let ts = 1_795_000_000 + k as i64 * 7 * 60;
        let ts = jiff::Timestamp::from_second(ts).unwrap();
        lines.push(format!(
            r#"{{"type":"event","tenant":"t","event_id":"e{k}","entity":"l{}{}","ts":"{ts}","metrics":{{"x":{}}}}}"#,
            k % 4,
            (k / 4) % 4,
            (k * 37 % 101) as i64 - 50
        ));
    }
    let nodes = nodes.into_iter().map(|n| ("h".to_string(), n)).collect();
    (lines, nodes)
}

/// The bucket deltas a checkpoint carries (rows of every node it writes).
fn bucket_rows(cp: &Checkpoint) -> usize {
    cp.tenants
        .iter()
        .flat_map(|t| &t.put_nodes)
        .map(|n| n.buckets.len() + n.replace.len())
        .sum()
}

/// Runs `lines` in batches of `batch` records and returns the bucket rows of each checkpoint
/// the engine took, and the engine.
async fn run_checkpoints(
    lines: &[String],
    batch: usize,
    cfg: EngineConfig,
) -> (Vec<usize>, Engine) {
    let store = Arc::new(MemStore::default());
    let mut e = Engine::open(
        cfg,
        store.clone(),
        &mut NoSource,
        Box::new(DiscardDeadLetters),
    )
    .await
    .unwrap();
    e.run(&mut Batches::new(lines, batch)).await.unwrap();
    let sizes = store.cps.lock().unwrap().iter().map(bucket_rows).collect();
    (sizes, e)
}

/// `checkpoint_max_buckets` cuts intervals by the bucket deltas the nodes hold (and will, once
/// the coordinators' pending events reach them), whatever the record count and the clock say;
/// and where it cuts changes no number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_budget_bounds_each_interval_and_changes_no_number() {
    let (lines, nodes) = spread(1500);
    let batch = 5;
    let mut cfg = small_rounds();
    // Neither the clock nor the record count takes a checkpoint here: only the end of the
    // stream, or the budget.
    cfg.checkpoint_interval_ms = u64::MAX / 2;
    cfg.checkpoint_every_records = u64::MAX;
    cfg.checkpoint_max_buckets = 0;
    let (whole, mut reference) = run_checkpoints(&lines, batch, cfg.clone()).await;
    assert_eq!(whole.len(), 1, "one checkpoint, at the end: {whole:?}");
    // What one batch alone brings, at most: a checkpoint after every batch.
    let mut each = cfg.clone();
    each.checkpoint_every_records = batch as u64;
    let per_batch = run_checkpoints(&lines, batch, each).await.0;
    let one_batch = *per_batch.iter().max().unwrap();

    let budget = 4 * one_batch as u64;
    cfg.checkpoint_max_buckets = budget;
    let (sizes, mut e) = run_checkpoints(&lines, batch, cfg).await;
    assert!(
        whole[0] >= 4 * budget as usize && sizes.len() >= 4,
        "{} checkpoints over {} bucket rows",
        sizes.len(),
        whole[0]
    );
    // A checkpoint is taken between batches: an interval passes the budget by at most the
    // batch that crossed it (and what the pending events' estimate missed of it).
    let largest = *sizes.iter().max().unwrap();
    assert!(
        largest <= budget as usize + 2 * one_batch,
        "an interval held {largest} bucket rows (budget {budget}, a batch {one_batch}): {sizes:?}"
    );
    let compared = same_states(&mut reference, &mut e, &nodes).await;
    assert!(compared >= 8, "only {compared} live nodes compared");
}
