//! The `canopy` command line (docs/SPEC.md section 8). Settings come from one tree
//! ([`canopy::config::Config`]): defaults, `--config FILE`, `CANOPY_*` variables, then flags.

use std::path::PathBuf;
use std::process::ExitCode;

use canopy::cmd::loadgen::LoadgenArgs;
use canopy::cmd::{self, Finished};
use canopy::config::Config;
use clap::{Parser, Subcommand};
use toml::Value;

#[derive(Parser)]
#[command(
    name = "canopy",
    version,
    about = "Real-time multi-level pre-aggregation for multi-tenant hierarchies"
)]
struct Cli {
    /// A TOML configuration file (see `canopy config` for every key and its default).
    #[arg(long, global = true, env = "CANOPY_CONFIG")]
    config: Option<PathBuf>,
    /// The state store: `embedded` (redb in the data directory) or
    /// `scylla://HOST:PORT/KEYSPACE`. [store.uri]
    #[arg(long, global = true)]
    store: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Process an NDJSON file through the actor engine into the embedded store.
    Ingest {
        #[arg(long)]
        input: PathBuf,
        /// [data_dir]
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Dead-letter file (NDJSON: line, reason, message, record).
        #[arg(long)]
        dlq: Option<PathBuf>,
        /// Kill a random node actor after every N records (chaos testing). [engine.chaos_kill_every]
        #[arg(long)]
        chaos_kill_every: Option<u64>,
        /// Checkpoint at least this often, in milliseconds. [engine.checkpoint_interval_ms]
        #[arg(long)]
        checkpoint_interval_ms: Option<u64>,
        /// ... or after this many records. [engine.checkpoint_every_records]
        #[arg(long)]
        checkpoint_every_records: Option<u64>,
        /// ... or once node actors hold this many bucket deltas. [engine.checkpoint_max_buckets]
        #[arg(long)]
        checkpoint_max_buckets: Option<u64>,
        /// Records per batch handed from the reader to the engine. [engine.batch_size]
        #[arg(long)]
        batch_size: Option<u64>,
        /// Event ids are remembered this long behind the watermark. [tenant.dedup_horizon_secs]
        #[arg(long)]
        dedup_horizon_secs: Option<i64>,
        /// No progress output.
        #[arg(long)]
        quiet: bool,
    },
    /// Serve the query API (and dashboard) from an existing store.
    Serve {
        /// [data_dir]
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// [api.listen]
        #[arg(long)]
        listen: Option<String>,
    },
    /// Engine, embedded store, API and dashboard with a generated live workload.
    Demo {
        /// [data_dir]
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// [api.listen]
        #[arg(long)]
        listen: Option<String>,
        /// Records per second of the generated workload. [demo.records_per_sec]
        #[arg(long)]
        rate: Option<u64>,
    },
    /// Consume the input topic (Kafka) through the engine; serve the API.
    Run {
        /// [kafka.brokers]
        #[arg(long)]
        brokers: Option<String>,
        /// [kafka.topic]
        #[arg(long)]
        topic: Option<String>,
        /// [kafka.group]
        #[arg(long)]
        group: Option<String>,
        /// [kafka.dlq_topic]
        #[arg(long)]
        dlq_topic: Option<String>,
        /// [data_dir]
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// [api.listen]
        #[arg(long)]
        listen: Option<String>,
        /// [engine.chaos_kill_every]
        #[arg(long)]
        chaos_kill_every: Option<u64>,
        /// [engine.checkpoint_interval_ms]
        #[arg(long)]
        checkpoint_interval_ms: Option<u64>,
    },
    /// Produce an NDJSON file to a topic, each record keyed by its tenant.
    Produce {
        #[arg(long)]
        input: PathBuf,
        /// [kafka.brokers]
        #[arg(long)]
        brokers: Option<String>,
        /// [kafka.topic]
        #[arg(long)]
        topic: Option<String>,
        /// Records per second (default: as fast as the broker takes them).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Apply the Scylla schema (schemas/cql, idempotent) for store.uri.
    Migrate,
    /// Print the effective configuration (defaults, file, environment and flags merged) as TOML.
    Config,
    /// Print the query API's OpenAPI document.
    Openapi,
    /// Check the invariants of the stored state (subtree = own + children, per bucket too).
    Audit {
        /// [data_dir]
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Write a synthetic multi-tenant workload as NDJSON.
    Loadgen(LoadgenArgs),
    /// Write every stored node as one JSON line, sorted by tenant, hierarchy, node.
    Dump {
        /// [data_dir]
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// Flags that set configuration keys, as (key, value) overrides.
#[derive(Default)]
struct Flags(Vec<(&'static str, Value)>);

impl Flags {
    fn int(&mut self, key: &'static str, v: Option<impl Into<i64>>) {
        if let Some(v) = v {
            self.0.push((key, Value::Integer(v.into())));
        }
    }
    fn uint(&mut self, key: &'static str, v: Option<u64>) {
        self.int(key, v.map(|v| v.min(i64::MAX as u64) as i64));
    }
    fn text(&mut self, key: &'static str, v: Option<String>) {
        if let Some(v) = v {
            self.0.push((key, Value::String(v)));
        }
    }
    fn path(&mut self, key: &'static str, v: Option<PathBuf>) {
        self.text(key, v.map(|p| p.to_string_lossy().into_owned()));
    }
}

impl Cmd {
    fn flags(&self) -> Flags {
        let mut f = Flags::default();
        match self {
            Cmd::Ingest {
                data_dir,
                chaos_kill_every,
                checkpoint_interval_ms,
                checkpoint_every_records,
                checkpoint_max_buckets,
                batch_size,
                dedup_horizon_secs,
                ..
            } => {
                f.path("data_dir", data_dir.clone());
                f.uint("engine.chaos_kill_every", *chaos_kill_every);
                f.uint("engine.checkpoint_interval_ms", *checkpoint_interval_ms);
                f.uint("engine.checkpoint_every_records", *checkpoint_every_records);
                f.uint("engine.checkpoint_max_buckets", *checkpoint_max_buckets);
                f.uint("engine.batch_size", *batch_size);
                f.int("tenant.dedup_horizon_secs", *dedup_horizon_secs);
            }
            Cmd::Serve { data_dir, listen } => {
                f.path("data_dir", data_dir.clone());
                f.text("api.listen", listen.clone());
            }
            Cmd::Demo {
                data_dir,
                listen,
                rate,
            } => {
                f.path("data_dir", data_dir.clone());
                f.text("api.listen", listen.clone());
                f.uint("demo.records_per_sec", *rate);
            }
            Cmd::Audit { data_dir } | Cmd::Dump { data_dir } => {
                f.path("data_dir", data_dir.clone())
            }
            Cmd::Run {
                brokers,
                topic,
                group,
                dlq_topic,
                data_dir,
                listen,
                chaos_kill_every,
                checkpoint_interval_ms,
            } => {
                f.text("kafka.brokers", brokers.clone());
                f.text("kafka.topic", topic.clone());
                f.text("kafka.group", group.clone());
                f.text("kafka.dlq_topic", dlq_topic.clone());
                f.path("data_dir", data_dir.clone());
                f.text("api.listen", listen.clone());
                f.uint("engine.chaos_kill_every", *chaos_kill_every);
                f.uint("engine.checkpoint_interval_ms", *checkpoint_interval_ms);
            }
            Cmd::Produce { brokers, topic, .. } => {
                f.text("kafka.brokers", brokers.clone());
                f.text("kafka.topic", topic.clone());
            }
            Cmd::Loadgen(a) => f.text("kafka.brokers", a.brokers.clone()),
            Cmd::Config | Cmd::Openapi | Cmd::Migrate => {}
        }
        f
    }
}

fn main() -> ExitCode {
    canopy::tune_allocator();
    let cli = Cli::parse();
    let mut flags = cli.cmd.flags();
    flags.text("store.uri", cli.store.clone());
    let cfg = match Config::load(cli.config.as_deref(), std::env::vars(), &flags.0) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("canopy: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    canopy::telemetry::init(&cfg.log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli.cmd, cfg)) {
        Ok(Finished::Closed) => {
            // Everything is durable and the store is closed: what is left is tearing down the
            // runtime, ~100,000 actor tasks and their states one by one, and each thread's heap
            // (~0.8 s on the ingest benchmark), all of which the OS reclaims at once.
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::process::exit(0)
        }
        Ok(Finished::Running) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canopy: error: {e:#}");
            ExitCode::from(canopy::usage::exit_code(&e))
        }
    }
}

async fn run(cmd: Cmd, cfg: Config) -> anyhow::Result<Finished> {
    match cmd {
        Cmd::Ingest {
            input, dlq, quiet, ..
        } => return cmd::ingest::run(&cfg, input, dlq, quiet).await,
        Cmd::Serve { .. } => cmd::serve::run(&cfg).await?,
        Cmd::Demo { .. } => {
            let metrics = canopy::telemetry::install_metrics()?;
            cmd::demo::run(cfg, Some(metrics)).await?;
        }
        Cmd::Run { .. } => {
            let metrics = canopy::telemetry::install_metrics()?;
            cmd::run::run(cfg, Some(metrics)).await?;
        }
        Cmd::Produce { input, rate, .. } => cmd::produce::run(&cfg, input, rate).await?,
        Cmd::Loadgen(args) => cmd::loadgen::run(&cfg, args).await?,
        Cmd::Migrate => cmd::migrate::run(&cfg).await?,
        Cmd::Audit { .. } => cmd::audit::run(&cfg).await?,
        Cmd::Dump { .. } => cmd::dump::run(&cfg).await?,
        Cmd::Config => print!("{}", cfg.to_toml()),
        Cmd::Openapi => println!("{}", canopy::api::openapi_json()),
    }
    Ok(Finished::Running)
}
