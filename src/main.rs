//! The `canopy` command line (SPEC.md section 4).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use canopy::ingest::{ingest, IngestOptions};
use canopy::store::EmbeddedStore;
use canopy_actors::engine::EngineConfig;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "canopy",
    version,
    about = "Real-time multi-level pre-aggregation for multi-tenant hierarchies"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Process an NDJSON file through the actor engine into the embedded store in DIR.
    Ingest {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        /// Dead-letter file (NDJSON: line, reason, message, record).
        #[arg(long)]
        dlq: Option<PathBuf>,
        /// Kill a random node actor after every N records (chaos testing).
        #[arg(long, default_value_t = 0)]
        chaos_kill_every: u64,
        /// Checkpoint at least this often, in milliseconds.
        #[arg(long, env = "CANOPY_CHECKPOINT_INTERVAL_MS", default_value_t = 1000)]
        checkpoint_interval_ms: u64,
        /// ... or after this many records.
        #[arg(
            long,
            env = "CANOPY_CHECKPOINT_EVERY_RECORDS",
            default_value_t = 1_000_000
        )]
        checkpoint_every_records: u64,
        /// Records per batch handed from the reader to the engine.
        #[arg(long, env = "CANOPY_BATCH_SIZE", default_value_t = 4096)]
        batch_size: usize,
        /// Event ids are remembered at least this long behind the watermark (seconds).
        #[arg(long, env = "CANOPY_DEDUP_HORIZON_SECS", default_value_t = 3600)]
        dedup_horizon_secs: i64,
        /// No progress output.
        #[arg(long)]
        quiet: bool,
    },
    /// Check the invariants of the stored state (subtree = own + children, per bucket too).
    Audit {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Write a synthetic multi-tenant workload as NDJSON.
    Loadgen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 5)]
        tenants: usize,
        #[arg(long, default_value_t = 1)]
        hierarchies: usize,
        #[arg(long, default_value_t = 7)]
        depth: usize,
        #[arg(long, default_value_t = 5)]
        fanout: usize,
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Share of records that move, delete or re-create nodes.
        #[arg(long, default_value_t = 0.0005)]
        churn: f64,
        /// Share of records that are refused.
        #[arg(long, default_value_t = 0.001)]
        bad: f64,
    },
    /// Write every stored node as one JSON line, sorted by tenant, hierarchy, node.
    Dump {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    canopy::telemetry::init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canopy: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Ingest {
            input,
            data_dir,
            dlq,
            chaos_kill_every,
            checkpoint_interval_ms,
            checkpoint_every_records,
            batch_size,
            dedup_horizon_secs,
            quiet,
        } => {
            let store = Arc::new(EmbeddedStore::open(&data_dir)?);
            let mut engine = EngineConfig {
                chaos_kill_every,
                checkpoint_interval_ms,
                checkpoint_every_records,
                ..Default::default()
            };
            engine.tenant.dedup_horizon_secs = dedup_horizon_secs;
            let opts = IngestOptions {
                input,
                dlq,
                batch_size,
                engine,
                progress: !quiet,
            };
            ingest(opts, store).await?;
            Ok(())
        }
        Cmd::Loadgen {
            out,
            seed,
            tenants,
            hierarchies,
            depth,
            fanout,
            events,
            churn,
            bad,
        } => {
            let cfg = canopy::loadgen::LoadgenConfig {
                seed,
                tenants,
                hierarchies,
                depth,
                fanout,
                events,
                churn,
                bad,
                ..Default::default()
            };
            let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&out)?);
            let n = canopy::loadgen::generate(&cfg, &mut w)?;
            std::io::Write::flush(&mut w)?;
            eprintln!("canopy: wrote {n} records to {}", out.display());
            Ok(())
        }
        Cmd::Audit { data_dir } => {
            let store = EmbeddedStore::open(&data_dir)?;
            let rep = canopy::audit::audit(&store).await?;
            for v in &rep.violations {
                println!("violation: {v}");
            }
            println!(
                "audit: {} nodes checked, {} violations",
                rep.nodes,
                rep.violations.len()
            );
            if !rep.violations.is_empty() {
                anyhow::bail!("{} invariant violations", rep.violations.len());
            }
            Ok(())
        }
        Cmd::Dump { data_dir } => {
            let store = EmbeddedStore::open(&data_dir)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
            match canopy::dump::dump(&store, &mut out).await {
                // `canopy dump | head`: the reader closing the pipe is not a failure.
                Err(canopy::dump::DumpError::Io(e))
                    if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                r => {
                    r?;
                }
            }
            Ok(())
        }
    }
}
