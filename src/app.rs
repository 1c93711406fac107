//! Wiring shared by the long-running commands: shutdown on signals, a source that ends at
//! shutdown (so the engine takes its final checkpoint), and the API server task.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use canopy_actors::engine::{Engine, EngineError};
use canopy_actors::source::{Source, SourceBatch, SourceError};
use canopy_actors::store::StoreRead;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::ApiOptions;
use crate::api::{self, ApiState, Tokens};

/// A flag that turns true on SIGTERM or SIGINT (Ctrl-C).
pub fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => tracing::info!(signal = "SIGINT", "shutting down"),
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        let _ = tx.send(true);
    });
    rx
}

/// Resolves once `stop` is true.
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs `engine` on `source` until the source ends or `stop` turns true, then stops its actors.
/// Either way the engine took its final checkpoint (a stop ends the source early, see
/// [`UntilShutdown`]), so the next run resumes from it.
pub async fn run_until_shutdown(
    engine: &mut Engine,
    source: &mut dyn Source,
    stop: &watch::Receiver<bool>,
) -> Result<(), EngineError> {
    let r = engine
        .run(&mut UntilShutdown {
            inner: source,
            stop: stop.clone(),
        })
        .await;
    engine.shutdown().await;
    r
}

/// A source that ends when `stop` turns true. The engine then takes its final checkpoint, which
/// covers exactly the batches it processed: a batch not yet taken stays unread, for next time.
pub struct UntilShutdown<'a> {
    pub inner: &'a mut dyn Source,
    pub stop: watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl Source for UntilShutdown<'_> {
    async fn resume(&mut self, position: Option<&[u8]>) -> Result<(), SourceError> {
        self.inner.resume(position).await
    }

    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError> {
        if *self.stop.borrow() {
            return Ok(None);
        }
        // Both sources' `next_batch` are channel receives, which are cancel-safe.
        tokio::select! {
            b = self.inner.next_batch() => b,
            _ = self.stop.wait_for(|s| *s) => Ok(None),
        }
    }
}

/// Binds the API's address now (so a busy port fails at start) and serves it in a task until
/// `stop` turns true, with the connection, time and size limits of `cfg`.
pub async fn spawn_api(
    cfg: &ApiOptions,
    store: Arc<dyn StoreRead>,
    tokens: Tokens,
    metrics: Option<PrometheusHandle>,
    ready: Arc<AtomicBool>,
    engine: Arc<api::engine::EngineStatus>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let listen = cfg.listen.as_str();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding the API to {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let router = api::router(ApiState {
        store,
        tokens,
        metrics,
        ready,
        engine,
    });
    tracing::info!(%addr, "query API listening");
    let limits = api::server::Limits::from(cfg);
    let task = tokio::spawn(api::server::serve(listener, router, limits, stop));
    Ok((addr, task))
}
