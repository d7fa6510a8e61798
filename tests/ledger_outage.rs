//! The ledger's database stopped under load: with `durability = "engine"` claims go on, the
//! events queue in the engine's streams (`kamigate_events_in_flight` shows them), and once the
//! database is back the ledger catches up to zero drift with nothing lost.
//!
//! The test runs its own PostgreSQL server (initdb in a temp dir, as the `postgres` user) so
//! it can stop and start it without touching the shared one.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::eventually::eventually;
use support::gateway::{config, metric, TestGateway};
use support::postgres_server::Postgres;

async fn view(gw: &TestGateway, sku: &str) -> (StatusCode, Value) {
    gw.merchant_get(&format!("/v1/skus/{sku}")).await
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
