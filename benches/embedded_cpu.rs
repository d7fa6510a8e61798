//! CPU of the embedded engine's thread per call, by how the script runs: the shipped
//! `claim.lua` and `exists.lua` as functions of the library (the prelude ran once, at load:
//! what the engine runs), and the very same files in their EVAL form (the prelude runs on
//! every call: what tests' probes run).
//!
//! ```text
//! cargo bench --bench embedded_cpu
//! ```
//!
//! Calls are queued 64 at a time. The thread's own CPU time (`/proc/self/task/<tid>/schedstat`,
//! nanoseconds) is read after each phase; the phases take turns, so load from elsewhere on a
//! shared machine falls on each form alike. Printed: microseconds of engine-thread CPU per
//! call and the ratio of the forms.

use std::sync::Arc;

use futures_util::{stream, StreamExt};

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::engine::keys::sku_keys;
use kamigate::engine::{Reply, Script, ScriptEngine, SCRIPTS};
use kamigate::inventory::{Inventory, NewCode};
use kamigate::sku::SkuConfig;

// The binary's allocator (src/main.rs): the engine thread allocates for every command.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Calls queued for the engine thread at once.
const IN_FLIGHT: usize = 64;

/// Rounds and calls per phase: `cargo test` runs one short round as a smoke test.
fn sizes() -> (usize, usize) {
    if std::env::args().any(|a| a == "--bench") {
        (10, 2000)
    } else {
        (1, 32)
    }
}

/// CPU time the engine thread has used so far, in nanoseconds.
fn engine_cpu_ns() -> u64 {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    for task in tasks {
        let dir = task.expect("a task").path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.trim_end() == "kamigate-engine" {
            let stat = std::fs::read_to_string(dir.join("schedstat")).expect("schedstat");
            return stat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse().ok())
                .expect("time on CPU in schedstat");
        }
    }
    panic!("no kamigate-engine thread");
}

async fn stock(inv: &Inventory, sku: &str, n: usize) {
    inv.put_sku(sku, &SkuConfig::default())
        .await
        .expect("SKU created");
    let mut next = 0;
    while next < n {
        let chunk: Vec<NewCode> = (next..(next + 500).min(n))
            .map(|i| NewCode {
                canonical: format!("{}{i:08}", sku.to_uppercase()),
                expires_at_ms: None,
            })
            .collect();
        next += chunk.len();
        inv.add_codes(sku, &chunk).await.expect("codes added");
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (rounds, per_phase) = sizes();
    let claims = rounds * per_phase + 1;
    let engine = Arc::new(EmbeddedEngine::start().expect("engine starts"));
    let inv = Inventory::new(engine.clone());
    let index = inv.watch_index().await.expect("index read");
    inv.mark_index_ready(&index).await.expect("index marked");
    for sku in ["function", "eval"] {
        stock(&inv, sku, claims).await;
    }
    // The EVAL form of the very same files.
    let claim_eval: &'static Script = Box::leak(Box::new(Script::new(
        "claim",
        include_str!("../lua/claim.lua"),
    )));
    let exists_eval: &'static Script = Box::leak(Box::new(Script::new(
        "exists",
        include_str!("../lua/exists.lua"),
    )));

    // Each phase keeps IN_FLIGHT calls queued, as under load: the thread goes from one job to
    // the next and never spins idle waiting for one (which a lone caller would add to every
    // call's CPU).
    let mut order = 0u64;
    let mut claim_args = |n: usize| -> Vec<Vec<String>> {
        (0..n)
            .map(|_| {
                order += 1;
                // The default channel, which may draw on the shared remainder (no pools).
                vec![
                    format!("o{order}"),
                    "1".into(),
                    String::new(),
                    "0".into(),
                    (1_800_000_000_000 + order).to_string(),
                    "default".into(),
                    "1".into(),
                ]
            })
            .collect()
    };
    let run = async |script: &'static Script, sku: &str, calls: Vec<Vec<String>>| {
        let replies: Vec<Reply> = stream::iter(calls)
            .map(|args| {
                let (keys, args) = if sku.is_empty() {
                    (vec!["{e}:h".to_owned()], vec!["f".to_owned()])
                } else {
                    (sku_keys(sku), args)
                };
                engine.eval(script, keys, args)
            })
            .buffered(IN_FLIGHT)
            .map(|reply| reply.expect("eval"))
            .collect()
            .await;
        for reply in replies {
            if sku.is_empty() {
                assert_eq!(reply, Reply::Int(0));
            } else {
                assert_eq!(
                    reply.as_array().and_then(|r| r.first()),
                    Some(&Reply::from("new"))
                );
            }
        }
    };
    // Compiles the EVAL form before anything is measured.
    run(claim_eval, "eval", claim_args(1)).await;

    let phases: [(&str, &'static Script, &str); 4] = [
        ("claim, EVAL form", claim_eval, "eval"),
        ("claim, function", &SCRIPTS.claim, "function"),
        ("exists, EVAL form", exists_eval, ""),
        ("exists, function", &SCRIPTS.exists, ""),
    ];
    let mut totals = [0u64; 4];
    for _ in 0..rounds {
        for (i, (_, script, sku)) in phases.iter().enumerate() {
            let calls = if sku.is_empty() {
                vec![Vec::new(); per_phase]
            } else {
                claim_args(per_phase)
            };
            let before = engine_cpu_ns();
            run(script, sku, calls).await;
            totals[i] += engine_cpu_ns() - before;
        }
    }

    let calls = (rounds * per_phase) as f64;
    let per_call = |i: usize| totals[i] as f64 / calls / 1000.0;
    println!(
        "embedded engine thread CPU per call ({} calls per form):",
        calls
    );
    for (i, (label, _, _)) in phases.iter().enumerate() {
        println!("  {label:<20} {:>7.2} µs", per_call(i));
    }
    println!(
        "  function / EVAL form: claim {:.2}, exists {:.2}",
        per_call(1) / per_call(0),
        per_call(3) / per_call(2)
    );
}
