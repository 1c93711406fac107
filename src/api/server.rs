//! The API's HTTP/1 server: hyper connections with the limits `axum::serve` does not have
//! (issue 24: a connection sending a partial head stayed open past 45 s, a silent one past
//! 90 s, and ~20,000 held connections made `/healthz` time out):
//!
//! - a cap on connections, with a small reserve beyond it that answers only `/healthz`,
//!   `/readyz` and `/metrics` (anything else: 503), and beyond that an immediate 503 and close;
//! - a header-read timeout (a request head must arrive within it, counted from its first
//!   byte, or from the connection's start) and an idle timeout for keep-alive connections;
//! - limits on the request target, the headers and a declared body.
//!
//! Every refusal is the API's JSON error. hyper answers a head it cannot parse or that exceeds
//! its own limits with an empty body, so each head is read here first ([`Gate`]): it is held
//! back from hyper until it is complete and checked with the same parser hyper uses
//! (`httparse`) and the same rules; a head hyper would refuse gets its JSON answer here and
//! the connection closes. Heads pipelined behind a passed one go to hyper unchecked.

use std::convert::Infallible;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::FutureExt as _;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt as _;

use super::error::ApiError;
use super::ApiOptions;

/// The longest request target hyper accepts (the `http` crate's limit); `api.max_uri_bytes`
/// may not exceed it, or hyper's own bodyless 414 would answer first.
pub const MAX_URI_BYTES: usize = 65_534;

/// Paths a reserve connection answers: what monitoring needs while the cap is reached.
const RESERVED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// How much more a refused client may send before its connection is closed (see
/// `GateState::Draining`).
const DRAIN_BYTES: usize = 1 << 20;

/// The header timeout of a reserve connection, at most.
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a connection refused at the header timeout gets to receive its 408.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How long a stopping server waits for its connections to finish their requests.
const DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub reserve_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_uri_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: u64,
}

impl From<&ApiOptions> for Limits {
    fn from(a: &ApiOptions) -> Self {
        Limits {
            max_connections: a.max_connections.max(1),
            reserve_connections: a.reserve_connections,
            header_read_timeout: Duration::from_millis(a.header_read_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(a.idle_timeout_ms.max(1)),
            max_uri_bytes: a.max_uri_bytes.min(MAX_URI_BYTES),
            max_header_bytes: a.max_header_bytes,
            max_headers: a.max_headers.max(1),
            max_body_bytes: a.max_body_bytes,
        }
    }
}

impl Limits {
    /// The most bytes a head may take before it is refused unread: the target, the headers
    /// and the request line's method, spaces and version.
    fn max_head_bytes(&self) -> usize {
        self.max_uri_bytes + self.max_header_bytes + 64
    }
}

/// Serves `router` on `listener` until `stop` turns true, then lets open requests finish
/// (for at most [`DRAIN`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let limits = Arc::new(limits);
    let general = Arc::new(Semaphore::new(limits.max_connections));
    let reserve = Arc::new(Semaphore::new(limits.reserve_connections));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // neither ends the server. A short pause lets descriptors come back.
                    tracing::warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let (permit, reserved) = match general.clone().try_acquire_owned() {
            Ok(p) => (p, false),
            Err(_) => match reserve.clone().try_acquire_owned() {
                Ok(p) => (p, true),
                Err(_) => {
                    metrics::counter!("canopy_api_connections_refused_total").increment(1);
                    // Best effort, without waiting: the socket's buffer is empty. What the
                    // client has sent already is read first, so that the close is not a reset.
                    let mut sink = [0u8; 4096];
                    while matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {}
                    let _ = stream.try_write(&refusal(&ApiError::overloaded(
                        "too many connections; try again later",
                    )));
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (router, limits, stop) = (router.clone(), limits.clone(), stop.clone());
        tokio::spawn(async move {
            connection(stream, router, &limits, reserved, stop).await;
            drop(permit);
        });
    }
    // Every connection holds a permit until it ends.
    let all = async {
        let _ = general.acquire_many(limits.max_connections as u32).await;
        let _ = reserve
            .acquire_many(limits.reserve_connections as u32)
            .await;
    };
    if tokio::time::timeout(DRAIN, all).await.is_err() {
        tracing::warn!("API connections still open after {DRAIN:?}; closing them");
    }
    Ok(())
}

/// Resolves once `stop` is true (the watch guard is dropped inside, so callers stay `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Where a connection is, for its timeouts.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Reading a request head, since then.
    Head(Instant),
    /// A request is being handled.
    Busy,
    /// Answered (or answering) and waiting for the next request, since then.
    Idle(Instant),
}

/// Shared by a connection's [`Gate`], its service and its watchdog.
struct Shared {
    phase: Mutex<Phase>,
    /// Wakes the watchdog when a new head starts (its deadline may be nearer).
    changed: Notify,
    /// Set by the watchdog when the head took too long: the gate answers 408 and ends.
    timed_out: std::sync::atomic::AtomicBool,
    /// The task waiting on the gate's read, woken when `timed_out` is set.
    reader: Mutex<Option<Waker>>,
}

impl Shared {
    fn set(&self, p: Phase) {
        *self.phase.lock().expect("phase lock") = p;
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().expect("phase lock")
    }
}

async fn connection(
    stream: TcpStream,
    router: Router,
    limits: &Limits,
    reserved: bool,
    mut stop: watch::Receiver<bool>,
) {
    metrics::gauge!("canopy_api_connections").increment(1.0);
    // A health check sends its request at once: a reserve connection that does not is
    // closed sooner, so that held connections cannot keep the reserve.
    let limits = &Limits {
        header_read_timeout: if reserved {
            limits.header_read_timeout.min(RESERVE_HEADER_TIMEOUT)
        } else {
            limits.header_read_timeout
        },
        ..limits.clone()
    };
    let shared = Arc::new(Shared {
        phase: Mutex::new(Phase::Head(Instant::now())),
        changed: Notify::new(),
        timed_out: Default::default(),
        reader: Mutex::new(None),
    });
    let gate = Gate {
        io: stream,
        shared: shared.clone(),
        limits: limits.clone(),
        state: GateState::Gathering(Vec::new()),
        body_left: Some(0),
    };
    let svc_shared = shared.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        svc_shared.set(Phase::Busy);
        let (router, shared) = (router.clone(), svc_shared.clone());
        async move {
            let resp = if reserved && !RESERVED_PATHS.contains(&req.uri().path()) {
                ApiError::overloaded(
                    "too many connections; only /healthz, /readyz and /metrics answer now",
                )
                .into_response()
            } else {
                let call = router.oneshot(req.map(Body::new));
                match AssertUnwindSafe(call).catch_unwind().await {
                    Ok(Ok(r)) => r,
                    Ok(Err(never)) => match never {},
                    Err(_) => {
                        tracing::error!("an API handler panicked");
                        ApiError::internal("the request failed").into_response()
                    }
                }
            };
            shared.set(Phase::Idle(Instant::now()));
            Ok::<Response, Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        // A reserve connection answers one request: it must not be held.
        .keep_alive(!reserved)
        // The timeouts are the watchdog's below (hyper's would answer with an empty body).
        .header_read_timeout(None)
        .max_headers(limits.max_headers)
        // The gate passes whole heads of at most `max_head_bytes`, with what followed them in
        // the same read: hyper's buffer never reaches its own (bodyless) 431.
        .max_buf_size((2 * limits.max_head_bytes() + 64 * 1024).max(8192));
    let conn = builder.serve_connection(TokioIo::new(gate), service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let now = Instant::now();
        let deadline = match shared.phase() {
            Phase::Head(since) => since + limits.header_read_timeout,
            Phase::Idle(since) => since + limits.idle_timeout,
            // A handler has no deadline here; look again later.
            Phase::Busy => now + limits.idle_timeout.min(limits.header_read_timeout),
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "API connection ended with an error");
                }
                break;
            }
            _ = tokio::time::sleep_until(deadline) => {
                match shared.phase() {
                    Phase::Head(since) if since + limits.header_read_timeout <= Instant::now() => {
                        metrics::counter!("canopy_api_timeouts_total", "kind" => "header").increment(1);
                        shared.timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                        if let Some(w) = shared.reader.lock().expect("waker lock").take() {
                            w.wake();
                        }
                        let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
                        break;
                    }
                    Phase::Idle(since) if since + limits.idle_timeout <= Instant::now() => {
                        metrics::counter!("canopy_api_timeouts_total", "kind" => "idle").increment(1);
                        break;
                    }
                    _ => {}
                }
            }
            _ = shared.changed.notified() => {}
            _ = stopped(&mut stop), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    metrics::gauge!("canopy_api_connections").decrement(1.0);
}

/// A finished answer on the wire, for refusals hyper never sees.
fn refusal(e: &ApiError) -> Vec<u8> {
    let body = e.body();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        e.status.as_u16(),
        e.status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

enum GateState {
    /// Reading a head: held back from hyper until it is complete and checked.
    Gathering(Vec<u8>),
    /// Checked bytes not yet read by hyper; then everything passes until the next head.
    Passing(Vec<u8>, usize),
    /// Writing a refusal; then draining, then end of input for hyper.
    Refusing(Vec<u8>, usize),
    /// Refusal sent and our side shut: what the client still sends (the rest of an oversized
    /// head) is read and dropped, up to this many bytes more. Closing with unread input would
    /// send a reset, which can destroy the refusal before the client reads it.
    Draining(usize),
    Closed,
}

/// The connection's socket as hyper sees it (see the module doc).
struct Gate {
    io: TcpStream,
    shared: Arc<Shared>,
    limits: Limits,
    state: GateState,
    /// Bytes of the passed request's body still to come (they are not a head, even once the
    /// request is answered: hyper reads an unread body to keep the connection); `None` for a
    /// chunked body, whose end only hyper finds: such a connection is not gated any more.
    body_left: Option<u64>,
}

/// What a head's bytes so far say.
enum Head {
    Partial,
    /// Complete and acceptable: the head's length, and its body's (`None`: chunked).
    Ok(usize, Option<u64>),
    Refused(ApiError),
}

fn check_head(buf: &[u8], l: &Limits) -> Head {
    let mut headers = vec![httparse::EMPTY_HEADER; l.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(buf);
    let too_large = |what: &str| {
        // Still on the request line: it is the target that is too long.
        if !buf.contains(&b'\n') {
            ApiError::new(
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                format!(
                    "the request target is longer than {} bytes",
                    l.max_uri_bytes
                ),
            )
        } else {
            ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!("the request {what}"),
            )
        }
    };
    let n = match parsed {
        Ok(httparse::Status::Partial) => {
            if buf.len() > l.max_head_bytes()
                || (!buf.contains(&b'\n') && buf.len() > l.max_uri_bytes + 32)
            {
                return Head::Refused(too_large(&format!(
                    "headers are larger than {} bytes",
                    l.max_header_bytes
                )));
            }
            return Head::Partial;
        }
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return Head::Refused(too_large(&format!(
                "has more than {} headers",
                l.max_headers
            )))
        }
        Err(e) => {
            return Head::Refused(ApiError::bad_request(
                "bad_request",
                format!("malformed HTTP request: {e}"),
            ))
        }
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Head::Refused(ApiError::bad_request(
            "bad_request",
            "malformed HTTP request",
        ));
    };
    if path.len() > l.max_uri_bytes {
        return Head::Refused(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!(
                "the request target is longer than {} bytes",
                l.max_uri_bytes
            ),
        ));
    }
    let line = buf.iter().position(|b| *b == b'\n').map_or(n, |i| i + 1);
    if n - line > l.max_header_bytes {
        return Head::Refused(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request headers are larger than {} bytes",
                l.max_header_bytes
            ),
        ));
    }
    let bad = |m: String| Head::Refused(ApiError::bad_request("bad_request", m));
    if axum::http::Method::from_bytes(method.as_bytes()).is_err() {
        return bad(format!("{method:?} is not an HTTP method"));
    }
    if axum::http::Uri::try_from(path).is_err() {
        return bad("the request target is not a valid URI".into());
    }
    // hyper's framing rules (RFC 9112 section 6), which it answers with a bodyless 400.
    let (mut te, mut te_chunked, mut length) = (false, false, None::<u64>);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if version == 0 {
                return bad("HTTP/1.0 requests cannot have Transfer-Encoding".into());
            }
            te = true;
            te_chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") && !te {
            let mut values = h.value.split(|b| *b == b',').map(|v| {
                std::str::from_utf8(v.trim_ascii())
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
            });
            let first = values.next().flatten();
            let Some(len) = first.filter(|f| values.all(|v| v == Some(*f))) else {
                return bad("invalid Content-Length".into());
            };
            if length.is_some_and(|l| l != len) {
                return bad("differing Content-Length headers".into());
            }
            length = Some(len);
        }
    }
    if te && !te_chunked {
        return bad("Transfer-Encoding must end with chunked".into());
    }
    if let Some(len) = length.filter(|len| *len > l.max_body_bytes && !te) {
        return Head::Refused(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "a body of {len} bytes; the API takes at most {} (and reads none)",
                l.max_body_bytes
            ),
        ));
    }
    Head::Ok(n, if te { None } else { Some(length.unwrap_or(0)) })
}

impl Gate {
    fn refuse(&mut self, e: ApiError) {
        metrics::counter!("canopy_api_refused_heads_total", "code" => e.code).increment(1);
        self.state = GateState::Refusing(refusal(&e), 0);
    }
}

impl AsyncRead for Gate {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this
                .shared
                .timed_out
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                match this.state {
                    GateState::Gathering(_) => this.refuse(ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        format!(
                            "the request head did not arrive within {} ms",
                            this.limits.header_read_timeout.as_millis()
                        ),
                    )),
                    GateState::Refusing(..) | GateState::Closed => {}
                    GateState::Passing(..) | GateState::Draining(_) => {
                        this.state = GateState::Closed
                    }
                }
            }
            match &mut this.state {
                GateState::Closed => return Poll::Ready(Ok(())),
                GateState::Refusing(out, at) => {
                    while *at < out.len() {
                        match Pin::new(&mut this.io).poll_write(cx, &out[*at..]) {
                            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                                this.state = GateState::Closed;
                                break;
                            }
                            Poll::Ready(Ok(n)) => *at += n,
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    if let GateState::Refusing(..) = this.state {
                        let _ = ready!(Pin::new(&mut this.io).poll_shutdown(cx));
                        this.state = GateState::Draining(DRAIN_BYTES);
                    }
                }
                GateState::Draining(left) => {
                    *this.shared.reader.lock().expect("waker lock") = Some(cx.waker().clone());
                    let mut chunk = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut chunk);
                    match ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb)) {
                        Ok(()) if !rb.filled().is_empty() && rb.filled().len() < *left => {
                            *left -= rb.filled().len();
                        }
                        _ => this.state = GateState::Closed,
                    }
                }
                GateState::Passing(held, at) if *at < held.len() => {
                    let n = buf.remaining().min(held.len() - *at);
                    buf.put_slice(&held[*at..*at + n]);
                    *at += n;
                    return Poll::Ready(Ok(()));
                }
                GateState::Passing(..) => {
                    let before = buf.filled().len();
                    *this.shared.reader.lock().expect("waker lock") = Some(cx.waker().clone());
                    ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                    let Some(left) = this.body_left.as_mut() else {
                        return Poll::Ready(Ok(()));
                    };
                    let got = buf.filled().len() - before;
                    let body = (*left).min(got as u64) as usize;
                    *left -= body as u64;
                    if got > body {
                        if !matches!(this.shared.phase(), Phase::Idle(_)) {
                            // Pipelined behind a request still in hand: hyper frames what
                            // follows, so this connection is not gated any more.
                            this.body_left = None;
                            return Poll::Ready(Ok(()));
                        }
                        // The first bytes of the next request: gather its head first.
                        let next = buf.filled()[before + body..].to_vec();
                        buf.set_filled(before + body);
                        this.shared.set(Phase::Head(Instant::now()));
                        this.shared.changed.notify_one();
                        this.state = GateState::Gathering(next);
                        if body == 0 {
                            continue;
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                GateState::Gathering(head) => {
                    if !head.is_empty() {
                        match check_head(head, &this.limits) {
                            Head::Ok(len, body) => {
                                let held = std::mem::take(head);
                                // What followed the head in the same reads is its body first;
                                // anything after that is pipelined and goes to hyper as is.
                                let extra = (held.len() - len) as u64;
                                this.body_left = body.and_then(|b| b.checked_sub(extra));
                                this.state = GateState::Passing(held, 0);
                                continue;
                            }
                            Head::Refused(e) => {
                                this.refuse(e);
                                continue;
                            }
                            Head::Partial => {}
                        }
                    }
                    *this.shared.reader.lock().expect("waker lock") = Some(cx.waker().clone());
                    let mut chunk = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut chunk);
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
                    if rb.filled().is_empty() {
                        // The peer closed (mid-head or between requests): end of input.
                        this.state = GateState::Closed;
                        continue;
                    }
                    head.extend_from_slice(rb.filled());
                }
            }
        }
    }
}

impl AsyncWrite for Gate {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::from(&ApiOptions::default())
    }

    fn code(buf: &[u8]) -> &'static str {
        match check_head(buf, &limits()) {
            Head::Partial => "partial",
            Head::Ok(..) => "ok",
            Head::Refused(e) => e.code,
        }
    }

    #[test]
    fn heads_hyper_would_refuse_bodyless_are_refused_here_in_json() {
        assert_eq!(code(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"), "ok");
        assert_eq!(code(b"GET /healthz HTTP/1.1\r\nHost: x\r\n"), "partial");
        assert_eq!(code(b"GET /\x01 HTTP/1.1\r\n\r\n"), "bad_request");
        assert_eq!(code(b"G@T / HTTP/1.1\r\n\r\n"), "bad_request");
        assert_eq!(code(b"GET / HTTP/3.0\r\n\r\n"), "bad_request");
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
        assert_eq!(code(long.as_bytes()), "uri_too_long");
        let long_partial = format!("GET /{}", "a".repeat(9000));
        assert_eq!(code(long_partial.as_bytes()), "uri_too_long");
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "v".repeat(17_000));
        assert_eq!(code(big.as_bytes()), "headers_too_large");
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            code(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            "headers_too_large"
        );
        assert_eq!(
            code(b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n"),
            "bad_request"
        );
        assert_eq!(
            code(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            "ok"
        );
        assert_eq!(
            code(b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n"),
            "payload_too_large"
        );
        assert_eq!(
            code(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            "bad_request"
        );
        assert_eq!(
            code(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            "bad_request"
        );
        assert_eq!(
            code(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            "ok"
        );
    }
}
