//! Logging (`tracing` to stderr) and metrics (the `metrics` facade with a Prometheus recorder,
//! rendered by the API at `/metrics`).

use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogSection;

/// Logs to stderr, filtered by `RUST_LOG` or else `log.filter`; JSON lines when `log.json`.
pub fn init(log: &LogSection) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if log.json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

/// Installs the process-wide Prometheus recorder. Must run inside a tokio runtime (it spawns
/// the upkeep task that keeps histogram memory bounded).
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])?
        .install_recorder()?;
    describe();
    let h = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            h.run_upkeep();
        }
    });
    Ok(handle)
}

/// Every metric canopy records, with its help text. Labels are bounded: tenant ids, reasons,
/// route templates; never node ids.
fn describe() {
    describe_counter!(
        "canopy_records_total",
        "Input records taken from the source, by tenant."
    );
    describe_counter!("canopy_dead_letters_total", "Refused records, by reason.");
    describe_counter!(
        "canopy_duplicates_total",
        "Events dropped as duplicates of an accepted event id."
    );
    describe_counter!(
        "canopy_deltas_sent_total",
        "Coalesced deltas sent from a node to its parent."
    );
    describe_counter!(
        "canopy_events_coalesced_total",
        "Events folded into coalesced deltas."
    );
    describe_counter!(
        "canopy_actor_restarts_total",
        "Actor restarts, by kind (node, tenant)."
    );
    describe_counter!(
        "canopy_tenants_parked_total",
        "Tenants parked after repeated failures."
    );
    describe_gauge!(
        "canopy_tenants_parked",
        "Tenants parked now: their records are skipped and kept for a retry."
    );
    describe_counter!(
        "canopy_records_skipped_total",
        "Records read again behind a parked tenant and skipped by the tenants that had applied them."
    );
    describe_counter!(
        "canopy_store_retries_total",
        "Store operations retried after a failure."
    );
    describe_histogram!(
        "canopy_checkpoint_seconds",
        Unit::Seconds,
        "Checkpoint duration, snapshot to commit."
    );
    describe_histogram!("canopy_checkpoint_rows", "Rows written by one checkpoint.");
    describe_histogram!(
        "canopy_store_commit_seconds",
        Unit::Seconds,
        "Latency of one store commit."
    );
    describe_gauge!(
        "canopy_consumer_lag",
        "Records of a partition not yet processed (high watermark - next offset); NaN while unknown (before the first fetch since the partition was assigned, and after it was revoked)."
    );
    describe_gauge!(
        "canopy_partition_owned",
        "1 while this process owns the partition's shard."
    );
    describe_counter!(
        "canopy_rebalances_total",
        "Consumer group rebalances, by kind (assign, revoke)."
    );
    describe_counter!(
        "canopy_kafka_errors_total",
        "Kafka client and poll errors (librdkafka retries)."
    );
    describe_counter!(
        "canopy_kafka_pauses_total",
        "Times consumption paused because work in flight hit its bound."
    );
    describe_counter!(
        "canopy_dead_letter_retries_total",
        "Dead-letter produce attempts retried."
    );
    describe_histogram!(
        "canopy_api_request_seconds",
        Unit::Seconds,
        "Query API latency, by route."
    );
    describe_counter!(
        "canopy_api_requests_total",
        "Query API requests, by route and status."
    );
}
