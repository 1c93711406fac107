//! NDJSON file input and dead-letter file output for `canopy ingest`.
//!
//! Lines are read and decoded on a dedicated thread (decoding is the costliest per-record step
//! and runs in parallel with the actors), then handed over in bounded batches: a slow engine
//! slows the reader instead of growing a queue. The position is the byte offset after the last
//! line of a batch plus its line number, so a restart resumes exactly there.
//!
//! Both positions also name what they are positions *in* (issue 24): the input's canonical
//! path, its size and a hash of the bytes just before the offset; the dead-letter file's path
//! and a hash of its tail. Resuming with another or a truncated file would otherwise start
//! mid-line in it, or pad the new dead-letter file with NULs up to the old one's length; such a
//! resume is refused ([`SourceError::WrongInput`]) before anything is read or written.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use canopy_actors::record::decode;
use canopy_actors::source::{
    DeadLetter, DeadLetters, Flush, Input, Source, SourceBatch, SourceError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// How many bytes before a position its hash covers: enough to tell two files apart (two
/// inputs that agree on the 64 KiB before the offset agree on where the next line starts), and
/// cheap to read again per batch (a `pread` from the page cache).
const TAIL_WINDOW: u64 = 64 * 1024;

/// Where the next line starts. Positions stored before issue 24 are `[offset, line]` only:
/// they still load (`input` is then absent and only the length is checked).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct FilePosition {
    offset: u64,
    line: u64,
    #[serde(default)]
    input: Option<Fingerprint>,
}

/// What a position is a position in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Fingerprint {
    /// The canonical path of the file.
    path: String,
    /// Its size when the position was taken (a smaller file was truncated or replaced).
    size: u64,
    /// [`fnv1a`] of the up to [`TAIL_WINDOW`] bytes before the position.
    tail: u64,
}

/// 64-bit FNV-1a: a fingerprint to tell files apart, not a defence against forgery.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The hash of the up to [`TAIL_WINDOW`] bytes of `f` before `end`.
fn tail_hash(f: &File, end: u64) -> std::io::Result<u64> {
    let start = end.saturating_sub(TAIL_WINDOW);
    let mut buf = vec![0u8; (end - start) as usize];
    f.read_exact_at(&mut buf, start)?;
    Ok(fnv1a(&buf))
}

/// `path` made absolute with links resolved; a file that does not exist yet is its canonical
/// directory joined with its name.
fn canonical(path: &Path) -> String {
    let c = std::fs::canonicalize(path).or_else(|e| {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(e);
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::canonicalize(dir).map(|d| d.join(name))
    });
    c.unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// What to tell an operator who resumed with the wrong file.
const RESUME_HINT: &str = "run again with the files of the run that wrote this checkpoint, \
     or with an empty --data-dir to start over";

/// Refuses to resume `start` in the file at `path` unless it is the file the position was
/// taken in, at least as long as it was then.
fn check_input(path: &Path, start: &FilePosition) -> Result<(), SourceError> {
    if start.offset == 0 && start.input.is_none() {
        return Ok(());
    }
    let io = |source: std::io::Error| SourceError::File {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let Some(fp) = &start.input else {
        // A position from before fingerprints: only its length can be checked.
        if len < start.offset {
            return Err(SourceError::WrongInput(format!(
                "input {} is {len} bytes, shorter than the {} bytes the checkpoint has read: \
                 it is not the file the checkpoint was taken in; {RESUME_HINT}",
                path.display(),
                start.offset
            )));
        }
        return Ok(());
    };
    let here = canonical(path);
    if here != fp.path {
        return Err(SourceError::WrongInput(format!(
            "the checkpoint was taken reading {}, not {here}; {RESUME_HINT}",
            fp.path
        )));
    }
    if len < fp.size {
        return Err(SourceError::WrongInput(format!(
            "input {here} is {len} bytes but was {} bytes when the checkpoint was taken: it was \
             truncated or replaced; {RESUME_HINT}",
            fp.size
        )));
    }
    if tail_hash(&f, start.offset).map_err(io)? != fp.tail {
        return Err(SourceError::WrongInput(format!(
            "input {here} differs from the file the checkpoint was taken in (the {} bytes before \
             byte {} changed); {RESUME_HINT}",
            start.offset.min(TAIL_WINDOW),
            start.offset
        )));
    }
    Ok(())
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
    let io = |source: std::io::Error| SourceError::File {
        path: path.to_path_buf(),
        source,
    };
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            let _ = tx.blocking_send(Err(io(e)));
            return;
        }
    };
    // Only a regular file can be fingerprinted (and read again at an offset); a pipe's
    // positions carry none.
    let fingerprinted = file.metadata().is_ok_and(|m| m.is_file());
    let canonical_path = canonical(&path);
    if let Err(e) = file.seek(SeekFrom::Start(start.offset)) {
        let _ = tx.blocking_send(Err(io(e)));
        return;
    }
    let mut rd = BufReader::with_capacity(1 << 20, file);
    let mut pos = start;
    pos.input = None;
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
            if fingerprinted {
                let f = rd.get_ref();
                let fp = f
                    .metadata()
                    .and_then(|m| Ok((m.len(), tail_hash(f, pos.offset)?)));
                match fp {
                    Ok((size, tail)) => {
                        pos.input = Some(Fingerprint {
                            path: canonical_path.clone(),
                            size,
                            tail,
                        })
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(io(e)));
                        return;
                    }
                }
            }
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
        check_input(&self.path, &start)?;
        let (tx, rx) = mpsc::channel(4);
        let (path, n, br) = (self.path.clone(), self.batch_size, self.bytes_read.clone());
        std::thread::Builder::new()
            .name("canopy-file-reader".into())
            .spawn(move || read_loop(path, start, n, br, tx))
            .map_err(|source| SourceError::Thread {
                what: "the file reader",
                source,
            })?;
        self.rx = Some(rx);
        Ok(())
    }

    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError> {
        let rx = self
            .rx
            .as_mut()
            .ok_or(SourceError::NotResumed("the file source"))?;
        rx.recv().await.transpose()
    }
}

/// Dead letters as NDJSON: `{"line", "reason", "message", "record"}`.
pub struct FileDeadLetters {
    path: PathBuf,
    /// `path`, canonical (what positions store).
    canonical: String,
    out: Option<BufWriter<File>>,
    len: u64,
}

impl FileDeadLetters {
    pub fn new(path: PathBuf) -> Self {
        FileDeadLetters {
            path,
            canonical: String::new(),
            out: None,
            len: 0,
        }
    }
}

/// The dead-letter file's checkpointed length, and which file it is the length of. Positions
/// stored before issue 24 are the bare length.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct DeadLetterPosition {
    len: u64,
    /// The file's canonical path.
    path: String,
    /// [`fnv1a`] of the up to [`TAIL_WINDOW`] bytes before `len`.
    tail: u64,
}

fn dead_letter_position(p: &[u8]) -> Result<(u64, Option<DeadLetterPosition>), SourceError> {
    if let Ok(len) = rmp_serde::from_slice::<u64>(p) {
        return Ok((len, None));
    }
    let d: DeadLetterPosition = rmp_serde::from_slice(p)
        .map_err(|e| SourceError::BadPosition(format!("dead-letter position: {e}")))?;
    Ok((d.len, Some(d)))
}

/// Refuses to resume dead letters at `keep` in the file at `path` unless it is the file the
/// checkpoint wrote, with at least the bytes it covers. Reads only: nothing is created yet.
fn check_dead_letters(
    path: &Path,
    keep: u64,
    stored: Option<&DeadLetterPosition>,
) -> Result<(), SourceError> {
    let here = canonical(path);
    if let Some(d) = stored {
        if here != d.path {
            return Err(SourceError::WrongInput(format!(
                "the checkpoint's dead letters are in {}, not {here}; {RESUME_HINT}",
                d.path
            )));
        }
    }
    if keep == 0 {
        return Ok(());
    }
    let io = |source: std::io::Error| SourceError::File {
        path: path.to_path_buf(),
        source,
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SourceError::WrongInput(format!(
                "dead-letter file {here} is missing, and the checkpoint covers {keep} bytes of \
                 it; {RESUME_HINT}"
            )))
        }
        Err(e) => return Err(io(e)),
    };
    let len = f.metadata().map_err(io)?.len();
    if len < keep {
        return Err(SourceError::WrongInput(format!(
            "dead-letter file {here} is {len} bytes, shorter than the {keep} bytes the checkpoint \
             covers: it was truncated or replaced; {RESUME_HINT}"
        )));
    }
    if let Some(d) = stored {
        if tail_hash(&f, keep).map_err(io)? != d.tail {
            return Err(SourceError::WrongInput(format!(
                "dead-letter file {here} differs from the one the checkpoint wrote (its last \
                 bytes before byte {keep} changed); {RESUME_HINT}"
            )));
        }
    }
    Ok(())
}

/// Dead letters discarded (`ingest` without `--dlq`). A checkpoint taken with a dead-letter
/// file is refused: its letters so far are in that file, and the rest would be lost.
pub struct NoDeadLetterFile;

#[async_trait]
impl DeadLetters for NoDeadLetterFile {
    async fn resume(&mut self, position: Option<&[u8]>) -> Result<(), SourceError> {
        match position {
            Some(p) if !p.is_empty() => {
                let file = match dead_letter_position(p) {
                    Ok((_, Some(d))) => d.path,
                    _ => "a dead-letter file".to_string(),
                };
                Err(SourceError::WrongInput(format!(
                    "the checkpoint was taken with --dlq {file}: resume with the same --dlq \
                     (or start over with an empty --data-dir)"
                )))
            }
            _ => Ok(()),
        }
    }
    async fn write(&mut self, _: DeadLetter<'_>) -> Result<(), SourceError> {
        Ok(())
    }
    async fn sync(&mut self) -> Result<Flush, SourceError> {
        Ok(Flush::ready(Vec::new()))
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
        let (keep, stored) = match position {
            // A checkpoint taken without a dead-letter file: the letters of the records it
            // covers were discarded, and this file would silently lack them.
            Some([]) => {
                return Err(SourceError::WrongInput(format!(
                    "the checkpoint was taken without --dlq, so {} would lack the dead letters \
                     of the records already processed; resume without --dlq, or start over \
                     with an empty --data-dir",
                    self.path.display()
                )))
            }
            Some(p) => dead_letter_position(p)?,
            None => (0, None),
        };
        check_dead_letters(&self.path, keep, stored.as_ref())?;
        let io = |source: std::io::Error| SourceError::File {
            path: self.path.clone(),
            source,
        };
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(io)?;
        self.canonical = canonical(&self.path);
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
            .ok_or(SourceError::NotResumed("the dead-letter file"))?;
        out.write_all(&s).map_err(|source| SourceError::File {
            path: self.path.clone(),
            source,
        })?;
        self.len += s.len() as u64;
        Ok(())
    }

    async fn sync(&mut self) -> Result<Flush, SourceError> {
        let path = self.path.clone();
        let io = |source: std::io::Error| SourceError::File {
            path: path.clone(),
            source,
        };
        let out = self
            .out
            .as_mut()
            .ok_or(SourceError::NotResumed("the dead-letter file"))?;
        out.flush().map_err(io)?;
        out.get_ref().sync_data().map_err(io)?;
        let pos = DeadLetterPosition {
            len: self.len,
            path: self.canonical.clone(),
            tail: tail_hash(out.get_ref(), self.len).map_err(io)?,
        };
        Ok(Flush::ready(
            rmp_serde::to_vec(&pos).expect("position encodes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_stored_before_fingerprints_still_load() {
        // `[offset, line]`, as `rmp_serde::to_vec` wrote the old two-field struct.
        let old = rmp_serde::to_vec(&(120u64, 7u64)).unwrap();
        let p: FilePosition = rmp_serde::from_slice(&old).unwrap();
        assert_eq!((p.offset, p.line, p.input), (120, 7, None));
        // The dead-letter length was a bare integer.
        let old = rmp_serde::to_vec(&4096u64).unwrap();
        assert_eq!(dead_letter_position(&old).unwrap(), (4096, None));
        // The new forms round-trip.
        let p = FilePosition {
            offset: 9,
            line: 1,
            input: Some(Fingerprint {
                path: "/x".into(),
                size: 10,
                tail: 3,
            }),
        };
        let b = rmp_serde::to_vec(&p).unwrap();
        assert_eq!(rmp_serde::from_slice::<FilePosition>(&b).unwrap(), p);
        let d = DeadLetterPosition {
            len: 5,
            path: "/q".into(),
            tail: 8,
        };
        let b = rmp_serde::to_vec(&d).unwrap();
        assert_eq!(dead_letter_position(&b).unwrap(), (5, Some(d)));
    }

    #[test]
    fn an_old_position_beyond_the_end_of_the_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("in.ndjson");
        std::fs::write(&f, "{}\n").unwrap();
        let at = |offset| FilePosition {
            offset,
            line: 1,
            input: None,
        };
        assert!(check_input(&f, &at(3)).is_ok());
        assert!(matches!(
            check_input(&f, &at(4)),
            Err(SourceError::WrongInput(_))
        ));
    }

    #[test]
    fn the_tail_hash_covers_only_the_window_before_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("in");
        let mut bytes = vec![b'a'; 100_000];
        std::fs::write(&f, &bytes).unwrap();
        let h = tail_hash(&File::open(&f).unwrap(), 90_000).unwrap();
        // A change before the window or after the offset does not matter; inside it does.
        bytes[10] = b'b';
        bytes[95_000] = b'b';
        std::fs::write(&f, &bytes).unwrap();
        assert_eq!(tail_hash(&File::open(&f).unwrap(), 90_000).unwrap(), h);
        bytes[89_999] = b'b';
        std::fs::write(&f, &bytes).unwrap();
        assert_ne!(tail_hash(&File::open(&f).unwrap(), 90_000).unwrap(), h);
    }
}
