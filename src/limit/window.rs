//! Cluster-wide sliding windows, kept in the engine by `lua/window.lua` so every gateway
//! instance sees the same counts and the same lockouts.
//!
//! Two uses: failed redemptions per client IP and per redeemer, which lock a subject out
//! with a lockout that doubles on every strike (brute-force guessing), and claims per
//! `user_id` (a plain rate limit). Each subject's keys share a hash tag, so one script call
//! touches one Redis Cluster slot; different subjects spread over the cluster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::SharedClock;
use crate::engine::keys::{window_keys, window_lock_key};
use crate::engine::measured::measured;
use crate::engine::{EngineError, Reply, ScriptEngine, SCRIPTS};

/// Failed attempts allowed per window before a lockout, and how the lockout escalates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailureRule {
    /// Failures allowed per window; the last one locks the subject out. 0 turns the rule off.
    pub max_failures: u32,
    /// The sliding window, in seconds.
    pub window_secs: u64,
    /// The first lockout, in seconds; each further strike doubles it.
    pub lockout_secs: u64,
    /// The longest lockout, in seconds.
    pub max_lockout_secs: u64,
    /// How long strikes are remembered for escalation, in seconds.
    pub strike_memory_secs: u64,
    /// Count and report, but never block.
    pub shadow: bool,
    /// When the engine cannot be reached: `true` lets requests through, `false` refuses
    /// them with `ERR_UNAVAILABLE`.
    pub fail_open: bool,
}

impl Default for FailureRule {
    fn default() -> FailureRule {
        FailureRule {
            max_failures: 10,
            window_secs: 600,
            lockout_secs: 60,
            max_lockout_secs: 3600,
            strike_memory_secs: 86_400,
            shadow: false,
            fail_open: true,
        }
    }
}

/// A plain sliding-window rate: at most `max` events per window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateRule {
    /// Events allowed per window; 0 turns the rule off.
    pub max: u32,
    /// The sliding window, in seconds.
    pub window_secs: u64,
    /// Count and report, but never block.
    pub shadow: bool,
    /// When the engine cannot be reached: `true` lets requests through.
    pub fail_open: bool,
}

impl Default for RateRule {
    fn default() -> RateRule {
        RateRule {
            max: 0,
            window_secs: 60,
            shadow: false,
            fail_open: true,
        }
    }
}

/// What a window said about a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allowed,
    /// Locked out or over the rate, for this many more milliseconds.
    Blocked { retry_after_ms: u64 },
}

/// The windows, over whichever engine runs the scripts.
#[derive(Clone)]
pub struct Windows {
    engine: Arc<dyn ScriptEngine>,
    clock: SharedClock,
    seq: Arc<AtomicU64>,
    instance: u64,
}

/// What a lockout's `until` (milliseconds, as `lua/window.lua` writes it) says at `now`.
/// Anything but a number there is a bug of the script's, as it would have been for the
/// script reading it.
fn lockout_left(until: Option<&str>, now: u64) -> Result<Verdict, EngineError> {
    let Some(text) = until else {
        return Ok(Verdict::Allowed);
    };
    let until: i64 = text.parse().map_err(|_| EngineError::Script {
        script: SCRIPTS.window.name(),
        message: format!("a lockout's until is not a number: {text:?}"),
    })?;
    Ok(match u64::try_from(until) {
        Ok(until) if until > now => Verdict::Blocked {
            retry_after_ms: until - now,
        },
        _ => Verdict::Allowed,
    })
}

impl Windows {
    /// Windows kept in `engine`, timed by `clock`; their script calls are measured like any.
    pub fn new(engine: Arc<dyn ScriptEngine>, clock: SharedClock) -> Windows {
        Windows {
            engine: measured(engine),
            clock,
            seq: Arc::new(AtomicU64::new(0)),
            instance: rand::random(),
        }
    }

    /// A member unique across instances, so two events in the same millisecond both count.
    fn member(&self, now: u64) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{now}:{:x}:{n}", self.instance)
    }

    async fn run(
        &self,
        kind: &str,
        subject: &str,
        args: Vec<String>,
    ) -> Result<Verdict, EngineError> {
        let reply = self
            .engine
            .eval(&SCRIPTS.window, window_keys(kind, subject), args)
            .await?;
        let items = reply.as_array().unwrap_or_default();
        let ms = items.get(1).and_then(Reply::as_i64).unwrap_or(0).max(1) as u64;
        Ok(match items.first().and_then(Reply::as_str) {
            Some("locked" | "limited") => Verdict::Blocked { retry_after_ms: ms },
            _ => Verdict::Allowed,
        })
    }

    /// Whether `subject` is locked out now: a plain read of its lockout's `until`, not a
    /// script call. Every redemption checks two subjects before it is tried, and on Redis a
    /// script call costs several times the one `HGET` it would make.
    pub async fn check(&self, kind: &str, subject: &str) -> Result<Verdict, EngineError> {
        let now = self.clock.now_ms();
        let until = self
            .engine
            .hget(window_lock_key(kind, subject), "until".into())
            .await?;
        lockout_left(until.as_deref(), now)
    }

    /// Records a failed attempt. `Blocked` when the subject is (now) locked out.
    pub async fn fail(
        &self,
        kind: &str,
        subject: &str,
        rule: &FailureRule,
    ) -> Result<Verdict, EngineError> {
        let now = self.clock.now_ms();
        let args = vec![
            "fail".into(),
            now.to_string(),
            self.member(now),
            (rule.window_secs * 1000).to_string(),
            rule.max_failures.to_string(),
            (rule.lockout_secs * 1000).to_string(),
            (rule.max_lockout_secs * 1000).to_string(),
            (rule.strike_memory_secs * 1000).to_string(),
        ];
        self.run(kind, subject, args).await
    }

    /// Counts one event against a rate. `Blocked` (and not counted) when over it.
    pub async fn take(
        &self,
        kind: &str,
        subject: &str,
        rule: &RateRule,
    ) -> Result<Verdict, EngineError> {
        let now = self.clock.now_ms();
        let args = vec![
            "take".into(),
            now.to_string(),
            self.member(now),
            (rule.window_secs * 1000).to_string(),
            rule.max.to_string(),
        ];
        self.run(kind, subject, args).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lockout_holds_until_its_end_and_not_a_millisecond_after() {
        assert_eq!(lockout_left(None, 1_000).ok(), Some(Verdict::Allowed));
        assert_eq!(
            lockout_left(Some("1500"), 1_000).ok(),
            Some(Verdict::Blocked {
                retry_after_ms: 500
            })
        );
        assert_eq!(
            lockout_left(Some("1000"), 1_000).ok(),
            Some(Verdict::Allowed)
        );
        assert_eq!(
            lockout_left(Some("999"), 1_000).ok(),
            Some(Verdict::Allowed)
        );
        assert_eq!(lockout_left(Some("-5"), 1_000).ok(), Some(Verdict::Allowed));
    }

    #[test]
    fn a_lockout_end_that_is_no_number_is_an_error_not_a_pass() {
        for text in ["", "soon", "1.5", "99999999999999999999"] {
            assert!(
                matches!(
                    lockout_left(Some(text), 1_000),
                    Err(EngineError::Script { .. })
                ),
                "{text:?}"
            );
        }
    }
}
