//! Property-style check: random streams (seeds, tenants, depth up to 7, moves, deletes,
//! suspensions, duplicates, bad records, DST time zones, attributed hierarchies, days of event
//! time with late events) give exactly the expected dump and dead letters of the reference
//! model (`canopy-model`), and of `oracle.py` when ../shared/conformance is there.

mod support;

use support::*;

fn check(seed: u64, args: &[&str]) {
    check_env(seed, args, &[])
}

fn check_env(seed: u64, args: &[&str], env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join(format!("stream-{seed}.ndjson"));
    let seed_s = seed.to_string();
    let mut all = vec!["--seed", seed_s.as_str()];
    all.extend_from_slice(args);
    loadgen(&input, &all);
    let (exp_dump, exp_dlq) = expected(&input);
    let data = dir.path().join("data");
    let dlq = ingest_env(
        &input,
        &data,
        &["--checkpoint-every-records", "700", "--batch-size", "257"],
        env,
    );
    compare(&exp_dump, &dump(&data), &exp_dlq, &dlq);
}

#[test]
fn random_streams_match_the_oracle_with_every_idle_node_passivated() {
    for (seed, t, d) in [(51u64, "2", "5"), (52, "3", "4")] {
        check_env(
            seed,
            &[
                "--tenants",
                t,
                "--hierarchies",
                "2",
                "--depth",
                d,
                "--fanout",
                "2",
                "--events",
                "2500",
                "--churn",
                "0.06",
                "--bad",
                "0.03",
            ],
            &[PASSIVATE_ALL],
        );
    }
}

#[test]
fn random_streams_match_the_oracle() {
    // (tenants, hierarchies, depth, fanout, events, churn, bad)
    let shapes: [(&str, &str, &str, &str, &str, &str, &str); 6] = [
        ("1", "1", "2", "3", "400", "0.05", "0.05"),
        ("2", "2", "3", "3", "1500", "0.05", "0.05"),
        ("3", "2", "4", "2", "2000", "0.08", "0.03"),
        ("2", "3", "5", "2", "2000", "0.04", "0.02"),
        ("1", "2", "7", "2", "3000", "0.03", "0.02"),
        ("4", "2", "6", "2", "3000", "0.10", "0.05"),
    ];
    for (i, (t, h, d, f, e, c, b)) in shapes.iter().enumerate() {
        for seed in [1 + i as u64 * 10, 2 + i as u64 * 10] {
            check(
                seed,
                &[
                    "--tenants",
                    t,
                    "--hierarchies",
                    h,
                    "--depth",
                    d,
                    "--fanout",
                    f,
                    "--events",
                    e,
                    "--churn",
                    c,
                    "--bad",
                    b,
                ],
            );
        }
    }
}

#[test]
fn random_streams_match_the_oracle_under_chaos() {
    for (seed, env) in [(7u64, &[][..]), (8, &[PASSIVATE_ALL][..])] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("stream.ndjson");
        let s = seed.to_string();
        loadgen(
            &input,
            &[
                "--seed",
                &s,
                "--tenants",
                "3",
                "--hierarchies",
                "2",
                "--depth",
                "5",
                "--fanout",
                "2",
                "--events",
                "3000",
                "--churn",
                "0.05",
                "--bad",
                "0.03",
            ],
        );
        let (exp_dump, exp_dlq) = expected(&input);
        let data = dir.path().join("data");
        let dlq = ingest_env(
            &input,
            &data,
            &[
                "--chaos-kill-every",
                "37",
                "--checkpoint-every-records",
                "500",
                "--batch-size",
                "64",
            ],
            env,
        );
        compare(&exp_dump, &dump(&data), &exp_dlq, &dlq);
    }
}

/// Days of event time with events late by up to 60 hours (past the 48 h minute retention): the
/// store folds deltas into buckets it holds, drops what falls out of retention, and moves take
/// stored buckets with them. Buckets out of retention may be missing; every other must match.
fn check_long(seed: u64, extra: &[&str], ingest_flags: &[&str]) {
    check_long_env(seed, extra, ingest_flags, &[])
}

fn check_long_env(seed: u64, extra: &[&str], ingest_flags: &[&str], env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join(format!("long-{seed}.ndjson"));
    let s = seed.to_string();
    let mut args = vec![
        "--seed",
        &s,
        "--hierarchies",
        "2",
        "--fanout",
        "2",
        "--churn",
        "0.06",
        "--bad",
        "0.02",
        "--late",
        "0.15",
        "--late-max-secs",
        "216000",
    ];
    args.extend_from_slice(extra);
    loadgen(&input, &args);
    let (exp_dump, exp_dlq, wm) = expected_with_watermarks(&input);
    let data = dir.path().join("data");
    // The model (like oracle.py) remembers every event id; the engine only for its dedup
    // horizon (at least 1 h behind the watermark), and loadgen repeats late events too: a
    // horizon longer than the stream makes both agree on every duplicate.
    let mut flags = vec!["--dedup-horizon-secs", "1000000"];
    flags.extend_from_slice(ingest_flags);
    let dlq = ingest_env(&input, &data, &flags, env);
    compare_retained(&exp_dump, &dump(&data), &exp_dlq, &dlq, &wm);
}

#[test]
fn streams_over_days_with_late_events_match_the_oracle() {
    // (tenants, depth, events, spacing in ms: 3,000 events 150 s apart span ~5 days)
    for (seed, t, d, e, spacing) in [
        (31u64, "2", "4", "3000", "150000"),
        (32, "1", "6", "4000", "90000"),
        (33, "3", "3", "2500", "200000"),
    ] {
        check_long(
            seed,
            &[
                "--tenants",
                t,
                "--depth",
                d,
                "--events",
                e,
                "--spacing-ms",
                spacing,
            ],
            &["--checkpoint-every-records", "300", "--batch-size", "97"],
        );
    }
}

#[test]
fn streams_over_days_with_late_events_match_the_oracle_under_chaos() {
    // The second run passivates every idle node at each checkpoint as well.
    for (seed, env) in [(41u64, &[][..]), (42, &[PASSIVATE_ALL][..])] {
        check_long_env(
            seed,
            &[
                "--tenants",
                "2",
                "--depth",
                "5",
                "--events",
                "3000",
                "--spacing-ms",
                "150000",
            ],
            &[
                "--chaos-kill-every",
                "29",
                "--checkpoint-every-records",
                "250",
                "--batch-size",
                "64",
            ],
            env,
        );
    }
}

/// The model and `oracle.py` on more streams than the engine runs: the two references agree
/// (each call to `expected` runs both and compares them when ../shared/conformance is there).
#[test]
fn the_model_agrees_with_oracle_py_on_random_streams() {
    if shared_conformance().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for seed in 100u64..112 {
        let input = dir.path().join(format!("x-{seed}.ndjson"));
        let s = seed.to_string();
        let late = if seed % 2 == 0 { "0.2" } else { "0" };
        loadgen(
            &input,
            &[
                "--seed",
                &s,
                "--tenants",
                "3",
                "--hierarchies",
                "2",
                "--depth",
                "5",
                "--fanout",
                "3",
                "--events",
                "3000",
                "--churn",
                "0.08",
                "--bad",
                "0.08",
                "--late",
                late,
                "--late-max-secs",
                "300000",
                "--spacing-ms",
                "60000",
            ],
        );
        expected(&input);
    }
}

/// docs/SPEC.md section 1: a line whose first byte marks a MessagePack map is a MessagePack
/// record. A third of a random stream's objects re-encoded as MessagePack give the model's
/// results. Only the model: `oracle.py` reads every line as text.
#[test]
fn random_streams_with_messagepack_lines_match_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("json.ndjson");
    loadgen(
        &json,
        &[
            "--seed",
            "61",
            "--tenants",
            "2",
            "--hierarchies",
            "2",
            "--depth",
            "4",
            "--fanout",
            "2",
            "--events",
            "2000",
            "--churn",
            "0.06",
            "--bad",
            "0.05",
        ],
    );
    let mut mixed = Vec::new();
    let mut packed = 0;
    for (i, line) in std::fs::read_to_string(&json).unwrap().lines().enumerate() {
        let value = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .filter(|v| v.is_object());
        // A MessagePack record must not hold a newline byte: lines split at `\n`.
        let bytes = value
            .filter(|_| i % 3 == 0)
            .map(|v| rmp_serde::to_vec(&v).unwrap())
            .filter(|b| !b.contains(&b'\n'));
        match bytes {
            Some(b) => {
                mixed.extend_from_slice(&b);
                packed += 1;
            }
            None => mixed.extend_from_slice(line.as_bytes()),
        }
        mixed.push(b'\n');
    }
    assert!(packed > 100, "only {packed} lines re-encoded");
    let input = dir.path().join("mixed.ndjson");
    std::fs::write(&input, mixed).unwrap();
    let (exp_dump, exp_dlq) = model_expected(&input);
    // The re-encoded lines mean what they meant as JSON, to the model too.
    let (json_dump, json_dlq) = model_expected(&json);
    compare_model_only(&json_dump, &exp_dump, &json_dlq, &exp_dlq);
    let data = dir.path().join("data");
    let dlq = ingest(&input, &data, &["--checkpoint-every-records", "300"]);
    compare_model_only(&exp_dump, &dump(&data), &exp_dlq, &dlq);
}
