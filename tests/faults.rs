//! Faults with real processes: the gateway binary killed with SIGKILL in the middle of
//! concurrent claims, and redis-server (AOF `always`) killed and restarted under load.
//! Afterwards every code answered to a client is claimed in the ledger and none was issued
//! twice.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::gateway::{
    audit_trail, config, free_port, spawn_serve, wait_ready, TestGateway, ADMIN_TOKEN,
    MERCHANT_TOKEN,
};
use support::redis_server::RedisServer;
use tokio::process::Child;

struct Binary {
    child: Child,
    public: String,
    admin: String,
}

async fn spawn_gateway(config: &std::path::Path, public: u16, admin: u16) -> Binary {
    let child = spawn_serve(config);
    let gw = Binary {
        child,
        public: format!("http://127.0.0.1:{public}"),
        admin: format!("http://127.0.0.1:{admin}"),
    };
    wait_ready(&gw.admin, Duration::from_secs(15)).await;
    gw
}

/// Claims one code per order, from `workers` concurrent clients, until stopped; records
/// every code a client was told it got.
fn claim_storm(
    public: String,
    sku: &'static str,
    prefix: &'static str,
    workers: usize,
    answered: Arc<Mutex<Vec<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|w| {
            let public = public.clone();
            let answered = answered.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(2))
                    .build()
                    .expect("client");
                for i in 0.. {
                    let res = client
                        .post(format!("{public}/v1/skus/{sku}/claims"))
                        .bearer_auth(MERCHANT_TOKEN)
                        .json(&json!({"order_id": format!("{prefix}-{w}-{i}")}))
                        .send()
                        .await;
                    let Ok(res) = res else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    if res.status() == StatusCode::OK {
                        if let Ok(order) = res.json::<Value>().await {
                            if let Some(code) = order["keys"][0]["code"].as_str() {
                                answered.lock().expect("lock").push(code.to_owned());
                            }
                        }
                    }
                }
            })
        })
        .collect()
}

/// Waits until the ledger holds every change of the engine, then returns the SKU view.
async fn settled(client: &reqwest::Client, public: &str, sku: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let view: Value = match client
            .get(format!("{public}/v1/skus/{sku}"))
            .bearer_auth(MERCHANT_TOKEN)
            .send()
            .await
        {
            Ok(res) => res.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        if view["in_flight"] == 0 && view["engine"].is_object() && view["engine"] == view["ledger"]
        {
            assert_eq!(view["drift"], 0, "{view}");
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never settled: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every answered code is claimed in the ledger (looked up through its audit trail), and
/// no code was answered twice.
async fn check_answered(
    client: &reqwest::Client,
    admin: &str,
    public: &str,
    sku: &str,
    codes: &[String],
) {
    let distinct: HashSet<&String> = codes.iter().collect();
    assert_eq!(distinct.len(), codes.len(), "a code was issued twice");
    for code in codes {
        let res = client
            .post(format!("{public}/v1/redeem"))
            .json(&json!({"code": code, "redeemer": "auditor", "sku": sku}))
            .send()
            .await
            .expect("answered");
        let body: Value = res.json().await.expect("json");
        // Redeemable means sold: the engine agrees it was issued.
        assert_eq!(body["state"], "redeemed", "{body}");
        let key_id = body["key_id"].as_str().expect("key id");
        let (trail, kinds) = audit_trail(client, admin, key_id).await;
        assert_eq!(
            kinds.first().map(String::as_str),
            Some("claim"),
            "the ledger has the claim: {trail}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_loses_no_answered_claim() {
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (public, admin) = (free_port(), free_port());
    let config = dir.path().join("kamigate.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{public}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             redis_url = \"{}\"\ndata_dir = \"{}\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\
             merchant_token = \"{MERCHANT_TOKEN}\"\nevent_reclaim_idle_ms = 300\n\
             shutdown_delay_ms = 0\n\
             [limits.public]\nper_second = 100000\nburst = 100000\n",
            redis.url(),
            dir.path().display()
        ),
    )
    .expect("config written");
    let mut gw = spawn_gateway(&config, public, admin).await;
    let client = reqwest::Client::new();
    let put = client
        .put(format!("{}/v1/skus/storm", gw.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .expect("answered");
    assert_eq!(put.status(), StatusCode::CREATED);
    let codes: String = (0..400).map(|i| format!("STORM-{i:05}\n")).collect();
    let import = client
        .post(format!("{}/v1/skus/storm/batches?batch_id=b1", gw.admin))
        .bearer_auth(ADMIN_TOKEN)
        .body(codes)
        .send()
        .await
        .expect("answered");
    assert_eq!(import.status(), StatusCode::OK);

    let answered = Arc::new(Mutex::new(Vec::new()));
    let storm = claim_storm(gw.public.clone(), "storm", "a", 8, answered.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while answered.lock().expect("lock").len() < 50 {
        assert!(tokio::time::Instant::now() < deadline, "no claims answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.child.start_kill().expect("SIGKILL sent");
    gw.child.wait().await.expect("reaped");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gw = spawn_gateway(&config, public, admin).await;
    // Claims go on against the restarted gateway for a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for task in &storm {
        task.abort();
    }
    let view = settled(&client, &gw.public, "storm").await;
    let codes = answered.lock().expect("lock").clone();
    // Claims cut off before their answer (the kill, aborted clients) are claimed too: their
    // orders get the same codes on retry. Every answered one must be there.
    let claimed = view["ledger"]["claimed"].as_u64().unwrap_or(0);
    assert!(claimed >= codes.len() as u64, "{view}");
    check_answered(&client, &gw.admin, &gw.public, "storm", &codes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_loses_no_answered_claim() {
    let mut redis =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    // The audit at the end redeems every answered code from one client.
    cfg.limits.public = kamigate::limit::BucketRule::enforced(100_000, 100_000);
    let gw = TestGateway::start(cfg).await;
    gw.stock(
        "aof",
        &(0..300)
            .map(|i| format!("AOF-{i:05}"))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;
    let answered = Arc::new(Mutex::new(Vec::new()));
    let storm = claim_storm(gw.public.clone(), "aof", "r", 6, answered.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while answered.lock().expect("lock").len() < 30 {
        assert!(tokio::time::Instant::now() < deadline, "no claims answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.kill9();
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let before = answered.lock().expect("lock").len();
    while answered.lock().expect("lock").len() < before + 30 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "claims never resumed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for task in &storm {
        task.abort();
    }
    let view = settled(&gw.client, &gw.public, "aof").await;
    let codes = answered.lock().expect("lock").clone();
    // Claims cut off before their answer (the kill, aborted clients) are claimed too: their
    // orders get the same codes on retry. Every answered one must be there.
    let claimed = view["ledger"]["claimed"].as_u64().unwrap_or(0);
    assert!(claimed >= codes.len() as u64, "{view}");
    check_answered(&gw.client, &gw.admin, &gw.public, "aof", &codes).await;
    gw.stop().await;
}
