//! Failure streaks: an outage of the ledger or the engine, or one SKU whose batches the
//! ledger rejects, each retried with a delay that doubles up to a cap.

use std::fmt;
use std::time::{Duration, Instant};

/// First delay after a failure; doubles up to [`super::WriterOptions::max_backoff_ms`].
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A failure streak (an outage, or one SKU's rejected batches): logged when it starts and
/// when it ends, never per attempt, with an exponentially growing delay.
#[derive(Debug, Default)]
pub(super) struct Trouble {
    since: Option<Instant>,
    attempts: u32,
    delay: Duration,
    retry_at: Option<Instant>,
}

impl Trouble {
    /// Records a failure of `scope` (a SKU, or all of them); returns how long to wait
    /// before the next attempt.
    pub(super) fn fail(
        &mut self,
        scope: &str,
        error: &dyn fmt::Display,
        max: Duration,
    ) -> Duration {
        self.attempts += 1;
        if self.since.is_none() {
            self.since = Some(Instant::now());
            self.delay = FIRST_BACKOFF.min(max);
            tracing::warn!(
                scope,
                %error,
                "event writer: ledger writes failing; retrying with backoff until they recover"
            );
        } else {
            self.delay = (self.delay * 2).min(max);
        }
        self.retry_at = Some(Instant::now() + self.delay);
        self.delay
    }

    /// Whether the next attempt is due.
    pub(super) fn due(&self) -> bool {
        self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// Ends a streak, if any.
    pub(super) fn recover(&mut self, scope: &str) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                scope,
                after = ?since.elapsed(),
                failed_attempts = self.attempts,
                "event writer: ledger writes recovered"
            );
            *self = Trouble::default();
        }
    }
}
