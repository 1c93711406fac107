//! `canopy audit` on a real store: clean after the conformance case, and it reports a
//! node whose stored subtree no longer equals own + children.

mod support;

use std::sync::Arc;

use canopy::store::EmbeddedStore;
use canopy_actors::store::{Checkpoint, Store, TenantChanges};
use support::*;

#[test]
fn audit_passes_on_ingested_state_and_catches_a_tampered_node() {
    let dir = tempfile::tempdir().unwrap();
    let c = conformance_dir();
    let data = dir.path().join("data");
    ingest(
        &c.join("input.ndjson"),
        &data,
        &["--checkpoint-every-records", "500"],
    );
    let out = run_ok(canopy().arg("audit").arg("--data-dir").arg(&data));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("655 nodes checked, 0 violations"), "{text}");

    // Tamper: add one event to the subtree total of a node that has children.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = EmbeddedStore::open(&data).unwrap();
        let meta = store.meta().await.unwrap().unwrap();
        let img = store
            .load_tenant("t0", canopy_actors::store::Load::Buckets)
            .await
            .unwrap();
        let parent = img.nodes.iter().find_map(|n| n.parent.clone()).unwrap();
        let mut row = img.nodes.iter().find(|n| n.node == parent).unwrap().clone();
        row.header.subtree.events += 1;
        row.buckets = Default::default();
        let cp = Checkpoint {
            seq: meta.seq + 1,
            source: meta.source,
            tenants: vec![TenantChanges {
                tenant: "t0".into(),
                put_nodes: vec![row],
                ..Default::default()
            }],
        };
        store.commit(Arc::new(cp)).await.unwrap();
    });
    let out = canopy()
        .arg("audit")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "audit must fail on a violated invariant"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // The tampered node breaks its own equation and its parent's.
    assert!(
        !text.contains(" 0 violations") && text.contains("!= own + children"),
        "{text}"
    );
    assert!(text.contains(&format!("t0/h0/")), "{text}");
}
