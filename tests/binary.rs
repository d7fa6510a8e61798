//! The `kamigate` binary itself: `serve` from environment variables until SIGTERM, `import`
//! and `gen`.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use support::eventually::eventually;
use support::gateway::{free_port, wait_ready};

const BIN: &str = env!("CARGO_BIN_EXE_kamigate");

#[tokio::test]
async fn serve_generates_tokens_serves_and_exits_cleanly_on_sigterm() {
    let (public, admin) = (free_port(), free_port());
    let data = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(BIN)
        .arg("serve")
        .env("KAMIGATE_LISTEN", format!("127.0.0.1:{public}"))
        .env("KAMIGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("KAMIGATE_DATA_DIR", data.path())
        .env_remove("KAMIGATE_REDIS_URL")
        .env_remove("KAMIGATE_ADMIN_TOKEN")
        .env_remove("KAMIGATE_MERCHANT_TOKEN")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kamigate starts");

    // stderr is a pipe, not a terminal: the generated tokens stay out of it, and the log
    // names the file in the data dir that keeps them.
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut log = Vec::new();
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            let named = line.contains("tokens.toml");
            log.push(line);
            if named {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the token file named in time");
    let (merchant, admin_token) = kept_tokens(data.path());
    assert_eq!(merchant.len(), 64);
    assert_ne!(merchant, admin_token);
    // Keep draining stderr so the child never blocks on a full pipe.
    let log_task = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });

    wait_ready(
        &format!("http://127.0.0.1:{admin}"),
        Duration::from_secs(10),
    )
    .await;
    let client = support::gateway::client();
    let put = client
        .put(format!("http://127.0.0.1:{admin}/v1/skus/bin"))
        .bearer_auth(&admin_token)
        .json(&json!({}))
        .send()
        .await
        .expect("answered");
    assert_eq!(put.status(), StatusCode::CREATED);
    let import = client
        .post(format!(
            "http://127.0.0.1:{admin}/v1/skus/bin/batches?batch_id=b1"
        ))
        .bearer_auth(&admin_token)
        .body("SECRET-ONE\nSECRET-TWO\n")
        .send()
        .await
        .expect("answered");
    assert_eq!(import.status(), StatusCode::OK);
    let order: Value = client
        .post(format!("http://127.0.0.1:{public}/v1/skus/bin/claims"))
        .bearer_auth(&merchant)
        .json(&json!({"order_id": "o-1"}))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    let code = order["keys"][0]["code"].as_str().expect("code").to_owned();
    let redeemed = client
        .post(format!("http://127.0.0.1:{public}/v1/redeem"))
        .json(&json!({"code": code, "redeemer": "user-1"}))
        .send()
        .await
        .expect("answered");
    assert_eq!(redeemed.status(), StatusCode::OK);

    terminate(child, None).await;
    let rest = log_task.await.expect("log");
    let all = log
        .iter()
        .chain(&rest)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    for secret in ["SECRETONE", "SECRETTWO", "SECRET-ONE", code.as_str()] {
        assert!(!all.contains(secret), "a code reached the logs");
    }
    for token in [&merchant, &admin_token] {
        assert!(!all.contains(token.as_str()), "a token reached the logs");
    }
}

/// The merchant and admin tokens kept in `data`'s token file.
fn kept_tokens(data: &std::path::Path) -> (String, String) {
    let text = std::fs::read_to_string(data.join("tokens.toml")).expect("token file read");
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(" = "))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| panic!("{name} in the token file: {text}"))
    };
    (value("merchant_token"), value("admin_token"))
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn gen_prints_valid_codes() {
    let out = std::process::Command::new(BIN)
        .args([
            "gen", "--count", "50", "--length", "12", "--group", "4", "--check",
        ])
        .output()
        .expect("gen runs");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let codes: Vec<&str> = text.lines().collect();
    assert_eq!(codes.len(), 50);
    let format = kamigate::code::Format::crockford32(12, 4, true);
    for code in &codes {
        assert_eq!(code.len(), 14, "grouped XXXX-XXXX-XXXX: {code}");
        format
            .validate(code)
            .expect("every generated code validates");
    }
    let distinct: std::collections::HashSet<_> = codes.iter().collect();
    assert_eq!(distinct.len(), 50);
}

/// `gen --sku` prints codes of the SKU's format as its ledger records it, in its display
/// form, and they import into it without a reject; an unknown SKU is told with its remedy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_for_a_sku_prints_codes_of_its_format() {
    let data = tempfile::tempdir().expect("temp dir");
    let mut cfg = support::gateway::config();
    cfg.data_dir = data.path().to_owned();
    let gw = support::gateway::TestGateway::start(cfg).await;
    let format = json!({"charset":"0123456789","min_length":10,"max_length":10,"group_size":5,"check":"luhn"});
    let (status, body) = gw.put_sku("digits", json!({ "format": format })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let gen = |sku: &str| {
        std::process::Command::new(BIN)
            .args(["gen", "--sku", sku, "--count", "20"])
            .env("KAMIGATE_DATA_DIR", data.path())
            .env_remove("KAMIGATE_DATABASE_URL")
            .env("RUST_LOG", "warn")
            .output()
            .expect("gen runs")
    };
    let out = gen("digits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let format: kamigate::code::Format = serde_json::from_value(format).expect("format");
    for code in text.lines() {
        let canonical = format.validate(code).expect("a code of the SKU's format");
        assert_eq!(
            format.display(&canonical),
            code,
            "shown as the SKU shows it"
        );
    }
    let (status, report) = gw.import("digits", text.clone()).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["accepted"], 20, "{report}");

    let out = gen("nope");
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("SKU nope not found: create it first"),
        "{error}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_command_feeds_the_ledger_and_a_running_gateway_picks_it_up() {
    let data = tempfile::tempdir().expect("temp dir");
    let mut cfg = support::gateway::config();
    cfg.data_dir = data.path().to_owned();
    let gw = support::gateway::TestGateway::start(cfg).await;
    gw.put_sku("cli", json!({})).await;
    let file = data.path().join("codes.csv");
    let mut csv = String::from("code,max_uses\n");
    for i in 0..2500 {
        csv.push_str(&format!("CLI-{i:06},\n"));
    }
    csv.push_str("bad code!,\n");
    std::fs::write(&file, csv).expect("file written");

    let run = || {
        std::process::Command::new(BIN)
            .args([
                "import",
                file.to_str().expect("utf-8 path"),
                "--sku",
                "cli",
                "--batch",
                "b1",
            ])
            .env("KAMIGATE_DATA_DIR", data.path())
            .env_remove("KAMIGATE_REDIS_URL")
            .env_remove("KAMIGATE_DATABASE_URL")
            // The running gateway's keys: it must open what the import seals.
            .env("KAMIGATE_DATA_KEY", support::gateway::DATA_KEY)
            .env("RUST_LOG", "warn")
            .output()
            .expect("import runs")
    };
    let out = run();
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{summary}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        summary.contains("2500 accepted, 1 rejected, 0 duplicate"),
        "{summary}"
    );
    assert!(
        summary.contains("line 2502"),
        "rejected lines are listed: {summary}"
    );
    assert!(!summary.contains("bad code"), "codes are never echoed");

    eventually(
        Duration::from_secs(20),
        "the gateway to load the batch",
        || gw.counts("cli"),
        |counts| counts["available"] == 2500,
    )
    .await;
    let again = run();
    let summary = String::from_utf8_lossy(&again.stdout).into_owned();
    assert!(
        summary.contains("imported before: nothing added"),
        "{summary}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_and_reconcile_commands_work_against_redis() {
    let redis = support::redis_server::RedisServer::start().await;
    let data = tempfile::tempdir().expect("temp dir");
    let mut cfg = support::gateway::config();
    cfg.data_dir = data.path().to_owned();
    cfg.redis_url = Some(redis.url());
    let gw = support::gateway::TestGateway::start(cfg).await;
    gw.stock("ops", &["OPS-1", "OPS-2", "OPS-3"]).await;
    gw.stop().await;

    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(args)
            .env("KAMIGATE_DATA_DIR", data.path())
            .env("KAMIGATE_REDIS_URL", redis.url())
            .env_remove("KAMIGATE_DATABASE_URL")
            // The keys the test gateway sealed the ledger's codes with.
            .env("KAMIGATE_DATA_KEY", support::gateway::DATA_KEY)
            .env("RUST_LOG", "error")
            .output()
            .expect("command runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let report = run(&["reconcile", "--sku", "ops"]);
    assert!(
        report.contains("ops: 3 checked, 0 missing in engine"),
        "{report}"
    );
    let warm = run(&["warm", "--sku", "ops"]);
    assert!(warm.contains("ops: 0 loaded, 3 already present"), "{warm}");

    redis.cmd(&["FLUSHALL"]).await.expect("flushed");
    let warm = run(&["warm"]);
    assert!(warm.contains("ops: 3 loaded"), "{warm}");
    let report = run(&["reconcile", "--repair"]);
    assert!(
        report.contains("ops: 3 checked, 0 missing in engine, 0 ledger ahead"),
        "{report}"
    );
}

/// An import whose codes reach the ledger but not Redis (full: `maxmemory` with
/// `noeviction`) fails, saying what was imported and how to load it; `kamigate warm` then
/// loads it once Redis has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_redis_cannot_take_says_it_is_in_the_ledger_and_how_to_load_it() {
    let redis =
        support::redis_server::RedisServer::start_with(&["--maxmemory-policy", "noeviction"]).await;
    let data = tempfile::tempdir().expect("temp dir");
    let mut cfg = support::gateway::config();
    cfg.data_dir = data.path().to_owned();
    cfg.redis_url = Some(redis.url());
    let gw = support::gateway::TestGateway::start(cfg).await;
    gw.put_sku("full", json!({})).await;
    gw.stop().await;
    let file = data.path().join("codes.txt");
    let codes: String = (0..5000).map(|i| format!("FULL-{i:06}\n")).collect();
    std::fs::write(&file, codes).expect("file written");
    // Room for the import's first steps, not for 5,000 codes.
    let used = match redis.cmd(&["MEMORY", "STATS"]).await.expect("stats") {
        support::redis_server::Resp::Array(Some(stats)) => stats
            .chunks(2)
            .find(|pair| pair[0].as_str() == Some("total.allocated"))
            .and_then(|pair| pair[1].as_int())
            .expect("total.allocated"),
        other => panic!("MEMORY STATS: {other:?}"),
    };
    let limit = (used + 256 * 1024).to_string();
    redis
        .cmd(&["CONFIG", "SET", "maxmemory", &limit])
        .await
        .expect("limited");

    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("KAMIGATE_DATA_DIR", data.path())
            .env("KAMIGATE_REDIS_URL", redis.url())
            .env_remove("KAMIGATE_DATABASE_URL")
            .env("KAMIGATE_DATA_KEY", support::gateway::DATA_KEY)
            .env("RUST_LOG", "error")
            .output()
            .expect("command runs")
    };
    let file = file.to_str().expect("utf-8 path");
    let out = run(&["import", file, "--sku", "full", "--batch", "b1"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("batch b1 was imported (5000 codes accepted, 0 duplicate, 0 rejected), but loading it into Redis failed")
            && said.contains("`kamigate warm --sku full` or a running gateway loads it"),
        "{said}"
    );

    redis
        .cmd(&["CONFIG", "SET", "maxmemory", "0"])
        .await
        .expect("unlimited");
    let out = run(&["warm", "--sku", "full"]);
    let warm = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{warm}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["reconcile", "--sku", "full"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("full: 5000 checked, 0 missing in engine"),
        "{warm}{report}"
    );
}

/// Runs operator command `command` against the embedded engine: it must refuse (the
/// engine would be thrown away with the process) and point to `pointer` instead.
fn refuses_the_embedded_engine(command: &str, pointer: &str) {
    let data = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new(BIN)
        .args([command])
        .env("KAMIGATE_DATA_DIR", data.path())
        .env_remove("KAMIGATE_REDIS_URL")
        .output()
        .expect("command runs");
    assert!(!out.status.success(), "{command} succeeded");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(pointer), "{command}: {said}");
}

#[test]
fn reconcile_refuses_the_embedded_engine_with_a_pointer() {
    refuses_the_embedded_engine("reconcile", "POST /v1/reconcile");
}

#[test]
fn warm_refuses_the_embedded_engine_with_a_pointer() {
    refuses_the_embedded_engine("warm", "POST /v1/skus/{sku}/warm");
}

/// Starts `serve` on the embedded engine with data dir `data` on fresh ports.
fn serve_on(data: &std::path::Path) -> (tokio::process::Child, u16) {
    let (public, admin) = (free_port(), free_port());
    let child = Command::new(BIN)
        .arg("serve")
        .env("KAMIGATE_LISTEN", format!("127.0.0.1:{public}"))
        .env("KAMIGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("KAMIGATE_DATA_DIR", data)
        .env("KAMIGATE_ADMIN_TOKEN", "admin-token-for-tests-0001")
        .env("KAMIGATE_MERCHANT_TOKEN", "merchant-token-for-tests-01")
        .env_remove("KAMIGATE_REDIS_URL")
        .env_remove("KAMIGATE_DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kamigate starts");
    (child, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_a_data_dir_in_use_refuses_to_start_until_the_first_is_gone() {
    let data = tempfile::tempdir().expect("temp dir");
    let (mut first, admin) = serve_on(data.path());
    wait_ready(
        &format!("http://127.0.0.1:{admin}"),
        Duration::from_secs(20),
    )
    .await;

    let (second, _) = serve_on(data.path());
    let out = tokio::time::timeout(Duration::from_secs(20), second.wait_with_output())
        .await
        .expect("the second gateway gives up at once")
        .expect("waited");
    assert!(!out.status.success(), "the second gateway must not run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another kamigate"),
        "the refusal says why: {stderr}"
    );
    let pid = first.id().expect("running").to_string();
    assert!(stderr.contains(&pid), "and who holds it: {stderr}");

    // A crash releases the lock: no stale lock file to clean up.
    first.start_kill().expect("SIGKILL sent");
    first.wait().await.expect("reaped");
    let (mut third, admin) = serve_on(data.path());
    wait_ready(
        &format!("http://127.0.0.1:{admin}"),
        Duration::from_secs(20),
    )
    .await;
    third.start_kill().expect("SIGKILL sent");
    third.wait().await.expect("reaped");
}

/// Starts `serve` on the embedded engine with data dir `data` on fresh ports, its stderr
/// written to the file `log` (not a terminal), with `env` added. Returns the child and the
/// public and admin ports.
fn serve_logging_to(
    data: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> (tokio::process::Child, u16, u16) {
    let (public, admin) = (free_port(), free_port());
    let log = std::fs::File::create(log).expect("log file");
    let mut command = Command::new(BIN);
    command
        .arg("serve")
        .env("KAMIGATE_LISTEN", format!("127.0.0.1:{public}"))
        .env("KAMIGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("KAMIGATE_DATA_DIR", data)
        .env_remove("KAMIGATE_REDIS_URL")
        .env_remove("KAMIGATE_DATABASE_URL")
        .env_remove("KAMIGATE_ADMIN_TOKEN")
        .env_remove("KAMIGATE_MERCHANT_TOKEN")
        .env_remove("KAMIGATE_LOG_JSON")
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    (command.spawn().expect("kamigate starts"), public, admin)
}

/// Sends SIGTERM to `child` and waits for its clean exit. If it does not exit, the failure
/// shows `log` (the gateway's log file), which tells where its shutdown stopped.
async fn terminate(mut child: tokio::process::Child, log: Option<&Path>) {
    let pid = child.id().expect("running") as i32;
    // SAFETY: signalling our own child process by its pid.
    assert_eq!(unsafe { libc_kill(pid, 15) }, 0);
    let Ok(exited) = tokio::time::timeout(Duration::from_secs(15), child.wait()).await else {
        let text = log.map(|log| std::fs::read_to_string(log).unwrap_or_default());
        panic!(
            "no exit within 15 s of SIGTERM; its log:\n{}",
            text.unwrap_or_default()
        );
    };
    let status = exited.expect("wait");
    assert!(status.success(), "clean exit: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_written_to_a_file_carry_no_colour_codes() {
    let data = tempfile::tempdir().expect("temp dir");
    let log = data.path().join("serve.log");
    let (child, _, admin) = serve_logging_to(&data.path().join("data"), &log, &[]);
    wait_ready(
        &format!("http://127.0.0.1:{admin}"),
        Duration::from_secs(20),
    )
    .await;
    terminate(child, Some(&log)).await;
    let bytes = std::fs::read(&log).expect("log read");
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("kamigate is serving"), "{text}");
    assert!(
        !bytes.contains(&0x1b),
        "an escape code reached the log: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_addresses_may_name_a_host() {
    let data = tempfile::tempdir().expect("temp dir");
    let log = data.path().join("serve.log");
    let (public, admin) = (free_port(), free_port());
    let (public_at, admin_at) = (format!("localhost:{public}"), format!("localhost:{admin}"));
    let (child, _, _) = serve_logging_to(
        &data.path().join("data"),
        &log,
        &[
            ("KAMIGATE_LISTEN", &public_at),
            ("KAMIGATE_ADMIN_LISTEN", &admin_at),
        ],
    );
    wait_ready(
        &format!("http://127.0.0.1:{admin}"),
        Duration::from_secs(20),
    )
    .await;
    let answer = reqwest::get(format!("http://{public_at}/v1/no-such-route"))
        .await
        .expect("the public listener answers on localhost");
    assert_eq!(answer.status(), StatusCode::NOT_FOUND);
    terminate(child, Some(&log)).await;

    let out = std::process::Command::new(BIN)
        .arg("serve")
        .env("KAMIGATE_LISTEN", "no-such-host.invalid:8080")
        .env("KAMIGATE_DATA_DIR", data.path().join("data"))
        .output()
        .expect("command runs");
    assert_eq!(out.status.code(), Some(2), "a configuration error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("KAMIGATE_LISTEN") && stderr.contains("does not resolve"),
        "{stderr}"
    );
}

#[test]
fn import_into_an_unknown_sku_says_how_to_create_it() {
    let data = tempfile::tempdir().expect("temp dir");
    let file = data.path().join("codes.txt");
    std::fs::write(&file, "CODE-1\n").expect("file written");
    let out = std::process::Command::new(BIN)
        .args(["import", file.to_str().expect("utf-8 path")])
        .args(["--sku", "nosuch", "--batch", "b1"])
        .env("KAMIGATE_DATA_DIR", data.path().join("data"))
        .env_remove("KAMIGATE_REDIS_URL")
        .env_remove("KAMIGATE_DATABASE_URL")
        .output()
        .expect("command runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "kamigate: SKU nosuch not found: create it first with PUT /v1/skus/nosuch on the \
             admin listener\n"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.matches("not found").count(), 1, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_tokens_survive_a_restart_and_stay_out_of_the_log() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut seen = Vec::new();
    for (start, json) in [("first", "0"), ("second", "1")] {
        let log = dir.path().join(format!("{start}.log"));
        let (child, public, admin) = serve_logging_to(&data, &log, &[("KAMIGATE_LOG_JSON", json)]);
        wait_ready(
            &format!("http://127.0.0.1:{admin}"),
            Duration::from_secs(20),
        )
        .await;
        let file = data.join("tokens.toml");
        let mode = std::fs::metadata(&file)
            .expect("token file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "only its owner reads the token file");
        let (merchant, admin_token) = kept_tokens(&data);
        let client = support::gateway::client();
        let created = client
            .put(format!("http://127.0.0.1:{admin}/v1/skus/{start}"))
            .bearer_auth(&admin_token)
            .json(&json!({}))
            .send()
            .await
            .expect("answered");
        assert_eq!(created.status(), StatusCode::CREATED, "{start} start");
        let counts = client
            .get(format!("http://127.0.0.1:{public}/v1/skus/{start}"))
            .bearer_auth(&merchant)
            .send()
            .await
            .expect("answered");
        assert_eq!(counts.status(), StatusCode::OK, "{start} start");
        terminate(child, Some(&log)).await;

        let text = std::fs::read_to_string(&log).expect("log read");
        assert!(
            text.contains(&file.display().to_string()),
            "the log names the token file: {text}"
        );
        for token in [&merchant, &admin_token] {
            assert!(
                !text.contains(token.as_str()),
                "a token reached the log: {text}"
            );
        }
        seen.push((merchant, admin_token));
    }
    assert_eq!(seen[0], seen[1], "the same tokens after a restart");
}

/// The line `serve` logs when shutdown begins, once it is in `log`.
async fn shutdown_line(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .find(|l| l.contains("shutting down: readiness is now 503"))
        .unwrap_or_else(|| panic!("no shutdown line in: {text}"))
        .to_owned()
}

/// The shutdown delay is for load balancers to notice readiness turn 503: a gateway nobody
/// probes and nobody is connected to stops without it; one whose readiness was probed keeps
/// the configured delay (2 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_delay_is_taken_only_when_something_may_route_here() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("unwatched.log");
    let (child, _, _) = serve_logging_to(&dir.path().join("a"), &log, &[]);
    eventually(
        Duration::from_secs(20),
        "the gateway to say it serves",
        || async { std::fs::read_to_string(&log).unwrap_or_default() },
        |text| text.contains("kamigate is serving"),
    )
    .await;
    terminate(child, Some(&log)).await;
    let line = shutdown_line(&log).await;
    assert!(line.contains("delay_ms=0"), "{line}");

    let log = dir.path().join("watched.log");
    let (child, _, admin) = serve_logging_to(&dir.path().join("b"), &log, &[]);
    wait_ready(
        &format!("http://127.0.0.1:{admin}"),
        Duration::from_secs(20),
    )
    .await;
    terminate(child, Some(&log)).await;
    let line = shutdown_line(&log).await;
    assert!(line.contains("delay_ms=2000"), "{line}");

    // Never probed, but a client holds a connection to the public listener.
    let log = dir.path().join("connected.log");
    let (child, public, _) = serve_logging_to(&dir.path().join("c"), &log, &[]);
    // Serving first: while starting, the listeners answer one request per connection.
    eventually(
        Duration::from_secs(20),
        "the gateway to say it serves",
        || async { std::fs::read_to_string(&log).unwrap_or_default() },
        |text| text.contains("kamigate is serving"),
    )
    .await;
    let client = support::gateway::client();
    let health = format!("http://127.0.0.1:{public}/healthz");
    eventually(
        Duration::from_secs(20),
        "the public listener to answer",
        || async { client.get(&health).send().await.map(|r| r.status()).ok() },
        |status| *status == Some(StatusCode::OK),
    )
    .await;
    terminate(child, Some(&log)).await;
    let line = shutdown_line(&log).await;
    assert!(line.contains("delay_ms=2000"), "{line}");
    drop(client);
}
