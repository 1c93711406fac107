//! `canopy serve`: the API and the dashboard from a store another process writes.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use canopy_actors::store::StoreRead;

use crate::api::engine::EngineStatus;
use crate::api::Tokens;
use crate::app::{shutdown_on_signals, spawn_api};
use crate::config::Config;
use crate::store::{open_all_stores, MultiRead};

pub async fn run(cfg: &Config) -> anyhow::Result<()> {
    super::require_store(cfg)?;
    let multi = MultiRead::default();
    for (name, s) in open_all_stores(&cfg.store, &cfg.data_dir).await? {
        multi.insert(name, s as Arc<dyn StoreRead>);
    }
    let store = Arc::new(multi);
    let tokens = Tokens::parse(&cfg.api.tokens)?;
    if tokens.is_empty() {
        tracing::warn!("no API tokens configured (api.tokens / CANOPY_API_TOKENS): every /v1 request will get 401");
    }
    let metrics = crate::telemetry::install_metrics()?;
    let stop = shutdown_on_signals();
    let (addr, api) = spawn_api(
        &cfg.api,
        store as Arc<dyn StoreRead>,
        tokens,
        Some(metrics),
        Arc::new(AtomicBool::new(true)),
        // No engine here: the store is written by another process.
        EngineStatus::new(cfg.engine.settings.checkpoint_interval_ms),
        stop,
    )
    .await?;
    println!("canopy serve: query API and dashboard at http://{addr}/");
    api.await??;
    Ok(())
}
