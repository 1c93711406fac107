//! The comparison of an engine's dump and dead letters with the expected ones: the rules of
//! `compare.py` (docs/SPEC.md section 11), so that a result means the same with either.
//!
//! Rows are matched by (tenant, hierarchy, node); key order and row order do not matter; every
//! value must be equal with the same JSON type. Dead letters are compared as (line, reason)
//! pairs. With watermarks, a bucket starting more than its retention before its tenant's
//! final watermark may be missing from the actual dump; when present it must still match.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::fold::{GRANULARITIES, RETENTION_SECS};
use crate::json::{self, J};
use crate::time;

/// A dump that cannot be compared at all.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("{what}:{line}: not a dump row")]
    NotARow { what: String, line: usize },
    #[error("{what}:{line}: row {key:?} appears twice")]
    Twice {
        what: String,
        line: usize,
        key: RowKey,
    },
    #[error("{what}:{line}: not a dead letter")]
    NotADeadLetter { what: String, line: usize },
}

/// The results differ: the first differences, as `compare.py` prints them.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.report())]
pub struct Mismatch {
    pub problems: Vec<String>,
    pub expected_nodes: usize,
}

impl Mismatch {
    fn report(&self) -> String {
        let mut out: Vec<String> = self.problems.iter().take(25).cloned().collect();
        out.push(format!(
            "{} differences; {} nodes expected",
            self.problems.len(),
            self.expected_nodes
        ));
        out.join("\n")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error(transparent)]
    Dump(#[from] DumpError),
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
}

/// What matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched {
    pub nodes: usize,
    pub dead_letters: usize,
}

impl fmt::Display for Matched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "conformance: {} nodes match, {} dead letters match",
            self.nodes, self.dead_letters
        )
    }
}

pub type RowKey = (String, String, String);
pub type Rows = BTreeMap<RowKey, J>;
pub type DeadLetters = BTreeSet<(u64, String)>;

/// Dump rows by key; `what` names the text in errors.
pub fn load_dump(text: &str, what: &str) -> Result<Rows, DumpError> {
    let mut rows = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = || DumpError::NotARow {
            what: what.into(),
            line: i + 1,
        };
        let row = json::parse(line).ok_or_else(err)?;
        let field = |k| {
            row.get(k)
                .and_then(J::str)
                .map(str::to_string)
                .ok_or_else(err)
        };
        let key = (field("tenant")?, field("hierarchy")?, field("node")?);
        if rows.contains_key(&key) {
            return Err(DumpError::Twice {
                what: what.into(),
                line: i + 1,
                key,
            });
        }
        rows.insert(key, row);
    }
    Ok(rows)
}

/// Dead letters as (line, reason); other fields are ignored.
pub fn load_dead_letters(text: &str, what: &str) -> Result<DeadLetters, DumpError> {
    let mut out = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = || DumpError::NotADeadLetter {
            what: what.into(),
            line: i + 1,
        };
        let r = json::parse(line).ok_or_else(err)?;
        let n = match r.get("line") {
            Some(J::Num(json::Num::Int(n))) => u64::try_from(*n).map_err(|_| err())?,
            _ => return Err(err()),
        };
        out.insert((
            n,
            r.get("reason")
                .and_then(J::str)
                .ok_or_else(err)?
                .to_string(),
        ));
    }
    Ok(out)
}

/// Compares; `watermarks` (tenant → ms) allows buckets out of retention to be missing.
pub fn compare(
    mut expected: Rows,
    actual: &Rows,
    expected_dl: &DeadLetters,
    actual_dl: &DeadLetters,
    watermarks: Option<&BTreeMap<String, i64>>,
) -> Result<Matched, Mismatch> {
    if let Some(w) = watermarks {
        drop_expired(&mut expected, actual, w);
    }
    let mut problems = Vec::new();
    for key in expected.keys().filter(|k| !actual.contains_key(*k)) {
        problems.push(format!("missing node {key:?}"));
    }
    for key in actual.keys().filter(|k| !expected.contains_key(*k)) {
        problems.push(format!("unexpected node {key:?}"));
    }
    for (key, exp) in &expected {
        if let Some(d) = actual.get(key).and_then(|act| first_diff(exp, act, "")) {
            problems.push(format!("{key:?}{d}"));
        }
    }
    for (line, reason) in expected_dl.difference(actual_dl) {
        problems.push(format!("dead letter missing: line {line} ({reason})"));
    }
    for (line, reason) in actual_dl.difference(expected_dl) {
        problems.push(format!("dead letter not expected: line {line} ({reason})"));
    }
    if problems.is_empty() {
        Ok(Matched {
            nodes: expected.len(),
            dead_letters: expected_dl.len(),
        })
    } else {
        Err(Mismatch {
            problems,
            expected_nodes: expected.len(),
        })
    }
}

/// Removes from the expected rows the out-of-retention buckets that the actual rows lack.
fn drop_expired(expected: &mut Rows, actual: &Rows, watermarks: &BTreeMap<String, i64>) {
    for (key, row) in expected.iter_mut() {
        let (Some(&wm), Some(got)) = (watermarks.get(&key.0), actual.get(key)) else {
            continue;
        };
        let J::Obj(fields) = row else { continue };
        let Some(J::Obj(buckets)) = fields.get_mut("buckets") else {
            continue;
        };
        for (g, retention) in GRANULARITIES.iter().zip(RETENTION_SECS) {
            let Some(J::Obj(mine)) = buckets.get_mut(*g) else {
                continue;
            };
            let theirs = got.get("buckets").and_then(|b| b.get(g));
            mine.retain(|k, _| {
                let present = theirs.and_then(|t| t.get(k)).is_some();
                let expired =
                    time::key_start_ms(k).is_some_and(|start| start < wm - retention * 1000);
                present || !expired
            });
        }
    }
}

/// The first difference between two values, as a path and both sides; `None` when equal.
fn first_diff(a: &J, b: &J, path: &str) -> Option<String> {
    if let (J::Obj(a), J::Obj(b)) = (a, b) {
        let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        return keys.into_iter().find_map(|k| match (a.get(k), b.get(k)) {
            (None, Some(v)) => Some(format!("{path}.{k}: unexpected {}", short(v))),
            (Some(v), None) => Some(format!("{path}.{k}: missing, expected {}", short(v))),
            (Some(x), Some(y)) => first_diff(x, y, &format!("{path}.{k}")),
            (None, None) => None,
        });
    }
    // `J`'s equality is by kind: an integer never equals a float, as in compare.py.
    (a != b).then(|| format!("{path}: expected {}, got {}", short(a), short(b)))
}

fn short(v: &J) -> String {
    v.to_text().chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str) -> Rows {
        load_dump(text, "test").unwrap()
    }

    const ROW: &str = r#"{"tenant":"t","hierarchy":"h","node":"n","parent":null,"own":{"events":1,"metrics":{}},"subtree":{"events":1,"metrics":{}},"buckets":{"minute":{"2026-01-01T00:00:00Z":{"events":1,"metrics":{}}},"hour":{},"day":{}}}"#;

    #[test]
    fn equal_rows_match_and_any_change_does_not() {
        let none = DeadLetters::new();
        let m = compare(rows(ROW), &rows(ROW), &none, &none, None).unwrap();
        assert_eq!(
            m,
            Matched {
                nodes: 1,
                dead_letters: 0
            }
        );
        for changed in [
            ROW.replace(r#""own":{"events":1"#, r#""own":{"events":2"#),
            ROW.replace(r#""own":{"events":1"#, r#""own":{"events":1.0"#),
            ROW.replace(r#""parent":null"#, r#""parent":"p""#),
            ROW.replace(r#""node":"n""#, r#""node":"m""#),
            ROW.replace(r#""hour":{}"#, r#""hour":{},"x":1"#),
        ] {
            assert!(
                compare(rows(ROW), &rows(&changed), &none, &none, None).is_err(),
                "{changed}"
            );
        }
        assert!(matches!(
            load_dump(&format!("{ROW}\n{ROW}"), "t"),
            Err(DumpError::Twice { .. })
        ));
    }

    #[test]
    fn dead_letters_are_line_and_reason_pairs() {
        let a =
            load_dead_letters(r#"{"line": 3, "reason": "malformed", "record": "x"}"#, "a").unwrap();
        let b = load_dead_letters(r#"{"line": 3, "reason": "malformed"}"#, "b").unwrap();
        let c = load_dead_letters(r#"{"line": 4, "reason": "malformed"}"#, "c").unwrap();
        assert!(compare(Rows::new(), &Rows::new(), &a, &b, None).is_ok());
        let e = compare(Rows::new(), &Rows::new(), &a, &c, None).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
    }

    #[test]
    fn watermarks_excuse_only_missing_buckets_out_of_retention() {
        let none = DeadLetters::new();
        let without = ROW.replace(
            r#"{"2026-01-01T00:00:00Z":{"events":1,"metrics":{}}}"#,
            "{}",
        );
        let start_ms = time::key_start_ms("2026-01-01T00:00:00Z").unwrap();
        let limit = 48 * 3600 * 1000;
        for (wm, ok) in [(start_ms + limit, false), (start_ms + limit + 1, true)] {
            let w = BTreeMap::from([("t".to_string(), wm)]);
            assert_eq!(
                compare(rows(ROW), &rows(&without), &none, &none, Some(&w)).is_ok(),
                ok,
                "{wm}"
            );
        }
        // A bucket present must match even when it is out of retention.
        let wrong = ROW.replace(
            r#"{"2026-01-01T00:00:00Z":{"events":1"#,
            r#"{"2026-01-01T00:00:00Z":{"events":2"#,
        );
        let w = BTreeMap::from([("t".to_string(), start_ms + 10 * limit)]);
        assert!(compare(rows(ROW), &rows(&wrong), &none, &none, Some(&w)).is_err());
    }
}
