//! `canopy loadgen`: a synthetic multi-tenant workload ([`crate::loadgen`]) to a file or a topic.

use std::path::PathBuf;

use crate::config::Config;
use crate::kafka::produce::TopicWriter;
use crate::loadgen::{generate, LoadgenConfig};

#[derive(clap::Args)]
pub struct LoadgenArgs {
    /// Write to this file...
    #[arg(long, required_unless_present = "topic")]
    pub out: Option<PathBuf>,
    /// ... or produce to this topic (keyed by tenant) on `--brokers`.
    #[arg(long)]
    pub topic: Option<String>,
    /// [kafka.brokers]
    #[arg(long)]
    pub brokers: Option<String>,
    /// Records per second when producing (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 5)]
    pub tenants: usize,
    #[arg(long, default_value_t = 1)]
    pub hierarchies: usize,
    #[arg(long, default_value_t = 7)]
    pub depth: usize,
    #[arg(long, default_value_t = 5)]
    pub fanout: usize,
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Share of records that move, delete or re-create nodes.
    #[arg(long, default_value_t = 0.0005)]
    pub churn: f64,
    /// Share of records that are refused.
    #[arg(long, default_value_t = 0.001)]
    pub bad: f64,
    /// Event time between consecutive events, in milliseconds (default: the events spread
    /// over 2 hours). `--spacing-ms 150` with 2,000,000 events covers ~83 hours.
    #[arg(long)]
    pub spacing_ms: Option<u64>,
    /// Share of events that arrive late, up to `--late-max-secs` behind the stream.
    #[arg(long, default_value_t = 0.0)]
    pub late: f64,
    #[arg(long, default_value_t = 0)]
    pub late_max_secs: i64,
    /// Share of the leaves that get events (default: every node may).
    #[arg(long, default_value_t = 1.0)]
    pub active: f64,
}

pub async fn run(cfg: &Config, a: LoadgenArgs) -> anyhow::Result<()> {
    let mut lg = LoadgenConfig {
        seed: a.seed,
        tenants: a.tenants,
        hierarchies: a.hierarchies,
        depth: a.depth,
        fanout: a.fanout,
        events: a.events,
        churn: a.churn,
        bad: a.bad,
        late: a.late,
        late_max_secs: a.late_max_secs,
        active: a.active,
        ..Default::default()
    };
    if let Some(ms) = a.spacing_ms {
        lg.span_secs = (a.events as u64 * ms / 1000) as i64;
    }
    if let Some(topic) = a.topic {
        let (brokers, rate) = (cfg.kafka.brokers.clone(), a.rate);
        let n = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let mut w = TopicWriter::new(&brokers, &topic, rate)?;
            generate(&lg, &mut w)?;
            Ok(w.finish()?)
        })
        .await??;
        eprintln!("canopy: produced {n} records");
        return Ok(());
    }
    let out = a.out.expect("clap requires --out without --topic");
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&out)?);
    let n = generate(&lg, &mut w)?;
    std::io::Write::flush(&mut w)?;
    eprintln!("canopy: wrote {n} records to {}", out.display());
    Ok(())
}
