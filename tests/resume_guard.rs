//! A resume must be a resume of the same input and dead-letter file (issue 24): `ingest --input A
//! --dlq Q1` then `--input B --dlq Q2` on the same data directory started mid-line in B and
//! padded Q2 with NULs. Every such mismatch is refused with exit 2 before anything is written;
//! a file that only grew resumes where it stopped.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use support::*;

fn public_input() -> PathBuf {
    conformance_dir().join("input.ndjson")
}

/// `canopy ingest` with explicit files; its output (not asserted).
fn ingest_with(input: &Path, data: &Path, dlq: Option<&Path>) -> Output {
    let mut c = canopy();
    c.args(["ingest", "--quiet", "--input"])
        .arg(input)
        .arg("--data-dir")
        .arg(data);
    if let Some(q) = dlq {
        c.arg("--dlq").arg(q);
    }
    c.output().expect("canopy starts")
}

/// Asserts a refusal: exit 2 and a message naming `what`.
fn refused(out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected a refusal (exit 2): {err}"
    );
    assert!(err.contains(what), "the message should say {what:?}: {err}");
}

fn dump_text(data: &Path) -> Vec<u8> {
    run_ok(canopy().arg("dump").arg("--data-dir").arg(data)).stdout
}

/// The public case ingested once into `data` with dead letters in `q1`; the first half of its
/// input in `a` (so that a longer file can follow).
struct Case {
    _dir: tempfile::TempDir,
    root: PathBuf,
    a: PathBuf,
    data: PathBuf,
    q1: PathBuf,
}

fn case() -> Case {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let text = std::fs::read_to_string(public_input()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let a = root.join("a.ndjson");
    std::fs::write(&a, lines[..lines.len() / 2].join("\n") + "\n").unwrap();
    let (data, q1) = (root.join("data"), root.join("q1.ndjson"));
    let out = ingest_with(&a, &data, Some(&q1));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Case {
        _dir: dir,
        root,
        a,
        data,
        q1,
    }
}

#[test]
fn another_input_or_a_truncated_one_is_refused_before_anything_is_written() {
    let c = case();
    let before = dump_text(&c.data);
    let q1_before = std::fs::read(&c.q1).unwrap();
    assert!(!q1_before.is_empty(), "the first half has dead letters");

    // Another file (the reported case): B under another name, another dead-letter file.
    let b = c.root.join("b.ndjson");
    let text = std::fs::read_to_string(public_input()).unwrap();
    let tail: Vec<&str> = text.lines().rev().take(200).collect();
    std::fs::write(&b, tail.join("\n") + "\n").unwrap();
    let q2 = c.root.join("q2.ndjson");
    refused(
        &ingest_with(&b, &c.data, Some(&q2)),
        "the checkpoint was taken reading",
    );
    assert!(!q2.exists(), "no dead-letter file is created");

    // The same path with other contents (replaced in place) and the same length or more.
    let a_text = std::fs::read(&c.a).unwrap();
    let mut replaced = a_text.clone();
    let i = replaced.len() - 20;
    replaced[i] = if replaced[i] == b'x' { b'y' } else { b'x' };
    std::fs::write(&c.a, &replaced).unwrap();
    refused(
        &ingest_with(&c.a, &c.data, Some(&c.q1)),
        "differs from the file",
    );

    // Shorter than it was.
    std::fs::write(&c.a, &a_text[..a_text.len() / 2]).unwrap();
    refused(
        &ingest_with(&c.a, &c.data, Some(&c.q1)),
        "was truncated or replaced",
    );
    std::fs::write(&c.a, &a_text).unwrap();

    // Nothing changed: the store's numbers and the dead letters are as the first run left them.
    assert_eq!(dump_text(&c.data), before);
    assert_eq!(std::fs::read(&c.q1).unwrap(), q1_before);
    // And the right files still resume (nothing new to do).
    let out = ingest_with(&c.a, &c.data, Some(&c.q1));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&c.q1).unwrap(), q1_before);
}

#[test]
fn another_dead_letter_file_or_a_changed_one_is_refused() {
    let c = case();
    let q1_before = std::fs::read(&c.q1).unwrap();
    // Same input, another dead-letter file: it would start with NULs for Q1's length.
    let q2 = c.root.join("q2.ndjson");
    refused(
        &ingest_with(&c.a, &c.data, Some(&q2)),
        "dead letters are in",
    );
    assert!(!q2.exists());
    // Without a dead-letter file, where the checkpoint had one (its letters would be lost).
    refused(&ingest_with(&c.a, &c.data, None), "taken with --dlq");
    // Q1 truncated, or missing.
    std::fs::write(&c.q1, &q1_before[..q1_before.len() / 2]).unwrap();
    refused(&ingest_with(&c.a, &c.data, Some(&c.q1)), "shorter than");
    std::fs::remove_file(&c.q1).unwrap();
    refused(&ingest_with(&c.a, &c.data, Some(&c.q1)), "is missing");
    assert!(!c.q1.exists(), "a refused resume creates nothing");
    // Q1 with its last letter changed.
    let mut changed = q1_before.clone();
    let i = changed.len() - 5;
    changed[i] ^= 1;
    std::fs::write(&c.q1, &changed).unwrap();
    refused(
        &ingest_with(&c.a, &c.data, Some(&c.q1)),
        "differs from the one",
    );

    // A checkpoint taken without a dead-letter file refuses one now.
    let fresh = c.root.join("data-nodlq");
    let out = ingest_with(&c.a, &fresh, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q3 = c.root.join("q3.ndjson");
    refused(&ingest_with(&c.a, &fresh, Some(&q3)), "taken without --dlq");
    assert!(!q3.exists());
}

#[test]
fn an_input_that_grew_resumes_where_it_stopped_and_matches_the_oracle() {
    let c = case();
    // The rest of the public input appended to A: the same file, longer.
    std::fs::copy(public_input(), &c.a).unwrap();
    let out = ingest_with(&c.a, &c.data, Some(&c.q1));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = dump(&c.data);
    let conf = conformance_dir();
    compare(
        &conf.join("expected-dump.ndjson"),
        &got,
        &conf.join("expected-dlq.ndjson"),
        &c.q1,
    );
    // Through a symbolic link to the same file: the canonical path is the same.
    let link = c.root.join("link.ndjson");
    std::os::unix::fs::symlink(&c.a, &link).unwrap();
    let out = ingest_with(&link, &c.data, Some(&c.q1));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    compare(
        &conf.join("expected-dump.ndjson"),
        &dump(&c.data),
        &conf.join("expected-dlq.ndjson"),
        &c.q1,
    );
}
