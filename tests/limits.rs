//! Limiters and abuse protection end to end: gateways on port 0 over their own
//! `redis-server`, clients on different loopback addresses.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use kamigate::config::Config;
use kamigate::limit::BucketRule;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::eventually::eventually;
use support::gateway::{config, metric, TestGateway};
use support::redis_server::{RedisServer, Resp};

fn client_from(last_octet: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet)))
        .build()
        .expect("client")
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
}

async fn redeem_as(
    client: &reqwest::Client,
    gw: &TestGateway,
    code: &str,
    redeemer: &str,
) -> (StatusCode, Value, Option<String>) {
    let res = client
        .post(format!("{}/v1/redeem", gw.public))
        .json(&json!({"code": code, "redeemer": redeemer}))
        .send()
        .await
        .expect("answered");
    let status = res.status();
    let retry = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, res.json().await.unwrap_or(Value::Null), retry)
}

fn redis_config(redis: &RedisServer) -> Config {
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg
}

/// A claimed code of `sku`, for a legitimate redemption.
async fn claimed_code(gw: &TestGateway, sku: &str, order: &str) -> String {
    let (status, order) = gw.claim(sku, json!({"order_id": order})).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    order["keys"][0]["code"].as_str().expect("code").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_is_locked_out_and_redeems_nothing_while_others_are_unaffected() {
    let redis = RedisServer::start().await;
    let mut cfg = redis_config(&redis);
    cfg.limits.failed_redemptions.max_failures = 5;
    let gw = TestGateway::start(cfg).await;
    gw.stock("bf", &["REAL-0001", "REAL-0002", "REAL-0003"])
        .await;
    let attacker_target = claimed_code(&gw, "bf", "o-1").await;
    let honest_code = claimed_code(&gw, "bf", "o-2").await;

    let attacker = client_from(1);
    for i in 0..5 {
        let (status, body, _) = redeem_as(&attacker, &gw, &format!("GUESS{i:06}"), "mallory").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
    for guess in ["GUESS999999", attacker_target.as_str()] {
        let (status, body, retry) = redeem_as(&attacker, &gw, guess, "mallory").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(error_code(&body), "ERR_LOCKED_OUT");
        assert!(body["error"]["retry_after_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0 && ms <= 60_000));
        assert!(retry.is_some(), "Retry-After is set");
    }
    // Another redeemer from the same address is still locked out (per-IP window) …
    let (status, _, _) = redeem_as(&attacker, &gw, &attacker_target, "mallory-2").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // … while another client, on another address, is unaffected.
    let honest = client_from(2);
    let (status, body, _) = redeem_as(&honest, &gw, &honest_code, "alice").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        gw.counts("bf").await["redeemed"],
        1,
        "the attacker redeemed nothing"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockouts_hold_across_gateway_instances_sharing_redis() {
    let redis = RedisServer::start().await;
    let mut cfg = redis_config(&redis);
    cfg.limits.failed_redemptions.max_failures = 3;
    let a = TestGateway::start(cfg.clone()).await;
    let b = TestGateway::start(cfg).await;
    a.stock("shared", &["SHARED-1"]).await;
    let code = claimed_code(&a, "shared", "o-1").await;
    let attacker = client_from(3);
    for i in 0..3 {
        redeem_as(&attacker, &a, &format!("NOPE{i}"), "eve").await;
    }
    let (status, body, _) = redeem_as(&attacker, &b, &code, "eve").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(error_code(&body), "ERR_LOCKED_OUT");
    let (status, _, _) = redeem_as(&client_from(4), &b, &code, "bob").await;
    assert_eq!(status, StatusCode::OK);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockouts_escalate_on_repeat() {
    let redis = RedisServer::start().await;
    let mut cfg = redis_config(&redis);
    cfg.limits.failed_redemptions.max_failures = 2;
    cfg.limits.failed_redemptions.lockout_secs = 1;
    let gw = TestGateway::start(cfg).await;
    gw.stock("esc", &["ESC-1"]).await;
    let attacker = client_from(5);
    let mut lockouts = Vec::new();
    for _strike in 0..2 {
        for i in 0..2 {
            redeem_as(&attacker, &gw, &format!("X{i}"), "trudy").await;
        }
        let (status, body, _) = redeem_as(&attacker, &gw, "X9", "trudy").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        let ms = body["error"]["retry_after_ms"]
            .as_u64()
            .expect("retry_after_ms");
        lockouts.push(ms);
        // Wait the lockout out (bounded by the assertion above: at most a few seconds).
        eventually(
            Duration::from_millis(ms + 3000),
            "the lockout to end",
            || redeem_as(&attacker, &gw, "PROBE", "trudy-probe"),
            |(status, _, _)| *status != StatusCode::TOO_MANY_REQUESTS,
        )
        .await;
    }
    assert!(
        lockouts[0] <= 1000,
        "first lockout is the base: {lockouts:?}"
    );
    assert!(
        lockouts[1] > 1000,
        "the second strike doubles: {lockouts:?}"
    );
    gw.stop().await;
}

/// Records every command Redis runs from now on (the slow log with a zero threshold), so a
/// test can count the calls of one script among the gateway's background work.
async fn record_commands(redis: &RedisServer) {
    for args in [
        ["CONFIG", "SET", "slowlog-log-slower-than", "0"],
        ["CONFIG", "SET", "slowlog-max-len", "100000"],
    ] {
        redis.cmd(&args).await.expect("config set");
    }
    redis
        .cmd(&["SLOWLOG", "RESET"])
        .await
        .expect("slowlog reset");
}

/// How many times the recorded commands ran the claim script.
async fn claim_script_calls(redis: &RedisServer) -> usize {
    let claim = &kamigate::engine::SCRIPTS.claim;
    let (sha, function) = (claim.sha1(), claim.function().unwrap_or(""));
    let log = redis
        .cmd(&["SLOWLOG", "GET", "100000"])
        .await
        .expect("slowlog");
    let Resp::Array(Some(entries)) = log else {
        panic!("unexpected SLOWLOG reply: {log:?}");
    };
    entries
        .iter()
        .filter(|entry| {
            let Resp::Array(Some(fields)) = entry else {
                return false;
            };
            let Some(Resp::Array(Some(args))) = fields.get(3) else {
                return false;
            };
            let word = |i: usize| args.get(i).and_then(Resp::as_str).unwrap_or("");
            (word(0).eq_ignore_ascii_case("fcall") && word(1) == function)
                || (word(0).eq_ignore_ascii_case("evalsha") && word(1) == sha)
                || (word(0).eq_ignore_ascii_case("eval") && word(1).contains("claim.lua"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sold_out_claims_are_answered_at_the_edge_and_new_stock_sells_within_the_bound() {
    let redis = RedisServer::start().await;
    let mut cfg = redis_config(&redis);
    cfg.limits.sold_out_cache_ms = 500;
    let a = TestGateway::start(cfg.clone()).await;
    let b = TestGateway::start(cfg).await;
    a.stock("hot", &["HOT-1"]).await;
    let (status, first) = a.claim("hot", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK);
    for gw in [&a, &b] {
        let (status, body) = gw.claim("hot", json!({"order_id": "o-x"})).await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::CONFLICT, "ERR_SOLD_OUT")
        );
    }
    record_commands(&redis).await;
    for i in 0..50 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let (status, body) = gw
            .claim("hot", json!({"order_id": format!("o-{i}-late")}))
            .await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::CONFLICT, "ERR_SOLD_OUT")
        );
    }
    // A retried order still gets its codes while the edge answers sold-out.
    let (status, again) = b.claim("hot", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["keys"], first["keys"]);
    assert_eq!(
        claim_script_calls(&redis).await,
        1,
        "only the retried order reached the claim script"
    );

    // New stock through instance A: A sells at once, B within the cache bound.
    let (status, _) = a.import("hot", "HOT-2\nHOT-3\n").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = a.claim("hot", json!({"order_id": "o-new-a"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(
        Duration::from_millis(500 + 400),
        "instance B to sell the returned stock within the documented bound",
        || async {
            let (status, body) = b.claim("hot", json!({"order_id": "o-new-b"})).await;
            if status != StatusCode::OK {
                assert_eq!(error_code(&body), "ERR_SOLD_OUT");
            }
            (status, body)
        },
        |(status, _)| *status == StatusCode::OK,
    )
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let mut cfg = config();
    cfg.limits.public = BucketRule::enforced(1, 2);
    let gw = TestGateway::start(cfg).await;
    let client = client_from(6);
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..4 {
        let (status, body, retry) = redeem_as(&client, &gw, "ANY-CODE", "u-1").await;
        statuses.push(status);
        last = Some((body, retry));
    }
    assert_eq!(
        &statuses[..2],
        [StatusCode::NOT_FOUND, StatusCode::NOT_FOUND]
    );
    assert_eq!(statuses[3], StatusCode::TOO_MANY_REQUESTS);
    let (body, retry) = last.expect("answers");
    assert_eq!(error_code(&body), "ERR_RATE_LIMITED");
    assert!(body["error"]["retry_after_ms"]
        .as_u64()
        .is_some_and(|ms| ms > 0 && ms <= 1000));
    assert_eq!(retry.as_deref(), Some("1"));
    // Another client has its own bucket.
    let (status, _, _) = redeem_as(&client_from(7), &gw, "ANY-CODE", "u-2").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    gw.stop().await;
}

#[tokio::test]
async fn merchant_tokens_have_their_own_bucket() {
    let mut cfg = config();
    cfg.limits.merchant = BucketRule::enforced(1, 1);
    let gw = TestGateway::start(cfg).await;
    gw.stock("m", &["M-1", "M-2"]).await;
    let (status, _) = gw.claim("m", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = gw.claim("m", json!({"order_id": "o-2"})).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "ERR_RATE_LIMITED")
    );
    gw.stop().await;
}

#[tokio::test]
async fn shadow_mode_blocks_nothing_but_counts() {
    let mut cfg = config();
    cfg.limits.public = BucketRule {
        shadow: true,
        ..BucketRule::enforced(1, 1)
    };
    let gw = TestGateway::start(cfg).await;
    let client = client_from(8);
    for _ in 0..5 {
        let (status, _, _) = redeem_as(&client, &gw, "SHADOW-CODE", "u-1").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "shadow mode never blocks");
    }
    let shadowed = metric(
        &gw.metrics().await,
        "kamigate_limiter_decisions_total",
        &["rule=\"public\"", "decision=\"shadow_deny\""],
    )
    .unwrap_or(0.0);
    assert!(shadowed >= 4.0, "shadow denials are counted: {shadowed}");
    gw.stop().await;
}

#[tokio::test]
async fn overload_is_shed_with_503_and_retry_after() {
    let mut cfg = config();
    cfg.limits.max_in_flight = 1;
    let gw = TestGateway::start(cfg).await;
    // Hold the only slot with a request whose body is still arriving.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(futures_util::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    }));
    let slow = tokio::spawn(
        gw.client
            .post(format!("{}/v1/redeem", gw.public))
            .body(body)
            .send(),
    );
    tx.send(Ok("{\"code\":".into())).await.expect("sent");
    let (status, body, retry) = eventually(
        Duration::from_secs(5),
        "a request to be shed",
        || async { redeem_as(&client_from(9), &gw, "X", "u").await },
        |(status, _, _)| *status == StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&body), "ERR_UNAVAILABLE");
    assert!(retry.is_some());
    tx.send(Ok("\"ABC\",\"redeemer\":\"u\"}".into()))
        .await
        .expect("sent");
    drop(tx);
    let res = slow.await.expect("task").expect("answered");
    assert_eq!(
        res.status(),
        StatusCode::NOT_FOUND,
        "the admitted request completed"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_fail_closed_or_open_when_redis_is_down() {
    for fail_open in [false, true] {
        let mut redis = RedisServer::start().await;
        let mut cfg = redis_config(&redis);
        cfg.limits.failed_redemptions.max_failures = 10;
        cfg.limits.failed_redemptions.fail_open = fail_open;
        let gw = TestGateway::start(cfg).await;
        gw.stock("fo", &["FO-1"]).await;
        redis.kill9();
        let (status, body, _) = redeem_as(&client_from(10), &gw, "FO-1", "u-1").await;
        // The redemption itself needs the engine either way: 503 both times; the metric
        // tells which path the window rule took.
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let metrics = gw.metrics().await;
        let decision = if fail_open {
            "fail_open"
        } else {
            "fail_closed"
        };
        let decision_label = format!("decision=\"{decision}\"");
        let counted = metric(
            &metrics,
            "kamigate_limiter_decisions_total",
            &["rule=\"failed_redemptions\"", &decision_label],
        );
        // Every decision of an enabled rule is registered at 0 from the start: counted
        // means above 0.
        assert!(
            counted.is_some_and(|n| n > 0.0),
            "the {decision} path is counted"
        );
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_script_calls_are_measured_and_failed_checks_counted() {
    let mut redis = RedisServer::start().await;
    let mut cfg = redis_config(&redis);
    cfg.limits.failed_redemptions.max_failures = 10;
    let gw = TestGateway::start(cfg).await;
    let window = ["script=\"window\"", "engine=\"redis\""];
    let calls = |text: &str| {
        metric(
            text,
            "kamigate_engine_script_duration_seconds_count",
            &window,
        )
        .unwrap_or(0.0)
    };
    let fail_open = |text: &str| {
        metric(
            text,
            "kamigate_limiter_decisions_total",
            &["rule=\"failed_redemptions\"", "decision=\"fail_open\""],
        )
        .unwrap_or(0.0)
    };
    let client = client_from(13);
    let before = gw.metrics().await;
    for i in 0..3 {
        let (status, body, _) = redeem_as(&client, &gw, &format!("MISS{i:06}"), "u-13").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
    let after = gw.metrics().await;
    // Each failed redemption is counted against the client and the redeemer by window.lua:
    // two script calls (the checks before it are plain reads). Other tests of this binary
    // may add their own.
    assert!(
        calls(&after) - calls(&before) >= 6.0,
        "window.lua calls are timed: {} before, {} after",
        calls(&before),
        calls(&after)
    );

    redis.kill9();
    let (status, body, _) = redeem_as(&client, &gw, "MISS999999", "u-13").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let down = gw.metrics().await;
    assert!(
        fail_open(&down) - fail_open(&after) >= 2.0,
        "both window checks failed and were counted: {} before, {} after",
        fail_open(&after),
        fail_open(&down)
    );
    gw.stop().await;
}

#[tokio::test]
async fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
    let mut cfg = config();
    cfg.limits.public = BucketRule::enforced(1, 1);
    cfg.limits.trusted_proxies = vec!["127.0.0.11/32".parse().expect("net")];
    let gw = TestGateway::start(cfg).await;
    let proxy = client_from(11);
    let send = |client: &reqwest::Client, xff: &str| {
        client
            .post(format!("{}/v1/redeem", gw.public))
            .header("x-forwarded-for", xff.to_owned())
            .json(&json!({"code": "ABC", "redeemer": "u"}))
            .send()
    };
    // Through the trusted proxy, two different forwarded clients each get their own bucket.
    assert_eq!(
        send(&proxy, "198.51.100.1").await.expect("ok").status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(&proxy, "198.51.100.2").await.expect("ok").status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(&proxy, "198.51.100.1").await.expect("ok").status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // An untrusted client cannot pick its own address by sending the header.
    let direct = client_from(12);
    assert_eq!(
        send(&direct, "198.51.100.3").await.expect("ok").status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(&direct, "198.51.100.4").await.expect("ok").status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_for_more_than_remains_does_not_turn_other_orders_away() {
    let gw = TestGateway::embedded().await;
    let codes: Vec<String> = (0..50).map(|i| format!("BIG-{i:03}")).collect();
    gw.stock("big", &codes.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    for round in 0..3 {
        let (status, body) = gw
            .claim(
                "big",
                json!({"order_id": format!("greedy-{round}"), "quantity": 100}),
            )
            .await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::CONFLICT, "ERR_SOLD_OUT")
        );
        // Right after, not after the sold-out cache's lifetime: the codes left still sell.
        let (status, body) = gw
            .claim("big", json!({"order_id": format!("one-{round}")}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, body) = gw
        .claim("big", json!({"order_id": "rest", "quantity": 47}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = gw.claim("big", json!({"order_id": "late"})).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "ERR_SOLD_OUT"),
        "now it is sold out for everyone"
    );
    gw.stop().await;
}
