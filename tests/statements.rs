//! A channel's statement and reconciliation through the gateway, on the SQLite ledger and on
//! PostgreSQL: orders in every state, totals that match the ledger, nothing of another
//! channel, paging past one page, range boundaries, and the three kinds of difference.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use kamigate::config::Config;
use kamigate::http::statements::PAGE_ORDERS;
use pg_support::TestDatabase;
use support::eventually::eventually;
use support::gateway::{config, TestGateway, ADMIN_TOKEN};

#[path = "support/postgres.rs"]
mod pg_support;

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let res = req.send().await.expect("answered");
    let status = res.status();
    let bytes = res.bytes().await.expect("a whole body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn new_channel(gw: &TestGateway, name: &str) -> String {
    let (status, put) = send(
        gw.client
            .put(format!("{}/v1/channels/{name}", gw.admin))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{put}");
    let (status, made) = gw
        .admin_post(&format!("/v1/channels/{name}/tokens"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    made["token"].as_str().expect("token").to_owned()
}

async fn post_as(gw: &TestGateway, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
    send(
        gw.client
            .post(format!("{}{path}", gw.public))
            .bearer_auth(token)
            .json(&body),
    )
    .await
}

/// The admin's statement of `channel` with the query `query`.
async fn statement(gw: &TestGateway, channel: &str, query: &str) -> (StatusCode, Value) {
    send(
        gw.client
            .get(format!(
                "{}/v1/channels/{channel}/statement{query}",
                gw.admin
            ))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await
}

async fn reconcile(gw: &TestGateway, channel: &str, body: Value) -> (StatusCode, Value) {
    gw.admin_post(&format!("/v1/channels/{channel}/reconcile"), body)
        .await
}

/// A statement's orders by order id: (SKU, state, number of keys).
fn orders_of(statement: &Value) -> BTreeMap<String, (String, String, usize)> {
    statement["orders"]
        .as_array()
        .expect("orders")
        .iter()
        .map(|o| {
            (
                o["order_id"].as_str().expect("order id").to_owned(),
                (
                    o["sku"].as_str().expect("sku").to_owned(),
                    o["state"].as_str().expect("state").to_owned(),
                    o["key_ids"].as_array().expect("key ids").len(),
                ),
            )
        })
        .collect()
}

/// The ledger's counts of a SKU once nothing is in flight.
async fn settled_ledger(gw: &TestGateway, sku: &str) -> Value {
    let path = format!("/v1/skus/{sku}");
    let (_, view) = eventually(
        Duration::from_secs(20),
        "the ledger caught up with the engine",
        || gw.merchant_get(&path),
        |(status, view)| *status == StatusCode::OK && view["in_flight"] == 0,
    )
    .await;
    view["ledger"].clone()
}

/// Waits until the clock has moved past this millisecond, so the next order is created
/// later than the last one.
async fn next_millisecond() {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    };
    let start = now();
    eventually(
        Duration::from_secs(5),
        "the clock moved on",
        || async { now() },
        |t| *t > start,
    )
    .await;
}

fn codes(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:06}")).collect()
}

async fn stock(gw: &TestGateway, sku: &str, codes: &[String]) {
    let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
    gw.stock(sku, &codes).await;
}

/// Two channels with orders in every state; checks statements and reconciliation.
async fn statements_and_reconciliation(config: Config) {
    let gw = TestGateway::start(config).await;
    stock(&gw, "gift", &codes(20, "GIFT")).await;
    stock(&gw, "card", &codes(10, "CARD")).await;
    let shop = new_channel(&gw, "shop").await;
    let market = new_channel(&gw, "market").await;

    let claim = |token: &str, sku: &str, body: Value| {
        let (token, sku) = (token.to_owned(), sku.to_owned());
        let gw = &gw;
        async move {
            let (status, order) =
                post_as(gw, &token, &format!("/v1/skus/{sku}/claims"), body).await;
            assert_eq!(status, StatusCode::OK, "{order}");
            next_millisecond().await;
            order
        }
    };
    // shop, on `gift` alone, so the SKU's ledger counts are the channel's.
    claim(
        &shop,
        "gift",
        json!({"order_id": "o-claimed", "quantity": 2}),
    )
    .await;
    let redeemed = claim(&shop, "gift", json!({"order_id": "o-redeemed"})).await;
    claim(
        &shop,
        "gift",
        json!({"order_id": "o-held", "hold_ms": 600_000, "quantity": 3}),
    )
    .await;
    claim(
        &shop,
        "gift",
        json!({"order_id": "o-released", "hold_ms": 600_000}),
    )
    .await;
    let (status, _) = post_as(
        &gw,
        &shop,
        "/v1/skus/gift/claims/o-released/release",
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    claim(
        &shop,
        "gift",
        json!({"order_id": "o-confirmed", "hold_ms": 600_000}),
    )
    .await;
    let (status, _) = post_as(
        &gw,
        &shop,
        "/v1/skus/gift/claims/o-confirmed/confirm",
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    claim(
        &shop,
        "gift",
        json!({"order_id": "o-expired", "hold_ms": 1}),
    )
    .await;
    let code = redeemed["keys"][0]["code"].as_str().expect("code");
    let (status, answer) = gw.redeem(json!({"code": code, "redeemer": "u-1"})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // market uses the same order ids, on another SKU.
    claim(&market, "card", json!({"order_id": "o-claimed"})).await;
    claim(
        &market,
        "card",
        json!({"order_id": "o-only-market", "hold_ms": 600_000}),
    )
    .await;

    let expected: BTreeMap<String, (String, String, usize)> = [
        ("o-claimed", "claimed", 2),
        ("o-redeemed", "redeemed", 1),
        ("o-held", "held", 3),
        ("o-released", "released", 1),
        ("o-confirmed", "claimed", 1),
        ("o-expired", "expired", 1),
    ]
    .into_iter()
    .map(|(id, state, keys)| (id.to_owned(), ("gift".to_owned(), state.to_owned(), keys)))
    .collect();
    let (_, whole) = eventually(
        Duration::from_secs(20),
        "the statement shows every order in its state",
        || statement(&gw, "shop", ""),
        |(status, s)| *status == StatusCode::OK && orders_of(s) == expected,
    )
    .await;
    assert_eq!(orders_of(&whole), expected);
    let ledger = settled_ledger(&gw, "gift").await;
    let (status, whole) = statement(&gw, "shop", "").await;
    assert_eq!(status, StatusCode::OK, "{whole}");

    // The totals add up to the ledger's counts for the channel's SKU.
    let totals = &whole["totals"];
    let by = |state: &str, what: &str| totals["by_state"][state][what].as_u64().expect("count");
    assert_eq!(totals["orders"], 6, "{whole}");
    assert_eq!(totals["keys"], 9, "{whole}");
    assert_eq!(
        by("held", "keys"),
        ledger["held"].as_u64().expect("held"),
        "{ledger}"
    );
    assert_eq!(
        by("claimed", "keys") + by("redeemed", "keys"),
        ledger["claimed"].as_u64().expect("claimed") + ledger["redeemed"].as_u64().expect("n"),
        "{whole} {ledger}"
    );
    assert_eq!(
        totals["redeemed_keys"], ledger["redeemed"],
        "{whole} {ledger}"
    );
    let orders_by_state: u64 = ["held", "claimed", "redeemed", "released", "expired"]
        .iter()
        .map(|s| by(s, "orders"))
        .sum();
    assert_eq!(orders_by_state, 6);
    assert_eq!((by("released", "orders"), by("expired", "orders")), (1, 1));
    let held = whole["orders"]
        .as_array()
        .expect("orders")
        .iter()
        .find(|o| o["order_id"] == "o-held")
        .expect("held order");
    assert!(
        held["key_ids"]
            .as_array()
            .expect("key ids")
            .iter()
            .all(|k| k.as_str().is_some_and(|k| k.starts_with("gift."))),
        "{held}"
    );

    // The other channel's orders never appear; its own statement has only its own.
    let (status, theirs) = statement(&gw, "market", "").await;
    assert_eq!(status, StatusCode::OK, "{theirs}");
    let theirs = orders_of(&theirs);
    assert_eq!(
        theirs.keys().collect::<Vec<_>>(),
        ["o-claimed", "o-only-market"]
    );
    assert!(theirs.values().all(|(sku, _, _)| sku == "card"));
    let (status, default) = statement(&gw, "default", "").await;
    assert_eq!(status, StatusCode::OK, "{default}");
    assert_eq!(default["totals"]["orders"], 0, "{default}");

    // A channel's token reads its own statement on the public listener, and no other.
    let (status, own) = send(
        gw.client
            .get(format!("{}/v1/channels/shop/statement", gw.public))
            .bearer_auth(&shop),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{own}");
    assert_eq!(orders_of(&own), expected);
    let (status, refused) = send(
        gw.client
            .get(format!("{}/v1/channels/shop/statement", gw.public))
            .bearer_auth(&market),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{refused}");
    let (status, refused) = post_as(
        &gw,
        &market,
        "/v1/channels/shop/reconcile",
        json!({"orders": []}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{refused}");

    // Range boundaries: `from` is included, `to` is not.
    let created: Vec<(String, String)> = whole["orders"]
        .as_array()
        .expect("orders")
        .iter()
        .map(|o| {
            (
                o["created_at"].as_str().expect("created").to_owned(),
                o["order_id"].as_str().expect("id").to_owned(),
            )
        })
        .collect();
    let (from, to) = (&created[1].0, &created[4].0);
    let (status, part) = statement(&gw, "shop", &format!("?from={from}&to={to}")).await;
    assert_eq!(status, StatusCode::OK, "{part}");
    let inside: BTreeSet<&String> = created[1..4].iter().map(|(_, id)| id).collect();
    assert_eq!(
        orders_of(&part).keys().collect::<BTreeSet<_>>(),
        inside,
        "{part}"
    );
    assert_eq!(part["from"].as_str(), Some(from.as_str()));

    // Reconcile: the channel's books lack o-held and list o-ghost, which we never issued.
    let mut books: Vec<Value> = expected
        .iter()
        .filter(|(id, _)| *id != "o-held")
        .map(|(id, (sku, state, _))| json!({"order_id": id, "sku": sku, "state": state}))
        .collect();
    books.push(json!({"order_id": "o-ghost", "state": "claimed"}));
    let (status, diff) = reconcile(&gw, "shop", json!({"orders": books})).await;
    assert_eq!(status, StatusCode::OK, "{diff}");
    assert_eq!(
        diff["missing_here"],
        json!([{"order_id": "o-ghost", "sku": null}]),
        "{diff}"
    );
    let there: Vec<&Value> = diff["missing_there"]
        .as_array()
        .expect("list")
        .iter()
        .collect();
    assert_eq!(there.len(), 1, "{diff}");
    assert_eq!(
        (&there[0]["order_id"], &there[0]["state"]),
        (&json!("o-held"), &json!("held"))
    );
    assert_eq!(diff["state_differs"], json!([]), "{diff}");
    assert_eq!(
        diff["counts"],
        json!({"missing_here": 1, "missing_there": 1, "state_differs": 0})
    );

    // A state that differs, and orders without a SKU or state.
    let books = json!({"orders": [
        {"order_id": "o-claimed", "state": "redeemed"},
        {"order_id": "o-redeemed", "sku": "gift"},
        {"order_id": "o-held", "state": "held"},
        {"order_id": "o-released", "state": "released"},
        {"order_id": "o-confirmed", "state": "claimed"},
        {"order_id": "o-expired", "state": "expired"},
    ]});
    let (status, diff) = reconcile(&gw, "shop", books).await;
    assert_eq!(status, StatusCode::OK, "{diff}");
    assert_eq!(
        diff["state_differs"],
        json!([{"order_id": "o-claimed", "sku": "gift", "ours": "claimed", "theirs": "redeemed"}]),
        "{diff}"
    );
    assert_eq!(diff["missing_here"], json!([]));
    assert_eq!(diff["missing_there"], json!([]));

    // Only orders issued in the range are expected on the channel's list.
    let range = json!({"orders": [], "from": from, "to": to});
    let (status, diff) = reconcile(&gw, "shop", range).await;
    assert_eq!(status, StatusCode::OK, "{diff}");
    let there: BTreeSet<&str> = diff["missing_there"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|o| o["order_id"].as_str())
        .collect();
    assert_eq!(there, inside.iter().map(|s| s.as_str()).collect());

    // Bad input is refused and changes nothing.
    for (channel, body) in [
        ("shop", json!({"orders": [{"order_id": "a/b"}]})),
        (
            "shop",
            json!({"orders": [{"order_id": "o-1", "state": "lost"}]}),
        ),
        (
            "shop",
            json!({"orders": [{"order_id": "o-1"}, {"order_id": "o-1", "sku": "gift"}]}),
        ),
        ("shop", json!({"orders": [{"order_id": "o-1", "extra": 1}]})),
        ("shop", json!({"orders": "o-1"})),
        ("shop", json!({"orders": [], "from": "yesterday"})),
        (
            "shop",
            json!({"orders": [], "from": "2030-01-02T00:00:00Z", "to": "2030-01-01T00:00:00Z"}),
        ),
        ("Shop", json!({"orders": []})),
    ] {
        let (status, body) = reconcile(&gw, channel, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
    let too_many: Vec<Value> = (0..10_001)
        .map(|i| json!({"order_id": format!("x-{i}")}))
        .collect();
    let (status, body) = reconcile(&gw, "shop", json!({"orders": too_many})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    for query in ["?from=soon", "?to=2030-13-01T00:00:00Z"] {
        let (status, body) = statement(&gw, "shop", query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
    }
    let (status, body) = statement(&gw, "nobody", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = reconcile(&gw, "nobody", json!({"orders": []})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(settled_ledger(&gw, "gift").await, ledger, "nothing changed");
    gw.stop().await;
}

/// More orders than one page: every one listed once, in creation order, totals whole.
async fn statements_page_through_many_orders(config: Config) {
    let gw = TestGateway::start(config).await;
    let n = PAGE_ORDERS as usize * 2 + 7;
    stock(&gw, "bulk", &codes(n, "BULK")).await;
    let ids: Vec<String> = (0..n).map(|i| format!("b-{i:05}")).collect();
    for chunk in ids.chunks(400) {
        let claims: Vec<Value> = chunk.iter().map(|id| json!({"order_id": id})).collect();
        let (status, answer) = gw
            .merchant_post("/v1/skus/bulk/claims/batch", json!({"claims": claims}))
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    settled_ledger(&gw, "bulk").await;
    let (status, whole) = statement(&gw, "default", "").await;
    assert_eq!(status, StatusCode::OK);
    let listed: Vec<&str> = whole["orders"]
        .as_array()
        .expect("orders")
        .iter()
        .filter_map(|o| o["order_id"].as_str())
        .collect();
    let distinct: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!((listed.len(), distinct.len()), (n, n));
    assert_eq!(whole["totals"]["orders"], n);
    assert_eq!(whole["totals"]["by_state"]["claimed"]["keys"], n);
    let created: Vec<&str> = whole["orders"]
        .as_array()
        .expect("orders")
        .iter()
        .filter_map(|o| o["created_at"].as_str())
        .collect();
    assert!(
        created.windows(2).all(|w| w[0] <= w[1]),
        "in creation order"
    );

    // Reconciling the whole list finds nothing to report.
    let books: Vec<Value> = ids
        .iter()
        .map(|id| json!({"order_id": id, "state": "claimed"}))
        .collect();
    let (status, diff) = reconcile(&gw, "default", json!({"orders": books})).await;
    assert_eq!(status, StatusCode::OK, "{diff}");
    assert_eq!(
        diff["counts"],
        json!({"missing_here": 0, "missing_there": 0, "state_differs": 0})
    );
    assert_eq!(diff["issued"], n);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_and_reconciliation_on_sqlite() {
    statements_and_reconciliation(config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_page_through_many_orders_on_sqlite() {
    statements_page_through_many_orders(config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_and_reconciliation_on_postgres() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let mut config = config();
    config.database_url = Some(db.url().to_owned());
    statements_and_reconciliation(config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_page_through_many_orders_on_postgres() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let mut config = config();
    config.database_url = Some(db.url().to_owned());
    statements_page_through_many_orders(config).await;
}
