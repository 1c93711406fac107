//! The public conformance case of ../shared/conformance, through the real binary.

mod support;

use support::*;

#[test]
fn public_case_matches_the_expected_dump_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let c = conformance_dir();
    let data = dir.path().join("data");
    let dlq = ingest(&c.join("input.ndjson"), &data, &[]);
    let report = compare(
        &c.join("expected-dump.ndjson"),
        &dump(&data),
        &c.join("expected-dlq.ndjson"),
        &dlq,
    );
    assert!(report.contains("655 nodes match"), "{report}");
}

#[test]
fn public_case_matches_with_a_node_actor_killed_every_50_records() {
    let dir = tempfile::tempdir().unwrap();
    let c = conformance_dir();
    let data = dir.path().join("data");
    let dlq = ingest(
        &c.join("input.ndjson"),
        &data,
        &[
            "--chaos-kill-every",
            "50",
            "--checkpoint-every-records",
            "2000",
        ],
    );
    compare(
        &c.join("expected-dump.ndjson"),
        &dump(&data),
        &c.join("expected-dlq.ndjson"),
        &dlq,
    );
}

#[test]
fn public_case_matches_with_a_checkpoint_every_few_records() {
    // Many small checkpoints exercise incremental node writes, deletes and dedup batches.
    let dir = tempfile::tempdir().unwrap();
    let c = conformance_dir();
    let data = dir.path().join("data");
    let dlq = ingest(
        &c.join("input.ndjson"),
        &data,
        &["--checkpoint-every-records", "97", "--batch-size", "31"],
    );
    compare(
        &c.join("expected-dump.ndjson"),
        &dump(&data),
        &c.join("expected-dlq.ndjson"),
        &dlq,
    );
}

#[test]
fn ingest_twice_is_idempotent() {
    // Running the same ingest again resumes at the end: nothing is counted twice.
    let dir = tempfile::tempdir().unwrap();
    let c = conformance_dir();
    let data = dir.path().join("data");
    ingest(&c.join("input.ndjson"), &data, &[]);
    let dlq = ingest(&c.join("input.ndjson"), &data, &[]);
    compare(
        &c.join("expected-dump.ndjson"),
        &dump(&data),
        &c.join("expected-dlq.ndjson"),
        &dlq,
    );
}
