//! One tree of typed settings. Layers, later wins: built-in defaults, the TOML file given with
//! `--config` (or `CANOPY_CONFIG`), `CANOPY_*` environment variables, command-line flags.
//!
//! Every key has an environment name: `CANOPY_` + the dotted path upper-cased with `_` for `.`
//! (`api.tokens` → `CANOPY_API_TOKENS`, `engine.checkpoint_interval_ms` →
//! `CANOPY_ENGINE_CHECKPOINT_INTERVAL_MS`). An unknown key in the file or an unknown `CANOPY_*`
//! variable is an error that names it: a typo must not silently fall back to a default.
//! `canopy config` prints the effective tree.

use std::path::{Path, PathBuf};

use canopy_actors::engine::EngineConfig;
use canopy_actors::tenant::TenantSettings;
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::api::ApiOptions;
use crate::kafka::KafkaOptions;
use crate::store::{StoreOptions, StoreUri};
use crate::telemetry::LogOptions;

/// `CANOPY_*` variables that are not configuration keys: the config file's path, the Scylla
/// test suite's node, and the prefixes of test and benchmark switches.
const NOT_CONFIG: &[&str] = &["CANOPY_CONFIG", "CANOPY_SCYLLA_URI"];
const NOT_CONFIG_PREFIXES: &[&str] = &["CANOPY_TEST_", "CANOPY_BENCH_"];

fn is_config_var(name: &str) -> bool {
    name.starts_with("CANOPY_")
        && !NOT_CONFIG.contains(&name)
        && !NOT_CONFIG_PREFIXES.iter().any(|p| name.starts_with(p))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("unknown configuration key `{0}`")]
    UnknownKey(String),
    #[error("unknown environment variable {0} (no configuration key has that name)")]
    UnknownEnv(String),
    #[error("configuration key `{key}`: {message}")]
    BadValue { key: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the embedded store keeps its file.
    pub data_dir: PathBuf,
    pub store: StoreOptions,
    pub engine: EngineSection,
    pub tenant: TenantSettings,
    pub api: ApiOptions,
    pub kafka: KafkaOptions,
    pub demo: DemoSection,
    pub log: LogOptions,
}

/// The `engine` section: the engine's settings, and the size of the batches the sources hand it
/// (a source's concern the engine does not see).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineSection {
    #[serde(flatten)]
    pub settings: EngineConfig,
    /// Records per batch handed from the source to the engine.
    pub batch_size: usize,
}

impl Default for EngineSection {
    fn default() -> Self {
        EngineSection {
            settings: EngineConfig::default(),
            batch_size: 4096,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoSection {
    pub tenants: usize,
    pub hierarchies: usize,
    pub depth: usize,
    pub fanout: usize,
    /// Records per second the demo workload produces.
    pub records_per_sec: u64,
    /// Share of records that move, delete or re-create nodes.
    pub churn: f64,
    /// Share of records that are refused.
    pub bad: f64,
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            store: StoreOptions::default(),
            engine: EngineSection::default(),
            tenant: TenantSettings::default(),
            api: ApiOptions::default(),
            kafka: KafkaOptions::default(),
            demo: DemoSection::default(),
            log: LogOptions::default(),
        }
    }
}

impl Default for DemoSection {
    fn default() -> Self {
        DemoSection {
            tenants: 3,
            hierarchies: 2,
            depth: 6,
            fanout: 4,
            records_per_sec: 5_000,
            churn: 0.002,
            bad: 0.002,
            seed: 1,
        }
    }
}

impl Config {
    /// The engine's settings, with the `tenant` section in them.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            tenant: self.tenant,
            ..self.engine.settings.clone()
        }
    }

    /// The effective configuration as TOML (what `canopy config` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the configuration serializes")
    }

    /// Builds the effective configuration from its layers.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &[(&str, Value)],
    ) -> Result<Config, ConfigError> {
        let defaults = Table::try_from(Config::default()).expect("defaults serialize");
        let mut merged = defaults.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let t: Table = text
                .parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            overlay(&defaults, &mut merged, &t, "")?;
        }
        let keys = leaf_keys(&defaults, "");
        let mut env: Vec<(String, String)> =
            env.into_iter().filter(|(k, _)| is_config_var(k)).collect();
        env.sort();
        for (name, raw) in env {
            let key = keys
                .iter()
                .find(|k| env_name(k) == name)
                .ok_or_else(|| ConfigError::UnknownEnv(name.clone()))?;
            let default = lookup(&defaults, key).expect("a listed key exists");
            let v = parse_like(default, &raw).map_err(|message| ConfigError::BadValue {
                key: format!("{key} (from {name})"),
                message,
            })?;
            set(&mut merged, key, v);
        }
        for (key, v) in flags {
            if lookup(&defaults, key).is_none() {
                return Err(ConfigError::UnknownKey(key.to_string()));
            }
            set(&mut merged, key, v.clone());
        }
        // Parsed here too, for an error that names its key (serde's would not).
        if let Some(Value::String(uri)) = lookup(&merged, "store.uri") {
            uri.parse::<StoreUri>().map_err(|e| ConfigError::BadValue {
                key: "store.uri".into(),
                message: format!("{:?}: {}", e.uri, e.reason),
            })?;
        }
        let cfg: Config = Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::BadValue {
                key: "(configuration)".into(),
                message: e.message().to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Values that parse but cannot work, refused here so that every command (and `canopy
    /// config`) names them before doing anything, with the configuration error's exit code.
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::BadValue {
            key: key.into(),
            message,
        };
        crate::api::Tokens::parse(&self.api.tokens)
            .map_err(|e| bad("api.tokens", e.to_string()))?;
        check_listen(&self.api.listen).map_err(|m| bad("api.listen", m))?;
        let a = &self.api;
        let at_least = |key: &str, v: u64, min: u64| {
            (v >= min)
                .then_some(())
                .ok_or_else(|| bad(key, format!("{v} is below the minimum, {min}")))
        };
        at_least("api.max_connections", a.max_connections as u64, 1)?;
        for (key, v) in [
            ("api.max_connections", a.max_connections),
            ("api.reserve_connections", a.reserve_connections),
        ] {
            // Semaphore permits (and far more than a process's file descriptors).
            if v > 1_000_000 {
                return Err(bad(key, format!("{v} is above the maximum, 1000000")));
            }
        }
        at_least("api.header_read_timeout_ms", a.header_read_timeout_ms, 1)?;
        at_least("api.idle_timeout_ms", a.idle_timeout_ms, 1)?;
        at_least("api.max_uri_bytes", a.max_uri_bytes as u64, 64)?;
        at_least("api.max_header_bytes", a.max_header_bytes as u64, 256)?;
        at_least("api.max_headers", a.max_headers as u64, 1)?;
        // The HTTP stack refuses longer targets itself, with no body to explain why.
        if a.max_uri_bytes > crate::api::server::MAX_URI_BYTES {
            return Err(bad(
                "api.max_uri_bytes",
                format!(
                    "{} is above the maximum, {}",
                    a.max_uri_bytes,
                    crate::api::server::MAX_URI_BYTES
                ),
            ));
        }
        Ok(())
    }
}

/// `HOST:PORT` (`[V6]:PORT` for IPv6), the port a number below 65536 (0: any free port).
fn check_listen(listen: &str) -> Result<(), String> {
    let (host, port) = listen
        .rsplit_once(':')
        .ok_or_else(|| format!("{listen:?} is not HOST:PORT"))?;
    if host.is_empty() {
        return Err(format!("{listen:?} has no host (e.g. 127.0.0.1:8080)"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("{listen:?}: the port must be a number from 0 to 65535"))?;
    Ok(())
}

/// The environment variable of a dotted key.
pub fn env_name(key: &str) -> String {
    format!("CANOPY_{}", key.replace('.', "_").to_uppercase())
}

fn leaf_keys(t: &Table, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in t {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Table(sub) => out.extend(leaf_keys(sub, &path)),
            _ => out.push(path),
        }
    }
    out
}

fn lookup<'a>(t: &'a Table, key: &str) -> Option<&'a Value> {
    let mut parts = key.split('.');
    let mut v = t.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

fn set(t: &mut Table, key: &str, v: Value) {
    let (head, last) = match key.rsplit_once('.') {
        Some((h, l)) => (Some(h), l),
        None => (None, key),
    };
    let mut cur = t;
    if let Some(h) = head {
        for p in h.split('.') {
            cur = cur
                .entry(p)
                .or_insert_with(|| Value::Table(Table::new()))
                .as_table_mut()
                .expect("sections are tables");
        }
    }
    cur.insert(last.to_string(), v);
}

/// Copies `src` onto `dst`, refusing keys that `defaults` does not have.
fn overlay(
    defaults: &Table,
    dst: &mut Table,
    src: &Table,
    prefix: &str,
) -> Result<(), ConfigError> {
    for (k, v) in src {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (defaults.get(k), v) {
            (None, _) => return Err(ConfigError::UnknownKey(path)),
            (Some(Value::Table(d)), Value::Table(s)) => {
                let sub = dst
                    .get_mut(k)
                    .and_then(Value::as_table_mut)
                    .expect("defaults and merged share sections");
                overlay(d, sub, s, &path)?;
            }
            (Some(Value::Table(_)), _) => {
                return Err(ConfigError::BadValue {
                    key: path,
                    message: "is a section, not a value".into(),
                })
            }
            (Some(_), _) => {
                dst.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

/// Parses an environment value as the type of the key's default.
fn parse_like(default: &Value, raw: &str) -> Result<Value, String> {
    match default {
        Value::String(_) => Ok(Value::String(raw.to_string())),
        Value::Integer(_) => raw
            .trim()
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("{raw:?} is not an integer")),
        Value::Float(_) => raw
            .trim()
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("{raw:?} is not a number")),
        Value::Boolean(_) => match raw.trim() {
            "1" | "true" => Ok(Value::Boolean(true)),
            "0" | "false" => Ok(Value::Boolean(false)),
            _ => Err(format!("{raw:?} is not true/false")),
        },
        other => Err(format!("cannot be set from the environment ({other:?})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "data_dir = \"/x\"\n[engine]\ncheckpoint_interval_ms = 7\nbatch_size = 9\n[api]\ntokens = \"a=b\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&f),
            env(&[
                ("CANOPY_ENGINE_BATCH_SIZE", "11"),
                ("CANOPY_API_TOKENS", "root=*"),
                ("HOME", "/root"),
                ("CANOPY_TEST_ANYTHING", "1"),
            ]),
            &[("engine.checkpoint_interval_ms", Value::Integer(5))],
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/x"), "file over default");
        assert_eq!(c.engine.batch_size, 11, "env over file");
        assert_eq!(c.api.tokens, "root=*");
        assert_eq!(
            c.engine.settings.checkpoint_interval_ms, 5,
            "flag over file"
        );
        assert_eq!(
            c.engine.settings.max_restarts,
            EngineConfig::default().max_restarts
        );
    }

    #[test]
    fn unknown_keys_and_variables_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[engine]\ncheckpoint_intervall_ms = 7\n").unwrap();
        let e = Config::load(Some(&f), env(&[]), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown configuration key `engine.checkpoint_intervall_ms`"
        );
        let e = Config::load(None, env(&[("CANOPY_API_TOKEN", "x")]), &[]).unwrap_err();
        assert!(e.to_string().contains("CANOPY_API_TOKEN"), "{e}");
        let e = Config::load(None, env(&[("CANOPY_ENGINE_BATCH_SIZE", "many")]), &[]).unwrap_err();
        assert!(e.to_string().contains("engine.batch_size"), "{e}");
    }

    #[test]
    fn bad_tokens_and_listen_addresses_are_configuration_errors() {
        for (var, val, key) in [
            ("CANOPY_API_TOKENS", "tok-without-tenant", "api.tokens"),
            ("CANOPY_API_TOKENS", "a=x,a=y", "api.tokens"),
            ("CANOPY_API_LISTEN", "127.0.0.1:99999", "api.listen"),
            ("CANOPY_API_LISTEN", "8080", "api.listen"),
            ("CANOPY_API_MAX_CONNECTIONS", "0", "api.max_connections"),
            (
                "CANOPY_API_RESERVE_CONNECTIONS",
                "9223372036854775807",
                "api.reserve_connections",
            ),
        ] {
            let e = Config::load(None, env(&[(var, val)]), &[]).unwrap_err();
            assert!(
                matches!(&e, ConfigError::BadValue { key: k, .. } if k == key),
                "{var}={val}: {e}"
            );
        }
        let flag = [("api.listen", Value::String("127.0.0.1:99999".into()))];
        assert!(Config::load(None, env(&[]), &flag).is_err());
        for ok in [
            "127.0.0.1:0",
            "[::1]:8080",
            "localhost:8080",
            "0.0.0.0:65535",
        ] {
            let c = Config::load(None, env(&[("CANOPY_API_LISTEN", ok)]), &[]).unwrap();
            assert_eq!(c.api.listen, ok);
        }
    }

    #[test]
    fn the_store_uri_is_parsed_once_at_load() {
        let c = Config::load(
            None,
            env(&[("CANOPY_STORE_URI", "scylla://a:9042,b:9042/ks_1")]),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.store.uri,
            StoreUri::Scylla {
                hosts: vec!["a:9042".into(), "b:9042".into()],
                keyspace: "ks_1".into()
            }
        );
        assert_eq!(c.store.uri.to_string(), "scylla://a:9042,b:9042/ks_1");
        for bad in ["redb", "scylla://a:9042", "scylla://a:9042/bad-keyspace"] {
            let e = Config::load(None, env(&[("CANOPY_STORE_URI", bad)]), &[]).unwrap_err();
            assert!(
                matches!(&e, ConfigError::BadValue { key, .. } if key == "store.uri"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_printed_tree_reads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        let mut c = Config::default();
        c.demo.churn = 0.25;
        c.api.listen = "0.0.0.0:9".into();
        c.tenant.retention.hour_secs = 7200;
        c.engine.settings.max_restarts = 9;
        std::fs::write(&f, c.to_toml()).unwrap();
        assert_eq!(Config::load(Some(&f), env(&[]), &[]).unwrap(), c);
    }
}
