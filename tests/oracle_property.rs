//! Property-style check: random streams (seeds, tenants, depth up to 7, moves, deletes,
//! suspensions, duplicates, bad records, DST time zones, attributed hierarchies) give exactly the
//! reference oracle's dump and dead letters.

mod support;

use support::*;

fn check(seed: u64, args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join(format!("stream-{seed}.ndjson"));
    let seed_s = seed.to_string();
    let mut all = vec!["--seed", seed_s.as_str()];
    all.extend_from_slice(args);
    loadgen(&input, &all);
    let (exp_dump, exp_dlq) = oracle(&input);
    let data = dir.path().join("data");
    let dlq = ingest(
        &input,
        &data,
        &["--checkpoint-every-records", "700", "--batch-size", "257"],
    );
    compare(&exp_dump, &dump(&data), &exp_dlq, &dlq);
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
    for seed in [7u64, 8] {
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
        let (exp_dump, exp_dlq) = oracle(&input);
        let data = dir.path().join("data");
        let dlq = ingest(
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
        );
        compare(&exp_dump, &dump(&data), &exp_dlq, &dlq);
    }
}
