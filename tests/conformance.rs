//! The public conformance case (the repository's copy in tests/fixtures/conformance), through
//! the real binary, compared with its expected dump and dead letters (docs/SPEC.md section 11).

mod support;

use support::*;

/// Ingests the public input with `extra` flags (`runs` times into one data dir) and compares.
fn public_case(extra: &[&str], runs: usize) -> String {
    public_case_env(extra, runs, &[])
}

fn public_case_env(extra: &[&str], runs: usize, env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let c = conformance_dir();
    let data = dir.path().join("data");
    let mut dlq = None;
    for _ in 0..runs {
        dlq = Some(ingest_env(&c.join("input.ndjson"), &data, extra, env));
    }
    compare(
        &c.join("expected-dump.ndjson"),
        &dump(&data),
        &c.join("expected-dlq.ndjson"),
        &dlq.unwrap(),
    )
}

#[test]
fn public_case_matches_the_expected_dump_and_dead_letters() {
    let report = public_case(&[], 1);
    let rows = std::fs::read_to_string(conformance_dir().join("expected-dump.ndjson")).unwrap();
    let nodes = rows.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(report.contains(&format!("{nodes} nodes match")), "{report}");
}

/// The repository's copy of the public case is the shared one, byte for byte.
#[test]
fn the_fixtures_are_the_shared_public_case() {
    let Some(shared) = shared_conformance() else {
        return;
    };
    for f in [
        "input.ndjson",
        "expected-dump.ndjson",
        "expected-dlq.ndjson",
    ] {
        let ours = std::fs::read(conformance_dir().join(f)).unwrap();
        let theirs = std::fs::read(shared.join(f)).unwrap();
        assert!(
            ours == theirs,
            "tests/fixtures/conformance/{f} differs from ../shared/conformance/{f}"
        );
    }
}

#[test]
fn public_case_matches_with_a_node_actor_killed_every_50_records() {
    public_case(
        &[
            "--chaos-kill-every",
            "50",
            "--checkpoint-every-records",
            "2000",
        ],
        1,
    );
}

#[test]
fn public_case_matches_with_a_checkpoint_every_few_records() {
    // Many small checkpoints exercise incremental bucket rows, node deletes and dedup batches.
    public_case(
        &["--checkpoint-every-records", "97", "--batch-size", "31"],
        1,
    );
}

#[test]
fn ingest_twice_is_idempotent() {
    // Running the same ingest again resumes at the end: nothing is counted twice.
    public_case(&[], 2);
}

#[test]
fn public_case_matches_with_every_idle_node_passivated_at_each_checkpoint() {
    for extra in [
        &["--checkpoint-every-records", "97", "--batch-size", "31"][..],
        &[
            "--chaos-kill-every",
            "50",
            "--checkpoint-every-records",
            "300",
            "--batch-size",
            "64",
        ][..],
    ] {
        public_case_env(extra, 1, &[PASSIVATE_ALL]);
    }
    public_case_env(&["--checkpoint-every-records", "500"], 2, &[PASSIVATE_ALL]);
}
