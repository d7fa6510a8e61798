//! Memory of the per-client token buckets under a flood of distinct clients.
//!
//! Its own test binary, with a single test, so no other test allocates while the resident
//! set size is measured. Linux only: RSS is read from `/proc/self/status` (`VmRSS`, in kB,
//! which needs no page-size assumption unlike `/proc/self/statm`).
//!
//! Measured (x86_64, glibc, debug and release alike; RSS ~3 MB before):
//!
//! - the first 1 000 000 `ClientKey` buckets add ~53 MB, ~53 bytes per key: a 24-byte entry
//!   plus a control byte in hashbrown tables between 7/16 and 7/8 full (1 M keys over 8
//!   shards are 125 000 per shard, just past a doubling to 262 144 buckets each);
//! - the sweep (`retain_recent` + `shrink_to_fit`) frees every table; glibc usually hands
//!   the memory back to the OS at once (RSS ~3 MB), sometimes keeps it for reuse;
//! - later floods of 1 M new keys peak at 56–72 MB (up to ~70 bytes per key): glibc, having
//!   raised its mmap threshold when the first tables were freed, serves the growing tables
//!   from the heap, where the smaller tables they replace leave gaps. The peak varies from
//!   round to round but does not climb.
//!
//! Every round must stay within 1.5× the worst ~67–70 bytes per key measured. Memory the
//! sweep failed to free would show up as a climbing peak: a second round on top of the
//! first would need ~120 bytes per key, a third ~160.

#![cfg(target_os = "linux")]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use kamigate::limit::{ClientKey, KeyedBuckets, LimitsConfig};

const KEYS: u32 = 1_000_000;
const ROUNDS: u32 = 3;
/// 1.5× the worst ~67–70 bytes per key measured for a round.
const MAX_BYTES_PER_KEY: u64 = 100;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs is mounted");
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS is reported in kB");
    kb * 1024
}

/// Distinct IPv4 clients: `round` million of them came before.
fn client(round: u32, i: u32) -> ClientKey {
    ClientKey::from(IpAddr::V4(Ipv4Addr::from(0x0B00_0000 + round * KEYS + i)))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

#[test]
fn floods_of_a_million_clients_stay_within_bounded_memory() {
    let clock = FakeRelativeClock::default();
    let rule = LimitsConfig::default().public;
    let buckets = KeyedBuckets::new("public", rule, clock.clone());
    let base = rss_bytes();
    let bound = MAX_BYTES_PER_KEY * u64::from(KEYS);

    for round in 0..ROUNDS {
        for i in 0..KEYS {
            assert!(buckets.check(&client(round, i)).is_allowed());
        }
        assert_eq!(buckets.len(), KEYS as usize);
        let full = rss_bytes();
        let growth = full.saturating_sub(base);

        // Every bucket has refilled: all keys are indistinguishable from new ones and go.
        clock.advance(rule.refill_time() + Duration::from_secs(1));
        assert_eq!(buckets.sweep(), KEYS as usize);
        assert_eq!(buckets.len(), 0);
        let swept = rss_bytes();
        eprintln!(
            "round {round}: RSS {:.1} MB -> {:.1} MB with {KEYS} keys ({} bytes/key), \
             {:.1} MB after the sweep",
            mb(base),
            mb(full),
            growth / u64::from(KEYS),
            mb(swept),
        );

        assert!(
            growth <= bound,
            "round {round}: {KEYS} keys grew RSS by {:.1} MB, over {MAX_BYTES_PER_KEY} \
             bytes/key",
            mb(growth)
        );
    }
}
