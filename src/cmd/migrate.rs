//! `canopy migrate`: applies the Scylla schema (`schemas/cql`, idempotent) for `store.uri`.

use crate::config::Config;
use crate::store::scylla::{session, shard_keyspaces, ScyllaStore};
use crate::store::{scylla_options, StoreUri};

pub async fn run(cfg: &Config) -> anyhow::Result<()> {
    let StoreUri::Scylla { hosts, keyspace } = &cfg.store.uri else {
        println!("canopy migrate: the embedded store creates its tables itself; nothing to do");
        return Ok(());
    };
    let opts = scylla_options(&cfg.store);
    let session = session(hosts, &opts).await?;
    // The keyspace of `store.uri`, and the per-partition keyspaces `canopy run` made (it
    // creates new ones itself on first use).
    let mut keyspaces = vec![keyspace.clone()];
    keyspaces.extend(
        shard_keyspaces(&session, keyspace)
            .await?
            .into_iter()
            .map(|(_, k)| k),
    );
    for ks in keyspaces {
        let mut s = ScyllaStore::on_session(session.clone(), ks.clone(), &opts).await?;
        s.migrate().await?;
        println!("canopy migrate: schema applied to keyspace {ks}");
    }
    Ok(())
}
