//! The ledger's database stopped under load: with `durability = "engine"` claims go on, the
//! events queue in the engine's streams (`kamigate_events_in_flight` shows them), and once the
//! database is back the ledger catches up to zero drift with nothing lost.
//!
//! The tests run their own PostgreSQL server (initdb in a temp dir, as the `postgres` user)
//! so they can stop and start it without touching the shared one.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kamigate::engine::redis::{RedisEngine, RedisOptions};
use kamigate::inventory::Inventory;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::eventually::eventually;
use support::gateway::{
    config, free_port, metric, spawn_serve, wait_ready, TestGateway, ADMIN_TOKEN, DATA_KEY,
    MERCHANT_TOKEN,
};
use support::postgres_server::Postgres;
use support::proxy::Proxy;
use support::redis_server::{RedisServer, Resp};

async fn view(gw: &TestGateway, sku: &str) -> (StatusCode, Value) {
    gw.merchant_get(&format!("/v1/skus/{sku}")).await
}

/// The address of `pg`'s server.
fn pg_addr(pg: &Postgres) -> std::net::SocketAddr {
    pg.url()
        .split_once("@")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(addr, _)| addr.parse().expect("address"))
        .expect("PostgreSQL address")
}

/// A gateway over `redis` and the ledger at `database_url` with `durability = "ledger"`,
/// answers waiting 300 ms for the ledger, and a silent gateway presumed gone after 1 s.
fn durable_over(redis: &RedisServer, database_url: String) -> kamigate::config::Config {
    let mut cfg = config();
    cfg.durability = Some(kamigate::config::Durability::Ledger);
    cfg.database_url = Some(database_url);
    cfg.redis_url = Some(redis.url());
    cfg.ledger_wait_ms = 300;
    cfg.rebuild_grace_ms = 1000;
    cfg
}

/// Waits until a writer has read `sku`'s change: an entry delivered and unacknowledged.
async fn writer_holding(redis: &RedisServer, sku: &str) {
    let events = format!("kg:{{{sku}}}:events");
    eventually(
        Duration::from_secs(30),
        "the cut-off gateway's writer holding the change",
        || async {
            match redis.cmd(&["XPENDING", &events, "ledger"]).await {
                Ok(Resp::Array(Some(summary))) => summary.first().and_then(Resp::as_int),
                _ => None,
            }
        },
        |pending| pending.is_some_and(|n| n > 0),
    )
    .await;
}

/// Waits until `gw` serves `sku`, rebuilt after Redis lost it, and checks that its pool
/// `shop` is at `level` there, in the engine and in the ledger alike.
async fn rebuilt_with_shop_pool(gw: &TestGateway, sku: &str, level: u64) {
    let path = format!("/v1/skus/{sku}/pools");
    let (_, rebuilt) = eventually(
        Duration::from_secs(60),
        "the other gateway serving the SKU rebuilt without the change",
        || gw.admin_get(&path),
        |(status, v)| *status == StatusCode::OK && v["pools"].is_object(),
    )
    .await;
    assert_eq!(
        (&rebuilt["pools"]["shop"], &rebuilt["ledger"]["shop"]),
        (&json!(level), &json!(level)),
        "{rebuilt}"
    );
}

/// Waits until `gw` has `sku`'s pool `shop` at `level` in the ledger, and the engine's
/// pools agree with the ledger's.
async fn shop_pool_at(gw: &TestGateway, sku: &str, level: u64, what: &str) {
    let path = format!("/v1/skus/{sku}/pools");
    let (_, seen) = eventually(
        Duration::from_secs(60),
        what,
        || gw.admin_get(&path),
        |(status, v)| {
            *status == StatusCode::OK && v["ledger"]["shop"] == level && v["pools"] == v["ledger"]
        },
    )
    .await;
    assert_eq!(seen["pools"]["shop"], level, "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_go_on_while_the_database_is_down_and_the_ledger_catches_up() {
    let pg = Postgres::start();
    let mut cfg = config();
    // Answers that do not wait for the ledger are what this test is about.
    cfg.durability = Some(kamigate::config::Durability::Engine);
    cfg.database_url = Some(pg.url());
    let gw = TestGateway::start(cfg).await;
    let codes: Vec<String> = (0..60).map(|i| format!("PG-{i:04}")).collect();
    let refs: Vec<&str> = codes.iter().map(String::as_str).collect();
    gw.stock("outage", &refs).await;
    for i in 0..10 {
        let (status, _) = gw
            .claim("outage", json!({"order_id": format!("a-{i}")}))
            .await;
        assert_eq!(status, StatusCode::OK);
    }

    pg.down();
    for i in 0..20 {
        let (status, body) = gw
            .claim("outage", json!({"order_id": format!("b-{i}")}))
            .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "claims go on without the ledger: {body}"
        );
    }
    let (status, body) = view(&gw, "outage").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the ledger's view is unavailable: {body}"
    );
    eventually(
        Duration::from_secs(15),
        "the backlog to show in kamigate_events_in_flight",
        || async {
            let text = gw.metrics().await;
            metric(&text, "kamigate_events_in_flight", &["sku=\"outage\""])
        },
        |in_flight| in_flight.unwrap_or(0.0) >= 20.0,
    )
    .await;

    pg.up();
    let (_, v) = eventually(
        Duration::from_secs(30),
        "the ledger to catch up",
        || view(&gw, "outage"),
        |(status, v)| {
            *status == StatusCode::OK && v["in_flight"] == 0 && v["engine"] == v["ledger"]
        },
    )
    .await;
    assert_eq!(v["drift"], 0);
    assert_eq!(v["ledger"]["claimed"], 30, "nothing lost: {v}");
    gw.stop().await;
}

/// A late confirm takes fresh codes because the order's hold lapsed: its answer stands on
/// that lapse. With the ledger down, both wait in Redis's stream; if Redis then loses its
/// data, the answering gateway writes what it answered into the ledger before the SKU is
/// rebuilt, and that must include the lapse. Without it the ledger would keep the hold's
/// code held by an order it knows as claimed with other codes, and the rebuilt engine would
/// never let that code go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_confirm_keeps_its_lapse_when_redis_loses_both() {
    let pg = Postgres::start();
    let redis = RedisServer::start().await;
    // The wall clock, jumped ahead by hand: the hold lapses once the ledger is down.
    let ahead = Arc::new(AtomicU64::new(0));
    let clock = {
        let ahead = ahead.clone();
        Arc::new(move || kamigate::clock::now_ms() + ahead.load(Ordering::SeqCst))
    };
    let engine = RedisEngine::connect(&redis.url(), RedisOptions::default())
        .await
        .expect("Redis");
    let mut cfg = config();
    cfg.durability = Some(kamigate::config::Durability::Engine);
    cfg.database_url = Some(pg.url());
    cfg.redis_url = Some(redis.url());
    let gw = TestGateway::with_inventory(cfg, Inventory::with_clock(Arc::new(engine), clock)).await;
    gw.stock("late", &["LATE-1", "LATE-2", "LATE-3"]).await;
    let (status, hold) = gw
        .claim("late", json!({"order_id": "h-1", "hold_ms": 60_000}))
        .await;
    assert_eq!(status, StatusCode::OK, "{hold}");
    let held_key = hold["keys"][0]["key_id"].clone();
    eventually(
        Duration::from_secs(15),
        "the ledger to have the hold",
        || view(&gw, "late"),
        |(status, v)| *status == StatusCode::OK && v["in_flight"] == 0 && v["ledger"]["held"] == 1,
    )
    .await;

    pg.down();
    // The sweep lapses the hold; its event waits in the stream for the ledger.
    ahead.store(120_000, Ordering::SeqCst);
    let _ = eventually(
        Duration::from_secs(15),
        "the hold to lapse",
        || redis.cmd(&["ZCARD", "kg:{late}:holds"]),
        |n| matches!(n, Ok(Resp::Int(0))),
    )
    .await;
    let (status, confirmed) = gw
        .merchant_post("/v1/skus/late/claims/h-1/confirm", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    assert_eq!(confirmed["late"], true, "{confirmed}");
    assert_ne!(confirmed["keys"][0]["key_id"], held_key, "fresh codes");

    redis.cmd(&["FLUSHALL"]).await.expect("FLUSHALL");
    pg.up();
    let (_, v) = eventually(
        Duration::from_secs(60),
        "the SKU rebuilt, engine and ledger agreeing",
        || view(&gw, "late"),
        |(status, v)| {
            *status == StatusCode::OK
                && v["in_flight"] == 0
                && v["engine"] == v["ledger"]
                && v["engine"]["claimed"] == 1
        },
    )
    .await;
    assert_eq!(v["drift"], 0, "{v}");
    assert_eq!(
        (&v["engine"]["held"], &v["engine"]["available"]),
        (&json!(0), &json!(2)),
        "the lapsed hold's code is for sale again: {v}"
    );
    let (status, order) = gw.merchant_get("/v1/skus/late/claims/h-1").await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["keys"], confirmed["keys"], "answered as it was");
    for i in 0..2 {
        let (status, body) = gw
            .claim("late", json!({"order_id": format!("after-{i}")}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, body) = gw.claim("late", json!({"order_id": "after-2"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "sold out: {body}");
    gw.stop().await;
}

/// Sends a change with the database down (its answer times out), sends it again (the
/// retry must not be answered before the ledger has the change), brings the database back
/// and returns the retry's answer once it is `200`. `what` names the case in failures.
async fn answered_once_the_ledger_has_it<F, Fut>(pg: &Postgres, what: &str, send: F) -> Value
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (StatusCode, Value)>,
{
    pg.down();
    let (status, first) = send().await;
    assert!(status.is_server_error(), "{what}: {status} {first}");
    let (status, again) = send().await;
    assert_eq!(
        (status, &again["error"]["code"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("ERR_UNAVAILABLE")),
        "{what}: the retry was answered before the ledger had the change: {again}"
    );
    pg.up();
    let (_, done) = eventually(
        Duration::from_secs(30),
        "the retry answered once the database is back",
        send,
        |(status, _)| *status == StatusCode::OK,
    )
    .await;
    done
}

/// With `durability = "ledger"`, a void whose answer timed out waiting for the database is
/// retried, and the retry finds the key void already: it too is answered only once the
/// ledger has the void (an answered change is in the ledger, whatever becomes of the engine
/// next: the embedded engine's unwritten changes die with its process). Likewise a restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_void_or_restore_is_answered_once_the_ledger_has_it() {
    let pg = Postgres::start();
    let mut cfg = config();
    cfg.durability = Some(kamigate::config::Durability::Ledger);
    cfg.database_url = Some(pg.url());
    cfg.ledger_wait_ms = 300;
    let gw = TestGateway::start(cfg).await;
    gw.stock("vr", &["VR-1"]).await;
    let key = || async {
        let ledger = &gw.gateway.app.ledger;
        ledger.get_key("vr.1").await.expect("read").expect("key")
    };
    for (op, void) in [("void", true), ("restore", false)] {
        let path = format!("/v1/keys/vr.1/{op}");
        let body = json!({"reason": "retried"});
        let done =
            answered_once_the_ledger_has_it(&pg, op, || gw.admin_post(&path, body.clone())).await;
        assert_eq!(done["changed"], false, "{op}: {done}");
        assert_eq!(key().await.void, void, "{op}: answered, so in the ledger");
    }
    gw.stop().await;
}

/// With `durability = "ledger"`, a pool set whose answer timed out waiting for the database
/// is retried, and the retry finds the pool at the level asked: it too is answered only once
/// the ledger has the change that put it there, as the change itself would have been.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_pool_set_is_answered_once_the_ledger_has_it() {
    let pg = Postgres::start();
    let mut cfg = config();
    cfg.durability = Some(kamigate::config::Durability::Ledger);
    cfg.database_url = Some(pg.url());
    cfg.ledger_wait_ms = 300;
    let gw = TestGateway::start(cfg).await;
    gw.stock("ps", &["PS-1", "PS-2", "PS-3"]).await;
    let (status, made) = gw.admin_put("/v1/channels/shop", json!({})).await;
    assert!(status.is_success(), "{status} {made}");
    let ledger_level = || async {
        let pools = gw.gateway.app.ledger.pools("ps").await.expect("read");
        pools
            .iter()
            .find(|(pool, _)| pool == "shop")
            .map_or(0, |(_, n)| *n)
    };
    for count in [2, 1] {
        let body = json!({"count": count, "reason": "retried"});
        let set = || gw.admin_put("/v1/skus/ps/pools/shop", body.clone());
        let done = answered_once_the_ledger_has_it(&pg, &count.to_string(), set).await;
        assert_eq!(done["moved"], 0, "{count}: {done}");
        assert_eq!(done["pools"]["shop"], count, "{count}: {done}");
        assert_eq!(
            ledger_level().await,
            count,
            "{count}: answered, so in the ledger"
        );
    }
    gw.stop().await;
}

/// An upload cut off while the database is down (its client gave up waiting, and the
/// gateway dropped the request with the connection, or its abort found no database) leaves
/// a pending batch under an upload nobody runs, in a gateway that is alive. Once the
/// database is back the batch is aborted and the merchant's retry of the batch id imports
/// the file, instead of being refused with `ERR_BATCH_IN_PROGRESS` for the upload lease's
/// minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_while_the_database_is_down_frees_its_batch_id() {
    use tokio::io::AsyncWriteExt;

    let pg = Postgres::start();
    let mut cfg = config();
    cfg.database_url = Some(pg.url());
    let gw = TestGateway::start(cfg).await;
    let (status, body) = gw.put_sku("cut", json!({})).await;
    assert!(status.is_success(), "{status} {body}");
    let codes: Vec<String> = (0..50).map(|i| format!("CUT-{i:04}")).collect();
    let file = codes.join("\n") + "\n";
    let (head, tail) = file.split_at(file.len() / 2);

    // The first half of the body, on a connection of its own.
    let admin = gw.gateway.admin_addr;
    let mut conn = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    let request = format!(
        "POST /v1/skus/cut/batches?batch_id=b1 HTTP/1.1\r\nhost: {admin}\r\n\
         authorization: Bearer {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{head}",
        support::gateway::ADMIN_TOKEN,
        file.len()
    );
    conn.write_all(request.as_bytes()).await.expect("send");
    let ledger = gw.gateway.app.ledger.clone();
    eventually(
        Duration::from_secs(30),
        "the upload began its batch",
        || async { ledger.get_batch("cut", "b1").await.ok().flatten() },
        |batch| batch.as_ref().is_some_and(|b| b.state == "pending"),
    )
    .await;

    // The database goes; the rest of the body arrives, and the client hangs up at once.
    pg.down();
    conn.write_all(tail.as_bytes()).await.expect("send");
    drop(conn);
    pg.up();

    let path = format!("{}/v1/skus/cut/batches?batch_id=b1", gw.admin);
    let (_, done) = eventually(
        Duration::from_secs(60),
        "the retry of the batch id imports the file",
        || async {
            let res = gw
                .client
                .post(&path)
                .bearer_auth(support::gateway::ADMIN_TOKEN)
                .header("content-type", "text/plain")
                .body(file.clone())
                .send()
                .await;
            match res {
                Ok(res) => (
                    res.status(),
                    res.json::<Value>().await.unwrap_or(Value::Null),
                ),
                Err(_) => (StatusCode::BAD_GATEWAY, Value::Null),
            }
        },
        |(status, _)| *status == StatusCode::OK,
    )
    .await;
    assert_eq!(
        (&done["accepted"], &done["duplicate"], &done["state"]),
        (&json!(50), &json!(0), &json!("active")),
        "the whole file, once: {done}"
    );
    let (status, sku) = eventually(
        Duration::from_secs(30),
        "the SKU counts the file's codes",
        || view(&gw, "cut"),
        |(status, sku)| *status == StatusCode::OK && sku["engine"]["available"] == 50,
    )
    .await;
    assert_eq!(sku["ledger"]["available"], 50, "{status} {sku}");
    gw.stop().await;
}

/// Redis loses its data while the event writer commits a pool change nobody was answered
/// (`durability = "ledger"`: its answer timed out waiting for that commit). The rebuild
/// reads the ledger's pools only once the commit under way has ended, so the engine and the
/// ledger end at the same level; read before, the engine would lack the change the ledger
/// then got, for good (pool events move levels by deltas, and nothing else compares them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_reads_the_pools_after_the_commit_under_way() {
    let pg = Postgres::start();
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.durability = Some(kamigate::config::Durability::Ledger);
    cfg.database_url = Some(pg.url());
    cfg.redis_url = Some(redis.url());
    cfg.ledger_wait_ms = 300;
    let gw = TestGateway::start(cfg).await;
    gw.stock("rp", &["RP-1", "RP-2", "RP-3", "RP-4", "RP-5"])
        .await;
    let (status, made) = gw.admin_put("/v1/channels/shop", json!({})).await;
    assert!(status.is_success(), "{status} {made}");
    let set = |count: u32| gw.admin_put("/v1/skus/rp/pools/shop", json!({"count": count}));
    let (status, body) = set(2).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A session holding the pools table: the writer's next commit waits at its pool update,
    // and reads of the table go on.
    let db = sqlx::PgPool::connect(&pg.url()).await.expect("PostgreSQL");
    let mut lock = db.begin().await.expect("begin");
    sqlx::query("LOCK TABLE pools IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let (status, body) = set(4).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("ERR_UNAVAILABLE")),
        "the answer waits for the commit: {body}"
    );
    let waiting =
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'pools'::regclass";
    eventually(
        Duration::from_secs(30),
        "the writer's commit waits for the pools table",
        || async {
            sqlx::query_scalar::<_, i64>(waiting)
                .fetch_one(&db)
                .await
                .unwrap_or(0)
        },
        |n| *n > 0,
    )
    .await;

    redis.cmd(&["FLUSHALL"]).await.expect("FLUSHALL");
    // Time for a rebuild that does not wait to read the ledger and serve the SKU again
    // (one that waits serves it only after the commit): the SKU served, or 15 s.
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < until {
        let (status, v) = view(&gw, "rp").await;
        if status == StatusCode::OK && v["engine"].is_object() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lock.rollback().await.expect("unlock");

    let pools = || gw.admin_get("/v1/skus/rp/pools");
    let (_, seen) = eventually(
        Duration::from_secs(60),
        "the engine's pools agreeing with the ledger's",
        pools,
        |(status, v)| *status == StatusCode::OK && v["pools"] == v["ledger"],
    )
    .await;
    assert_eq!(
        seen["pools"]["shop"], 4,
        "the change committed is in both: {seen}"
    );
    gw.stop().await;
}

/// A gateway cut off from the database while its writer holds a pool change of a stream
/// Redis then loses (`durability = "ledger"`: the change's answer timed out waiting for the
/// commit). Past `rebuild_grace_ms` the other gateway presumes it gone, rebuilds the SKU
/// from the ledger without the change, and serves it. Once the cut-off gateway reaches the
/// database again, its writer commits the change, after the rebuild read the ledger: the
/// commit finds the rebuild's fence and marks the SKU, which is rebuilt again, so engine and
/// ledger end at the same level. Without the fence the engine would keep the level the
/// rebuild read, for good (pool events move levels by deltas, and nothing else compares
/// them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_generation_committed_after_the_rebuild_read_has_the_sku_rebuilt_again() {
    let pg = Postgres::start();
    let redis = RedisServer::start().await;
    let proxy = Proxy::start(pg_addr(&pg)).await;
    let cut = TestGateway::start(durable_over(
        &redis,
        format!("postgres://postgres@{}/postgres", proxy.addr),
    ))
    .await;
    cut.stock("rf", &["RF-1", "RF-2", "RF-3", "RF-4", "RF-5"])
        .await;
    let (status, made) = cut.admin_put("/v1/channels/shop", json!({})).await;
    assert!(status.is_success(), "{status} {made}");
    let (status, body) = cut
        .admin_put("/v1/skus/rf/pools/shop", json!({"count": 2}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The change reaches the engine, and its commit cannot reach the database.
    proxy.freeze();
    let (status, body) = cut
        .admin_put("/v1/skus/rf/pools/shop", json!({"count": 4}))
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("ERR_UNAVAILABLE")),
        "the answer waits for the commit: {body}"
    );
    writer_holding(&redis, "rf").await;
    redis.cmd(&["FLUSHALL"]).await.expect("FLUSHALL");

    let other = TestGateway::start(durable_over(&redis, pg.url())).await;
    rebuilt_with_shop_pool(&other, "rf", 2).await;

    proxy.thaw();
    shop_pool_at(
        &other,
        "rf",
        4,
        "the engine's pools agreeing with the ledger's once the change is committed",
    )
    .await;
    other.stop().await;
    cut.stop().await;
}

/// As above, but the cut-off gateway's commit of the change *fails* (its connections to the
/// database close, and new ones are refused) after Redis lost the stream the change was read
/// from: the writer keeps the batch and commits it once the database is back, so the change
/// still reaches the ledger, and the SKU is rebuilt again. Read again from Redis instead,
/// the change would be gone. The cut-off gateway runs as its own process, so its metrics
/// tell when its commit failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_commit_failed_after_redis_lost_its_stream_is_committed_later() {
    let pg = Postgres::start();
    let redis = RedisServer::start().await;
    let proxy = Proxy::start(pg_addr(&pg)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (public, admin) = (free_port(), free_port());
    let config_file = dir.path().join("cut.toml");
    std::fs::write(
        &config_file,
        format!(
            "listen = \"127.0.0.1:{public}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             redis_url = \"{}\"\ndatabase_url = \"postgres://postgres@{}/postgres\"\n\
             data_dir = \"{}\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\
             merchant_token = \"{MERCHANT_TOKEN}\"\ndurability = \"ledger\"\n\
             ledger_wait_ms = 300\nrebuild_grace_ms = 1000\nshutdown_delay_ms = 0\n",
            redis.url(),
            proxy.addr,
            dir.path().display()
        ),
    )
    .expect("config written");
    // The test gateways' data keys, so the other gateway reads the codes this one seals.
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.path().join("data.key"))
            .and_then(|mut f| f.write_all(DATA_KEY.as_bytes()))
            .expect("key file written");
    }
    let mut cut = spawn_serve(&config_file);
    let admin = format!("http://127.0.0.1:{admin}");
    wait_ready(&admin, Duration::from_secs(60)).await;
    let client = support::gateway::client();
    let put = |path: &str, body: Value| {
        let request = client
            .put(format!("{admin}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body);
        async move {
            let res = request.send().await.expect("answered");
            let status = res.status();
            (status, res.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, body) = put("/v1/skus/rk", json!({})).await;
    assert!(status.is_success(), "{status} {body}");
    let import = client
        .post(format!("{admin}/v1/skus/rk/batches?batch_id=b1"))
        .bearer_auth(ADMIN_TOKEN)
        .body("RK-1\nRK-2\nRK-3\nRK-4\nRK-5\n")
        .send()
        .await
        .expect("answered");
    assert_eq!(import.status(), StatusCode::OK);
    let (status, body) = put("/v1/channels/shop", json!({})).await;
    assert!(status.is_success(), "{status} {body}");
    let (status, body) = put("/v1/skus/rk/pools/shop", json!({"count": 2})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The change reaches the engine; its commit waits behind the frozen link.
    proxy.freeze();
    let (status, body) = put("/v1/skus/rk/pools/shop", json!({"count": 4})).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("ERR_UNAVAILABLE")),
        "the answer waits for the commit: {body}"
    );
    writer_holding(&redis, "rk").await;
    redis.cmd(&["FLUSHALL"]).await.expect("FLUSHALL");
    // The database goes away under the commit: it fails, with nothing left in Redis to read
    // it from again.
    proxy.sever();
    let failures = || async {
        let text = match client.get(format!("{admin}/metrics")).send().await {
            Ok(res) => res.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        metric(
            &text,
            "kamigate_ledger_write_failures_total",
            &["kind=\"unavailable\""],
        )
    };
    eventually(
        Duration::from_secs(60),
        "the cut-off gateway's commit failing",
        failures,
        |n| n.is_some_and(|n| n >= 1.0),
    )
    .await;

    let other = TestGateway::start(durable_over(&redis, pg.url())).await;
    rebuilt_with_shop_pool(&other, "rk", 2).await;

    proxy.restore();
    shop_pool_at(
        &other,
        "rk",
        4,
        "the kept change committed, and the SKU rebuilt with it",
    )
    .await;
    other.stop().await;
    cut.start_kill().expect("SIGKILL sent");
    cut.wait().await.expect("reaped");
}
