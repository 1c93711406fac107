//! The source of `canopy demo`: the `loadgen` stream with wall-clock timestamps, generated
//! live at a steady rate.

use std::io::Write;
use std::time::{Duration, Instant};

use canopy_actors::record::decode;
use canopy_actors::source::{Input, Source, SourceBatch, SourceError};
use tokio::sync::mpsc;

use crate::loadgen::{generate, LoadgenConfig};

/// The generated stream, cut into batches of about a tenth of a second of records. Its position
/// is the number of records handed out; resuming regenerates and skips that many (the stream
/// is deterministic but for its timestamps, and skipped records are never processed).
pub struct DemoSource {
    cfg: LoadgenConfig,
    per_sec: u64,
    rx: Option<mpsc::Receiver<SourceBatch>>,
}

impl DemoSource {
    pub fn new(cfg: LoadgenConfig, per_sec: u64) -> Self {
        DemoSource {
            cfg,
            per_sec: per_sec.max(1),
            rx: None,
        }
    }
}

/// Collects generated lines into batches and paces them.
struct Pacer {
    tx: mpsc::Sender<SourceBatch>,
    skip: u64,
    next_tag: u64,
    per_sec: u64,
    started: Instant,
    sent: u64,
    batch: Vec<Input>,
    line: Vec<u8>,
}

impl Pacer {
    fn flush(&mut self) -> std::io::Result<()> {
        let due = self.started + Duration::from_secs_f64(self.sent as f64 / self.per_sec as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        self.sent += self.batch.len() as u64;
        let batch = SourceBatch {
            inputs: std::mem::take(&mut self.batch),
            position: self.next_tag.to_le_bytes().to_vec(),
        };
        self.tx
            .blocking_send(batch)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "engine gone"))
    }
}

impl Write for Pacer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            self.next_tag += 1;
            let raw = std::mem::take(&mut self.line);
            if self.next_tag <= self.skip {
                continue;
            }
            self.batch.push(Input {
                tag: self.next_tag,
                origin: None,
                decoded: decode(&raw),
                raw,
            });
            if self.batch.len() as u64 >= (self.per_sec / 10).max(1) {
                self.flush()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl Source for DemoSource {
    async fn resume(&mut self, position: Option<&[u8]>) -> Result<(), SourceError> {
        let skip = match position {
            Some(p) if !p.is_empty() => u64::from_le_bytes(
                p.try_into()
                    .map_err(|_| SourceError::BadPosition("demo position is not 8 bytes".into()))?,
            ),
            _ => 0,
        };
        let (tx, rx) = mpsc::channel(4);
        let cfg = self.cfg.clone();
        let mut pacer = Pacer {
            tx,
            skip,
            next_tag: 0,
            per_sec: self.per_sec,
            started: Instant::now(),
            sent: 0,
            batch: Vec::new(),
            line: Vec::new(),
        };
        std::thread::Builder::new()
            .name("canopy-demo-workload".into())
            .spawn(move || {
                // Ends with BrokenPipe once the engine drops the receiver.
                let _ = generate(&cfg, &mut pacer);
            })
            .map_err(|source| SourceError::Thread {
                what: "the demo workload",
                source,
            })?;
        self.rx = Some(rx);
        Ok(())
    }

    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError> {
        let rx = self
            .rx
            .as_mut()
            .ok_or(SourceError::NotResumed("the demo source"))?;
        Ok(rx.recv().await)
    }
}
