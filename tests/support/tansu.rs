//! A real Kafka-protocol broker for the tests and the Kafka benchmark: tansu with SQLite
//! storage (its `memory://` storage skips records when a consumer resumes mid-batch), in its
//! own directory, on a free port, killed when dropped.
//!
//! Shared by `tests/kafka.rs` and `benches/kafka.rs` (included there with `#[path]`).

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

/// The tansu binary: `CANOPY_TEST_TANSU`, else `~/.cargo/bin/tansu` or `/usr/local/bin/tansu`.
pub fn binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CANOPY_TEST_TANSU") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("HOME").unwrap_or_default();
    [
        PathBuf::from(format!("{home}/.cargo/bin/tansu")),
        PathBuf::from("/usr/local/bin/tansu"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

pub struct Broker {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    /// Starts tansu in `dir` (its database is `dir/tansu.db`, its log `dir/tansu.log`).
    pub fn start_with(bin: PathBuf, dir: &Path) -> Broker {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut b = Broker {
            bin,
            dir: dir.to_path_buf(),
            port,
            child: None,
        };
        b.up();
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn up(&mut self) {
        let url = format!("tcp://{}", self.addr());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            // tansu resolves the SQLite path against its working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.dir)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        let t = Instant::now();
        while TcpStream::connect(self.addr()).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "tansu did not listen on {}",
                self.addr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.index_headers();
    }

    /// tansu 0.6's SQLite schema has no index on `header`, and its fetch looks up the headers
    /// of every record it returns with `... where offset_id = ?`: each fetched record scans the
    /// whole header table. Dead letters are the only records with headers (five each), so
    /// without this index every dead letter written makes every later fetch of the input topic
    /// slower, and the dead-letter produces queue behind those fetches (the 3–10 s stalls
    /// measured on the 302k-record benchmark). A real Kafka stores headers inside the record
    /// batch. The index changes no result, only the broker's cost.
    fn index_headers(&self) {
        let db = self.dir.join("tansu.db");
        let script = "import sqlite3, sys\n\
            c = sqlite3.connect(sys.argv[1], timeout=30)\n\
            c.execute('create index if not exists canopy_header_record on header (topition, offset_id)')\n\
            c.commit()\n";
        let t = Instant::now();
        loop {
            let ok = Command::new("python3")
                .args(["-c", script])
                .arg(&db)
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            // The schema may not be written yet right after the listener opens.
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "could not index tansu's header table in {}",
                db.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the broker (SIGTERM and a wait for exit when `graceful`, else SIGKILL: a crash),
    /// waits `down_for`, and starts it again on the same port and storage.
    pub fn restart(&mut self, down_for: Duration, graceful: bool) {
        if let Some(mut c) = self.child.take() {
            if graceful {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
            } else {
                let _ = c.kill();
            }
            let t = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if t.elapsed() > Duration::from_secs(20) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        std::thread::sleep(down_for);
        self.up();
    }

    pub fn create_topics(&self, topics: &[&str], partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.addr())
            .create()
            .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
            .collect();
        for r in rt
            .block_on(admin.create_topics(&new, &AdminOptions::new()))
            .unwrap()
        {
            r.unwrap();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}
