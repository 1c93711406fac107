//! `canopy demo`: the engine, the store and the API in one process, fed by a live synthetic
//! workload ([`crate::demo_source`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use canopy_actors::engine::Engine;
use canopy_actors::source::DiscardDeadLetters;
use canopy_actors::store::{Store, StoreRead};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::api::engine::EngineStatus;
use crate::api::Tokens;
use crate::app::{run_until_shutdown, shutdown_on_signals, spawn_api};
use crate::config::Config;
use crate::demo_source::DemoSource;
use crate::loadgen::LoadgenConfig;

pub fn workload(cfg: &Config) -> LoadgenConfig {
    let d = &cfg.demo;
    LoadgenConfig {
        seed: d.seed,
        tenants: d.tenants,
        hierarchies: d.hierarchies,
        depth: d.depth,
        fanout: d.fanout,
        events: usize::MAX,
        churn: d.churn,
        bad: d.bad,
        live: true,
        // The demo runs for minutes or days and must look the same throughout.
        steady: true,
        ..Default::default()
    }
}

pub async fn run(cfg: Config, metrics: Option<PrometheusHandle>) -> anyhow::Result<()> {
    let stop = shutdown_on_signals();
    let store = crate::store::open_single(&cfg.store, &cfg.data_dir).await?;
    let token_spec = if cfg.api.tokens.trim().is_empty() {
        "demo=*".to_string()
    } else {
        cfg.api.tokens.clone()
    };
    let tokens = Tokens::parse(&token_spec)?;
    let ready = Arc::new(AtomicBool::new(false));
    let engine_status = EngineStatus::new(cfg.engine.settings.checkpoint_interval_ms);
    let (addr, api) = spawn_api(
        &cfg.api,
        store.clone() as Arc<dyn StoreRead>,
        tokens,
        metrics,
        ready.clone(),
        engine_status.clone(),
        stop.clone(),
    )
    .await?;
    let all_tenants = token_spec
        .split(',')
        .find_map(|e| e.trim().strip_suffix("=*"));
    let shown_token = all_tenants.unwrap_or("(see api.tokens)").to_string();
    // The page takes the token from the link once, then keeps it out of the URL.
    let query = all_tenants
        .map(|t| format!("?token={}", crate::api::query_escape(t)))
        .unwrap_or_default();
    println!("canopy demo: dashboard at http://{addr}/{query}  (API token: {shown_token})");
    println!(
        "canopy demo: try  curl -H 'Authorization: Bearer {shown_token}' http://{addr}/v1/tenants"
    );
    let mut source = DemoSource::new(workload(&cfg), cfg.demo.records_per_sec);
    let mut engine = Engine::open(
        cfg.engine(),
        store.clone() as Arc<dyn Store>,
        &mut source,
        Box::new(DiscardDeadLetters),
    )
    .await?;
    ready.store(true, Ordering::Release);
    engine_status.attach(&engine.stats);
    let stats = engine.stats.clone();
    let done = Arc::new(AtomicBool::new(false));
    let status = {
        let (store, done) = (store.clone(), done.clone());
        tokio::spawn(async move {
            let last = AtomicU64::new(0);
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                let recs = stats.records.load(Ordering::Relaxed);
                let rate = (recs - last.swap(recs, Ordering::Relaxed)) / 5;
                let (tenants, nodes, as_of) = census(store.as_ref()).await.unwrap_or_default();
                println!(
                    "canopy demo: {recs} records ({rate}/s), {tenants} tenants, {nodes} nodes, {} dead letters, checkpoint {as_of}",
                    stats.refused.load(Ordering::Relaxed)
                );
            }
        })
    };
    let r = run_until_shutdown(&mut engine, &mut source, &stop).await;
    done.store(true, Ordering::Relaxed);
    status.abort();
    r?;
    api.await??;
    println!("canopy demo: stopped after a final checkpoint");
    Ok(())
}

/// Tenants, nodes and the checkpoint the numbers come from, for the status line.
async fn census(
    store: &dyn StoreRead,
) -> Result<(usize, u64, u64), canopy_actors::store::StoreError> {
    let t = store.tenant_ids().await?;
    let mut nodes = 0;
    for id in &t.value {
        if let Some(hs) = store.hierarchies(id).await?.value {
            nodes += hs.iter().map(|h| h.nodes).sum::<u64>();
        }
    }
    Ok((t.value.len(), nodes, t.as_of))
}
