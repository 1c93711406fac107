//! The dependency rules of ARCHITECTURE.md, checked on the source text so that a new `use`
//! breaking them fails here rather than in review: the modules of `canopy-actors` form no
//! cycle, and the adapters of `canopy` (file and demo sources, Kafka, stores, API) know
//! nothing of the commands, the configuration tree or (but the API itself) the API.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its comments (line comments, doc comments), where paths in
/// prose are not dependencies.
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split_once("//").map_or(l, |(c, _)| c))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules of the crate that `text` names as `crate::NAME` (also inside
/// `use crate::{a, b::c}` groups).
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(inner.split(',').map(|s| ident(s.trim())));
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|s| !s.is_empty() && s != "self");
    out
}

/// The top-level module a source file belongs to (`engine/dispatch.rs` → `engine`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

#[test]
fn the_core_modules_form_no_cycle() {
    let src = root().join("actors/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let m = module_of(&src, f);
        if m == "lib" {
            continue;
        }
        let refs = crate_refs(&code(f));
        graph
            .entry(m.clone())
            .or_default()
            .extend(refs.into_iter().filter(|r| *r != m));
    }
    // Depth-first search; a back edge is a cycle, reported as its path.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Result<(), String> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Err(cycle.join(" → "));
        }
        if done.contains(m) {
            return Ok(());
        }
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            visit(d, graph, path, done)?;
        }
        path.pop();
        done.insert(m.to_string());
        Ok(())
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Err(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("canopy-actors has an import cycle: {cycle}\ngraph: {graph:#?}");
        }
    }
}

#[test]
fn adapters_know_nothing_of_commands_configuration_or_the_api() {
    let src = root().join("src");
    let mut files = Vec::new();
    for adapter in ["file_source.rs", "demo_source.rs", "kafka", "store", "api"] {
        let p = src.join(adapter);
        if p.is_dir() {
            rust_files(&p, &mut files);
        } else if p.exists() {
            files.push(p);
        }
    }
    assert!(files.len() > 5, "the adapters moved: {files:?}");
    let mut bad = Vec::new();
    for f in &files {
        let own = module_of(&src, f);
        for r in crate_refs(&code(f)) {
            let forbidden = ["config", "app", "cmd", "api"].contains(&r.as_str()) && r != own;
            if forbidden {
                bad.push(format!(
                    "{} uses crate::{r}",
                    f.strip_prefix(root()).unwrap().display()
                ));
            }
        }
    }
    assert!(bad.is_empty(), "adapters importing the app layer: {bad:#?}");
}
