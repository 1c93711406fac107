//! Shared helpers for the integration tests: run the real `canopy` binary, compute the
//! expected results with the reference model (`canopy-model`, docs/SPEC.md section 11), and
//! compare. When `../shared/conformance` sits beside the repository, `oracle.py` and
//! `compare.py` there are run as well; without it, those comparisons are skipped and the run
//! says so on stderr.

#![allow(dead_code)]

pub mod http;
pub mod tansu;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn canopy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_canopy"))
}

/// The repository's copy of the public conformance case: `input.ndjson`,
/// `expected-dump.ndjson`, `expected-dlq.ndjson`.
pub fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conformance")
}

/// `../shared/conformance` (with `oracle.py` and `compare.py`) when it sits beside the
/// repository. Without it, says once per test binary what is skipped.
pub fn shared_conformance() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance");
    if d.join("oracle.py").exists() && d.join("compare.py").exists() {
        return Some(d);
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        // Straight to the process's stderr: the test harness captures `eprintln!` of passing
        // tests, and this line must show.
        let _ = writeln!(
            std::io::stderr(),
            "skipped: oracle.py and compare.py comparisons in {} (../shared/conformance not found); \
             results are compared with the Rust reference model only",
            std::env::current_exe()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default()
        );
    });
    None
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

/// The expected results for `input`: (dump, dead letters), from the reference model. When
/// `../shared/conformance` is there, `oracle.py` runs too and must agree with the model.
pub fn expected(input: &Path) -> (PathBuf, PathBuf) {
    let (d, q, _) = expected_with_watermarks(input);
    (d, q)
}

/// [`expected`], also writing the tenants' final watermarks: (dump, dead letters, watermarks),
/// for [`compare_retained`].
pub fn expected_with_watermarks(input: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (exp, files) = fold_with_model(input);
    if let Some(shared) = shared_conformance() {
        model_agrees_with_oracle(&shared, input, &exp);
    }
    files
}

/// The model's expected results alone, for inputs where `oracle.py` is known to differ from
/// docs/SPEC.md (MessagePack lines): (dump, dead letters).
pub fn model_expected(input: &Path) -> (PathBuf, PathBuf) {
    let (_, (d, q, _)) = fold_with_model(input);
    (d, q)
}

fn fold_with_model(input: &Path) -> (canopy_model::Expected, (PathBuf, PathBuf, PathBuf)) {
    let exp = canopy_model::fold(&std::fs::read(input).expect("input readable"));
    let d = input.with_extension("model.dump.ndjson");
    let q = input.with_extension("model.dlq.ndjson");
    let w = input.with_extension("model.watermarks.json");
    std::fs::write(&d, exp.dump_text()).unwrap();
    std::fs::write(&q, exp.dead_letters_text()).unwrap();
    std::fs::write(&w, exp.watermarks_text()).unwrap();
    (exp, (d, q, w))
}

/// Runs `oracle.py` on `input` and checks that the model computed the same dump, dead letters
/// and watermarks.
fn model_agrees_with_oracle(shared: &Path, input: &Path, exp: &canopy_model::Expected) {
    let d = input.with_extension("oracle.dump.ndjson");
    let q = input.with_extension("oracle.dlq.ndjson");
    let w = input.with_extension("oracle.watermarks.json");
    run_ok(
        Command::new("python3")
            .arg(shared.join("oracle.py"))
            .arg(input)
            .arg("--dump")
            .arg(&d)
            .arg("--dlq")
            .arg(&q)
            .arg("--watermarks")
            .arg(&w),
    );
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let oracle = canopy_model::load_dump(&read(&d), "oracle dump").unwrap();
    let model = canopy_model::load_dump(&exp.dump_text(), "model dump").unwrap();
    let oracle_dl = canopy_model::load_dead_letters(&read(&q), "oracle dlq").unwrap();
    let model_dl = canopy_model::load_dead_letters(&exp.dead_letters_text(), "model dlq").unwrap();
    if let Err(e) = canopy_model::compare(oracle, &model, &oracle_dl, &model_dl, None) {
        panic!(
            "the model disagrees with oracle.py on {}:\n{e}",
            input.display()
        );
    }
    // oracle.py converts through a float: a watermark may be 1 ms lower there.
    let oracle_wm = canopy_model::load_watermarks(&read(&w)).expect("oracle watermarks");
    let close = oracle_wm.len() == exp.watermarks.len()
        && oracle_wm
            .iter()
            .all(|(t, ms)| exp.watermarks.get(t).is_some_and(|m| (m - ms).abs() <= 1));
    assert!(
        close,
        "watermarks: oracle.py {oracle_wm:?}, model {:?}",
        exp.watermarks
    );
}

/// Compares an engine's dump and dead letters with the expected ones (the model's rules of
/// `compare.py`), and with `compare.py` itself when `../shared/conformance` is there; panics
/// with the report when they differ.
pub fn compare(exp_dump: &Path, act_dump: &Path, exp_dlq: &Path, act_dlq: &Path) -> String {
    compare_with(exp_dump, act_dump, exp_dlq, act_dlq, None)
}

/// [`compare`] with the tenants' final watermarks: buckets that fell out of retention may be
/// missing from the actual dump; every bucket present must still match.
pub fn compare_retained(
    exp_dump: &Path,
    act_dump: &Path,
    exp_dlq: &Path,
    act_dlq: &Path,
    watermarks: &Path,
) -> String {
    compare_with(exp_dump, act_dump, exp_dlq, act_dlq, Some(watermarks))
}

/// [`compare`] without `compare.py`, for results of [`model_expected`].
pub fn compare_model_only(
    exp_dump: &Path,
    act_dump: &Path,
    exp_dlq: &Path,
    act_dlq: &Path,
) -> String {
    compare_rust(exp_dump, act_dump, exp_dlq, act_dlq, None)
}

fn compare_with(
    exp_dump: &Path,
    act_dump: &Path,
    exp_dlq: &Path,
    act_dlq: &Path,
    watermarks: Option<&Path>,
) -> String {
    let report = compare_rust(exp_dump, act_dump, exp_dlq, act_dlq, watermarks);
    if let Some(shared) = shared_conformance() {
        compare_py(&shared, exp_dump, act_dump, exp_dlq, act_dlq, watermarks);
    }
    report
}

/// The model's comparison (`compare.py`'s rules); panics with the report when they differ.
fn compare_rust(
    exp_dump: &Path,
    act_dump: &Path,
    exp_dlq: &Path,
    act_dlq: &Path,
    watermarks: Option<&Path>,
) -> String {
    let read =
        |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let name = |p: &Path| p.display().to_string();
    let wm = watermarks.map(|w| canopy_model::load_watermarks(&read(w)).expect("watermarks"));
    let result = canopy_model::compare(
        canopy_model::load_dump(&read(exp_dump), &name(exp_dump)).unwrap(),
        &canopy_model::load_dump(&read(act_dump), &name(act_dump)).unwrap(),
        &canopy_model::load_dead_letters(&read(exp_dlq), &name(exp_dlq)).unwrap(),
        &canopy_model::load_dead_letters(&read(act_dlq), &name(act_dlq)).unwrap(),
        wm.as_ref(),
    );
    match result {
        Ok(matched) => matched.to_string(),
        Err(e) => panic!("results differ from the expected ones:\n{e}"),
    }
}

/// `compare.py` of `../shared/conformance`; panics with its report when the results differ.
fn compare_py(
    shared: &Path,
    exp_dump: &Path,
    act_dump: &Path,
    exp_dlq: &Path,
    act_dlq: &Path,
    watermarks: Option<&Path>,
) {
    let mut cmd = Command::new("python3");
    cmd.arg(shared.join("compare.py"))
        .arg(exp_dump)
        .arg(act_dump)
        .arg("--dlq")
        .arg(exp_dlq)
        .arg(act_dlq);
    if let Some(w) = watermarks {
        cmd.arg("--watermarks").arg(w);
    }
    let out = cmd.output().expect("python3 runs");
    assert!(
        out.status.success(),
        "compare.py: results differ:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn loadgen(out: &Path, args: &[&str]) {
    run_ok(canopy().arg("loadgen").arg("--out").arg(out).args(args));
}
