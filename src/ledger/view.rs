//! Reading what every gateway keeps a view of (the pauses in force, the channels and their
//! tokens): within a deadline, and when the ledger cannot answer, keeping the last view and
//! saying so once in the log, and once more when it answers again.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::LedgerError;

/// How long a refresh waits for the ledger before it counts as unreadable.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The reads of one view, and whether the last one failed.
#[derive(Debug)]
pub struct ViewReads {
    /// What the view holds, plural, for the log (`pauses`, `channels`).
    what: &'static str,
    stale: AtomicBool,
}

impl ViewReads {
    pub const fn new(what: &'static str) -> ViewReads {
        ViewReads {
            what,
            stale: AtomicBool::new(false),
        }
    }

    /// Runs one read: its records, or `None` when the ledger failed or did not answer within
    /// [`READ_TIMEOUT`] (the view last read then stays in force).
    pub async fn read<T>(&self, read: impl Future<Output = Result<T, LedgerError>>) -> Option<T> {
        let read = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(read) => read.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", READ_TIMEOUT.as_millis())),
        };
        let what = self.what;
        match read {
            Ok(records) => {
                if self.stale.swap(false, Ordering::Relaxed) {
                    tracing::info!("{what} read from the ledger again");
                }
                Some(records)
            }
            Err(error) => {
                if !self.stale.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        %error,
                        "reading {what} from the ledger failed: the {what} last read stay in \
                         force until it answers again"
                    );
                }
                None
            }
        }
    }

    /// Whether the last read failed: the view may be behind the ledger.
    pub fn stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }
}
