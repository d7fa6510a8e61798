//! A clock tests move by hand, so hold expiry is tested without sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kamigate::clock::SharedClock;

/// Milliseconds since the epoch, advanced only by [`ManualClock::advance`].
#[derive(Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// Starts at a fixed, realistic instant (2026-01-01T00:00:00Z).
    pub fn new() -> ManualClock {
        ManualClock(Arc::new(AtomicU64::new(1_767_225_600_000)))
    }

    /// The clock to hand to an inventory.
    pub fn clock(&self) -> SharedClock {
        let now = self.0.clone();
        Arc::new(move || now.load(Ordering::SeqCst))
    }

    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}
