//! The query API against the public conformance case, through the real binary and real sockets:
//! every node's answer equals its row of the expected dump, auth, and bad parameters.

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use rand::prelude::*;
use serde::Deserialize;
use serde_json::value::RawValue;
use support::http::{enc, Served};
use support::*;

const TOKENS: &str = "root=*,tok-a=acme,tok-b=globex";

/// The conformance input ingested, then served with `canopy serve`.
fn serve_conformance(dir: &Path) -> Served {
    let data = dir.join("data");
    ingest(&conformance_dir().join("input.ndjson"), &data, &[]);
    let mut cmd = canopy();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("CANOPY_API_TOKENS", TOKENS);
    Served::start(cmd)
}

#[derive(Deserialize)]
struct NodeAnswer<'a> {
    tenant: String,
    hierarchy: String,
    node: String,
    parent: Option<String>,
    children: Vec<String>,
    #[serde(borrow)]
    own: &'a RawValue,
    #[serde(borrow)]
    subtree: &'a RawValue,
    as_of: u64,
}

#[derive(Deserialize)]
struct Items {
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    node: String,
}

#[derive(Deserialize)]
struct Series<'a> {
    #[serde(borrow)]
    buckets: Vec<Bucket<'a>>,
}

#[derive(Deserialize)]
struct Bucket<'a> {
    start: String,
    events: u64,
    #[serde(borrow)]
    metrics: &'a RawValue,
}

fn ok(r: support::http::Reply, what: &str) -> String {
    assert_eq!(r.status, 200, "{what}: {}", r.body);
    r.body
}

/// Walks every tenant → hierarchy → roots → children through the API and writes what it
/// reads as dump rows (docs/SPEC.md §8), to be compared with the expected dump.
fn dump_via_api(s: &Served) -> (String, usize) {
    let tok = Some("root");
    let tenants: serde_json::Value = s.get("/v1/tenants", tok).json();
    let mut out = String::new();
    let mut nodes = 0;
    for t in tenants["tenants"].as_array().unwrap() {
        let t = t.as_str().unwrap();
        let hs = s
            .get(&format!("/v1/tenants/{}/hierarchies", enc(t)), tok)
            .json();
        for h in hs["hierarchies"].as_array().unwrap() {
            let h = h["hierarchy"].as_str().unwrap();
            let base = format!("/v1/tenants/{}/hierarchies/{}", enc(t), enc(h));
            let roots: Items = serde_json::from_str(&ok(
                s.get(&format!("{base}/roots?limit=1000"), tok),
                "roots",
            ))
            .unwrap();
            let mut stack: Vec<(String, Option<String>)> =
                roots.items.into_iter().map(|i| (i.node, None)).collect();
            let mut listed = 0;
            while let Some((n, listed_parent)) = stack.pop() {
                let nb = format!("{base}/nodes/{}", enc(&n));
                let body = ok(s.get(&nb, tok), "node");
                let a: NodeAnswer = serde_json::from_str(&body).unwrap();
                assert_eq!(
                    (a.tenant.as_str(), a.hierarchy.as_str(), a.node.as_str()),
                    (t, h, n.as_str())
                );
                assert_eq!(
                    a.parent, listed_parent,
                    "{nb}: parent differs from the listing"
                );
                assert!(a.as_of > 0);
                let kids: Items = serde_json::from_str(&ok(
                    s.get(&format!("{nb}/children?limit=1000"), tok),
                    "children",
                ))
                .unwrap();
                let mut listed_kids: Vec<String> = kids.items.into_iter().map(|i| i.node).collect();
                listed_kids.sort();
                let mut node_kids = a.children.clone();
                node_kids.sort();
                assert_eq!(
                    node_kids, listed_kids,
                    "{nb}: children differ between endpoints"
                );
                let mut buckets = String::new();
                for g in ["minute", "hour", "day"] {
                    let body = ok(
                        s.get(&format!("{nb}/series?granularity={g}"), tok),
                        "series",
                    );
                    let ser: Series = serde_json::from_str(&body).unwrap();
                    let mut one = String::new();
                    for b in &ser.buckets {
                        if !one.is_empty() {
                            one.push(',');
                        }
                        write!(
                            one,
                            "{}:{{\"events\":{},\"metrics\":{}}}",
                            serde_json::to_string(&b.start).unwrap(),
                            b.events,
                            b.metrics.get()
                        )
                        .unwrap();
                    }
                    if !buckets.is_empty() {
                        buckets.push(',');
                    }
                    write!(buckets, "\"{g}\":{{{one}}}").unwrap();
                }
                writeln!(
                    out,
                    "{{\"tenant\":{},\"hierarchy\":{},\"node\":{},\"parent\":{},\"own\":{},\"subtree\":{},\"buckets\":{{{buckets}}}}}",
                    serde_json::to_string(t).unwrap(),
                    serde_json::to_string(h).unwrap(),
                    serde_json::to_string(&n).unwrap(),
                    serde_json::to_string(&a.parent).unwrap(),
                    a.own.get(),
                    a.subtree.get(),
                )
                .unwrap();
                nodes += 1;
                listed += 1;
                for k in listed_kids {
                    stack.push((k, Some(n.clone())));
                }
            }
            assert_eq!(
                listed as u64,
                h_nodes(&hs, h),
                "{t}/{h}: nodes reachable from the roots vs the hierarchy's node count"
            );
        }
    }
    (out, nodes)
}

fn h_nodes(hs: &serde_json::Value, h: &str) -> u64 {
    hs["hierarchies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["hierarchy"] == h)
        .unwrap()["nodes"]
        .as_u64()
        .unwrap()
}

#[test]
fn every_node_and_series_answer_equals_the_expected_dump() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve_conformance(dir.path());
    let (rows, nodes) = dump_via_api(&s);
    let c = conformance_dir();
    let expected = std::fs::read_to_string(c.join("expected-dump.ndjson")).unwrap();
    assert_eq!(
        nodes,
        expected.lines().count(),
        "nodes reachable through the API"
    );
    let api_dump = dir.path().join("api-dump.ndjson");
    std::fs::write(&api_dump, rows).unwrap();
    let dlq = c.join("expected-dlq.ndjson");
    // The dead letters are not the API's business: compare them with themselves.
    compare(&c.join("expected-dump.ndjson"), &api_dump, &dlq, &dlq);
}

fn tenants_of_expected() -> Vec<String> {
    let text = std::fs::read_to_string(conformance_dir().join("expected-dump.ndjson")).unwrap();
    let mut t: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["tenant"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    t.sort();
    t.dedup();
    t
}

#[test]
fn auth_401_404_and_wildcard() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve_conformance(dir.path());
    let all = tenants_of_expected();
    assert!(all.len() >= 2, "the public case has several tenants");
    let (a, b) = (&all[0], &all[1]);
    // The fixture's tokens name `acme` and `globex`; point them at the case's own tenants.
    drop(s);
    let mut cmd = canopy();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("CANOPY_API_TOKENS", format!("root=*,tok-a={a}"));
    let s = Served::start(cmd);

    for path in [
        "/v1/tenants".to_string(),
        format!("/v1/tenants/{}/hierarchies", enc(a)),
    ] {
        let r = s.get(&path, None);
        assert_eq!(r.status, 401, "{path} without a token");
        assert_eq!(r.json()["error"]["code"], "unauthorized");
        let r = s.get(&path, Some("nope"));
        assert_eq!(r.status, 401, "{path} with an unknown token");
    }
    let listed = s.get("/v1/tenants", Some("root")).json();
    assert_eq!(
        listed["tenants"],
        serde_json::json!(all),
        "`*` lists every tenant"
    );
    let listed = s.get("/v1/tenants", Some("tok-a")).json();
    assert_eq!(
        listed["tenants"],
        serde_json::json!([a]),
        "a tenant token lists its tenant"
    );
    assert_eq!(
        s.get(
            &format!("/v1/tenants/{}/hierarchies", enc(a)),
            Some("tok-a")
        )
        .status,
        200
    );
    // Another tenant's data answers exactly like a tenant that does not exist.
    let missing = "no-such-tenant";
    let h = s.first_hierarchy(b, Some("root"));
    let n = s.first_root(b, &h, Some("root"))["node"]
        .as_str()
        .unwrap()
        .to_string();
    let paths = |t: &str| {
        vec![
            format!("/v1/tenants/{}/hierarchies", enc(t)),
            format!("/v1/tenants/{}/hierarchies/{}/roots", enc(t), enc(&h)),
            format!(
                "/v1/tenants/{}/hierarchies/{}/nodes/{}",
                enc(t),
                enc(&h),
                enc(&n)
            ),
            format!(
                "/v1/tenants/{}/hierarchies/{}/nodes/{}/series?granularity=day",
                enc(t),
                enc(&h),
                enc(&n)
            ),
            format!("/v1/tenants/{}/entities/{}", enc(t), enc(&n)),
        ]
    };
    for (forbidden, absent) in paths(b).iter().zip(paths(missing)) {
        let f = s.get(forbidden, Some("tok-a"));
        let m = s.get(&absent, Some("root"));
        assert_eq!((f.status, m.status), (404, 404), "{forbidden} / {absent}");
        assert_eq!(
            f.body.replacen(b.as_str(), "T", 1),
            m.body.replacen(missing, "T", 1),
            "a forbidden tenant must look like a missing one"
        );
        assert_eq!(
            s.get(forbidden, Some("root")).status,
            200,
            "{forbidden} with `*`"
        );
    }
}

/// Random, hostile query strings and path segments: the API answers 200, 400, 404 or 414 with
/// a JSON error, never a 5xx or a dropped connection.
#[test]
fn bad_parameters_get_400s_never_500s() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve_conformance(dir.path());
    let tenants = s.get("/v1/tenants", Some("root")).json();
    let t = tenants["tenants"][0].as_str().unwrap().to_string();
    let h = s.first_hierarchy(&t, Some("root"));
    let n = s.first_root(&t, &h, Some("root"))["node"]
        .as_str()
        .unwrap()
        .to_string();
    let node = format!(
        "/v1/tenants/{}/hierarchies/{}/nodes/{}",
        enc(&t),
        enc(&h),
        enc(&n)
    );

    // Named cases first: each must be a 400 with a specific code.
    let cases = [
        (format!("{node}/series?granularity=week"), "bad_granularity"),
        (format!("{node}/series"), "bad_query"),
        (
            format!(
                "{node}/series?granularity=hour&from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z"
            ),
            "bad_range",
        ),
        (
            format!("{node}/series?granularity=hour&from=yesterday"),
            "bad_time",
        ),
        (format!("{node}/children?limit=1000000"), "bad_limit"),
        (format!("{node}/children?limit=0"), "bad_limit"),
        (format!("{node}/children?limit=-1"), "bad_limit"),
        (format!("{node}/children?limit=ten"), "bad_limit"),
        (
            format!("{node}/children?limit=99999999999999999999999"),
            "bad_limit",
        ),
        (
            format!("{node}/children?sort=no_such_metric"),
            "unknown_metric",
        ),
        (format!("{node}/children?by=median"), "bad_query"),
        (format!("{node}/children?order=sideways"), "bad_query"),
        (format!("{node}/children?surprise=1"), "bad_query"),
    ];
    for (path, code) in &cases {
        let r = s.get(path, Some("root"));
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], *code, "{path}");
    }

    // A range of any width answers (stored buckets are bounded by retention): the same
    // buckets as no range at all.
    for g in ["minute", "hour", "day"] {
        let all = s.get(&format!("{node}/series?granularity={g}"), Some("root"));
        let wide = s.get(
            &format!(
                "{node}/series?granularity={g}&from=1970-01-01T00:00:00Z&to=2199-01-01T00:00:00Z"
            ),
            Some("root"),
        );
        assert_eq!((all.status, wide.status), (200, 200), "{g}: {}", wide.body);
        assert_eq!(all.json()["buckets"], wide.json()["buckets"], "{g}");
        assert_eq!(wide.json()["truncated"], false);
    }

    let keys = [
        "granularity",
        "from",
        "to",
        "sort",
        "by",
        "order",
        "limit",
        "x",
        "",
    ];
    let values = [
        "",
        "minute",
        "hour",
        "day",
        "DAY",
        "events",
        "amount",
        "sum",
        "max",
        "asc",
        "desc",
        "1",
        "0",
        "-5",
        "1000",
        "1001",
        "99999999999999999999999",
        "2026-11-01T00:00:00Z",
        "2026-13-45T99:99:99Z",
        "2026-11-01T00:00:00+25:00",
        "%00",
        "%ZZ",
        "%F0%9F%8C%B2",
        "%C3%28",
        "a%26b%3Dc",
        "NaN",
        "1e9",
        "%20",
        "'%22;--",
    ];
    let suffixes = ["", "/children", "/series"];
    let mut rng = StdRng::seed_from_u64(7);
    for i in 0..600 {
        let mut q = Vec::new();
        for _ in 0..rng.random_range(0..4) {
            let k = keys.choose(&mut rng).unwrap();
            let v = values.choose(&mut rng).unwrap();
            q.push(format!("{k}={v}"));
        }
        if rng.random_bool(0.1) {
            q.push("&&==&".into());
        }
        let seg = |rng: &mut StdRng, real: &str| -> String {
            match rng.random_range(0..6) {
                0 => values.choose(rng).unwrap().to_string(),
                1 => "%2F..%2F".into(),
                2 => "x".repeat(rng.random_range(200..5000)),
                _ => enc(real),
            }
        };
        let path = format!(
            "/v1/tenants/{}/hierarchies/{}/nodes/{}{}?{}",
            seg(&mut rng, &t),
            seg(&mut rng, &h),
            seg(&mut rng, &n),
            suffixes.choose(&mut rng).unwrap(),
            q.join("&")
        );
        let r = s.get(&path, Some("root"));
        assert!(
            // 414: three segments of up to 5,000 bytes pass `api.max_uri_bytes` (8 KiB).
            matches!(r.status, 200 | 400 | 404 | 414),
            "case {i}: {path} answered {}: {}",
            r.status,
            r.body
        );
        if r.status != 200 {
            let e = r.json();
            assert!(
                e["error"]["code"].is_string() && e["error"]["message"].is_string(),
                "{path}: {}",
                r.body
            );
        }
    }
    // Still serving after all of that.
    assert_eq!(s.get("/healthz", None).status, 200);
}

#[test]
fn openapi_document_is_served_and_committed() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve_conformance(dir.path());
    let served = s.get("/openapi.json", None);
    assert_eq!(served.status, 200);
    let committed_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/openapi.json");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert_eq!(
        served.body.trim(),
        committed.trim(),
        "schemas/openapi.json is stale: regenerate it with `canopy openapi > schemas/openapi.json`"
    );
    // Every /v1 route the server answers is documented, and every documented path answers.
    let doc: serde_json::Value = serde_json::from_str(&served.body).unwrap();
    let paths: BTreeMap<String, serde_json::Value> =
        serde_json::from_value(doc["paths"].clone()).unwrap();
    for p in [
        "/v1/tenants",
        "/v1/tenants/{tenant}/hierarchies",
        "/v1/tenants/{tenant}/hierarchies/{hierarchy}/roots",
        "/v1/tenants/{tenant}/hierarchies/{hierarchy}/nodes/{node}",
        "/v1/tenants/{tenant}/hierarchies/{hierarchy}/nodes/{node}/children",
        "/v1/tenants/{tenant}/hierarchies/{hierarchy}/nodes/{node}/series",
        "/v1/tenants/{tenant}/entities/{entity}",
    ] {
        assert!(paths.contains_key(p), "{p} is not documented");
    }
    for p in paths.keys() {
        let concrete = p
            .replace("{tenant}", "t")
            .replace("{hierarchy}", "h")
            .replace("{node}", "n")
            .replace("{entity}", "e");
        let r = s.get(&concrete, None);
        assert_eq!(
            r.status, 401,
            "{p} should exist and ask for a token: {}",
            r.body
        );
    }
    assert_eq!(s.get("/v1/nowhere", Some("root")).status, 404);
}

/// Every metric README's Observability section names is on `/metrics` from the start, at 0
/// when nothing happened yet (issue 26: five documented metrics were missing until they first
/// fired), and `canopy_checkpoint_rows` has row-count buckets, not seconds.
#[test]
fn metrics_lists_every_documented_metric_from_the_start() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("- **Metrics.**")
        .expect("README has a Metrics paragraph");
    let rest = &readme[start + 2..];
    let para = &rest[..rest.find("\n- **").unwrap_or(rest.len())];
    let mut documented: Vec<String> = para
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("canopy_") && w.len() > "canopy_".len())
        .map(str::to_string)
        .collect();
    documented.sort();
    documented.dedup();
    assert!(
        documented.len() >= 20,
        "README's metric list not found: {documented:?}"
    );

    // A store with one tenant and nothing else: `serve` starts, no engine ever runs.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("one.ndjson");
    std::fs::write(
        &input,
        "{\"type\":\"define_tenant\",\"tenant\":\"a\",\"timezone\":\"UTC\"}\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    ingest(&input, &data, &[]);
    let mut cmd = canopy();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("CANOPY_API_TOKENS", TOKENS);
    let s = Served::start(cmd);
    // The request metrics are labelled by route: one request gives them their first series.
    assert_eq!(s.get("/healthz", None).status, 200);
    let m = s.get("/metrics", None);
    assert_eq!(m.status, 200);
    let missing: Vec<&String> = documented
        .iter()
        .filter(|name| !m.body.contains(&format!("# TYPE {name} ")))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but not on /metrics at start: {missing:?}\n{}",
        m.body
    );
    for zero in [
        "canopy_actor_restarts_total{kind=\"node\"} 0",
        "canopy_tenants_parked 0",
        "canopy_tenants_parked_total 0",
        "canopy_records_skipped_total 0",
        "canopy_store_retries_total 0",
    ] {
        assert!(m.body.contains(zero), "no `{zero}` at start");
    }
    // Row-count buckets (1 .. 10^7), not the latency buckets (0.0005 .. 10 s).
    assert!(m
        .body
        .contains("canopy_checkpoint_rows_bucket{le=\"1000\"} 0"));
    assert!(!m
        .body
        .contains("canopy_checkpoint_rows_bucket{le=\"0.0005\"}"));
    // The engine panel's endpoint: a token is needed; `serve` runs no engine and says so.
    assert_eq!(s.get("/v1/engine", None).status, 401);
    let e = s.get("/v1/engine", Some("tok-a")).json();
    assert_eq!(e["engine"], false, "{e}");
    assert!(e["checkpoint_age_ms"].is_null() && !e["stale"].as_bool().unwrap());
}

/// `count_children=true` adds each listed node's number of children (the dashboard draws no
/// expand arrow on a leaf); without it the items are as before.
#[test]
fn ranked_lists_count_children_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve_conformance(dir.path());
    let tok = Some("root");
    let t = s.get("/v1/tenants", tok).json()["tenants"][0]
        .as_str()
        .unwrap()
        .to_string();
    let h = s.first_hierarchy(&t, tok);
    let base = format!("/v1/tenants/{}/hierarchies/{}", enc(&t), enc(&h));
    let plain = s.get(&format!("{base}/roots?limit=1000"), tok).json();
    assert!(plain["items"][0].get("children").is_none());
    let mut seen_inner = false;
    let roots = s
        .get(&format!("{base}/roots?limit=1000&count_children=true"), tok)
        .json();
    let root = roots["items"][0]["node"].as_str().unwrap().to_string();
    let kids = s
        .get(
            &format!(
                "{base}/nodes/{}/children?limit=1000&count_children=true",
                enc(&root)
            ),
            tok,
        )
        .json();
    for it in roots["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(kids["items"].as_array().unwrap())
    {
        let n = it["node"].as_str().unwrap();
        let node = s.get(&format!("{base}/nodes/{}", enc(n)), tok).json();
        let want = node["children"].as_array().unwrap().len() as u64;
        assert_eq!(it["children"].as_u64(), Some(want), "{n}");
        seen_inner |= want > 0;
    }
    assert!(seen_inner, "no node with children checked");
}
