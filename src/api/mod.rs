//! The query API (docs/SPEC.md §10): pre-aggregated numbers read from the store, per tenant, with
//! bearer-token auth; plus `/metrics`, `/healthz`, `/readyz`, the OpenAPI document and the
//! dashboard page.
//!
//! - [`auth`]: tokens → tenants, the `Access` extractor.
//! - [`engine`]: the engine panel's numbers (`/v1/engine`).
//! - [`v1`]: the read endpoints.
//! - [`error`]: the JSON error shape.
//! - [`extract`]: path/query extractors that answer bad input with JSON 400s.
//! - [`server`]: the HTTP/1 server with connection, time and size limits.

pub mod auth;
pub mod engine;
pub mod error;
pub mod extract;
pub mod server;
pub mod v1;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use canopy_actors::store::StoreRead;
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa::OpenApi;

pub use auth::{Access, Tokens};
pub use error::ApiError;

pub struct ApiState {
    pub store: Arc<dyn StoreRead>,
    pub tokens: Tokens,
    /// Renders `/metrics`; None when no Prometheus recorder is installed (tests).
    pub metrics: Option<PrometheusHandle>,
    /// Set once the engine (if any) has restored its state and runs.
    pub ready: Arc<AtomicBool>,
    /// The process's engines, for `/v1/engine` (none attached in `serve`).
    pub engine: Arc<engine::EngineStatus>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "canopy query API", description = "Pre-aggregated hierarchy numbers, per tenant (docs/SPEC.md section 10)."),
    paths(engine::engine, v1::tenants, v1::hierarchies, v1::roots, v1::node, v1::children, v1::series, v1::entity),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// The `api` section of the configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiOptions {
    pub listen: String,
    /// `TOKEN=TENANT,TOKEN=*`. `canopy demo` uses `demo=*` when this is empty.
    pub tokens: String,
    /// Connections served at once. Past it, `reserve_connections` more are accepted for
    /// `/healthz`, `/readyz` and `/metrics` only (others answer 503; their head must arrive
    /// within 1 s), and the rest are refused at once: held connections cannot starve the
    /// health checks.
    pub max_connections: usize,
    pub reserve_connections: usize,
    /// A request's head (request line and headers) must arrive within this, counted from its
    /// first byte (from the connection's start for a new connection); else 408 and close.
    pub header_read_timeout_ms: u64,
    /// A keep-alive connection with no request in progress is closed after this.
    pub idle_timeout_ms: u64,
    /// The longest request target (path and query) answered; longer: 414.
    pub max_uri_bytes: usize,
    /// The most bytes of request headers, and the most headers; more: 431.
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// The largest declared request body (`Content-Length`); larger: 413. The API reads no
    /// bodies.
    pub max_body_bytes: u64,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            listen: "127.0.0.1:8080".into(),
            tokens: String::new(),
            // Below the usual 1024 open files per process, with room for the stores' files.
            max_connections: 512,
            reserve_connections: 16,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_uri_bytes: 8 * 1024,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_body_bytes: 64 * 1024,
        }
    }
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document as pretty JSON (also committed as `schemas/openapi.json`).
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

const DASHBOARD: &str = include_str!("dashboard.html");

/// `s` percent-encoded for a URL's query (everything but unreserved characters).
pub fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/engine", get(engine::engine))
        .route("/v1/tenants", get(v1::tenants))
        .route("/v1/tenants/{tenant}/hierarchies", get(v1::hierarchies))
        .route(
            "/v1/tenants/{tenant}/hierarchies/{hierarchy}/roots",
            get(v1::roots),
        )
        .route(
            "/v1/tenants/{tenant}/hierarchies/{hierarchy}/nodes/{node}",
            get(v1::node),
        )
        .route(
            "/v1/tenants/{tenant}/hierarchies/{hierarchy}/nodes/{node}/children",
            get(v1::children),
        )
        .route(
            "/v1/tenants/{tenant}/hierarchies/{hierarchy}/nodes/{node}/series",
            get(v1::series),
        )
        .route("/v1/tenants/{tenant}/entities/{entity}", get(v1::entity));
    v1.route("/", get(|| async { Html(DASHBOARD) }))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::not_found("no such path") })
        .layer(axum::middleware::from_fn(observe))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(Arc::new(state))
}

/// Every error answer in the API's JSON shape, also those axum makes by itself (405 for a
/// method a route does not have, with its `Allow` header; a missing recorder's 404).
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let detail = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let mut out = ApiError::for_status(status, &detail).into_response();
    for h in [header::ALLOW, header::WWW_AUTHENTICATE, header::RETRY_AFTER] {
        if let Some(v) = parts.headers.remove(&h) {
            out.headers_mut().insert(h, v);
        }
    }
    out
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

async fn metrics(State(st): State<Arc<ApiState>>) -> Response {
    match &st.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no metrics recorder installed").into_response(),
    }
}

/// Ready when the engine (if any) runs and the store answers a read.
async fn readyz(State(st): State<Arc<ApiState>>) -> Response {
    if !st.ready.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "starting"})),
        )
            .into_response();
    }
    match st.store.tenant_ids().await {
        Ok(r) => Json(serde_json::json!({"status": "ready", "as_of": r.as_of})).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "store unavailable", "error": e.to_string()})),
        )
            .into_response(),
    }
}

/// Request latency and count per route template (bounded labels: never the raw path).
async fn observe(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::histogram!("canopy_api_request_seconds", "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("canopy_api_requests_total", "route" => route, "status" => status)
        .increment(1);
    resp
}
