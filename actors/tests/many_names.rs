//! Records and aggregates with many metric names (issue 24): the sorted-merge paths of
//! `Agg::add_event` and `Agg::merge`, the packed set's name index and the decoder's repeated-key
//! handling agree with a plain map, and their cost grows as n log n, not n².

use std::collections::BTreeMap;
use std::time::Instant;

use canopy_actors::agg::{Agg, MetricName, Stat};
use canopy_actors::packed;
use canopy_actors::record::{decode, Record};
use proptest::prelude::*;

/// The model: name → stat, merged one name at a time.
fn model(events: &[Vec<(String, i64)>]) -> BTreeMap<String, Stat> {
    let mut m: BTreeMap<String, Stat> = BTreeMap::new();
    for ev in events {
        for (n, v) in ev {
            match m.get_mut(n) {
                Some(s) => s.add(*v),
                None => {
                    m.insert(n.clone(), Stat::of(*v));
                }
            }
        }
    }
    m
}

fn as_map(a: &Agg) -> BTreeMap<String, Stat> {
    a.metrics.iter().map(|(n, s)| (n.to_string(), *s)).collect()
}

fn names(ev: &[(String, i64)]) -> Vec<(MetricName, i64)> {
    ev.iter()
        .map(|(n, v)| (MetricName::intern(n), *v))
        .collect()
}

fn event() -> impl Strategy<Value = Vec<(String, i64)>> {
    // Short and long events, names from a small pool (so they meet again) in any order; a
    // name may repeat within an event (the decoder never lets it, the aggregate copes).
    prop::collection::vec(("m[0-9]{1,2}", -1000i64..1000), 0..40)
}

proptest! {
    // No regression file: an integration test has no source directory proptest recognises.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn add_event_and_merge_match_a_map(events in prop::collection::vec(event(), 1..8)) {
        let want = model(&events);
        let mut one = Agg::default();
        for ev in &events {
            one.add_event(&names(ev));
        }
        prop_assert_eq!(one.events, events.len() as u64);
        prop_assert_eq!(&as_map(&one), &want);
        prop_assert!(one.metrics.windows(2).all(|w| *w[0].0 < *w[1].0), "sorted, no repeats");
        // The same events in several aggregates merged together.
        let mut merged = Agg::default();
        for ev in &events {
            let mut a = Agg::default();
            a.add_event(&names(ev));
            merged.merge(&a);
        }
        prop_assert_eq!(&as_map(&merged), &want);
        prop_assert!(merged.metrics.windows(2).all(|w| *w[0].0 < *w[1].0));
    }
}

/// An NDJSON event line with `n` metrics named from `prefix`.
fn line(n: usize, prefix: &str) -> String {
    let mut s = String::from(
        r#"{"type":"event","tenant":"t","event_id":"e","entity":"a","ts":0,"metrics":{"#,
    );
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!("\"{prefix}{i}\":{i}"));
    }
    s.push_str("}}");
    s
}

#[test]
fn repeated_keys_keep_their_first_place_and_last_value_past_the_scan_limit() {
    // 40 names, then the first 20 again with new values: the oracle's dict semantics.
    let mut s = String::from(
        r#"{"type":"event","tenant":"t","event_id":"e","entity":"a","ts":0,"metrics":{"#,
    );
    let mut parts: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
    parts.extend((0..20).map(|i| format!("\"k{i}\":{}", 1000 + i)));
    s.push_str(&parts.join(","));
    s.push_str("}}");
    let Ok(Record::Event { metrics, .. }) = decode(s.as_bytes()) else {
        panic!("an event");
    };
    assert_eq!(metrics.len(), 40);
    for (i, (n, v)) in metrics.iter().enumerate() {
        assert_eq!(n, &format!("k{i}"));
        assert_eq!(*v, if i < 20 { 1000 + i as i64 } else { i as i64 });
    }
    // The same through MessagePack (a map may repeat keys on the wire too).
    let mut mp = Vec::new();
    let fields: Vec<(rmpv::Value, rmpv::Value)> = vec![
        ("type".into(), "event".into()),
        ("tenant".into(), "t".into()),
        ("event_id".into(), "e".into()),
        ("entity".into(), "a".into()),
        ("ts".into(), 0.into()),
        (
            "metrics".into(),
            rmpv::Value::Map(
                (0..40)
                    .map(|i| (format!("k{i}").into(), i.into()))
                    .chain((0..20).map(|i| (format!("k{i}").into(), (1000 + i).into())))
                    .collect(),
            ),
        ),
    ];
    rmpv::encode::write_value(&mut mp, &rmpv::Value::Map(fields)).unwrap();
    let Ok(Record::Event { metrics: m2, .. }) = decode(&mp) else {
        panic!("an event");
    };
    assert_eq!(m2, metrics);
}

#[test]
fn a_packed_set_with_many_names_round_trips() {
    let mut a = Agg::default();
    let ev: Vec<(MetricName, i64)> = (0..5_000)
        .map(|i| (MetricName::intern(&format!("p{i}")), i))
        .collect();
    a.add_event(&ev);
    let set = vec![(0u8, 0u8, 1u64 << 20, a.clone()), (0, 1, 1 << 20, a)];
    let (bytes, n) = packed::encode(&set);
    assert_eq!(n, 2);
    assert_eq!(packed::decode(&bytes).unwrap(), set);
}

/// Not a timed assertion: it prints what 100,000 names cost, so a return of the quadratic
/// paths shows (it took minutes; `cargo test --release -- --nocapture` to read the figures).
#[test]
fn one_hundred_thousand_names_decode_add_merge_and_pack() {
    let text = line(100_000, "n");
    let t = Instant::now();
    let Ok(Record::Event { metrics, .. }) = decode(text.as_bytes()) else {
        panic!("an event");
    };
    let decoded = t.elapsed();
    assert_eq!(metrics.len(), 100_000);
    let ev: Vec<(MetricName, i64)> = metrics
        .iter()
        .map(|(n, v)| (MetricName::intern(n), *v))
        .collect();
    let t = Instant::now();
    let mut own = Agg::default();
    own.add_event(&ev);
    own.add_event(&ev);
    let mut parent = Agg::default();
    parent.merge(&own);
    parent.merge(&own);
    let added = t.elapsed();
    assert_eq!(parent.metrics.len(), 100_000);
    assert_eq!(parent.events, 4);
    let s = parent.stat("n99999").unwrap();
    assert_eq!(
        (s.count, { s.sum }, s.min, s.max),
        (4, 4 * 99_999, 99_999, 99_999)
    );
    let t = Instant::now();
    let (bytes, _) = packed::encode(&[(0, 0, 0, parent.clone())]);
    assert_eq!(packed::decode(&bytes).unwrap()[0].3, parent);
    eprintln!(
        "100,000 names: decode {decoded:?}, 2 add_event + 2 merge {added:?}, pack+unpack {:?}",
        t.elapsed()
    );
}
