//! The deployment files in `deploy/` (compose, Prometheus, Grafana, Kubernetes, Dockerfile),
//! parsed and checked for the structure that matters. Nothing here starts a container (the
//! development machines have no container engine): these checks are about names and wiring
//! that would otherwise only fail at `docker compose up` or `kubectl apply` time.
//!
//! Configuration names are not hard-coded: they come from the real binary's `canopy config`,
//! and the ConfigMap and the compose environment are fed back to `canopy config`, which
//! refuses unknown keys, unknown `CANOPY_*` variables and values of the wrong type.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

/// The metric names a dashboard may use (histograms also as `_bucket`, `_sum`, `_count`).
const METRICS: &[&str] = &[
    "canopy_records_total",
    "canopy_dead_letters_total",
    "canopy_duplicates_total",
    "canopy_deltas_sent_total",
    "canopy_events_coalesced_total",
    "canopy_actor_restarts_total",
    "canopy_tenants_parked_total",
    "canopy_tenants_parked",
    "canopy_records_skipped_total",
    "canopy_store_retries_total",
    "canopy_checkpoint_seconds",
    "canopy_checkpoint_rows",
    "canopy_store_commit_seconds",
    "canopy_consumer_lag",
    "canopy_api_request_seconds",
    "canopy_api_requests_total",
    "canopy_rebalances_total",
    "canopy_kafka_records_total",
];

/// The metrics the dashboard must show.
const DASHBOARD_MUST_SHOW: &[&str] = &[
    "canopy_records_total",
    "canopy_dead_letters_total",
    "canopy_duplicates_total",
    "canopy_deltas_sent_total",
    "canopy_events_coalesced_total",
    "canopy_actor_restarts_total",
    "canopy_checkpoint_seconds",
    "canopy_checkpoint_rows",
    "canopy_store_commit_seconds",
    "canopy_consumer_lag",
    "canopy_api_request_seconds",
    "canopy_api_requests_total",
];

const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

// ---------------------------------------------------------------------------------------------
// Helpers

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every document of a YAML file, as a JSON value (the files use string keys only).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let v = serde_yaml_ng::Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{} document {}: {e}", path.display(), i + 1));
        if matches!(v, serde_yaml_ng::Value::Null) {
            continue; // an empty document (a trailing `---`)
        }
        let j = serde_json::to_value(&v).unwrap_or_else(|e| {
            panic!(
                "{} document {}: not a plain tree: {e}",
                path.display(),
                i + 1
            )
        });
        docs.push(j);
    }
    docs
}

fn yaml_one(path: &Path) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{}: one YAML document", path.display());
    docs.remove(0)
}

fn files_with_ext(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    for entry in entries {
        let p = entry.expect("directory entry").path();
        if p.is_dir() {
            files_with_ext(&p, exts, out);
        } else if p
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| exts.contains(&x))
        {
            out.push(p);
        }
    }
    out.sort();
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A compose `command`/`entrypoint` or a container's `args`, as words.
fn words(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a.iter().map(text).collect(),
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// `canopy` with no inherited `CANOPY_*` variable (the test's own environment must not leak
/// into what the binary reports).
fn canopy() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_canopy"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CANOPY_") {
            cmd.env_remove(&k);
        }
    }
    cmd
}

/// `canopy [--config FILE] config` with extra environment; the printed tree.
fn canopy_config(file: Option<&Path>, env: &BTreeMap<String, String>) -> toml::Table {
    let mut cmd = canopy();
    if let Some(f) = file {
        cmd.arg("--config").arg(f);
    }
    cmd.arg("config").envs(env);
    let out = cmd.output().expect("canopy config starts");
    assert!(
        out.status.success(),
        "canopy config (file {file:?}, environment {env:?}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .parse::<toml::Table>()
        .expect("canopy config prints TOML")
}

fn leaf_keys(t: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in t {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) => leaf_keys(sub, &path, out),
            _ => {
                out.insert(path);
            }
        }
    }
}

fn toml_get<'a>(t: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut v = t.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

/// Every configuration key (dotted path) of `canopy config`.
fn config_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    leaf_keys(&canopy_config(None, &BTreeMap::new()), "", &mut keys);
    assert!(
        keys.contains("store.uri") && keys.contains("api.tokens"),
        "{keys:?}"
    );
    keys
}

/// `CANOPY_` + the dotted path upper-cased with `_` for `.`.
fn env_name(key: &str) -> String {
    format!("CANOPY_{}", key.replace('.', "_").to_uppercase())
}

/// The `CANOPY_*` variables canopy accepts: one per configuration key, plus `CANOPY_CONFIG`.
fn allowed_env() -> BTreeSet<String> {
    allowed_env_of(&config_keys())
}

fn allowed_env_of(keys: &BTreeSet<String>) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = keys.iter().map(|k| env_name(k)).collect();
    names.insert("CANOPY_CONFIG".to_string());
    names
}

fn check_canopy_env(what: &str, env: &BTreeMap<String, String>, allowed: &BTreeSet<String>) {
    for name in env.keys() {
        assert!(
            name.starts_with("CANOPY_"),
            "{what}: {name} is not a CANOPY_* variable"
        );
        assert!(
            allowed.contains(name),
            "{what}: {name} is not a configuration key's variable (known: {allowed:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Compose

fn compose(file: &str) -> Value {
    yaml_one(&deploy().join(file))
}

fn services(c: &Value) -> &serde_json::Map<String, Value> {
    c["services"].as_object().expect("a `services` mapping")
}

/// A service's `environment`, in map or list form.
fn environment(svc: &Value) -> BTreeMap<String, String> {
    match &svc["environment"] {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), text(v))).collect(),
        Value::Array(a) => a
            .iter()
            .map(|e| {
                let e = text(e);
                match e.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (e.clone(), String::new()),
                }
            })
            .collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("environment must be a mapping or a list: {other}"),
    }
}

/// Services that run the canopy image (they build it, or use an image named canopy).
fn runs_canopy(svc: &Value) -> bool {
    !svc["build"].is_null() || text(&svc["image"]).starts_with("canopy")
}

fn depends_on_condition(svc: &Value, on: &str) -> Option<String> {
    match &svc["depends_on"] {
        Value::Object(m) => m.get(on).map(|d| {
            let c = text(&d["condition"]);
            if c.is_empty() {
                "service_started".to_string()
            } else {
                c
            }
        }),
        Value::Array(a) => a
            .iter()
            .any(|d| d.as_str() == Some(on))
            .then(|| "service_started".to_string()),
        _ => None,
    }
}

/// Compose durations such as `60s`, `1m30s`, `2m`, in seconds.
fn duration_secs(s: &str) -> u64 {
    let mut total: u64 = 0;
    let mut n: u64 = 0;
    for c in s.chars() {
        match c {
            '0'..='9' => n = n * 10 + c.to_digit(10).unwrap() as u64,
            'h' => {
                total += n * 3600;
                n = 0;
            }
            'm' => {
                total += n * 60;
                n = 0;
            }
            's' => {
                total += n;
                n = 0;
            }
            _ => panic!("unexpected duration {s:?}"),
        }
    }
    total + n
}

/// Bind mounts of a service: (host path relative to deploy/, container path).
fn bind_mounts(svc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for v in svc["volumes"].as_array().into_iter().flatten() {
        match v {
            Value::String(s) => {
                let mut parts = s.splitn(3, ':');
                let src = parts.next().unwrap_or("");
                let dst = parts.next().unwrap_or("");
                if src.starts_with("./") || src.starts_with("../") || src.starts_with('/') {
                    out.push((src.to_string(), dst.to_string()));
                }
            }
            Value::Object(m) => {
                if m.get("type").and_then(Value::as_str) == Some("bind") {
                    out.push((text(&m["source"]), text(&m["target"])));
                }
            }
            _ => {}
        }
    }
    out
}

fn publishes(svc: &Value, port: u16) -> bool {
    let want = port.to_string();
    let mut found = false;
    for p in svc["ports"].as_array().into_iter().flatten() {
        let container: String = match p {
            Value::Object(m) => m.get("target").map(text).unwrap_or_default(),
            other => {
                // "HOST:CONTAINER[/PROTO]", "IP:HOST:CONTAINER", or "CONTAINER".
                let t = text(other);
                let last = t.rsplit(':').next().unwrap_or("").to_string();
                last.split('/').next().unwrap_or("").to_string()
            }
        };
        found |= container == want;
    }
    found
}

#[test]
fn compose_has_the_whole_stack() {
    let c = compose("compose.yaml");
    let svcs = services(&c);
    for name in [
        "scylla",
        "kafka",
        "kafka-init",
        "canopy-migrate",
        "canopy",
        "prometheus",
        "grafana",
    ] {
        assert!(
            svcs.contains_key(name),
            "compose.yaml has no service {name}"
        );
    }
    for (name, svc) in svcs {
        assert!(
            !svc["image"].is_null() || !svc["build"].is_null(),
            "service {name} has neither an image nor a build"
        );
        if let Some(b) = svc.get("build") {
            let (context, dockerfile) = match b {
                Value::String(ctx) => (ctx.clone(), "Dockerfile".to_string()),
                _ => (text(&b["context"]), text(&b["dockerfile"])),
            };
            let df = deploy().join(&context).join(&dockerfile);
            assert!(
                df.is_file(),
                "service {name}: no Dockerfile at {}",
                df.display()
            );
        }
    }

    let scylla = &svcs["scylla"];
    assert!(text(&scylla["image"]).starts_with("scylladb/scylla"));
    let cmd = words(&scylla["command"]);
    for flag in ["--smp", "--memory", "--overprovisioned", "--developer-mode"] {
        assert!(
            cmd.iter().any(|w| w == flag),
            "scylla command lacks {flag}: {cmd:?}"
        );
    }
    assert!(publishes(scylla, 9042), "scylla publishes 9042");
    assert!(words(&scylla["healthcheck"]["test"])
        .join(" ")
        .contains("cqlsh"));

    let kafka = &svcs["kafka"];
    assert!(text(&kafka["image"]).starts_with("apache/kafka"));
    let kenv = environment(kafka);
    assert!(
        kenv["KAFKA_PROCESS_ROLES"].contains("controller"),
        "KRaft: the node is its own controller"
    );
    assert!(
        !kafka["healthcheck"]["test"].is_null(),
        "kafka has a healthcheck"
    );

    let canopy = &svcs["canopy"];
    let env = environment(canopy);
    assert_eq!(words(&canopy["command"]), ["run"]);
    assert!(publishes(canopy, 8080), "canopy publishes 8080");
    assert!(env["CANOPY_STORE_URI"].starts_with("scylla://scylla:9042/"));
    assert_eq!(env["CANOPY_API_LISTEN"], "0.0.0.0:8080");
    // The brokers canopy uses are the listener Kafka advertises to the other containers.
    let brokers = &env["CANOPY_KAFKA_BROKERS"];
    assert!(
        kenv["KAFKA_ADVERTISED_LISTENERS"].contains(&format!("//{brokers}")),
        "CANOPY_KAFKA_BROKERS={brokers} is not an advertised listener: {}",
        kenv["KAFKA_ADVERTISED_LISTENERS"]
    );
    // kafka-init creates exactly the topics canopy reads and dead-letters to.
    let init = words(&c["services"]["kafka-init"]["command"]).join(" ");
    for var in ["CANOPY_KAFKA_TOPIC", "CANOPY_KAFKA_DLQ_TOPIC"] {
        let topic = &env[var];
        assert!(
            init.contains(&format!("--topic {topic} --partitions 6")),
            "kafka-init does not create {topic} ({var}) with 6 partitions: {init}"
        );
    }
    assert_eq!(
        depends_on_condition(canopy, "canopy-migrate").as_deref(),
        Some("service_completed_successfully")
    );
    assert_eq!(
        depends_on_condition(canopy, "kafka-init").as_deref(),
        Some("service_completed_successfully")
    );
    let grace = duration_secs(&text(&canopy["stop_grace_period"]));
    assert!(
        grace >= 30,
        "canopy needs time for its final checkpoint on SIGTERM: stop_grace_period {grace}s"
    );

    let migrate = &svcs["canopy-migrate"];
    assert_eq!(words(&migrate["command"]), ["migrate"]);
    assert_eq!(
        environment(migrate)["CANOPY_STORE_URI"],
        env["CANOPY_STORE_URI"],
        "migrate and run use the same store"
    );
    assert_eq!(
        depends_on_condition(migrate, "scylla").as_deref(),
        Some("service_healthy")
    );

    assert!(publishes(&svcs["prometheus"], 9090));
    assert!(publishes(&svcs["grafana"], 3000));
}

#[test]
fn compose_canopy_variables_are_configuration_keys() {
    let keys = config_keys();
    let allowed = allowed_env_of(&keys);
    for file in ["compose.yaml", "compose.scylla.yaml"] {
        let c = compose(file);
        for (name, svc) in services(&c) {
            if !runs_canopy(svc) {
                continue;
            }
            let env = environment(svc);
            check_canopy_env(&format!("{file} service {name}"), &env, &allowed);
            // The binary agrees: it refuses unknown variables and badly typed values.
            let effective = canopy_config(None, &env);
            for (var, value) in &env {
                if var == "CANOPY_CONFIG" {
                    continue;
                }
                let key = keys
                    .iter()
                    .find(|k| env_name(k) == *var)
                    .expect("checked above");
                let got = toml_get(&effective, key).expect("a printed key");
                let same = match got {
                    toml::Value::String(s) => s == value,
                    toml::Value::Boolean(b) => matches!(
                        (*b, value.as_str()),
                        (true, "1" | "true") | (false, "0" | "false")
                    ),
                    other => other.to_string() == *value,
                };
                assert!(
                    same,
                    "{file} service {name}: {var}={value:?} but canopy reads {key} = {got}"
                );
            }
        }
    }
}

#[test]
fn compose_bind_mounts_exist() {
    for file in ["compose.yaml", "compose.scylla.yaml"] {
        let c = compose(file);
        for (name, svc) in services(&c) {
            for (src, dst) in bind_mounts(svc) {
                assert!(
                    !src.starts_with('/'),
                    "{file} service {name}: absolute host path {src}"
                );
                let p = deploy().join(&src);
                assert!(
                    p.exists(),
                    "{file} service {name}: {src} (mounted at {dst}) does not exist"
                );
            }
        }
    }
}

#[test]
fn compose_scylla_only_starts_scylla() {
    let c = compose("compose.scylla.yaml");
    let svcs = services(&c);
    assert_eq!(
        svcs.keys().map(String::as_str).collect::<Vec<_>>(),
        ["scylla"],
        "compose.scylla.yaml starts only Scylla"
    );
    let s = &svcs["scylla"];
    assert!(text(&s["image"]).starts_with("scylladb/scylla"));
    assert!(
        publishes(s, 9042),
        "the test suite connects to 127.0.0.1:9042"
    );
    assert!(words(&s["healthcheck"]["test"]).join(" ").contains("cqlsh"));
}

// ---------------------------------------------------------------------------------------------
// Prometheus and Grafana

#[test]
fn prometheus_scrapes_canopy_metrics() {
    let p = yaml_one(&deploy().join("prometheus/prometheus.yml"));
    let c = compose("compose.yaml");
    let canopy_port = environment(&c["services"]["canopy"])["CANOPY_API_LISTEN"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let target = format!("canopy:{canopy_port}");
    let jobs = p["scrape_configs"].as_array().expect("scrape_configs");
    let found = jobs.iter().any(|job| {
        let path = match &job["metrics_path"] {
            Value::Null => "/metrics".to_string(),
            v => text(v),
        };
        path == "/metrics"
            && job["static_configs"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|sc| sc["targets"].as_array().into_iter().flatten())
                .any(|t| text(t) == target)
    });
    assert!(
        found,
        "no scrape job for {target} /metrics in prometheus.yml"
    );
    let mounts = bind_mounts(&c["services"]["prometheus"]);
    assert!(
        mounts
            .iter()
            .any(|(src, dst)| src == "./prometheus/prometheus.yml"
                && dst == "/etc/prometheus/prometheus.yml"),
        "compose mounts prometheus.yml where Prometheus reads it: {mounts:?}"
    );
}

/// All panels, rows' nested panels included.
fn all_panels(panels: &Value, out: &mut Vec<Value>) {
    for p in panels.as_array().into_iter().flatten() {
        out.push(p.clone());
        all_panels(&p["panels"], out);
    }
}

/// The `canopy_*` identifiers of a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut cur = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            cur.push(c);
        } else {
            if cur.starts_with("canopy_") {
                names.push(cur.clone());
            }
            cur.clear();
        }
    }
    names
}

/// The listed metric a name refers to (a histogram's series carry a suffix).
fn base_metric(name: &str) -> Option<&'static str> {
    if let Some(m) = METRICS.iter().find(|m| **m == name) {
        return Some(*m);
    }
    HISTOGRAM_SUFFIXES.iter().find_map(|s| {
        let base = name.strip_suffix(*s)?;
        METRICS.iter().find(|m| **m == base).copied()
    })
}

fn provisioned_datasource() -> Value {
    let ds = yaml_one(&deploy().join("grafana/provisioning/datasources/prometheus.yaml"));
    let list = ds["datasources"].as_array().expect("datasources");
    let prom: Vec<&Value> = list.iter().filter(|d| d["type"] == "prometheus").collect();
    assert_eq!(prom.len(), 1, "one Prometheus datasource");
    prom[0].clone()
}

#[test]
fn grafana_dashboard_uses_only_canopy_metrics() {
    let path = deploy().join("grafana/dashboards/canopy.json");
    let dash: Value = serde_json::from_str(&read(&path)).expect("canopy.json is JSON");
    let uid = text(&provisioned_datasource()["uid"]);
    assert!(
        !uid.is_empty(),
        "the provisioned datasource has a fixed uid"
    );
    assert!(!text(&dash["uid"]).is_empty() && !text(&dash["title"]).is_empty());

    let mut panels = Vec::new();
    all_panels(&dash["panels"], &mut panels);
    let mut ids = BTreeSet::new();
    let mut shown = BTreeSet::new();
    let mut graphs = 0;
    for p in &panels {
        let title = text(&p["title"]);
        assert!(
            ids.insert(p["id"].to_string()),
            "duplicate panel id in {title}"
        );
        assert!(p["gridPos"].is_object(), "panel {title} has no gridPos");
        if p["type"] == "row" {
            continue;
        }
        graphs += 1;
        assert_eq!(p["type"], "timeseries", "panel {title}");
        assert_eq!(
            text(&p["datasource"]["uid"]),
            uid,
            "panel {title} uses the provisioned datasource"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            if !t["datasource"].is_null() {
                assert_eq!(text(&t["datasource"]["uid"]), uid, "a query of {title}");
            }
            let expr = text(&t["expr"]);
            let names = metric_names(&expr);
            assert!(
                !names.is_empty(),
                "panel {title}: {expr:?} reads no canopy metric"
            );
            for n in names {
                let base = base_metric(&n)
                    .unwrap_or_else(|| panic!("panel {title}: unknown metric {n} in {expr}"));
                shown.insert(base);
            }
        }
    }
    assert!(graphs >= 10, "only {graphs} graphs");
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let q = match &v["query"] {
            Value::Object(m) => m.get("query").map(text).unwrap_or_default(),
            other => text(other),
        };
        for n in metric_names(&format!("{q} {}", text(&v["definition"]))) {
            assert!(
                base_metric(&n).is_some(),
                "variable {}: unknown metric {n}",
                v["name"]
            );
        }
        if v["type"] == "query" {
            assert_eq!(text(&v["datasource"]["uid"]), uid, "variable {}", v["name"]);
        }
    }
    for m in DASHBOARD_MUST_SHOW {
        assert!(shown.contains(m), "no panel shows {m}");
    }
}

#[test]
fn grafana_provisioning_matches_compose() {
    let c = compose("compose.yaml");
    let grafana = &c["services"]["grafana"];
    let env = environment(grafana);
    assert_eq!(env["GF_AUTH_ANONYMOUS_ENABLED"], "true");
    assert_eq!(env["GF_AUTH_ANONYMOUS_ORG_ROLE"], "Viewer");

    let ds = provisioned_datasource();
    let url = text(&ds["url"]);
    assert_eq!(url, "http://prometheus:9090");
    assert!(services(&c).contains_key("prometheus"));

    let mounts = bind_mounts(grafana);
    let mounted_at = |src: &str| {
        mounts
            .iter()
            .find(|(s, _)| s.trim_end_matches('/') == src)
            .map(|(_, d)| d.trim_end_matches('/').to_string())
            .unwrap_or_else(|| panic!("compose does not mount {src} into grafana: {mounts:?}"))
    };
    assert_eq!(
        mounted_at("./grafana/provisioning"),
        "/etc/grafana/provisioning"
    );
    let dashboards_dir = mounted_at("./grafana/dashboards");
    let prov = yaml_one(&deploy().join("grafana/provisioning/dashboards/canopy.yaml"));
    let providers = prov["providers"].as_array().expect("providers");
    assert!(
        providers
            .iter()
            .any(|p| text(&p["options"]["path"]).trim_end_matches('/') == dashboards_dir),
        "no dashboard provider reads {dashboards_dir}"
    );
    if let Some(home) = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH") {
        let file = home
            .strip_prefix(&format!("{dashboards_dir}/"))
            .unwrap_or_else(|| panic!("home dashboard {home} is not in {dashboards_dir}"));
        assert!(deploy().join("grafana/dashboards").join(file).is_file());
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

fn k8s_docs() -> Vec<Value> {
    let mut files = Vec::new();
    files_with_ext(&deploy().join("k8s"), &["yaml", "yml"], &mut files);
    assert!(!files.is_empty(), "deploy/k8s has no manifests");
    files.iter().flat_map(|f| yaml_docs(f)).collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one_of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

/// `sub` ⊆ `sup` for label maps.
fn labels_within(sub: &Value, sup: &Value) -> bool {
    let sub = sub.as_object().expect("labels");
    !sub.is_empty() && sub.iter().all(|(k, v)| sup.get(k) == Some(v))
}

#[test]
fn k8s_manifests_are_complete() {
    let docs = k8s_docs();
    for d in &docs {
        let kind = text(&d["kind"]);
        assert!(
            !text(&d["apiVersion"]).is_empty(),
            "{kind} without apiVersion"
        );
        assert!(
            !text(&d["metadata"]["name"]).is_empty(),
            "{kind} without a name"
        );
        if kind != "Namespace" {
            assert_eq!(
                text(&d["metadata"]["namespace"]),
                "canopy",
                "{kind} {} is in the canopy namespace",
                d["metadata"]["name"]
            );
        }
    }
    assert_eq!(
        text(&one_of_kind(&docs, "Namespace")["metadata"]["name"]),
        "canopy"
    );
    for kind in [
        "ConfigMap",
        "Secret",
        "Job",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(!of_kind(&docs, kind).is_empty(), "no {kind}");
    }
}

#[test]
fn k8s_configmap_is_a_valid_canopy_toml() {
    let docs = k8s_docs();
    let keys = config_keys();
    let cm = one_of_kind(&docs, "ConfigMap");
    let toml_text = text(&cm["data"]["canopy.toml"]);
    let file: toml::Table = toml_text.parse().expect("canopy.toml parses as TOML");
    let mut used = BTreeSet::new();
    leaf_keys(&file, "", &mut used);
    for k in &used {
        assert!(
            keys.contains(k),
            "canopy.toml: `{k}` is not a configuration key"
        );
    }
    assert!(
        !used.contains("api.tokens"),
        "API tokens belong in the Secret, not the ConfigMap"
    );
    for k in [
        "data_dir",
        "store.uri",
        "api.listen",
        "kafka.brokers",
        "kafka.topic",
        "kafka.group",
        "kafka.dlq_topic",
        "log.json",
    ] {
        assert!(used.contains(k), "canopy.toml does not set {k}");
    }

    // The binary reads it, with the Secret's variables, and reports what it must.
    let secret = one_of_kind(&docs, "Secret");
    let secret_env: BTreeMap<String, String> = secret["stringData"]
        .as_object()
        .expect("stringData")
        .iter()
        .map(|(k, v)| (k.clone(), text(v)))
        .collect();
    check_canopy_env("Secret", &secret_env, &allowed_env());
    assert!(secret_env.contains_key("CANOPY_API_TOKENS"));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("canopy.toml");
    std::fs::write(&f, &toml_text).unwrap();
    let effective = canopy_config(Some(&f), &secret_env);
    let get = |k: &str| toml_get(&effective, k).cloned().expect(k);
    assert_eq!(get("api.listen").as_str(), Some("0.0.0.0:8080"));
    assert_eq!(get("log.json").as_bool(), Some(true));
    assert!(get("store.uri").as_str().unwrap().starts_with("scylla://"));
    assert_eq!(
        get("api.tokens").as_str(),
        Some(secret_env["CANOPY_API_TOKENS"].as_str())
    );
}

/// Checks a pod template running canopy: config file mounted, environment known, service
/// links off, non-root with a read-only root. Returns the container.
fn check_canopy_pod(what: &str, template: &Value, docs: &[Value], subcommand: &str) -> Value {
    let spec = &template["spec"];
    assert_eq!(
        spec["enableServiceLinks"],
        Value::Bool(false),
        "{what}: Kubernetes would inject CANOPY_SERVICE_HOST etc. for the `canopy` Service, \
         and canopy refuses unknown CANOPY_* variables"
    );
    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{what}: one container");
    let c = &containers[0];
    let args: Vec<String> = words(&c["command"])
        .into_iter()
        .chain(words(&c["args"]))
        .collect();
    assert!(
        args.iter().any(|a| a == subcommand),
        "{what}: runs `{subcommand}`: {args:?}"
    );

    // --config FILE (or CANOPY_CONFIG) names a key of the ConfigMap, mounted at its dir.
    let env: BTreeMap<String, String> = c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (text(&e["name"]), text(&e["value"])))
        .collect();
    let config_path = args
        .iter()
        .position(|a| a == "--config")
        .map(|i| args[i + 1].clone())
        .or_else(|| env.get("CANOPY_CONFIG").cloned())
        .unwrap_or_else(|| panic!("{what}: no --config"));
    let config_path = Path::new(&config_path);
    let (dir, file) = (
        config_path.parent().unwrap().to_str().unwrap(),
        config_path.file_name().unwrap().to_str().unwrap(),
    );
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| text(&m["mountPath"]).trim_end_matches('/') == dir)
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {dir}"));
    let volume = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("{what}: no volume {}", mount["name"]));
    let cm_name = text(&volume["configMap"]["name"]);
    let cm = of_kind(docs, "ConfigMap")
        .into_iter()
        .find(|d| text(&d["metadata"]["name"]) == cm_name)
        .unwrap_or_else(|| panic!("{what}: no ConfigMap {cm_name:?}"));
    assert!(
        !cm["data"][file].is_null(),
        "{what}: ConfigMap {cm_name} has no key {file}"
    );

    let allowed = allowed_env();
    check_canopy_env(what, &env, &allowed);
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let name = text(&from["secretRef"]["name"]);
        assert!(!name.is_empty(), "{what}: envFrom a Secret only");
        let secret = of_kind(docs, "Secret")
            .into_iter()
            .find(|d| text(&d["metadata"]["name"]) == name)
            .unwrap_or_else(|| panic!("{what}: no Secret {name}"));
        let keys: BTreeMap<String, String> = secret["stringData"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| (k.clone(), String::new()))
            .collect();
        check_canopy_env(&format!("{what} (Secret {name})"), &keys, &allowed);
    }

    let pod_sc = &spec["securityContext"];
    let sc = &c["securityContext"];
    let either = |k: &str| {
        if sc[k].is_null() {
            pod_sc[k].clone()
        } else {
            sc[k].clone()
        }
    };
    assert_eq!(
        either("runAsNonRoot"),
        Value::Bool(true),
        "{what}: runAsNonRoot"
    );
    assert_eq!(either("runAsUser"), Value::from(10001), "{what}: uid 10001");
    assert_eq!(
        sc["readOnlyRootFilesystem"],
        Value::Bool(true),
        "{what}: readOnlyRootFilesystem"
    );
    assert!(
        !c["resources"]["requests"]["cpu"].is_null()
            && !c["resources"]["requests"]["memory"].is_null(),
        "{what}: resource requests"
    );
    c.clone()
}

#[test]
fn k8s_migrate_job_and_deployment() {
    let docs = k8s_docs();
    let job = one_of_kind(&docs, "Job");
    check_canopy_pod("Job", &job["spec"]["template"], &docs, "migrate");

    let dep = one_of_kind(&docs, "Deployment");
    let template = &dep["spec"]["template"];
    let c = check_canopy_pod("Deployment", template, &docs, "run");
    assert!(
        dep["spec"]["replicas"].as_u64().unwrap_or(1) >= 2,
        "several `run` processes share the partitions"
    );
    let pod_labels = &template["metadata"]["labels"];
    assert!(labels_within(
        &dep["spec"]["selector"]["matchLabels"],
        pod_labels
    ));

    // Port, probes.
    let port = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["containerPort"] == 8080)
        .expect("containerPort 8080")
        .clone();
    let port_name = text(&port["name"]);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(text(&get["path"]), path, "{probe}");
        let p = &get["port"];
        assert!(
            *p == 8080 || (!port_name.is_empty() && text(p) == port_name),
            "{probe} port {p} is not the container's port 8080 ({port_name})"
        );
    }
    assert!(
        !c["resources"]["limits"]["memory"].is_null(),
        "a memory limit"
    );

    // Scraping, shutdown.
    let ann = &template["metadata"]["annotations"];
    assert_eq!(text(&ann["prometheus.io/scrape"]), "true");
    assert_eq!(text(&ann["prometheus.io/port"]), "8080");
    assert_eq!(text(&ann["prometheus.io/path"]), "/metrics");
    let grace = template["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    assert!(
        grace >= 45,
        "time for the final checkpoint on SIGTERM: {grace}s"
    );

    // Service and PodDisruptionBudget select these pods.
    let svc = one_of_kind(&docs, "Service");
    assert!(labels_within(&svc["spec"]["selector"], pod_labels));
    let sp = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "http")
        .expect("a Service port named http");
    assert_eq!(sp["port"], 8080);
    assert!(sp["targetPort"] == 8080 || text(&sp["targetPort"]) == port_name);
    let pdb = one_of_kind(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert!(labels_within(
        &pdb["spec"]["selector"]["matchLabels"],
        pod_labels
    ));

    // The listen port in the ConfigMap is the container port.
    let cm = one_of_kind(&docs, "ConfigMap");
    let file: toml::Table = text(&cm["data"]["canopy.toml"]).parse().unwrap();
    let listen = toml_get(&file, "api.listen")
        .and_then(|v| v.as_str())
        .unwrap();
    assert!(listen.ends_with(":8080"), "api.listen {listen}");
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// Sources of the Dockerfile's `COPY` instructions from the build context (not `--from`).
fn dockerfile_copies(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        let args: Vec<&str> = rest.split_whitespace().collect();
        if args.iter().any(|a| a.starts_with("--from")) {
            continue;
        }
        let paths: Vec<&str> = args.into_iter().filter(|a| !a.starts_with("--")).collect();
        assert!(
            paths.len() >= 2,
            "COPY needs a source and a destination: {line}"
        );
        out.extend(
            paths[..paths.len() - 1]
                .iter()
                .map(|s| s.trim_start_matches("./").trim_end_matches('/').to_string()),
        );
    }
    out
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Paths (relative to the repository) that `include_str!`/`include_bytes!` read in a crate.
fn included_files(crate_dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    files_with_ext(&crate_dir.join("src"), &["rs"], &mut files);
    let mut out = Vec::new();
    for f in files {
        let src = read(&f);
        for mac in ["include_str!(", "include_bytes!("] {
            for (i, _) in src.match_indices(mac) {
                let arg = src[i + mac.len()..].trim_start();
                let (base, lit_from) = if let Some(rest) = arg.strip_prefix('"') {
                    (f.parent().unwrap().to_path_buf(), rest)
                } else if let Some(rest) = arg.strip_prefix("concat!(env!(\"CARGO_MANIFEST_DIR\")")
                {
                    let Some(q) = rest.find('"') else { continue };
                    (crate_dir.to_path_buf(), &rest[q + 1..])
                } else {
                    continue; // a form this check does not follow
                };
                let lit = &lit_from[..lit_from.find('"').expect("a closing quote")];
                let full = normalize(&base.join(lit.trim_start_matches('/')));
                let rel = full
                    .strip_prefix(normalize(&repo()))
                    .unwrap_or_else(|_| {
                        panic!("{}: {mac}{lit} is outside the repository", f.display())
                    })
                    .to_path_buf();
                out.push(rel);
            }
        }
    }
    out
}

#[test]
fn dockerfile_copies_what_the_build_needs() {
    let df = read(&deploy().join("Dockerfile"));
    let copies = dockerfile_copies(&df);
    for c in &copies {
        assert!(
            repo().join(c).exists(),
            "the Dockerfile copies {c}, which does not exist"
        );
    }
    let copied = |rel: &Path| copies.iter().any(|c| rel.starts_with(c));
    for needed in ["Cargo.toml", "Cargo.lock", "actors", "src"] {
        assert!(
            copied(Path::new(needed)),
            "the Dockerfile does not copy {needed}"
        );
    }

    // Every explicitly listed target's file: cargo checks they exist even for `cargo build`.
    let manifest: toml::Table = read(&repo().join("Cargo.toml")).parse().unwrap();
    for (section, dir) in [
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
        ("bin", "src/bin"),
    ] {
        for t in manifest
            .get(section)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let name = t.get("name").and_then(|v| v.as_str()).unwrap_or_default();
            let path = match t.get("path").and_then(|v| v.as_str()) {
                Some(p) => PathBuf::from(p),
                None => {
                    let single = PathBuf::from(format!("{dir}/{name}.rs"));
                    if repo().join(&single).exists() {
                        single
                    } else {
                        PathBuf::from(format!("{dir}/{name}/main.rs"))
                    }
                }
            };
            assert!(
                copied(path.as_path()),
                "Cargo.toml lists [[{section}]] {name} ({}), which the Dockerfile does not copy",
                path.display()
            );
        }
    }
    // Workspace members.
    let members = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    for m in members {
        let m = m.as_str().unwrap();
        assert!(copied(Path::new(m)), "workspace member {m} is not copied");
    }
    // Files embedded at compile time (the dashboard, the CQL schema).
    for crate_dir in [repo(), repo().join("actors")] {
        for f in included_files(&crate_dir) {
            assert!(
                copied(f.as_path()),
                "{} is embedded with include_str!/include_bytes! but not copied by the Dockerfile",
                f.display()
            );
        }
    }

    // The runtime image.
    assert!(df.contains("FROM debian:bookworm-slim"));
    assert!(
        df.lines().any(|l| l.trim().starts_with("USER 10001")),
        "runs as uid 10001 (the Kubernetes manifests' runAsUser)"
    );
    assert!(df.lines().any(|l| l.trim() == "EXPOSE 8080"));
    assert!(df.contains("ENTRYPOINT [\"canopy\"]"));
    assert!(df.contains("--mount=type=cache"), "BuildKit cache mounts");
}
