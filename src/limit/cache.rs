//! Local memories of rejects, so repeated hopeless requests never reach Redis.
//!
//! In a flash sale most requests arrive after the stock is gone, and in a brute-force attack
//! most come from clients already locked out. Each would cost a Redis round trip to learn
//! what this instance already knows. Both caches answer from a `DashMap` instead and are
//! bounded, so hostile input cannot grow them without limit.
//!
//! - [`SoldOutCache`]: SKUs an engine claim found sold out, for `sold_out_cache_ms`, or until
//!   inventory returns through this instance ([`SoldOutCache::invalidate`]). Other instances
//!   do not hear of it, so `sold_out_cache_ms` is the longest they can keep answering
//!   `ERR_SOLD_OUT` after stock came back.
//! - [`LockoutCache`]: clients and redeemers the Redis window locked out, until the lockout
//!   ends. Subjects are kept as keyed 64-bit fingerprints (see
//!   [`Fingerprinter`]), never as the redeemer strings themselves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use dashmap::DashMap;

use super::Fingerprinter;

/// SKUs remembered as sold out at most. SKUs are created by merchants, so this is far above
/// any real catalogue; past it, marks are ignored until entries expire.
pub const SOLD_OUT_MAX_SKUS: usize = 65_536;

/// SKUs known to be sold out, each for a bounded time.
pub struct SoldOutCache {
    /// SKU → when (on `now_ms`) it was last found sold out.
    marked_at_ms: DashMap<Box<str>, u64>,
    ttl_ms: u64,
    now_ms: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for SoldOutCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoldOutCache")
            .field("ttl_ms", &self.ttl_ms)
            .field("len", &self.marked_at_ms.len())
            .finish()
    }
}

impl SoldOutCache {
    /// A cache that remembers a sold-out SKU for `ttl_ms` (0: never), on a monotonic clock.
    pub fn new(ttl_ms: u64) -> SoldOutCache {
        let epoch = Instant::now();
        SoldOutCache::with_clock(ttl_ms, move || {
            u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
        })
    }

    /// A cache on a given millisecond clock (tests move it by hand). The clock should not go
    /// backwards; if it does, entries live longer, never shorter.
    pub fn with_clock(
        ttl_ms: u64,
        now_ms: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> SoldOutCache {
        SoldOutCache {
            marked_at_ms: DashMap::new(),
            ttl_ms,
            now_ms: Box::new(now_ms),
        }
    }

    /// Remembers that an engine claim on `sku` just answered sold out.
    ///
    /// A release racing with this call may be followed by the mark; the SKU then reads sold
    /// out for up to `ttl_ms` on this instance too, the same bound other instances have.
    pub fn mark(&self, sku: &str) {
        if self.ttl_ms == 0 {
            return;
        }
        let now = (self.now_ms)();
        if let Some(mut marked) = self.marked_at_ms.get_mut(sku) {
            *marked = now;
            return;
        }
        if self.marked_at_ms.len() >= SOLD_OUT_MAX_SKUS {
            self.sweep();
            if self.marked_at_ms.len() >= SOLD_OUT_MAX_SKUS {
                return;
            }
        }
        self.marked_at_ms.insert(sku.into(), now);
    }

    /// Whether `sku` was found sold out less than `ttl_ms` ago and not invalidated since.
    pub fn is_sold_out(&self, sku: &str) -> bool {
        let Some(marked) = self.marked_at_ms.get(sku).map(|m| *m) else {
            return false;
        };
        let now = (self.now_ms)();
        if now.saturating_sub(marked) < self.ttl_ms {
            return true;
        }
        // The read guard is gone: removing under it would deadlock the shard.
        self.marked_at_ms
            .remove_if(sku, |_, m| now.saturating_sub(*m) >= self.ttl_ms);
        false
    }

    /// Forgets `sku`: inventory came back (release, hold expiry, new batch).
    pub fn invalidate(&self, sku: &str) {
        self.marked_at_ms.remove(sku);
    }

    /// Drops expired entries; returns how many.
    pub fn sweep(&self) -> usize {
        let now = (self.now_ms)();
        let before = self.marked_at_ms.len();
        self.marked_at_ms
            .retain(|_, m| now.saturating_sub(*m) < self.ttl_ms);
        before.saturating_sub(self.marked_at_ms.len())
    }

    /// SKUs currently remembered, expired or not yet swept included.
    pub fn len(&self) -> usize {
        self.marked_at_ms.len()
    }

    /// Whether no SKU is remembered.
    pub fn is_empty(&self) -> bool {
        self.marked_at_ms.is_empty()
    }
}

/// Clients and redeemers known to be locked out, until when.
///
/// Bounded by `max_entries` (each ~24 bytes of table, 100 000 entries ≈ 2–4 MiB): when a new
/// subject would go past it, expired entries are dropped first; if the cache is still full,
/// the lockout is not cached ([`lock`](Self::lock) returns `false`) and no further attempt
/// is made until the earliest cached lockout ends. Not caching is safe: the Redis window
/// still enforces the lockout, at the cost of a round trip. Concurrent inserts may overshoot
/// the bound by the number of threads inserting at that moment.
///
/// Times are milliseconds on whatever clock the caller uses for both [`lock`](Self::lock) and
/// [`locked_until`](Self::locked_until) (the Redis window's, typically epoch milliseconds).
/// A lockout lifted in Redis before its end (by an operator) is still answered here until it
/// would have ended.
#[derive(Debug)]
pub struct LockoutCache {
    /// Subject fingerprint → lockout end.
    until_ms: DashMap<u64, u64>,
    fingerprints: Fingerprinter,
    max_entries: usize,
    /// While full of live lockouts: when the earliest ends, before which eviction is pointless.
    full_until_ms: AtomicU64,
}

impl LockoutCache {
    /// An empty cache of at most `max_entries` subjects (at least 1).
    pub fn new(max_entries: usize) -> LockoutCache {
        LockoutCache {
            until_ms: DashMap::new(),
            fingerprints: Fingerprinter::new(),
            max_entries: max_entries.max(1),
            full_until_ms: AtomicU64::new(0),
        }
    }

    /// Remembers that `subject` is locked out until `until_ms`. Name the kind in the subject
    /// (`ip:203.0.113.9`, `redeemer:user-42`) so different kinds never share an entry. A
    /// later end replaces an earlier one, never the reverse. Returns whether it is cached.
    pub fn lock(&self, subject: &str, until_ms: u64, now_ms: u64) -> bool {
        if until_ms <= now_ms {
            return false;
        }
        let key = self.fingerprints.fingerprint(subject.as_bytes());
        if let Some(mut until) = self.until_ms.get_mut(&key) {
            *until = (*until).max(until_ms);
            return true;
        }
        if self.until_ms.len() >= self.max_entries && !self.make_room(now_ms) {
            return false;
        }
        self.until_ms
            .entry(key)
            .and_modify(|until| *until = (*until).max(until_ms))
            .or_insert(until_ms);
        true
    }

    /// When `subject`'s lockout ends, if it is locked out at `now_ms`.
    pub fn locked_until(&self, subject: &str, now_ms: u64) -> Option<u64> {
        let key = self.fingerprints.fingerprint(subject.as_bytes());
        let until = self.until_ms.get(&key).map(|u| *u)?;
        if until > now_ms {
            return Some(until);
        }
        self.until_ms.remove_if(&key, |_, u| *u <= now_ms);
        None
    }

    /// Drops lockouts that ended by `now_ms`; returns how many.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let before = self.until_ms.len();
        self.until_ms.retain(|_, until| *until > now_ms);
        before.saturating_sub(self.until_ms.len())
    }

    /// Subjects currently remembered, ended or not yet swept included.
    pub fn len(&self) -> usize {
        self.until_ms.len()
    }

    /// Whether no subject is remembered.
    pub fn is_empty(&self) -> bool {
        self.until_ms.is_empty()
    }

    /// The bound.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Evicts ended lockouts; whether there is room afterwards. A full scan happens at most
    /// once per earliest lockout end, so a cache full of live lockouts refuses in O(1).
    fn make_room(&self, now_ms: u64) -> bool {
        if now_ms < self.full_until_ms.load(Ordering::Acquire) {
            return false;
        }
        let mut earliest_end = u64::MAX;
        self.until_ms.retain(|_, until| {
            let live = *until > now_ms;
            if live {
                earliest_end = earliest_end.min(*until);
            }
            live
        });
        if self.until_ms.len() < self.max_entries {
            return true;
        }
        self.full_until_ms.store(earliest_end, Ordering::Release);
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn sold_out_cache(ttl_ms: u64) -> (SoldOutCache, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(1_000));
        let clock = Arc::clone(&now);
        let cache = SoldOutCache::with_clock(ttl_ms, move || clock.load(Ordering::SeqCst));
        (cache, now)
    }

    #[test]
    fn sold_out_lasts_for_the_ttl() {
        let (cache, now) = sold_out_cache(1000);
        assert!(!cache.is_sold_out("sku-a"));
        cache.mark("sku-a");
        assert!(cache.is_sold_out("sku-a"));
        assert!(!cache.is_sold_out("sku-b"));
        now.fetch_add(999, Ordering::SeqCst);
        assert!(cache.is_sold_out("sku-a"));
        now.fetch_add(1, Ordering::SeqCst);
        assert!(!cache.is_sold_out("sku-a"));
        assert!(cache.is_empty(), "an expired entry is dropped when read");
    }

    #[test]
    fn marking_again_extends_and_invalidate_forgets_at_once() {
        let (cache, now) = sold_out_cache(1000);
        cache.mark("sku-a");
        now.fetch_add(800, Ordering::SeqCst);
        cache.mark("sku-a");
        now.fetch_add(800, Ordering::SeqCst);
        assert!(cache.is_sold_out("sku-a"));
        cache.invalidate("sku-a");
        assert!(!cache.is_sold_out("sku-a"));
        cache.invalidate("never-marked");
    }

    #[test]
    fn a_zero_ttl_caches_nothing() {
        let (cache, _) = sold_out_cache(0);
        cache.mark("sku-a");
        assert!(!cache.is_sold_out("sku-a"));
        assert!(cache.is_empty());
    }

    #[test]
    fn sold_out_sweep_drops_only_expired_skus() {
        let (cache, now) = sold_out_cache(1000);
        cache.mark("old");
        now.fetch_add(600, Ordering::SeqCst);
        cache.mark("new");
        now.fetch_add(600, Ordering::SeqCst);
        assert_eq!(cache.sweep(), 1);
        assert_eq!(cache.len(), 1);
        assert!(cache.is_sold_out("new"));
    }

    #[test]
    fn sold_out_cache_is_bounded() {
        let (cache, now) = sold_out_cache(1000);
        for i in 0..SOLD_OUT_MAX_SKUS {
            cache.mark(&format!("sku-{i}"));
        }
        cache.mark("one-too-many");
        assert!(!cache.is_sold_out("one-too-many"));
        assert_eq!(cache.len(), SOLD_OUT_MAX_SKUS);
        // Once the old marks expire, they make room.
        now.fetch_add(1000, Ordering::SeqCst);
        cache.mark("one-too-many");
        assert!(cache.is_sold_out("one-too-many"));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn the_monotonic_clock_serves_real_use() {
        let cache = SoldOutCache::new(60_000);
        cache.mark("sku-a");
        assert!(cache.is_sold_out("sku-a"));
        assert!(format!("{cache:?}").contains("ttl_ms: 60000"));
    }

    #[test]
    fn a_lockout_holds_until_it_ends() {
        let cache = LockoutCache::new(10);
        assert!(cache.lock("ip:203.0.113.9", 5_000, 1_000));
        assert_eq!(cache.locked_until("ip:203.0.113.9", 1_000), Some(5_000));
        assert_eq!(cache.locked_until("ip:203.0.113.9", 4_999), Some(5_000));
        assert_eq!(cache.locked_until("redeemer:203.0.113.9", 1_000), None);
        assert_eq!(cache.locked_until("ip:203.0.113.9", 5_000), None);
        assert!(cache.is_empty(), "an ended lockout is dropped when read");
    }

    #[test]
    fn a_longer_lockout_wins_and_a_past_one_is_not_cached() {
        let cache = LockoutCache::new(10);
        assert!(cache.lock("redeemer:user-42", 60_000, 0));
        assert!(cache.lock("redeemer:user-42", 120_000, 1));
        assert!(cache.lock("redeemer:user-42", 90_000, 2));
        assert_eq!(cache.locked_until("redeemer:user-42", 3), Some(120_000));
        assert!(!cache.lock("redeemer:user-7", 10, 10));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn lockout_sweep_drops_ended_lockouts() {
        let cache = LockoutCache::new(10);
        cache.lock("a", 100, 0);
        cache.lock("b", 200, 0);
        cache.lock("c", 300, 0);
        assert_eq!(cache.sweep(200), 2);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.locked_until("c", 200), Some(300));
    }

    #[test]
    fn a_full_cache_evicts_ended_lockouts_then_refuses() {
        let cache = LockoutCache::new(3);
        assert_eq!(cache.max_entries(), 3);
        assert!(cache.lock("a", 100, 0));
        assert!(cache.lock("b", 500, 0));
        assert!(cache.lock("c", 400, 0));
        // Full of live lockouts: refused, and known full until the earliest ends (100).
        assert!(!cache.lock("d", 1_000, 50));
        assert!(!cache.lock("e", 1_000, 99));
        assert_eq!(cache.locked_until("d", 60), None);
        // Extending a cached subject needs no room.
        assert!(cache.lock("b", 900, 60));
        // Once "a" has ended it is evicted to make room.
        assert!(cache.lock("d", 1_000, 100));
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.locked_until("d", 100), Some(1_000));
        assert_eq!(cache.locked_until("b", 100), Some(900));
        // Full again until "c" ends at 400.
        assert!(!cache.lock("e", 1_000, 399));
        assert!(cache.lock("e", 1_000, 400));
        assert_eq!(cache.locked_until("e", 400), Some(1_000));
    }

    #[test]
    fn lockout_cache_holds_no_subject_text() {
        let cache = LockoutCache::new(10);
        cache.lock("redeemer:very-secret-user@example.com", 100, 0);
        let shown = format!("{cache:?}");
        assert!(!shown.contains("very-secret-user"), "{shown}");
    }
}
