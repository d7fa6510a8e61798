//! The one notion of "now": milliseconds since the Unix epoch.
//!
//! Scripts are given the time in `ARGV` (see `lua/prelude.lua`), so every engine and every
//! test agrees on it; the inventory, the edge's windows and the embedded keyspace take a
//! [`Clock`] so tests move time by hand instead of sleeping. Code that is never driven by a
//! test clock (the operator commands, the event writer's stream ages) reads [`now_ms`].

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
///
/// Any `Fn() -> u64` closure is a clock, so tests can share an `AtomicU64` and move time.
pub trait Clock: Send + Sync + 'static {
    /// The current time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// A clock shared by the parts of a gateway that must agree on "now".
pub type SharedClock = Arc<dyn Clock>;

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        now_ms()
    }
}

impl<F: Fn() -> u64 + Send + Sync + 'static> Clock for F {
    fn now_ms(&self) -> u64 {
        self()
    }
}

/// The wall clock, to share.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// Now on the wall clock. A system clock set before 1970 reads 0.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[test]
    fn a_closure_over_a_shared_counter_is_a_clock_tests_move() {
        let now = Arc::new(AtomicU64::new(1_000));
        let clock: SharedClock = Arc::new({
            let now = Arc::clone(&now);
            move || now.load(Ordering::SeqCst)
        });
        assert_eq!(clock.now_ms(), 1_000);
        now.fetch_add(500, Ordering::SeqCst);
        assert_eq!(clock.now_ms(), 1_500);
    }

    #[test]
    fn the_system_clock_is_past_2020() {
        assert!(system().now_ms() > 1_577_836_800_000);
    }
}
