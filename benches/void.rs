//! What taking a code out of circulation costs as the line of available codes grows: a void
//! and a restore of the key at the end of the line, with 10 and with 1,000,000 available
//! codes, on both engines. Voiding leaves the key's entry in the line for a claim to drop,
//! so both sizes should cost the same (a scan of the line would make the second one cost
//! thousands of times more, and block every other script of the SKU meanwhile).
//!
//! ```text
//! cargo bench --bench void
//! ```
//!
//! Setting up a million codes takes a while (they go through the import path); the Redis
//! runs start their own `redis-server` in a temporary directory.

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tokio::runtime::Runtime;

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::engine::redis::{RedisEngine, RedisOptions};
use kamigate::engine::ScriptEngine;
use kamigate::inventory::{Inventory, NewCode};
use kamigate::sku::SkuConfig;
use redis_server::RedisServer;

/// The line lengths measured. `cargo test` runs each benchmark once, unoptimised, as a
/// smoke test: a thousand codes show the same path there without minutes of set-up.
fn sizes() -> [usize; 2] {
    if std::env::args().any(|a| a == "--bench") {
        [10, 1_000_000]
    } else {
        [10, 1_000]
    }
}

/// An inventory over a SKU `big` with `n` available codes; returns the last key's id.
async fn stocked(engine: Arc<dyn ScriptEngine>, n: usize) -> (Inventory, String) {
    let inv = Inventory::new(engine);
    let index = inv.watch_index().await.expect("index read");
    inv.mark_index_ready(&index).await.expect("index marked");
    inv.put_sku("big", &SkuConfig::default())
        .await
        .expect("SKU created");
    let mut next = 0;
    while next < n {
        let chunk: Vec<NewCode> = (next..(next + 500).min(n))
            .map(|i| NewCode {
                canonical: format!("BIGCODE{i:08}"),
                expires_at_ms: None,
            })
            .collect();
        next += chunk.len();
        inv.add_codes("big", &chunk).await.expect("codes added");
    }
    let counts = inv.counts("big").await.expect("counts");
    assert_eq!(counts.available, n as u64);
    (inv, format!("big.{n}"))
}

fn void_and_restore(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("void_and_restore_last_key");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));

    for n in sizes() {
        let engine: Arc<dyn ScriptEngine> =
            Arc::new(EmbeddedEngine::start().expect("embedded engine starts"));
        let (inv, key) = rt.block_on(stocked(engine, n));
        group.bench_with_input(BenchmarkId::new("embedded", n), &key, |b, key| {
            b.to_async(&rt).iter(|| async {
                inv.void(key, "bench").await.expect("void");
                inv.restore(key, "bench").await.expect("restore");
            })
        });
    }

    for n in sizes() {
        let redis = rt.block_on(RedisServer::start());
        let engine = rt
            .block_on(RedisEngine::connect(&redis.url(), RedisOptions::default()))
            .expect("connects to its redis-server");
        let (inv, key) = rt.block_on(stocked(Arc::new(engine), n));
        group.bench_with_input(BenchmarkId::new("redis", n), &key, |b, key| {
            b.to_async(&rt).iter(|| async {
                inv.void(key, "bench").await.expect("void");
                inv.restore(key, "bench").await.expect("restore");
            })
        });
        drop(inv);
        drop(redis);
    }
    group.finish();
}

criterion_group!(benches, void_and_restore);
criterion_main!(benches);
