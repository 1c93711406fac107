//! The model on the public conformance case (the repository's copy in
//! tests/fixtures/conformance) gives exactly the expected dump and dead letters, which the
//! shared oracle computed: the model is checked against data it did not make.

use std::path::PathBuf;

use canopy_model::{compare, fold, load_dead_letters, load_dump};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/conformance")
        .join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).unwrap()
}

#[test]
fn the_model_reproduces_the_public_case() {
    let exp = fold(&std::fs::read(fixture("input.ndjson")).unwrap());
    let want = load_dump(&read("expected-dump.ndjson"), "expected-dump.ndjson").unwrap();
    let want_dl = load_dead_letters(&read("expected-dlq.ndjson"), "expected-dlq.ndjson").unwrap();
    let got = load_dump(&exp.dump_text(), "model dump").unwrap();
    let got_dl = load_dead_letters(&exp.dead_letters_text(), "model dead letters").unwrap();
    let m = compare(want, &got, &want_dl, &got_dl, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.nodes, got.len());
    assert!(m.nodes > 0 && m.dead_letters > 0, "{m}");
    // Byte for byte the same row order as the expected file (sorted by tenant, hierarchy, node).
    let keys = |text: &str| load_dump(text, "").unwrap().into_keys().collect::<Vec<_>>();
    assert_eq!(keys(&exp.dump_text()), keys(&read("expected-dump.ndjson")));
}
