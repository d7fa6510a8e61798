//! Rotating the data key under load: while clients claim and redeem, a new data key is
//! added and a rekey pass seals every stored code under it. No claim or redemption fails,
//! afterwards nothing under the old key is left in the ledger or the engine, and every code
//! is still claimed and redeemed.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::engine::keys::sku_keys;
use kamigate::engine::Script;
use kamigate::inventory::Inventory;
use kamigate::secrets::keyfile::{add_data_key, resolve, KeyOrigin, KEY_FILE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::eventually::eventually;
use support::gateway::{config, TestGateway};
use support::redis_server::RedisServer;

const CODES: usize = 300;

/// A test configuration whose public bucket lets the load through: this test is about
/// rotation, not rate limits.
fn unlimited() -> kamigate::config::Config {
    let mut cfg = config();
    cfg.limits.public = kamigate::limit::BucketRule::enforced(100_000, 100_000);
    cfg.data_key = None;
    cfg
}

fn codes() -> Vec<String> {
    (0..CODES)
        .map(|i| format!("ROT{:09}", 40_000_117 + i * 13))
        .collect()
}

/// Every stored code of the engine's SKU `rot`, by key id 1..=CODES.
static CODES_OF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "probe_all_codes",
        "local ids = {}\nfor i = 1, tonumber(ARGV[1]) do ids[i] = tostring(i) end\n\
         return redis.call('HMGET', K.codes, unpack(ids))",
    )
});

/// Claims and redeems on `workers` tasks until `stop` is set; returns the codes each claim
/// revealed and how many redemptions succeeded. Every answer must be a success or, once
/// the stock ran out, `ERR_SOLD_OUT`.
async fn load(gate: Arc<TestGateway>, stop: Arc<AtomicBool>) -> (Vec<String>, usize) {
    let revealed = Arc::new(Mutex::new(Vec::new()));
    let redeemed = Arc::new(Mutex::new(0usize));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (gate, stop) = (gate.clone(), stop.clone());
        let (revealed, redeemed) = (revealed.clone(), redeemed.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let order = format!("w{w}-{i}");
                let (status, body) = gate
                    .claim("rot", json!({"order_id": order, "quantity": 1}))
                    .await;
                if status == StatusCode::CONFLICT && body["error"]["code"] == "ERR_SOLD_OUT" {
                    break;
                }
                assert_eq!(status, StatusCode::OK, "claim during the rekey: {body}");
                let code = body["keys"][0]["code"]
                    .as_str()
                    .expect("revealed")
                    .to_owned();
                // Every other code is redeemed at once; the rest after the rotation.
                if i % 2 == 0 {
                    let (status, body) = gate
                        .redeem(json!({"code": code, "redeemer": format!("u-{w}")}))
                        .await;
                    assert_eq!(
                        status,
                        StatusCode::OK,
                        "redemption during the rekey: {body}"
                    );
                    *redeemed.lock().expect("lock") += 1;
                }
                revealed.lock().expect("lock").push((code, i % 2 == 0));
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    let all = revealed.lock().expect("lock").clone();
    let n = *redeemed.lock().expect("lock");
    // The codes not redeemed yet.
    (
        all.into_iter()
            .filter(|(_, done)| !done)
            .map(|(c, _)| c)
            .collect(),
        n,
    )
}

/// Rotates while `load` runs: `rotate` adds the new key and runs one pass, returning its
/// answer. Then checks what is left and that every code still sells and redeems.
async fn rotation_under_load<F, Fut>(gate: TestGateway, rotate: F)
where
    F: FnOnce(Arc<TestGateway>) -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    let all = codes();
    gate.stock("rot", &all.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let gate = Arc::new(gate);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load(gate.clone(), stop.clone()));
    // Some claims first, so the pass meets sold and redeemed codes too.
    eventually(
        Duration::from_secs(20),
        "claims to be under way",
        || gate.counts("rot"),
        |c| c["claimed"].as_u64().unwrap_or(0) + c["redeemed"].as_u64().unwrap_or(0) >= 20,
    )
    .await;
    let pass = rotate(gate.clone()).await;
    assert!(
        pass["report"]["resealed"].as_u64().unwrap_or(0) > 0,
        "{pass}"
    );
    assert_eq!(pass["report"]["failed"], 0, "{pass}");
    assert_eq!(pass["data_key"], "d2", "{pass}");
    stop.store(true, Ordering::SeqCst);
    let (unredeemed, _) = load.await.expect("load");

    // Nothing under the old key in the ledger: a second pass has nothing left to do.
    let again = rotate_again(&gate).await;
    assert_eq!(again["report"]["resealed"], 0, "{again}");
    let ledger = &gate.gateway.app.ledger;
    let stored = ledger
        .stored_codes_after("rot", 0, 10_000)
        .await
        .expect("ledger");
    assert_eq!(stored.len(), CODES);
    assert!(
        stored.iter().all(|s| s.code.starts_with("e1.d2.")),
        "ledger"
    );
    // Nor in the engine.
    let reply = gate
        .inventory()
        .engine()
        .eval(&CODES_OF, sku_keys("rot"), vec![CODES.to_string()])
        .await
        .expect("engine");
    let engine_codes = reply.as_array().expect("array");
    assert_eq!(engine_codes.len(), CODES);
    for c in engine_codes {
        assert!(
            c.as_str().is_some_and(|s| s.starts_with("e1.d2.")),
            "engine holds a code under another key"
        );
    }

    // Every code still sells and redeems.
    let mut rest = unredeemed;
    for i in 0.. {
        let (status, body) = gate
            .claim(
                "rot",
                json!({"order_id": format!("after-{i}"), "quantity": 1}),
            )
            .await;
        if status == StatusCode::CONFLICT {
            assert_eq!(body["error"]["code"], "ERR_SOLD_OUT", "{body}");
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        rest.push(body["keys"][0]["code"].as_str().expect("code").to_owned());
    }
    for code in &rest {
        let (status, body) = gate.redeem(json!({"code": code, "redeemer": "late"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let distinct: HashSet<&String> = rest.iter().collect();
    assert_eq!(distinct.len(), rest.len(), "no code twice");
    eventually(
        Duration::from_secs(10),
        "every code to be redeemed",
        || gate.counts("rot"),
        |c| c["redeemed"] == CODES,
    )
    .await;
    match Arc::try_unwrap(gate) {
        Ok(gate) => gate.stop().await,
        Err(_) => panic!("the load tasks ended"),
    }
}

/// A second pass through the admin API (reads the key file again first).
async fn rotate_again(gate: &TestGateway) -> Value {
    let (status, body) = gate.admin_post("/v1/rekey", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_embedded_engine_rotates_through_the_admin_api_under_load() {
    let gate = TestGateway::start(unlimited()).await;
    rotation_under_load(gate, |gate| async move {
        let dir = gate.data.as_ref().expect("own data dir").path().to_owned();
        add_data_key(&dir.join(KEY_FILE), "d2").expect("key added");
        rotate_again(&gate).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_rotates_through_the_command_under_load() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = unlimited();
    cfg.redis_url = Some(redis.url());
    cfg.data_dir = dir.path().to_owned();
    let gate = TestGateway::start(cfg.clone()).await;
    rotation_under_load(gate, |_gate| async move {
        // The command, as an operator runs it beside the gateway: the gateway learns the
        // new key when it meets the first code sealed under it.
        let done = kamigate::commands::rekey(&cfg, None, false, Some("d2"))
            .await
            .expect("rekey");
        json!({
            "data_key": done.data_key,
            "report": serde_json::to_value(done.report).expect("json"),
        })
    })
    .await;
}

/// Claims that meet a newer data key together must all open their codes: only the first
/// to read the key file again finds something new in it, and the others, holding the
/// keyring of before, must be handed the one it installed.
#[tokio::test]
async fn every_caller_that_met_a_new_data_key_gets_the_keyring_holding_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ring, source) = resolve(None, dir.path()).expect("a key file");
    let engine = EmbeddedEngine::start().expect("embedded engine starts");
    let inventory = Inventory::new(Arc::new(engine));
    inventory.use_keyring(Arc::new(ring));
    inventory.set_key_origin(KeyOrigin { source, env: None });
    let before = inventory.keyring();
    assert!(
        inventory.keyring_newer_than(&before).is_none(),
        "nothing new yet"
    );

    add_data_key(&dir.path().join(KEY_FILE), "d2").expect("key added");
    let first = inventory
        .keyring_newer_than(&before)
        .expect("the first reader");
    let second = inventory
        .keyring_newer_than(&before)
        .expect("a reader close behind");
    for ring in [&first, &second] {
        assert_eq!(ring.data_ids(), ["d2", "d1"]);
    }
    assert!(inventory.keyring_newer_than(&first).is_none());
}

/// A key text with index key `index` and data key `d1`, fixed bytes per id.
fn keys_with_index(index: &str, byte: &str) -> kamigate::secrets::keyfile::KeyText {
    kamigate::secrets::keyfile::KeyText(format!(
        "index {index} {}; data d1 {}",
        byte.repeat(32),
        "0d".repeat(32)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_index_key_finds_codes_again_after_a_reindex() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = unlimited();
    cfg.redis_url = Some(redis.url());
    cfg.data_dir = dir.path().to_owned();
    cfg.data_key = Some(keys_with_index("i1", "1a"));
    let gate = TestGateway::start(cfg.clone()).await;
    let all = codes();
    let some: Vec<&str> = all.iter().take(10).map(String::as_str).collect();
    gate.stock("rot", &some).await;
    let mut sold = Vec::new();
    for i in 0..4 {
        let (status, body) = gate
            .claim("rot", json!({"order_id": format!("o-{i}"), "quantity": 1}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        sold.push(body["keys"][0]["code"].as_str().expect("code").to_owned());
    }
    gate.stop().await;

    // The index key replaced: Redis still holds digests under the old one.
    cfg.data_key = Some(keys_with_index("i2", "2b"));
    let gate = TestGateway::start(cfg).await;
    let (status, body) = gate.redeem(json!({"code": sold[0], "redeemer": "u"})).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "not found before the re-index: {body}"
    );
    let (status, plain) = gate.admin_post("/v1/rekey", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{plain}");
    assert_eq!(plain["report"]["stale_digests"], 10, "{plain}");
    assert_eq!(plain["report"]["reindexed"], 0, "{plain}");
    let (status, pass) = gate.admin_post("/v1/rekey", json!({"index": true})).await;
    assert_eq!(status, StatusCode::OK, "{pass}");
    assert_eq!(pass["index_key"], "i2", "{pass}");
    assert_eq!(pass["report"]["reindexed"], 10, "{pass}");
    for code in &sold {
        let (status, body) = gate.redeem(json!({"code": code, "redeemer": "u"})).await;
        assert_eq!(status, StatusCode::OK, "found again: {body}");
    }
    // The SKU's own index too (a redemption naming the SKU).
    let (status, body) = gate
        .claim("rot", json!({"order_id": "after", "quantity": 1}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let code = body["keys"][0]["code"].as_str().expect("code");
    let (status, body) = gate
        .redeem(json!({"code": code, "redeemer": "u", "sku": "rot"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, again) = gate.admin_post("/v1/rekey", json!({"index": true})).await;
    assert_eq!(again["report"]["reindexed"], 0, "{again}");
    assert_eq!(again["report"]["stale_digests"], 0, "{again}");
    gate.stop().await;
}
