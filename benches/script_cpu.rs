//! Redis CPU per claim, by how the script is called: the shipped `claim.lua` as a function
//! of the library (`FCALL`, the prelude ran once at load), the very same file in its EVAL
//! form (`EVALSHA`, the prelude runs on every call), and the baseline's bare four-command
//! script (benches/baseline). Also `claims_batch.lua` with 16 orders a call, both forms, and
//! `exists.lua` (one HEXISTS after the prelude) in both forms and bare, which isolates what
//! running the prelude costs a call.
//!
//! ```text
//! cargo bench --bench script_cpu
//! ```
//!
//! One `redis-server` of its own, one call in flight at a time. Redis's own accounting
//! (`INFO commandstats`, the `usec` of the command) is read after each phase of 200 claims;
//! the phases take turns, so load from elsewhere on a shared machine falls on each form
//! alike. Printed: microseconds of Redis time per claim and the ratios between the forms.

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::sync::Arc;

use fred::prelude::{LuaInterface, SetsInterface, Value};

use kamigate::engine::keys::sku_keys;
use kamigate::engine::redis::{RedisEngine, RedisOptions};
use kamigate::engine::{Reply, Script, ScriptEngine, SCRIPTS};
use kamigate::inventory::{Inventory, NewCode};
use kamigate::sku::SkuConfig;
use redis_server::RedisServer;

/// The baseline's claim (benches/baseline/main.rs), a bare script of four commands.
const BASELINE_CLAIM: &str = r#"
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return existing end
local code = redis.call('SPOP', KEYS[2])
if not code then return false end
redis.call('HSET', KEYS[1], ARGV[1], code)
redis.call('XADD', KEYS[3], '*', 't', 'claim', 'order', ARGV[1], 'code', code)
return code
"#;

const BATCH: usize = 16;

/// Rounds and claims per phase: `cargo test` runs one short round as a smoke test.
fn sizes() -> (usize, usize) {
    if std::env::args().any(|a| a == "--bench") {
        (10, 200)
    } else {
        (1, 32)
    }
}

/// Total `usec` and `calls` of `command` in `INFO commandstats`.
async fn spent(server: &RedisServer, command: &str) -> (u64, u64) {
    let info = server.redis_cli(&["INFO", "commandstats"]).await;
    let info = info.as_str().expect("INFO text").to_owned();
    let prefix = format!("cmdstat_{command}:");
    let Some(line) = info.lines().find_map(|l| l.strip_prefix(&prefix)) else {
        return (0, 0);
    };
    let field = |name: &str| -> u64 {
        line.split(',')
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .expect("a commandstats field")
    };
    (field("usec="), field("calls="))
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

#[derive(Clone, Copy, PartialEq)]
enum Form {
    Baseline,
    Eval,
    Function,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (rounds, per_phase) = sizes();
    let claims = rounds * per_phase + BATCH;
    let server = RedisServer::start().await;
    let engine = Arc::new(
        RedisEngine::connect(&server.url(), RedisOptions::default())
            .await
            .expect("connect"),
    );
    let inv = Inventory::new(engine.clone());
    let index = inv.watch_index().await.expect("index read");
    inv.mark_index_ready(&index).await.expect("index marked");
    for sku in ["fcall", "eval", "fcallbatch", "evalbatch"] {
        stock(&inv, sku, claims).await;
    }
    let client = engine.client().clone();
    let codes: Vec<String> = (0..claims).map(|i| format!("B{i:08}")).collect();
    let _: () = client.sadd("{b}:avail", codes).await.expect("SADD");
    let baseline_sha: String = client.script_load(BASELINE_CLAIM).await.expect("load");

    // The EVAL form of the very same files, as the embedded engine runs them.
    let claim_eval: &'static Script = Box::leak(Box::new(Script::new(
        "claim",
        include_str!("../lua/claim.lua"),
    )));
    let exists_eval: &'static Script = Box::leak(Box::new(Script::new(
        "exists",
        include_str!("../lua/exists.lua"),
    )));
    let exists_bare: String = client
        .script_load("return redis.call('HEXISTS', KEYS[1], ARGV[1])")
        .await
        .expect("load");
    engine
        .eval(exists_eval, vec!["{e}:h".into()], vec!["f".into()])
        .await
        .expect("exists");
    let batch_eval: &'static Script = Box::leak(Box::new(Script::new(
        "claims_batch",
        include_str!("../lua/claims_batch.lua"),
    )));

    let next_order = std::cell::Cell::new(0u64);
    let next = || {
        next_order.set(next_order.get() + 1);
        next_order.get()
    };
    let claim = |form: Form, sku: &'static str| {
        let order = next();
        let now = (1_800_000_000_000 + order).to_string();
        let id = format!("o{order}");
        let engine = engine.clone();
        let client = client.clone();
        let sha = baseline_sha.clone();
        async move {
            if form == Form::Baseline {
                let keys = vec!["{b}:orders", "{b}:avail", "{b}:events"];
                let code: Value = client.evalsha(sha, keys, vec![id]).await.expect("claim");
                assert!(!code.is_null(), "baseline stock ran out");
                return;
            }
            let script = if form == Form::Eval {
                claim_eval
            } else {
                &SCRIPTS.claim
            };
            // The default channel, which may draw on the shared remainder (no pools here).
            let args = vec![
                id,
                "1".into(),
                String::new(),
                "0".into(),
                now,
                "default".into(),
                "1".into(),
            ];
            let reply = engine
                .eval(script, sku_keys(sku), args)
                .await
                .expect("claim");
            assert_eq!(
                reply.as_array().and_then(|r| r.first()),
                Some(&Reply::from("new"))
            );
        }
    };
    // Caches the EVAL forms, so the phases below see no NOSCRIPT, and loads the library.
    claim(Form::Eval, "eval").await;
    claim(Form::Function, "fcall").await;

    let phases = [
        (Form::Baseline, "baseline", "evalsha", ""),
        (Form::Eval, "claim, EVAL form", "evalsha", "eval"),
        (Form::Function, "claim, function", "fcall", "fcall"),
    ];
    let mut totals = [(0u64, 0u64); 8];
    for _ in 0..rounds {
        for (i, (form, _, command, sku)) in phases.iter().enumerate() {
            server.redis_cli(&["CONFIG", "RESETSTAT"]).await;
            for _ in 0..per_phase {
                claim(*form, sku).await;
            }
            let (usec, calls) = spent(&server, command).await;
            assert_eq!(calls, per_phase as u64, "{command}: one call per claim");
            totals[i].0 += usec;
            totals[i].1 += calls;
        }
        // Batches of 16 orders, each form.
        for (i, script, sku, command) in [
            (3, batch_eval, "evalbatch", "evalsha"),
            (4, &SCRIPTS.claims_batch, "fcallbatch", "fcall"),
        ] {
            server.redis_cli(&["CONFIG", "RESETSTAT"]).await;
            let calls = (per_phase / BATCH).max(1);
            for _ in 0..calls {
                let mut args = vec![(1_800_000_000_000 + next_order.get()).to_string()];
                for _ in 0..BATCH {
                    let order = next();
                    args.extend([
                        format!("o{order}"),
                        "1".into(),
                        String::new(),
                        "0".into(),
                        "default".into(),
                        "1".into(),
                    ]);
                }
                engine
                    .eval(script, sku_keys(sku), args)
                    .await
                    .expect("batch");
            }
            let (usec, _) = spent(&server, command).await;
            totals[i].0 += usec;
            totals[i].1 += (calls * BATCH) as u64;
        }
        // The prelude alone: one HEXISTS, bare, in the EVAL form and as a function.
        for (i, command) in [(5, "evalsha"), (6, "evalsha"), (7, "fcall")] {
            server.redis_cli(&["CONFIG", "RESETSTAT"]).await;
            for _ in 0..per_phase {
                let keys = vec!["{e}:h".to_owned()];
                let args = vec!["f".to_owned()];
                if i == 5 {
                    let _: Value = client
                        .evalsha(exists_bare.clone(), keys, args)
                        .await
                        .expect("exists");
                } else {
                    let script = if i == 6 { exists_eval } else { &SCRIPTS.exists };
                    engine.eval(script, keys, args).await.expect("exists");
                }
            }
            let (usec, calls) = spent(&server, command).await;
            totals[i].0 += usec;
            totals[i].1 += calls;
        }
    }

    let per_claim = |i: usize| totals[i].0 as f64 / totals[i].1 as f64;
    println!("Redis CPU per claim (INFO commandstats usec / claims):");
    for (i, (_, label, _, _)) in phases.iter().enumerate() {
        println!(
            "  {label:<28} {:>7.2} µs  ({} claims)",
            per_claim(i),
            totals[i].1
        );
    }
    println!(
        "  {:<28} {:>7.2} µs  ({} claims)",
        "claims_batch x16, EVAL form",
        per_claim(3),
        totals[3].1
    );
    println!(
        "  {:<28} {:>7.2} µs  ({} claims)",
        "claims_batch x16, function",
        per_claim(4),
        totals[4].1
    );
    for (i, label) in [
        (5, "exists, bare"),
        (6, "exists, EVAL form"),
        (7, "exists, function"),
    ] {
        println!(
            "  {label:<28} {:>7.2} µs  ({} calls)",
            per_claim(i),
            totals[i].1
        );
    }
    println!("Ratios:");
    println!(
        "  function / EVAL form (claim)   {:.2}",
        per_claim(2) / per_claim(1)
    );
    println!(
        "  function / EVAL form (x16)     {:.2}",
        per_claim(4) / per_claim(3)
    );
    println!(
        "  EVAL form / baseline           {:.2}",
        per_claim(1) / per_claim(0)
    );
    println!(
        "  function / baseline            {:.2}",
        per_claim(2) / per_claim(0)
    );
    println!(
        "  x16 function / baseline        {:.2}",
        per_claim(4) / per_claim(0)
    );
    engine.quit().await;
}
