//! Operator mistakes are named and change nothing (issue 24): commands that read a store
//! refuse a directory without one instead of creating an empty store; `ingest` checks its
//! input before creating the data directory; configuration errors exit 2 (README, "Exit
//! status"), `canopy config` included.

mod support;

use std::path::Path;
use std::process::Output;

use support::*;

fn expect_exit(out: &Output, code: i32, says: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(says), "stderr should say {says:?}: {err}");
}

/// Every path under `dir`, to show that nothing was created.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn commands_that_read_a_store_refuse_a_directory_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for d in [&missing, &empty] {
        for cmd in ["dump", "audit", "serve"] {
            let out = canopy()
                .args([cmd, "--data-dir"])
                .arg(d)
                .args(if cmd == "serve" {
                    &["--listen", "127.0.0.1:0"][..]
                } else {
                    &[][..]
                })
                .env("CANOPY_API_TOKENS", "t=*")
                .output()
                .unwrap();
            expect_exit(&out, 2, &format!("no canopy store in {}", d.display()));
            assert!(out.stdout.is_empty(), "{cmd}: nothing on stdout");
        }
    }
    assert!(!missing.exists(), "nothing created");
    assert_eq!(tree(dir.path()), vec![empty.display().to_string()]);
    // A real store is still read.
    let data = dir.path().join("data");
    ingest(&conformance_dir().join("input.ndjson"), &data, &[]);
    run_ok(canopy().arg("audit").arg("--data-dir").arg(&data));
}

#[test]
fn ingest_checks_its_input_before_creating_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for input in [dir.path().join("missing.ndjson"), dir.path().to_path_buf()] {
        let out = canopy()
            .args(["ingest", "--quiet", "--input"])
            .arg(&input)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        expect_exit(&out, 2, &format!("input {}", input.display()));
        assert!(!data.exists(), "no data directory for a bad input");
    }
}

#[test]
fn configuration_errors_exit_2_and_canopy_config_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ingest(&conformance_dir().join("input.ndjson"), &data, &[]);
    for (var, val, key) in [
        ("CANOPY_API_TOKENS", "no-equals-sign", "api.tokens"),
        ("CANOPY_API_TOKENS", "a=x,a=y", "api.tokens"),
        ("CANOPY_API_LISTEN", "127.0.0.1:99999", "api.listen"),
    ] {
        let out = canopy().arg("config").env(var, val).output().unwrap();
        expect_exit(&out, 2, key);
        let out = canopy()
            .args(["serve", "--data-dir"])
            .arg(&data)
            .env(var, val)
            .output()
            .unwrap();
        expect_exit(&out, 2, key);
    }
    let out = canopy()
        .args(["serve", "--listen", "127.0.0.1:99999", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    expect_exit(&out, 2, "api.listen");
    // The new HTTP limits are configuration keys, printed with their defaults.
    let out = run_ok(canopy().arg("config"));
    let text = String::from_utf8_lossy(&out.stdout);
    for key in [
        "max_connections = 512",
        "reserve_connections = 16",
        "header_read_timeout_ms = 10000",
        "idle_timeout_ms = 60000",
        "max_uri_bytes = 8192",
        "max_header_bytes = 16384",
        "max_headers = 100",
        "max_body_bytes = 65536",
    ] {
        assert!(text.contains(key), "`canopy config` lacks {key}: {text}");
    }
}
