//! Reconcile, key by key, on both engines: keys the engine lost are loaded again, keys where
//! the ledger is ahead are set to the ledger's state, and a change only the engine has is
//! never rolled back.

mod support;

use kamigate::engine::Script;
use kamigate::inventory::reconcile::reconcile_sku;
use kamigate::inventory::sku_keys;
use kamigate::ledger::LedgerEvent;
use reqwest::StatusCode;
use serde_json::json;
use support::gateway::{config, TestGateway};
use support::redis_server::RedisServer;

async fn gateway(redis: Option<&RedisServer>) -> TestGateway {
    let mut cfg = config();
    cfg.redis_url = redis.map(RedisServer::url);
    // The scenario has the engine ahead of the ledger: answers must not wait for it.
    cfg.durability = Some(kamigate::config::Durability::Engine);
    TestGateway::start(cfg).await
}

/// Deletes key `id` of `sku` from the engine behind kamigate's back.
async fn lose_key(gw: &TestGateway, sku: &str, id: &str) {
    let probe: &'static Script = Box::leak(Box::new(Script::new(
        "probe_lose",
        "redis.call('HDEL', K.keys, ARGV[1]) redis.call('LREM', K.avail, 0, ARGV[1]) \
         redis.call('HINCRBY', K.counts, 'available', -1) return 1",
    )));
    gw.inventory()
        .engine()
        .eval(probe, sku_keys(sku), vec![id.to_owned()])
        .await
        .expect("probe runs");
}

async fn scenario(gw: TestGateway) {
    gw.stock("rec", &["REC-1", "REC-2", "REC-3", "REC-4"]).await;
    let ledger = gw.gateway.app.ledger.clone();
    let inv = gw.inventory();

    let clean = reconcile_sku(ledger.as_ref(), inv, "rec", false, 0)
        .await
        .expect("reconcile");
    assert_eq!((clean.checked, clean.differences.len()), (4, 0));

    // The engine lost key 1; the ledger recorded a sale of key 4 the engine lacks; the
    // engine sold key 2 (first in line) and the ledger has not heard yet.
    lose_key(&gw, "rec", "1").await;
    let sale = LedgerEvent {
        event_id: "rec/test-1".into(),
        sku: "rec".into(),
        kind: "claim".into(),
        at_ms: 1,
        key_local_ids: vec![4],
        order_id: Some("o-lost".into()),
        user_id: None,
        redeemer: None,
        reason: None,
        late: false,
        fields_json: "{}".into(),
    };
    ledger.apply_events(&[sale]).await.expect("applied");
    let (status, _) = gw.claim("rec", json!({"order_id": "o-new"})).await;
    assert_eq!(status, StatusCode::OK);
    let claimed = gw.inventory().order("rec", "o-new").await.expect("order");
    let engine_only = claimed.keys[0].key_id.clone();

    let report = reconcile_sku(ledger.as_ref(), inv, "rec", false, 0)
        .await
        .expect("reconcile");
    assert_eq!(report.missing_in_engine, 1, "{report:?}");
    assert_eq!(
        (report.engine_ahead, report.ledger_ahead),
        (1, 1),
        "{report:?}"
    );
    assert!(report.differences.iter().all(|d| d.action != "repaired"));

    // While events are in flight, keys the engine has are left alone.
    let deferred = reconcile_sku(ledger.as_ref(), inv, "rec", true, 5)
        .await
        .expect("reconcile");
    assert_eq!(deferred.deferred, 2, "{deferred:?}");
    assert_eq!(deferred.repaired, 1, "only the missing key was loaded");

    let repaired = reconcile_sku(ledger.as_ref(), inv, "rec", true, 0)
        .await
        .expect("reconcile");
    assert!(repaired
        .differences
        .iter()
        .any(|d| d.key_id == engine_only && d.action == "kept"));
    assert_eq!(
        repaired.repaired, 1,
        "the key the ledger was ahead on: {repaired:?}"
    );
    let after = reconcile_sku(ledger.as_ref(), inv, "rec", false, 0)
        .await
        .expect("reconcile");
    assert_eq!(after.missing_in_engine + after.ledger_ahead, 0, "{after:?}");
    let counts = gw.counts("rec").await;
    assert_eq!(
        (counts["available"].as_u64(), counts["claimed"].as_u64()),
        (Some(2), Some(2)),
        "key 1 back on sale, keys 2 and 4 sold: {counts}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn reconcile_on_the_embedded_engine() {
    scenario(gateway(None).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_on_redis() {
    let redis = RedisServer::start().await;
    scenario(gateway(Some(&redis)).await).await;
}
