//! NDJSON file input and dead-letter file output for `canopy ingest`.
//!
//! Lines are read and decoded on a dedicated thread (decoding is the costliest per-record step
//! and runs in parallel with the actors), then handed over in bounded batches: a slow engine
//! slows the reader instead of growing a queue. The position is the byte offset after the last
//! line of a batch plus its line number, so a restart resumes exactly there.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use canopy_actors::record::decode;
use canopy_actors::source::{
    DeadLetter, DeadLetters, Flush, Input, Source, SourceBatch, SourceError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
struct FilePosition {
    offset: u64,
    line: u64,
}

pub struct FileSource {
    path: PathBuf,
    batch_size: usize,
    rx: Option<mpsc::Receiver<Result<SourceBatch, SourceError>>>,
    /// Bytes consumed so far (for progress display).
    pub bytes_read: Arc<AtomicU64>,
}

impl FileSource {
    pub fn new(path: PathBuf, batch_size: usize) -> Self {
        FileSource {
            path,
            batch_size: batch_size.max(1),
            rx: None,
            bytes_read: Arc::new(AtomicU64::new(0)),
        }
    }
}

fn is_blank(line: &[u8]) -> bool {
    match std::str::from_utf8(line) {
        Ok(s) => s.trim().is_empty(),
        Err(_) => false,
    }
}

fn read_loop(
    path: PathBuf,
    start: FilePosition,
    batch_size: usize,
    bytes_read: Arc<AtomicU64>,
    tx: mpsc::Sender<Result<SourceBatch, SourceError>>,
) {
    let io = |e: std::io::Error| SourceError::Io(format!("{}: {e}", path.display()));
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            let _ = tx.blocking_send(Err(io(e)));
            return;
        }
    };
    if let Err(e) = file.seek(SeekFrom::Start(start.offset)) {
        let _ = tx.blocking_send(Err(io(e)));
        return;
    }
    let mut rd = BufReader::with_capacity(1 << 20, file);
    let mut pos = start;
    bytes_read.store(pos.offset, Ordering::Relaxed);
    let mut buf = Vec::with_capacity(512);
    loop {
        let mut inputs = Vec::with_capacity(batch_size);
        let mut eof = false;
        while inputs.len() < batch_size {
            buf.clear();
            match rd.read_until(b'\n', &mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    pos.offset += n as u64;
                    pos.line += 1;
                    let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
                    if is_blank(line) {
                        continue;
                    }
                    inputs.push(Input {
                        tag: pos.line,
                        origin: None,
                        raw: line.to_vec(),
                        decoded: decode(line),
                    });
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(io(e)));
                    return;
                }
            }
        }
        bytes_read.store(pos.offset, Ordering::Relaxed);
        if !inputs.is_empty() || !eof {
            let position = rmp_serde::to_vec(&pos).expect("position encodes");
            if tx
                .blocking_send(Ok(SourceBatch { inputs, position }))
                .is_err()
            {
                return;
            }
        }
        if eof {
            return;
        }
    }
}

#[async_trait]
impl Source for FileSource {
    async fn resume(&mut self, position: Option<&[u8]>) -> Result<(), SourceError> {
        let start = match position {
            Some(p) if !p.is_empty() => rmp_serde::from_slice(p)
                .map_err(|e| SourceError::BadPosition(format!("file position: {e}")))?,
            _ => FilePosition::default(),
        };
        let (tx, rx) = mpsc::channel(4);
        let (path, n, br) = (self.path.clone(), self.batch_size, self.bytes_read.clone());
        std::thread::Builder::new()
            .name("canopy-file-reader".into())
            .spawn(move || read_loop(path, start, n, br, tx))
            .map_err(|e| SourceError::Io(e.to_string()))?;
        self.rx = Some(rx);
        Ok(())
    }

    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError> {
        let rx = self
            .rx
            .as_mut()
            .ok_or_else(|| SourceError::Io("source not resumed".into()))?;
        rx.recv().await.transpose()
    }
}

/// Dead letters as NDJSON: `{"line", "reason", "message", "record"}`.
pub struct FileDeadLetters {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    len: u64,
}

impl FileDeadLetters {
    pub fn new(path: PathBuf) -> Self {
        FileDeadLetters {
            path,
            out: None,
            len: 0,
        }
    }
}

#[derive(Serialize)]
struct DlqLine<'a> {
    line: u64,
    reason: &'a str,
    message: String,
    record: std::borrow::Cow<'a, str>,
}

#[async_trait]
impl DeadLetters for FileDeadLetters {
    async fn resume(&mut self, position: Option<&[u8]>) -> Result<(), SourceError> {
        let keep: u64 = match position {
            Some(p) if !p.is_empty() => rmp_serde::from_slice(p)
                .map_err(|e| SourceError::BadPosition(format!("dead-letter position: {e}")))?,
            _ => 0,
        };
        let io = |e: std::io::Error| SourceError::Io(format!("{}: {e}", self.path.display()));
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.path)
            .map_err(io)?;
        // Everything after the checkpointed length was written by a run that did not checkpoint:
        // it will be written again, so drop it.
        f.set_len(keep).map_err(io)?;
        let mut f = f;
        f.seek(SeekFrom::Start(keep)).map_err(io)?;
        self.out = Some(BufWriter::new(f));
        self.len = keep;
        Ok(())
    }

    async fn write(&mut self, dl: DeadLetter<'_>) -> Result<(), SourceError> {
        let line = DlqLine {
            line: dl.tag,
            reason: dl.refusal.reason(),
            message: dl.refusal.to_string(),
            record: String::from_utf8_lossy(dl.raw),
        };
        let mut s = serde_json::to_vec(&line).map_err(|e| SourceError::Io(e.to_string()))?;
        s.push(b'\n');
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| SourceError::Io("dead letters not resumed".into()))?;
        out.write_all(&s)
            .map_err(|e| SourceError::Io(e.to_string()))?;
        self.len += s.len() as u64;
        Ok(())
    }

    async fn sync(&mut self) -> Result<Flush, SourceError> {
        if let Some(out) = self.out.as_mut() {
            out.flush().map_err(|e| SourceError::Io(e.to_string()))?;
            out.get_ref()
                .sync_data()
                .map_err(|e| SourceError::Io(e.to_string()))?;
        }
        Ok(Flush::ready(
            rmp_serde::to_vec(&self.len).expect("length encodes"),
        ))
    }
}
