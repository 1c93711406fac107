//! A reference model of canopy's contract ([docs/SPEC.md](../../docs/SPEC.md)): a brute-force
//! fold of an input stream into the dump and dead letters the engine must end up with, and the
//! comparison the conformance check uses. It does what `oracle.py` and `compare.py` of the
//! shared conformance kit do, in Rust, so that the repository can check itself.
//!
//! It shares no code with the engine on purpose: it is simple and slow where the engine is
//! incremental and fast, so that a bug would have to be made twice, differently, to pass.
//! Where the contract and the Python oracle differ at the edges (an identifier's length is
//! counted in bytes, not characters; MessagePack lines; lone surrogates), it follows
//! docs/SPEC.md.

pub mod compare;
pub mod fold;
pub mod json;
pub mod time;

pub use compare::{compare, load_dead_letters, load_dump, CompareError, Matched, Mismatch};
pub use fold::{fold, Expected};

use std::collections::BTreeMap;

impl Expected {
    /// The dump as NDJSON, in dump order.
    pub fn dump_text(&self) -> String {
        self.dump.iter().map(|r| r.to_text() + "\n").collect()
    }

    /// The dead letters as NDJSON (`line` and `reason` only).
    pub fn dead_letters_text(&self) -> String {
        self.dead_letters
            .iter()
            .map(|(line, reason)| format!("{{\"line\": {line}, \"reason\": \"{reason}\"}}\n"))
            .collect()
    }

    /// The tenants' final watermarks as one JSON object (ms), like `oracle.py --watermarks`.
    pub fn watermarks_text(&self) -> String {
        let m: BTreeMap<String, json::J> = self
            .watermarks
            .iter()
            .map(|(t, w)| (t.clone(), json::J::int((*w).into())))
            .collect();
        json::J::Obj(m).to_text()
    }
}

/// Parses `oracle.py --watermarks` output (or [`Expected::watermarks_text`]).
pub fn load_watermarks(text: &str) -> Option<BTreeMap<String, i64>> {
    let json::J::Obj(m) = json::parse(text)? else {
        return None;
    };
    m.into_iter()
        .map(|(t, v)| match v {
            json::J::Num(json::Num::Int(ms)) => Some((t, i64::try_from(ms).ok()?)),
            _ => None,
        })
        .collect()
}
