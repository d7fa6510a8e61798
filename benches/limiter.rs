//! The edge limiter path every request takes before it reaches the engine: token buckets,
//! client address resolution, the in-flight cap and the sold-out cache.
//!
//! The Prometheus recorder is installed first, as in the gateway, so the figures include
//! recording each decision. Short measurement windows keep the whole run under a minute:
//!
//! ```text
//! cargo bench --bench limiter
//! ```

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use governor::clock::DefaultClock;
use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

use kamigate::channel::{BreakerRule, Channels, Defaults};
use kamigate::limit::{
    client_ip, BucketRule, ClientKey, ForwardedHeader, GlobalBucket, InFlight, KeyedBuckets,
    LimitsConfig, SoldOutCache,
};

const ROTATING_KEYS: u32 = 100_000;

/// A rule no benchmark loop can exhaust, so every check takes the allow path.
const UNLIMITED: BucketRule = BucketRule::enforced(1_000_000_000, 1_000_000_000);

fn client(i: u32) -> ClientKey {
    ClientKey::from(IpAddr::V4(Ipv4Addr::from(0x0B00_0000 + i)))
}

fn buckets(c: &mut Criterion) {
    let mut group = c.benchmark_group("bucket");

    let hot = KeyedBuckets::new("public", UNLIMITED, DefaultClock::default());
    let key = client(1);
    group.bench_function("check_hot_key_allow", |b| {
        b.iter(|| hot.check(black_box(&key)))
    });

    let drained = KeyedBuckets::new(
        "public",
        LimitsConfig::default().public,
        DefaultClock::default(),
    );
    while drained.check(&key).is_allowed() {}
    group.bench_function("check_hot_key_deny", |b| {
        b.iter(|| drained.check(black_box(&key)))
    });

    let rotating = KeyedBuckets::new("public", UNLIMITED, DefaultClock::default());
    let keys: Vec<ClientKey> = (0..ROTATING_KEYS).map(client).collect();
    for key in &keys {
        rotating.check(key);
    }
    let mut next = keys.iter().cycle();
    group.bench_function("check_100k_rotating_keys", |b| {
        b.iter(|| {
            let key = next.next().expect("cycle over a non-empty list never ends");
            rotating.check(black_box(key))
        })
    });

    // A merchant request: its token is authenticated to a channel (a SHA-256 digest and a
    // map lookup), which admits it through its breaker and takes from its bucket.
    let token = "3f1c0b7a9e5d4c2b1a0f9e8d7c6b5a493f1c0b7a9e5d4c2b1a0f9e8d7c6b5a49";
    let channels = Channels::new(
        token,
        Defaults {
            bucket: UNLIMITED,
            breaker: BreakerRule::default(),
        },
    );
    group.bench_function("authenticate_and_admit_channel", |b| {
        b.iter(|| {
            let channel = channels
                .authenticate(black_box(token.as_bytes()))
                .expect("the merchant token is the default channel's");
            channel.admit(black_box(1_000))
        })
    });

    let global = GlobalBucket::new("global", UNLIMITED, DefaultClock::default());
    group.bench_function("check_global", |b| b.iter(|| global.check()));
    group.finish();
}

fn client_address(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_ip");
    let trusted: Vec<IpNet> = vec![
        "10.0.0.0/8".parse().expect("literal network"),
        "2001:db8:ffff::/48".parse().expect("literal network"),
    ];
    let none = HeaderMap::new();
    let direct = SocketAddr::from(([203, 0, 113, 7], 50_000));
    group.bench_function("untrusted_peer", |b| {
        b.iter(|| {
            client_ip(
                black_box(direct),
                black_box(&none),
                &trusted,
                ForwardedHeader::XForwardedFor,
            )
        })
    });

    let proxy = SocketAddr::from(([10, 0, 0, 2], 50_000));
    let mut xff = HeaderMap::new();
    xff.insert(
        "x-forwarded-for",
        HeaderValue::from_static("198.51.100.4, 203.0.113.7, 10.0.0.1"),
    );
    group.bench_function("x_forwarded_for_two_proxies", |b| {
        b.iter(|| {
            client_ip(
                black_box(proxy),
                black_box(&xff),
                &trusted,
                ForwardedHeader::XForwardedFor,
            )
        })
    });

    let mut forwarded = HeaderMap::new();
    forwarded.insert(
        "forwarded",
        HeaderValue::from_static(r#"for="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.1"#),
    );
    group.bench_function("forwarded_two_proxies", |b| {
        b.iter(|| {
            client_ip(
                black_box(proxy),
                black_box(&forwarded),
                &trusted,
                ForwardedHeader::Forwarded,
            )
        })
    });
    group.finish();
}

fn shedding(c: &mut Criterion) {
    let in_flight = InFlight::new(LimitsConfig::default().max_in_flight);
    c.bench_function("in_flight/try_enter_and_drop", |b| {
        b.iter(|| drop(black_box(in_flight.try_enter())))
    });
}

fn sold_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("sold_out");
    let cache = SoldOutCache::new(60_000);
    cache.mark("flash-sale-sku");
    group.bench_function("is_sold_out_hit", |b| {
        b.iter(|| cache.is_sold_out(black_box("flash-sale-sku")))
    });
    group.bench_function("is_sold_out_miss", |b| {
        b.iter(|| cache.is_sold_out(black_box("in-stock-sku")))
    });
    group.finish();
}

fn config() -> Criterion {
    kamigate::metrics::handle();
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = limiter;
    config = config();
    targets = buckets, client_address, shedding, sold_out
}
criterion_main!(limiter);
