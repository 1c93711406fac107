//! The `canopy` command line (docs/SPEC.md section 8). Settings come from one tree
//! ([`canopy::config::Config`]): defaults, `--config FILE`, `CANOPY_*` variables, then flags.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use canopy::api::Tokens;
use canopy::app::{shutdown_on_signals, spawn_api};
use canopy::config::Config;
use canopy::ingest::{ingest, IngestOptions};
use canopy_actors::store::StoreRead;
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
    Loadgen {
        /// Write to this file...
        #[arg(long, required_unless_present = "topic")]
        out: Option<PathBuf>,
        /// ... or produce to this topic (keyed by tenant) on `--brokers`.
        #[arg(long)]
        topic: Option<String>,
        /// [kafka.brokers]
        #[arg(long)]
        brokers: Option<String>,
        /// Records per second when producing (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
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
        /// Event time between consecutive events, in milliseconds (default: the events spread
        /// over 2 hours). `--spacing-ms 150` with 2,000,000 events covers ~83 hours.
        #[arg(long)]
        spacing_ms: Option<u64>,
        /// Share of events that arrive late, up to `--late-max-secs` behind the stream.
        #[arg(long, default_value_t = 0.0)]
        late: f64,
        #[arg(long, default_value_t = 0)]
        late_max_secs: i64,
        /// Share of the leaves that get events (default: every node may).
        #[arg(long, default_value_t = 1.0)]
        active: f64,
    },
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
                batch_size,
                dedup_horizon_secs,
                ..
            } => {
                f.path("data_dir", data_dir.clone());
                f.uint("engine.chaos_kill_every", *chaos_kill_every);
                f.uint("engine.checkpoint_interval_ms", *checkpoint_interval_ms);
                f.uint("engine.checkpoint_every_records", *checkpoint_every_records);
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
            Cmd::Loadgen { brokers, .. } => f.text("kafka.brokers", brokers.clone()),
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

/// `dump`, `audit` and `serve` read a store that must exist (the embedded one: Scylla says
/// itself when its keyspace has no tables).
fn require_store(cfg: &Config) -> anyhow::Result<()> {
    if cfg.store.uri == "embedded" {
        canopy::usage::require_store(&cfg.data_dir)?;
    }
    Ok(())
}

/// How a command ended, when it succeeded.
enum Finished {
    /// The runtime may still hold tasks and stores: tear everything down in order.
    Running,
    /// Everything is durable and every store is closed: the process may simply exit.
    Closed,
}

async fn run(cmd: Cmd, cfg: Config) -> anyhow::Result<Finished> {
    match cmd {
        Cmd::Ingest {
            input, dlq, quiet, ..
        } => {
            // Before the store: a mistyped input must not leave an empty data directory behind.
            canopy::usage::require_input(&input)?;
            let store = canopy::store::open_single(&cfg).await?;
            let opts = IngestOptions {
                input,
                dlq,
                batch_size: cfg.engine.batch_size,
                engine: cfg.engine(),
                progress: !quiet,
            };
            ingest(
                opts,
                store.clone() as Arc<dyn canopy_actors::store::Store>,
                shutdown_on_signals(),
            )
            .await?;
            // The stopped actors let go of the store within milliseconds; waiting for that
            // beats waiting for the runtime to drop them all.
            let closed = canopy::store::close(store, Duration::from_secs(5)).await;
            Ok(if closed {
                Finished::Closed
            } else {
                Finished::Running
            })
        }
        Cmd::Serve { .. } => {
            require_store(&cfg)?;
            let multi = canopy::store::MultiRead::default();
            for (name, s) in canopy::store::open_configured(&cfg).await? {
                multi.insert(name, s as Arc<dyn StoreRead>);
            }
            let store = Arc::new(multi);
            let tokens = Tokens::parse(&cfg.api.tokens)?;
            if tokens.is_empty() {
                tracing::warn!("no API tokens configured (api.tokens / CANOPY_API_TOKENS): every /v1 request will get 401");
            }
            let metrics = canopy::telemetry::install_metrics()?;
            let stop = shutdown_on_signals();
            let (addr, api) = spawn_api(
                &cfg.api,
                store as Arc<dyn StoreRead>,
                tokens,
                Some(metrics),
                Arc::new(AtomicBool::new(true)),
                // No engine here: the store is written by another process.
                canopy::api::engine::EngineStatus::new(cfg.engine.checkpoint_interval_ms),
                stop,
            )
            .await?;
            println!("canopy serve: query API and dashboard at http://{addr}/");
            api.await??;
            Ok(Finished::Running)
        }
        Cmd::Demo { .. } => {
            let metrics = canopy::telemetry::install_metrics()?;
            canopy::demo::run(cfg, Some(metrics)).await?;
            Ok(Finished::Running)
        }
        Cmd::Migrate => {
            if cfg.store.uri == "embedded" {
                println!(
                    "canopy migrate: the embedded store creates its tables itself; nothing to do"
                );
                return Ok(Finished::Running);
            }
            use canopy::store::scylla::{parse_uri, session, shard_keyspaces, ScyllaStore};
            let opts = canopy::store::scylla_options(&cfg);
            let (hosts, base) = parse_uri(&cfg.store.uri)?;
            let session = session(&hosts, &opts).await?;
            // The keyspace of `store.uri`, and the per-partition keyspaces `canopy run` made
            // (it creates new ones itself on first use).
            let mut keyspaces = vec![base.clone()];
            keyspaces.extend(
                shard_keyspaces(&session, &base)
                    .await?
                    .into_iter()
                    .map(|(_, k)| k),
            );
            for ks in keyspaces {
                let mut s = ScyllaStore::on_session(session.clone(), ks.clone(), &opts).await?;
                s.migrate().await?;
                println!("canopy migrate: schema applied to keyspace {ks}");
            }
            Ok(Finished::Running)
        }
        Cmd::Config => {
            print!("{}", cfg.to_toml());
            Ok(Finished::Running)
        }
        Cmd::Openapi => {
            println!("{}", canopy::api::openapi_json());
            Ok(Finished::Running)
        }
        Cmd::Run { .. } => {
            let metrics = canopy::telemetry::install_metrics()?;
            canopy::kafka::run(cfg, Some(metrics)).await?;
            Ok(Finished::Running)
        }
        Cmd::Produce { input, rate, .. } => {
            let (brokers, topic) = (cfg.kafka.brokers.clone(), cfg.kafka.topic.clone());
            let n = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                let mut w = canopy::kafka::produce::TopicWriter::new(&brokers, &topic, rate)?;
                let mut f = std::io::BufReader::new(std::fs::File::open(&input)?);
                std::io::copy(&mut f, &mut w)?;
                Ok(w.finish()?)
            })
            .await??;
            eprintln!("canopy: produced {n} records to {}", cfg.kafka.topic);
            Ok(Finished::Running)
        }
        Cmd::Loadgen {
            out,
            topic,
            rate,
            brokers: _,
            seed,
            tenants,
            hierarchies,
            depth,
            fanout,
            events,
            churn,
            bad,
            spacing_ms,
            late,
            late_max_secs,
            active,
        } => {
            let mut lg = canopy::loadgen::LoadgenConfig {
                seed,
                tenants,
                hierarchies,
                depth,
                fanout,
                events,
                churn,
                bad,
                late,
                late_max_secs,
                active,
                ..Default::default()
            };
            if let Some(ms) = spacing_ms {
                lg.span_secs = (events as u64 * ms / 1000) as i64;
            }
            if let Some(topic) = topic {
                let brokers = cfg.kafka.brokers.clone();
                let n = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                    let mut w = canopy::kafka::produce::TopicWriter::new(&brokers, &topic, rate)?;
                    canopy::loadgen::generate(&lg, &mut w)?;
                    Ok(w.finish()?)
                })
                .await??;
                eprintln!("canopy: produced {n} records");
                return Ok(Finished::Running);
            }
            let out = out.expect("clap requires --out without --topic");
            let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&out)?);
            let n = canopy::loadgen::generate(&lg, &mut w)?;
            std::io::Write::flush(&mut w)?;
            eprintln!("canopy: wrote {n} records to {}", out.display());
            Ok(Finished::Running)
        }
        Cmd::Audit { .. } => {
            require_store(&cfg)?;
            let (mut nodes, mut violations) = (0, 0);
            for (_, store) in canopy::store::open_configured(&cfg).await? {
                let rep = canopy::audit::audit(store.as_ref()).await?;
                for v in &rep.violations {
                    println!("violation: {v}");
                }
                nodes += rep.nodes;
                violations += rep.violations.len();
            }
            println!("audit: {nodes} nodes checked, {violations} violations");
            if violations > 0 {
                anyhow::bail!("{violations} invariant violations");
            }
            Ok(Finished::Running)
        }
        Cmd::Dump { .. } => {
            require_store(&cfg)?;
            let stores = canopy::store::open_configured(&cfg).await?;
            let refs: Vec<&dyn canopy_actors::store::Store> =
                stores.iter().map(|(_, s)| s.as_ref() as _).collect();
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
            let retention = cfg.engine().tenant.retention;
            match canopy::dump::dump(&refs, retention, &mut out).await {
                // `canopy dump | head`: the reader closing the pipe is not a failure.
                Err(canopy::dump::DumpError::Io(e))
                    if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                r => {
                    r?;
                }
            }
            Ok(Finished::Running)
        }
    }
}
