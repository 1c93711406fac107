//! Input records: decoding (JSON or MessagePack) and shape validation (docs/SPEC.md sections 1 and 2).
//!
//! Decoding yields a [`Record`] or a [`Refusal`] with reason `malformed`, `unknown_type` or
//! `non_integer_metric`; the state checks (`unknown_*`, `suspended`, ...) belong to the tenant.
//! Both wire formats are first mapped to the neutral [`Val`] so that one validator serves both.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::time::{in_range, parse_rfc3339, Micros, TS_MAX_SECS};

/// The largest id, in bytes.
pub const MAX_ID: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Current,
    Attributed,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Current => "current",
            Mode::Attributed => "attributed",
        }
    }
}

/// A decoded, shape-valid record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    DefineTenant {
        tenant: String,
        timezone: Option<String>,
    },
    DefineHierarchy {
        tenant: String,
        hierarchy: String,
        mode: Mode,
    },
    UpsertNode {
        tenant: String,
        hierarchy: String,
        node: String,
        parent: Option<String>,
    },
    DeleteNode {
        tenant: String,
        hierarchy: String,
        node: String,
    },
    SuspendEntity {
        tenant: String,
        entity: String,
    },
    ResumeEntity {
        tenant: String,
        entity: String,
    },
    Event {
        tenant: String,
        event_id: String,
        entity: String,
        ts: Micros,
        metrics: Vec<(String, i64)>,
    },
}

impl Record {
    pub fn tenant(&self) -> &str {
        match self {
            Record::DefineTenant { tenant, .. }
            | Record::DefineHierarchy { tenant, .. }
            | Record::UpsertNode { tenant, .. }
            | Record::DeleteNode { tenant, .. }
            | Record::SuspendEntity { tenant, .. }
            | Record::ResumeEntity { tenant, .. }
            | Record::Event { tenant, .. } => tenant,
        }
    }
}

/// Why a record was refused. The `reason()` strings are the contract of docs/SPEC.md section 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Refusal {
    #[error("malformed record: {0}")]
    Malformed(String),
    #[error("unknown record type {0:?}")]
    UnknownType(String),
    #[error("metric {0:?} is not an integer (fraction or exponent)")]
    NonIntegerMetric(String),
    #[error("entity {0:?} is not a node in any hierarchy of the tenant")]
    UnknownEntity(String),
    #[error("entity {0:?} is suspended")]
    Suspended(String),
    #[error("parent {parent:?} is not a node of hierarchy {hierarchy:?}")]
    UnknownParent { hierarchy: String, parent: String },
    #[error("moving {node:?} under {parent:?} would make it its own ancestor")]
    Cycle { node: String, parent: String },
    #[error("node {node:?} does not exist in hierarchy {hierarchy:?}")]
    UnknownNode { hierarchy: String, node: String },
    #[error("node {0:?} still has children")]
    HasChildren(String),
    #[error("time zone {0:?} is not in the IANA database")]
    UnknownTimezone(String),
    #[error("tenant already has accepted events in {current:?}; cannot change to {requested:?}")]
    TimezoneLocked { current: String, requested: String },
    #[error("hierarchy {hierarchy:?} is {current}; cannot redefine it as {requested}")]
    HierarchyModeLocked {
        hierarchy: String,
        current: &'static str,
        requested: &'static str,
    },
    /// Kafka only, beyond the shared list (docs/SPEC.md section 2): a tenant's records must all share its partition, so
    /// a record keyed by anything but its tenant id is refused rather than split from its
    /// tenant's state.
    #[error(
        "Kafka key {key:?} is not the record's tenant {tenant:?} (records must be keyed by tenant)"
    )]
    WrongKey { key: String, tenant: String },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::UnknownType(_) => "unknown_type",
            Refusal::NonIntegerMetric(_) => "non_integer_metric",
            Refusal::UnknownEntity(_) => "unknown_entity",
            Refusal::Suspended(_) => "suspended",
            Refusal::UnknownParent { .. } => "unknown_parent",
            Refusal::Cycle { .. } => "cycle",
            Refusal::UnknownNode { .. } => "unknown_node",
            Refusal::HasChildren(_) => "has_children",
            Refusal::UnknownTimezone(_) => "unknown_timezone",
            Refusal::TimezoneLocked { .. } => "timezone_locked",
            Refusal::HierarchyModeLocked { .. } => "hierarchy_mode_locked",
            Refusal::WrongKey { .. } => "wrong_key",
        }
    }
}

fn malformed(msg: impl Into<String>) -> Refusal {
    Refusal::Malformed(msg.into())
}

/// A field value in a wire-neutral form.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    Null,
    Bool,
    Str(Cow<'a, str>),
    /// An integer literal; `None` when it does not fit in i64.
    Int(Option<i64>),
    /// A number written with a fraction or an exponent (or a MessagePack float).
    Float,
    Map(Vec<(Cow<'a, str>, Val<'a>)>),
    /// Arrays, binaries and anything else no field accepts.
    Other,
}

impl Val<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Val::Null => "null",
            Val::Bool => "a boolean",
            Val::Str(_) => "a string",
            Val::Int(_) => "an integer",
            Val::Float => "a non-integer number",
            Val::Map(_) => "an object",
            Val::Other => "an array or other value",
        }
    }
}

/// The fields canopy reads; everything else is ignored. A repeated key keeps its last value.
#[derive(Default, Debug)]
struct Fields<'a> {
    typ: Option<Val<'a>>,
    tenant: Option<Val<'a>>,
    timezone: Option<Val<'a>>,
    hierarchy: Option<Val<'a>>,
    mode: Option<Val<'a>>,
    node: Option<Val<'a>>,
    parent: Option<Val<'a>>,
    entity: Option<Val<'a>>,
    event_id: Option<Val<'a>>,
    ts: Option<Val<'a>>,
    metrics: Option<Val<'a>>,
}

impl<'a> Fields<'a> {
    fn slot(&mut self, key: &str) -> Option<&mut Option<Val<'a>>> {
        Some(match key {
            "type" => &mut self.typ,
            "tenant" => &mut self.tenant,
            "timezone" => &mut self.timezone,
            "hierarchy" => &mut self.hierarchy,
            "mode" => &mut self.mode,
            "node" => &mut self.node,
            "parent" => &mut self.parent,
            "entity" => &mut self.entity,
            "event_id" => &mut self.event_id,
            "ts" => &mut self.ts,
            "metrics" => &mut self.metrics,
            _ => return None,
        })
    }
}

// ---------- JSON ----------

/// Classifies one raw JSON value without losing what serde_json's `Value` would (an integer
/// literal too large for i64 must stay "an integer", `1e3` must stay "not an integer").
///
/// Only a field's own object is read entry by entry (`metrics`); an object inside it is
/// classified, not read: nothing looks deeper (a metric's value must be a number), and
/// descending parsed each level's text again, O(depth × length) for a deeply nested record.
fn json_val(raw: &RawValue, nested: bool) -> Result<Val<'_>, Refusal> {
    let t = raw.get();
    Ok(match t.as_bytes()[0] {
        b'n' => Val::Null,
        b't' | b'f' => Val::Bool,
        b'"' => Val::Str(
            serde_json::from_str::<Cow<'_, str>>(t)
                .map_err(|e| malformed(format!("bad string: {e}")))?,
        ),
        b'{' if nested => Val::Map(Vec::new()),
        b'{' => {
            let MetricsMap(entries) =
                serde_json::from_str(t).map_err(|e| malformed(format!("bad object: {e}")))?;
            let mut out = Vec::with_capacity(entries.len());
            for (k, v) in entries {
                out.push((k, json_val(v, true)?));
            }
            Val::Map(out)
        }
        b'[' => Val::Other,
        _ => {
            if t.bytes().any(|c| matches!(c, b'.' | b'e' | b'E')) {
                Val::Float
            } else {
                Val::Int(t.parse::<i64>().ok())
            }
        }
    })
}

struct MetricsMap<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// Up to this many keys, a repeated key is found by scanning the entries; past it, through a
/// hash index (a scan per key made an object with n keys cost n²: issue 24).
const KEYS_SCAN_MAX: usize = 16;

/// An object's entries in the order their keys first appear, each with its key's last value:
/// what the reference oracle (Python's `dict`) makes of a repeated key.
struct LastWins<'a, V> {
    entries: Vec<(Cow<'a, str>, V)>,
    index: Option<std::collections::HashMap<Cow<'a, str>, usize>>,
}

impl<V> Default for LastWins<'_, V> {
    fn default() -> Self {
        LastWins {
            entries: Vec::new(),
            index: None,
        }
    }
}

impl<'a, V> LastWins<'a, V> {
    fn with_capacity(n: usize) -> Self {
        LastWins {
            entries: Vec::with_capacity(n),
            index: None,
        }
    }

    fn push(&mut self, k: Cow<'a, str>, v: V) {
        let seen = match &self.index {
            Some(ix) => ix.get(&*k).copied(),
            None => self.entries.iter().position(|(n, _)| *n == k),
        };
        if let Some(i) = seen {
            self.entries[i].1 = v;
            return;
        }
        if let Some(ix) = &mut self.index {
            ix.insert(k.clone(), self.entries.len());
        }
        self.entries.push((k, v));
        if self.index.is_none() && self.entries.len() > KEYS_SCAN_MAX {
            let ix = self
                .entries
                .iter()
                .enumerate()
                .map(|(i, (n, _))| (n.clone(), i))
                .collect();
            self.index = Some(ix);
        }
    }
}

impl<'de> Deserialize<'de> for MetricsMap<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MetricsMap<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut v = LastWins::default();
                while let Some(k) = m.next_key::<Cow<'de, str>>()? {
                    let val: &'de RawValue = m.next_value()?;
                    v.push(k, val);
                }
                Ok(MetricsMap(v.entries))
            }
        }
        d.deserialize_map(V)
    }
}

struct JsonTop<'a>(Option<Fields<'a>>);

impl<'de> Deserialize<'de> for JsonTop<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JsonTop<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut raw: Vec<(&'static str, &'de RawValue)> = Vec::new();
                let mut fields = Fields::default();
                while let Some(k) = m.next_key::<Cow<'de, str>>()? {
                    if let Some(slot) = fields.slot(&k) {
                        let _ = slot;
                        let v: &'de RawValue = m.next_value()?;
                        let name = KNOWN.iter().find(|n| **n == k).expect("known key");
                        raw.retain(|(n, _)| n != name);
                        raw.push((name, v));
                    } else {
                        m.next_value::<IgnoredAny>()?;
                    }
                }
                for (name, v) in raw {
                    let val = json_val(v, false)
                        .map_err(|r| serde::de::Error::custom(RefusalCarrier(r)))?;
                    *fields.slot(name).expect("known key") = Some(val);
                }
                Ok(JsonTop(Some(fields)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(JsonTop(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(JsonTop(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(JsonTop(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(JsonTop(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(JsonTop(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(JsonTop(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(JsonTop(None))
            }
        }
        d.deserialize_any(V)
    }
}

const KNOWN: [&str; 11] = [
    "type",
    "tenant",
    "timezone",
    "hierarchy",
    "mode",
    "node",
    "parent",
    "entity",
    "event_id",
    "ts",
    "metrics",
];

struct RefusalCarrier(Refusal);
impl fmt::Display for RefusalCarrier {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Decodes one JSON record (one NDJSON line or one Kafka value).
pub fn decode_json(text: &str) -> Result<Record, Refusal> {
    match serde_json::from_str::<JsonTop>(text) {
        Ok(JsonTop(Some(f))) => validate(f),
        Ok(JsonTop(None)) => Err(malformed("not a JSON object")),
        Err(e) => Err(malformed(format!("not JSON: {e}"))),
    }
}

// ---------- MessagePack ----------

fn mp_val(v: rmpv::Value) -> Val<'static> {
    use rmpv::Value as V;
    match v {
        V::Nil => Val::Null,
        V::Boolean(_) => Val::Bool,
        V::Integer(i) => Val::Int(i.as_i64()),
        V::F32(_) | V::F64(_) => Val::Float,
        V::String(s) => match s.into_str() {
            Some(s) => Val::Str(Cow::Owned(s)),
            None => Val::Other,
        },
        V::Map(entries) => {
            let mut out = LastWins::with_capacity(entries.len());
            for (k, v) in entries {
                let V::String(k) = k else { return Val::Other };
                let Some(k) = k.into_str() else {
                    return Val::Other;
                };
                out.push(Cow::Owned(k), mp_val(v));
            }
            Val::Map(out.entries)
        }
        _ => Val::Other,
    }
}

/// How deep the MessagePack reader may recurse (rmpv counts each map, array and string):
/// about the 128 nested levels serde_json allows a JSON record. rmpv's own limit (1,024) let
/// a ~500-level record overflow a 2 MiB reader thread's stack in a debug build (the fuzz
/// target `actors/tests/decode_fuzz.rs` found it).
const MSGPACK_MAX_DEPTH: usize = 256;

/// Decodes one MessagePack record (a map with the same keys and values as the JSON form).
pub fn decode_msgpack(bytes: &[u8]) -> Result<Record, Refusal> {
    let mut rd = bytes;
    let v = rmpv::decode::read_value_with_max_depth(&mut rd, MSGPACK_MAX_DEPTH)
        .map_err(|e| malformed(format!("not MessagePack: {e}")))?;
    if !rd.is_empty() {
        return Err(malformed("trailing bytes after the MessagePack value"));
    }
    let Val::Map(entries) = mp_val(v) else {
        return Err(malformed("not a MessagePack map"));
    };
    let mut f = Fields::default();
    for (k, v) in entries {
        if let Some(slot) = f.slot(&k) {
            *slot = Some(v);
        }
    }
    validate(f)
}

/// Decodes a record whose wire format is unknown: MessagePack maps start with 0x80–0x8f, 0xde or
/// 0xdf, none of which can start a JSON text.
pub fn decode(bytes: &[u8]) -> Result<Record, Refusal> {
    match bytes.first() {
        Some(0x80..=0x8f | 0xde | 0xdf) => decode_msgpack(bytes),
        _ => match std::str::from_utf8(bytes) {
            Ok(s) => decode_json(s),
            Err(_) => Err(malformed("not valid UTF-8")),
        },
    }
}

// ---------- validation ----------

fn id(field: &'static str, v: Option<Val<'_>>) -> Result<String, Refusal> {
    match v {
        Some(Val::Str(s)) if !s.is_empty() && s.len() <= MAX_ID => Ok(s.into_owned()),
        Some(Val::Str(s)) if s.is_empty() => Err(malformed(format!("`{field}` is empty"))),
        Some(Val::Str(_)) => Err(malformed(format!(
            "`{field}` is longer than {MAX_ID} bytes"
        ))),
        None => Err(malformed(format!("`{field}` is missing"))),
        Some(other) => Err(malformed(format!(
            "`{field}` must be a string, got {}",
            other.kind()
        ))),
    }
}

fn opt_id(field: &'static str, v: Option<Val<'_>>) -> Result<Option<String>, Refusal> {
    match v {
        None | Some(Val::Null) => Ok(None),
        v => id(field, v).map(Some),
    }
}

fn ts(v: Option<Val<'_>>) -> Result<Micros, Refusal> {
    match v {
        None => Err(malformed("`ts` is missing")),
        Some(Val::Int(Some(ms))) if (0..TS_MAX_SECS * 1000).contains(&ms) => Ok(ms * 1000),
        Some(Val::Int(_)) => Err(malformed(
            "`ts` in milliseconds is outside 1970-01-01..2200-01-01",
        )),
        Some(Val::Str(s)) => match parse_rfc3339(&s) {
            Some(t) if in_range(t) => Ok(t),
            Some(_) => Err(malformed(format!(
                "`ts` {s:?} is outside 1970-01-01..2200-01-01"
            ))),
            None => Err(malformed(format!(
                "`ts` {s:?} is not RFC 3339 with seconds and an offset"
            ))),
        },
        Some(other) => Err(malformed(format!(
            "`ts` must be RFC 3339 or integer milliseconds, got {}",
            other.kind()
        ))),
    }
}

pub fn valid_metric_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn metrics(v: Option<Val<'_>>) -> Result<Vec<(String, i64)>, Refusal> {
    let entries = match v {
        None | Some(Val::Null) => return Ok(Vec::new()),
        Some(Val::Map(e)) => e,
        Some(other) => {
            return Err(malformed(format!(
                "`metrics` must be an object, got {}",
                other.kind()
            )))
        }
    };
    let mut out = Vec::with_capacity(entries.len());
    let mut non_integer = None;
    for (name, v) in entries {
        if !valid_metric_name(&name) {
            return Err(malformed(format!(
                "metric name {name:?} does not match [A-Za-z0-9_.-]{{1,64}}"
            )));
        }
        match v {
            Val::Int(Some(i)) => out.push((name.into_owned(), i)),
            Val::Int(None) => {
                return Err(malformed(format!(
                    "metric {name:?} is outside the signed 64-bit range"
                )))
            }
            Val::Float => non_integer = non_integer.or(Some(name.into_owned())),
            other => {
                return Err(malformed(format!(
                    "metric {name:?} must be a number, got {}",
                    other.kind()
                )))
            }
        }
    }
    match non_integer {
        Some(name) => Err(Refusal::NonIntegerMetric(name)),
        None => Ok(out),
    }
}

fn validate(f: Fields<'_>) -> Result<Record, Refusal> {
    let typ = match f.typ {
        Some(Val::Str(s)) => s,
        None => return Err(malformed("`type` is missing")),
        Some(other) => {
            return Err(malformed(format!(
                "`type` must be a string, got {}",
                other.kind()
            )))
        }
    };
    const TYPES: [&str; 7] = [
        "define_tenant",
        "define_hierarchy",
        "upsert_node",
        "delete_node",
        "suspend_entity",
        "resume_entity",
        "event",
    ];
    if !TYPES.contains(&&*typ) {
        return Err(Refusal::UnknownType(typ.into_owned()));
    }
    let tenant = id("tenant", f.tenant)?;
    Ok(match &*typ {
        "event" => {
            let event_id = id("event_id", f.event_id)?;
            let entity = id("entity", f.entity)?;
            let ts = ts(f.ts)?;
            let metrics = metrics(f.metrics)?;
            Record::Event {
                tenant,
                event_id,
                entity,
                ts,
                metrics,
            }
        }
        "define_tenant" => {
            let timezone = match f.timezone {
                None | Some(Val::Null) => None,
                Some(Val::Str(s)) if !s.is_empty() => Some(s.into_owned()),
                Some(Val::Str(_)) => return Err(malformed("`timezone` is empty")),
                Some(other) => {
                    return Err(malformed(format!(
                        "`timezone` must be a string, got {}",
                        other.kind()
                    )))
                }
            };
            Record::DefineTenant { tenant, timezone }
        }
        "define_hierarchy" => {
            let hierarchy = id("hierarchy", f.hierarchy)?;
            let mode = match f.mode {
                None | Some(Val::Null) => Mode::Current,
                Some(Val::Str(s)) if s == "current" => Mode::Current,
                Some(Val::Str(s)) if s == "attributed" => Mode::Attributed,
                Some(Val::Str(s)) => {
                    return Err(malformed(format!(
                        "`mode` must be \"current\" or \"attributed\", got {s:?}"
                    )))
                }
                Some(other) => {
                    return Err(malformed(format!(
                        "`mode` must be a string, got {}",
                        other.kind()
                    )))
                }
            };
            Record::DefineHierarchy {
                tenant,
                hierarchy,
                mode,
            }
        }
        "upsert_node" => {
            let hierarchy = id("hierarchy", f.hierarchy)?;
            let node = id("node", f.node)?;
            let parent = opt_id("parent", f.parent)?;
            Record::UpsertNode {
                tenant,
                hierarchy,
                node,
                parent,
            }
        }
        "delete_node" => {
            let hierarchy = id("hierarchy", f.hierarchy)?;
            let node = id("node", f.node)?;
            Record::DeleteNode {
                tenant,
                hierarchy,
                node,
            }
        }
        "suspend_entity" => Record::SuspendEntity {
            tenant,
            entity: id("entity", f.entity)?,
        },
        "resume_entity" => Record::ResumeEntity {
            tenant,
            entity: id("entity", f.entity)?,
        },
        _ => unreachable!("checked above"),
    })
}

/// Recovers a refusal carried through serde's error type by the JSON visitor.
pub fn refusal_from_json_error(e: &serde_json::Error) -> Option<Refusal> {
    let _ = e;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(s: &str) -> &'static str {
        match decode_json(s) {
            Ok(_) => "ok",
            Err(r) => r.reason(),
        }
    }

    #[test]
    fn shapes() {
        assert_eq!(reason("{not json"), "malformed");
        assert_eq!(reason("[1,2,3]"), "malformed");
        assert_eq!(reason("\"just a string\""), "malformed");
        assert_eq!(reason("{}"), "malformed");
        assert_eq!(
            reason(r#"{"type":"teleport","tenant":"t"}"#),
            "unknown_type"
        );
        assert_eq!(reason(r#"{"type":5}"#), "malformed");
        assert_eq!(reason(r#"{"type":"teleport"}"#), "unknown_type");
        assert_eq!(
            reason(r#"{"type":"event","tenant":"t","event_id":"x","entity":"a","ts":0}"#),
            "ok"
        );
        assert_eq!(
            reason(r#"{"type":"event","tenant":"t","event_id":"x","entity":5,"ts":0}"#),
            "malformed"
        );
        assert_eq!(
            reason(r#"{"type":"event","tenant":"t","event_id":"","entity":"a","ts":0}"#),
            "malformed"
        );
        assert_eq!(
            reason(
                r#"{"type":"event","tenant":"t","event_id":"x","entity":"a","ts":99999999999999999}"#
            ),
            "malformed"
        );
        assert_eq!(
            reason(r#"{"type":"event","tenant":"t","event_id":"x","entity":"a","ts":"yesterday"}"#),
            "malformed"
        );
        assert_eq!(
            reason(r#"{"type":"event","tenant":"t","event_id":"x","entity":"a","ts":1.5}"#),
            "malformed"
        );
        assert_eq!(
            reason(r#"{"type":"event","tenant":"t","event_id":"x","entity":"a","ts":true}"#),
            "malformed"
        );
    }

    #[test]
    fn metrics_classification() {
        let ev = |m: &str| {
            format!(
                r#"{{"type":"event","tenant":"t","event_id":"x","entity":"a","ts":0,"metrics":{m}}}"#
            )
        };
        assert_eq!(reason(&ev(r#"{"amount":12}"#)), "ok");
        assert_eq!(reason(&ev(r#"{"amount":12.5}"#)), "non_integer_metric");
        assert_eq!(reason(&ev(r#"{"amount":1e3}"#)), "non_integer_metric");
        assert_eq!(reason(&ev(r#"{"amount":12.0}"#)), "non_integer_metric");
        assert_eq!(reason(&ev(r#"{"amount":"12"}"#)), "malformed");
        assert_eq!(reason(&ev(r#"{"amount":NaN}"#)), "malformed");
        assert_eq!(reason(&ev(r#"{"bad name!":1}"#)), "malformed");
        assert_eq!(
            reason(&ev(r#"{"a":1.5,"b":"x"}"#)),
            "malformed",
            "any non-number wins over a fraction"
        );
        assert_eq!(reason(&ev(r#"{"a":99999999999999999999}"#)), "malformed");
        assert_eq!(
            reason(&ev(r#"{"a":9223372036854775807,"b":-9223372036854775808}"#)),
            "ok"
        );
        assert_eq!(
            reason(&ev(r#"{"a":1.5,"a":2}"#)),
            "ok",
            "last value of a repeated key wins"
        );
        assert_eq!(reason(&ev("null")), "ok");
        assert_eq!(reason(&ev("[1]")), "malformed");
    }

    #[test]
    fn optional_nulls_and_modes() {
        assert_eq!(
            reason(r#"{"type":"define_hierarchy","tenant":"t","hierarchy":"h","mode":"sideways"}"#),
            "malformed"
        );
        assert_eq!(
            reason(r#"{"type":"define_hierarchy","tenant":"t","hierarchy":"h","mode":null}"#),
            "ok"
        );
        assert_eq!(
            reason(
                r#"{"type":"upsert_node","tenant":"t","hierarchy":"h","node":"","parent":null}"#
            ),
            "malformed"
        );
        assert_eq!(
            reason(
                r#"{"type":"upsert_node","tenant":"t","hierarchy":"h","node":"a","parent":null}"#
            ),
            "ok"
        );
        assert_eq!(
            reason(r#"{"type":"define_tenant","tenant":"t","timezone":""}"#),
            "malformed"
        );
        assert_eq!(
            reason(r#"{"type":"define_tenant","tenant":"t","timezone":7}"#),
            "malformed"
        );
        let long = "x".repeat(257);
        assert_eq!(
            reason(&format!(
                r#"{{"type":"suspend_entity","tenant":"t","entity":"{long}"}}"#
            )),
            "malformed"
        );
        assert_eq!(
            reason(r#"{"type":"define_tenant","tenant":"t","extra":[1,{"deep":true}]}"#),
            "ok"
        );
        assert_eq!(
            reason(r#"{"type":"define_tenant","tenant":"a","tenant":"b"}"#),
            "ok"
        );
        match decode_json(r#"{"type":"define_tenant","tenant":"a","tenant":"b"}"#).unwrap() {
            Record::DefineTenant { tenant, .. } => assert_eq!(tenant, "b"),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn msgpack_matches_json() {
        #[derive(Serialize)]
        struct Ev<'a> {
            #[serde(rename = "type")]
            typ: &'a str,
            tenant: &'a str,
            event_id: &'a str,
            entity: &'a str,
            ts: i64,
            metrics: std::collections::BTreeMap<&'a str, f64>,
        }
        let mut m = std::collections::BTreeMap::new();
        m.insert("amount", 12.0);
        let bytes = rmp_serde::to_vec_named(&Ev {
            typ: "event",
            tenant: "t",
            event_id: "x",
            entity: "a",
            ts: 0,
            metrics: m,
        })
        .unwrap();
        assert_eq!(decode(&bytes).unwrap_err().reason(), "non_integer_metric");
        let rec = serde_json::json!({"type":"event","tenant":"t","event_id":"x","entity":"a","ts":1000,"metrics":{"amount":-5}});
        let bytes = rmp_serde::to_vec_named(&rec).unwrap();
        assert_eq!(
            decode(&bytes).unwrap(),
            Record::Event {
                tenant: "t".into(),
                event_id: "x".into(),
                entity: "a".into(),
                ts: 1_000_000,
                metrics: vec![("amount".into(), -5)]
            }
        );
        assert_eq!(decode(&[0x81, 0xc1]).unwrap_err().reason(), "malformed");
    }
}
