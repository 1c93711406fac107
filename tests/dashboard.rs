//! The dashboard in a real headless browser (Debian's chromium), as an operator uses it
//! (issue 26): exact numbers above 2^63, the tree following the URL with its path expanded,
//! breadcrumbs, a chart with axes in the tenant's local time, clear errors for a token that
//! cannot read a tenant, the token kept out of the URL, and the overview with the engine panel
//! of a running `canopy demo`. Screenshots are kept as CI artifacts in `target/ci-artifacts/`:
//!
//! - `dashboard.png` and `overview.png`: the demo's overview (engine panel, tenants);
//! - `node.png`: a deep node of the demo with its path expanded and its live chart;
//! - `chart.png`: a root of the conformance case with an hourly chart of a metric's sum.
//!
//! Without chromium the tests say so and pass, unless `CANOPY_TEST_REQUIRE_CHROMIUM=1` (set by
//! `.ci/run`, which installs it), where a missing browser is a failure.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::http::{enc, Served};
use support::*;

fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("CANOPY_TEST_REQUIRE_CHROMIUM").is_err(),
            "CANOPY_TEST_REQUIRE_CHROMIUM is set but chromium is not installed"
        );
        // Past libtest's capture, so that the skip shows.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED dashboard browser test: chromium is not installed (apt-get install chromium)\n",
        );
    }
    found
}

struct Browser {
    bin: PathBuf,
    dir: tempfile::TempDir,
    runs: usize,
}

impl Browser {
    fn new(bin: PathBuf) -> Self {
        Browser {
            bin,
            dir: tempfile::tempdir().unwrap(),
            runs: 0,
        }
    }

    /// Loads `url` in a fresh profile (a new tab: no token kept from before) and returns the
    /// output; `extra` says what to produce (`--dump-dom`, `--screenshot=...`).
    fn run(&mut self, extra: &[&str], url: &str, height: u32) -> std::process::Output {
        self.runs += 1;
        let profile = self.dir.path().join(format!("profile{}", self.runs));
        let out = Command::new(&self.bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                &format!("--window-size=1280,{height}"),
                // The page polls every 2 s; virtual time lets its first rounds happen.
                "--virtual-time-budget=8000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .output()
            .expect("chromium runs");
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn dom(&mut self, url: &str) -> String {
        let out = self.run(&["--dump-dom"], url, 900);
        let dom = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(dom.contains("<html"), "no page: {}", tail(&dom, 500));
        dom
    }

    /// Saves a screenshot of `url` as `target/ci-artifacts/<name>`.
    fn screenshot(&mut self, url: &str, name: &str, height: u32) -> PathBuf {
        let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-artifacts");
        std::fs::create_dir_all(&artifacts).unwrap();
        let shot = artifacts.join(name);
        let _ = std::fs::remove_file(&shot);
        self.run(&[&format!("--screenshot={}", shot.display())], url, height);
        let png = std::fs::read(&shot).expect("screenshot written");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{name} is not a real screenshot"
        );
        shot
    }
}

/// Digits grouped by threes with commas, as the page shows every number (any sign, any size).
fn grouped(n: &str) -> String {
    let (sign, digits) = n.strip_prefix('-').map_or(("", n), |d| ("-", d));
    let mut out = String::from(sign);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The part of `dom` from the element with `id` to the next `end`.
fn part<'a>(dom: &'a str, id: &str, end: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{}", tail(dom, 3000)));
    let rest = &dom[start..];
    &rest[..rest.find(end).unwrap_or(rest.len())]
}

/// The public conformance case plus a tenant whose sums exceed 2^63 (and 2^64): 128-bit sums
/// and 64-bit extremes, which a JavaScript `Number` cannot hold.
fn big_input(dir: &Path) -> PathBuf {
    let mut text = std::fs::read_to_string(conformance_dir().join("input.ndjson")).unwrap();
    text.push_str(
        r#"{"type":"define_tenant","tenant":"big","timezone":"Asia/Kolkata"}
{"type":"define_hierarchy","tenant":"big","hierarchy":"h","mode":"current"}
{"type":"upsert_node","tenant":"big","hierarchy":"h","node":"r"}
{"type":"upsert_node","tenant":"big","hierarchy":"h","node":"c","parent":"r"}
{"type":"upsert_node","tenant":"big","hierarchy":"h","node":"g","parent":"c"}
{"type":"upsert_node","tenant":"big","hierarchy":"h","node":"g2","parent":"c"}
"#,
    );
    for i in 0..3 {
        text.push_str(&format!(
            "{{\"type\":\"event\",\"tenant\":\"big\",\"event_id\":\"b{i}\",\"entity\":\"g\",\"ts\":\"2026-11-21T10:0{i}:00Z\",\"metrics\":{{\"v\":{},\"w\":{}}}}}\n",
            i64::MAX,
            i64::MIN
        ));
    }
    let p = dir.join("input.ndjson");
    std::fs::write(&p, text).unwrap();
    p
}

fn serve(data: &Path, tokens: &str) -> Served {
    let mut cmd = canopy();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("CANOPY_API_TOKENS", tokens);
    Served::start(cmd)
}

#[test]
fn dashboard_shows_exact_numbers_the_path_and_a_chart_with_axes_in_chromium() {
    let Some(bin) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ingest(&big_input(dir.path()), &data, &[]);
    let s = serve(&data, "dash=*");
    let mut b = Browser::new(bin);

    // A leaf two levels down whose sums exceed 2^63: every digit, grouped.
    let url = format!(
        "http://{}/?token=dash&tenant=big&hierarchy=h&node=g",
        s.addr
    );
    let dom = b.dom(&url);
    let sub = part(&dom, "subtree-table", "</table>");
    let v_sum = (i64::MAX as i128 * 3).to_string();
    let w_sum = (i64::MIN as i128 * 3).to_string();
    assert_eq!(v_sum, "27670116110564327421");
    for want in [
        grouped(&v_sum),
        grouped(&w_sum),
        grouped(&i64::MAX.to_string()),
        grouped(&i64::MIN.to_string()),
    ] {
        assert!(
            sub.contains(&format!(">{want}</td>")),
            "subtree table lacks {want}: {sub}"
        );
    }
    // The path is expanded and the node highlighted; breadcrumbs link every ancestor; the
    // leaf has no expand arrow, its parent is a link.
    let tree = part(&dom, "tree-root", "</section>");
    assert!(
        tree.contains(
            r#"<li data-node="r"><span class="toggle" role="button" title="collapse">▾</span>"#
        ),
        "root not expanded: {tree}"
    );
    assert!(
        tree.contains(
            r#"<li data-node="c"><span class="toggle" role="button" title="collapse">▾</span>"#
        ),
        "parent not expanded: {tree}"
    );
    assert!(
        tree.contains(r#"<li data-node="g"><span class="leaf"></span><a href="?tenant=big&amp;hierarchy=h&amp;node=g" class="node sel""#),
        "leaf not highlighted or with an arrow: {tree}"
    );
    assert!(tree.contains(r#"<li data-node="g2"><span class="leaf"></span>"#));
    let crumbs = part(&dom, "crumbs", "</nav>");
    for a in ["r", "c"] {
        assert!(
            crumbs.contains(&format!("node={a}\">{a}</a>")),
            "breadcrumbs lack {a}: {crumbs}"
        );
    }
    assert!(part(&dom, "node-facts", "</p>").contains("node=c\">c</a>"));
    // The token is out of the URL after first use.
    assert!(
        !dom.contains("token=dash"),
        "the token stays in the page's URL"
    );
    assert!(dom.contains(r#"id="permalink" href="?tenant=big&amp;hierarchy=h&amp;node=g""#));

    // The overview: tenants and hierarchies with totals, exact.
    let dom = b.dom(&format!("http://{}/?token=dash", s.addr));
    let table = part(&dom, "tenant-table", "</table>");
    assert!(
        table.contains(&format!("v Σ {}", grouped(&v_sum))),
        "overview lacks the exact total: {table}"
    );
    let hs = s.get("/v1/tenants/t0/hierarchies", Some("dash")).json();
    for h in hs["hierarchies"].as_array().unwrap() {
        let name = h["hierarchy"].as_str().unwrap();
        let roots = s
            .get(
                &format!("/v1/tenants/t0/hierarchies/{}/roots?limit=1000", enc(name)),
                Some("dash"),
            )
            .json();
        let total: u64 = roots["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["subtree"]["events"].as_u64().unwrap())
            .sum();
        let row = format!("data-tenant=\"t0\" data-hierarchy=\"{name}\"");
        let at = table.find(&row).unwrap_or_else(|| panic!("no row {row}"));
        let row_html = &table[at..at + table[at..].find("</tr>").unwrap()];
        assert!(
            row_html.contains(&format!(">{}</td>", grouped(&total.to_string()))),
            "t0/{name} total {total}: {row_html}"
        );
    }
    assert!(part(&dom, "engine-body", "</div>").contains("No engine runs in this process"));

    // A chart with axes: hourly sums of a metric of a root of t0 (Asia/Seoul), labelled in
    // the tenant's local time. The data is weeks old: no bucket is open.
    let root = s.first_root("t0", "h0", Some("dash"))["node"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!(
        "http://{}/?token=dash&tenant=t0&hierarchy=h0&node={}&gran=hour&metric=amount&stat=sum",
        s.addr,
        enc(&root)
    );
    let dom = b.dom(&url);
    let chart = part(&dom, "chart", "</svg>");
    assert!(chart.contains("<polyline"), "no line: {chart}");
    assert!(
        chart.matches("class=\"xtick\"").count() >= 2,
        "no time axis"
    );
    assert!(
        chart.matches("class=\"ytick\"").count() >= 2,
        "no value axis"
    );
    assert!(chart.contains("tenant's local time (UTC+09:00)"), "{chart}");
    assert!(chart.contains(">sum of amount</text>"), "{chart}");
    assert!(!chart.contains("partial"), "an old bucket marked open");
    let series = s
        .get(
            &format!(
                "/v1/tenants/t0/hierarchies/h0/nodes/{}/series?granularity=hour",
                enc(&root)
            ),
            Some("dash"),
        )
        .json();
    let first = series["buckets"][0]["start"].as_str().unwrap();
    assert!(first.ends_with("+09:00"), "{first}");
    // The first x label is the first bucket's local hour, as the tenant's zone has it.
    let label = format!("{}-{} {}:00", &first[5..7], &first[8..10], &first[11..13]);
    assert!(
        chart.contains(&format!(">{label}</text>")),
        "no {label}: {chart}"
    );
    assert!(dom.contains(r#"<select id="stat">"#), "no statistic choice");
    b.screenshot(&url, "chart.png", 1000);
}

#[test]
fn dashboard_says_which_tenant_a_token_cannot_read_in_chromium() {
    let Some(bin) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ingest(&big_input(dir.path()), &data, &[]);
    let s = serve(&data, "dash=*,bigonly=big");
    let mut b = Browser::new(bin);

    // A link to a tenant this token may not read: a message, not "connecting…" forever.
    let dom = b.dom(&format!(
        "http://{}/?token=bigonly&tenant=t1&hierarchy=h0",
        s.addr
    ));
    let err = part(&dom, "error", "</div>");
    assert!(
        err.starts_with("id=\"error\" role=\"alert\">")
            && err.contains("This token cannot read tenant t1"),
        "no clear error: {err}"
    );
    assert!(err.contains("tenants of this token: big"), "{err}");
    assert!(!part(&dom, "fresh", "</span>").contains("connecting"));
    assert!(!dom.contains("token=bigonly"), "the token stays in the URL");

    // An unknown token: said so, and a form to enter another (a password field).
    let dom = b.dom(&format!("http://{}/?token=nope&tenant=big", s.addr));
    let err = part(&dom, "error", "</div>");
    assert!(err.contains("This token was refused"), "{err}");
    assert!(
        dom.contains(r#"<form id="signin">"#),
        "no sign-in form shown"
    );
    assert!(dom.contains(r#"<input id="token" type="password""#));

    // No token at all: asked for one.
    let dom = b.dom(&format!("http://{}/", s.addr));
    assert!(part(&dom, "error", "</div>").contains("Enter an API token"));

    // A node that does not exist in a readable tenant.
    let dom = b.dom(&format!(
        "http://{}/?token=bigonly&tenant=big&hierarchy=h&node=nobody",
        s.addr
    ));
    assert!(
        part(&dom, "error", "</div>")
            .contains("cannot read node nobody of big/h, or it does not exist"),
        "{}",
        part(&dom, "error", "</div>")
    );
}

/// Walks from a root down the first child to a leaf: the deepest path the demo has there.
fn deepest(s: &Served, tok: Option<&str>, t: &str, h: &str, root: &str) -> Vec<String> {
    let mut path = vec![root.to_string()];
    loop {
        let n = s
            .get(
                &format!(
                    "/v1/tenants/{}/hierarchies/{}/nodes/{}",
                    enc(t),
                    enc(h),
                    enc(path.last().unwrap())
                ),
                tok,
            )
            .json();
        let mut kids: Vec<String> = n["children"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        kids.sort();
        match kids.into_iter().next() {
            Some(k) => path.push(k),
            None => return path,
        }
    }
}

#[test]
fn dashboard_overview_and_deep_node_of_a_running_demo_in_chromium() {
    let Some(bin) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = canopy();
    cmd.args(["demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("CANOPY_DEMO_RECORDS_PER_SEC", "3000");
    let mut s = Served::start(cmd);
    let tok = Some("demo");
    let started = Instant::now();
    // Numbers, and a second checkpoint (so that the engine panel has a rate and an age).
    loop {
        assert!(started.elapsed() < Duration::from_secs(120), "no numbers");
        std::thread::sleep(Duration::from_millis(500));
        let e = s.get("/v1/engine", tok);
        if e.status == 200
            && e.json()["checkpoint_seq"].as_u64().unwrap_or(0) >= 3
            && e.json()["records_per_sec"].as_u64().unwrap_or(0) > 0
        {
            break;
        }
    }
    let mut b = Browser::new(bin);

    let url = format!("http://{}/?token=demo", s.addr);
    let dom = b.dom(&url);
    let engine = part(&dom, "engine-body", "</section>");
    for want in [
        "records / s",
        "last checkpoint",
        "dead letters",
        "resident node actors",
        "restarts (node / tenant)",
        "id=\"dead-letters\"",
    ] {
        assert!(engine.contains(want), "engine panel lacks {want}: {engine}");
    }
    let fresh = part(&dom, "fresh", "</span></span>");
    assert!(
        fresh.contains("checkpoint #")
            && fresh.contains(" old ")
            && fresh.contains("class=\"badge ok\">live"),
        "{fresh}"
    );
    let tenants = s.get("/v1/tenants", tok).json();
    let table = part(&dom, "tenant-table", "</table>");
    for t in tenants["tenants"].as_array().unwrap() {
        let t = t.as_str().unwrap();
        assert!(
            table.contains(&format!("data-tenant=\"{t}\" data-hierarchy=\"h0\"")),
            "overview lacks {t}/h0"
        );
    }
    b.screenshot(&url, "overview.png", 900);
    b.screenshot(&url, "dashboard.png", 900);

    // A deep node: its whole path expanded, itself highlighted, its live chart with the
    // open minute marked partial.
    let t = tenants["tenants"][0].as_str().unwrap().to_string();
    let root = s.first_root(&t, "h0", tok)["node"]
        .as_str()
        .unwrap()
        .to_string();
    let path = deepest(&s, tok, &t, "h0", &root);
    assert!(path.len() >= 5, "the demo's trees are deep: {path:?}");
    let leaf = path.last().unwrap();
    let url = format!(
        "http://{}/?token=demo&tenant={}&hierarchy=h0&node={}",
        s.addr,
        enc(&t),
        enc(leaf)
    );
    let dom = b.dom(&url);
    let tree = part(&dom, "tree-root", "</section>");
    for a in &path[..path.len() - 1] {
        assert!(
            tree.contains(&format!(
                "<li data-node=\"{a}\"><span class=\"toggle\" role=\"button\" title=\"collapse\">▾</span>"
            )),
            "{a} on the path is not expanded"
        );
    }
    assert!(
        tree.contains(&format!("class=\"node sel\" data-node=\"{leaf}\"")),
        "{leaf} not highlighted"
    );
    let crumbs = part(&dom, "crumbs", "</nav>");
    for a in &path[..path.len() - 1] {
        assert!(
            crumbs.contains(&format!(">{a}</a>")),
            "breadcrumbs lack {a}"
        );
    }
    assert!(part(&dom, "chart", "</svg>").contains("class=\"xtick\""));
    b.screenshot(&url, "node.png", 1000);

    // The root takes events every second: its newest minute is open and marked partial (a
    // leaf may have none in the current minute). Just after a minute turns, the newest
    // checkpointed bucket can be the one that just ended: a few tries.
    let url = format!(
        "http://{}/?token=demo&tenant={}&hierarchy=h0&node={}",
        s.addr,
        enc(&t),
        enc(&root)
    );
    let mut chart = String::new();
    for _ in 0..3 {
        chart = part(&b.dom(&url), "chart", "</svg>").to_string();
        if chart.contains("class=\"partial\"") {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(
        chart.contains("class=\"partial\"") && chart.contains("id=\"partial-label\""),
        "the open minute is not marked partial: {chart}"
    );

    let status = s.terminate();
    assert!(status.success(), "demo exit status after SIGTERM: {status}");
}
