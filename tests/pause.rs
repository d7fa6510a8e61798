//! Incident controls end to end through the `kamigate` binary: claims and redemptions paused
//! and resumed per SKU and gateway-wide, through the admin API and the CLI, on one gateway
//! and on two sharing a PostgreSQL ledger and a Redis engine.

mod support;

#[path = "support/postgres.rs"]
mod pg_support;

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use pg_support::TestDatabase;
use support::eventually::eventually;
use support::gateway::{metric, serving_addresses, wait_ready, ADMIN_TOKEN, MERCHANT_TOKEN};
use support::postgres_server::Postgres;
use support::redis_server::RedisServer;

const BIN: &str = env!("CARGO_BIN_EXE_kamigate");

/// How long a pause made through one gateway may take to be enforced by another: the
/// refresh interval (500 ms) with room for a busy machine.
const ENFORCED_WITHIN: Duration = Duration::from_millis(1500);

/// An answer: status, `Retry-After` in seconds, JSON body.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    retry_after: Option<u64>,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("OK")
    }

    /// Asserts a `503 ERR_PAUSED` with a `Retry-After` the body agrees with.
    fn assert_paused(&self, action: &str, scope: &str) {
        assert_eq!(self.status, StatusCode::SERVICE_UNAVAILABLE, "{self:?}");
        assert_eq!(self.code(), "ERR_PAUSED", "{self:?}");
        assert_eq!(self.body["error"]["paused"], action, "{self:?}");
        assert_eq!(self.body["error"]["scope"], scope, "{self:?}");
        let secs = self.retry_after.expect("Retry-After header");
        assert!((1..=30).contains(&secs), "{self:?}");
        let ms = self.body["error"]["retry_after_ms"].as_u64().expect("ms");
        assert_eq!(secs, ms.div_ceil(1000), "{self:?}");
        assert!(
            !self.body.to_string().contains("reason"),
            "the operator's reason stays on the admin side: {self:?}"
        );
    }
}

/// A `kamigate serve` process, killed when dropped.
struct Served {
    _child: Child,
    public: String,
    admin: String,
    client: reqwest::Client,
    log: std::path::PathBuf,
}

impl Served {
    /// Starts the binary on `data` with the fixed test tokens and `env` on top.
    async fn start(data: &Path, env: &[(&str, String)]) -> Served {
        let log = data.join("stderr.log");
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .env_clear()
            .env("KAMIGATE_LISTEN", "127.0.0.1:0")
            .env("KAMIGATE_ADMIN_LISTEN", "127.0.0.1:0")
            .env("KAMIGATE_DATA_DIR", data)
            .env("KAMIGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("KAMIGATE_MERCHANT_TOKEN", MERCHANT_TOKEN)
            // Gateways sharing a ledger and Redis share their data keys.
            .env("KAMIGATE_DATA_KEY", support::gateway::DATA_KEY)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("kamigate starts");
        let (public, admin) =
            serving_addresses(&log, || child.try_wait(), Duration::from_secs(30)).await;
        let served = Served {
            _child: child,
            public,
            admin,
            client: support::gateway::client(),
            log,
        };
        wait_ready(&served.admin, Duration::from_secs(30)).await;
        served
    }

    async fn send(req: reqwest::RequestBuilder) -> Answer {
        let res = req.send().await.expect("answered");
        let status = res.status();
        let retry_after = res
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let bytes = res.bytes().await.expect("body");
        Answer {
            status,
            retry_after,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    async fn admin_post(&self, path: &str, body: Value) -> Answer {
        Self::send(
            self.client
                .post(format!("{}{path}", self.admin))
                .bearer_auth(ADMIN_TOKEN)
                .json(&body),
        )
        .await
    }

    async fn admin_get(&self, path: &str) -> Answer {
        Self::send(
            self.client
                .get(format!("{}{path}", self.admin))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await
    }

    async fn merchant_post(&self, path: &str, body: Value) -> Answer {
        Self::send(
            self.client
                .post(format!("{}{path}", self.public))
                .bearer_auth(MERCHANT_TOKEN)
                .json(&body),
        )
        .await
    }

    async fn merchant_get(&self, path: &str) -> Answer {
        Self::send(
            self.client
                .get(format!("{}{path}", self.public))
                .bearer_auth(MERCHANT_TOKEN),
        )
        .await
    }

    /// Creates `sku` and imports `codes`.
    async fn stock(&self, sku: &str, codes: &[&str]) {
        let created = Self::send(
            self.client
                .put(format!("{}/v1/skus/{sku}", self.admin))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({})),
        )
        .await;
        assert!(created.status.is_success(), "{created:?}");
        let imported = Self::send(
            self.client
                .post(format!("{}/v1/skus/{sku}/batches?batch_id=b1", self.admin))
                .bearer_auth(ADMIN_TOKEN)
                .header("content-type", "text/plain")
                .body(codes.join("\n")),
        )
        .await;
        assert_eq!(imported.status, StatusCode::OK, "{imported:?}");
        assert_eq!(imported.body["accepted"], codes.len(), "{imported:?}");
    }

    async fn claim(&self, sku: &str, body: Value) -> Answer {
        self.merchant_post(&format!("/v1/skus/{sku}/claims"), body)
            .await
    }

    async fn redeem(&self, body: Value) -> Answer {
        Self::send(
            self.client
                .post(format!("{}/v1/redeem", self.public))
                .json(&body),
        )
        .await
    }

    async fn pause(&self, sku: Option<&str>, body: Value) -> Answer {
        let path = sku.map_or("/v1/pause".to_owned(), |s| format!("/v1/skus/{s}/pause"));
        self.admin_post(&path, body).await
    }

    async fn resume(&self, sku: Option<&str>, body: Value) -> Answer {
        let path = sku.map_or("/v1/resume".to_owned(), |s| format!("/v1/skus/{s}/resume"));
        self.admin_post(&path, body).await
    }

    async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .expect("answered")
            .text()
            .await
            .expect("text")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The code a claim answer issued.
fn code_of(answer: &Answer) -> String {
    answer.body["keys"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("a code: {answer:?}"))
        .to_owned()
}

/// The error code a claim of more codes than the SKU has gets: `ERR_SOLD_OUT` when claims
/// are served, `ERR_PAUSED` while they are paused. Such a claim takes nothing, so a test can
/// probe as often as it likes; `n` numbers the probes' orders.
async fn probe(gate: &Served, sku: &str, n: &AtomicU32) -> String {
    let order = format!("probe-{}", n.fetch_add(1, Ordering::Relaxed));
    let answer = gate
        .claim(sku, json!({"order_id": order, "quantity": 100}))
        .await;
    answer.code().to_owned()
}

fn gauge(text: &str, name: &str, scope: &str, action: &str) -> f64 {
    metric(
        text,
        name,
        &[
            &format!("scope=\"{scope}\""),
            &format!("action=\"{action}\""),
        ],
    )
    .unwrap_or_else(|| panic!("{name}{{scope={scope},action={action}}} is exported"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_claims_refuse_new_orders_while_retried_orders_get_their_codes() {
    let data = tempfile::tempdir().expect("temp dir");
    let gate = Served::start(data.path(), &[]).await;
    gate.stock(
        "gift",
        &["GIFT0001", "GIFT0002", "GIFT0003", "GIFT0004", "GIFT0005"],
    )
    .await;
    gate.stock("other", &["OTHER001", "OTHER002"]).await;
    let first = gate.claim("gift", json!({"order_id": "o-1"})).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let held = gate
        .claim("gift", json!({"order_id": "o-held", "hold_ms": 600_000}))
        .await;
    assert_eq!(held.body["state"], "held", "{held:?}");
    let lapsing = gate
        .claim("gift", json!({"order_id": "o-late", "hold_ms": 1}))
        .await;
    assert_eq!(lapsing.body["state"], "held", "{lapsing:?}");
    eventually(
        Duration::from_secs(10),
        "the 1 ms hold to lapse",
        || async { gate.merchant_get("/v1/skus/gift/claims/o-late").await.body["state"].clone() },
        |state| *state == "expired",
    )
    .await;

    let paused = gate
        .pause(
            Some("gift"),
            json!({"action": "claims", "reason": "supplier reports batch b1 leaked",
                   "expected_duration_ms": 600_000, "by": "oncall-1"}),
        )
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{paused:?}");
    let record = &paused.body["pauses"][0];
    assert_eq!(record["scope"], "sku");
    assert_eq!(record["sku"], "gift");
    assert_eq!(record["action"], "claims");
    assert_eq!(record["already_paused"], false);
    assert_eq!(record["by"], "oncall-1");
    assert!(record["expected_end"].is_string(), "{paused:?}");

    // Enforced at once by the gateway it was made through.
    gate.claim("gift", json!({"order_id": "o-2"}))
        .await
        .assert_paused("claims", "sku");
    let retried = gate.claim("gift", json!({"order_id": "o-1"})).await;
    assert_eq!(retried.status, StatusCode::OK, "{retried:?}");
    assert_eq!(retried.body["replayed"], true);
    assert_eq!(
        code_of(&retried),
        code_of(&first),
        "the first answer, again"
    );

    // Batch claims: per order, the same.
    let batch = gate
        .merchant_post(
            "/v1/skus/gift/claims/batch",
            json!({"claims": [{"order_id": "o-1"}, {"order_id": "o-3"}]}),
        )
        .await;
    assert_eq!(batch.status, StatusCode::OK, "{batch:?}");
    assert_eq!(batch.body["claims"][0]["replayed"], true, "{batch:?}");
    assert_eq!(batch.body["claims"][0]["keys"], first.body["keys"]);
    assert_eq!(batch.body["claims"][1]["error"]["code"], "ERR_PAUSED");

    // A hold still running is confirmed with the codes set aside before the pause; a late
    // confirm would claim fresh ones.
    let confirmed = gate
        .merchant_post("/v1/skus/gift/claims/o-held/confirm", json!({}))
        .await;
    assert_eq!(confirmed.status, StatusCode::OK, "{confirmed:?}");
    assert_eq!(confirmed.body["state"], "claimed");
    gate.merchant_post("/v1/skus/gift/claims/o-late/confirm", json!({}))
        .await
        .assert_paused("claims", "sku");

    // Other SKUs, and redemptions of this one, go on.
    let other = gate.claim("other", json!({"order_id": "o-1"})).await;
    assert_eq!(other.status, StatusCode::OK, "{other:?}");
    let redeemed = gate
        .redeem(json!({"code": code_of(&first), "redeemer": "user-42"}))
        .await;
    assert_eq!(redeemed.status, StatusCode::OK, "{redeemed:?}");

    let listed = gate.admin_get("/v1/pauses").await;
    assert_eq!(listed.status, StatusCode::OK, "{listed:?}");
    let pauses = listed.body["pauses"].as_array().expect("pauses");
    assert_eq!(pauses.len(), 1, "{listed:?}");
    assert_eq!(pauses[0]["reason"], "supplier reports batch b1 leaked");
    assert_eq!(pauses[0]["overdue"], false);

    let text = gate.metrics().await;
    assert_eq!(gauge(&text, "kamigate_pauses", "sku", "claims"), 1.0);
    assert_eq!(gauge(&text, "kamigate_pauses", "gateway", "claims"), 0.0);
    assert_eq!(gauge(&text, "kamigate_pauses", "sku", "redemptions"), 0.0);
    let end = gauge(
        &text,
        "kamigate_pause_expected_end_timestamp_seconds",
        "sku",
        "claims",
    );
    let started = gauge(
        &text,
        "kamigate_pause_started_timestamp_seconds",
        "sku",
        "claims",
    );
    assert!((end - started - 600.0).abs() < 1.0, "{end} {started}");
    let refused = metric(&text, "kamigate_claims_total", &["outcome=\"ERR_PAUSED\""]);
    assert_eq!(refused, Some(2.0), "o-2, and o-3 in the batch");

    let resumed = gate
        .resume(
            Some("gift"),
            json!({"action": "claims", "reason": "batch b1 voided"}),
        )
        .await;
    assert_eq!(resumed.status, StatusCode::OK, "{resumed:?}");
    assert_eq!(
        resumed.body["resumed"][0]["was_paused"], true,
        "{resumed:?}"
    );
    let again = gate.resume(Some("gift"), json!({"action": "claims"})).await;
    assert_eq!(again.body["resumed"][0]["was_paused"], false, "{again:?}");
    let after = gate.claim("gift", json!({"order_id": "o-2"})).await;
    assert_eq!(after.status, StatusCode::OK, "resumed at once: {after:?}");
    assert_eq!(after.body["replayed"], false);

    let history = gate.admin_get("/v1/pauses?sku=gift").await;
    assert_eq!(history.body["pauses"], json!([]), "{history:?}");
    let kinds: Vec<_> = history.body["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| (e["kind"].clone(), e["by"].clone(), e["reason"].clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            (
                json!("resume"),
                json!("admin-api"),
                json!("batch b1 voided")
            ),
            (
                json!("pause"),
                json!("oncall-1"),
                json!("supplier reports batch b1 leaked")
            ),
        ],
        "newest first; resuming what was not paused records nothing"
    );
    let text = gate.metrics().await;
    assert_eq!(gauge(&text, "kamigate_pauses", "sku", "claims"), 0.0);
    assert_eq!(
        gauge(
            &text,
            "kamigate_pause_expected_end_timestamp_seconds",
            "sku",
            "claims"
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redemptions_refuse_new_ones_and_answer_everything_else_as_before() {
    let data = tempfile::tempdir().expect("temp dir");
    let gate = Served::start(data.path(), &[]).await;
    gate.stock("gift", &["GIFT0001", "GIFT0002", "GIFT0003", "GIFT0004"])
        .await;
    let order = gate
        .claim("gift", json!({"order_id": "o-1", "quantity": 3}))
        .await;
    assert_eq!(order.status, StatusCode::OK, "{order:?}");
    let codes: Vec<String> = order.body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["code"].as_str().expect("code").to_owned())
        .collect();
    let unsold = ["GIFT0001", "GIFT0002", "GIFT0003", "GIFT0004"]
        .into_iter()
        .find(|c| !codes.iter().any(|s| s == c))
        .expect("one code left");
    let first = gate
        .redeem(json!({"code": codes[0], "redeemer": "user-1", "sku": "gift"}))
        .await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");

    let paused = gate
        .pause(
            Some("gift"),
            json!({"action": "redemptions", "reason": "issuer reports fraud"}),
        )
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{paused:?}");

    // A retried redemption gets its first answer, with or without the SKU.
    for body in [
        json!({"code": codes[0], "redeemer": "user-1", "sku": "gift"}),
        json!({"code": codes[0], "redeemer": "user-1"}),
    ] {
        let again = gate.redeem(body).await;
        assert_eq!(again.status, StatusCode::OK, "{again:?}");
        assert_eq!(again.body["replayed"], true);
        assert_eq!(again.body["redeemed_at"], first.body["redeemed_at"]);
    }
    // New ones are refused, with or without the SKU.
    for body in [
        json!({"code": codes[1], "redeemer": "user-2", "sku": "gift"}),
        json!({"code": codes[1], "redeemer": "user-2"}),
    ] {
        gate.redeem(body).await.assert_paused("redemptions", "sku");
    }
    // Everything else is answered as before: a pause tells a prober nothing new.
    let used = gate
        .redeem(json!({"code": codes[0], "redeemer": "user-9"}))
        .await;
    assert_eq!(used.code(), "ERR_CARD_USED", "{used:?}");
    let unknown = gate
        .redeem(json!({"code": "NOPE9999", "redeemer": "user-9", "sku": "gift"}))
        .await;
    let unsold = gate
        .redeem(json!({"code": unsold, "redeemer": "user-9", "sku": "gift"}))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{unknown:?}");
    assert_eq!(unknown.body, unsold.body, "unsold answers like unknown");
    assert_eq!(
        gate.redeem(json!({"code": "NOPE9999", "redeemer": "user-9"}))
            .await
            .body,
        unknown.body
    );
    // Claims go on.
    let claimed = gate.claim("gift", json!({"order_id": "o-2"})).await;
    assert_eq!(claimed.status, StatusCode::OK, "{claimed:?}");

    let text = gate.metrics().await;
    assert_eq!(gauge(&text, "kamigate_pauses", "sku", "redemptions"), 1.0);
    assert_eq!(
        gauge(
            &text,
            "kamigate_pause_expected_end_timestamp_seconds",
            "sku",
            "redemptions"
        ),
        0.0,
        "no expected end was given"
    );
    let refused = metric(
        &text,
        "kamigate_redemptions_total",
        &["outcome=\"ERR_PAUSED\""],
    );
    assert_eq!(refused, Some(2.0));

    let resumed = gate
        .resume(Some("gift"), json!({"action": "redemptions"}))
        .await;
    assert_eq!(
        resumed.body["resumed"][0]["was_paused"], true,
        "{resumed:?}"
    );
    let now = gate
        .redeem(json!({"code": codes[1], "redeemer": "user-2"}))
        .await;
    assert_eq!(now.status, StatusCode::OK, "{now:?}");
    assert_eq!(now.body["replayed"], false);
    let counts = gate.merchant_get("/v1/skus/gift").await;
    assert_eq!(counts.body["engine"]["redeemed"], 2, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_wide_pause_covers_every_sku_and_each_action_resumes_on_its_own() {
    let data = tempfile::tempdir().expect("temp dir");
    let gate = Served::start(data.path(), &[]).await;
    gate.stock("a", &["AAAA0001", "AAAA0002", "AAAA0003"]).await;
    gate.stock("b", &["BBBB0001", "BBBB0002"]).await;
    let sold = gate.claim("a", json!({"order_id": "o-1"})).await;
    let sold = code_of(&sold);

    let paused = gate
        .pause(
            None,
            json!({"action": "all", "reason": "ledger failover", "expected_duration_ms": 5000}),
        )
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{paused:?}");
    assert_eq!(paused.body["pauses"].as_array().map(Vec::len), Some(2));
    assert_eq!(paused.body["pauses"][0]["scope"], "gateway");
    assert_eq!(paused.body["pauses"][0]["sku"], Value::Null);
    for sku in ["a", "b"] {
        let refused = gate.claim(sku, json!({"order_id": "o-9"})).await;
        refused.assert_paused("claims", "gateway");
        assert!(
            refused.retry_after.expect("Retry-After") <= 5,
            "{refused:?}"
        );
    }
    gate.redeem(json!({"code": sold, "redeemer": "user-1"}))
        .await
        .assert_paused("redemptions", "gateway");

    // Pausing again keeps the start and takes the new reason and expected end.
    let again = gate
        .pause(
            None,
            json!({"action": "claims", "reason": "failover slower than planned",
                   "expected_duration_ms": 20_000}),
        )
        .await;
    assert_eq!(again.body["pauses"][0]["already_paused"], true, "{again:?}");
    assert_eq!(
        again.body["pauses"][0]["since"], paused.body["pauses"][0]["since"],
        "{again:?}"
    );
    let listed = gate.admin_get("/v1/pauses").await;
    let claims = &listed.body["pauses"][0];
    assert_eq!(claims["action"], "claims", "{listed:?}");
    assert_eq!(claims["reason"], "failover slower than planned");
    assert_eq!(claims["since"], paused.body["pauses"][0]["since"]);

    // A SKU's own resume does not lift the gateway-wide pause.
    let own = gate.resume(Some("a"), json!({"action": "claims"})).await;
    assert_eq!(own.body["resumed"][0]["was_paused"], false, "{own:?}");
    gate.claim("a", json!({"order_id": "o-9"}))
        .await
        .assert_paused("claims", "gateway");

    let text = gate.metrics().await;
    assert_eq!(gauge(&text, "kamigate_pauses", "gateway", "claims"), 1.0);
    assert_eq!(
        gauge(&text, "kamigate_pauses", "gateway", "redemptions"),
        1.0
    );

    let resumed = gate.resume(None, json!({"action": "claims"})).await;
    assert_eq!(
        resumed.body["resumed"][0]["was_paused"], true,
        "{resumed:?}"
    );
    let claimed = gate.claim("b", json!({"order_id": "o-9"})).await;
    assert_eq!(claimed.status, StatusCode::OK, "{claimed:?}");
    gate.redeem(json!({"code": sold, "redeemer": "user-1"}))
        .await
        .assert_paused("redemptions", "gateway");
    gate.resume(None, json!({"action": "redemptions"})).await;
    let redeemed = gate
        .redeem(json!({"code": sold, "redeemer": "user-1"}))
        .await;
    assert_eq!(redeemed.status, StatusCode::OK, "{redeemed:?}");

    let history = gate.admin_get("/v1/pauses").await;
    let kinds: Vec<_> = history.body["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| format!("{} {} {}", e["kind"], e["scope"], e["action"]))
        .collect();
    assert_eq!(
        kinds,
        [
            r#""resume" "gateway" "redemptions""#,
            r#""resume" "gateway" "claims""#,
            r#""pause" "gateway" "claims""#,
            r#""pause" "gateway" "redemptions""#,
            r#""pause" "gateway" "claims""#,
        ]
    );
    let text = gate.metrics().await;
    assert_eq!(gauge(&text, "kamigate_pauses", "gateway", "claims"), 0.0);
    assert_eq!(
        gauge(&text, "kamigate_pauses", "gateway", "redemptions"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_pause_requests_get_documented_errors_and_change_nothing() {
    let data = tempfile::tempdir().expect("temp dir");
    let gate = Served::start(data.path(), &[]).await;
    gate.stock("gift", &["GIFT0001"]).await;
    let long = "x".repeat(501);
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "/v1/skus/nope/pause",
            json!({"action": "claims", "reason": "r"}),
            StatusCode::NOT_FOUND,
            "ERR_NOT_FOUND",
        ),
        (
            "/v1/skus/nope/resume",
            json!({"action": "claims"}),
            StatusCode::NOT_FOUND,
            "ERR_NOT_FOUND",
        ),
        (
            "/v1/skus/%27%3B%20DROP%20TABLE%20pauses/pause",
            json!({"action": "claims", "reason": "r"}),
            StatusCode::BAD_REQUEST,
            "ERR_BAD_REQUEST",
        ),
    ];
    let bodies: Vec<Value> = vec![
        json!({"action": "everything", "reason": "r"}),
        json!({"action": "CLAIMS", "reason": "r"}),
        json!({"action": ["claims"], "reason": "r"}),
        json!({"reason": "r"}),
        json!({"action": "claims"}),
        json!({"action": "claims", "reason": "   "}),
        json!({"action": "claims", "reason": "two\nlines"}),
        json!({"action": "claims", "reason": "bell\u{7}"}),
        json!({"action": "claims", "reason": "a|b"}),
        json!({"action": "claims", "reason": long}),
        json!({"action": "claims", "reason": "r", "expected_duration_ms": 0}),
        json!({"action": "claims", "reason": "r", "expected_duration_ms": -5}),
        json!({"action": "claims", "reason": "r", "expected_duration_ms": "soon"}),
        json!({"action": "claims", "reason": "r", "expected_duration_ms": 10_000_000_000u64}),
        json!({"action": "claims", "reason": "r", "by": "on call"}),
        json!({"action": "claims", "reason": "r", "by": ""}),
        json!({"action": "claims", "reason": "r", "until": "tomorrow"}),
    ];
    for (path, body, status, code) in cases {
        let answer = gate.admin_post(path, body).await;
        assert_eq!((answer.status, answer.code()), (status, code), "{path}");
    }
    for path in ["/v1/skus/gift/pause", "/v1/pause"] {
        for body in &bodies {
            let answer = gate.admin_post(path, body.clone()).await;
            assert_eq!(
                (answer.status, answer.code()),
                (StatusCode::BAD_REQUEST, "ERR_BAD_REQUEST"),
                "{path} {body}"
            );
        }
    }
    for raw in [
        "{\"action\":\"claims\",\"action\":\"all\",\"reason\":\"r\"}",
        "{\"action\":",
        "[]",
    ] {
        let answer = Served::send(
            gate.client
                .post(format!("{}/v1/pause", gate.admin))
                .bearer_auth(ADMIN_TOKEN)
                .body(raw),
        )
        .await;
        assert_eq!(answer.code(), "ERR_BAD_REQUEST", "{raw}");
    }
    let huge = Served::send(
        gate.client
            .post(format!("{}/v1/pause", gate.admin))
            .bearer_auth(ADMIN_TOKEN)
            .body(format!(
                "{{\"action\":\"claims\",\"reason\":\"{}\"}}",
                "x".repeat(70_000)
            )),
    )
    .await;
    assert_eq!(huge.code(), "ERR_PAYLOAD_TOO_LARGE", "{huge:?}");
    let anonymous = Served::send(
        gate.client
            .post(format!("{}/v1/pause", gate.admin))
            .json(&json!({"action": "claims", "reason": "r"})),
    )
    .await;
    assert_eq!(anonymous.code(), "ERR_UNAUTHORIZED");
    let wrong = Served::send(
        gate.client
            .get(format!("{}/v1/pauses", gate.admin))
            .bearer_auth(MERCHANT_TOKEN),
    )
    .await;
    assert_eq!(wrong.code(), "ERR_UNAUTHORIZED");
    for query in ["limit=0", "limit=abc", "limit=1001", "sku=a:b"] {
        let answer = gate.admin_get(&format!("/v1/pauses?{query}")).await;
        assert_eq!(answer.code(), "ERR_BAD_REQUEST", "{query}");
    }
    let method = gate.admin_get("/v1/pause").await;
    assert_eq!(method.code(), "ERR_METHOD_NOT_ALLOWED");
    // On the public listener these routes do not exist.
    let public = Served::send(
        gate.client
            .post(format!("{}/v1/pause", gate.public))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"action": "claims", "reason": "r"})),
    )
    .await;
    assert_eq!(public.code(), "ERR_NOT_FOUND");

    let listed = gate.admin_get("/v1/pauses").await;
    assert_eq!(
        listed.body,
        json!({"pauses": [], "history": []}),
        "nothing changed"
    );
    let claimed = gate.claim("gift", json!({"order_id": "o-1"})).await;
    assert_eq!(claimed.status, StatusCode::OK, "{claimed:?}");
}

/// Runs `kamigate ARGS` against the ledger in `data`; returns (success, stdout, stderr).
async fn cli(data: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_clear()
        .env("KAMIGATE_DATA_DIR", data)
        .env("USER", "tester")
        .output()
        .await
        .expect("kamigate runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pauses_and_resumes_a_running_gateway_through_the_ledger() {
    let data = tempfile::tempdir().expect("temp dir");
    let gate = Served::start(data.path(), &[]).await;
    gate.stock("gift", &["GIFT0001", "GIFT0002", "GIFT0003"])
        .await;

    let (ok, out, err) = cli(
        data.path(),
        &[
            "pause",
            "claims",
            "--sku",
            "gift",
            "--reason",
            "supplier recall",
            "--expected",
            "10m",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("paused claims of SKU gift"), "{out}");
    let n = AtomicU32::new(0);
    let started = Instant::now();
    eventually(
        ENFORCED_WITHIN,
        "the CLI's pause to be enforced",
        || probe(&gate, "gift", &n),
        |code| code == "ERR_PAUSED",
    )
    .await;
    let took = started.elapsed();
    eprintln!("a pause made with the CLI was enforced after {took:?}");

    let (ok, out, _) = cli(data.path(), &["pauses"]).await;
    assert!(ok);
    assert!(
        out.contains("PAUSED claims of SKU gift") && out.contains("by cli:tester"),
        "{out}"
    );
    for bad in [
        &["pause", "claims", "--sku", "nope", "--reason", "r"][..],
        &["pause", "claims", "--sku", "gift", "--reason", "a|b"],
        &["pause", "claims", "--sku", "gift", "--reason", ""],
        &[
            "pause",
            "claims",
            "--sku",
            "gift",
            "--gateway",
            "--reason",
            "r",
        ],
        &["pause", "claims", "--reason", "r"],
        &["pause", "everything", "--gateway", "--reason", "r"],
        &[
            "pause",
            "claims",
            "--gateway",
            "--reason",
            "r",
            "--expected",
            "soon",
        ],
        &["resume", "claims", "--sku", "'; DROP TABLE pauses"],
    ] {
        let (ok, out, err) = cli(data.path(), bad).await;
        assert!(!ok, "{bad:?} is refused: {out}");
        assert!(!err.is_empty(), "{bad:?} says why");
    }

    let (ok, out, err) = cli(
        data.path(),
        &["resume", "claims", "--sku", "gift", "--by", "alice"],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("resumed claims of SKU gift"), "{out}");
    let started = Instant::now();
    eventually(
        ENFORCED_WITHIN,
        "the CLI's resume to be enforced",
        || probe(&gate, "gift", &n),
        |code| code == "ERR_SOLD_OUT",
    )
    .await;
    let took = started.elapsed();
    eprintln!("a resume made with the CLI was enforced after {took:?}");
    let claimed = gate.claim("gift", json!({"order_id": "after"})).await;
    assert_eq!(claimed.status, StatusCode::OK, "{claimed:?}");

    let history = gate.admin_get("/v1/pauses?sku=gift").await;
    let by: Vec<_> = history.body["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| {
            format!(
                "{} by {}",
                e["kind"].as_str().unwrap_or(""),
                e["by"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(by, ["resume by alice", "pause by cli:tester"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_a_ledger_enforce_each_others_pauses_within_a_second() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let mut redis = RedisServer::start().await;
    let env = [
        ("KAMIGATE_REDIS_URL", redis.url()),
        ("KAMIGATE_DATABASE_URL", db.url().to_owned()),
    ];
    let (data_a, data_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = Served::start(data_a.path(), &env).await;
    let b = Served::start(data_b.path(), &env).await;
    a.stock(
        "gift",
        &[
            "GIFT0001", "GIFT0002", "GIFT0003", "GIFT0004", "GIFT0005", "GIFT0006",
        ],
    )
    .await;
    let first = b.claim("gift", json!({"order_id": "o-1"})).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");

    // Claims paused through A are refused by B within a second.
    let paused = a
        .pause(
            Some("gift"),
            json!({"action": "claims", "reason": "incident 7"}),
        )
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{paused:?}");
    let n = AtomicU32::new(0);
    let started = Instant::now();
    eventually(
        ENFORCED_WITHIN,
        "B to enforce A's pause",
        || probe(&b, "gift", &n),
        |code| code == "ERR_PAUSED",
    )
    .await;
    let took = started.elapsed();
    eprintln!("a pause made through gateway A was enforced by B after {took:?}");
    b.claim("gift", json!({"order_id": "o-2"}))
        .await
        .assert_paused("claims", "sku");
    for gate in [&a, &b] {
        let retried = gate.claim("gift", json!({"order_id": "o-1"})).await;
        assert_eq!(retried.body["keys"], first.body["keys"], "{retried:?}");
    }
    let listed = b.admin_get("/v1/pauses").await;
    assert_eq!(
        listed.body["pauses"][0]["reason"], "incident 7",
        "{listed:?}"
    );
    let text = b.metrics().await;
    assert_eq!(gauge(&text, "kamigate_pauses", "sku", "claims"), 1.0);

    // Resumed through B, A serves again within a second.
    b.resume(Some("gift"), json!({"action": "claims"})).await;
    let started = Instant::now();
    eventually(
        ENFORCED_WITHIN,
        "A to lift B's resume",
        || probe(&a, "gift", &n),
        |code| code == "ERR_SOLD_OUT",
    )
    .await;
    let took = started.elapsed();
    eprintln!("a resume made through gateway B was enforced by A after {took:?}");
    let claimed = a.claim("gift", json!({"order_id": "o-2"})).await;
    assert_eq!(claimed.status, StatusCode::OK, "{claimed:?}");

    // Redemptions paused through B are refused by A within a second.
    let code = code_of(&first);
    b.pause(
        None,
        json!({"action": "redemptions", "reason": "fraud wave"}),
    )
    .await;
    eventually(
        ENFORCED_WITHIN,
        "A to enforce B's gateway-wide pause",
        || async {
            let text = a.metrics().await;
            let lines = text.lines().filter(|l| l.starts_with("kamigate_pauses{"));
            lines.map(str::to_owned).collect::<Vec<_>>()
        },
        |lines| {
            lines
                .iter()
                .any(|l| l.contains("kamigate_pauses{scope=\"gateway\",action=\"redemptions\"} 1"))
        },
    )
    .await;
    a.redeem(json!({"code": code, "redeemer": "user-1"}))
        .await
        .assert_paused("redemptions", "gateway");
    a.resume(None, json!({"action": "redemptions"})).await;

    // With Redis down, pausing still works, and both gateways answer with the pause.
    redis.stop().await;
    let paused = a
        .pause(
            Some("gift"),
            json!({"action": "claims", "reason": "redis outage"}),
        )
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{paused:?}");
    eventually(
        ENFORCED_WITHIN,
        "B to refuse with the pause while Redis is down",
        || b.claim("gift", json!({"order_id": "o-3"})),
        |answer| answer.code() == "ERR_PAUSED",
    )
    .await;
    redis.restart().await;
    let resumed = b.resume(Some("gift"), json!({"action": "claims"})).await;
    assert_eq!(
        resumed.body["resumed"][0]["was_paused"], true,
        "{resumed:?}"
    );
    // Redis came back empty: the SKU is rebuilt from the ledger first, then serves again.
    eventually(
        Duration::from_secs(60),
        "A to claim again after the rebuild",
        || a.claim("gift", json!({"order_id": "o-3"})),
        |answer| answer.status == StatusCode::OK,
    )
    .await;
    let retried = a.claim("gift", json!({"order_id": "o-1"})).await;
    assert_eq!(retried.body["keys"], first.body["keys"], "{retried:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_keeps_its_last_view_of_pauses_while_the_ledger_is_down() {
    if std::env::var_os("CI").is_none() && !Path::new("/usr/lib/postgresql").exists() {
        eprintln!("PostgreSQL is not installed: skipped");
        return;
    }
    let pg = Postgres::start();
    let redis = RedisServer::start().await;
    let data = tempfile::tempdir().expect("temp dir");
    let gate = Served::start(
        data.path(),
        &[
            ("KAMIGATE_REDIS_URL", redis.url()),
            ("KAMIGATE_DATABASE_URL", pg.url()),
        ],
    )
    .await;
    gate.stock("gift", &["GIFT0001", "GIFT0002", "GIFT0003"])
        .await;
    let first = gate.claim("gift", json!({"order_id": "o-1"})).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let paused = gate
        .pause(
            Some("gift"),
            json!({"action": "claims", "reason": "incident 9"}),
        )
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{paused:?}");

    pg.down();
    eventually(
        Duration::from_secs(30),
        "the view to be marked stale",
        || async { metric(&gate.metrics().await, "kamigate_pauses_stale", &[]) },
        |stale| *stale == Some(1.0),
    )
    .await;
    // Still enforced, and still told apart from retries (Redis is up).
    gate.claim("gift", json!({"order_id": "o-2"}))
        .await
        .assert_paused("claims", "sku");
    let retried = gate.claim("gift", json!({"order_id": "o-1"})).await;
    assert_eq!(retried.body["keys"], first.body["keys"], "{retried:?}");
    // Resuming needs the ledger, the record every gateway reads: refused, nothing changes.
    let resume = gate.resume(Some("gift"), json!({"action": "claims"})).await;
    assert_eq!(resume.status, StatusCode::SERVICE_UNAVAILABLE, "{resume:?}");
    gate.claim("gift", json!({"order_id": "o-2"}))
        .await
        .assert_paused("claims", "sku");

    pg.up();
    eventually(
        Duration::from_secs(30),
        "the view to be read again",
        || async { metric(&gate.metrics().await, "kamigate_pauses_stale", &[]) },
        |stale| *stale == Some(0.0),
    )
    .await;
    let log = gate.log();
    assert_eq!(
        log.matches("reading pauses from the ledger failed").count(),
        1,
        "said once, not at every refresh:\n{log}"
    );
    assert_eq!(
        log.matches("pauses read from the ledger again").count(),
        1,
        "{log}"
    );
    let resume = gate.resume(Some("gift"), json!({"action": "claims"})).await;
    assert_eq!(resume.status, StatusCode::OK, "{resume:?}");
    let claimed = gate.claim("gift", json!({"order_id": "o-2"})).await;
    assert_eq!(claimed.status, StatusCode::OK, "{claimed:?}");
}
