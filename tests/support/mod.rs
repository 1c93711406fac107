//! Shared helpers for the integration tests: run the real `canopy` binary and the reference
//! oracle, and compare with `compare.py` from `../shared/conformance`.

#![allow(dead_code)]

pub mod http;
pub mod tansu;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn canopy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_canopy"))
}

pub fn conformance_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance");
    assert!(
        d.join("oracle.py").exists(),
        "../shared/conformance must sit beside the repository: {}",
        d.display()
    );
    d
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("command starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        tail(&String::from_utf8_lossy(&out.stderr), 4000)
    );
    out
}

pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        s
    } else {
        let mut i = s.len() - n;
        while !s.is_char_boundary(i) {
            i += 1;
        }
        &s[i..]
    }
}

/// The most aggressive passivation: every node actor idle at a checkpoint is stopped, and
/// activated again from its parked totals when something is addressed to it.
pub const PASSIVATE_ALL: (&str, &str) = ("CANOPY_TENANT_PASSIVATE_IDLE_CHECKPOINTS", "1");

/// `canopy ingest` with extra flags; returns the dead-letter path.
pub fn ingest(input: &Path, data: &Path, extra: &[&str]) -> PathBuf {
    ingest_env(input, data, extra, &[])
}

/// [`ingest`] with extra environment variables (configuration keys).
pub fn ingest_env(input: &Path, data: &Path, extra: &[&str], env: &[(&str, &str)]) -> PathBuf {
    let dlq = data.with_extension("dlq.ndjson");
    run_ok(
        canopy()
            .args(["ingest", "--quiet", "--input"])
            .arg(input)
            .arg("--data-dir")
            .arg(data)
            .arg("--dlq")
            .arg(&dlq)
            .args(extra)
            .envs(env.iter().copied()),
    );
    dlq
}

pub fn dump(data: &Path) -> PathBuf {
    let out = run_ok(canopy().arg("dump").arg("--data-dir").arg(data));
    let path = data.with_extension("dump.ndjson");
    std::fs::write(&path, out.stdout).unwrap();
    path
}

/// Runs the reference oracle on `input`; returns (expected dump, expected dead letters).
pub fn oracle(input: &Path) -> (PathBuf, PathBuf) {
    let d = input.with_extension("oracle.dump.ndjson");
    let q = input.with_extension("oracle.dlq.ndjson");
    run_ok(
        Command::new("python3")
            .arg(conformance_dir().join("oracle.py"))
            .arg(input)
            .arg("--dump")
            .arg(&d)
            .arg("--dlq")
            .arg(&q),
    );
    (d, q)
}

/// The oracle on `input`, also writing the tenants' final watermarks: (dump, dead letters,
/// watermarks), for [`compare_retained`].
pub fn oracle_with_watermarks(input: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let d = input.with_extension("oracle.dump.ndjson");
    let q = input.with_extension("oracle.dlq.ndjson");
    let w = input.with_extension("oracle.watermarks.json");
    run_ok(
        Command::new("python3")
            .arg(conformance_dir().join("oracle.py"))
            .arg(input)
            .arg("--dump")
            .arg(&d)
            .arg("--dlq")
            .arg(&q)
            .arg("--watermarks")
            .arg(&w),
    );
    (d, q, w)
}

/// compare.py; panics with its report when the results differ.
pub fn compare(exp_dump: &Path, act_dump: &Path, exp_dlq: &Path, act_dlq: &Path) -> String {
    compare_with(exp_dump, act_dump, exp_dlq, act_dlq, None)
}

/// compare.py with `--watermarks`: buckets that fell out of retention may be missing from the
/// actual dump; every bucket present must still match.
pub fn compare_retained(
    exp_dump: &Path,
    act_dump: &Path,
    exp_dlq: &Path,
    act_dlq: &Path,
    watermarks: &Path,
) -> String {
    compare_with(exp_dump, act_dump, exp_dlq, act_dlq, Some(watermarks))
}

fn compare_with(
    exp_dump: &Path,
    act_dump: &Path,
    exp_dlq: &Path,
    act_dlq: &Path,
    watermarks: Option<&Path>,
) -> String {
    let mut cmd = Command::new("python3");
    cmd.arg(conformance_dir().join("compare.py"))
        .arg(exp_dump)
        .arg(act_dump)
        .arg("--dlq")
        .arg(exp_dlq)
        .arg(act_dlq);
    if let Some(w) = watermarks {
        cmd.arg("--watermarks").arg(w);
    }
    let out = cmd.output().expect("python3 runs");
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "results differ from the oracle:\n{report}"
    );
    report
}

pub fn loadgen(out: &Path, args: &[&str]) {
    run_ok(canopy().arg("loadgen").arg("--out").arg(out).args(args));
}
