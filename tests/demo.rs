//! `canopy demo` end to end: it serves numbers within the time limit, `/metrics` is valid
//! Prometheus text with canopy's metrics, and SIGTERM ends it with a final checkpoint.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::http::{enc, Served};
use support::*;

/// Checks the Prometheus text exposition format line by line; returns the metric family names.
fn parse_prometheus(text: &str) -> BTreeSet<String> {
    let mut families = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            assert!(kind == "HELP" || kind == "TYPE", "line {i}: {line}");
            let name = parts.next().expect("metric name");
            if kind == "TYPE" {
                let t = parts.next().expect("type");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                    "line {i}: {line}"
                );
                families.insert(name.to_string());
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("line {i}: {line}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "line {i}: bad value in {line}"
        );
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "line {i}: bad metric name in {line}"
        );
        if name_end < series.len() {
            assert!(
                series.ends_with('}'),
                "line {i}: unterminated labels in {line}"
            );
            let labels = &series[name_end + 1..series.len() - 1];
            for pair in split_labels(labels) {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("line {i}: {pair}"));
                assert!(
                    !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                    "line {i}: {pair}"
                );
            }
        }
    }
    families
}

fn split_labels(s: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut esc) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if esc => esc = false,
            '\\' => esc = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

#[test]
fn demo_serves_numbers_metrics_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut cmd = canopy();
    cmd.args(["demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        // Kills node actors now and then, so that restarts show in the metrics too.
        .env("CANOPY_ENGINE_CHAOS_KILL_EVERY", "20000")
        .env("CANOPY_DEMO_RECORDS_PER_SEC", "20000");
    let mut s = Served::start(cmd);
    let tok = Some("demo");

    // Numbers within 2 minutes of the start (the demo's promise).
    let (t, h, root) = loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no numbers within 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(300));
        let r = s.get("/v1/tenants", tok);
        if r.status != 200 {
            continue;
        }
        let Some(t) = r.json()["tenants"][0].as_str().map(str::to_string) else {
            continue;
        };
        let h = s.first_hierarchy(&t, tok);
        let root = s.first_root(&t, &h, tok);
        if root["subtree"]["events"].as_u64().unwrap_or(0) > 0 {
            break (t, h, root["node"].as_str().unwrap().to_string());
        }
    };
    eprintln!("demo numbers after {:?}", started.elapsed());

    // The numbers add up: subtree = own + Σ children's subtree, read from one checkpoint.
    let node = format!(
        "/v1/tenants/{}/hierarchies/{}/nodes/{}",
        enc(&t),
        enc(&h),
        enc(&root)
    );
    let mut checked = false;
    for _ in 0..20 {
        let n = s.get(&node, tok).json();
        let kids = s.get(&format!("{node}/children?limit=1000"), tok).json();
        if n["as_of"] != kids["as_of"] {
            continue; // a checkpoint landed in between: read again
        }
        let sum: u64 = kids["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["subtree"]["events"].as_u64().unwrap())
            .sum();
        assert_eq!(
            n["subtree"]["events"].as_u64().unwrap(),
            n["own"]["events"].as_u64().unwrap() + sum,
            "root subtree events = own + children's"
        );
        checked = true;
        break;
    }
    assert!(
        checked,
        "never read a node and its children from one checkpoint"
    );

    // Let chaos kills and a few checkpoints happen, then read the metrics.
    std::thread::sleep(Duration::from_secs(3));
    let m = s.get("/metrics", None);
    assert_eq!(m.status, 200);
    assert!(
        m.content_type.starts_with("text/plain"),
        "{}",
        m.content_type
    );
    let families = parse_prometheus(&m.body);
    for want in [
        "canopy_records_total",
        "canopy_dead_letters_total",
        "canopy_duplicates_total",
        "canopy_deltas_sent_total",
        "canopy_events_coalesced_total",
        "canopy_actor_restarts_total",
        "canopy_checkpoint_seconds",
        "canopy_checkpoint_rows",
        "canopy_store_commit_seconds",
        "canopy_api_request_seconds",
        "canopy_api_requests_total",
    ] {
        assert!(
            families.contains(want),
            "/metrics lacks {want}: {families:?}"
        );
    }
    assert!(
        m.body
            .contains(&format!("canopy_records_total{{tenant=\"{t}\"}}")),
        "records are counted per tenant"
    );
    assert!(!m.body.contains(&root), "no per-node labels");
    assert_eq!(s.get("/healthz", None).status, 200);
    assert_eq!(s.get("/readyz", None).status, 200);

    let status = s.terminate();
    assert!(status.success(), "demo exit status after SIGTERM: {status}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut s.stdout, &mut rest).unwrap();
    assert!(rest.contains("stopped after a final checkpoint"), "{rest}");
}

/// What the demo's workload does to a store after `events` records: the refused share, each
/// dead-letter reason's count, and the nodes of every tree.
fn demo_stream_outcome(events: usize) -> (f64, BTreeSet<String>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = canopy::cmd::demo::workload(&canopy::config::Config::default());
    cfg.events = events;
    // Event times spread over the stream instead of the wall clock: the same stream, made
    // fast; refusals do not depend on the times.
    cfg.live = false;
    let input = dir.path().join("demo.ndjson");
    let records = canopy::loadgen::generate_file(&cfg, &input).unwrap();
    let data = dir.path().join("data");
    let dlq = ingest(&input, &data, &[]);
    let dead = std::fs::read_to_string(&dlq).unwrap_or_default();
    let reasons = dead
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["reason"].as_str().map(str::to_string))
        .collect();
    let mut cmd = canopy();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("CANOPY_API_TOKENS", "t=*");
    let s = Served::start(cmd);
    let mut nodes = 0;
    for t in s.get("/v1/tenants", Some("t")).json()["tenants"]
        .as_array()
        .unwrap()
    {
        let hs = s
            .get(
                &format!("/v1/tenants/{}/hierarchies", enc(t.as_str().unwrap())),
                Some("t"),
            )
            .json();
        for h in hs["hierarchies"].as_array().unwrap() {
            nodes += h["nodes"].as_u64().unwrap();
        }
    }
    // Over the records after the set-up (tenants, hierarchies, nodes), which is never refused
    // and would dilute a short run's share.
    let share = dead.lines().count() as f64 / events as f64;
    assert!(records > events as u64);
    (share, reasons, nodes)
}

/// The demo looks the same after a short and an eight times longer run (issue 26: its
/// dead-letter share grew from 0.25 % to 2.5 % and its trees shrank): the refused share stays
/// within 0.1 percentage points and under 1 %, and the trees keep at least 99 % of their
/// nodes. (The unbounded workload went from 0.30 % to 1.12 % between these two lengths.)
#[test]
fn demo_workload_keeps_a_small_stable_dead_letter_share_and_its_trees() {
    let cfg = canopy::cmd::demo::workload(&canopy::config::Config::default());
    let planned = cfg.nodes() as u64;
    let (short, _, short_nodes) = demo_stream_outcome(40_000);
    let (long, reasons, long_nodes) = demo_stream_outcome(320_000);
    eprintln!(
        "demo stream: refused {:.3} % after 40k, {:.3} % after 320k; nodes {short_nodes} / {long_nodes} of {planned}; reasons {reasons:?}",
        short * 100.0,
        long * 100.0
    );
    assert!(
        (long - short).abs() <= 0.001,
        "the refused share drifts: {:.3} % → {:.3} %",
        short * 100.0,
        long * 100.0
    );
    assert!(long < 0.01, "refused share {:.3} %", long * 100.0);
    assert!(long > 0.0, "the demo shows some bad input");
    for n in [short_nodes, long_nodes] {
        assert!(
            n as f64 >= planned as f64 * 0.99 && n <= planned,
            "{n} nodes of {planned}"
        );
    }
    // Churn itself is valid: no delete of a node with children, no move into a cycle.
    assert!(
        !reasons.contains("has_children") && !reasons.contains("cycle"),
        "{reasons:?}"
    );
}
