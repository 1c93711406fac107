//! `canopy run`: consumes the input topic through one engine per assigned partition (a shard,
//! see [`crate::kafka`]) and serves the API for the shards this process owns.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use canopy_actors::engine::{Engine, EngineConfig, EngineError};
use canopy_actors::store::{Store, StoreRead};
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::api::engine::EngineStatus;
use crate::api::Tokens;
use crate::app::{shutdown_on_signals, spawn_api};
use crate::config::Config;
use crate::kafka::dead_letters::{self, KafkaDeadLetters};
use crate::kafka::poller::{
    self, Batch, Control, PollerConfig, PollerHandles, RunContext, Watermarks,
};
use crate::kafka::{client_config, partitions};
use crate::store::{MultiRead, Shards};

struct Shard {
    engine: Engine,
    /// The offset of the first record the store does not cover yet.
    next_offset: i64,
    /// The offset last made durable (and sent for commit).
    durable: i64,
    /// The offset the checkpoint being committed covers.
    committing: Option<i64>,
}

struct Runner {
    brokers: String,
    engine_cfg: EngineConfig,
    topic: String,
    dlq_topic: String,
    dlq_partitions: i32,
    producer: FutureProducer,
    shards: BTreeMap<i32, Shard>,
    /// Opens a partition's store (embedded directory or Scylla keyspace).
    stores: Shards,
    reads: Arc<MultiRead>,
    commits: std_mpsc::Sender<Vec<(i32, i64)>>,
    /// Each shard's restored offset, for the consumer thread to commit where the group is
    /// behind it (`poller::behind_the_stores`).
    restored: std_mpsc::Sender<(i32, i64)>,
    watermarks: Watermarks,
    stop: watch::Receiver<bool>,
    /// Dead-letter scans started at assignment, consumed when the shard opens.
    scans: BTreeMap<i32, dead_letters::Scan>,
    /// The dashboard's engine panel watches each shard's engine while it is open.
    engine_status: Arc<EngineStatus>,
}

/// Failures of a dependency that may come back (broker, store), as opposed to bad state.
fn transient(e: &EngineError) -> bool {
    match e {
        EngineError::Source(s) => s.is_transient(),
        EngineError::Store(s) => s.is_transient(),
        _ => false,
    }
}

fn shard_name(p: i32) -> String {
    format!("partition-{p}")
}

impl Runner {
    /// Opens partition `p`'s store (waiting while its previous owner still holds the file)
    /// and restores its engine.
    async fn open(&mut self, p: i32) -> anyhow::Result<()> {
        if self.shards.contains_key(&p) {
            return Ok(());
        }
        let mut delay = Duration::from_millis(100);
        let store = loop {
            match self.stores.open(p).await {
                Ok(s) => break s,
                Err(e) if !*self.stop.borrow() => {
                    warn!(partition = p, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "partition store not available yet (its previous owner may still hold it, or the store is down)");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e.into()),
            }
        };
        // The dead-letter scan and the store's checkpoint load can fail while the broker or
        // the store is down: retried with backoff, never given up on while running.
        let mut delay = Duration::from_millis(200);
        let mut prefetched = self.scans.remove(&p);
        let (engine, position) = loop {
            let dead = Box::new(KafkaDeadLetters {
                producer: self.producer.clone(),
                brokers: self.brokers.clone(),
                topic: self.dlq_topic.clone(),
                source_topic: self.topic.clone(),
                source_partition: p,
                partitions: self.dlq_partitions,
                last_written: -1,
                pending: Default::default(),
                prefetched: prefetched.take(),
            });
            match Engine::restore(
                self.engine_cfg.clone(),
                store.clone() as Arc<dyn Store>,
                dead,
            )
            .await
            {
                Ok(restored) => break restored,
                Err(e) if transient(&e) && !*self.stop.borrow() => {
                    metrics::counter!("canopy_kafka_errors_total").increment(1);
                    warn!(partition = p, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "restoring partition failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e).with_context(|| format!("restoring partition {p}")),
            }
        };
        let next_offset = match position.as_deref() {
            Some(b) if b.len() == 8 => i64::from_le_bytes(b.try_into().expect("8 bytes")),
            Some([]) | None => 0,
            Some(b) => anyhow::bail!("partition {p}: stored position of {} bytes", b.len()),
        };
        info!(partition = p, next_offset, "partition shard open");
        self.engine_status.attach(&engine.stats);
        let _ = self.restored.send((p, next_offset));
        metrics::gauge!("canopy_partition_owned", "partition" => p.to_string()).set(1.0);
        self.reads
            .insert(shard_name(p), store as Arc<dyn StoreRead>);
        self.shards.insert(
            p,
            Shard {
                engine,
                next_offset,
                durable: next_offset,
                committing: None,
            },
        );
        Ok(())
    }

    async fn process(&mut self, mut b: Batch) -> anyhow::Result<()> {
        self.open(b.partition).await?;
        let shard = self.shards.get_mut(&b.partition).expect("opened");
        // Redelivered records the store already covers.
        b.inputs.retain(|i| i.tag as i64 >= shard.next_offset);
        if b.inputs.is_empty() {
            return Ok(());
        }
        let (n, started) = (b.inputs.len(), std::time::Instant::now());
        shard.engine.process(b.inputs).await?;
        tracing::debug!(
            partition = b.partition,
            records = n,
            process_ms = started.elapsed().as_millis() as u64,
            "batch processed"
        );
        shard.next_offset = b.next_offset;
        shard
            .engine
            .set_position((b.next_offset as u64).to_le_bytes().to_vec());
        if shard.engine.checkpoint_due() {
            self.checkpoint(b.partition, false).await?;
        }
        Ok(())
    }

    /// Starts a checkpoint of partition `p` (and, with `wait`, waits until it is durable).
    /// Its commit runs while later batches are processed; its offset goes to the consumer
    /// for commit once it has landed ([`Runner::settle`] or the next checkpoint).
    async fn checkpoint(&mut self, p: i32, wait: bool) -> anyhow::Result<()> {
        let Some(shard) = self.shards.get_mut(&p) else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        // Waits for the previous commit first: what it covered is durable after this.
        shard.engine.begin_checkpoint().await?;
        // While a tenant of the partition is parked the checkpoint keeps the offset of its
        // first record not yet durable: that is what may be committed.
        let stored = match shard.engine.stored_source() {
            b if b.len() == 8 => i64::from_le_bytes(b.try_into().expect("8 bytes")),
            _ => shard.next_offset,
        };
        let mut durable = shard.committing.replace(stored.min(shard.next_offset));
        if wait {
            shard.engine.await_commit().await?;
            durable = shard.committing.take();
        }
        tracing::debug!(
            partition = p,
            checkpoint_ms = started.elapsed().as_millis() as u64,
            wait,
            "checkpoint"
        );
        self.made_durable(p, durable);
        Ok(())
    }

    /// Hands the offsets of checkpoints that have landed to the consumer, without waiting.
    async fn settle(&mut self) -> anyhow::Result<()> {
        let mut landed = Vec::new();
        for (p, shard) in &mut self.shards {
            if shard.committing.is_some() && shard.engine.commit_finished() {
                shard.engine.await_commit().await?;
                landed.push((*p, shard.committing.take()));
            }
        }
        for (p, o) in landed {
            self.made_durable(p, o);
        }
        Ok(())
    }

    fn made_durable(&mut self, p: i32, offset: Option<i64>) {
        let (Some(o), Some(shard)) = (offset, self.shards.get_mut(&p)) else {
            return;
        };
        if o > shard.durable {
            shard.durable = o;
            let _ = self.commits.send(vec![(p, o)]);
        }
    }

    async fn close(&mut self, p: i32) -> anyhow::Result<Option<(i32, i64)>> {
        self.checkpoint(p, true).await?;
        let Some(mut shard) = self.shards.remove(&p) else {
            return Ok(None);
        };
        shard.engine.shutdown().await;
        self.reads.remove(&shard_name(p));
        metrics::gauge!("canopy_partition_owned", "partition" => p.to_string()).set(0.0);
        // No longer this process's to measure; a value left from its ownership would be read
        // as current if the partition came back.
        metrics::gauge!("canopy_consumer_lag", "partition" => p.to_string()).set(f64::NAN);
        // Offset 0 says nothing (the partition's start) and would only move a group offset
        // back: a shard that never made anything durable leaves the group's offset alone, as
        // a restored shard does (`behind_the_stores`).
        Ok((shard.durable > 0).then_some((p, shard.durable)))
    }

    async fn control(
        &mut self,
        c: Control,
        data: &mut mpsc::Receiver<Batch>,
        draining: bool,
    ) -> anyhow::Result<()> {
        match c {
            Control::Assign { partitions } => {
                for &p in &partitions {
                    let s = dead_letters::scan(
                        &self.brokers,
                        &self.dlq_topic,
                        self.dlq_partitions,
                        &self.topic,
                        p,
                    );
                    self.scans.insert(p, s);
                }
                for p in partitions {
                    self.open(p).await?;
                }
            }
            Control::Revoke { partitions, reply } => {
                // The consumer thread is blocked in its rebalance callback: nothing new
                // arrives, so what is queued is all there is. Process it, then make it durable.
                if !draining {
                    while let Ok(b) = data.try_recv() {
                        self.process(b).await?;
                    }
                }
                let mut offsets = Vec::new();
                for p in partitions {
                    offsets.extend(self.close(p).await?);
                }
                let _ = reply.send(offsets);
            }
        }
        Ok(())
    }

    fn report_lag(&self) {
        let marks = self.watermarks.lock().expect("lock").clone();
        for (p, s) in &self.shards {
            // Unknown (NaN), not 0, until a fetch since the assignment reported the partition's
            // end: a stale 0 would say "caught up" before anything was read.
            let lag = marks
                .get(p)
                .map_or(f64::NAN, |high| (high - s.next_offset).max(0) as f64);
            metrics::gauge!("canopy_consumer_lag", "partition" => p.to_string()).set(lag);
        }
    }
}

pub async fn run(cfg: Config, metrics: Option<PrometheusHandle>) -> anyhow::Result<()> {
    let stop = shutdown_on_signals();
    let k = cfg.kafka.clone();
    let stores = Shards::new(&cfg.store, &cfg.data_dir).await?;
    let input_partitions = partitions(&k.brokers, &k.topic, None).await?;
    let dlq_partitions = partitions(&k.brokers, &k.dlq_topic, Some(input_partitions)).await?;
    let reads = Arc::new(MultiRead::default());
    let ready = Arc::new(AtomicBool::new(false));
    let engine_status = EngineStatus::new(cfg.engine.settings.checkpoint_interval_ms);
    let (addr, api) = spawn_api(
        &cfg.api,
        reads.clone() as Arc<dyn StoreRead>,
        Tokens::parse(&cfg.api.tokens)?,
        metrics,
        ready.clone(),
        engine_status.clone(),
        stop.clone(),
    )
    .await?;
    println!(
        "canopy run: query API and dashboard at http://{addr}/  (topic {}, group {})",
        k.topic, k.group
    );

    let (control_tx, mut control) = mpsc::unbounded_channel();
    let consumer: BaseConsumer<RunContext> = client_config(&k.brokers)
        .set("group.id", &k.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", k.session_timeout_ms.to_string())
        .set("partition.assignment.strategy", "range")
        // End-of-partition events tell the poller that a partition's cached high watermark is
        // this assignment's (lag is unknown before that).
        .set("enable.partition.eof", "true")
        // librdkafka's prefetch per partition is the other half of the memory bound.
        .set("queued.max.messages.kbytes", "16384")
        .create_with_context(RunContext {
            topic: k.topic.clone(),
            control: control_tx,
            epoch: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            revoke_timeout: Duration::from_secs(60),
        })?;
    consumer.subscribe(&[&k.topic])?;
    let (data_tx, mut data) = mpsc::channel(4);
    let (commits_tx, commits_rx) = std_mpsc::channel();
    let (restored_tx, restored_rx) = std_mpsc::channel();
    let poll_stop = Arc::new(AtomicBool::new(false));
    let watermarks = Watermarks::default();
    let handles = PollerHandles {
        data: data_tx,
        commits: commits_rx,
        restored: restored_rx,
        stop: poll_stop.clone(),
        watermarks: watermarks.clone(),
    };
    let pcfg = PollerConfig {
        topic: k.topic.clone(),
        batch_size: cfg.engine.batch_size,
        linger: Duration::from_millis(20),
    };
    let poller = std::thread::Builder::new()
        .name("canopy-kafka-poller".into())
        .spawn(move || poller::poll_loop(consumer, pcfg, handles))?;
    ready.store(true, Ordering::Release);

    let producer: FutureProducer = client_config(&k.brokers)
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "1")
        .set("message.timeout.ms", "30000")
        .create()?;
    let mut r = Runner {
        engine_cfg: cfg.engine(),
        engine_status,
        topic: k.topic.clone(),
        dlq_topic: k.dlq_topic.clone(),
        dlq_partitions,
        producer,
        shards: BTreeMap::new(),
        stores,
        reads,
        commits: commits_tx,
        restored: restored_tx,
        watermarks,
        stop: stop.clone(),
        scans: BTreeMap::new(),
        brokers: k.brokers.clone(),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut stop_rx = stop.clone();
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                biased;
                _ = stop_rx.wait_for(|s| *s) => return Ok(()),
                Some(c) = control.recv() => r.control(c, &mut data, false).await?,
                // Before the data branch: a busy stream must not starve time-based
                // checkpoints and the lag gauge.
                _ = tick.tick() => {
                    let due: Vec<i32> = r.shards.iter().filter(|(_, s)| s.engine.checkpoint_due()).map(|(p, _)| *p).collect();
                    for p in due {
                        r.checkpoint(p, false).await?;
                    }
                    r.settle().await?;
                    r.report_lag();
                }
                Some(b) = data.recv() => r.process(b).await?,
            }
        }
    }
    .await;
    // Shutdown (or an error): make every shard durable, hand the offsets to the consumer
    // thread, and let it leave the group; a revoke during that is answered from the stores.
    let mut finals = Vec::new();
    for p in r.shards.keys().copied().collect::<Vec<_>>() {
        match r.close(p).await {
            Ok(Some(o)) => finals.push(o),
            Ok(None) => {}
            Err(e) => warn!(partition = p, error = %e, "final checkpoint failed"),
        }
    }
    let _ = r.commits.send(finals);
    poll_stop.store(true, Ordering::SeqCst);
    let mut join = tokio::task::spawn_blocking(move || poller.join());
    loop {
        tokio::select! {
            j = &mut join => { let _ = j; break; }
            Some(c) = control.recv() => { let _ = r.control(c, &mut data, true).await; }
        }
    }
    result?;
    api.await??;
    info!("stopped after a final checkpoint; offsets committed");
    println!("canopy run: stopped after a final checkpoint");
    Ok(())
}
