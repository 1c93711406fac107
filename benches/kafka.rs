//! End-to-end records/s from a real broker (tansu, SQLite storage): `canopy run` consuming a
//! generated stream until its lag is 0, next to a bare rdkafka consumer reading the same topic
//! in the same run. Issue target: canopy ≥ 80% of the bare consumer's rate.
//!
//! `cargo bench --bench kafka` (needs `tansu` on PATH or in ~/.cargo/bin; without it the
//! benchmark says so and exits). `CANOPY_BENCH_EVENTS` sets the stream size (default 300,000);
//! `CANOPY_BENCH_CLEAN=1` generates a stream without refused records (no dead letters).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/support/tansu.rs"]
mod tansu;

use canopy::kafka::produce::TopicWriter;
use canopy::loadgen::{generate, LoadgenConfig};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

fn metrics(addr: SocketAddr) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(tansu) = tansu::binary() else {
        println!(
            "kafka bench SKIPPED: no tansu binary (cargo install tansu --locked --features libsql)"
        );
        return;
    };
    let events: usize = std::env::var("CANOPY_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let keep = std::env::var("CANOPY_BENCH_LOG").is_ok();
    let dir = tempfile::Builder::new()
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    if keep {
        println!("canopy log: {}", dir.path().join("run.log").display());
    }
    let broker = tansu::Broker::start_with(tansu, dir.path());
    let brokers = broker.addr();
    broker.create_topics(&["in"], 3);
    let cfg = LoadgenConfig {
        tenants: 3,
        depth: 5,
        fanout: 5,
        events,
        ..Default::default()
    };
    // CANOPY_BENCH_CLEAN=1: a stream that refuses nothing, so `run` writes no dead letters
    // (tells the engine's cost from the dead-letter round trips to the broker).
    let cfg = if std::env::var_os("CANOPY_BENCH_CLEAN").is_some() {
        LoadgenConfig {
            bad: 0.0,
            churn: 0.0,
            suspensions: 0.0,
            ..cfg
        }
    } else {
        cfg
    };
    let t = Instant::now();
    let mut w = TopicWriter::new(&brokers, "in", None).unwrap();
    generate(&cfg, &mut w).unwrap();
    let total = w.finish().unwrap();
    println!(
        "produced {total} records in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The bare consumer: poll and drop, counting.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "bare")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let t = Instant::now();
    c.subscribe(&["in"]).unwrap();
    let mut n = 0u64;
    while n < total {
        if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
            n += 1;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "bare consumer stalled at {n}"
        );
    }
    let bare = total as f64 / t.elapsed().as_secs_f64();
    drop(c);

    // canopy run, from process start until every partition's lag is 0.
    let t = Instant::now();
    let mut run = Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args([
            "run",
            "--brokers",
            &brokers,
            "--topic",
            "in",
            "--group",
            "canopy",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        // CANOPY_BENCH_LOG=debug keeps per-batch and per-checkpoint timings in the log.
        .env(
            "RUST_LOG",
            std::env::var("CANOPY_BENCH_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("run.log")).unwrap())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = run.stdout.take().unwrap();
    let mut b = [0u8; 1];
    while !first.ends_with('\n') {
        out.read_exact(&mut b).unwrap();
        first.push(b[0] as char);
    }
    let addr: SocketAddr = first
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    loop {
        let m = metrics(addr);
        let lags: Vec<f64> = m
            .lines()
            .filter_map(|l| l.strip_prefix("canopy_consumer_lag{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        if lags.len() == 3 && lags.iter().all(|v| *v == 0.0) {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            let log = std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("canopy run did not catch up; lags {lags:?}; log tail:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let canopy = total as f64 / t.elapsed().as_secs_f64();
    let _ = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status();
    let _ = run.wait();
    drop(broker);
    println!("bare rdkafka consumer: {bare:.0} records/s");
    println!(
        "canopy run end to end: {canopy:.0} records/s ({:.0}% of bare)",
        100.0 * canopy / bare
    );
}
