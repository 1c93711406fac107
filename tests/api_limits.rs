//! The API under hostile connections (issue 24): silent and slow connections are closed after
//! the configured timeouts, a full connection cap leaves `/healthz` and `/metrics` answering,
//! and every error status, also those of the HTTP layer (400, 405, 408, 413, 414, 431, 503),
//! answers the API's JSON error. Timeouts are configured short; nothing asserts a duration.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use support::http::Served;
use support::*;

/// `canopy serve` on the public case with extra `CANOPY_*` settings.
fn serve(dir: &Path, env: &[(&str, &str)]) -> Served {
    let data = dir.join("data");
    if !data.exists() {
        ingest(&conformance_dir().join("input.ndjson"), &data, &[]);
    }
    let mut cmd = canopy();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("CANOPY_API_TOKENS", "root=*")
        .envs(env.iter().copied());
    Served::start(cmd)
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    /// The JSON error's code, asserting the shape `{"error": {"code", "message"}}`.
    fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {:?}", self.status, self.body));
        assert!(
            v["error"]["message"].is_string(),
            "no error message: {}",
            self.body
        );
        assert!(
            self.head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{}",
            self.head
        );
        v["error"]["code"]
            .as_str()
            .expect("an error code")
            .to_string()
    }
}

/// Reads one answer from `s` up to the end of its body (Content-Length).
fn read_answer(s: &mut TcpStream) -> Answer {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => raw.push(byte[0]),
            other => panic!("connection ended before an answer's head ({other:?}): {raw:?}"),
        }
    }
    let head = String::from_utf8(raw).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer {
        status,
        head,
        body: String::from_utf8(body).unwrap(),
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    // A bound for a hung test, far above every configured timeout.
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Sends `bytes` on a new connection and reads one answer.
fn send(addr: SocketAddr, bytes: &[u8]) -> Answer {
    let mut s = connect(addr);
    // The server may answer and close before it has read everything: ignore a reset here.
    let _ = s.write_all(bytes);
    read_answer(&mut s)
}

/// Asserts that the server closes `s` (end of stream, or a reset after it refused).
fn closed(s: &mut TcpStream) {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server did not close the connection: {e}"),
    }
}

#[test]
fn silent_slow_and_idle_connections_are_closed_after_their_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve(
        dir.path(),
        &[
            ("CANOPY_API_HEADER_READ_TIMEOUT_MS", "300"),
            ("CANOPY_API_IDLE_TIMEOUT_MS", "300"),
        ],
    );
    // Silent: never sends a byte. It gets a 408 in JSON, then the connection closes.
    let mut silent = connect(s.addr);
    let a = read_answer(&mut silent);
    assert_eq!((a.status, a.code().as_str()), (408, "request_timeout"));
    closed(&mut silent);
    // Slow: a head that never ends.
    let mut slow = connect(s.addr);
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let a = read_answer(&mut slow);
    assert_eq!((a.status, a.code().as_str()), (408, "request_timeout"));
    closed(&mut slow);
    // Idle: a keep-alive connection that answered and then went quiet is closed.
    let mut idle = connect(s.addr);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_answer(&mut idle).status, 200);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_answer(&mut idle).status, 200, "keep-alive works");
    closed(&mut idle);
    // Still serving.
    assert_eq!(s.get("/healthz", None).status, 200);
}

#[test]
fn health_and_metrics_answer_while_the_connection_cap_is_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve(
        dir.path(),
        &[
            ("CANOPY_API_MAX_CONNECTIONS", "4"),
            // Room for every check below even if none of them has closed yet.
            ("CANOPY_API_RESERVE_CONNECTIONS", "8"),
            ("CANOPY_API_HEADER_READ_TIMEOUT_MS", "120000"),
        ],
    );
    // Four connections that say nothing take the whole cap (they are accepted in order, before
    // any later connection).
    let held: Vec<TcpStream> = (0..4).map(|_| connect(s.addr)).collect();
    for _ in 0..3 {
        let h = send(s.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(h.status, 200, "{}", h.body);
        let m = send(s.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(m.status, 200);
        assert!(m.body.contains("canopy_api_connections"), "{}", m.body);
    }
    // Anything else beyond the cap: 503 in JSON (from the reserve, or refused at once).
    let a = send(
        s.addr,
        b"GET /v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer root\r\n\r\n",
    );
    assert_eq!((a.status, a.code().as_str()), (503, "overloaded"));
    // Once the held connections go, everything answers again.
    drop(held);
    let mut ok = false;
    for _ in 0..200 {
        let a = send(
            s.addr,
            b"GET /v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer root\r\nConnection: close\r\n\r\n",
        );
        if a.status == 200 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ok, "the API did not recover once the connections closed");
}

/// With no reserve (or the reserve held), a connection past the cap gets a 503 at once.
#[test]
fn past_the_cap_and_the_reserve_a_connection_is_refused_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve(
        dir.path(),
        &[
            ("CANOPY_API_MAX_CONNECTIONS", "2"),
            ("CANOPY_API_RESERVE_CONNECTIONS", "0"),
            ("CANOPY_API_HEADER_READ_TIMEOUT_MS", "120000"),
        ],
    );
    let held: Vec<TcpStream> = (0..2).map(|_| connect(s.addr)).collect();
    let a = send(s.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((a.status, a.code().as_str()), (503, "overloaded"));
    drop(held);
}

#[test]
fn every_error_status_answers_json() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path(), &[]);
    let long_target = format!("GET /v1/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
    let endless_target = format!("GET /v1/{}", "a".repeat(70_000));
    let big_header = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "v".repeat(20_000));
    let huge_header = format!("GET / HTTP/1.1\r\nX-Big: {}", "v".repeat(1 << 20));
    let many_headers = format!(
        "GET / HTTP/1.1\r\n{}\r\n",
        (0..150)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect::<String>()
    );
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            b"POST /v1/tenants HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec(),
            405,
            "method_not_allowed",
        ),
        (
            b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            405,
            "method_not_allowed",
        ),
        (long_target.into_bytes(), 414, "uri_too_long"),
        (endless_target.into_bytes(), 414, "uri_too_long"),
        (big_header.into_bytes(), 431, "headers_too_large"),
        (huge_header.into_bytes(), 431, "headers_too_large"),
        (many_headers.into_bytes(), 431, "headers_too_large"),
        (
            b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (b"HELLO\r\n\r\n".to_vec(), 400, "bad_request"),
        (
            b"POST /v1/tenants HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n".to_vec(),
            413,
            "payload_too_large",
        ),
        (
            b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            404,
            "not_found",
        ),
        (
            b"GET /v1/tenants HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            401,
            "unauthorized",
        ),
        (
            b"GET /v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Basic cm9vdA==\r\n\r\n"
                .to_vec(),
            401,
            "unauthorized",
        ),
    ];
    for (req, status, code) in &cases {
        let a = send(s.addr, req);
        let shown = String::from_utf8_lossy(&req[..req.len().min(60)]).into_owned();
        assert_eq!(a.status, *status, "{shown:?}: {}", a.body);
        assert_eq!(a.code(), *code, "{shown:?}");
    }
    // 405 keeps its Allow header.
    let a = send(s.addr, b"POST /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(a.head.to_ascii_lowercase().contains("allow:"), "{}", a.head);
    // The scheme of `Authorization` is case-insensitive (RFC 7235).
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let a = send(
            s.addr,
            format!("GET /v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: {scheme} root\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(a.status, 200, "{scheme}: {}", a.body);
    }
    assert_eq!(s.get("/healthz", None).status, 200);
}
