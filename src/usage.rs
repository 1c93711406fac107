//! Usage mistakes, told apart from failures: README ("Exit status") promises exit 2 for a
//! configuration or usage error and 1 for everything else, and an operator's script must be
//! able to tell "you asked for the wrong thing" from "it broke".

use std::path::Path;

use canopy_actors::engine::EngineError;
use canopy_actors::source::SourceError;

use crate::api::auth::TokensError;
use crate::config::ConfigError;

/// A command given something it cannot use: a data directory without a store, a missing
/// input. Nothing was created or written when it is returned.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for an error that ended a command: 2 for a usage or configuration mistake,
/// 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    let usage = e.chain().any(|c| {
        c.is::<UsageError>()
            || c.is::<ConfigError>()
            || c.is::<TokensError>()
            || matches!(c.downcast_ref(), Some(SourceError::WrongInput(_)))
            || matches!(
                c.downcast_ref(),
                Some(EngineError::Source(SourceError::WrongInput(_)))
            )
    });
    if usage {
        2
    } else {
        1
    }
}

/// Refuses a data directory that holds no embedded store, for the commands that only read one
/// (`dump`, `audit`, `serve`): opening it would create an empty store in a mistyped path and
/// report zero nodes as if that were the answer.
pub fn require_store(dir: &Path) -> Result<(), UsageError> {
    let file = crate::store::embedded::FILE_NAME;
    let single = dir.join(file).is_file();
    let partitions = || {
        std::fs::read_dir(dir).is_ok_and(|rd| {
            rd.filter_map(Result::ok).any(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("partition-"))
                    .is_some_and(|n| n.parse::<i32>().is_ok())
                    && e.path().join(file).is_file()
            })
        })
    };
    if single || partitions() {
        Ok(())
    } else {
        Err(UsageError(format!("no canopy store in {}", dir.display())))
    }
}

/// Refuses an input file that cannot be read, before `ingest` creates anything.
pub fn require_input(path: &Path) -> Result<(), UsageError> {
    let bad = |why: String| UsageError(format!("input {}: {why}", path.display()));
    let f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let m = f.metadata().map_err(|e| bad(e.to_string()))?;
    if m.is_dir() {
        return Err(bad("is a directory".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_mistakes_exit_2_and_failures_1() {
        let e = anyhow::Error::new(UsageError("no canopy store in /x".into()));
        assert_eq!(exit_code(&e), 2);
        let e = anyhow::Error::new(EngineError::Source(SourceError::WrongInput("x".into())));
        assert_eq!(exit_code(&e.context("ingest")), 2);
        let e = anyhow::Error::new(EngineError::Source(SourceError::Io("disk".into())));
        assert_eq!(exit_code(&e), 1);
    }

    #[test]
    fn a_directory_without_a_store_is_refused_and_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("no/such/dir");
        let e = require_store(&missing).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("no canopy store in {}", missing.display())
        );
        assert!(!missing.exists());
        assert!(require_store(d.path()).is_err());
        std::fs::create_dir(d.path().join("partition-3")).unwrap();
        assert!(
            require_store(d.path()).is_err(),
            "an empty partition directory"
        );
        std::fs::write(d.path().join("partition-3/canopy.redb"), b"").unwrap();
        assert!(require_store(d.path()).is_ok());
        assert!(require_input(&missing).is_err());
        assert!(require_input(d.path()).is_err(), "a directory");
    }
}
