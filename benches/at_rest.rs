//! The crypto a claim and a redemption pay for codes at rest, alone: opening one sealed
//! code (what a claim does per code it hands out: base64, the associated data, the cipher),
//! the keyed digest of one code (what a redemption does per candidate spelling; without
//! `sku` once more for the global index), and beside them the unkeyed digest that
//! redemptions used before, and the seal an import pays per code.
//!
//! `cargo bench --bench at_rest`. BENCHMARKS.md sets these beside the instructions of a
//! whole claim and redemption.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use kamigate::secrets::Keyring;

/// A code as `gen` makes them for a crockford32 SKU, in canonical form.
const CODE: &str = "41ZF3P0VE85RQR3Z";
const SKU: &str = "gift-50";
/// A local id of a SKU some way into its stock.
const LOCAL: &str = "123456";

fn keyring() -> Keyring {
    Keyring::new(&[("d1", [7; 32])], ("i1", [9; 32])).expect("valid keys")
}

fn per_request(c: &mut Criterion) {
    let keyring = keyring();
    let sealed = keyring.seal(SKU, LOCAL, CODE);
    let mut group = c.benchmark_group("at_rest");
    group.bench_function("claim_open_one_code", |b| {
        b.iter(|| {
            keyring
                .open(black_box(SKU), black_box(LOCAL), black_box(&sealed))
                .expect("opens")
        })
    });
    group.bench_function("redeem_keyed_digest", |b| {
        b.iter(|| keyring.digest(black_box(CODE)))
    });
    group.bench_function("redeem_unkeyed_digest_before", |b| {
        b.iter(|| kamigate::code::digest(black_box(CODE)))
    });
    group.bench_function("import_seal_one_code", |b| {
        b.iter(|| keyring.seal(black_box(SKU), black_box(LOCAL), black_box(CODE)))
    });
    group.finish();
}

criterion_group!(benches, per_request);
criterion_main!(benches);
