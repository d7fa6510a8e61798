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
use crate::engine::keys::window_keys;
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

    /// Whether `subject` is locked out now.
    pub async fn check(&self, kind: &str, subject: &str) -> Result<Verdict, EngineError> {
        let now = self.clock.now_ms();
        self.run(kind, subject, vec!["check".into(), now.to_string()])
            .await
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
