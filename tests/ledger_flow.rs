//! Engine changes reach the ledger, end to end through the gateway: drift settles to zero,
//! the audit trail shows every change, `durability = "ledger"` answers after the commit, and
//! an engine that lost its data is rebuilt without selling anything twice.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::BoxFuture;
use kamigate::config::{Config, Durability};
use kamigate::engine::keys::events_key;
use kamigate::engine::stream_id::StreamId;
use kamigate::engine::{EngineError, EngineKind, Reply, Script, ScriptEngine, SCRIPTS};
use kamigate::inventory::warm::{begin_restore, finish_restore};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::eventually::eventually;
use support::gateway::{audit_trail, config, TestGateway};
use support::redis_server::RedisServer;

/// Polls the SKU view until the ledger caught up with the engine.
async fn settled(gw: &TestGateway, sku: &str) -> Value {
    let path = format!("/v1/skus/{sku}");
    let view = eventually(
        Duration::from_secs(10),
        "the ledger to catch up with the engine",
        || async {
            let (status, view) = gw.merchant_get(&path).await;
            assert_eq!(status, StatusCode::OK, "{view}");
            view
        },
        |view| view["in_flight"] == 0 && view["engine"] == view["ledger"],
    )
    .await;
    assert_eq!(view["drift"], 0, "{view}");
    view
}

fn code_of(order: &Value) -> String {
    order["keys"][0]["code"].as_str().expect("code").to_owned()
}

async fn sell_and_redeem(gw: &TestGateway, sku: &str) -> Vec<String> {
    let mut codes = Vec::new();
    for i in 0..3 {
        let (status, order) = gw.claim(sku, json!({"order_id": format!("o-{i}")})).await;
        assert_eq!(status, StatusCode::OK, "{order}");
        codes.push(code_of(&order));
    }
    let (status, _) = gw
        .redeem(json!({"code": codes[0], "redeemer": "user-1"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    gw.claim(sku, json!({"order_id": "h-1", "hold_ms": 60000}))
        .await;
    gw.merchant_post(&format!("/v1/skus/{sku}/claims/h-1/release"), json!({}))
        .await;
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_the_ledger_and_the_audit_trail() {
    let gw = TestGateway::embedded().await;
    gw.stock("flow", &["F-1", "F-2", "F-3", "F-4", "F-5"]).await;
    sell_and_redeem(&gw, "flow").await;
    let view = settled(&gw, "flow").await;
    assert_eq!(view["ledger"]["claimed"], 2, "{view}");
    assert_eq!(view["ledger"]["redeemed"], 1, "{view}");
    assert_eq!(view["ledger"]["available"], 2, "{view}");

    let (trail, kinds) = audit_trail(&gw.client, &gw.admin, "flow.1").await;
    assert_eq!(kinds, ["claim", "redeem"], "{trail}");
    assert_eq!(trail["state"], "redeemed");
    assert!(
        !trail.to_string().contains("F1"),
        "the audit trail holds no code"
    );
    let (status, _) = gw.merchant_get("/v1/keys/flow.99/events").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_durability_answers_after_the_commit() {
    let mut cfg: Config = config();
    cfg.durability = Some(Durability::Ledger);
    let gw = TestGateway::start(cfg).await;
    gw.stock("durable", &["D-1", "D-2"]).await;
    let (status, order) = gw.claim("durable", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    // The answer came after the commit: the ledger already has the claim.
    let key = gw
        .gateway
        .app
        .ledger
        .get_key(order["keys"][0]["key_id"].as_str().expect("key id"))
        .await
        .expect("ledger answers")
        .expect("key");
    assert_eq!(key.state, "claimed");
    assert_eq!(key.order_id.as_deref(), Some("o-1"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_embedded_gateway_keeps_what_it_sold() {
    let data = tempfile::tempdir().expect("temp dir");
    let mut cfg = config();
    cfg.data_dir = data.path().to_owned();
    let gw = TestGateway::start(cfg.clone()).await;
    gw.stock("keep", &["K-1", "K-2", "K-3", "K-4", "K-5"]).await;
    let sold = sell_and_redeem(&gw, "keep").await;
    // A graceful stop commits every event before exiting.
    gw.stop().await;

    let gw = TestGateway::start(cfg).await;
    let view = settled(&gw, "keep").await;
    assert_eq!(view["engine"]["available"], 2, "{view}");
    let (status, used) = gw
        .redeem(json!({"code": sold[0], "redeemer": "user-2"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "still redeemed: {used}");
    let mut issued: HashSet<String> = sold.into_iter().collect();
    for i in 0..2 {
        let (status, order) = gw
            .claim("keep", json!({"order_id": format!("n-{i}")}))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert!(issued.insert(code_of(&order)), "a code was sold twice");
    }
    let (status, _) = gw.claim("keep", json!({"order_id": "n-9"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "sold out");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_is_rebuilt_from_the_ledger_without_selling_twice() {
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.durability = Some(Durability::Ledger);
    let gw = TestGateway::start(cfg).await;
    gw.stock("flush", &["X-1", "X-2", "X-3", "X-4", "X-5"])
        .await;
    let sold = sell_and_redeem(&gw, "flush").await;
    settled(&gw, "flush").await;

    redis.cmd(&["FLUSHALL"]).await.expect("flushed");
    eventually(
        Duration::from_secs(15),
        "the SKU to be rebuilt",
        || gw.merchant_get("/v1/skus/flush"),
        |(status, view)| *status == StatusCode::OK && view["engine"]["available"] == 2,
    )
    .await;
    let mut issued: HashSet<String> = sold.into_iter().collect();
    for i in 0..2 {
        let (status, order) = gw
            .claim("flush", json!({"order_id": format!("n-{i}")}))
            .await;
        assert_eq!(status, StatusCode::OK, "{order}");
        assert!(issued.insert(code_of(&order)), "a code was sold twice");
    }
    let (status, body) = gw.claim("flush", json!({"order_id": "n-9"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    gw.stop().await;
}

/// Codes imported while Redis has lost its data (before the SKU is rebuilt): the import is
/// in the ledger, so it is answered as done, not `404` for a SKU the merchant has; the
/// rebuild brings its codes, and activating a pending batch meanwhile is a retry, not `404`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_while_redis_lost_its_data_is_answered_and_goes_on_sale() {
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    let gw = TestGateway::start(cfg).await;
    gw.stock("lost", &["L-1", "L-2"]).await;
    let (status, pending) = gw
        .upload("lost", "batch_id=b-p&activate=false", "text/plain", "P-1\n")
        .await;
    assert_eq!(status, StatusCode::OK, "{pending}");

    redis.cmd(&["FLUSHALL"]).await.expect("flushed");
    let (status, report) = gw
        .upload("lost", "batch_id=b-new", "text/plain", "N-1\nN-2\nN-3\n")
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (&report["accepted"], &report["state"]),
        (&json!(3), &json!("active")),
        "{report}"
    );
    let (status, body) = gw
        .admin_post("/v1/skus/lost/batches/b-p/activate", json!({}))
        .await;
    assert!(
        status == StatusCode::OK || body["error"]["code"] == "ERR_UNAVAILABLE",
        "{status} {body}"
    );
    let activated = eventually(
        Duration::from_secs(15),
        "the pending batch to be activated",
        || gw.admin_post("/v1/skus/lost/batches/b-p/activate", json!({})),
        |(status, _)| *status == StatusCode::OK,
    )
    .await;
    assert_eq!(activated.1["state"], "active", "{}", activated.1);
    eventually(
        Duration::from_secs(15),
        "the SKU rebuilt with every code",
        || gw.merchant_get("/v1/skus/lost"),
        |(status, view)| *status == StatusCode::OK && view["engine"]["available"] == 6,
    )
    .await;
    gw.stop().await;
}

/// An order that bought a SKU's last code, sent again (its answer was lost) while Redis has
/// lost its data, must not be told `ERR_SOLD_OUT` by a gateway that remembers the SKU sold
/// out: its code is sold to it in the ledger, and a buyer told "sold out" never gets it.
/// The retry is answered as a retry (`ERR_UNAVAILABLE`) until the SKU is rebuilt, then with
/// its code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_order_of_a_sold_out_sku_is_not_sold_out_while_redis_lost_its_data() {
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    // Longer than this test takes, however busy the machine: the gateway remembers the SKU
    // sold out throughout.
    cfg.limits.sold_out_cache_ms = 60_000;
    let gw = TestGateway::start(cfg).await;
    gw.stock("last", &["Z-1"]).await;
    let (status, bought) = gw.claim("last", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{bought}");
    let (status, late) = gw.claim("last", json!({"order_id": "o-2"})).await;
    assert_eq!(late["error"]["code"], "ERR_SOLD_OUT", "{status} {late}");
    settled(&gw, "last").await;

    let code = code_of(&bought);
    redis.cmd(&["FLUSHALL"]).await.expect("flushed");
    let (status, retried) = gw.claim("last", json!({"order_id": "o-1"})).await;
    assert!(
        (status == StatusCode::OK && code_of(&retried) == code)
            || retried["error"]["code"] == "ERR_UNAVAILABLE",
        "the buyer of {code}, retrying, was told {status} {retried}"
    );
    let (_, retried) = eventually(
        Duration::from_secs(30),
        "the retried order answered once the SKU is rebuilt",
        || gw.claim("last", json!({"order_id": "o-1"})),
        |(status, _)| *status == StatusCode::OK,
    )
    .await;
    assert_eq!(code_of(&retried), code, "{retried}");
    // A new order is still sold out, from the cache or the engine alike.
    let (_, late) = gw.claim("last", json!({"order_id": "o-3"})).await;
    assert_eq!(late["error"]["code"], "ERR_SOLD_OUT", "{late}");
    gw.stop().await;
}

/// A stream's ids come from the engine's clock. Here Redis loses its data and comes back with
/// a clock behind the one that made the ledger's events (the SKU's ids were set ahead, as by
/// a clock since put back): the rebuilt SKU's events still go above every id the ledger
/// holds, so the key's latest order in the ledger is the one that took it last, not the
/// hold released before the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sku_rebuilt_under_a_clock_put_back_keeps_its_latest_order() {
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.durability = Some(Durability::Ledger);
    let gw = TestGateway::start(cfg).await;
    gw.stock("clock", &["K-1"]).await;
    redis
        .redis_cli(&["XSETID", &events_key("clock"), "4000000000000-0"])
        .await;
    let (status, held) = gw
        .claim(
            "clock",
            json!({"order_id": "h-1", "user_id": "u-h", "hold_ms": 60000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{held}");
    let (status, released) = gw
        .merchant_post("/v1/skus/clock/claims/h-1/release", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{released}");
    settled(&gw, "clock").await;
    let ledger = &gw.gateway.app.ledger;
    let key = ledger.get_key("clock.1").await.expect("read").expect("key");
    assert_eq!(key.order_id.as_deref(), Some("h-1"));

    lose_and_rebuild(&redis, &gw, "clock").await;
    let (status, claimed) = gw
        .claim("clock", json!({"order_id": "c-1", "user_id": "u-c"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{claimed}");
    settled(&gw, "clock").await;
    let key = ledger.get_key("clock.1").await.expect("read").expect("key");
    assert_eq!(
        (key.order_id.as_deref(), key.user_id.as_deref()),
        (Some("c-1"), Some("u-c")),
        "the ledger names the order that took the key last"
    );
    let (trail, kinds) = audit_trail(&gw.client, &gw.admin, "clock.1").await;
    assert_eq!(kinds, ["hold", "release", "claim"], "{trail}");
    gw.stop().await;
}

/// The hold sweep finds SKUs through the engine's registry of SKUs, which lives apart from
/// the SKU's own keys (in Redis Cluster, on another shard). A SKU the registry lost (its
/// shard failed over to a replica that missed the write, or the engine failed between
/// creating a SKU and registering it) is registered again, and its holds lapse with nobody
/// claiming or reading the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_lapse_in_a_sku_the_registry_lost() {
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    let gw = TestGateway::start(cfg).await;
    gw.stock("unlisted", &["U-1", "U-2"]).await;
    let (status, hold) = gw
        .claim("unlisted", json!({"order_id": "h-1", "hold_ms": 300}))
        .await;
    assert_eq!(status, StatusCode::OK, "{hold}");
    let removed = redis
        .cmd(&["SREM", "kg:skus", "unlisted"])
        .await
        .expect("SREM");
    assert_eq!(removed.as_int(), Some(1), "the SKU was registered");

    // Only the sweep lapses it: the view counts keys without lapsing anything.
    let view = eventually(
        Duration::from_secs(30),
        "the hold to lapse",
        || gw.merchant_get("/v1/skus/unlisted"),
        |(status, view)| *status == StatusCode::OK && view["engine"]["held"] == 0,
    )
    .await;
    assert_eq!(view.1["engine"]["available"], 2, "{}", view.1);
    let (status, order) = gw.merchant_get("/v1/skus/unlisted/claims/h-1").await;
    assert_eq!(
        (status, order["state"].as_str()),
        (StatusCode::OK, Some("expired")),
        "{order}"
    );
    let listed = redis
        .cmd(&["SISMEMBER", "kg:skus", "unlisted"])
        .await
        .expect("SISMEMBER");
    assert_eq!(listed.as_int(), Some(1), "registered again");
    settled(&gw, "unlisted").await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_engine_hidden_by_a_recreated_sku_is_caught_by_the_epoch_marker() {
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    let gw = TestGateway::start(cfg).await;
    gw.stock("epoch", &["E-1", "E-2", "E-3"]).await;
    // The lost stream's ids ahead of the clock the recreated one takes its ids from.
    let ahead = StreamId {
        ms: 4_000_000_000_000,
        seq: 0,
    };
    redis
        .redis_cli(&["XSETID", &events_key("epoch"), &ahead.to_string()])
        .await;
    let (_, order) = gw.claim("epoch", json!({"order_id": "o-1"})).await;
    let sold = code_of(&order);
    settled(&gw, "epoch").await;
    let ledger = gw.gateway.app.ledger.clone();
    eventually(
        Duration::from_secs(15),
        "the SKU's epoch to be marked",
        || async {
            ledger
                .get_sku("epoch")
                .await
                .expect("ledger")
                .and_then(|r| r.epoch)
        },
        Option::is_some,
    )
    .await;

    // Redis loses everything, and an update of the SKU recreates its settings at once: the
    // engine has the SKU again, but none of its keys.
    redis.cmd(&["FLUSHALL"]).await.expect("flushed");
    let (status, _) = gw.put_sku("epoch", json!({})).await;
    assert!(status.is_success());
    eventually(
        Duration::from_secs(15),
        "the SKU to be reconciled",
        || gw.merchant_get("/v1/skus/epoch"),
        |(_, view)| view["engine"]["available"] == 2 && view["engine"]["claimed"] == 1,
    )
    .await;
    // Found through the global index, which answers "retry" until the gateway has indexed
    // every SKU again: a client retries, as it would any 503.
    let (status, _) = eventually(
        Duration::from_secs(15),
        "the index to come back",
        || gw.redeem(json!({"code": sold, "redeemer": "u-1"})),
        |(status, _)| *status != StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the sold code is still sold, and only once"
    );
    let (status, retried) = gw.claim("epoch", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{retried}");
    assert_eq!(
        retried["replayed"], true,
        "the order was rebuilt too: {retried}"
    );
    // The reconciled SKU's events go above the ledger's: none is taken for one it has.
    let (status, fresh) = gw.claim("epoch", json!({"order_id": "o-2"})).await;
    assert_eq!(status, StatusCode::OK, "{fresh}");
    settled(&gw, "epoch").await;
    let key_id = fresh["keys"][0]["key_id"].as_str().expect("key id");
    let (trail, kinds) = audit_trail(&gw.client, &gw.admin, key_id).await;
    assert_eq!(kinds, ["claim"], "{trail}");
    let entry = trail["events"][0]["event_id"]
        .as_str()
        .and_then(|id| id.strip_prefix("epoch/"))
        .and_then(StreamId::parse)
        .expect("a stream id");
    assert!(entry > ahead, "{trail}");
    gw.stop().await;
}

/// Redis loses everything while buyers keep claiming a large stock: until the whole stock
/// is back, every buyer is told to retry (503 with Retry-After), never that the SKU does not
/// exist or that the sale is over; the loss is noticed at once, and every code is sold once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyers_see_only_retry_while_a_lost_sku_is_rebuilt() {
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.limits.public = kamigate::limit::BucketRule::enforced(100_000, 100_000);
    let gw = TestGateway::start(cfg).await;
    // Several warm-up chunks: a partial load is observable if it is ever served.
    const STOCK: usize = 3 * kamigate::inventory::warm::WARM_CHUNK as usize;
    let codes: Vec<String> = (0..STOCK).map(|i| format!("RB-{i:06}")).collect();
    let body: String = codes.iter().map(|c| format!("{c}\n")).collect();
    gw.put_sku("rebuild", json!({})).await;
    let (status, report) = gw.import("rebuild", body).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let (_, first) = gw.claim("rebuild", json!({"order_id": "before"})).await;
    let mut issued: HashSet<String> = [code_of(&first)].into();
    settled(&gw, "rebuild").await;

    redis.cmd(&["FLUSHALL"]).await.expect("flushed");
    let lost_at = tokio::time::Instant::now();
    let (status, body) = gw.claim("rebuild", json!({"order_id": "during-0"})).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a lost SKU is unavailable at once, not unknown: {body}"
    );
    assert_eq!(body["error"]["code"], "ERR_UNAVAILABLE");

    // Claims keep coming until the SKU serves again; each is retried until it is answered.
    let mut unavailable = 0;
    let mut n = 1;
    let deadline = lost_at + Duration::from_secs(60);
    loop {
        let order = format!("during-{n}");
        let (status, body) = gw.claim("rebuild", json!({"order_id": order})).await;
        match status {
            StatusCode::OK => {
                assert!(issued.insert(code_of(&body)), "a code was sold twice");
                n += 1;
                if n > 50 {
                    break;
                }
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(body["error"]["code"], "ERR_UNAVAILABLE", "{body}");
                unavailable += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => panic!("a buyer was told {other} during the rebuild: {body}"),
        }
        let (status, body) = gw
            .redeem(json!({"code": code_of(&first), "redeemer": "holder"}))
            .await;
        assert!(
            status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
            "a redemption during the rebuild was answered {status}: {body}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the SKU never served again"
        );
    }
    assert!(unavailable > 0, "the loss was seen");
    let view = settled(&gw, "rebuild").await;
    assert_eq!(
        view["engine"]["available"],
        (STOCK - issued.len()) as u64,
        "the whole stock is back: {view}"
    );
    gw.stop().await;
}

/// With `durability = "ledger"` (the embedded default) an answered void or restore is in the
/// ledger when it is answered, like a claim: no waiting for the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_void_is_in_the_ledger_at_once() {
    let gw = TestGateway::embedded().await;
    gw.stock("admin", &["ADM-1", "ADM-2"]).await;
    for (action, kind) in [("void", "void"), ("restore", "restore")] {
        let (status, body) = gw
            .admin_post(
                &format!("/v1/keys/admin.1/{action}"),
                json!({"reason": "checked"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["changed"], true);
        let (trail, kinds) = audit_trail(&gw.client, &gw.admin, "admin.1").await;
        assert_eq!(kinds.last().map(String::as_str), Some(kind), "{trail}");
    }
    gw.stop().await;
}

/// The global index alone loses its data (on Redis Cluster its shards live on nodes of their
/// own; one failing over to a replica that missed writes loses its entries), and loses it
/// again while the gateway is indexing every SKU's codes anew. Holders redeeming through the
/// index, naming no SKU, must only ever be told to retry until every code is indexed again:
/// a rebuild of the index that a loss overtook is not marked complete, since the codes it
/// indexed before the loss went with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_lost_while_it_is_rebuilt_never_answers_unknown() {
    const SKUS: usize = 24;
    const CODES: usize = 20;
    const ROUNDS: usize = 4;
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.limits.public = kamigate::limit::BucketRule::enforced(100_000, 100_000);
    let gw = std::sync::Arc::new(TestGateway::start(cfg).await);
    let mut held = Vec::new();
    for s in 0..SKUS {
        let sku = format!("ix-loss-{s}");
        let codes: Vec<String> = (0..CODES).map(|c| format!("IXL-{s}-{c}")).collect();
        let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
        gw.stock(&sku, &codes).await;
        let (status, order) = gw.claim(&sku, json!({"order_id": "o-1"})).await;
        assert_eq!(status, StatusCode::OK, "{order}");
        held.push(code_of(&order));
    }
    let redeem = |gw: std::sync::Arc<TestGateway>, i: usize, code: String| async move {
        gw.redeem(json!({"code": code, "redeemer": format!("holder-{i}")}))
            .await
    };
    for (i, code) in held.iter().enumerate() {
        let (status, body) = redeem(gw.clone(), i, code.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holders: Vec<_> = (0..4)
        .map(|h| {
            let (gw, stop, held) = (gw.clone(), stop.clone(), held.clone());
            tokio::spawn(async move {
                let mut asked = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for (i, code) in held.iter().enumerate().skip(h).step_by(4) {
                        let (status, body) = redeem(gw.clone(), i, code.clone()).await;
                        assert!(
                            status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
                            "a redemption of a sold code was answered {status}: {body}"
                        );
                        asked += 1;
                    }
                }
                asked
            })
        })
        .collect();

    let mut overtaken = 0;
    for _ in 0..ROUNDS {
        lose_index(&redis).await;
        // The gateway notices within a second and indexes every SKU again, one after the
        // other: lose the index again once it is partly back.
        // Looked at closely (a pass takes a fraction of a second), within a deadline.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let partly = loop {
            let n = index_entries(&redis).await;
            if n >= CODES {
                break n;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway never indexed again"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        if partly < SKUS * CODES {
            lose_index(&redis).await;
            overtaken += 1;
        }
        for (i, code) in held.iter().enumerate() {
            eventually(
                Duration::from_secs(30),
                "every code to be found again",
                || redeem(gw.clone(), i, code.clone()),
                |(status, _)| *status == StatusCode::OK,
            )
            .await;
        }
    }
    assert!(overtaken > 0, "no loss came while the index was rebuilt");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for holder in holders {
        assert!(holder.await.expect("holder finished") > 0);
    }
    std::sync::Arc::into_inner(gw)
        .expect("holders done")
        .stop()
        .await;
}

/// Entries in the global index's shards, markers included.
async fn index_entries(redis: &RedisServer) -> usize {
    let shards: Vec<String> = kamigate::engine::keys::index_shards().collect();
    let mut args = vec![
        "EVAL",
        "local n = 0 for _, k in ipairs(KEYS) do n = n + redis.call('HLEN', k) end return n",
        "16",
    ];
    args.extend(shards.iter().map(String::as_str));
    let n = redis.cmd(&args).await.expect("HLEN");
    n.as_int().expect("a count") as usize
}

/// Deletes every shard of the global index, as a loss of the nodes holding them would.
async fn lose_index(redis: &RedisServer) {
    let shards: Vec<String> = kamigate::engine::keys::index_shards().collect();
    let mut args = vec!["DEL"];
    args.extend(shards.iter().map(String::as_str));
    redis.cmd(&args).await.expect("index lost");
}

/// An engine call, as a [`Gated`] engine tells which to hold.
enum Call<'a> {
    Eval(&'static Script, &'a [String]),
    ReadNewEntries,
}

/// A writer's read (of new entries, or of entries to take over).
fn writer_read(call: &Call) -> bool {
    match call {
        Call::Eval(script, args) => {
            std::ptr::eq(*script, &SCRIPTS.stream)
                && args.first().map(String::as_str) == Some("read")
        }
        Call::ReadNewEntries => true,
    }
}

/// An engine whose calls `holds` picks wait while `held` says so: a test can leave a change
/// in the stream for a consumer of its own first, stop a rebuild halfway, or pause a
/// gateway's every engine call as SIGSTOP would.
struct Gated {
    inner: std::sync::Arc<dyn ScriptEngine>,
    holds: fn(&Call) -> bool,
    held: tokio::sync::watch::Receiver<bool>,
    /// How many calls it has held so far.
    stopped: tokio::sync::watch::Sender<usize>,
}

impl Gated {
    fn new(
        inner: std::sync::Arc<dyn ScriptEngine>,
        holds: fn(&Call) -> bool,
    ) -> (Gated, tokio::sync::watch::Sender<bool>) {
        let (hold, held) = tokio::sync::watch::channel(false);
        let stopped = tokio::sync::watch::Sender::new(0);
        let gated = Gated {
            inner,
            holds,
            held,
            stopped,
        };
        (gated, hold)
    }

    async fn pass(&self, call: Call<'_>) {
        if !(self.holds)(&call) {
            return;
        }
        let mut held = self.held.clone();
        if *held.borrow_and_update() {
            self.stopped.send_modify(|n| *n += 1);
        }
        let _ = held.wait_for(|held| !*held).await;
    }
}

/// What an engine call answers.
type Answer<'a, T = Reply> = BoxFuture<'a, Result<T, EngineError>>;

impl ScriptEngine for Gated {
    fn eval(&self, script: &'static Script, keys: Vec<String>, args: Vec<String>) -> Answer<'_> {
        Box::pin(async move {
            self.pass(Call::Eval(script, &args)).await;
            self.inner.eval(script, keys, args).await
        })
    }

    fn read_new_entries(&self, keys: Vec<String>, args: Vec<String>) -> Answer<'_> {
        Box::pin(async move {
            self.pass(Call::ReadNewEntries).await;
            self.inner.read_new_entries(keys, args).await
        })
    }

    fn ping(&self) -> Answer<'_, ()> {
        self.inner.ping()
    }

    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }
}

/// A new connection to `redis`.
async fn redis_engine(redis: &RedisServer) -> std::sync::Arc<dyn ScriptEngine> {
    let engine = kamigate::engine::redis::RedisEngine::connect(
        &redis.url(),
        kamigate::engine::redis::RedisOptions::default(),
    )
    .await
    .expect("connects");
    std::sync::Arc::new(engine)
}

/// A gateway on `redis` whose writer's reads wait while the returned sender says so, with
/// `sku` stocked with `codes` and settled (an answer waits for the ledger half a second at
/// most). A dead gateway's events are not taken over within
/// a test.
async fn gateway_with_held_reads(
    redis: &RedisServer,
    sku: &str,
    codes: &[&str],
    durability: Durability,
) -> (TestGateway, tokio::sync::watch::Sender<bool>) {
    let (engine, hold) = Gated::new(redis_engine(redis).await, writer_read);
    let engine = std::sync::Arc::new(engine);
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.durability = Some(durability);
    cfg.ledger_wait_ms = 500;
    cfg.event_reclaim_idle_ms = 600_000;
    let gw = TestGateway::with_inventory(cfg, kamigate::inventory::Inventory::new(engine)).await;
    gw.stock(sku, codes).await;
    settled(&gw, sku).await;
    (gw, hold)
}

/// Runs `change` (a script call no gateway keeps or answers) while the gateway's writer is
/// held, and hands its event to the writer of a gateway that died: nobody commits it.
async fn change_of_a_dead_gateway<T>(
    redis: &RedisServer,
    hold: &tokio::sync::watch::Sender<bool>,
    sku: &str,
    change: impl std::future::Future<Output = T>,
) -> T {
    hold.send_replace(true);
    let made = change.await;
    taken_by_a_dead_gateway(redis, sku).await;
    hold.send_replace(false);
    made
}

/// Hands the events of `sku` nobody read yet to the writer of a gateway that died: nobody
/// commits them (within a test).
async fn taken_by_a_dead_gateway(redis: &RedisServer, sku: &str) {
    let events = kamigate::engine::keys::events_key(sku);
    let taken = redis
        .cmd(&[
            "XREADGROUP",
            "GROUP",
            "ledger",
            "dead-gateway",
            "COUNT",
            "10",
            "STREAMS",
            &events,
            ">",
        ])
        .await
        .expect("XREADGROUP");
    assert!(
        matches!(&taken, support::redis_server::Resp::Array(Some(streams)) if streams.len() == 1),
        "the events went to the dead gateway's writer: {taken:?}"
    );
}

/// Loses Redis's data and waits until the gateway serves `sku` again; returns its view.
async fn lose_and_rebuild(redis: &RedisServer, gw: &TestGateway, sku: &str) -> Value {
    redis.cmd(&["FLUSHALL"]).await.expect("flushed");
    let path = format!("/v1/skus/{sku}");
    let (_, view) = eventually(
        Duration::from_secs(30),
        "the SKU to be rebuilt",
        || gw.merchant_get(&path),
        |(status, _)| *status == StatusCode::OK,
    )
    .await;
    view
}

/// Claims codes of `sku` for new orders `o-2`, `o-3`, …, up to `o-{last}`: none may get
/// `code`, which an answered order holds.
async fn never_sold_again(gw: &TestGateway, sku: &str, code: &str, last: usize) {
    for n in 2..=last {
        let (status, other) = gw.claim(sku, json!({"order_id": format!("o-{n}")})).await;
        assert_eq!(status, StatusCode::OK, "{other}");
        assert_ne!(code_of(&other), code, "a code sold twice");
    }
}

/// A gateway dies between making a claim and keeping it (its script ran; it never answered),
/// and its writer had taken the claim's event. The client retries through another gateway,
/// which answers with the claim made (a replay). Then Redis loses its data before the dead
/// gateway's event is taken over: the answering gateway, alive, must have kept the change
/// it answered, so the rebuilt engine still knows the order and its code stays sold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_answer_outlives_redis_losing_its_data() {
    let redis = RedisServer::start().await;
    let (gw, hold) = gateway_with_held_reads(
        &redis,
        "replayed",
        &["RP-1", "RP-2", "RP-3"],
        Durability::Engine,
    )
    .await;
    let request = kamigate::inventory::ClaimRequest {
        order_id: "o-1".into(),
        quantity: 1,
        user_id: None,
        hold_ms: None,
        pool: Default::default(),
    };
    let made = change_of_a_dead_gateway(&redis, &hold, "replayed", async {
        gw.inventory()
            .claim("replayed", &request)
            .await
            .expect("claimed")
    })
    .await;

    // The client's retry, through the live gateway: the claim made, replayed.
    let (status, first) = gw.claim("replayed", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["replayed"], true, "{first}");
    let code = code_of(&first);
    assert_eq!(
        Some(made.keys[0].key_id.as_str()),
        first["keys"][0]["key_id"].as_str()
    );

    let view = lose_and_rebuild(&redis, &gw, "replayed").await;
    assert_eq!(
        (&view["engine"]["claimed"], &view["engine"]["available"]),
        (&json!(1), &json!(2)),
        "the answered claim is in the rebuilt engine: {view}"
    );
    let (status, again) = gw.claim("replayed", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        (again["replayed"].as_bool(), code_of(&again)),
        (Some(true), code.clone()),
        "{again}"
    );
    never_sold_again(&gw, "replayed", &code, 3).await;
    gw.stop().await;
}

/// As [`a_replayed_answer_outlives_redis_losing_its_data`], for a redemption: the holder's
/// retry is answered with the redemption a dead gateway made, and after Redis lost its data
/// the code is still his, never redeemed by another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_redemption_outlives_redis_losing_its_data() {
    let redis = RedisServer::start().await;
    let (gw, hold) = gateway_with_held_reads(
        &redis,
        "redeemed",
        &["RR0001", "RR0002"],
        Durability::Engine,
    )
    .await;
    let (status, order) = gw.claim("redeemed", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    let code = code_of(&order);
    settled(&gw, "redeemed").await;
    change_of_a_dead_gateway(&redis, &hold, "redeemed", async {
        gw.inventory()
            .redeem("redeemed", &code, "holder")
            .await
            .expect("redeemed")
    })
    .await;

    // The holder's retry, through the live gateway: the redemption made, replayed.
    let (status, first) = gw.redeem(json!({"code": code, "redeemer": "holder"})).await;
    assert_eq!(status, StatusCode::OK, "{first}");

    let view = lose_and_rebuild(&redis, &gw, "redeemed").await;
    assert_eq!(
        view["engine"]["redeemed"],
        json!(1),
        "the answered redemption is in the rebuilt engine: {view}"
    );
    let (status, other) = gw.redeem(json!({"code": code, "redeemer": "other"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{other}");
    assert_eq!(other["error"]["code"], "ERR_CARD_USED", "{other}");
    let (status, again) = gw.redeem(json!({"code": code, "redeemer": "holder"})).await;
    assert_eq!(status, StatusCode::OK, "the holder's retry: {again}");
    gw.stop().await;
}

/// Another gateway's rebuild of a SKU Redis lost, which presumed the gateways of a test
/// gone: stopped before it loads the stock pools, so every key is loaded by then, each as
/// the ledger had it when the rebuild read it.
struct HalfwayRebuild {
    rebuilder: kamigate::inventory::Inventory,
    gen: String,
    stop: tokio::sync::watch::Sender<bool>,
    finishing: tokio::task::JoinHandle<
        Result<kamigate::inventory::warm::WarmReport, kamigate::error::Error>,
    >,
}

impl HalfwayRebuild {
    async fn start(redis: &RedisServer, gw: &TestGateway, sku: &'static str) -> HalfwayRebuild {
        let (halfway, stop) = Gated::new(
            redis_engine(redis).await,
            |call| matches!(call, Call::Eval(script, _) if std::ptr::eq(*script, &SCRIPTS.pool)),
        );
        let mut stopped = halfway.stopped.subscribe();
        stop.send_replace(true);
        let rebuilder = kamigate::inventory::Inventory::new(std::sync::Arc::new(halfway));
        rebuilder.use_keyring(gw.inventory().keyring());
        let ledger = gw.gateway.app.ledger.clone();
        let gen = begin_restore(ledger.as_ref(), &rebuilder, sku)
            .await
            .expect("begun")
            .expect("the engine lost the SKU")
            .gen;
        let finishing = tokio::spawn({
            let (rebuilder, gen) = (rebuilder.clone(), gen.clone());
            async move { finish_restore(ledger.as_ref(), &rebuilder, sku, &gen).await }
        });
        stopped
            .wait_for(|n| *n > 0)
            .await
            .expect("the rebuild reaches its pools");
        HalfwayRebuild {
            rebuilder,
            gen,
            stop,
            finishing,
        }
    }

    /// Waits until a gateway drained the rebuild, which must never serve meanwhile (finished
    /// by a gateway that came back, it would), then lets it go on to its end.
    async fn drained(self, sku: &str) {
        eventually(
            Duration::from_secs(30),
            "the half-done rebuild to be drained",
            || self.rebuilder.sku_state(sku),
            |state| match state {
                Ok(Some(state)) => {
                    let serves = state.gen == self.gen && !state.loading && !state.draining;
                    assert!(!serves, "the rebuild without the claim serves: {state:?}");
                    state.gen != self.gen || state.draining
                }
                Ok(None) => true,
                Err(_) => false,
            },
        )
        .await
        .expect("read");
        self.stop.send_replace(false);
        let _ = self.finishing.await.expect("the rebuild task ends");
    }
}

/// Waits until `gw` serves `sku` (three codes) again, rebuilt with order `o-1`'s claim of
/// `code`: the order replays its code, and nobody else gets it.
async fn rebuilt_with_the_claim(gw: &TestGateway, sku: &str, code: &str) {
    let path = format!("/v1/skus/{sku}");
    let (_, view) = eventually(
        Duration::from_secs(30),
        "the SKU to be rebuilt again",
        || gw.merchant_get(&path),
        |(status, _)| *status == StatusCode::OK,
    )
    .await;
    assert_eq!(
        (&view["engine"]["claimed"], &view["engine"]["available"]),
        (&json!(1), &json!(2)),
        "the claim is in the engine: {view}"
    );
    let (status, again) = gw.claim(sku, json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        (again["replayed"].as_bool(), code_of(&again)),
        (Some(true), code.to_owned()),
        "{again}"
    );
    never_sold_again(gw, sku, code, 3).await;
}

/// A gateway is paused (every engine call of it waits) with a claim it answered still in
/// its journal, for longer than the rebuild's grace: Redis loses its data, and another
/// gateway, presuming it gone, rebuilds the SKU without the claim. It resumes while that
/// rebuild is halfway (every key loaded, the code it sold among them as available) and
/// writes its claim into the ledger. The half-done rebuild must never serve: the SKU is
/// rebuilt again, so the answered order keeps its code and nobody else gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_presumed_gone_that_resumes_mid_rebuild_has_it_done_again() {
    let redis = RedisServer::start().await;
    let sku = "resumed";
    let (reads, reads_held) = Gated::new(redis_engine(&redis).await, writer_read);
    let (paused, pause) = Gated::new(std::sync::Arc::new(reads), |_| true);
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.event_reclaim_idle_ms = 600_000;
    let inventory = kamigate::inventory::Inventory::new(std::sync::Arc::new(paused));
    let gw = TestGateway::with_inventory(cfg, inventory).await;
    gw.stock(sku, &["RS-1", "RS-2", "RS-3"]).await;
    settled(&gw, sku).await;

    // Answered and journaled; the ledger never gets it from the stream.
    reads_held.send_replace(true);
    let (status, sold) = gw.claim(sku, json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{sold}");
    let code = code_of(&sold);
    pause.send_replace(true);
    redis.cmd(&["FLUSHALL"]).await.expect("flushed");

    let halfway = HalfwayRebuild::start(&redis, &gw, sku).await;

    // The paused gateway resumes.
    reads_held.send_replace(false);
    pause.send_replace(false);
    halfway.drained(sku).await;
    rebuilt_with_the_claim(&gw, sku, &code).await;
    gw.stop().await;
}

/// A gateway as [`gateway_with_held_reads`] with `sku` stocked with three codes, and order
/// `o-1` holding one of them until the hold lapsed (the gateway's sweep) with the writer's
/// reads held: only the stream has the lapse, and the reads are still held. Returns the
/// gateway, what holds its reads, and the held key's id.
async fn a_lapsed_hold(
    redis: &RedisServer,
    sku: &str,
    durability: Durability,
) -> (TestGateway, tokio::sync::watch::Sender<bool>, String) {
    let (gw, hold) =
        gateway_with_held_reads(redis, sku, &["LC-1", "LC-2", "LC-3"], durability).await;
    let request = kamigate::inventory::ClaimRequest {
        order_id: "o-1".into(),
        quantity: 1,
        user_id: None,
        hold_ms: Some(200),
        pool: Default::default(),
    };
    let held = gw.inventory().claim(sku, &request).await.expect("held");
    settled(&gw, sku).await;
    hold.send_replace(true);
    eventually(
        Duration::from_secs(30),
        "the hold to lapse",
        || gw.inventory().order(sku, "o-1"),
        |order| order.as_ref().is_ok_and(|o| o.state == "expired"),
    )
    .await
    .expect("read");
    (gw, hold, held.keys[0].key_id.clone())
}

/// As [`a_replayed_answer_outlives_redis_losing_its_data`], for a late confirm: its fresh
/// code presumes the hold's lapsed, and the lapse too is only in the stream, taken by the
/// dead gateway. The retry through the live gateway keeps both, so after Redis lost its
/// data the held code is back on sale (not held for good by an order that has another)
/// and the order keeps its fresh code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_late_confirm_outlives_redis_losing_its_data_with_its_lapse() {
    let redis = RedisServer::start().await;
    let sku = "late";
    let (gw, hold, held) = a_lapsed_hold(&redis, sku, Durability::Engine).await;
    let late = change_of_a_dead_gateway(&redis, &hold, sku, async {
        gw.inventory()
            .confirm(sku, "o-1", true)
            .await
            .expect("confirmed late")
    })
    .await;
    assert!(late.late, "{late:?}");
    assert_ne!(late.keys[0].key_id, held, "fresh codes");

    let path = format!("/v1/skus/{sku}/claims/o-1/confirm");
    let (status, first) = gw.merchant_post(&path, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["replayed"], true, "{first}");
    let code = code_of(&first);

    let view = lose_and_rebuild(&redis, &gw, sku).await;
    assert_eq!(
        (
            &view["engine"]["claimed"],
            &view["engine"]["held"],
            &view["engine"]["available"]
        ),
        (&json!(1), &json!(0), &json!(2)),
        "the lapse and the late confirm are in the rebuilt engine: {view}"
    );
    let (status, again) = gw.merchant_post(&path, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(code_of(&again), code, "{again}");
    never_sold_again(&gw, sku, &code, 3).await;
    gw.stop().await;
}

/// With `durability = "ledger"` an answer means the ledger has the change. A late confirm
/// made by a gateway that died before answering, whose lapse went to that gateway's writer
/// while the confirm itself was committed by a live one: the client's retry is answered only
/// once the ledger has the lapse too (else, after a loss of Redis's data, the ledger would
/// keep the hold's code held for good), so here, with the lapse not taken over, "retry".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_late_confirm_waits_for_its_lapse_in_ledger_durability() {
    let redis = RedisServer::start().await;
    let sku = "late";
    let (gw, hold, held) = a_lapsed_hold(&redis, sku, Durability::Ledger).await;
    taken_by_a_dead_gateway(&redis, sku).await;
    let late = gw
        .inventory()
        .confirm(sku, "o-1", true)
        .await
        .expect("confirmed late");
    assert_ne!(late.keys[0].key_id, held, "fresh codes");
    hold.send_replace(false);
    let confirmed = late.event_id.expect("an answer id");
    assert!(
        gw.gateway
            .app
            .writer
            .wait_committed(sku, &confirmed, Duration::from_secs(30))
            .await,
        "the live gateway's writer commits the confirm"
    );

    let path = format!("/v1/skus/{sku}/claims/o-1/confirm");
    let (status, retry) = gw.merchant_post(&path, json!({})).await;
    assert_eq!(
        (status, &retry["error"]["code"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("ERR_UNAVAILABLE")),
        "answered before the ledger has the lapse: {retry}"
    );
    gw.stop().await;
}

/// An engine that lets calls `holds` picks through one permit at a time while armed, and
/// counts those that arrived: a test steps a gateway's sync pass call by call.
struct Stepped {
    inner: std::sync::Arc<dyn ScriptEngine>,
    holds: fn(&Call) -> bool,
    armed: std::sync::atomic::AtomicBool,
    permits: tokio::sync::Semaphore,
    arrived: tokio::sync::watch::Sender<usize>,
}

impl Stepped {
    fn new(inner: std::sync::Arc<dyn ScriptEngine>, holds: fn(&Call) -> bool) -> Stepped {
        Stepped {
            inner,
            holds,
            armed: std::sync::atomic::AtomicBool::new(false),
            permits: tokio::sync::Semaphore::new(0),
            arrived: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Lets calls through freely again, the ones waiting included.
    fn disarm(&self) {
        self.armed.store(false, std::sync::atomic::Ordering::SeqCst);
        self.permits
            .add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    }

    /// Waits until `n` calls arrived since it was armed.
    async fn arrived(&self, n: usize) {
        let mut arrived = self.arrived.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(30), arrived.wait_for(|a| *a >= n));
        assert!(matches!(waited.await, Ok(Ok(_))), "{n} held calls arrived");
    }
}

impl ScriptEngine for Stepped {
    fn eval(&self, script: &'static Script, keys: Vec<String>, args: Vec<String>) -> Answer<'_> {
        Box::pin(async move {
            if (self.holds)(&Call::Eval(script, &args))
                && self.armed.load(std::sync::atomic::Ordering::SeqCst)
            {
                self.arrived.send_modify(|n| *n += 1);
                self.permits.acquire().await.expect("open").forget();
            }
            self.inner.eval(script, keys, args).await
        })
    }

    fn read_new_entries(&self, keys: Vec<String>, args: Vec<String>) -> Answer<'_> {
        self.inner.read_new_entries(keys, args)
    }

    fn ping(&self) -> Answer<'_, ()> {
        self.inner.ping()
    }

    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }
}

/// A gateway reads a SKU as serving, and Redis loses its data right after (before the same
/// pass looks at the SKU again); meanwhile the gateway was presumed gone, and another
/// gateway's rebuild reads the ledger already. The gateway writes the claim it answered into
/// the ledger only then, and its acknowledgement comes late: it must have the SKU rebuilt
/// again, not finish the rebuild that lacks the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_written_after_a_rebuild_began_reading_have_it_done_again() {
    let redis = RedisServer::start().await;
    let sku = "overtaken";
    let (reads, reads_held) = Gated::new(redis_engine(&redis).await, writer_read);
    let stepped = std::sync::Arc::new(Stepped::new(std::sync::Arc::new(reads), |call| {
        matches!(call, Call::Eval(script, args)
            if std::ptr::eq(*script, &SCRIPTS.sku) && args.first().map(String::as_str) == Some("get"))
    }));
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.event_reclaim_idle_ms = 600_000;
    let inventory = kamigate::inventory::Inventory::new(stepped.clone());
    let gw = TestGateway::with_inventory(cfg, inventory).await;
    gw.stock(sku, &["OV-1", "OV-2", "OV-3"]).await;
    settled(&gw, sku).await;

    reads_held.send_replace(true);
    let (status, sold) = gw.claim(sku, json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{sold}");
    let code = code_of(&sold);

    // A sync pass, stopped at its first look at the SKU, then let through that one look
    // (the SKU serves: nothing to write) and stopped at the next, the rebuild's.
    stepped
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let request = kamigate::inventory::ClaimRequest {
        order_id: "x".into(),
        quantity: 1,
        user_id: None,
        hold_ms: None,
        pool: Default::default(),
    };
    // A SKU the engine lacks: the gateway syncs at once.
    let _ = gw.inventory().claim("no-such-sku", &request).await;
    stepped.arrived(1).await;
    stepped.permits.add_permits(1);
    stepped.arrived(2).await;

    redis.cmd(&["FLUSHALL"]).await.expect("flushed");
    reads_held.send_replace(false);
    let halfway = HalfwayRebuild::start(&redis, &gw, sku).await;

    // The pass goes on: it finds the rebuild, writes the claim, acknowledges late.
    stepped.disarm();
    halfway.drained(sku).await;
    rebuilt_with_the_claim(&gw, sku, &code).await;
    gw.stop().await;
}

/// A rebuild of a lost SKU that reaches the stock pools only after another rebuild of the
/// same generation ended (this one was paused, or slow) holds the ledger's pools as they
/// were before the changes made since the SKU serves again: it must not load them over
/// the levels the engine has moved to (a pool would differ between engine and ledger for
/// good, and promise codes another channel was given).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_ending_late_leaves_the_pools_as_they_moved_since() {
    let redis = RedisServer::start().await;
    let sku = "late-pools";
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    let gw = TestGateway::start(cfg).await;
    gw.stock(sku, &["LP-1", "LP-2", "LP-3", "LP-4", "LP-5"])
        .await;
    let (status, made) = gw.admin_put("/v1/channels/shop", json!({})).await;
    assert!(status.is_success(), "{status} {made}");
    let path = format!("/v1/skus/{sku}/pools/shop");
    let (status, body) = gw.admin_put(&path, json!({"count": 2})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    settled(&gw, sku).await;

    redis.cmd(&["FLUSHALL"]).await.expect("flushed");
    let halfway = HalfwayRebuild::start(&redis, &gw, sku).await;
    // The gateway ends the same rebuild, and the pool moves on.
    let pools = format!("/v1/skus/{sku}/pools");
    eventually(
        Duration::from_secs(30),
        "the gateway serving the rebuilt SKU",
        || gw.admin_get(&pools),
        |(status, v)| *status == StatusCode::OK && v["pools"]["shop"] == 2,
    )
    .await;
    let (status, body) = gw.admin_put(&path, json!({"count": 4})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    settled(&gw, sku).await;

    // The late rebuild goes on, with the pools it read.
    halfway.stop.send_replace(false);
    halfway
        .finishing
        .await
        .expect("the rebuild task ends")
        .expect("the late rebuild ends without error");
    let (_, seen) = gw.admin_get(&pools).await;
    assert_eq!(
        (&seen["pools"]["shop"], &seen["ledger"]["shop"]),
        (&json!(4), &json!(4)),
        "{seen}"
    );
    gw.stop().await;
}
