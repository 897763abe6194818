//! One `serve` per SQLite database: SQLite's locks are for one host and its queue claims
//! assume one instance, so a second `serve` on the same file is refused with a clear message
//! instead of both running the singleton jobs and racing on the file. The first holds an
//! exclusive lock on a file beside the database for as long as it runs; the operating system
//! drops the lock when the process ends, however it ends.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use crate::config::sqlite_path;

#[derive(Debug, thiserror::Error)]
pub enum InstanceLockError {
    #[error(
        "another `chitram serve` is already running on the SQLite database {database} (it holds {lock}). A SQLite \
         deployment is one instance; to run several, use Postgres (database.url = \"postgres://…\")"
    )]
    InUse { database: PathBuf, lock: PathBuf },
    #[error("cannot lock {lock} beside the SQLite database")]
    Io {
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Held while this process serves the database; dropping it lets another `serve` start.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

/// Locks the SQLite database `url` names for this process; `None` for Postgres and for an
/// in-memory database, which need no lock.
pub fn lock_sqlite_database(url: &str) -> Result<Option<InstanceLock>, InstanceLockError> {
    let Some(database) = sqlite_path(url) else {
        return Ok(None);
    };
    let lock = lock_path(&database);
    let io = |source| InstanceLockError::Io { lock: lock.clone(), source };
    if let Some(dir) = lock.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(&lock).map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(InstanceLock { _file: file })),
        Err(TryLockError::WouldBlock) => Err(InstanceLockError::InUse { database, lock }),
        Err(TryLockError::Error(source)) => Err(io(source)),
    }
}

/// `data/chitram.db` → `data/chitram.db.serve-lock`.
fn lock_path(database: &Path) -> PathBuf {
    let mut name = database.file_name().unwrap_or_default().to_os_string();
    name.push(".serve-lock");
    database.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_database_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/c.db", dir.path().display());
        let first = lock_sqlite_database(&url).unwrap().expect("a file database is locked");
        let refused = lock_sqlite_database(&url).unwrap_err();
        assert!(matches!(refused, InstanceLockError::InUse { .. }), "{refused}");
        assert!(refused.to_string().contains("another `chitram serve`"), "{refused}");
        drop(first);
        assert!(lock_sqlite_database(&url).unwrap().is_some(), "free again once the first is gone");
        assert!(lock_sqlite_database("postgres://u@h/db").unwrap().is_none());
    }
}
