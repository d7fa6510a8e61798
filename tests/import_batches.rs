//! Import batches as a merchant meets them, over HTTP on both ledgers (SQLite, and PostgreSQL
//! when it runs; see `support/postgres.rs`) and through `kamigate import`:
//!
//! - a second upload of a batch id while the first is still running is refused with `409
//!   ERR_BATCH_IN_PROGRESS`, never answered with counts that dropped its content;
//! - a file that fails before any row is read is `ERR_BAD_REQUEST` and leaves its batch id
//!   free: activating it finds no batch, as for a batch id never used;
//! - activating a batch while its upload is still running is refused with `409
//!   ERR_BATCH_IN_PROGRESS`, and the upload goes on and finishes as if it had not been asked;
//! - a CSV sent as `text/plain` imports its rows, not its header;
//! - codes already expired are rejected with the reason;
//! - an upload larger than a ledger transaction reports each repeated code on its own line,
//!   whichever transaction holds the first one, and numbers its keys in file order.

mod support;

#[path = "support/postgres.rs"]
mod pg_support;

use std::sync::Arc;
use std::time::Duration;

use kamigate::commands::{self, CommandError};
use kamigate::config::Config;
use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::inventory::import::CHUNK_ROWS;
use kamigate::inventory::Inventory;
use kamigate::sku::SkuConfig;
use pg_support::TestDatabase;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::clock::ManualClock;
use support::eventually::eventually;
use support::gateway::{config, TestGateway, ADMIN_TOKEN};
use tempfile::TempDir;

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A gateway over a ledger of its own.
struct Env {
    gw: TestGateway,
    _dir: TempDir,
    // Dropped last: the database outlives the gateway's pools.
    _pg: Option<TestDatabase>,
}

impl Env {
    /// `None` when PostgreSQL is asked for and not running (outside CI). With `clock`, the
    /// gateway's "now" is the test's.
    async fn start(backend: Backend, clock: Option<&ManualClock>) -> Option<Env> {
        let dir = TempDir::new().expect("temp dir");
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(TestDatabase::create().await?),
        };
        let mut cfg = config();
        cfg.data_dir = dir.path().to_owned();
        cfg.database_url = pg.as_ref().map(|pg| pg.url().to_owned());
        let gw = match clock {
            None => TestGateway::start(cfg).await,
            Some(clock) => {
                let engine = Arc::new(EmbeddedEngine::start().expect("embedded engine starts"));
                TestGateway::with_inventory(cfg, Inventory::with_clock(engine, clock.clock())).await
            }
        };
        Some(Env {
            gw,
            _dir: dir,
            _pg: pg,
        })
    }

    async fn upload(
        &self,
        sku: &str,
        batch_id: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let query = format!("batch_id={batch_id}");
        self.gw.upload(sku, &query, content_type, body).await
    }

    fn batches_url(&self, sku: &str, batch_id: &str) -> String {
        format!(
            "{}/v1/skus/{sku}/batches?batch_id={batch_id}",
            self.gw.admin
        )
    }

    async fn stop(self) {
        self.gw.stop().await;
    }
}

/// Runs each named `async fn(Backend)` as a test on SQLite and on PostgreSQL.
macro_rules! on_both_ledgers {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_both_ledgers!(
    a_second_upload_of_a_running_batch_is_refused_not_replayed,
    a_file_refused_before_any_row_leaves_its_batch_id_free,
    activating_a_refused_or_interrupted_upload_finds_no_batch,
    activating_a_batch_while_its_upload_runs_is_refused_and_the_upload_finishes,
    a_csv_sent_as_text_plain_imports_its_rows_not_its_header,
    codes_already_expired_are_rejected_with_the_reason,
    a_large_upload_reports_every_repeat_and_numbers_keys_in_file_order,
);

async fn a_second_upload_of_a_running_batch_is_refused_not_replayed(backend: Backend) {
    let Some(env) = Env::start(backend, None).await else {
        return;
    };
    env.gw.put_sku("conc", json!({})).await;

    // The first upload starts and keeps its body open.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    }));
    let first = tokio::spawn(
        env.gw
            .client
            .post(env.batches_url("conc", "b1"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "text/plain")
            .body(body)
            .send(),
    );
    tx.send(Ok("A-0001\nA-0002\nA-0003\n".into()))
        .await
        .expect("sent");
    wait_for_batch(&env, "conc", "b1").await;

    // A second upload of the same batch id meanwhile: refused, and it says why.
    let (status, body) = env
        .upload("conc", "b1", "text/plain", "B-0001\nB-0002\n")
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "ERR_BATCH_IN_PROGRESS", "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("b1"), "{message}");
    assert!(body["error"]["hint"].is_string(), "{body}");

    // The first upload is untouched by it and completes.
    tx.send(Ok("A-0004\n".into())).await.expect("sent");
    drop(tx);
    let res = first.await.expect("joined").expect("answered");
    assert_eq!(res.status(), StatusCode::OK);
    let report: Value = res.json().await.expect("json");
    assert_eq!(
        (report["accepted"].as_u64(), report["replayed"].as_bool()),
        (Some(4), Some(false)),
        "{report}"
    );

    // After it finished, the batch id replays its counts and adds nothing, as before.
    let (status, again) = env.upload("conc", "b1", "text/plain", "C-0001\n").await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        (again["replayed"].as_bool(), again["accepted"].as_u64()),
        (Some(true), Some(4)),
        "{again}"
    );
    assert_eq!(env.gw.counts("conc").await["available"], 4);
    env.stop().await;
}

async fn a_file_refused_before_any_row_leaves_its_batch_id_free(backend: Backend) {
    let Some(env) = Env::start(backend, None).await else {
        return;
    };
    env.gw.put_sku("hdr", json!({})).await;

    // A CSV without a `code` column: nothing is imported, and the merchant is told why.
    let (status, body) = env
        .upload(
            "hdr",
            "h1",
            "text/csv",
            "id,serial\n1,HDR-0001\n2,HDR-0002\n",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "ERR_BAD_REQUEST", "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("no `code` column"), "{message}");
    assert!(!message.contains("HDR"), "no code is quoted: {message}");
    let (status, report) = env
        .upload("hdr", "h1", "text/csv", "code\nHDR-0001\nHDR-0002\n")
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (report["replayed"].as_bool(), report["accepted"].as_u64()),
        (Some(false), Some(2)),
        "the batch id imports normally: {report}"
    );

    // Found only when the upload ends: a lone header without a newline.
    let (status, body) = env.upload("hdr", "h2", "text/csv", "serial").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (_, report) = env
        .upload("hdr", "h2", "text/csv", "code\nHDR-0003\n")
        .await;
    assert_eq!(
        (report["replayed"].as_bool(), report["accepted"].as_u64()),
        (Some(false), Some(1)),
        "{report}"
    );

    // An unsupported content type.
    let (status, body) = env
        .upload("hdr", "h3", "application/json", "[\"HDR-0004\"]")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "ERR_BAD_REQUEST", "{body}");
    let (_, report) = env.upload("hdr", "h3", "text/plain", "HDR-0004\n").await;
    assert_eq!(
        (report["replayed"].as_bool(), report["accepted"].as_u64()),
        (Some(false), Some(1)),
        "{report}"
    );
    assert_eq!(env.gw.counts("hdr").await["available"], 4);
    env.stop().await;
}

async fn activating_a_refused_or_interrupted_upload_finds_no_batch(backend: Backend) {
    let Some(env) = Env::start(backend, None).await else {
        return;
    };
    env.gw.put_sku("gone", json!({})).await;
    let activate = |batch_id: &str| {
        let path = format!("/v1/skus/gone/batches/{batch_id}/activate");
        let gw = &env.gw;
        async move { gw.admin_post(&path, json!({})).await }
    };

    // A batch id never used: the answer every unused batch id gets.
    let (status, never) = activate("never-used").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{never}");
    assert_eq!(never["error"]["code"], "ERR_NOT_FOUND", "{never}");

    // A CSV without a `code` column is refused before any row: its batch id stays unused.
    let (status, body) = env
        .upload("gone", "b-refused", "text/csv", "expires_at\nX\n")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = activate("b-refused").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "ERR_NOT_FOUND", "{body}");
    assert_eq!(
        body["error"]["message"], "batch b-refused of SKU gone not found",
        "as for a batch id never used: {body}"
    );

    // An upload cut off mid-body leaves nothing behind either.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    }));
    let cut = tokio::spawn(
        env.gw
            .client
            .post(env.batches_url("gone", "b-cut"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "text/plain")
            .body(body)
            .send(),
    );
    tx.send(Ok("CUT-0001\nCUT-0002\n".into()))
        .await
        .expect("sent");
    wait_for_batch(&env, "gone", "b-cut").await;
    tx.send(Err(std::io::Error::other("the client gave up")))
        .await
        .expect("sent");
    drop(tx);
    // The client sees its own upload fail; the gateway aborts the batch.
    let _ = cut.await.expect("joined");
    let ledger = env.gw.gateway.app.ledger.clone();
    eventually(
        Duration::from_secs(10),
        "the interrupted upload to be aborted",
        || async {
            ledger
                .get_batch("gone", "b-cut")
                .await
                .expect("ledger answers")
        },
        |batch| batch.as_ref().map(|b| b.state.as_str()) == Some("aborted"),
    )
    .await;
    let (status, body) = activate("b-cut").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "ERR_NOT_FOUND", "{body}");

    // Both batch ids import afresh, and only what was imported is for sale.
    for batch_id in ["b-refused", "b-cut"] {
        let (status, report) = env
            .upload("gone", batch_id, "text/plain", format!("{batch_id}-1\n"))
            .await;
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(report["replayed"], false, "{report}");
    }
    assert_eq!(env.gw.counts("gone").await["available"], 2);
    env.stop().await;
}

async fn activating_a_batch_while_its_upload_runs_is_refused_and_the_upload_finishes(
    backend: Backend,
) {
    let Some(env) = Env::start(backend, None).await else {
        return;
    };
    env.gw.put_sku("race", json!({})).await;

    // The upload starts and keeps its body open.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    }));
    let upload = tokio::spawn(
        env.gw
            .client
            .post(env.batches_url("race", "b-running"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "text/plain")
            .body(body)
            .send(),
    );
    tx.send(Ok("RUN-0001\nRUN-0002\n".into()))
        .await
        .expect("sent");
    wait_for_batch(&env, "race", "b-running").await;

    // Activation meanwhile: refused, and it says why; nothing goes on sale.
    let path = "/v1/skus/race/batches/b-running/activate";
    let (status, body) = env.gw.admin_post(path, json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "ERR_BATCH_IN_PROGRESS", "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("b-running"), "{message}");
    assert!(body["error"]["hint"].is_string(), "{body}");
    assert_eq!(env.gw.counts("race").await["available"], 0);

    // The upload is untouched by it: more rows, then its end, and its own report.
    tx.send(Ok("RUN-0003\n".into())).await.expect("sent");
    drop(tx);
    let res = upload.await.expect("joined").expect("answered");
    assert_eq!(res.status(), StatusCode::OK);
    let report: Value = res.json().await.expect("json");
    assert_eq!(
        (
            report["accepted"].as_u64(),
            report["state"].as_str(),
            report["replayed"].as_bool()
        ),
        (Some(3), Some("active"), Some(false)),
        "{report}"
    );
    assert_eq!(env.gw.counts("race").await["available"], 3);

    // Once it finished, activation is the no-op it is for any active batch, and the batch
    // id replays the upload's counts.
    let (status, body) = env.gw.admin_post(path, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "active", "{body}");
    let (status, again) = env.upload("race", "b-running", "text/plain", "X-1\n").await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        (again["replayed"].as_bool(), again["accepted"].as_u64()),
        (Some(true), Some(3)),
        "{again}"
    );
    assert_eq!(env.gw.counts("race").await["available"], 3);
    env.stop().await;
}

/// Waits until the ledger has batch `batch_id` of `sku`: its upload has begun.
async fn wait_for_batch(env: &Env, sku: &str, batch_id: &str) {
    let ledger = env.gw.gateway.app.ledger.clone();
    eventually(
        Duration::from_secs(10),
        &format!("the upload of {batch_id} to begin"),
        || async {
            ledger
                .get_batch(sku, batch_id)
                .await
                .expect("ledger answers")
        },
        Option::is_some,
    )
    .await;
}

async fn a_csv_sent_as_text_plain_imports_its_rows_not_its_header(backend: Backend) {
    let Some(env) = Env::start(backend, None).await else {
        return;
    };
    env.gw.put_sku("txt", json!({})).await;
    let (status, report) = env
        .upload(
            "txt",
            "t1",
            "text/plain",
            "code\r\nTXT-0001\r\nTXT-0002\r\n",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (report["accepted"].as_u64(), report["rejected"].as_u64()),
        (Some(2), Some(0)),
        "{report}"
    );
    let (status, order) = env
        .gw
        .claim("txt", json!({"order_id": "o-1", "quantity": 2}))
        .await;
    assert_eq!(status, StatusCode::OK, "{order}");
    let mut codes: Vec<&str> = order["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["code"].as_str())
        .collect();
    codes.sort_unstable();
    assert_eq!(codes, ["TXT0001", "TXT0002"], "no code named CODE");
    let (status, body) = env.gw.claim("txt", json!({"order_id": "o-2"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "sold out: {body}");

    // Its other columns count too, as they would in text/csv.
    let (_, report) = env
        .upload(
            "txt",
            "t2",
            "text/plain",
            "\u{feff}\"Code\", expires_at\nTXT-0003,2099-01-01T00:00:00Z\n",
        )
        .await;
    assert_eq!(
        (report["accepted"].as_u64(), report["rejected"].as_u64()),
        (Some(1), Some(0)),
        "{report}"
    );
    let key = env
        .gw
        .gateway
        .app
        .ledger
        .get_key("txt.3")
        .await
        .expect("ledger answers")
        .expect("imported");
    assert_eq!(key.expires_at_ms, Some(4_070_908_800_000));

    // A plain list of codes is read as before.
    let (_, report) = env
        .upload("txt", "t3", "text/plain", "TXT-0004\nTXT-0005\n")
        .await;
    assert_eq!(report["accepted"], 2, "{report}");
    env.stop().await;
}

async fn codes_already_expired_are_rejected_with_the_reason(backend: Backend) {
    // Now is 2026-01-01T00:00:00Z.
    let clock = ManualClock::new();
    let Some(env) = Env::start(backend, Some(&clock)).await else {
        return;
    };
    env.gw.put_sku("exp", json!({})).await;
    let csv = "code,expires_at\n\
               EXP-0001,2025-12-31T23:59:59Z\n\
               EXP-0002,2026-01-01T00:00:00Z\n\
               EXP-0003,2026-01-01T00:00:01Z\n\
               EXP-0004,\n\
               EXP-0005,0\n";
    let (status, report) = env.upload("exp", "e1", "text/csv", csv).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (report["accepted"].as_u64(), report["rejected"].as_u64()),
        (Some(2), Some(3)),
        "{report}"
    );
    assert_eq!(
        report["rejected_lines"],
        json!([
            {"line": 2, "reason": "expired at 2025-12-31T23:59:59.000Z"},
            {"line": 3, "reason": "expired at 2026-01-01T00:00:00.000Z"},
            {"line": 6, "reason": "expired at 1970-01-01T00:00:00.000Z"},
        ])
    );
    let ndjson = "{\"code\":\"EXP-0006\",\"expires_at\":1767225599}\n\
                  {\"code\":\"EXP-0007\",\"expires_at\":\"2030-01-01T00:00:00Z\"}\n";
    let (_, report) = env
        .upload("exp", "e2", "application/x-ndjson", ndjson)
        .await;
    assert_eq!(
        (report["accepted"].as_u64(), report["rejected"].as_u64()),
        (Some(1), Some(1)),
        "{report}"
    );
    assert_eq!(
        report["rejected_lines"][0]["reason"],
        "expired at 2025-12-31T23:59:59.000Z"
    );
    assert_eq!(env.gw.counts("exp").await["available"], 3);
    env.stop().await;
}

async fn a_large_upload_reports_every_repeat_and_numbers_keys_in_file_order(backend: Backend) {
    let Some(env) = Env::start(backend, None).await else {
        return;
    };
    env.gw.put_sku("big", json!({})).await;
    let (status, report) = env.upload("big", "b0", "text/plain", "OLD-000001\n").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    // Two ledger transactions' worth of rows.
    let lines = CHUNK_ROWS + 2000;
    let in_second_chunk = CHUNK_ROWS + 500;
    let body: String = (1..=lines)
        .map(|line| match line {
            5 => "OLD-000001\n".to_owned(),
            7 => "BIG-000006\n".to_owned(),
            l if l == in_second_chunk => "big-000003\n".to_owned(),
            l => format!("BIG-{l:06}\n"),
        })
        .collect();
    let (status, report) = env.upload("big", "b1", "text/plain", body).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let accepted = lines as u64 - 3;
    assert_eq!(
        (report["accepted"].as_u64(), report["duplicate"].as_u64()),
        (Some(accepted), Some(3)),
        "{report}"
    );
    assert_eq!(
        report["rejected_lines"],
        json!([
            {"line": 5, "reason": "duplicate: the SKU already has this code"},
            {"line": 7, "reason": "duplicate: repeats an earlier line of this upload"},
            {"line": in_second_chunk, "reason": "duplicate: repeats an earlier line of this upload"},
        ])
    );
    // Key ids follow the file, with no gap: b0 holds big.1, b1 the next `accepted` ids.
    let key_status = |id: u64| {
        let url = format!("{}/v1/keys/big.{id}/events", env.gw.admin);
        let client = env.gw.client.clone();
        async move {
            let response = client
                .get(url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .expect("answered");
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };
    let (status, last) = key_status(1 + accepted).await;
    assert_eq!(status, StatusCode::OK, "{last}");
    assert_eq!(last["batch_id"], "b1");
    assert_eq!(key_status(2 + accepted).await.0, StatusCode::NOT_FOUND);
    assert_eq!(env.gw.counts("big").await["available"], accepted + 1);
    // Sold in id order: b0's code, then the file's first line.
    let mut codes = Vec::new();
    for order in ["o-1", "o-2"] {
        let (status, body) = env.gw.claim("big", json!({"order_id": order})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        codes.push(
            body["keys"][0]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    assert_eq!(codes, ["OLD000001", "BIG000001"]);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_command_refuses_a_csv_without_a_code_column_and_frees_the_batch_id() {
    let dir = TempDir::new().expect("temp dir");
    let cfg = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    let ledger = kamigate::ledger::open(None, dir.path())
        .await
        .expect("open the ledger");
    let settings = serde_json::to_string(&SkuConfig::default()).expect("settings encode");
    ledger
        .put_sku("cli", &settings, 1, 0)
        .await
        .expect("SKU created");

    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "serial,expires_at\nCLI-0001,\n").expect("file written");
    match commands::import(&cfg, &bad, "cli", "b1", true).await {
        Err(CommandError::Api(e)) => {
            assert_eq!(e.code(), "ERR_BAD_REQUEST");
            assert!(e.to_string().contains("no `code` column"), "{e}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let good = dir.path().join("good.csv");
    std::fs::write(&good, "code,expires_at\nCLI-0001,\nCLI-0002,\n").expect("file written");
    let report = commands::import(&cfg, &good, "cli", "b1", true)
        .await
        .expect("imported");
    assert_eq!((report.accepted, report.replayed), (2, false), "{report:?}");
}
