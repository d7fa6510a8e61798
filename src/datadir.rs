//! One gateway per data dir: an OS lock on `<data dir>/kamigate.lock`.
//!
//! The embedded engine lives in the process that runs it, rebuilt from the ledger in the
//! data dir. Two such processes on one data dir would be two inventories of the same codes,
//! each selling every code once: the double sale this product exists to prevent. So a
//! gateway on the embedded engine takes an exclusive lock on the data dir for as long as it
//! runs, and a second one refuses to start. The lock is the kernel's (`flock`), so a crash
//! or `kill -9` releases it with the process: no stale lock file to clean up.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Holds the data dir's lock until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Why the data dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "data dir {dir} is in use by another kamigate (pid {holder}): stop it first, or give \
         this one its own KAMIGATE_DATA_DIR; two embedded engines over one ledger would sell \
         the same codes twice"
    )]
    InUse { dir: PathBuf, holder: String },
    #[error("locking data dir {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Takes the exclusive lock of `dir` (created if missing), or says who holds it.
pub fn lock(dir: &Path) -> Result<DataDirLock, LockError> {
    let io = |source| LockError::Io {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join("kamigate.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "unknown".into());
            return Err(LockError::InUse {
                dir: dir.to_owned(),
                holder,
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    // Who holds it, for the message a second process prints; the lock itself is the flock.
    file.set_len(0).map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DataDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = lock(dir.path()).expect("first lock");
        let second = lock(dir.path()).expect_err("in use");
        let message = second.to_string();
        assert!(
            message.contains(&std::process::id().to_string()),
            "{message}"
        );
        drop(first);
        lock(dir.path()).expect("free again");
    }
}
