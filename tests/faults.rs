//! Faults with real processes: the gateway binary killed with SIGKILL in the middle of
//! concurrent claims, redis-server (AOF `always`) killed and restarted under load, and
//! redis-server paused past the gateway's command timeout. Afterwards every code answered
//! to a client is claimed in the ledger and none was issued twice.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::eventually::eventually;
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

impl Binary {
    /// Creates `sku` with default settings.
    async fn create_sku(&self, client: &reqwest::Client, sku: &str) {
        let put = client
            .put(format!("{}/v1/skus/{sku}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({}))
            .send()
            .await
            .expect("answered");
        assert_eq!(put.status(), StatusCode::CREATED);
    }
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

/// What the clients of a claim storm were told.
#[derive(Default)]
struct Told {
    /// Every code a client was told it got.
    codes: Mutex<Vec<String>>,
    /// Requests that got no answer, or another answer than `200`.
    failed: AtomicUsize,
    /// Each answer: order id and the code it was told.
    answers: Mutex<Vec<(String, String)>>,
}

impl Told {
    fn codes(&self) -> usize {
        self.codes.lock().expect("lock").len()
    }

    fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits until `n` more codes than `before` were answered.
    async fn codes_beyond(&self, before: usize, n: usize, what: &str) {
        eventually(
            Duration::from_secs(10),
            what,
            || async { self.codes() },
            |codes| *codes >= before + n,
        )
        .await;
    }

    /// Waits until more requests than `before` failed.
    async fn failures_beyond(&self, before: usize, what: &str) {
        eventually(
            Duration::from_secs(10),
            what,
            || async { self.failed() },
            |failed| *failed > before,
        )
        .await;
    }
}

/// Claims one code per order, from `workers` concurrent clients, until stopped; records
/// what each client was told. With `retry`, a client sends an order again until it is
/// answered `200`, with the same `order_id`, as an order system does; without, it goes on
/// to the next order.
fn claim_storm(
    public: String,
    sku: &'static str,
    prefix: &'static str,
    workers: usize,
    told: Arc<Told>,
    retry: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|w| {
            let public = public.clone();
            let told = told.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(2))
                    .build()
                    .expect("client");
                for i in 0.. {
                    let order = format!("{prefix}-{w}-{i}");
                    loop {
                        let res = client
                            .post(format!("{public}/v1/skus/{sku}/claims"))
                            .bearer_auth(MERCHANT_TOKEN)
                            .json(&json!({"order_id": order}))
                            .send()
                            .await;
                        let refused = res.is_err();
                        let answer = match res {
                            Ok(res) if res.status() == StatusCode::OK => {
                                res.json::<Value>().await.ok()
                            }
                            _ => None,
                        };
                        let Some(answer) = answer else {
                            told.failed.fetch_add(1, Ordering::Relaxed);
                            if refused || retry {
                                // A client's pause before it sends again, as an order
                                // system's would be; without it the storm spins.
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if retry {
                                continue;
                            }
                            break;
                        };
                        if let Some(code) = answer["keys"][0]["code"].as_str() {
                            told.codes.lock().expect("lock").push(code.to_owned());
                            told.answers
                                .lock()
                                .expect("lock")
                                .push((order, code.to_owned()));
                        }
                        break;
                    }
                }
            })
        })
        .collect()
}

/// A gateway over `redis`, with `sku` stocked with 300 codes named `<prefix>-<n>`.
async fn stocked_over(redis: &RedisServer, sku: &str, prefix: &str) -> TestGateway {
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    // The audit at the end redeems every answered code from one client.
    cfg.limits.public = kamigate::limit::BucketRule::enforced(100_000, 100_000);
    let gw = TestGateway::start(cfg).await;
    let codes: Vec<String> = (0..300).map(|i| format!("{prefix}-{i:05}")).collect();
    let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
    gw.stock(sku, &codes).await;
    gw
}

/// Waits until the ledger holds every change of the engine, then returns the SKU view.
async fn settled(client: &reqwest::Client, public: &str, sku: &str) -> Value {
    let view = eventually(
        Duration::from_secs(30),
        "the ledger to hold every change of the engine",
        || async {
            match client
                .get(format!("{public}/v1/skus/{sku}"))
                .bearer_auth(MERCHANT_TOKEN)
                .send()
                .await
            {
                Ok(res) => res.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            }
        },
        |view: &Value| {
            view["in_flight"] == 0 && view["engine"].is_object() && view["engine"] == view["ledger"]
        },
    )
    .await;
    assert_eq!(view["drift"], 0, "{view}");
    view
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
    let client = support::gateway::client();
    gw.create_sku(&client, "storm").await;
    let codes: String = (0..400).map(|i| format!("STORM-{i:05}\n")).collect();
    let import = client
        .post(format!("{}/v1/skus/storm/batches?batch_id=b1", gw.admin))
        .bearer_auth(ADMIN_TOKEN)
        .body(codes)
        .send()
        .await
        .expect("answered");
    assert_eq!(import.status(), StatusCode::OK);

    let told = Arc::new(Told::default());
    let storm = claim_storm(gw.public.clone(), "storm", "a", 8, told.clone(), false);
    told.codes_beyond(0, 50, "50 claims answered").await;
    gw.child.start_kill().expect("SIGKILL sent");
    gw.child.wait().await.expect("reaped");
    // The storm's clients meet the dead gateway before it comes back.
    let failed = told.failed();
    told.failures_beyond(failed, "a client refused by the dead gateway")
        .await;
    let gw = spawn_gateway(&config, public, admin).await;
    // Claims go on against the restarted gateway for a moment.
    told.codes_beyond(
        told.codes(),
        30,
        "30 claims answered by the restarted gateway",
    )
    .await;
    for task in &storm {
        task.abort();
    }
    let view = settled(&client, &gw.public, "storm").await;
    let codes = told.codes.lock().expect("lock").clone();
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
    let gw = stocked_over(&redis, "aof", "AOF").await;
    let told = Arc::new(Told::default());
    let storm = claim_storm(gw.public.clone(), "aof", "r", 6, told.clone(), false);
    told.codes_beyond(0, 30, "30 claims answered").await;
    let failed = told.failed();
    redis.kill9();
    // The storm's clients are refused while Redis is down before it comes back.
    told.failures_beyond(failed, "a claim refused while Redis is down")
        .await;
    redis.restart().await;
    told.codes_beyond(told.codes(), 30, "claims to resume after the restart")
        .await;
    for task in &storm {
        task.abort();
    }
    let view = settled(&gw.client, &gw.public, "aof").await;
    let codes = told.codes.lock().expect("lock").clone();
    // Claims cut off before their answer (the kill, aborted clients) are claimed too: their
    // orders get the same codes on retry. Every answered one must be there.
    let claimed = view["ledger"]["claimed"].as_u64().unwrap_or(0);
    assert!(claimed >= codes.len() as u64, "{view}");
    check_answered(&gw.client, &gw.admin, &gw.public, "aof", &codes).await;
    gw.stop().await;
}

/// Redis paused (SIGSTOP) for longer than the gateway's command timeout (2 s) in the middle
/// of claims whose clients retry: calls time out and are answered as failed, and when Redis
/// is continued it runs them late, behind the retries of the same orders. No code goes to
/// two orders, a retried order is told the code its late call claimed, and every answered
/// code is claimed in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_past_the_command_timeout_sells_nothing_twice() {
    let redis = RedisServer::start().await;
    let gw = stocked_over(&redis, "paused", "PAUSED").await;
    let told = Arc::new(Told::default());
    let storm = claim_storm(gw.public.clone(), "paused", "retry", 6, told.clone(), true);
    told.codes_beyond(0, 30, "30 claims answered").await;
    let failed = told.failed();
    redis.signal("-STOP");
    told.failures_beyond(failed, "a claim failed while Redis is paused")
        .await;
    // Past the command timeout for the calls sent last, too.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    redis.signal("-CONT");
    told.codes_beyond(told.codes(), 30, "claims to resume once Redis is continued")
        .await;
    for task in &storm {
        task.abort();
    }
    let view = settled(&gw.client, &gw.public, "paused").await;
    // Each order is answered once here: a code twice is a code sold to two orders, which
    // `check_answered` rules out.
    let answers = told.answers.lock().expect("lock").clone();
    let codes: Vec<String> = answers.iter().map(|(_, code)| code.clone()).collect();
    let claimed = view["ledger"]["claimed"].as_u64().unwrap_or(0);
    assert!(claimed >= codes.len() as u64, "{view}");
    check_answered(&gw.client, &gw.admin, &gw.public, "paused", &codes).await;
    // Each order answered is answered the same again, whatever ran late.
    for (order, code) in answers.iter().step_by(7) {
        let again: Value = gw
            .client
            .post(format!("{}/v1/skus/paused/claims", gw.public))
            .bearer_auth(MERCHANT_TOKEN)
            .json(&json!({"order_id": order}))
            .send()
            .await
            .expect("answered")
            .json()
            .await
            .expect("json");
        assert_eq!(again["keys"][0]["code"], code.as_str(), "{order}: {again}");
    }
    gw.stop().await;
}

/// The id of the Redis client that last ran `command`, from `CLIENT LIST`.
async fn client_running(redis: &RedisServer, command: &str) -> Option<String> {
    let list = redis.cmd(&["CLIENT", "LIST"]).await.ok()?;
    let list = list.as_str()?.to_owned();
    list.lines()
        .find(|line| line.split(' ').any(|f| f == format!("cmd={command}")))
        .and_then(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
}

/// With `durability = "ledger"` every answer waits for its commit, and the event writer
/// reads new entries over a Redis connection of its own. That connection killed again and
/// again (`CLIENT KILL`) while claims wait on it: the writer reconnects and reads on, claims
/// go on being answered, and every answered code is claimed in the ledger, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writers_read_connection_killed_under_durable_claims_loses_nothing() {
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.durability = Some(kamigate::config::Durability::Ledger);
    cfg.limits.public = kamigate::limit::BucketRule::enforced(100_000, 100_000);
    let gw = TestGateway::start(cfg).await;
    // Fresh stock for every round: how many claims a round sees depends on the machine, and
    // a round that finds the stock sold out has nothing left to answer.
    let restock = |round: usize| {
        let codes: Vec<String> = (0..600).map(|i| format!("READS-{round}-{i:04}")).collect();
        let gw = &gw;
        async move {
            gw.stock(
                "reads",
                &codes.iter().map(String::as_str).collect::<Vec<_>>(),
            )
            .await
        }
    };
    restock(0).await;
    let told = Arc::new(Told::default());
    let storm = claim_storm(gw.public.clone(), "reads", "k", 8, told.clone(), false);
    told.codes_beyond(0, 20, "20 durable claims answered").await;
    let mut killed = HashSet::new();
    for round in 0..5 {
        restock(round + 1).await;
        let id = eventually(
            Duration::from_secs(10),
            "the writer's read connection to be found",
            // Its reads are `MULTI`, `FCALL`, `XREADGROUP`, `EXEC`; the other connection
            // runs the scripts alone.
            || client_running(&redis, "exec"),
            |id| id.as_ref().is_some_and(|id| !killed.contains(id)),
        )
        .await
        .expect("found");
        let reply = redis
            .cmd(&["CLIENT", "KILL", "ID", &id])
            .await
            .expect("CLIENT KILL");
        assert_eq!(reply.as_int(), Some(1), "killed client {id}");
        killed.insert(id);
        told.codes_beyond(
            told.codes(),
            20,
            &format!("claims answered after kill {round}"),
        )
        .await;
    }
    for task in &storm {
        task.abort();
    }
    let view = settled(&gw.client, &gw.public, "reads").await;
    let codes = told.codes.lock().expect("lock").clone();
    let claimed = view["ledger"]["claimed"].as_u64().unwrap_or(0);
    assert!(claimed >= codes.len() as u64, "{view}");
    check_answered(&gw.client, &gw.admin, &gw.public, "reads", &codes).await;
    gw.stop().await;
}

/// A gateway killed with SIGKILL in the middle of an upload (the embedded default, SQLite):
/// the merchant's retry of the same batch id is told the batch is in progress only until the
/// dead gateway is presumed gone (seconds, not the five-minute lease), then imports the whole
/// file, nothing of the cut-off upload counted twice or left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_by_a_killed_gateway_is_imported_whole_by_the_retry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (public, admin) = (free_port(), free_port());
    let config = dir.path().join("kamigate.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{public}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             data_dir = \"{}\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\
             merchant_token = \"{MERCHANT_TOKEN}\"\nshutdown_delay_ms = 0\n",
            dir.path().display()
        ),
    )
    .expect("config written");
    let mut gw = spawn_gateway(&config, public, admin).await;
    let client = support::gateway::client();
    gw.create_sku(&client, "cut").await;
    const CODES: usize = 30_000;
    let file: String = (0..CODES).map(|i| format!("CUT-{i:06}\n")).collect();
    let batch = format!("{}/v1/skus/cut/batches?batch_id=b-cut", gw.admin);

    // Two thirds of the file, then the upload stalls with its body open.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    }));
    let cut = tokio::spawn(
        client
            .post(&batch)
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "text/plain")
            .body(body)
            .send(),
    );
    tx.send(Ok(file[..file.len() * 2 / 3].to_owned()))
        .await
        .expect("sent");
    // Killed once some of it is in the ledger (10,000 keys to a transaction).
    let ledger = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}?mode=ro",
        dir.path().join("ledger.sqlite3").display()
    ))
    .await
    .expect("the ledger opens");
    let written = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM keys WHERE sku = 'cut'")
            .fetch_one(&ledger)
            .await
            .unwrap_or(0)
    };
    eventually(
        Duration::from_secs(30),
        "part of the upload in the ledger",
        written,
        |n| *n >= 10_000,
    )
    .await;
    gw.child.start_kill().expect("SIGKILL sent");
    gw.child.wait().await.expect("reaped");
    drop(tx);
    assert!(
        cut.await.expect("joined").is_err(),
        "the upload was cut off"
    );
    let gw = spawn_gateway(&config, public, admin).await;

    // The merchant retries until the answer is final: in progress for a while, then imported.
    let retry = || async {
        let res = client
            .post(&batch)
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "text/plain")
            .body(file.clone())
            .send()
            .await
            .expect("answered");
        let status = res.status();
        (status, res.json::<Value>().await.expect("json"))
    };
    let (status, report) = eventually(
        Duration::from_secs(60),
        "the retry to be imported",
        retry,
        |(status, _)| *status != StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (
            &report["accepted"],
            &report["duplicate"],
            &report["rejected"],
            &report["replayed"]
        ),
        (&json!(CODES), &json!(0), &json!(0), &json!(false)),
        "{report}"
    );
    assert_eq!(
        written().await,
        CODES as i64,
        "no key of the cut-off upload left"
    );
    let view = settled(&client, &gw.public, "cut").await;
    assert_eq!(view["ledger"]["available"], CODES, "{view}");
    assert_eq!(view["engine"]["available"], CODES, "{view}");
}
