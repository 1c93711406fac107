//! `canopy ingest`: an NDJSON file through the actor engine into the store.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy_actors::engine::{Engine, EngineConfig, EngineError};
use canopy_actors::source::DeadLetters;
use canopy_actors::stats::Stats;
use canopy_actors::store::Store;
use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

use crate::app::{run_until_shutdown, shutdown_on_signals};
use crate::config::Config;
use crate::file_source::{FileDeadLetters, FileSource, NoDeadLetterFile};
use crate::store::{close, open_single};

use super::Finished;

/// The command: `input` into the configured store, resuming from its last checkpoint.
pub async fn run(
    cfg: &Config,
    input: PathBuf,
    dlq: Option<PathBuf>,
    quiet: bool,
) -> anyhow::Result<Finished> {
    // Before the store: a mistyped input must not leave an empty data directory behind.
    crate::usage::require_input(&input)?;
    let store = open_single(&cfg.store, &cfg.data_dir).await?;
    let opts = IngestOptions {
        input,
        dlq,
        batch_size: cfg.engine.batch_size,
        engine: cfg.engine(),
        progress: !quiet,
    };
    ingest(opts, store.clone() as Arc<dyn Store>, shutdown_on_signals()).await?;
    // The stopped actors let go of the store within milliseconds; waiting for that beats
    // waiting for the runtime to drop them all.
    let closed = close(store, Duration::from_secs(5)).await;
    Ok(if closed {
        Finished::Closed
    } else {
        Finished::Running
    })
}

#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub input: PathBuf,
    pub dlq: Option<PathBuf>,
    pub batch_size: usize,
    pub engine: EngineConfig,
    pub progress: bool,
}

/// What an ingest did, for the summary line and benchmarks.
#[derive(Debug, Clone, Copy)]
pub struct IngestReport {
    pub records: u64,
    pub accepted: u64,
    pub refused: u64,
    pub duplicates: u64,
    pub checkpoints: u64,
    pub store_commits: u64,
    pub store_rows: u64,
    /// Bytes the store wrote (keys and values).
    pub store_bytes: u64,
    pub tenant_restarts: u64,
    pub node_restarts: u64,
    pub chaos_kills: u64,
    /// Node actors activated (spawned again after a passivation or at a resume) and passivated.
    pub activations: u64,
    pub passivations: u64,
    /// Processing stopped for snapshots (rounds included).
    pub snapshot: Duration,
    /// Background commits, and the part of them the engine waited for.
    pub commit: Duration,
    pub commit_wait: Duration,
    pub elapsed: Duration,
}

impl IngestReport {
    fn from(s: &Stats, elapsed: Duration) -> Self {
        IngestReport {
            records: s.records.load(Ordering::Relaxed),
            accepted: s.accepted.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            duplicates: s.duplicates.load(Ordering::Relaxed),
            checkpoints: s.checkpoints.load(Ordering::Relaxed),
            store_commits: s.store_commits.load(Ordering::Relaxed),
            store_rows: s.store_rows.load(Ordering::Relaxed),
            store_bytes: s.store_bytes.load(Ordering::Relaxed),
            tenant_restarts: s.tenant_restarts.load(Ordering::Relaxed),
            node_restarts: s.node_restarts.load(Ordering::Relaxed),
            chaos_kills: s.chaos_kills.load(Ordering::Relaxed),
            activations: s.activations.load(Ordering::Relaxed),
            passivations: s.passivations.load(Ordering::Relaxed),
            snapshot: Duration::from_micros(s.snapshot_micros.load(Ordering::Relaxed)),
            commit: Duration::from_micros(s.commit_micros.load(Ordering::Relaxed)),
            commit_wait: Duration::from_micros(s.commit_wait_micros.load(Ordering::Relaxed)),
            elapsed,
        }
    }
}

pub async fn ingest(
    opts: IngestOptions,
    store: Arc<dyn Store>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<IngestReport, EngineError> {
    ingest_observed(opts, store, stop, |_| {}).await
}

/// [`ingest`], handing the engine's counters to `observe` once the engine is open (a benchmark
/// samples them while the run goes on).
pub async fn ingest_observed(
    opts: IngestOptions,
    store: Arc<dyn Store>,
    stop: tokio::sync::watch::Receiver<bool>,
    observe: impl FnOnce(&Arc<Stats>),
) -> Result<IngestReport, EngineError> {
    let started = Instant::now();
    let mut source = FileSource::new(opts.input.clone(), opts.batch_size);
    let dead: Box<dyn DeadLetters> = match &opts.dlq {
        Some(p) => Box::new(FileDeadLetters::new(p.clone())),
        None => Box::new(NoDeadLetterFile),
    };
    let mut engine = Engine::open(opts.engine.clone(), store, &mut source, dead).await?;
    let stats = engine.stats.clone();
    observe(&stats);
    let ticker = opts.progress.then(|| {
        let total = std::fs::metadata(&opts.input).map(|m| m.len()).unwrap_or(0);
        spawn_progress(stats.clone(), source.bytes_read.clone(), total)
    });
    // On SIGTERM/SIGINT the source ends early: the engine takes its final checkpoint and the
    // next run resumes from it.
    let r = run_until_shutdown(&mut engine, &mut source, &stop).await;
    if let Some((handle, stop)) = ticker {
        stop.store(true, Ordering::Relaxed);
        let _ = handle.await;
    }
    r?;
    let rep = IngestReport::from(&stats, started.elapsed());
    if *stop.borrow() {
        info!(
            records = rep.records,
            "stopped by a signal after a final checkpoint; the same command resumes from it"
        );
        return Ok(rep);
    }
    info!(
        records = rep.records,
        accepted = rep.accepted,
        refused = rep.refused,
        duplicates = rep.duplicates,
        checkpoints = rep.checkpoints,
        store_rows = rep.store_rows,
        store_bytes = rep.store_bytes,
        chaos_kills = rep.chaos_kills,
        node_restarts = rep.node_restarts,
        tenant_restarts = rep.tenant_restarts,
        snapshot_ms = rep.snapshot.as_millis() as u64,
        commit_ms = rep.commit.as_millis() as u64,
        commit_wait_ms = rep.commit_wait.as_millis() as u64,
        elapsed_ms = rep.elapsed.as_millis() as u64,
        "ingest complete; everything is durable"
    );
    Ok(rep)
}

/// A progress bar on a terminal, a progress line every few seconds otherwise.
fn spawn_progress(
    stats: Arc<Stats>,
    bytes: Arc<std::sync::atomic::AtomicU64>,
    total: u64,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let tty = std::io::stderr().is_terminal();
    let h = tokio::spawn(async move {
        let bar = tty.then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({elapsed})")
                    .expect("valid template"),
            );
            b
        });
        let started = Instant::now();
        let mut last_line = Instant::now();
        while !s2.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let recs = stats.records.load(Ordering::Relaxed);
            let rate = recs as f64 / started.elapsed().as_secs_f64().max(1e-3);
            let refused = stats.refused.load(Ordering::Relaxed);
            match &bar {
                Some(b) => {
                    b.set_position(bytes.load(Ordering::Relaxed));
                    b.set_message(format!(
                        "{recs} records, {rate:.0}/s, {refused} dead letters"
                    ));
                }
                None if last_line.elapsed() >= Duration::from_secs(5) => {
                    last_line = Instant::now();
                    info!(
                        records = recs,
                        per_sec = rate as u64,
                        dead_letters = refused,
                        bytes = bytes.load(Ordering::Relaxed),
                        total_bytes = total,
                        "ingest progress"
                    );
                }
                None => {}
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    });
    (h, stop)
}
