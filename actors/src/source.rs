//! The source and dead-letter ports. A source yields decoded records in batches, each batch with
//! the position just after it; the engine stores that position with the checkpoint that makes the
//! batch durable and hands it back on restart.

use crate::record::{Record, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source I/O: {0}")]
    Io(String),
    /// A file of the source or of the dead-letter output failed to open, read, write or sync.
    #[error("source I/O: {}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `next_batch`, `write` or `sync` came before `resume`: a bug in the caller.
    #[error("source I/O: {0} not resumed")]
    NotResumed(&'static str),
    /// The thread that reads or generates the records could not start.
    #[error("source I/O: starting {what}: {source}")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("source position is invalid: {0}")]
    BadPosition(String),
    #[error("source unavailable: {0}")]
    Unavailable(String),
    /// The stored position belongs to another input or dead-letter output than the one given
    /// (a usage mistake, refused before anything is read or written).
    #[error("{0}")]
    WrongInput(String),
}

impl SourceError {
    /// Whether trying again (reopening the source) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Io(_)
            | SourceError::File { .. }
            | SourceError::NotResumed(_)
            | SourceError::Thread { .. }
            | SourceError::Unavailable(_) => true,
            SourceError::BadPosition(_) | SourceError::WrongInput(_) => false,
        }
    }
}

/// One input record: where it came from, its original bytes (for dead letters), and its decoding.
#[derive(Debug)]
pub struct Input {
    /// Position tag of the record: the 1-based line of a file, or a Kafka offset.
    pub tag: u64,
    /// Source-specific coordinates for dead letters (Kafka: topic/partition/key).
    pub origin: Option<std::sync::Arc<Origin>>,
    pub raw: Vec<u8>,
    pub decoded: Result<Record, Refusal>,
}

/// Where a Kafka record came from (kept apart so file inputs pay nothing for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub key: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
pub struct SourceBatch {
    pub inputs: Vec<Input>,
    /// The position after this batch, opaque to the engine.
    pub position: Vec<u8>,
}

#[async_trait::async_trait]
pub trait Source: Send {
    /// Positions the source just after `position` (None: from the beginning).
    async fn resume(&mut self, position: Option<&[u8]>) -> Result<(), SourceError>;
    /// The next batch, or `None` at the end of a finite source.
    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError>;
}

/// See [`DeadLetters::sync`].
pub struct Flush {
    pub position: Vec<u8>,
    pub durable:
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SourceError>> + Send>>,
}

impl Flush {
    /// Already durable (the writer synced before returning).
    pub fn ready(position: Vec<u8>) -> Self {
        Flush {
            position,
            durable: Box::pin(std::future::ready(Ok(()))),
        }
    }
}

/// A refused record on its way to the dead-letter output.
#[derive(Debug)]
pub struct DeadLetter<'a> {
    pub tag: u64,
    /// A record read again after a restart, for a tenant that was parked when it was first read:
    /// its letter was never written, even though later tags were (a sink that skips tags it
    /// already holds must not skip this one).
    pub backlog: bool,
    pub origin: Option<&'a Origin>,
    pub refusal: &'a Refusal,
    pub raw: &'a [u8],
}

#[async_trait::async_trait]
pub trait DeadLetters: Send {
    /// Drops anything written after `position` (None: everything), so that a restart from a
    /// checkpoint writes each dead letter once.
    async fn resume(&mut self, position: Option<&[u8]>) -> Result<(), SourceError>;
    async fn write(&mut self, dl: DeadLetter<'_>) -> Result<(), SourceError>;
    /// The position to checkpoint, with a future that resolves once everything written so far
    /// is durable. The engine awaits it in the checkpoint's commit task, before the store
    /// commit, so that a slow dead-letter sink does not stop processing.
    async fn sync(&mut self) -> Result<Flush, SourceError>;
}

/// Dead letters that go nowhere (for callers that only want the numbers).
pub struct DiscardDeadLetters;

#[async_trait::async_trait]
impl DeadLetters for DiscardDeadLetters {
    async fn resume(&mut self, _: Option<&[u8]>) -> Result<(), SourceError> {
        Ok(())
    }
    async fn write(&mut self, _: DeadLetter<'_>) -> Result<(), SourceError> {
        Ok(())
    }
    async fn sync(&mut self) -> Result<Flush, SourceError> {
        Ok(Flush::ready(Vec::new()))
    }
}
