//! Records with many metric names through `canopy ingest` (issue 24): one event with 100,000
//! names and 20 events with 1,000 new names each, beside another tenant's ordinary records.
//! The dump and dead letters must equal the reference model's (and oracle.py's). Time grew
//! with the square of the names (one such event ran for more than 300 s); the test asserts completion and
//! correctness, not time (`actors/examples/many_names.rs` prints the figures).

mod support;

use std::fmt::Write as _;
use std::path::Path;

use support::*;

fn event(
    tenant: &str,
    id: &str,
    entity: &str,
    ts: &str,
    names: impl Iterator<Item = String>,
) -> String {
    let mut m = String::new();
    for (i, n) in names.enumerate() {
        if i > 0 {
            m.push(',');
        }
        write!(m, "\"{n}\":{}", (i as i64 % 1000) - 500).unwrap();
    }
    format!(
        r#"{{"type":"event","tenant":"{tenant}","event_id":"{id}","entity":"{entity}","ts":"{ts}","metrics":{{{m}}}}}"#
    )
}

fn write_input(path: &Path) {
    let mut lines = vec![
        r#"{"type":"define_tenant","tenant":"wide","timezone":"Europe/Paris"}"#.to_string(),
        r#"{"type":"upsert_node","tenant":"wide","hierarchy":"h","node":"root"}"#.to_string(),
        r#"{"type":"upsert_node","tenant":"wide","hierarchy":"h","node":"big","parent":"root"}"#
            .to_string(),
        r#"{"type":"upsert_node","tenant":"wide","hierarchy":"h","node":"many","parent":"root"}"#
            .to_string(),
        r#"{"type":"define_tenant","tenant":"calm"}"#.to_string(),
        r#"{"type":"upsert_node","tenant":"calm","hierarchy":"h","node":"r"}"#.to_string(),
        r#"{"type":"upsert_node","tenant":"calm","hierarchy":"h","node":"x","parent":"r"}"#
            .to_string(),
    ];
    let calm = |i: usize| {
        event(
            "calm",
            &format!("c{i}"),
            "x",
            &format!("2026-11-21T10:{:02}:00Z", i % 60),
            ["amount".to_string(), "items".to_string()].into_iter(),
        )
    };
    lines.push(calm(0));
    // One event with 100,000 names (in no particular order: the decoder must not care).
    lines.push(event(
        "wide",
        "one-wide",
        "big",
        "2026-11-21T10:00:00Z",
        (0..100_000).rev().map(|i| format!("n{i}")),
    ));
    lines.push(calm(1));
    // 20 events with 1,000 new names each, and the first 100 names again (existing ones).
    for e in 0..20 {
        lines.push(event(
            "wide",
            &format!("many-{e}"),
            "many",
            &format!("2026-11-21T1{}:{:02}:00Z", e % 3, e),
            (e * 1000..(e + 1) * 1000)
                .map(|i| format!("k{i}"))
                .chain((0..100).map(|i| format!("n{i}"))),
        ));
        lines.push(calm(2 + e));
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn events_with_many_names_match_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("wide.ndjson");
    write_input(&input);
    let data = dir.path().join("data");
    let dlq = ingest(&input, &data, &[]);
    let got = dump(&data);
    let (want, want_dlq) = expected(&input);
    compare(&want, &got, &want_dlq, &dlq);
    // And the numbers are really there: the root's subtree has every name once.
    let rows = std::fs::read_to_string(&got).unwrap();
    let root = rows
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["tenant"] == "wide" && r["node"] == "root")
        .unwrap();
    assert_eq!(
        root["subtree"]["metrics"].as_object().unwrap().len(),
        100_000 + 20 * 1000
    );
    assert_eq!(root["subtree"]["events"], 21);
    assert_eq!(root["subtree"]["metrics"]["n0"]["count"], 21);
}
