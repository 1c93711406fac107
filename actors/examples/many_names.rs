//! What records with many metric names cost the core (issue 24), in the steps a record takes:
//! decoding, the node's aggregates (`own`, three buckets, the pending total and its three
//! buckets: eight `add_event`s per event), merges up a 7-level chain, and packing the set a
//! checkpoint stores. Prints wall times; it asserts nothing about them.
//!
//! ```sh
//! cargo run --release -p canopy-actors --example many_names [-- NAMES]
//! ```

use std::time::{Duration, Instant};

use canopy_actors::agg::{Agg, MetricName};
use canopy_actors::packed;
use canopy_actors::record::{decode, Record};

fn event_line(id: usize, names: std::ops::Range<usize>) -> String {
    let metrics: Vec<String> = names.map(|i| format!("\"m{i}\":{i}")).collect();
    format!(
        r#"{{"type":"event","tenant":"t","event_id":"e{id}","entity":"a","ts":0,"metrics":{{{}}}}}"#,
        metrics.join(",")
    )
}

/// Decodes `lines`, applies each event as a node does, merges up a chain, packs the result.
fn run(lines: &[String]) -> [Duration; 4] {
    let t = Instant::now();
    let events: Vec<Vec<(MetricName, i64)>> = lines
        .iter()
        .map(|l| match decode(l.as_bytes()) {
            Ok(Record::Event { metrics, .. }) => metrics
                .iter()
                .map(|(n, v)| (MetricName::intern(n), *v))
                .collect(),
            other => panic!("{other:?}"),
        })
        .collect();
    let decode_t = t.elapsed();
    let t = Instant::now();
    let mut aggs: Vec<Agg> = vec![Agg::default(); 8];
    for ev in &events {
        for a in &mut aggs {
            a.add_event(ev);
        }
    }
    let add_t = t.elapsed();
    let t = Instant::now();
    let mut chain: Vec<Agg> = vec![Agg::default(); 7];
    let mut delta = aggs[0].clone();
    for a in &mut chain {
        a.merge(&delta);
        delta = a.clone();
    }
    let merge_t = t.elapsed();
    let t = Instant::now();
    let set: Vec<packed::SetBucket> = (0..3u8)
        .map(|g| (1u8, g, 1u64 << 20, chain[6].clone()))
        .collect();
    let (bytes, _) = packed::encode(&set);
    assert_eq!(packed::decode(&bytes).unwrap().len(), 3);
    [decode_t, add_t, merge_t, t.elapsed()]
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let cases: Vec<(String, Vec<String>)> = vec![
        (format!("1 event, {n} names"), vec![event_line(0, 0..n)]),
        (
            "20 events, 1,000 new names each".to_string(),
            (0..20)
                .map(|e| event_line(e, e * 1000..(e + 1) * 1000))
                .collect(),
        ),
        (
            "100,000 events, 2 names each".to_string(),
            (0..100_000).map(|e| event_line(e, 0..2)).collect(),
        ),
    ];
    for (what, lines) in cases {
        let started = Instant::now();
        let [d, a, m, p] = run(&lines);
        println!(
            "{what}: decode {d:.2?}, 8 aggregates {a:.2?}, 7 merges {m:.2?}, pack+unpack 3 buckets {p:.2?}; total {:.2?}",
            started.elapsed()
        );
    }
}
