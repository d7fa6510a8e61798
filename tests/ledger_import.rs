//! Imports through the ledger, end to end over HTTP: formats, re-sent batches, pending
//! batches, interrupted uploads, and a restart that rebuilds the engine from the ledger.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::inventory::Inventory;
use reqwest::StatusCode;
use serde_json::json;
use support::clock::ManualClock;
use support::eventually::eventually;
use support::gateway::{config, TestGateway, ADMIN_TOKEN};

#[tokio::test]
async fn csv_and_ndjson_uploads_carry_expiry_and_uses() {
    // Now is 2026-01-01T00:00:00Z: codes already expired would be rejected at import.
    let clock = ManualClock::new();
    let engine = Arc::new(EmbeddedEngine::start().expect("engine"));
    let gw =
        TestGateway::with_inventory(config(), Inventory::with_clock(engine, clock.clock())).await;
    gw.put_sku("multi", json!({})).await;
    let csv = "id,Code,expires_at,max_uses\r\n\
               1,\"CSV-0001\",,\r\n\
               2,CSV-0002,2026-01-01T01:00:00Z,\r\n\
               3,CSV-0003,,3\r\n\
               4,\"bad,code\",,\r\n\
               5,CSV-0005,not-a-date,\r\n";
    let (status, report) = gw.upload("multi", "batch_id=c1", "text/csv", csv).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["accepted"], 3, "{report}");
    assert_eq!(report["rejected"], 2, "{report}");
    let ndjson =
        "{\"code\":\"ND-0001\"}\n{\"code\":5}\n{\"code\":\"ND-0002\",\"max_uses\":2}\nnot json\n";
    let (status, report) = gw
        .upload("multi", "batch_id=n1", "application/x-ndjson", ndjson)
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (report["accepted"].as_u64(), report["rejected"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(gw.counts("multi").await["available"], 5);

    // Sold while valid, the CSV code with an expiry cannot be redeemed once its time passed.
    let mut codes = Vec::new();
    for i in 0..5 {
        let (status, order) = gw
            .claim("multi", json!({"order_id": format!("o-{i}")}))
            .await;
        assert_eq!(status, StatusCode::OK, "{order}");
        codes.push(order["keys"][0]["code"].as_str().expect("code").to_owned());
    }
    clock.advance(2 * 3600 * 1000);
    let mut expired = 0;
    for code in codes {
        let (status, _) = gw.redeem(json!({"code": code, "redeemer": "u-1"})).await;
        if status == StatusCode::GONE {
            expired += 1;
        }
    }
    assert_eq!(expired, 1);

    // Unsold, a code past its time is never sold: the claim that comes upon it retires it.
    let (status, report) = gw
        .upload(
            "multi",
            "batch_id=c2",
            "text/csv",
            "code,expires_at\nLATE-0001,2026-01-01T04:00:00Z\nLATE-0002,\n",
        )
        .await;
    assert_eq!(
        (status, report["accepted"].as_u64()),
        (StatusCode::OK, Some(2))
    );
    clock.advance(3 * 3600 * 1000);
    let (status, order) = gw.claim("multi", json!({"order_id": "o-5"})).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["keys"][0]["code"], "LATE0002");
    let (status, _) = gw.claim("multi", json!({"order_id": "o-6"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "sold out");
    assert_eq!(gw.counts("multi").await["void"], 1, "retired, and counted");
    gw.stop().await;
}

#[tokio::test]
async fn a_resent_batch_adds_nothing_and_answers_the_first_counts() {
    let gw = TestGateway::embedded().await;
    gw.put_sku("again", json!({})).await;
    let (_, first) = gw
        .upload("again", "batch_id=b1", "text/plain", "A1\nA2\nA2\n")
        .await;
    assert_eq!(
        (first["accepted"].as_u64(), first["duplicate"].as_u64()),
        (Some(2), Some(1))
    );
    let (status, second) = gw
        .upload("again", "batch_id=b1", "text/plain", "A1\nA2\nA3\n")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(second["replayed"], true);
    assert_eq!(second["accepted"], 2);
    assert_eq!(gw.counts("again").await["available"], 2, "A3 was not added");
    let (_, other) = gw
        .upload("again", "batch_id=b2", "text/plain", "A1\nA3\n")
        .await;
    assert_eq!(
        (other["accepted"].as_u64(), other["duplicate"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        other["rejected_lines"][0]["reason"],
        "duplicate: the SKU already has this code"
    );
    gw.stop().await;
}

#[tokio::test]
async fn pending_batches_are_not_for_sale_until_activated() {
    let gw = TestGateway::embedded().await;
    gw.put_sku("later", json!({})).await;
    let (_, report) = gw
        .upload(
            "later",
            "batch_id=p1&activate=false",
            "text/plain",
            "P1\nP2\n",
        )
        .await;
    assert_eq!(report["state"], "pending");
    let (status, body) = gw.claim("later", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = gw
        .admin_post("/v1/skus/later/batches/p1/activate", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["loaded"], 2);
    let (status, _) = gw.claim("later", json!({"order_id": "o-2"})).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "activation invalidated the sold-out memory"
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_interrupted_upload_leaves_nothing_behind() {
    let gw = TestGateway::embedded().await;
    gw.put_sku("cut", json!({})).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(2);
    let body = reqwest::Body::wrap_stream(futures_util::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    }));
    let send = tokio::spawn(
        gw.client
            .post(format!("{}/v1/skus/cut/batches?batch_id=x1", gw.admin))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "text/plain")
            .body(body)
            .send(),
    );
    let lines: String = (0..3000).map(|i| format!("CUT-{i:06}\n")).collect();
    tx.send(Ok(lines)).await.expect("sent");
    tx.send(Err(std::io::Error::other("client went away")))
        .await
        .expect("sent");
    drop(tx);
    let _ = send.await;
    // The aborted batch id can be used again, and the SKU has none of its codes.
    let (_, report) = eventually(
        Duration::from_secs(5),
        "the batch to be aborted, its id free again",
        || gw.upload("cut", "batch_id=x1", "text/plain", "CUT-000001\n"),
        |(status, report)| *status == StatusCode::OK && report["replayed"] == false,
    )
    .await;
    assert_eq!(report["accepted"], 1, "{report}");
    assert_eq!(gw.counts("cut").await["available"], 1);
    gw.stop().await;
}

#[tokio::test]
async fn unsupported_upload_types_are_refused() {
    let gw = TestGateway::embedded().await;
    gw.put_sku("t", json!({})).await;
    let (status, body) = gw.upload("t", "batch_id=z", "image/png", "\u{89}PNG").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = gw.upload("t", "activate=maybe", "text/plain", "A").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(gw.counts("t").await["available"], 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_restarted_embedded_gateway_is_rebuilt_from_the_ledger() {
    let data = tempfile::tempdir().expect("temp dir");
    let mut cfg = config();
    cfg.data_dir = data.path().to_owned();
    let gw = TestGateway::start(cfg.clone()).await;
    gw.put_sku("durable", json!({"max_uses": 2})).await;
    gw.import("durable", "D-0001\nD-0002\nD-0003\n").await;
    gw.stop().await;

    let gw = TestGateway::start(cfg).await;
    let counts = gw.counts("durable").await;
    assert_eq!(counts["available"], 3, "{counts}");
    let (status, order) = gw.claim("durable", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    let (status, body) = gw.put_sku("durable", json!({"max_uses": 2})).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the SKU exists after the restart: {body}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn blacklisted_codes_are_rejected_in_any_spelling() {
    let gw = TestGateway::embedded().await;
    let (status, body) = gw
        .put_sku("bl", json!({"blacklist": ["TEST-0000", "1234-5678"]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, report) = gw
        .upload(
            "bl",
            "batch_id=b1",
            "text/plain",
            "GOOD-0001\ntest 0000\n12345678\nGOOD-0002\n",
        )
        .await;
    assert_eq!(
        (report["accepted"].as_u64(), report["rejected"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(report["rejected_lines"][0]["line"], 2);
    assert_eq!(
        report["rejected_lines"][0]["reason"],
        "the code is on the SKU's blacklist"
    );
    assert!(
        !report.to_string().contains("TEST"),
        "the reason names no code"
    );
    gw.stop().await;
}
