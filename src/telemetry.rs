//! Logging (`tracing` to stderr) and metrics (the `metrics` facade with a Prometheus recorder,
//! rendered by the API at `/metrics`).

use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// The `log` section of the configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogOptions {
    /// A `tracing` filter (`RUST_LOG` wins when set).
    pub filter: String,
    /// JSON lines instead of text.
    pub json: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            filter: "info".into(),
            json: false,
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` or else `log.filter`; JSON lines when `log.json`.
pub fn init(log: &LogOptions) {
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
        // A row count, not a duration: the default (seconds) buckets put every checkpoint in
        // `+Inf` (issue 26).
        .set_buckets_for_metric(
            Matcher::Full("canopy_checkpoint_rows".into()),
            &CHECKPOINT_ROWS_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    zero();
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

/// Buckets of `canopy_checkpoint_rows`: powers of ten from one row (the position alone) to
/// ten million.
pub const CHECKPOINT_ROWS_BUCKETS: [f64; 8] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7];

/// Reasons a record is refused (`Refusal::reason`), so that each dead-letter series exists
/// from the start. A reason missing here still counts; it only appears when it first fires.
const DEAD_LETTER_REASONS: [&str; 13] = [
    "malformed",
    "unknown_type",
    "non_integer_metric",
    "unknown_entity",
    "suspended",
    "unknown_parent",
    "cycle",
    "unknown_node",
    "has_children",
    "unknown_timezone",
    "timezone_locked",
    "hierarchy_mode_locked",
    "wrong_key",
];

/// Registers the documented metrics at 0, so that they are on `/metrics` from the start:
/// an alert on `canopy_actor_restarts_total` or a `rate()` over a counter must not wait for
/// its first increment (issue 26). Families labelled by something only a request or a tenant
/// names (`route`, a tenant id) appear with their first sample; `canopy_records_total` starts
/// with the `tenant=""` series, which counts records that did not decode.
fn zero() {
    metrics::counter!("canopy_records_total", "tenant" => "").increment(0);
    for reason in DEAD_LETTER_REASONS {
        metrics::counter!("canopy_dead_letters_total", "reason" => reason).increment(0);
    }
    for kind in ["node", "tenant"] {
        metrics::counter!("canopy_actor_restarts_total", "kind" => kind).increment(0);
    }
    for name in [
        "canopy_duplicates_total",
        "canopy_deltas_sent_total",
        "canopy_events_coalesced_total",
        "canopy_tenants_parked_total",
        "canopy_records_skipped_total",
        "canopy_store_retries_total",
        "canopy_node_activations_total",
        "canopy_node_passivations_total",
        "canopy_node_hydrations_total",
        "canopy_api_connections_refused_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for kind in ["header", "idle"] {
        metrics::counter!("canopy_api_timeouts_total", "kind" => kind).increment(0);
    }
    for code in [
        "bad_request",
        "request_timeout",
        "payload_too_large",
        "uri_too_long",
        "headers_too_large",
    ] {
        metrics::counter!("canopy_api_refused_heads_total", "code" => code).increment(0);
    }
    for name in [
        "canopy_tenants_parked",
        "canopy_node_actors_resident",
        "canopy_api_connections",
    ] {
        metrics::gauge!(name).increment(0.0);
    }
    for name in [
        "canopy_checkpoint_seconds",
        "canopy_checkpoint_rows",
        "canopy_store_commit_seconds",
    ] {
        // Registered without a sample: rendered with zero counts.
        let _ = metrics::histogram!(name);
    }
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
    describe_gauge!(
        "canopy_node_actors_resident",
        "Node actors alive now (the others are passivated)."
    );
    describe_counter!(
        "canopy_node_activations_total",
        "Node actors started again after passivation."
    );
    describe_counter!(
        "canopy_node_passivations_total",
        "Idle node actors stopped (their state is in the store)."
    );
    describe_counter!(
        "canopy_node_hydrations_total",
        "Nodes whose buckets were read back from the store."
    );
    describe_gauge!("canopy_api_connections", "Query API connections open now.");
    describe_counter!(
        "canopy_api_connections_refused_total",
        "Query API connections refused past the cap and the reserve."
    );
    describe_counter!(
        "canopy_api_timeouts_total",
        "Query API connections closed by a timeout, by kind (header, idle)."
    );
    describe_counter!(
        "canopy_api_refused_heads_total",
        "Request heads refused before routing, by error code."
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
