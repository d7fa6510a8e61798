//! Token buckets: governor's GCRA limiters, one per rule.
//!
//! [`KeyedBuckets`] keeps one bucket per key in a `DashMap` (sharded locks, so checks of
//! different clients rarely contend); [`GlobalBucket`] is a single lock-free bucket. Time
//! comes from an injected governor [`Clock`], so tests drive it with
//! [`governor::clock::FakeRelativeClock`] instead of sleeping.
//!
//! # Keys and memory
//!
//! Public routes key by [`ClientKey`](super::ClientKey) (IPv4 address or IPv6 /64). Merchant
//! routes take from their channel's own [`GlobalBucket`] ([`crate::channel`]), found only
//! once the token was authenticated, so garbage tokens cannot fill any map.
//!
//! A bucket is a key plus one `u64` (its theoretical arrival time). With a `ClientKey`
//! (16 bytes) an entry is 24 bytes in a hashbrown table kept between 7/16 and 7/8 full, so
//! one live client costs ~30 to 60 bytes of table. `tests/limiter_memory.rs` measures the
//! resident set: ~53 bytes per key for a first flood of 1 M distinct clients, up to ~70 for
//! later floods (allocator fragmentation), bounded at 100. The memory stays in use until
//! [`KeyedBuckets::sweep`] drops the keys whose buckets have refilled (these are
//! indistinguishable from keys never seen) and frees the tables for reuse.
//! The sweep holds each shard's write lock while it scans that shard, so checks on that
//! shard wait for it (about a millisecond per 100 k keys in a shard in release builds).

use std::hash::Hash;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};

use super::{BucketRule, Decision, DecisionCounters, MAX_PER_SECOND};

type Keyed<K, C> = RateLimiter<K, DashMapStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One token bucket per key, for one rule.
pub struct KeyedBuckets<K, C = DefaultClock>
where
    K: Hash + Eq + Clone,
    C: Clock,
{
    counters: DecisionCounters,
    shadow: bool,
    /// `None` when the rule is off: no state, every request allowed, nothing recorded.
    limiter: Option<Keyed<K, C>>,
}

impl<K, C> KeyedBuckets<K, C>
where
    K: Hash + Eq + Clone,
    C: Clock,
{
    /// Buckets for `rule`, reported as `rule=name` in the decisions metric, on `clock`
    /// (`DefaultClock::default()` in production).
    ///
    /// `rule` should have passed [`LimitsConfig::validate`](super::LimitsConfig::validate);
    /// if not, a burst of 0 is taken as 1 and a rate above 10^9/s as 10^9/s.
    pub fn new(name: &'static str, rule: BucketRule, clock: C) -> KeyedBuckets<K, C> {
        KeyedBuckets {
            counters: DecisionCounters::new(name),
            shadow: rule.shadow,
            limiter: quota(rule).map(|q| RateLimiter::dashmap_with_clock(q, clock)),
        }
    }

    /// Takes a token from `key`'s bucket (creating a full bucket for a new key).
    pub fn check(&self, key: &K) -> Decision {
        let Some(limiter) = &self.limiter else {
            return Decision::Allow;
        };
        let decision = decide(limiter.check_key(key), limiter.clock(), self.shadow);
        self.counters.record(decision);
        decision
    }

    /// Drops the keys whose buckets are full again (idle for at least the refill time) and
    /// returns the freed memory to the allocator. Returns how many keys were dropped.
    pub fn sweep(&self) -> usize {
        let Some(limiter) = &self.limiter else {
            return 0;
        };
        let before = limiter.len();
        limiter.retain_recent();
        limiter.shrink_to_fit();
        before.saturating_sub(limiter.len())
    }

    /// Keys currently held (approximate while checks run concurrently).
    pub fn len(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rule's name in metrics.
    pub fn name(&self) -> &'static str {
        self.counters.rule
    }
}

/// A single token bucket shared by every request, for a global rule.
pub struct GlobalBucket<C = DefaultClock>
where
    C: Clock,
{
    counters: DecisionCounters,
    shadow: bool,
    limiter: Option<Direct<C>>,
}

impl<C: Clock> GlobalBucket<C> {
    /// The bucket for `rule`, reported as `rule=name`, on `clock`. Same leniency for
    /// unvalidated rules as [`KeyedBuckets::new`].
    pub fn new(name: &'static str, rule: BucketRule, clock: C) -> GlobalBucket<C> {
        GlobalBucket {
            counters: DecisionCounters::new(name),
            shadow: rule.shadow,
            limiter: quota(rule).map(|q| RateLimiter::direct_with_clock(q, clock)),
        }
    }

    /// Takes a token from the bucket.
    pub fn check(&self) -> Decision {
        let Some(limiter) = &self.limiter else {
            return Decision::Allow;
        };
        let decision = decide(limiter.check(), limiter.clock(), self.shadow);
        self.counters.record(decision);
        decision
    }

    /// The rule's name in metrics.
    pub fn name(&self) -> &'static str {
        self.counters.rule
    }
}

fn quota(rule: BucketRule) -> Option<Quota> {
    let per_second = NonZeroU32::new(rule.per_second.min(MAX_PER_SECOND))?;
    let burst = NonZeroU32::new(rule.burst).unwrap_or(NonZeroU32::MIN);
    Some(Quota::per_second(per_second).allow_burst(burst))
}

fn decide<C: Clock>(
    outcome: Result<(), NotUntil<C::Instant>>,
    clock: &C,
    shadow: bool,
) -> Decision {
    match outcome {
        Ok(()) => Decision::Allow,
        Err(not_until) => {
            let retry_after = not_until.wait_time_from(clock.now());
            if shadow {
                Decision::ShadowDeny { retry_after }
            } else {
                Decision::Deny { retry_after }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::limit::ClientKey;

    fn client(last: u8) -> ClientKey {
        ClientKey::from(IpAddr::from([192, 0, 2, last]))
    }

    fn deny_after(d: Decision) -> Duration {
        match d {
            Decision::Deny { retry_after } => retry_after,
            other => panic!("expected a deny, got {other:?}"),
        }
    }

    #[test]
    fn a_client_gets_its_burst_then_waits_for_refill() {
        let clock = FakeRelativeClock::default();
        let buckets = KeyedBuckets::new("public", BucketRule::enforced(50, 100), clock.clone());
        for _ in 0..100 {
            assert_eq!(buckets.check(&client(1)), Decision::Allow);
        }
        // One token comes back every 20 ms.
        assert_eq!(
            deny_after(buckets.check(&client(1))),
            Duration::from_millis(20)
        );
        clock.advance(Duration::from_millis(5));
        assert_eq!(
            deny_after(buckets.check(&client(1))),
            Duration::from_millis(15)
        );
        clock.advance(Duration::from_millis(15));
        assert_eq!(buckets.check(&client(1)), Decision::Allow);
        assert!(!buckets.check(&client(1)).is_allowed());
        // Sustained: one request per 20 ms keeps going through.
        for _ in 0..10 {
            clock.advance(Duration::from_millis(20));
            assert_eq!(buckets.check(&client(1)), Decision::Allow);
        }
    }

    #[test]
    fn clients_do_not_share_buckets() {
        let clock = FakeRelativeClock::default();
        let buckets = KeyedBuckets::new("public", BucketRule::enforced(1, 2), clock);
        assert!(buckets.check(&client(1)).is_allowed());
        assert!(buckets.check(&client(1)).is_allowed());
        assert!(!buckets.check(&client(1)).is_allowed());
        assert!(buckets.check(&client(2)).is_allowed());
        assert_eq!(buckets.len(), 2);
    }

    #[test]
    fn shadow_rules_count_but_let_requests_through() {
        let clock = FakeRelativeClock::default();
        let rule = BucketRule {
            per_second: 10,
            burst: 1,
            shadow: true,
        };
        let buckets = KeyedBuckets::new("public", rule, clock);
        assert_eq!(buckets.check(&client(1)), Decision::Allow);
        let d = buckets.check(&client(1));
        assert_eq!(
            d,
            Decision::ShadowDeny {
                retry_after: Duration::from_millis(100)
            }
        );
        assert!(d.is_allowed());
    }

    #[test]
    fn an_off_rule_allows_everything_and_holds_nothing() {
        let buckets = KeyedBuckets::new("global", BucketRule::OFF, FakeRelativeClock::default());
        for last in 0..=255 {
            assert_eq!(buckets.check(&client(last)), Decision::Allow);
        }
        assert!(buckets.is_empty());
        assert_eq!(buckets.sweep(), 0);
        let global = GlobalBucket::new("global", BucketRule::OFF, FakeRelativeClock::default());
        for _ in 0..1000 {
            assert_eq!(global.check(), Decision::Allow);
        }
    }

    #[test]
    fn unvalidated_rules_are_clamped_not_panicked_on() {
        let rule = BucketRule {
            per_second: u32::MAX,
            burst: 0,
            shadow: false,
        };
        let buckets = KeyedBuckets::new("public", rule, FakeRelativeClock::default());
        assert_eq!(buckets.check(&client(1)), Decision::Allow);
        assert_eq!(
            deny_after(buckets.check(&client(1))),
            Duration::from_nanos(1)
        );
    }

    #[test]
    fn sweep_drops_only_refilled_keys() {
        let clock = FakeRelativeClock::default();
        let rule = BucketRule::enforced(50, 100);
        let buckets = KeyedBuckets::new("public", rule, clock.clone());
        for last in 0..200 {
            assert!(buckets.check(&client(last)).is_allowed());
        }
        // A client that drained its bucket stays until the bucket has refilled.
        for _ in 0..99 {
            buckets.check(&client(7));
        }
        clock.advance(Duration::from_millis(500));
        assert_eq!(buckets.sweep(), 199);
        assert_eq!(buckets.len(), 1);
        // Its state survived: 500 ms gave back 25 tokens, not a full bucket.
        for _ in 0..25 {
            assert_eq!(buckets.check(&client(7)), Decision::Allow);
        }
        assert!(!buckets.check(&client(7)).is_allowed());
        clock.advance(rule.refill_time() + Duration::from_millis(20));
        assert_eq!(buckets.sweep(), 1);
        assert!(buckets.is_empty());
        // A swept client starts over with a full bucket, as if never seen.
        for _ in 0..100 {
            assert_eq!(buckets.check(&client(7)), Decision::Allow);
        }
    }

    #[test]
    fn global_bucket_is_shared_by_everyone() {
        let clock = FakeRelativeClock::default();
        let global = GlobalBucket::new("global", BucketRule::enforced(1000, 3), clock.clone());
        assert_eq!(global.name(), "global");
        for _ in 0..3 {
            assert_eq!(global.check(), Decision::Allow);
        }
        assert_eq!(deny_after(global.check()), Duration::from_millis(1));
        clock.advance(Duration::from_millis(1));
        assert_eq!(global.check(), Decision::Allow);

        let shadow = GlobalBucket::new(
            "global",
            BucketRule {
                per_second: 1,
                burst: 1,
                shadow: true,
            },
            clock,
        );
        assert_eq!(shadow.check(), Decision::Allow);
        assert!(matches!(shadow.check(), Decision::ShadowDeny { .. }));
    }
}
