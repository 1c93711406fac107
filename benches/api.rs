//! Query API latency: requests/s and p50/p99 for node, children and series reads over loopback
//! with concurrent keep-alive clients, at a fixed offered rate (default 2,000 requests/s, the
//! target being p99 ≤ 5 ms) and then flat out.
//!
//! `cargo bench --bench api`. `CANOPY_BENCH_API_RATE`, `CANOPY_BENCH_API_SECS` and
//! `CANOPY_BENCH_API_CLIENTS` change the offered rate, the duration and the client count;
//! `CANOPY_BENCH_CACHE_MB` the embedded store's page cache (`store.embedded_cache_mb`).
//! The store holds a generated stream (3 tenants, 6 levels, fanout 5: ~11,700 nodes per
//! hierarchy) ingested by the real engine first.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy::api::{router, ApiState, Tokens};
use canopy::cmd::ingest::{ingest, IngestOptions};
use canopy::loadgen::{generate, LoadgenConfig};
use canopy::store::EmbeddedStore;
use canopy_actors::engine::EngineConfig;
use canopy_actors::store::StoreRead;
use rand::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "support/env.rs"]
mod env;
use env::env_or;

/// One keep-alive connection speaking just enough HTTP/1.1.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            s,
            buf: Vec::with_capacity(64 << 10),
        }
    }

    async fn get(&mut self, path: &str) -> u16 {
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer bench\r\n\r\n");
        self.s.write_all(req.as_bytes()).await.unwrap();
        self.buf.clear();
        loop {
            let mut chunk = [0u8; 16384];
            let n = self.s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = std::str::from_utf8(&self.buf[..end]).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("content-length");
            if self.buf.len() >= end + 4 + len {
                return head[9..12].parse().unwrap();
            }
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

fn main() {
    // As the `canopy` binary does.
    canopy::tune_allocator();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rate: f64 = env_or("CANOPY_BENCH_API_RATE", 2000.0);
    let secs: u64 = env_or("CANOPY_BENCH_API_SECS", 10);
    let clients: usize = env_or("CANOPY_BENCH_API_CLIENTS", 16);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("stream.ndjson");
    let cfg = LoadgenConfig {
        tenants: 3,
        depth: 6,
        fanout: 5,
        events: 300_000,
        ..Default::default()
    };
    let mut w = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
    generate(&cfg, &mut w).unwrap();
    std::io::Write::flush(&mut w).unwrap();
    drop(w);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache_mb = std::env::var("CANOPY_BENCH_CACHE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(canopy::store::embedded::DEFAULT_CACHE_MB);
    let store = Arc::new(EmbeddedStore::open_with(&dir.path().join("data"), cache_mb).unwrap());
    let opts = IngestOptions {
        input,
        dlq: None,
        batch_size: 4096,
        engine: EngineConfig::default(),
        progress: false,
    };
    let (_keep, never) = tokio::sync::watch::channel(false);
    rt.block_on(ingest(opts, store.clone(), never))
        .expect("ingest");

    rt.block_on(async move {
        // Request mix: a third each of node, ranked children and a day of minute series, over
        // nodes of every level.
        let per_tree = cfg.nodes_per_tree();
        let mut paths = Vec::new();
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..5000 {
            let t = rng.random_range(0..cfg.tenants);
            let n = rng.random_range(0..per_tree / cfg.fanout);
            let base = format!("/v1/tenants/t{t}/hierarchies/h0/nodes/t{t}-n{n}");
            paths.push(match rng.random_range(0..3) {
                0 => base,
                1 => format!("{base}/children?sort=amount&by=sum&limit=10"),
                _ => format!("{base}/series?granularity=minute"),
            });
        }
        let paths = Arc::new(paths);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(ApiState {
            store: store as Arc<dyn StoreRead>,
            tokens: Tokens::parse("bench=*").unwrap(),
            metrics: None,
            ready: Arc::new(AtomicBool::new(true)),
            engine: canopy::api::engine::EngineStatus::new(1000),
        });
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        for (label, offered) in [("paced", Some(rate)), ("flat out", None)] {
            let started = Instant::now();
            let deadline = started + Duration::from_secs(secs);
            let mut tasks = Vec::new();
            for c in 0..clients {
                let paths = paths.clone();
                tasks.push(tokio::spawn(async move {
                    let mut cl = Client::connect(addr).await;
                    let mut lat = Vec::new();
                    let mut errors = 0u64;
                    let mut i = c;
                    // Open loop when paced: request k of this client is due at k·clients/rate,
                    // and its latency counts from that moment (no coordinated omission).
                    let interval = offered.map(|r| Duration::from_secs_f64(clients as f64 / r));
                    let mut k = 0u32;
                    loop {
                        let due = match interval {
                            Some(iv) => started + iv * k + iv.mul_f64(c as f64 / clients as f64),
                            None => Instant::now(),
                        };
                        if due >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                        let status = cl.get(&paths[i % paths.len()]).await;
                        lat.push(due.elapsed());
                        if status != 200 {
                            errors += 1;
                        }
                        i += clients;
                        k += 1;
                    }
                    (lat, errors)
                }));
            }
            let mut all = Vec::new();
            let mut errors = 0;
            for t in tasks {
                let (l, e) = t.await.unwrap();
                all.extend(l);
                errors += e;
            }
            all.sort();
            let elapsed = started.elapsed().as_secs_f64();
            println!(
                "api {label}: {:.0} requests/s ({} requests, {clients} clients, {errors} non-200), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                all.len() as f64 / elapsed,
                all.len(),
                pct(&all, 0.50),
                pct(&all, 0.99),
                pct(&all, 1.0),
            );
        }
    });
}
