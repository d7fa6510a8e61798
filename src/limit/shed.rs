//! Load shedding: a cap on requests in flight.
//!
//! When the engine slows down, requests pile up; past a point every queued request will
//! time out anyway, and serving them only delays the ones that could still succeed. Past
//! the cap the gateway answers 503 `ERR_UNAVAILABLE` with `Retry-After` at once, which costs
//! almost nothing, so the instance keeps its latency for the requests it admitted.
//!
//! The counter is one atomic: [`InFlight::try_enter`] adds first and backs out if that went
//! past the cap, so it never blocks and never admits more than the cap. Its metric handles
//! are registered on first use and kept (see the [module docs](super)).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use metrics::{Counter, Gauge};

use crate::error::Error;
use crate::metrics::{IN_FLIGHT_REQUESTS, SHED};

/// The in-flight cap shared by every request of a listener.
#[derive(Debug)]
pub struct InFlight {
    current: AtomicUsize,
    max: usize,
    metrics: OnceLock<ShedMetrics>,
}

#[derive(Debug)]
struct ShedMetrics {
    in_flight: Gauge,
    shed: Counter,
}

impl InFlight {
    /// A cap of `max` concurrent requests (0 sheds everything).
    pub fn new(max: usize) -> InFlight {
        InFlight {
            current: AtomicUsize::new(0),
            max,
            metrics: OnceLock::new(),
        }
    }

    /// Admits a request, or `None` when `max` are already in flight (counted in
    /// [`SHED`]). The request counts until the guard is dropped.
    pub fn try_enter(&self) -> Option<InFlightGuard<'_>> {
        let before = self.current.fetch_add(1, Ordering::AcqRel);
        if before >= self.max {
            self.current.fetch_sub(1, Ordering::AcqRel);
            self.metrics().shed.increment(1);
            return None;
        }
        self.metrics().in_flight.increment(1.0);
        Some(InFlightGuard { in_flight: self })
    }

    /// [`try_enter`](Self::try_enter) as the API's error: 503 `ERR_UNAVAILABLE`.
    pub fn enter(&self) -> Result<InFlightGuard<'_>, Error> {
        self.try_enter()
            .ok_or_else(|| Error::Unavailable("too many requests in flight".into()))
    }

    /// Requests admitted and not yet finished. While requests are being turned away this
    /// may briefly read above the cap by the number of refusals under way.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    fn metrics(&self) -> &ShedMetrics {
        self.metrics.get_or_init(|| ShedMetrics {
            in_flight: metrics::gauge!(IN_FLIGHT_REQUESTS),
            shed: metrics::counter!(SHED),
        })
    }
}

/// One admitted request; dropping it (however the request ends) frees its slot.
#[derive(Debug)]
#[must_use = "the request counts as in flight only while the guard is held"]
pub struct InFlightGuard<'a> {
    in_flight: &'a InFlight,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.in_flight.current.fetch_sub(1, Ordering::AcqRel);
        self.in_flight.metrics().in_flight.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use super::*;
    use crate::limit::testing::TestRecorder;

    #[test]
    fn admits_up_to_the_cap_and_frees_slots_on_drop() {
        let cap = InFlight::new(2);
        let a = cap.try_enter().expect("first");
        let b = cap.try_enter().expect("second");
        assert_eq!(cap.current(), 2);
        assert!(cap.try_enter().is_none());
        assert_eq!(cap.current(), 2, "a refusal leaves no trace");
        drop(a);
        assert_eq!(cap.current(), 1);
        let c = cap.try_enter().expect("a slot was freed");
        drop((b, c));
        assert_eq!(cap.current(), 0);
    }

    #[test]
    fn a_refusal_is_a_503_with_retry_after() {
        let cap = InFlight::new(0);
        let e = cap.enter().expect_err("cap 0 sheds everything");
        assert_eq!(e.code(), "ERR_UNAVAILABLE");
        assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after_secs(), Some(1));
        assert_eq!(cap.max(), 0);
    }

    #[test]
    fn a_panicking_request_still_frees_its_slot() {
        let cap = InFlight::new(1);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guard = cap.try_enter().expect("free");
            panic!("handler bug");
        }));
        assert!(result.is_err());
        assert_eq!(cap.current(), 0);
    }

    #[test]
    fn never_admits_more_than_the_cap_under_contention() {
        const THREADS: usize = 8;
        let cap = InFlight::new(3);
        let start = Barrier::new(THREADS);
        // Raised after admission and lowered before release, so it never exceeds the
        // number of guards alive.
        let holding = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    start.wait();
                    for _ in 0..2000 {
                        if let Some(guard) = cap.try_enter() {
                            let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            std::hint::spin_loop();
                            holding.fetch_sub(1, Ordering::SeqCst);
                            drop(guard);
                        }
                    }
                });
            }
        });
        let peak = peak.into_inner();
        assert!((1..=3).contains(&peak), "peak {peak}");
        assert_eq!(cap.current(), 0);
    }

    #[test]
    fn admissions_and_sheds_are_measured() {
        let recorder = TestRecorder::default();
        let cap = InFlight::new(1);
        metrics::with_local_recorder(&recorder, || {
            let guard = cap.try_enter().expect("free");
            assert!(cap.try_enter().is_none());
            assert!(cap.try_enter().is_none());
            assert_eq!(recorder.gauge("kamigate_in_flight_requests{}"), Some(1.0));
            drop(guard);
        });
        assert_eq!(recorder.gauge("kamigate_in_flight_requests{}"), Some(0.0));
        assert_eq!(recorder.counter("kamigate_shed_total{}"), 2);
    }
}
