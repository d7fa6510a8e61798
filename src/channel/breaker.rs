//! A circuit breaker per channel: when too many of a channel's recent requests fail in the
//! way a broken integration fails (bad requests, conflicts, confirms and releases of orders
//! that do not exist), its requests are shed with `503` and `Retry-After` for a while, and
//! the other channels carry on. Failures that are not the channel's doing (sold out, rate
//! limited, the engine unavailable) never count.
//!
//! Closed: requests pass and their outcomes are counted in a sliding window. Once the window
//! holds at least `min_requests` outcomes and the failed share reaches `error_ratio`, the
//! breaker opens: every request is shed for `open_ms`. Then it is half-open: up to
//! `probes` requests pass at once; the first failure opens it again, `probes` successes
//! close it.

use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// When a breaker opens, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerRule {
    /// Share of failed requests in the window that opens the breaker (0 < r ≤ 1).
    pub error_ratio: f64,
    /// Fewest requests in the window before the share is judged.
    pub min_requests: u32,
    /// Length of the sliding window.
    pub window_ms: u64,
    /// How long an open breaker sheds everything before it lets probes through.
    pub open_ms: u64,
    /// Requests a half-open breaker lets through; that many successes close it.
    pub probes: u32,
    /// Count and log what the breaker would do, but shed nothing.
    pub shadow: bool,
}

impl Default for BreakerRule {
    fn default() -> BreakerRule {
        BreakerRule {
            error_ratio: 0.5,
            min_requests: 20,
            window_ms: 10_000,
            open_ms: 5_000,
            probes: 5,
            shadow: false,
        }
    }
}

impl BreakerRule {
    /// Checks the rule's values.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::BadRequest(format!("breaker: {m}")));
        if !(self.error_ratio > 0.0 && self.error_ratio <= 1.0) {
            return bad("error_ratio must be above 0 and at most 1");
        }
        if self.min_requests == 0 || self.min_requests > 1_000_000 {
            return bad("min_requests must be from 1 to 1000000");
        }
        if !(100..=3_600_000).contains(&self.window_ms) {
            return bad("window_ms must be from 100 to 3600000");
        }
        if !(100..=3_600_000).contains(&self.open_ms) {
            return bad("open_ms must be from 100 to 3600000");
        }
        if self.probes == 0 || self.probes > 10_000 {
            return bad("probes must be from 1 to 10000");
        }
        Ok(())
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// The metric's and the API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    /// The gauge value: 0 closed, 1 half-open, 2 open.
    pub fn level(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

/// Slots the window is cut into: outcomes older than the window leave a slot at a time.
const SLOTS: usize = 10;

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    /// Per slot: its start (ms), requests and failures counted in it.
    slots: [(u64, u32, u32); SLOTS],
    /// Open: when probes may begin.
    open_until_ms: u64,
    /// Half-open: probes let through, and how many of them succeeded.
    probes_sent: u32,
    probes_passed: u32,
}

/// One channel's breaker.
#[derive(Debug)]
pub struct Breaker {
    rule: BreakerRule,
    inner: Mutex<Inner>,
}

/// What a request may do, as a breaker decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Pass; `probe` when it is one of a half-open breaker's probes.
    Pass { probe: bool },
    /// Shed, for this long.
    Shed { retry_after_ms: u64 },
}

/// A state change, for the caller to log and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

impl Breaker {
    /// A closed breaker following `rule`.
    pub fn new(rule: BreakerRule) -> Breaker {
        Breaker {
            rule,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                slots: [(0, 0, 0); SLOTS],
                open_until_ms: 0,
                probes_sent: 0,
                probes_passed: 0,
            }),
        }
    }

    /// The rule it follows.
    pub fn rule(&self) -> &BreakerRule {
        &self.rule
    }

    /// Its state at `now_ms` (an open breaker whose time is up reads half-open).
    pub fn state(&self, now_ms: u64) -> BreakerState {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match inner.state {
            BreakerState::Open if now_ms >= inner.open_until_ms => BreakerState::HalfOpen,
            state => state,
        }
    }

    /// Whether a request may pass at `now_ms`, and the state change deciding it made.
    pub fn admit(&self, now_ms: u64) -> (Admission, Option<Transition>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut transition = None;
        if inner.state == BreakerState::Open && now_ms >= inner.open_until_ms {
            inner.state = BreakerState::HalfOpen;
            inner.probes_sent = 0;
            inner.probes_passed = 0;
            transition = Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen,
            });
        }
        let admission = match inner.state {
            BreakerState::Closed => Admission::Pass { probe: false },
            BreakerState::Open => Admission::Shed {
                retry_after_ms: inner.open_until_ms.saturating_sub(now_ms).max(1),
            },
            BreakerState::HalfOpen if inner.probes_sent < self.rule.probes => {
                inner.probes_sent += 1;
                Admission::Pass { probe: true }
            }
            // Every probe is out: the others wait for their verdict, briefly.
            BreakerState::HalfOpen => Admission::Shed {
                retry_after_ms: (self.rule.open_ms / 10).max(100),
            },
        };
        if self.rule.shadow {
            if let Admission::Shed { .. } = admission {
                return (Admission::Pass { probe: false }, transition);
            }
        }
        (admission, transition)
    }

    /// Records the outcome of a request that passed; `failed` when it failed in the way that
    /// counts. Returns the state change it made, if any.
    pub fn record(&self, now_ms: u64, probe: bool, failed: bool) -> Option<Transition> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let slot_ms = (self.rule.window_ms / SLOTS as u64).max(1);
        let start = now_ms - now_ms % slot_ms;
        let slot = &mut inner.slots[((now_ms / slot_ms) % SLOTS as u64) as usize];
        if slot.0 != start {
            *slot = (start, 0, 0);
        }
        slot.1 += 1;
        if failed {
            slot.2 += 1;
        }
        match inner.state {
            BreakerState::HalfOpen if probe => {
                if failed {
                    return Some(self.open(&mut inner, now_ms, BreakerState::HalfOpen));
                }
                inner.probes_passed += 1;
                if inner.probes_passed >= self.rule.probes {
                    inner.state = BreakerState::Closed;
                    // A fresh start: the failures that opened it are history.
                    inner.slots = [(0, 0, 0); SLOTS];
                    return Some(Transition {
                        from: BreakerState::HalfOpen,
                        to: BreakerState::Closed,
                    });
                }
                None
            }
            BreakerState::Closed => {
                let oldest = now_ms.saturating_sub(self.rule.window_ms);
                let (requests, failures) = inner
                    .slots
                    .iter()
                    .filter(|s| s.0 + slot_ms > oldest)
                    .fold((0u64, 0u64), |(r, f), s| {
                        (r + u64::from(s.1), f + u64::from(s.2))
                    });
                let tripped = requests >= u64::from(self.rule.min_requests)
                    && failures as f64 >= self.rule.error_ratio * requests as f64;
                tripped.then(|| self.open(&mut inner, now_ms, BreakerState::Closed))
            }
            _ => None,
        }
    }

    /// Hands back a half-open breaker's probe slot that [`Breaker::admit`] gave to a request
    /// refused before it did anything: it proves nothing either way.
    pub fn unsend_probe(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.state == BreakerState::HalfOpen {
            inner.probes_sent = inner.probes_sent.saturating_sub(1);
        }
    }

    fn open(&self, inner: &mut Inner, now_ms: u64, from: BreakerState) -> Transition {
        inner.state = BreakerState::Open;
        inner.open_until_ms = now_ms + self.rule.open_ms;
        Transition {
            from,
            to: BreakerState::Open,
        }
    }
}

/// Whether an answer is the kind of failure a broken integration produces.
pub fn counts_as_failure(error: &Error) -> bool {
    matches!(
        error,
        Error::BadRequest(_)
            | Error::OrderConflict(_)
            | Error::Forbidden(_)
            | Error::PayloadTooLarge { .. }
            // An unknown order on confirm, release or lookup; an unknown SKU anywhere.
            | Error::NotFound(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> BreakerRule {
        BreakerRule {
            error_ratio: 0.5,
            min_requests: 4,
            window_ms: 1000,
            open_ms: 500,
            probes: 2,
            shadow: false,
        }
    }

    fn pass(b: &Breaker, now: u64, failed: bool) -> Option<Transition> {
        match b.admit(now).0 {
            Admission::Pass { probe } => b.record(now, probe, failed),
            Admission::Shed { .. } => panic!("shed at {now}"),
        }
    }

    #[test]
    fn opens_on_a_failure_spike_then_recovers_through_probes() {
        let b = Breaker::new(rule());
        let t = 10_000;
        assert_eq!(pass(&b, t, false), None);
        assert_eq!(pass(&b, t + 1, true), None);
        assert_eq!(pass(&b, t + 2, false), None);
        let opened = pass(&b, t + 3, true).expect("opened");
        assert_eq!(opened.to, BreakerState::Open);
        assert_eq!(
            b.admit(t + 100).0,
            Admission::Shed {
                retry_after_ms: 403
            }
        );
        // Half-open after open_ms: two probes pass, a third waits.
        let (first, changed) = b.admit(t + 503);
        assert_eq!(first, Admission::Pass { probe: true });
        assert_eq!(changed.map(|c| c.to), Some(BreakerState::HalfOpen));
        assert_eq!(b.admit(t + 504).0, Admission::Pass { probe: true });
        assert!(matches!(b.admit(t + 505).0, Admission::Shed { .. }));
        assert_eq!(b.record(t + 506, true, false), None);
        let closed = b.record(t + 507, true, false).expect("closed");
        assert_eq!(closed.to, BreakerState::Closed);
        assert_eq!(b.state(t + 508), BreakerState::Closed);
        // The failures that opened it no longer count.
        assert_eq!(pass(&b, t + 509, true), None);
    }

    #[test]
    fn a_probe_refused_before_it_ran_neither_closes_nor_uses_up_the_breaker() {
        let b = Breaker::new(rule());
        for i in 0..4 {
            pass(&b, 1000 + i, true);
        }
        for _ in 0..5 {
            assert_eq!(b.admit(1600).0, Admission::Pass { probe: true });
            b.unsend_probe();
        }
        assert_eq!(
            b.state(1601),
            BreakerState::HalfOpen,
            "nothing proved it healthy"
        );
        assert_eq!(b.admit(1602).0, Admission::Pass { probe: true });
        assert_eq!(
            b.admit(1603).0,
            Admission::Pass { probe: true },
            "slots came back"
        );
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let b = Breaker::new(rule());
        for i in 0..4 {
            pass(&b, 1000 + i, true);
        }
        assert_eq!(b.state(1004), BreakerState::Open);
        assert_eq!(b.admit(1600).0, Admission::Pass { probe: true });
        let again = b.record(1601, true, true).expect("reopened");
        assert_eq!(
            (again.from, again.to),
            (BreakerState::HalfOpen, BreakerState::Open)
        );
        assert!(matches!(b.admit(1602).0, Admission::Shed { .. }));
    }

    #[test]
    fn too_few_requests_or_old_failures_do_not_open_it() {
        let b = Breaker::new(rule());
        for i in 0..3 {
            assert_eq!(pass(&b, 5000 + i, true), None, "below min_requests");
        }
        // A second later those failures left the window.
        for i in 0..3 {
            assert_eq!(pass(&b, 6500 + i, false), None);
        }
        assert_eq!(pass(&b, 6600, true), None, "1 failure in 4");
        assert_eq!(b.state(6601), BreakerState::Closed);
    }

    #[test]
    fn a_shadow_breaker_sheds_nothing() {
        let b = Breaker::new(BreakerRule {
            shadow: true,
            ..rule()
        });
        for i in 0..4 {
            pass(&b, 1000 + i, true);
        }
        assert_eq!(b.state(1004), BreakerState::Open);
        assert_eq!(b.admit(1005).0, Admission::Pass { probe: false });
    }

    #[test]
    fn only_an_integrations_own_mistakes_count() {
        assert!(counts_as_failure(&Error::BadRequest("x".into())));
        assert!(counts_as_failure(&Error::NotFound("order o".into())));
        assert!(counts_as_failure(&Error::OrderConflict("o".into())));
        assert!(!counts_as_failure(&Error::SoldOut));
        assert!(!counts_as_failure(&Error::HoldExpired));
        assert!(!counts_as_failure(&Error::Unavailable("x".into())));
        assert!(!counts_as_failure(&Error::RateLimited {
            retry_after_ms: 1
        }));
    }
}
