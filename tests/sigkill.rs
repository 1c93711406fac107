//! `canopy ingest` killed with SIGKILL at random moments, restarted each time, ends with exactly
//! the reference model's results.

mod support;

use std::time::{Duration, Instant};

use rand::Rng;
use support::*;

#[test]
fn sigkill_at_random_moments_then_resume_is_exact() {
    sigkill_then_resume(&[], &[]);
}

/// Days of event time with late events (buckets folded in the store and dropped by retention),
/// every idle node passivated at each checkpoint.
#[test]
fn sigkill_over_days_of_event_time_with_passivation_then_resume_is_exact() {
    sigkill_then_resume(
        &[
            "--spacing-ms",
            "1000",
            "--late",
            "0.05",
            "--late-max-secs",
            "216000",
        ],
        &[PASSIVATE_ALL],
    );
}

fn sigkill_then_resume(stream: &[&str], env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("stream.ndjson");
    let mut gen = vec![
        "--seed",
        "42",
        "--tenants",
        "3",
        "--hierarchies",
        "2",
        "--depth",
        "4",
        "--fanout",
        "3",
        "--events",
        "600000",
        "--churn",
        "0.002",
        "--bad",
        "0.01",
    ];
    gen.extend_from_slice(stream);
    loadgen(&input, &gen);
    let (exp_dump, exp_dlq, watermarks) = expected_with_watermarks(&input);
    let data = dir.path().join("data");
    let dlq = dir.path().join("dead.ndjson");
    let args = |c: &mut std::process::Command| {
        c.args(["ingest", "--quiet", "--input"])
            .arg(&input)
            .arg("--data-dir")
            .arg(&data)
            .arg("--dlq")
            .arg(&dlq)
            .args(["--checkpoint-interval-ms", "50", "--batch-size", "512"])
            // Loadgen repeats late events too; the model (like oracle.py) remembers every id (see
            // oracle_property.rs, `check_long_env`).
            .args(["--dedup-horizon-secs", "1000000"])
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::null());
    };
    let mut rng = rand::rng();
    let mut kills = 0;
    let mut finished_early = 0;
    while kills < 12 {
        let mut c = canopy();
        args(&mut c);
        let mut child = c.spawn().unwrap();
        let wait = Duration::from_millis(rng.random_range(20..250));
        let started = Instant::now();
        while started.elapsed() < wait {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            kills += 1;
        } else {
            // The whole stream got through before the kill: start over from scratch so that
            // the kills land mid-stream.
            finished_early += 1;
            assert!(
                finished_early < 5,
                "ingest too fast to kill mid-stream; make the stream longer"
            );
            std::fs::remove_dir_all(&data).unwrap();
            std::fs::remove_file(&dlq).ok();
            kills = 0;
        }
    }
    let mut c = canopy();
    args(&mut c);
    let st = c.status().unwrap();
    assert!(st.success());
    compare_retained(&exp_dump, &dump(&data), &exp_dlq, &dlq, &watermarks);
}
