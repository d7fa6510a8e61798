//! Starting the `kamigate` binary before its dependencies: it serves its probes at once,
//! says on `/readyz` what it waits for, retries, and serves once Redis or PostgreSQL is up.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use support::eventually::eventually;
use support::gateway::{free_port, wait_ready};
use support::postgres_server::Postgres;
use support::redis_server::RedisServer;

const BIN: &str = env!("CARGO_BIN_EXE_kamigate");
const ADMIN_TOKEN: &str = "admin-token-for-tests-0001";
const MERCHANT_TOKEN: &str = "merchant-token-for-tests-01";
/// Generous: CI runs on a loaded machine.
const WITHIN: Duration = Duration::from_secs(30);

/// A gateway process and where it listens.
struct Serving {
    child: Child,
    public: String,
    admin: String,
}

/// Starts `serve` with data dir `data`, its log written to `log`, and `env` added.
fn serve(data: &Path, log: &Path, env: &[(&str, &str)]) -> Serving {
    let (public, admin) = (free_port(), free_port());
    let mut command = Command::new(BIN);
    command
        .arg("serve")
        .env("KAMIGATE_LISTEN", format!("127.0.0.1:{public}"))
        .env("KAMIGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("KAMIGATE_DATA_DIR", data)
        .env("KAMIGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("KAMIGATE_MERCHANT_TOKEN", MERCHANT_TOKEN)
        .env_remove("KAMIGATE_REDIS_URL")
        .env_remove("KAMIGATE_DATABASE_URL")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    Serving {
        child: command.spawn().expect("kamigate starts"),
        public: format!("http://127.0.0.1:{public}"),
        admin: format!("http://127.0.0.1:{admin}"),
    }
}

/// Sends SIGTERM and waits for a clean exit.
async fn terminate(mut child: Child) {
    let pid = child.id().expect("running").to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "clean exit: {status}");
}

/// Waits until `url` answers 503 (while the gateway starts), and returns its body.
async fn starting(url: &str) -> Value {
    let client = support::gateway::client();
    let answer = eventually(
        WITHIN,
        "the starting gateway to answer its probe",
        || async {
            let answer = client.get(url).send().await.ok()?;
            let retry_after = answer.headers().contains_key("retry-after");
            Some((
                answer.status(),
                retry_after,
                answer.json::<Value>().await.ok()?,
            ))
        },
        |answer| matches!(answer, Some((StatusCode::SERVICE_UNAVAILABLE, true, _))),
    )
    .await;
    answer.map(|(_, _, body)| body).expect("an answer")
}

/// What the admin listener's `/readyz` gives as the reason, once it names `what`.
async fn reason_naming(admin: &str, what: &str) -> String {
    let client = support::gateway::client();
    let url = format!("{admin}/readyz");
    let body = eventually(
        WITHIN,
        "readiness to give the reason",
        || async {
            client
                .get(&url)
                .send()
                .await
                .ok()?
                .json::<Value>()
                .await
                .ok()
        },
        |body| {
            body.as_ref()
                .and_then(|b| b["reason"].as_str())
                .is_some_and(|r| r.contains(what))
        },
    )
    .await
    .expect("a body");
    assert_eq!(body["status"], "starting", "{body}");
    body["reason"].as_str().expect("a reason").to_owned()
}

/// Creates `sku` with default settings through the admin listener at `admin`.
async fn create_sku(client: &reqwest::Client, admin: &str, sku: &str) -> StatusCode {
    client
        .put(format!("{admin}/v1/skus/{sku}"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .expect("PUT answers")
        .status()
}

fn log_of(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).expect("log read")).into_owned()
}

/// Sentences, not the Debug dump of an I/O error.
fn assert_human(text: &str) {
    for dump in ["Os {", "code: 111", "kind: ", "Custom {"] {
        assert!(!text.contains(dump), "a Debug dump ({dump}) in: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_before_redis_waits_for_it_then_serves() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut redis = RedisServer::start().await;
    redis.stop().await;
    let log = dir.path().join("serve.log");
    let url = redis.url();
    let gateway = serve(
        &dir.path().join("data"),
        &log,
        &[("KAMIGATE_REDIS_URL", &url)],
    );

    // Up, not ready, and saying why: the address and the cause to the operator, only what
    // it waits for to the public.
    let reason = reason_naming(&gateway.admin, "unreachable").await;
    let at = format!("Redis at 127.0.0.1:{} is unreachable", redis.port());
    assert!(reason.contains(&at), "{reason}");
    assert!(reason.contains("connection refused"), "{reason}");
    assert_human(&reason);
    let public = starting(&format!("{}/readyz", gateway.public)).await;
    assert_eq!(public["reason"], "waiting for Redis", "{public}");
    let client = support::gateway::client();
    let health = client
        .get(format!("{}/healthz", gateway.public))
        .send()
        .await
        .expect("healthz answers");
    assert_eq!(health.status(), StatusCode::OK);
    let claim = client
        .post(format!("{}/v1/skus/early/claims", gateway.public))
        .bearer_auth(MERCHANT_TOKEN)
        .json(&json!({ "order_id": "o-1", "quantity": 1 }))
        .send()
        .await
        .expect("claims answer");
    assert_eq!(claim.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(claim.headers().contains_key("retry-after"));
    let envelope: Value = claim.json().await.expect("the error envelope");
    assert_eq!(envelope["error"]["code"], "ERR_UNAVAILABLE", "{envelope}");

    redis.restart().await;
    wait_ready(&gateway.admin, WITHIN).await;
    let created = create_sku(&client, &gateway.admin, "early").await;
    assert_eq!(created, StatusCode::CREATED);
    let imported = client
        .post(format!(
            "{}/v1/skus/early/batches?batch_id=b1",
            gateway.admin
        ))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/plain")
        .body("ALPHA-0001\nALPHA-0002\n")
        .send()
        .await
        .expect("import answers");
    assert_eq!(imported.status(), StatusCode::OK);
    let claim = client
        .post(format!("{}/v1/skus/early/claims", gateway.public))
        .bearer_auth(MERCHANT_TOKEN)
        .json(&json!({ "order_id": "o-1", "quantity": 1 }))
        .send()
        .await
        .expect("claims answer");
    assert_eq!(claim.status(), StatusCode::OK, "the gateway serves now");

    terminate(gateway.child).await;
    let text = log_of(&log);
    assert!(text.contains(&at), "the log says what it waits for: {text}");
    assert_human(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_before_postgresql_waits_for_it_then_serves() {
    let dir = tempfile::tempdir().expect("temp dir");
    let postgres = Postgres::start();
    postgres.down();
    let log = dir.path().join("serve.log");
    let url = postgres.url();
    let gateway = serve(
        &dir.path().join("data"),
        &log,
        &[("KAMIGATE_DATABASE_URL", &url)],
    );

    let reason = reason_naming(&gateway.admin, "PostgreSQL at").await;
    assert!(
        reason.contains("is unreachable: connection refused"),
        "{reason}"
    );
    assert_human(&reason);
    let public = starting(&format!("{}/readyz", gateway.public)).await;
    assert_eq!(
        public["reason"], "waiting for the ledger database",
        "{public}"
    );

    postgres.up();
    wait_ready(&gateway.admin, WITHIN).await;
    let client = support::gateway::client();
    let created = create_sku(&client, &gateway.admin, "late-db").await;
    assert_eq!(created, StatusCode::CREATED, "the ledger took it");

    terminate(gateway.child).await;
    assert_human(&log_of(&log));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_waiting_for_its_dependencies_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("serve.log");
    let nobody = format!("redis://127.0.0.1:{}", free_port());
    let gateway = serve(
        &dir.path().join("data"),
        &log,
        &[("KAMIGATE_REDIS_URL", &nobody)],
    );
    starting(&format!("{}/readyz", gateway.admin)).await;
    terminate(gateway.child).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_redis_url_ends_the_start_instead_of_being_waited_for() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("serve.log");
    let gateway = serve(
        &dir.path().join("data"),
        &log,
        &[(
            "KAMIGATE_REDIS_URL",
            "redis://:hunter2@127.0.0.1:1,127.0.0.1:2",
        )],
    );
    let status = tokio::time::timeout(WITHIN, gateway.child.wait_with_output())
        .await
        .expect("gives up at once")
        .expect("waited")
        .status;
    assert!(!status.success());
    let text = log_of(&log);
    assert!(text.contains("invalid Redis URL"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}
