//! Waiting in tests: look again and again until a condition holds, within a deadline; never
//! a fixed sleep that is too short on a busy machine and too long everywhere else.

use std::fmt::Debug;
use std::future::Future;
use std::panic::Location;
use std::time::Duration;

use tokio::time::Instant;

/// The first pause between two looks; each pause doubles, up to [`MAX_INTERVAL`].
const FIRST_INTERVAL: Duration = Duration::from_millis(10);

/// The longest pause between two looks: a test that bounds how long something may take
/// sees it at most this late, and a slow condition is not polled in a tight loop.
const MAX_INTERVAL: Duration = Duration::from_millis(100);

/// Looks with `observe` until `done` accepts what it saw, and returns that. After `within`
/// the test fails, saying `what` it waited for, the last value it saw and where the test
/// waited.
///
/// ```ignore
/// let view = eventually(
///     Duration::from_secs(10),
///     "the ledger caught up with the engine",
///     || gw.merchant_get("/v1/skus/s"),
///     |(_, view)| view["in_flight"] == 0,
/// )
/// .await;
/// ```
#[track_caller]
pub fn eventually<'a, T, F, Fut>(
    within: Duration,
    what: &'a str,
    mut observe: F,
    done: impl Fn(&T) -> bool + 'a,
) -> impl Future<Output = T> + 'a
where
    T: Debug + 'a,
    F: FnMut() -> Fut + 'a,
    Fut: Future<Output = T> + 'a,
{
    // Not an `async fn`: the caller's location is taken here, where `#[track_caller]` works.
    let caller = Location::caller();
    async move {
        let deadline = Instant::now() + within;
        let mut interval = FIRST_INTERVAL;
        loop {
            let seen = observe().await;
            if done(&seen) {
                return seen;
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("waited {within:?} for {what}; last seen: {seen:?} (at {caller})");
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
            interval = (interval * 2).min(MAX_INTERVAL);
        }
    }
}
