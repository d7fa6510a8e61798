//! Codes at rest: after codes are imported, claimed and redeemed, not one of them (nor a
//! code of a SKU's blacklist) appears in the raw bytes of the SQLite ledger, a `pg_dump` of
//! the PostgreSQL ledger, or Redis's RDB and AOF files, in any case or grouping; a
//! blacklist goes on refusing imports through both kinds of rekey; and a stored code
//! tampered with or moved onto another key is refused, counted and logged by key id, and
//! never handed out.

#[path = "support/postgres.rs"]
mod pg_support;
mod support;

use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use kamigate::engine::keys::sku_keys;
use kamigate::engine::Script;
use kamigate::secrets::keyfile::KEY_FILE;
use pg_support::TestDatabase;
use reqwest::StatusCode;
use serde_json::json;
use support::dump::{
    assert_absent, assert_absent_from_redis_files, files_under, pg_dump, spellings,
};
use support::eventually::eventually;
use support::gateway::{config, metric, TestGateway};
use support::redis_server::RedisServer;

/// Codes as a supplier would send them: digits only (the easiest to guess), grouped, mixed
/// case.
fn supplier_codes() -> Vec<String> {
    let mut codes = Vec::new();
    for i in 0..12u64 {
        codes.push(format!("{:012}", 480_193_275_001 + i * 7_919));
    }
    for i in 0..12u64 {
        let n = 0x5a3c_91e7_b2d4_u64.wrapping_mul(i + 3);
        codes.push(format!("QZ{:014X}", n & 0x00ff_ffff_ffff_ffff));
    }
    codes
}

/// Codes a SKU's blacklist holds: held back, so never imported, and as secret as sold ones.
fn blacklisted_codes() -> Vec<String> {
    (0..3u64)
        .map(|i| format!("{:012}", 770_412_991_003 + i * 6_151))
        .collect()
}

/// Sets the SKU's blacklist to [`blacklisted_codes`], imports the codes (and the blacklisted
/// ones, refused), claims twelve (one held), redeems six: every kind of row a ledger and an
/// engine hold. Checks each answer reveals the imported code and none a blacklisted one.
async fn sell(gate: &TestGateway, sku: &str, codes: &[String]) {
    let blacklisted = blacklisted_codes();
    let (status, body) = gate.put_sku(sku, json!({ "blacklist": blacklisted })).await;
    assert!(status.is_success(), "{body}");
    assert_eq!(body["config"]["blacklist"], json!({"entries": 3}), "{body}");
    // Imported in the grouped, lower-case spelling a supplier file may have.
    let mut file: Vec<String> = codes.iter().map(|c| spellings(c)[0].clone()).collect();
    file.extend(blacklisted.iter().map(|c| spellings(c)[1].clone()));
    let (status, report) = gate.import(sku, file.join("\n")).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["accepted"], codes.len(), "{report}");
    assert_eq!(report["rejected"], blacklisted.len(), "{report}");
    let (_, view) = gate.merchant_get(&format!("/v1/skus/{sku}")).await;
    assert_eq!(view["config"]["blacklist"], json!({"entries": 3}), "{view}");
    for answer in [body.to_string(), report.to_string(), view.to_string()] {
        assert_absent("an answer", answer.as_bytes(), &blacklisted);
    }
    let mut sold = Vec::new();
    for i in 0..12 {
        let (status, body) = gate
            .claim(sku, json!({"order_id": format!("o-{i}"), "quantity": 1}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let code = body["keys"][0]["code"]
            .as_str()
            .expect("revealed")
            .to_owned();
        assert!(codes.contains(&code), "a claim revealed an imported code");
        sold.push(code);
    }
    let (status, body) = gate
        .claim(
            sku,
            json!({"order_id": "held", "quantity": 1, "hold_ms": 600_000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for code in sold.iter().take(6) {
        // No SKU: found through the global index, by its keyed digest.
        let (status, body) = gate.redeem(json!({"code": code, "redeemer": "u-1"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // The ledger has every change once the writer caught up.
    let path = format!("/v1/skus/{sku}");
    eventually(
        Duration::from_secs(10),
        "the ledger to have the redemptions",
        || gate.merchant_get(&path),
        |(_, body)| body["ledger"]["redeemed"] == 6 && body["in_flight"] == 0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_code_is_in_the_sqlite_ledger_in_clear() {
    let sold = supplier_codes();
    let codes: Vec<String> = sold.iter().cloned().chain(blacklisted_codes()).collect();
    // Keys generated into the data dir, which the scan below covers too.
    let mut cfg = config();
    cfg.data_key = None;
    let gate = TestGateway::start(cfg).await;
    sell(&gate, "gift", &sold).await;
    let dir = gate.data.as_ref().expect("own data dir").path().to_owned();
    let data = gate.data;
    gate.gateway.stop().await;
    let files = files_under(&dir);
    assert!(
        files.iter().any(|(p, _)| p.ends_with(KEY_FILE)),
        "a key file was generated"
    );
    let ledger: Vec<u8> = files
        .iter()
        .filter(|(p, _)| p.contains("sqlite"))
        .flat_map(|(_, b)| b.clone())
        .collect();
    assert_absent("the SQLite ledger files", &ledger, &codes);
    for (path, bytes) in files.iter().filter(|(_, b)| !b.is_empty()) {
        assert_absent(path, bytes, &codes);
    }
    drop(data);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_code_is_in_redis_files_or_a_postgres_dump_in_clear() {
    let sold = supplier_codes();
    let codes: Vec<String> = sold.iter().cloned().chain(blacklisted_codes()).collect();
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let db = TestDatabase::create().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.database_url = db.as_ref().map(|d| d.url().to_owned());
    let gate = TestGateway::start(cfg).await;
    sell(&gate, "gift", &sold).await;
    gate.stop().await;

    // An RDB snapshot next to the AOF, then every file of the server's directory.
    redis.cmd(&["SAVE"]).await.expect("SAVE answered");
    let files = files_under(redis.dir());
    assert!(
        files.iter().any(|(p, _)| p.ends_with(".rdb")),
        "an RDB file was written"
    );
    assert!(
        files.iter().any(|(p, _)| p.contains(".aof")),
        "an AOF was written"
    );
    assert_absent_from_redis_files(redis.dir(), &codes);

    if let Some(db) = &db {
        let dump = pg_dump(db.url());
        let text = String::from_utf8_lossy(&dump);
        assert!(
            text.contains("COPY public.keys") && text.contains("COPY public.skus"),
            "the dump has the keys and the SKUs' settings"
        );
        assert_absent("pg_dump of the ledger", &dump, &codes);
    }
}

/// Imports into `bl` refuse its blacklisted codes, sent in another spelling than the list.
async fn imports_refuse_the_blacklist(gate: &TestGateway, when: &str) {
    let file: Vec<String> = blacklisted_codes()
        .iter()
        .map(|c| spellings(c)[2].clone())
        .collect();
    let (status, report) = gate.import("bl", file.join("\n")).await;
    assert_eq!(status, StatusCode::OK, "{when}: {report}");
    assert_eq!(report["accepted"], 0, "{when}: {report}");
    assert_eq!(report["rejected"], file.len(), "{when}: {report}");
    for line in report["rejected_lines"].as_array().expect("lines") {
        assert_eq!(
            line["reason"], "the code is on the SKU's blacklist",
            "{when}"
        );
    }
}

/// The sealed text of SKU `bl`'s blacklist in the ledger's settings.
async fn stored_blacklist(gate: &TestGateway) -> String {
    let record = gate
        .gateway
        .app
        .ledger
        .get_sku("bl")
        .await
        .expect("ledger")
        .expect("SKU");
    let config: serde_json::Value = serde_json::from_str(&record.config_json).expect("json");
    config["blacklist"]["sealed"]
        .as_str()
        .expect("stored sealed")
        .to_owned()
}

/// Gives the key file under `dir` other index key material under id `id`.
fn replace_index_key(dir: &Path, id: &str) {
    let path = dir.join(KEY_FILE);
    let text = std::fs::read_to_string(&path).expect("key file");
    let lines: Vec<String> = text
        .lines()
        .map(|l| match l.starts_with("index ") {
            true => format!("index {id} {}", "5c".repeat(32)),
            false => l.to_owned(),
        })
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").expect("written");
}

/// A blacklist set through the API goes on refusing imports after the data key is rotated
/// (`POST /v1/rekey` seals the list anew) and after the index key is replaced and the
/// ledger re-indexed (`"index": true`).
async fn a_blacklist_outlives_both_rekeys(mut cfg: kamigate::config::Config) {
    let dir = tempfile::tempdir().expect("temp dir");
    cfg.data_dir = dir.path().to_owned();
    cfg.data_key = None;
    let gate = TestGateway::start(cfg.clone()).await;
    let (status, body) = gate
        .put_sku("bl", json!({ "blacklist": blacklisted_codes() }))
        .await;
    assert!(status.is_success(), "{body}");
    assert!(stored_blacklist(&gate).await.starts_with("e1.d1."));
    imports_refuse_the_blacklist(&gate, "as set").await;

    kamigate::secrets::keyfile::add_data_key(&dir.path().join(KEY_FILE), "d2").expect("added");
    let (status, pass) = gate.admin_post("/v1/rekey", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{pass}");
    assert_eq!(pass["data_key"], "d2", "{pass}");
    assert_eq!(pass["report"]["blacklists"], 1, "{pass}");
    assert_eq!(pass["report"]["failed"], 0, "{pass}");
    assert!(stored_blacklist(&gate).await.starts_with("e1.d2."));
    imports_refuse_the_blacklist(&gate, "after the data key rekey").await;
    let (_, again) = gate.admin_post("/v1/rekey", json!({})).await;
    assert_eq!(again["report"]["blacklists"], 0, "{again}");
    gate.stop().await;

    // A new index key is read on start only.
    replace_index_key(dir.path(), "i2");
    let gate = TestGateway::start(cfg).await;
    let (status, pass) = gate.admin_post("/v1/rekey", json!({"index": true})).await;
    assert_eq!(status, StatusCode::OK, "{pass}");
    assert_eq!(pass["index_key"], "i2", "{pass}");
    assert_eq!(pass["report"]["failed"], 0, "{pass}");
    imports_refuse_the_blacklist(&gate, "after the re-index").await;
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blacklist_outlives_both_rekeys_on_sqlite_and_the_embedded_engine() {
    a_blacklist_outlives_both_rekeys(config()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blacklist_outlives_both_rekeys_on_postgres_and_redis() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.database_url = Some(db.url().to_owned());
    a_blacklist_outlives_both_rekeys(cfg).await;
}

/// Tampering: `edit` changes the engine's stored codes of SKU `gift`; the claim that would
/// hand one of them out is refused, counted and logged, and reveals nothing.
async fn tampered_claim_is_refused(gate: &TestGateway, edit: impl AsyncFnOnce(&TestGateway)) {
    let (status, body) = gate.put_sku("gift", json!({})).await;
    assert!(status.is_success(), "{body}");
    let (status, report) = gate.import("gift", "AAAA11112222\nBBBB33334444\n").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    edit(gate).await;
    let (status, body) = gate
        .claim("gift", json!({"order_id": "o-1", "quantity": 1}))
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"]["code"], "ERR_INTERNAL", "{body}");
    let text = body.to_string();
    assert!(!text.contains("AAAA") && !text.contains("BBBB"), "{text}");
    let metrics = gate.metrics().await;
    let failures = metric(
        &metrics,
        "kamigate_decrypt_failures_total",
        &["data_key=\"d1\""],
    );
    assert!(failures.unwrap_or(0.0) >= 1.0, "counted: {failures:?}");
}

/// Probes run on the gateway's own engine (either kind), with the prelude's `K` names.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "probe_read_codes",
        "return redis.call('HMGET', K.codes, '1', '2')",
    )
});
static WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "probe_write_codes",
        "return redis.call('HSET', K.codes, '1', ARGV[1], '2', ARGV[2])",
    )
});

/// The engine's sealed codes of keys 1 and 2 of `gift`.
async fn codes_of(gate: &TestGateway) -> (String, String) {
    let reply = gate
        .inventory()
        .engine()
        .eval(&READ, sku_keys("gift"), vec![])
        .await
        .expect("engine answers");
    let items = reply.as_array().expect("an array");
    let text = |i: usize| items[i].as_str().expect("stored").to_owned();
    (text(0), text(1))
}

async fn write_codes(gate: &TestGateway, one: &str, two: &str) {
    gate.inventory()
        .engine()
        .eval(&WRITE, sku_keys("gift"), vec![one.into(), two.into()])
        .await
        .expect("engine answers");
}

/// Swaps the two keys' sealed codes: each is a valid ciphertext, for the other key.
async fn swap(gate: &TestGateway) {
    let (one, two) = codes_of(gate).await;
    assert!(one.starts_with("e1.d1.") && two.starts_with("e1.d1."));
    write_codes(gate, &two, &one).await;
}

/// Flips one bit in each key's sealed code.
async fn flip(gate: &TestGateway) {
    let (one, two) = codes_of(gate).await;
    let flipped = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        let i = b.len() - 5;
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        String::from_utf8(b).expect("ascii")
    };
    write_codes(gate, &flipped(&one), &flipped(&two)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_code_moved_to_another_key_is_never_handed_out() {
    let gate = TestGateway::embedded().await;
    tampered_claim_is_refused(&gate, async |g: &TestGateway| swap(g).await).await;
    gate.stop().await;
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    let gate = TestGateway::start(cfg).await;
    tampered_claim_is_refused(&gate, async |g: &TestGateway| swap(g).await).await;
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_bit_is_detected_and_never_handed_out() {
    let gate = TestGateway::embedded().await;
    tampered_claim_is_refused(&gate, async |g: &TestGateway| flip(g).await).await;
    gate.stop().await;
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    let gate = TestGateway::start(cfg).await;
    tampered_claim_is_refused(&gate, async |g: &TestGateway| flip(g).await).await;
    gate.stop().await;
}

/// Why a gateway on `cfg` refuses to start. Its data dir's lock can outlive the gateway
/// that held it by a moment: a process another test of this binary spawns holds a copy of
/// every open descriptor between its fork and its exec. A refusal for that reason is tried
/// again, within a deadline.
async fn refused(cfg: &kamigate::config::Config) -> String {
    use kamigate::datadir::LockError;
    use kamigate::gateway::{Gateway, StartError};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Gateway::start(cfg.clone()).await {
            Ok(gateway) => {
                gateway.stop().await;
                panic!("a gateway started on {}", cfg.data_dir.display());
            }
            Err(StartError::DataDir(LockError::InUse { .. }))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return e.to_string(),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_key_at_start_is_an_error_naming_the_key() {
    let codes = supplier_codes();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = config();
    cfg.data_dir = dir.path().to_owned();
    cfg.data_key = None;
    let gate = TestGateway::start(cfg.clone()).await;
    sell(&gate, "gift", &codes[..14]).await;
    gate.stop().await;

    // Another key file: the ledger's codes do not open under its d1.
    let path = dir.path().join(KEY_FILE);
    std::fs::write(&path, kamigate::secrets::keyfile::generate_text()).expect("written");
    let message = refused(&cfg).await;
    assert!(message.contains("data key d1"), "{message}");
    assert!(message.contains(KEY_FILE), "{message}");

    // A keyring without the ledger's key id at all.
    let hex = "ab".repeat(32);
    cfg.data_key = Some(kamigate::secrets::keyfile::KeyText(format!(
        "index i9 {hex}; data d9 {hex}"
    )));
    let message = refused(&cfg).await;
    assert!(
        message.contains("d1") && message.contains("d9"),
        "{message}"
    );
    assert!(!message.contains(&hex), "{message}");
}

const BIN: &str = env!("CARGO_BIN_EXE_kamigate");

/// Key material of its own, so the test can look for it in what the gateway writes.
const LOG_TEST_DATA_KEY: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";
const LOG_TEST_INDEX_KEY: &str = "1de71de71de71de71de71de71de71de71de71de71de71de71de71de71de71de7";
const WRONG_DATA_KEY: &str = "bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad0";

/// Starts `kamigate serve` on `data` with `key_text` and ports of the system's choice,
/// logging at `debug` into `log`; killed when dropped, so a failed test leaves none running.
fn serve(data: &Path, key_text: &str, log: &Path) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("KAMIGATE_LISTEN", "127.0.0.1:0")
        .env("KAMIGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("KAMIGATE_DATA_DIR", data)
        .env("KAMIGATE_ADMIN_TOKEN", support::gateway::ADMIN_TOKEN)
        .env("KAMIGATE_MERCHANT_TOKEN", support::gateway::MERCHANT_TOKEN)
        .env("KAMIGATE_DATA_KEY", key_text)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("kamigate starts")
}

#[tokio::test(flavor = "multi_thread")]
async fn neither_codes_nor_keys_reach_the_logs_or_the_metrics() {
    use support::gateway::{serving_addresses, wait_ready, ADMIN_TOKEN, MERCHANT_TOKEN};
    let codes = supplier_codes();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let key_text = format!("index i1 {LOG_TEST_INDEX_KEY}\ndata d1 {LOG_TEST_DATA_KEY}");
    let log = dir.path().join("serve.log");
    let mut child = serve(&data, &key_text, &log);
    let (public, admin) =
        serving_addresses(&log, || child.try_wait(), Duration::from_secs(30)).await;
    wait_ready(&admin, Duration::from_secs(30)).await;
    let client = support::gateway::client();
    let ok = |r: reqwest::Response| {
        assert!(r.status().is_success(), "{}", r.status());
        r
    };
    ok(client
        .put(format!("{admin}/v1/skus/gift"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .expect("answered"));
    let mut file = codes.join("\n");
    file.push_str("\nnot a code!\n");
    file.push_str(&codes[0]);
    ok(client
        .post(format!("{admin}/v1/skus/gift/batches?batch_id=b1"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/plain")
        .body(file)
        .send()
        .await
        .expect("answered"));
    let mut sold = Vec::new();
    for i in 0..5 {
        let body: serde_json::Value = ok(client
            .post(format!("{public}/v1/skus/gift/claims"))
            .bearer_auth(MERCHANT_TOKEN)
            .json(&json!({"order_id": format!("o-{i}"), "quantity": 1}))
            .send()
            .await
            .expect("answered"))
        .json()
        .await
        .expect("json");
        sold.push(body["keys"][0]["code"].as_str().expect("code").to_owned());
    }
    for code in sold.iter().take(3) {
        ok(client
            .post(format!("{public}/v1/redeem"))
            .json(&json!({"code": code, "redeemer": "u-1"}))
            .send()
            .await
            .expect("answered"));
    }
    // A redemption of an unsold code, a replayed one, a used one: the error paths.
    for code in [&codes[20], &sold[0], &sold[0]] {
        let _ = client
            .post(format!("{public}/v1/redeem"))
            .json(&json!({"code": code, "redeemer": "u-2"}))
            .send()
            .await
            .expect("answered");
    }
    let metrics = client
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("answered")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("kamigate_decrypt_failures_total"),
        "registered"
    );
    let _ = child.kill().await;

    // A start with the wrong data key under the same id: refused, saying which key.
    let wrong = format!("index i1 {LOG_TEST_INDEX_KEY}\ndata d1 {WRONG_DATA_KEY}");
    let refused_log = dir.path().join("refused.log");
    let mut refused = serve(&data, &wrong, &refused_log);
    let status = refused.wait().await.expect("exits");
    assert!(!status.success(), "a wrong key stops the start");
    let refusal = std::fs::read_to_string(&refused_log).expect("log");
    assert!(refusal.contains("data key d1"), "{refusal}");

    let served_log = std::fs::read(&log).expect("log");
    assert!(
        served_log.windows(5).any(|w| w == b"DEBUG"),
        "the gateway logged at debug"
    );
    let logs = [served_log, refusal.into_bytes(), metrics.into_bytes()].concat();
    assert_absent("the logs and /metrics", &logs, &codes);
    for key in [LOG_TEST_DATA_KEY, LOG_TEST_INDEX_KEY, WRONG_DATA_KEY] {
        for spelling in [key.to_owned(), key.to_uppercase(), key[..16].to_owned()] {
            assert!(
                !logs
                    .windows(spelling.len())
                    .any(|w| w == spelling.as_bytes()),
                "a key's bytes reached the logs or /metrics"
            );
        }
    }
}
