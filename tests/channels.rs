//! Selling channels through the gateway: their tokens, SKU lists, buckets and breakers, and
//! orders namespaced per channel; on the embedded engine, and across two gateways sharing
//! Redis and a PostgreSQL ledger.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use kamigate::config::Config;
use pg_support::TestDatabase;
use support::eventually::eventually;
use support::gateway::{config, metric, TestGateway, ADMIN_TOKEN, MERCHANT_TOKEN};
use support::redis_server::RedisServer;

#[path = "support/postgres.rs"]
mod pg_support;

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value, Option<String>) {
    let res = req.send().await.expect("answered");
    let status = res.status();
    let retry_after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = res.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        retry_after,
    )
}

/// An admin `GET`: status, body, and the `Retry-After` header.
async fn admin_get(gw: &TestGateway, path: &str) -> (StatusCode, Value, Option<String>) {
    send(
        gw.client
            .get(format!("{}{path}", gw.admin))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await
}

async fn put_channel(gw: &TestGateway, name: &str, settings: Value) -> (StatusCode, Value) {
    let (status, body, _) = send(
        gw.client
            .put(format!("{}/v1/channels/{name}", gw.admin))
            .bearer_auth(ADMIN_TOKEN)
            .json(&settings),
    )
    .await;
    (status, body)
}

/// Makes a token for `channel`; returns it and its id.
async fn new_token(gw: &TestGateway, channel: &str) -> (String, String) {
    let (status, made) = gw
        .admin_post(
            &format!("/v1/channels/{channel}/tokens"),
            json!({"label": "checkout"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let token = made["token"].as_str().expect("token").to_owned();
    let id = made["token_id"].as_str().expect("token id").to_owned();
    (token, id)
}

async fn post_as(gw: &TestGateway, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, body, _) = send(
        gw.client
            .post(format!("{}{path}", gw.public))
            .bearer_auth(token)
            .json(&body),
    )
    .await;
    (status, body)
}

async fn get_as(gw: &TestGateway, token: &str, path: &str) -> (StatusCode, Value) {
    let (status, body, _) = send(
        gw.client
            .get(format!("{}{path}", gw.public))
            .bearer_auth(token),
    )
    .await;
    (status, body)
}

fn codes_of(order: &Value) -> Vec<String> {
    order["keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k["code"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_same_order_id_from_two_channels_is_two_orders() {
    let gw = TestGateway::embedded().await;
    gw.stock("s", &["CODE1", "CODE2", "CODE3"]).await;
    let (status, put) = put_channel(&gw, "shop-b", json!({"description": "reseller"})).await;
    assert_eq!(status, StatusCode::CREATED, "{put}");
    let (token, _) = new_token(&gw, "shop-b").await;

    let (status, mine) = gw.claim("s", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{mine}");
    let (status, theirs) =
        post_as(&gw, &token, "/v1/skus/s/claims", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{theirs}");
    assert_eq!(
        theirs["order_id"], "o-1",
        "answers show the id the client sent"
    );
    assert_eq!(theirs["replayed"], false, "not the default channel's order");
    assert_ne!(codes_of(&mine), codes_of(&theirs), "two orders, two codes");

    // Each channel sees its own order, replays its own, and cannot touch the other's.
    let (status, again) =
        post_as(&gw, &token, "/v1/skus/s/claims", json!({"order_id": "o-1"})).await;
    assert_eq!((status, &again["replayed"]), (StatusCode::OK, &json!(true)));
    assert_eq!(codes_of(&again), codes_of(&theirs));
    let (status, seen) = get_as(&gw, &token, "/v1/skus/s/claims/o-1").await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(codes_of(&seen), codes_of(&theirs));
    let (status, _) = post_as(
        &gw,
        &token,
        "/v1/skus/s/claims",
        json!({"order_id": "o-2", "hold_ms": 60_000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = gw
        .merchant_post("/v1/skus/s/claims/o-2/release", json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "another channel's hold: {body}"
    );
    assert_eq!(body["error"]["message"], "order o-2 not found");
    assert_eq!(gw.counts("s").await["held"], 1, "the hold stands");

    // The ledger knows which channel made each order.
    let key_id = theirs["keys"][0]["key_id"].as_str().expect("key id");
    let trail = eventually(
        Duration::from_secs(10),
        "the ledger has the channel's claim",
        || async {
            let (status, body, _) = admin_get(&gw, &format!("/v1/keys/{key_id}/events")).await;
            (status, body)
        },
        |(_, body)| body["events"].as_array().is_some_and(|e| !e.is_empty()),
    )
    .await;
    assert_eq!(
        trail.1["events"][0]["order_id"], "shop-b/o-1",
        "{}",
        trail.1
    );
    gw.stop().await;
}

#[tokio::test]
async fn tokens_rotate_without_downtime_and_revoked_ones_stop_at_once() {
    let gw = TestGateway::embedded().await;
    gw.stock("s", &["CODE1", "CODE2", "CODE3", "CODE4"]).await;
    put_channel(&gw, "shop-b", json!({})).await;
    let (old, old_id) = new_token(&gw, "shop-b").await;
    let (new, _) = new_token(&gw, "shop-b").await;
    for (i, token) in [&old, &new].into_iter().enumerate() {
        let (status, body) = post_as(
            &gw,
            token,
            "/v1/skus/s/claims",
            json!({"order_id": format!("r-{i}")}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "both tokens are live: {body}");
    }
    let (status, revoked) = gw
        .admin_post(
            &format!("/v1/channels/shop-b/tokens/{old_id}/revoke"),
            json!({"by": "alice"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    let (status, body) = post_as(&gw, &old, "/v1/skus/s/claims", json!({"order_id": "r-9"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = post_as(&gw, &new, "/v1/skus/s/claims", json!({"order_id": "r-9"})).await;
    assert_eq!(status, StatusCode::OK, "the new token still works");
    // Revoking twice changes nothing; an unknown token is 404.
    let (status, again) = gw
        .admin_post(
            &format!("/v1/channels/shop-b/tokens/{old_id}/revoke"),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, &again["revoked_at"]),
        (StatusCode::OK, &revoked["revoked_at"])
    );
    let (status, _) = gw
        .admin_post("/v1/channels/shop-b/tokens/tok-nope/revoke", json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The listing shows ids and labels, never a token; the history names who did what.
    let (_, listed, _) = admin_get(&gw, "/v1/channels/shop-b").await;
    assert_eq!(
        listed["tokens"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    let text = listed.to_string();
    assert!(!text.contains(&old) && !text.contains(&new), "{text}");
    let (_, history, _) = admin_get(&gw, "/v1/channels/shop-b/events").await;
    let kinds: Vec<&str> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["token_revoked", "token_added", "token_added", "created"]
    );
    assert_eq!(history["events"][0]["by"], "alice");
    gw.stop().await;
}

#[tokio::test]
async fn a_channel_sells_only_the_skus_it_lists_within_its_own_bucket() {
    let gw = TestGateway::embedded().await;
    gw.stock("a", &["A1", "A2"]).await;
    gw.stock("b", &["B1", "B2"]).await;
    let (status, body) = put_channel(
        &gw,
        "market",
        json!({"skus": ["a"], "limits": {"per_second": 1, "burst": 3}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (token, _) = new_token(&gw, "market").await;

    let (status, body) =
        post_as(&gw, &token, "/v1/skus/b/claims", json!({"order_id": "m-1"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "ERR_FORBIDDEN");
    let (status, _) = get_as(&gw, &token, "/v1/skus/b").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        gw.counts("b").await["available"],
        2,
        "nothing of b was sold"
    );
    let (status, _) = get_as(&gw, &token, "/v1/skus/a").await;
    assert_eq!(status, StatusCode::OK);

    // Its bucket of 3 is spent (two GETs and the refused claim); the merchant token's is
    // its own.
    let (status, body) =
        post_as(&gw, &token, "/v1/skus/a/claims", json!({"order_id": "m-2"})).await;
    let (status2, body2) =
        post_as(&gw, &token, "/v1/skus/a/claims", json!({"order_id": "m-3"})).await;
    assert!(
        [status, status2].contains(&StatusCode::TOO_MANY_REQUESTS),
        "{body} {body2}"
    );
    let (status, body) = gw.claim("a", json!({"order_id": "d-1"})).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the default channel is not limited by it: {body}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn channel_settings_and_names_are_checked() {
    let gw = TestGateway::embedded().await;
    for (name, settings) in [
        ("Shop", json!({})),
        ("shop", json!({"skus": ["a:b"]})),
        ("shop", json!({"pool": 3})),
        ("shop", json!({"limits": {"per_second": 0, "burst": 5}})),
        ("shop", json!({"breaker": {"error_ratio": 0}})),
        ("shop", json!({"breaker": {"open_ms": 1}})),
        ("shop", json!({"description": "two\nlines"})),
    ] {
        let (status, body) = put_channel(&gw, name, settings.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name} {settings}: {body}");
    }
    let (status, body) = gw.admin_post("/v1/channels/nobody/tokens", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, listed, _) = admin_get(&gw, "/v1/channels").await;
    assert_eq!((status, listed), (StatusCode::OK, json!({"channels": []})));
    // A channel token is no admin token, and the merchant token makes no channel.
    put_channel(&gw, "shop", json!({})).await;
    let (token, _) = new_token(&gw, "shop").await;
    for wrong in [token.as_str(), MERCHANT_TOKEN] {
        let (status, _, _) = send(
            gw.client
                .put(format!("{}/v1/channels/evil", gw.admin))
                .bearer_auth(wrong)
                .json(&json!({})),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    gw.stop().await;
}

/// One channel's broken integration trips its own breaker; the other channel's claims go
/// on, and the breaker closes once the bad stream stops.
#[tokio::test]
async fn a_failing_channel_is_shed_while_the_others_carry_on() {
    let gw = TestGateway::embedded().await;
    let codes: Vec<String> = (0..40).map(|i| format!("CODE{i:03}")).collect();
    let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
    gw.stock("s", &codes).await;
    let breaker = json!({"error_ratio": 0.5, "min_requests": 10, "window_ms": 60_000,
        "open_ms": 1000, "probes": 2});
    put_channel(&gw, "broken", json!({"breaker": breaker})).await;
    put_channel(&gw, "good", json!({"breaker": breaker})).await;
    let (broken, _) = new_token(&gw, "broken").await;
    let (good, _) = new_token(&gw, "good").await;

    let mut shed = None;
    for i in 0..40 {
        let (status, body, retry_after) = send(
            gw.client
                .post(format!("{}/v1/skus/s/claims/ghost-{i}/confirm", gw.public))
                .bearer_auth(&broken)
                .json(&json!({})),
        )
        .await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            shed = Some((i, body, retry_after));
            break;
        }
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        let (status, body) = post_as(
            &gw,
            &good,
            "/v1/skus/s/claims",
            json!({"order_id": format!("g-{i}")}),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "the good channel carries on: {body}"
        );
    }
    let (after, body, retry_after) = shed.expect("the broken channel's breaker opened");
    assert_eq!(after, 10, "opened once 10 requests were judged");
    assert_eq!(body["error"]["code"], "ERR_UNAVAILABLE", "{body}");
    assert_eq!(body["error"]["channel"], "broken");
    assert_eq!(body["error"]["breaker"], "open");
    assert_eq!(retry_after.as_deref(), Some("1"));
    // Shed even for a request that would succeed; the good channel is not.
    let (status, _) = post_as(
        &gw,
        &broken,
        "/v1/skus/s/claims",
        json!({"order_id": "b-1"}),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) = post_as(&gw, &good, "/v1/skus/s/claims", json!({"order_id": "g-x"})).await;
    assert_eq!(status, StatusCode::OK);
    let text = gw.metrics().await;
    assert_eq!(
        metric(
            &text,
            "kamigate_channel_breaker_state",
            &["channel=\"broken\""]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &text,
            "kamigate_channel_breaker_state",
            &["channel=\"good\""]
        ),
        Some(0.0)
    );

    // Once the bad stream stops, good probes close it.
    eventually(
        Duration::from_secs(20),
        "the broken channel's breaker lets probes through and closes",
        || async {
            let i = rand::random::<u32>();
            post_as(
                &gw,
                &broken,
                "/v1/skus/s/claims",
                json!({"order_id": format!("p-{i}")}),
            )
            .await
        },
        |(status, _)| *status == StatusCode::OK,
    )
    .await;
    let (status, body) = post_as(
        &gw,
        &broken,
        "/v1/skus/s/claims",
        json!({"order_id": "p-last"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let text = gw.metrics().await;
    assert_eq!(
        metric(
            &text,
            "kamigate_channel_breaker_state",
            &["channel=\"broken\""]
        ),
        Some(0.0),
        "closed after two good probes"
    );
    assert!(
        metric(
            &text,
            "kamigate_channel_breaker_changes_total",
            &["channel=\"broken\"", "to=\"closed\""]
        ) >= Some(1.0)
    );
    gw.stop().await;
}

/// Two gateways share Redis and a PostgreSQL ledger: a channel and its token made through
/// one authenticate on the other within `channel_refresh_ms`, and a revocation reaches it
/// as fast. Each channel's orders are its own on both.
#[tokio::test]
async fn channels_reach_every_gateway_sharing_the_ledger() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let redis = RedisServer::start().await;
    let start = || {
        let mut config: Config = config();
        config.redis_url = Some(redis.url());
        config.database_url = Some(db.url().to_owned());
        config.channel_refresh_ms = 100;
        TestGateway::start(config)
    };
    let one = start().await;
    let two = start().await;
    one.stock("s", &["CODE1", "CODE2"]).await;
    put_channel(&one, "shop-b", json!({})).await;
    let (token, token_id) = new_token(&one, "shop-b").await;

    let (status, on_two) = eventually(
        Duration::from_secs(10),
        "the other gateway accepts the new token",
        || {
            post_as(
                &two,
                &token,
                "/v1/skus/s/claims",
                json!({"order_id": "o-1"}),
            )
        },
        |(status, _)| *status == StatusCode::OK,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, on_one) = post_as(
        &one,
        &token,
        "/v1/skus/s/claims",
        json!({"order_id": "o-1"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        on_one["replayed"], true,
        "one order, whichever gateway answers"
    );
    assert_eq!(codes_of(&on_one), codes_of(&on_two));
    let (status, mine) = two.claim("s", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(
        codes_of(&mine),
        codes_of(&on_two),
        "the default channel's o-1 is another order"
    );

    one.admin_post(
        &format!("/v1/channels/shop-b/tokens/{token_id}/revoke"),
        json!({}),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the other gateway refuses the revoked token",
        || get_as(&two, &token, "/v1/skus/s"),
        |(status, _)| *status == StatusCode::UNAUTHORIZED,
    )
    .await;
    one.stop().await;
    two.stop().await;
}

async fn put_pool(gw: &TestGateway, sku: &str, channel: &str, body: Value) -> (StatusCode, Value) {
    let (status, body, _) = send(
        gw.client
            .put(format!("{}/v1/skus/{sku}/pools/{channel}", gw.admin))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body),
    )
    .await;
    (status, body)
}

async fn pools(gw: &TestGateway, sku: &str) -> Value {
    let (status, body, _) = admin_get(gw, &format!("/v1/skus/{sku}/pools")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Two channels, a pool each and a shared remainder, through the API; the pools survive
/// Redis losing its data (rebuilt from the ledger), and the ledger agrees with the engine.
#[tokio::test]
async fn two_channels_a_pool_each_and_a_shared_remainder_survive_an_engine_loss() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let redis = RedisServer::start().await;
    let mut config: Config = config();
    config.redis_url = Some(redis.url());
    config.database_url = Some(db.url().to_owned());
    let gw = TestGateway::start(config).await;
    let codes: Vec<String> = (0..10).map(|i| format!("CODE{i:03}")).collect();
    let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
    gw.stock("s", &codes).await;
    put_channel(&gw, "shop", json!({"own_pool_only": true})).await;
    put_channel(&gw, "market", json!({})).await;
    let (shop, _) = new_token(&gw, "shop").await;
    let (market, _) = new_token(&gw, "market").await;

    let (status, body) = put_pool(&gw, "s", "shop", json!({"count": 4, "reason": "launch"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = put_pool(&gw, "s", "market", json!({"share": 0.3})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["pools"], json!({"market": 3, "shop": 4}), "{body}");
    assert_eq!(body["shared"], 3);
    let (status, body) = put_pool(&gw, "s", "nobody", json!({"count": 1})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = put_pool(&gw, "s", "shop", json!({"count": 99})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "ERR_POOL_CONFLICT");

    for i in 0..2 {
        let (status, body) = post_as(
            &gw,
            &shop,
            "/v1/skus/s/claims",
            json!({"order_id": format!("s-{i}")}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, body) = post_as(
        &gw,
        &market,
        "/v1/skus/s/claims",
        json!({"order_id": "m-0", "quantity": 4}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "its pool of 3, then one shared: {body}"
    );
    // A hold of the shop's, still running when Redis loses everything.
    let (status, body) = post_as(
        &gw,
        &shop,
        "/v1/skus/s/claims",
        json!({"order_id": "s-h", "hold_ms": 600_000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let expected = json!({"available": 3, "shared": 2, "pools": {"shop": 1}});
    let ledger_caught_up = eventually(
        Duration::from_secs(10),
        "the ledger's pools agree with the engine's",
        || pools(&gw, "s"),
        |view| view["ledger"] == view["pools"],
    )
    .await;
    for field in ["available", "shared", "pools"] {
        assert_eq!(
            ledger_caught_up[field], expected[field],
            "{ledger_caught_up}"
        );
    }

    // Redis loses everything; the SKU is rebuilt from the ledger, its pools too.
    redis.cmd(&["FLUSHALL"]).await.expect("flushed");
    let rebuilt = eventually(
        Duration::from_secs(30),
        "the SKU is rebuilt with its pools",
        || async {
            let (status, body, _) = admin_get(&gw, "/v1/skus/s/pools").await;
            (status, body)
        },
        |(status, body)| *status == StatusCode::OK && body["available"] == 3,
    )
    .await;
    assert_eq!(rebuilt.1["pools"], json!({"shop": 1}), "{}", rebuilt.1);
    // The rebuilt hold gives its code back to the shop's pool, not the shared remainder.
    let (status, body) = post_as(&gw, &shop, "/v1/skus/s/claims/s-h/release", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let view = pools(&gw, "s").await;
    assert_eq!(view["pools"], json!({"shop": 2}), "{view}");
    assert_eq!(view["shared"], 2, "{view}");
    // The shop sells its two, never the shared ones; the market takes the shared two.
    for i in 2..4 {
        let (status, body) = post_as(
            &gw,
            &shop,
            "/v1/skus/s/claims",
            json!({"order_id": format!("s-{i}")}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, _) = post_as(&gw, &shop, "/v1/skus/s/claims", json!({"order_id": "s-9"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "the shop's pool is empty");
    let (status, body) = post_as(
        &gw,
        &market,
        "/v1/skus/s/claims",
        json!({"order_id": "m-1", "quantity": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = gw
        .admin_post(
            "/v1/skus/s/pool-moves",
            json!({"from": "shop", "to": "market", "count": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "nothing left to move: {body}");
    gw.stop().await;
}
