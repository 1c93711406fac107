//! The Kafka adapters of `canopy run` (the command itself is [`crate::cmd::run`]): the input
//! topic through the engine, one shard per assigned partition.
//!
//! - [`poller`]: the consumer thread (batches, pause/resume backpressure, rebalance hooks).
//! - [`dead_letters`]: the dead-letter topic writer (exactly once per source offset).
//! - [`produce`]: NDJSON lines to a topic, keyed by tenant.
//!
//! A **shard** is one partition's engine with its own store: the embedded store in
//! `DATA_DIR/partition-N/`, or the Scylla keyspace `{keyspace}_pN`. Records are keyed by tenant, so a tenant lives in one partition and
//! one shard. The store, not Kafka, holds the truth about progress: each checkpoint stores the
//! partition's next offset with the state it covers. Committed consumer offsets follow the
//! checkpoints (never auto-commit) and can only lag them, so records the store already covers
//! may be delivered again (after a crash or a rebalance); the shard skips every record below
//! its stored offset. That is what makes redeliveries, restarts and rebalances exact.

pub mod dead_letters;
pub mod poller;
pub mod produce;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tracing::info;

/// The `kafka` section of the configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaOptions {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    /// Dead letters go here (created, with the input's partition count, when missing).
    pub dlq_topic: String,
    /// A member silent this long leaves the group and its partitions move.
    pub session_timeout_ms: u64,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions {
            brokers: "127.0.0.1:9092".into(),
            topic: "canopy-input".into(),
            group: "canopy".into(),
            dlq_topic: "canopy-dead-letters".into(),
            session_timeout_ms: 45_000,
        }
    }
}

/// A client of `brokers`, to which each use adds its own settings.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

/// The partition count of `topic`, creating it with `create_with` partitions when asked and
/// missing.
pub async fn partitions(
    brokers: &str,
    topic: &str,
    create_with: Option<i32>,
) -> anyhow::Result<i32> {
    let probe: BaseConsumer = client_config(brokers).create()?;
    let t = topic.to_string();
    let count = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
        let md = probe.fetch_metadata(Some(&t), Duration::from_secs(10))?;
        Ok(md
            .topics()
            .first()
            .map(|x| x.partitions().len())
            .unwrap_or(0))
    })
    .await??;
    if count > 0 {
        return Ok(count as i32);
    }
    let Some(n) = create_with else {
        anyhow::bail!("topic {topic:?} does not exist on {brokers}");
    };
    let admin: AdminClient<DefaultClientContext> = client_config(brokers).create()?;
    let r = admin
        .create_topics(
            &[NewTopic::new(topic, n, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    for x in r {
        if let Err((t, e)) = x {
            if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                anyhow::bail!("creating dead-letter topic {t}: {e}");
            }
        }
    }
    info!(topic, partitions = n, "created the dead-letter topic");
    Ok(n)
}
