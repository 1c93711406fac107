//! The dashboard in a real headless browser (Debian's chromium): the page loads, shows the tree
//! with numbers that match the API, and draws a chart. The screenshot is kept as a CI artifact
//! in `target/ci-artifacts/dashboard.png`.
//!
//! Without chromium the test says so and passes, unless `CANOPY_TEST_REQUIRE_CHROMIUM=1` (set by
//! `.ci/run`, which installs it), where a missing browser is a failure.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::http::{enc, Served};
use support::*;

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn headless(browser: &Path, profile: &Path, extra: &[&str], url: &str) -> std::process::Output {
    Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs")
}

/// Group digits like the page's `toLocaleString("en-US")`.
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn dashboard_renders_tree_numbers_and_chart_in_chromium() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("CANOPY_TEST_REQUIRE_CHROMIUM").is_err(),
            "CANOPY_TEST_REQUIRE_CHROMIUM is set but chromium is not installed"
        );
        // Past libtest's capture, so that the skip shows.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED dashboard browser test: chromium is not installed (apt-get install chromium)\n",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ingest(&conformance_dir().join("input.ndjson"), &data, &[]);
    let mut cmd = canopy();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("CANOPY_API_TOKENS", "dash=*");
    let s = Served::start(cmd);
    let tok = Some("dash");
    let t = s.get("/v1/tenants", tok).json()["tenants"][0]
        .as_str()
        .unwrap()
        .to_string();
    let hs = s
        .get(&format!("/v1/tenants/{}/hierarchies", enc(&t)), tok)
        .json();
    let h = hs["hierarchies"][0]["hierarchy"]
        .as_str()
        .unwrap()
        .to_string();
    let roots = s
        .get(
            &format!("/v1/tenants/{}/hierarchies/{}/roots", enc(&t), enc(&h)),
            tok,
        )
        .json();
    let root = roots["items"][0]["node"].as_str().unwrap().to_string();
    let url = format!(
        "http://{}/?token=dash&tenant={}&hierarchy={}&node={}",
        s.addr,
        enc(&t),
        enc(&h),
        enc(&root)
    );

    let profile = dir.path().join("profile");
    let out = headless(&browser, &profile, &["--dump-dom"], &url);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dom.contains("<html"),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every root is in the tree with its subtree events as the API has them.
    for item in roots["items"].as_array().unwrap() {
        let n = item["node"].as_str().unwrap();
        let events = grouped(item["subtree"]["events"].as_u64().unwrap());
        let needle = format!("data-node=\"{n}\">{n} <span class=\"num\">{events}</span>");
        assert!(
            dom.contains(&needle),
            "tree lacks {needle}\n{}",
            tail(&dom, 3000)
        );
    }
    // The selected node's detail: its subtree events, and a chart with a line.
    let node = s
        .get(
            &format!(
                "/v1/tenants/{}/hierarchies/{}/nodes/{}",
                enc(&t),
                enc(&h),
                enc(&root)
            ),
            tok,
        )
        .json();
    let ev = grouped(node["subtree"]["events"].as_u64().unwrap());
    assert!(
        dom.contains(&format!(
            "<div id=\"subtree\"><table><tr><th>events</th><td>{ev}</td>"
        )),
        "detail lacks subtree events {ev}"
    );
    assert!(
        dom.contains("id=\"chart\"") && dom.contains("<polyline"),
        "no chart drawn"
    );

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = headless(
        &browser,
        &profile,
        &[&format!("--screenshot={}", shot.display())],
        &url,
    );
    assert!(
        out.status.success(),
        "screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot is not a real PNG"
    );
}
