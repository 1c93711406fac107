//! `canopy produce`: an NDJSON file to a topic, each record keyed by its tenant.

use std::path::PathBuf;

use crate::config::Config;
use crate::kafka::produce::TopicWriter;

pub async fn run(cfg: &Config, input: PathBuf, rate: Option<f64>) -> anyhow::Result<()> {
    let (brokers, topic) = (cfg.kafka.brokers.clone(), cfg.kafka.topic.clone());
    let n = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut w = TopicWriter::new(&brokers, &topic, rate)?;
        let mut f = std::io::BufReader::new(std::fs::File::open(&input)?);
        std::io::copy(&mut f, &mut w)?;
        Ok(w.finish()?)
    })
    .await??;
    eprintln!("canopy: produced {n} records to {}", cfg.kafka.topic);
    Ok(())
}
