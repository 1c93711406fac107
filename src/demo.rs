//! `canopy demo`: the engine, the embedded store and the API in one process, fed by a live
//! synthetic workload (the `loadgen` stream with wall-clock timestamps, at a steady rate).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy_actors::engine::Engine;
use canopy_actors::record::decode;
use canopy_actors::source::{DiscardDeadLetters, Input, Source, SourceBatch, SourceError};
use canopy_actors::store::{Store, StoreRead};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::mpsc;

use crate::api::engine::EngineStatus;
use crate::api::Tokens;
use crate::app::{shutdown_on_signals, spawn_api, UntilShutdown};
use crate::config::Config;
use crate::loadgen::{generate, LoadgenConfig};

/// The generated stream, cut into batches of about a tenth of a second of records. Its position
/// is the number of records handed out; resuming regenerates and skips that many (the stream
/// is deterministic but for its timestamps, and skipped records are never processed).
pub struct DemoSource {
    cfg: LoadgenConfig,
    per_sec: u64,
    rx: Option<mpsc::Receiver<SourceBatch>>,
}

impl DemoSource {
    pub fn new(cfg: LoadgenConfig, per_sec: u64) -> Self {
        DemoSource {
            cfg,
            per_sec: per_sec.max(1),
            rx: None,
        }
    }
}

/// Collects generated lines into batches and paces them.
struct Pacer {
    tx: mpsc::Sender<SourceBatch>,
    skip: u64,
    next_tag: u64,
    per_sec: u64,
    started: Instant,
    sent: u64,
    batch: Vec<Input>,
    line: Vec<u8>,
}

impl Pacer {
    fn flush(&mut self) -> std::io::Result<()> {
        let due = self.started + Duration::from_secs_f64(self.sent as f64 / self.per_sec as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        self.sent += self.batch.len() as u64;
        let batch = SourceBatch {
            inputs: std::mem::take(&mut self.batch),
            position: self.next_tag.to_le_bytes().to_vec(),
        };
        self.tx
            .blocking_send(batch)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "engine gone"))
    }
}

impl Write for Pacer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            self.next_tag += 1;
            let raw = std::mem::take(&mut self.line);
            if self.next_tag <= self.skip {
                continue;
            }
            self.batch.push(Input {
                tag: self.next_tag,
                origin: None,
                decoded: decode(&raw),
                raw,
            });
            if self.batch.len() as u64 >= (self.per_sec / 10).max(1) {
                self.flush()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl Source for DemoSource {
    async fn resume(&mut self, position: Option<&[u8]>) -> Result<(), SourceError> {
        let skip = match position {
            Some(p) if !p.is_empty() => u64::from_le_bytes(
                p.try_into()
                    .map_err(|_| SourceError::BadPosition("demo position is not 8 bytes".into()))?,
            ),
            _ => 0,
        };
        let (tx, rx) = mpsc::channel(4);
        let cfg = self.cfg.clone();
        let mut pacer = Pacer {
            tx,
            skip,
            next_tag: 0,
            per_sec: self.per_sec,
            started: Instant::now(),
            sent: 0,
            batch: Vec::new(),
            line: Vec::new(),
        };
        std::thread::Builder::new()
            .name("canopy-demo-workload".into())
            .spawn(move || {
                // Ends with BrokenPipe once the engine drops the receiver.
                let _ = generate(&cfg, &mut pacer);
            })
            .map_err(|e| SourceError::Io(e.to_string()))?;
        self.rx = Some(rx);
        Ok(())
    }

    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError> {
        let rx = self
            .rx
            .as_mut()
            .ok_or_else(|| SourceError::Io("demo source not resumed".into()))?;
        Ok(rx.recv().await)
    }
}

pub fn workload(cfg: &Config) -> LoadgenConfig {
    let d = &cfg.demo;
    LoadgenConfig {
        seed: d.seed,
        tenants: d.tenants,
        hierarchies: d.hierarchies,
        depth: d.depth,
        fanout: d.fanout,
        events: usize::MAX,
        churn: d.churn,
        bad: d.bad,
        live: true,
        // The demo runs for minutes or days and must look the same throughout.
        steady: true,
        ..Default::default()
    }
}

pub async fn run(cfg: Config, metrics: Option<PrometheusHandle>) -> anyhow::Result<()> {
    let stop = shutdown_on_signals();
    let store = crate::store::open_single(&cfg).await?;
    let token_spec = if cfg.api.tokens.trim().is_empty() {
        "demo=*".to_string()
    } else {
        cfg.api.tokens.clone()
    };
    let tokens = Tokens::parse(&token_spec)?;
    let ready = Arc::new(AtomicBool::new(false));
    let engine_status = EngineStatus::new(cfg.engine.checkpoint_interval_ms);
    let (addr, api) = spawn_api(
        &cfg.api,
        store.clone() as Arc<dyn StoreRead>,
        tokens,
        metrics,
        ready.clone(),
        engine_status.clone(),
        stop.clone(),
    )
    .await?;
    let all_tenants = token_spec
        .split(',')
        .find_map(|e| e.trim().strip_suffix("=*"));
    let shown_token = all_tenants.unwrap_or("(see api.tokens)").to_string();
    // The page takes the token from the link once, then keeps it out of the URL.
    let query = all_tenants
        .map(|t| format!("?token={}", crate::api::query_escape(t)))
        .unwrap_or_default();
    println!("canopy demo: dashboard at http://{addr}/{query}  (API token: {shown_token})");
    println!(
        "canopy demo: try  curl -H 'Authorization: Bearer {shown_token}' http://{addr}/v1/tenants"
    );
    let mut source = DemoSource::new(workload(&cfg), cfg.demo.records_per_sec);
    let mut engine = Engine::open(
        cfg.engine(),
        store.clone() as Arc<dyn Store>,
        &mut source,
        Box::new(DiscardDeadLetters),
    )
    .await?;
    ready.store(true, Ordering::Release);
    engine_status.attach(&engine.stats);
    let stats = engine.stats.clone();
    let done = Arc::new(AtomicBool::new(false));
    let status = {
        let (store, done) = (store.clone(), done.clone());
        tokio::spawn(async move {
            let last = AtomicU64::new(0);
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                let recs = stats.records.load(Ordering::Relaxed);
                let rate = (recs - last.swap(recs, Ordering::Relaxed)) / 5;
                let (tenants, nodes, as_of) = census(store.as_ref()).await.unwrap_or_default();
                println!(
                    "canopy demo: {recs} records ({rate}/s), {tenants} tenants, {nodes} nodes, {} dead letters, checkpoint {as_of}",
                    stats.refused.load(Ordering::Relaxed)
                );
            }
        })
    };
    let r = engine
        .run(&mut UntilShutdown {
            inner: &mut source,
            stop: stop.clone(),
        })
        .await;
    engine.shutdown().await;
    done.store(true, Ordering::Relaxed);
    status.abort();
    r?;
    api.await??;
    println!("canopy demo: stopped after a final checkpoint");
    Ok(())
}

/// Tenants, nodes and the checkpoint the numbers come from, for the status line.
async fn census(
    store: &dyn StoreRead,
) -> Result<(usize, u64, u64), canopy_actors::store::StoreError> {
    let t = store.tenant_ids().await?;
    let mut nodes = 0;
    for id in &t.value {
        if let Some(hs) = store.hierarchies(id).await?.value {
            nodes += hs.iter().map(|h| h.nodes).sum::<u64>();
        }
    }
    Ok((t.value.len(), nodes, t.as_of))
}
