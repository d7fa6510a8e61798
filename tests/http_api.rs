//! The HTTP API end to end: a gateway on port 0, a real client, every documented error.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::http::{route_table, Auth, Listener};
use kamigate::inventory::{Inventory, NewCode};
use kamigate::limit::BucketRule;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::clock::ManualClock;
use support::eventually::eventually;
use support::gateway::{config, TestGateway, ADMIN_TOKEN, MERCHANT_TOKEN};
use support::redis_server::RedisServer;

fn code_of(order: &Value) -> String {
    order["keys"][0]["code"]
        .as_str()
        .expect("a final claim carries its code")
        .to_owned()
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

#[tokio::test]
async fn walkthrough_create_import_claim_redeem() {
    let gw = TestGateway::embedded().await;
    let (status, body) = gw.put_sku("gift-50", json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = gw.put_sku("gift-50", json!({"max_uses": 1})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["created"], false);

    let (status, report) = gw
        .import("gift-50", "AAAA-1111\nBBBB-2222\ncccc 3333\n")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["accepted"], 3);

    let (status, order) = gw
        .claim("gift-50", json!({"order_id": "o-1", "user_id": "u-9"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["state"], "claimed");
    assert_eq!(order["replayed"], false);
    let code = code_of(&order);

    let (status, redeemed) = gw
        .redeem(json!({"code": code, "redeemer": "user-42"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{redeemed}");
    assert_eq!(redeemed["state"], "redeemed");
    assert_eq!(redeemed["sku"], "gift-50");
    assert_eq!(redeemed["key_id"], order["keys"][0]["key_id"]);

    let (status, used) = gw
        .redeem(json!({"code": code, "redeemer": "user-77", "sku": "gift-50"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&used), "ERR_CARD_USED");
    assert_eq!(used["error"]["redeemer"], "us****42");
    assert_eq!(used["error"]["redeemed_at"], redeemed["redeemed_at"]);

    let counts = gw.counts("gift-50").await;
    assert_eq!(
        counts,
        json!({"available": 2, "held": 0, "claimed": 0, "redeemed": 1, "void": 0})
    );
    gw.stop().await;
}

#[tokio::test]
async fn tokens_guard_merchant_and_admin_routes() {
    let gw = TestGateway::embedded().await;
    gw.stock("s", &["CODE1"]).await;
    let claims = format!("{}/v1/skus/s/claims", gw.public);
    for token in [None, Some("wrong"), Some(ADMIN_TOKEN)] {
        let mut req = gw.client.post(&claims).json(&json!({"order_id": "o-1"}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.expect("answered");
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "token {token:?}");
        let body: Value = res.json().await.expect("json");
        assert_eq!(error_code(&body), "ERR_UNAUTHORIZED");
    }
    let admin_put = gw
        .client
        .put(format!("{}/v1/skus/t", gw.admin))
        .bearer_auth(MERCHANT_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .expect("answered");
    assert_eq!(admin_put.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = gw.merchant_get("/v1/skus/t").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was created");
    assert_eq!(gw.counts("s").await["available"], 1, "nothing was claimed");
    gw.stop().await;
}

/// A path that `pattern` matches, naming SKU `s`, its first key and an order of it.
fn path_of(pattern: &str) -> String {
    let path = pattern
        .replace("{sku}", "s")
        .replace("{order_id}", "o-1")
        .replace("{batch_id}", "b1")
        .replace("{version}", "1")
        .replace("{key_id}", "s.1")
        .replace("{channel}", "c")
        .replace("{token_id}", "tok-1");
    assert!(
        !path.contains('{'),
        "a parameter this test cannot fill: {pattern}"
    );
    path
}

/// Walks the route table the router serves: every admin route refuses no token, a wrong
/// one and the merchant token; every merchant route refuses no token, a wrong one and the
/// admin token; each with `401 ERR_UNAUTHORIZED`, before its handler could change anything.
#[tokio::test]
async fn every_route_refuses_callers_without_the_token_its_table_entry_declares() {
    let gw = TestGateway::embedded().await;
    gw.stock("s", &["CODE1"]).await;
    let (status, order) = gw
        .claim("s", json!({"order_id": "o-1", "hold_ms": 600_000}))
        .await;
    assert_eq!(status, StatusCode::OK, "{order}");
    let mut refused = 0;
    for (listener, route) in route_table() {
        let base = match listener {
            Listener::Public => &gw.public,
            Listener::Admin => &gw.admin,
        };
        let url = format!("{base}{}", path_of(route.pattern));
        let wrong: &[Option<&str>] = match route.auth {
            Auth::None => &[None],
            Auth::Merchant => &[None, Some("wrong-token-0000000001"), Some(ADMIN_TOKEN)],
            Auth::Admin => &[None, Some("wrong-token-0000000001"), Some(MERCHANT_TOKEN)],
        };
        for method in route.methods {
            for token in wrong {
                let mut req = gw
                    .client
                    .request(method.clone(), &url)
                    .json(&json!({"order_id": "o-2", "reason": "r", "action": "claims"}));
                if let Some(token) = token {
                    req = req.bearer_auth(token);
                }
                let res = req.send().await.expect("answered");
                let status = res.status();
                let what = format!("{listener:?} {method} {url} with token {token:?}");
                if route.auth == Auth::None {
                    assert_ne!(status, StatusCode::UNAUTHORIZED, "{what} needs no token");
                    continue;
                }
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
                assert_eq!(
                    res.headers()
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok()),
                    Some("Bearer realm=\"kamigate\""),
                    "{what} names the scheme it wants"
                );
                assert_eq!(
                    res.headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok()),
                    Some("application/json"),
                    "{what}"
                );
                let body: Value = res.json().await.expect("json");
                assert_eq!(error_code(&body), "ERR_UNAUTHORIZED", "{what}: {body}");
                assert!(body["error"]["message"].is_string(), "{what}: {body}");
                refused += 1;
            }
        }
    }
    // 8 merchant routes (a channel's statement and reconcile among them); 25 admin routes,
    // a SKU's and a channel's with both GET and PUT.
    assert_eq!(refused, 3 * (8 + 27), "every guarded route was tried");
    let (status, view) = gw.merchant_get("/v1/skus/s").await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(
        view["engine"],
        json!({"available": 0, "held": 1, "claimed": 0, "redeemed": 0, "void": 0}),
        "nothing changed: {view}"
    );
    let (status, held) = gw.merchant_get("/v1/skus/s/claims/o-1").await;
    assert_eq!(status, StatusCode::OK, "{held}");
    assert_eq!(held["state"], "held", "{held}");
    gw.stop().await;
}

/// `openapi.yaml` declares for every route the token the route table requires (`security`
/// and a `401` answer), and documents no route the table lacks.
#[test]
fn the_openapi_spec_declares_the_token_each_route_requires() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("openapi.yaml");
    let spec: serde_yaml::Value = serde_yaml::from_str(&text).expect("openapi.yaml parses");
    let mut served = std::collections::HashSet::new();
    for (listener, route) in route_table() {
        for method in route.methods {
            let what = format!("{listener:?} {method} {}", route.pattern);
            let operation = &spec["paths"][route.pattern][method.as_str().to_lowercase()];
            assert!(operation.is_mapping(), "{what} is not in openapi.yaml");
            let schemes: Vec<&str> = operation["security"]
                .as_sequence()
                .unwrap_or_else(|| panic!("{what}: no `security` in openapi.yaml"))
                .iter()
                .filter_map(serde_yaml::Value::as_mapping)
                .flat_map(|requirement| requirement.keys().filter_map(|k| k.as_str()))
                .collect();
            let scheme = match route.auth {
                Auth::None => None,
                Auth::Merchant => Some("merchantToken"),
                Auth::Admin => Some("adminToken"),
            };
            match scheme {
                None => assert!(schemes.is_empty(), "{what} needs no token: {schemes:?}"),
                Some(scheme) => assert!(schemes.contains(&scheme), "{what}: {schemes:?}"),
            }
            assert_eq!(
                operation["responses"]["401"].is_mapping(),
                scheme.is_some(),
                "{what}: a 401 answer is documented exactly where a token is required"
            );
            served.insert((route.pattern.to_owned(), method.as_str().to_lowercase()));
        }
    }
    let paths = spec["paths"].as_mapping().expect("paths");
    for (pattern, item) in paths {
        let pattern = pattern.as_str().expect("a path");
        for method in ["get", "put", "post", "delete", "patch", "head", "options"] {
            if item.get(method).is_some() {
                assert!(
                    served.contains(&(pattern.to_owned(), method.to_owned())),
                    "openapi.yaml documents {method} {pattern}, which no listener serves"
                );
            }
        }
    }
}

#[tokio::test]
async fn malformed_requests_get_bad_request_and_change_nothing() {
    let gw = TestGateway::embedded().await;
    gw.stock("s", &["CODE1", "CODE2"]).await;
    let cases = [
        json!("{\"order_id\": "),
        json!("[1, 2]"),
        json!("{}"),
        json!("{\"order_id\": 5}"),
        json!("{\"order_id\": \"o|1\"}"),
        json!("{\"order_id\": \"o-1\", \"quantity\": 0}"),
        json!("{\"order_id\": \"o-1\", \"quantity\": 101}"),
        json!("{\"order_id\": \"o-1\", \"quantity\": \"1\"}"),
        json!("{\"order_id\": \"o-1\", \"hold_msec\": 5}"),
        json!("{\"order_id\": \"o-1\", \"hold_ms\": 0}"),
        json!("{\"order_id\": \"o-1\", \"hold_ms\": 100, \"hold\": false}"),
        json!("{\"order_id\": \"o-1\", \"user_id\": \"'; DROP TABLE keys; --\"}"),
    ];
    for raw in cases {
        let raw = raw.as_str().expect("raw body");
        let res = gw
            .client
            .post(format!("{}/v1/skus/s/claims", gw.public))
            .bearer_auth(MERCHANT_TOKEN)
            .header("content-type", "application/json")
            .body(raw.to_owned())
            .send()
            .await
            .expect("answered");
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{raw}");
        let body: Value = res.json().await.expect("json");
        assert_eq!(error_code(&body), "ERR_BAD_REQUEST", "{raw}");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(gw.counts("s").await["available"], 2);
    gw.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let gw = TestGateway::embedded().await;
    gw.stock("s", &["CODE1"]).await;
    let big = format!(
        "{{\"order_id\": \"o-1\", \"pad\": \"{}\"}}",
        "x".repeat(100_000)
    );
    let res = gw
        .client
        .post(format!("{}/v1/skus/s/claims", gw.public))
        .bearer_auth(MERCHANT_TOKEN)
        .body(big.clone())
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = res.json().await.expect("json");
    assert_eq!(error_code(&body), "ERR_PAYLOAD_TOO_LARGE");

    // Without a Content-Length the limit is enforced while reading.
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(8192)
        .map(|c| Ok(String::from_utf8_lossy(c).into_owned()))
        .collect();
    let streamed = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let res = gw
        .client
        .post(format!("{}/v1/redeem", gw.public))
        .body(streamed)
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(gw.counts("s").await["available"], 1);
    gw.stop().await;
}

#[tokio::test]
async fn hostile_codes_get_documented_errors_and_never_echo() {
    let gw = TestGateway::embedded().await;
    gw.stock("s", &["GOOD-CODE-1"]).await;
    let long = "A".repeat(10_000);
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (
            "'; DROP TABLE keys; --".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ERR_CARD_MALFORMED",
        ),
        (
            "ABC\0DEF".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ERR_CARD_MALFORMED",
        ),
        (
            "ABC\u{202E}FED".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ERR_CARD_MALFORMED",
        ),
        (
            "<script>x</script>".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ERR_CARD_MALFORMED",
        ),
        (
            "".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ERR_CARD_MALFORMED",
        ),
        (
            "A".repeat(300),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ERR_CARD_MALFORMED",
        ),
        (long, StatusCode::BAD_REQUEST, "ERR_BAD_REQUEST"),
    ];
    for (code, status, expected) in cases {
        for sku in [None, Some("s")] {
            let mut body = json!({"code": code, "redeemer": "user-1"});
            if let Some(sku) = sku {
                body["sku"] = sku.into();
            }
            let (got, answer) = gw.redeem(body).await;
            assert_eq!(got, status, "{code:.40?} sku {sku:?}: {answer}");
            assert_eq!(error_code(&answer), expected);
            if code.len() > 3 {
                assert!(!answer.to_string().contains(&code), "the code is echoed");
            }
        }
    }
    let (status, hint) = gw
        .redeem(json!({"code": "GOOD-CO#E-1", "redeemer": "u-1"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        hint["error"]["hint"]
            .as_str()
            .is_some_and(|h| h.contains("character 7,")),
        "the hint says where: {hint}"
    );
    let counts = gw.counts("s").await;
    assert_eq!(counts["available"], 1);
    assert_eq!(counts["redeemed"], 0);
    gw.stop().await;
}

#[tokio::test]
async fn unknown_things_are_not_found_and_unsold_codes_look_unknown() {
    let gw = TestGateway::embedded().await;
    gw.stock("s", &["UNSOLD-1"]).await;
    for path in [
        "/v1/skus/nope",
        "/v1/skus/s/claims/o-404",
        "/v1/nothing-here",
    ] {
        let (status, body) = gw.merchant_get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(error_code(&body), "ERR_NOT_FOUND");
    }
    let (status, body) = gw.claim("nope", json!({"order_id": "o-1"})).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "ERR_NOT_FOUND")
    );

    let unsold = gw
        .redeem(json!({"code": "UNSOLD-1", "redeemer": "u-1", "sku": "s"}))
        .await;
    let unknown = gw
        .redeem(json!({"code": "NEVER-SEEN", "redeemer": "u-1", "sku": "s"}))
        .await;
    let no_sku = gw
        .redeem(json!({"code": "UNSOLD-1", "redeemer": "u-1"}))
        .await;
    let other_sku = gw
        .redeem(json!({"code": "UNSOLD-1", "redeemer": "u-1", "sku": "zz"}))
        .await;
    assert_eq!(unsold.0, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&unsold.1), "ERR_CARD_INVALID");
    for other in [unknown, no_sku, other_sku] {
        assert_eq!(other.0, unsold.0);
        assert_eq!(
            other.1.to_string(),
            unsold.1.to_string(),
            "byte-identical answers"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn claim_conflicts_sell_out_and_user_limits() {
    let gw = TestGateway::embedded().await;
    gw.put_sku("ltd", json!({"per_user_limit": 1})).await;
    gw.import("ltd", "L1\nL2\nL3\n").await;
    let (status, body) = gw.claim("ltd", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "user_id required: {body}");
    let (status, first) = gw
        .claim("ltd", json!({"order_id": "o-1", "user_id": "u-1"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, again) = gw
        .claim("ltd", json!({"order_id": "o-1", "user_id": "u-1"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["replayed"], true);
    assert_eq!(code_of(&again), code_of(&first));
    let (status, body) = gw
        .claim("ltd", json!({"order_id": "o-1", "user_id": "u-2"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "ERR_ORDER_CONFLICT")
    );
    let (status, body) = gw
        .claim("ltd", json!({"order_id": "o-2", "user_id": "u-1"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "ERR_USER_LIMIT")
    );
    assert_eq!(body["error"]["limit"], 1);
    gw.claim("ltd", json!({"order_id": "o-3", "user_id": "u-2"}))
        .await;
    gw.claim("ltd", json!({"order_id": "o-4", "user_id": "u-3"}))
        .await;
    let (status, body) = gw
        .claim("ltd", json!({"order_id": "o-5", "user_id": "u-4"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "ERR_SOLD_OUT")
    );
    gw.stop().await;
}

#[tokio::test]
async fn holds_confirm_release_and_expire_over_http() {
    let clock = ManualClock::new();
    let engine = Arc::new(EmbeddedEngine::start().expect("engine"));
    let inventory = Inventory::with_clock(engine, clock.clock());
    let gw = TestGateway::with_inventory(config(), inventory).await;
    gw.put_sku(
        "h",
        json!({"allow_late_confirm": false, "default_hold_ms": 60000}),
    )
    .await;
    gw.import("h", "H1\nH2\n").await;

    let (status, held) = gw
        .claim("h", json!({"order_id": "o-1", "hold": true}))
        .await;
    assert_eq!(status, StatusCode::OK, "{held}");
    assert_eq!(held["state"], "held");
    assert!(
        held["keys"][0].get("code").is_none(),
        "a hold reveals no code"
    );
    assert!(held["hold_expires_at"].is_string());
    let (status, confirmed) = gw
        .merchant_post("/v1/skus/h/claims/o-1/confirm", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    assert_eq!(confirmed["state"], "claimed");
    assert!(confirmed["keys"][0]["code"].is_string());

    gw.claim("h", json!({"order_id": "o-2", "hold_ms": 1000}))
        .await;
    let (status, released) = gw
        .merchant_post("/v1/skus/h/claims/o-2/release", json!({}))
        .await;
    assert_eq!(
        (status, released["state"].as_str()),
        (StatusCode::OK, Some("released"))
    );

    gw.claim("h", json!({"order_id": "o-3", "hold_ms": 1000}))
        .await;
    clock.advance(1000);
    let (status, body) = gw
        .merchant_post("/v1/skus/h/claims/o-3/confirm", json!({}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "ERR_HOLD_EXPIRED")
    );
    let (status, order) = gw.merchant_get("/v1/skus/h/claims/o-3").await;
    assert_eq!(
        (status, order["state"].as_str()),
        (StatusCode::OK, Some("expired"))
    );
    assert_eq!(gw.counts("h").await["available"], 1);
    gw.stop().await;
}

#[tokio::test]
async fn expired_cards_answer_gone() {
    let clock = ManualClock::new();
    let engine = Arc::new(EmbeddedEngine::start().expect("engine"));
    let gw =
        TestGateway::with_inventory(config(), Inventory::with_clock(engine, clock.clock())).await;
    gw.put_sku("exp", json!({})).await;
    let soon = gw.inventory().now_ms() + 60_000;
    gw.inventory()
        .add_codes(
            "exp",
            &[NewCode {
                canonical: "OLDCODE".into(),
                expires_at_ms: Some(soon),
            }],
        )
        .await
        .expect("added");
    let (_, order) = gw.claim("exp", json!({"order_id": "o-1"})).await;
    // Sold while valid; the holder comes too late.
    clock.advance(60_000);
    let (status, body) = gw
        .redeem(json!({"code": code_of(&order), "redeemer": "u-1"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::GONE, "ERR_CARD_EXPIRED")
    );
    assert!(body["error"]["expires_at"].is_string());
    gw.stop().await;
}

#[tokio::test]
async fn imports_report_rejected_and_duplicate_lines() {
    let gw = TestGateway::embedded().await;
    gw.put_sku(
        "fmt",
        json!({"format": {"preset": "crockford32", "min_length": 8, "max_length": 8}}),
    )
    .await;
    let long = "Z".repeat(5000);
    let mut body =
        format!("\u{feff}ABCD-EFGH\r\n\nabcd efgh\nABCD-EFGU\nshort\n{long}\nJKMN-PQRS\n")
            .into_bytes();
    body.extend_from_slice(b"\xff\xfe\x00\nJKMNPQRS");
    let (status, report) = gw.import("fmt", body).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["accepted"], 2, "{report}");
    assert_eq!(report["duplicate"], 2, "{report}");
    assert_eq!(report["rejected"], 4, "{report}");
    let lines: Vec<u64> = report["rejected_lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| l["line"].as_u64().expect("line number"))
        .collect();
    assert_eq!(lines, [3, 4, 5, 6, 8, 9], "{report}");

    let (_, again) = gw.import("fmt", "ABCDEFGH\nJKMNPQRS\n").await;
    assert_eq!(
        (again["accepted"].as_u64(), again["duplicate"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(gw.counts("fmt").await["available"], 2);
    gw.stop().await;
}

/// Load balancers probe the port they route to: the public listener answers `/healthz` and
/// `/readyz` without a token, even while its in-flight cap sheds everything else, and keeps
/// `/metrics` to the admin listener.
#[tokio::test]
async fn probes_on_the_public_listener_too() {
    use tokio::io::AsyncWriteExt;

    let mut cfg = config();
    cfg.limits.max_in_flight = 1;
    let gw = TestGateway::start(cfg).await;
    // One redemption whose body never finishes holds the only in-flight slot.
    let address = gw.public.trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connects");
    stalled
        .write_all(
            b"POST /v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"code\":",
        )
        .await
        .expect("sent");
    eventually(
        Duration::from_secs(10),
        "the stalled redemption to take the in-flight slot",
        || async { gw.redeem(json!({"code": "X", "redeemer": "r"})).await.0 },
        |status| *status == StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;

    let get = |path: &str| gw.client.get(format!("{}{path}", gw.public)).send();
    let health = get("/healthz").await.expect("answered");
    assert_eq!(health.status(), StatusCode::OK);
    let ready = get("/readyz").await.expect("answered");
    assert_eq!(ready.status(), StatusCode::OK);
    let ready: Value = ready.json().await.expect("json");
    assert_eq!(ready["status"], "ready");
    let metrics = get("/metrics").await.expect("answered");
    assert_eq!(metrics.status(), StatusCode::NOT_FOUND);
    drop(stalled);
    gw.stop().await;
}

/// Readiness pings the engine, so on the public listener it spends the client's bucket.
#[tokio::test]
async fn public_readiness_probes_spend_the_clients_bucket() {
    let mut cfg = config();
    cfg.limits.public = BucketRule::enforced(1, 5);
    let gw = TestGateway::start(cfg).await;
    let ready = format!("{}/readyz", gw.public);
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let res = gw.client.get(&ready).send().await.expect("answered");
        statuses.push(res.status());
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            let body: Value = res.json().await.expect("json");
            assert_eq!(error_code(&body), "ERR_RATE_LIMITED");
            break;
        }
    }
    assert_eq!(statuses.first(), Some(&StatusCode::OK), "{statuses:?}");
    assert_eq!(
        statuses.last(),
        Some(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    // The admin listener's probes are not limited.
    for _ in 0..10 {
        let res = gw
            .client
            .get(format!("{}/readyz", gw.admin))
            .send()
            .await
            .expect("answered");
        assert_eq!(res.status(), StatusCode::OK);
    }
    gw.stop().await;
}

#[tokio::test]
async fn probes_and_metrics_on_the_admin_listener() {
    let gw = TestGateway::embedded().await;
    gw.stock("m", &["M1"]).await;
    gw.claim("m", json!({"order_id": "o-1"})).await;
    gw.claim("m", json!({"order_id": "o-2"})).await;
    let get = |path: &str| gw.client.get(format!("{}{path}", gw.admin)).send();
    assert_eq!(
        get("/healthz").await.expect("answered").status(),
        StatusCode::OK
    );
    let ready: Value = get("/readyz")
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["status"], "ready");
    let text = get("/metrics")
        .await
        .expect("answered")
        .text()
        .await
        .expect("text");
    assert!(text.contains("# HELP kamigate_http_requests_total"));
    assert!(
        text.contains("route=\"/v1/skus/{sku}/claims\""),
        "labels are patterns"
    );
    assert!(!text.contains("/v1/skus/m/claims"), "never raw paths");
    assert!(text.contains("kamigate_claims_total{outcome=\"ERR_SOLD_OUT\"}"));
    assert!(text.contains("kamigate_engine_script_duration_seconds_bucket"));
    assert!(!text.contains("M1"), "no code in metrics");
    if let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("promtool reads");
        let out = child.wait_with_output().expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else if std::env::var_os("CI").is_some() {
        panic!("promtool is required in CI");
    }
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_turns_readiness_off_and_finishes_in_flight_requests() {
    let mut cfg = config();
    cfg.shutdown_delay_ms = 400;
    let gw = TestGateway::start(cfg).await;
    gw.stock("s", &["S1", "S2"]).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    let upload = gw
        .client
        .post(format!("{}/v1/skus/s/batches", gw.admin))
        .bearer_auth(ADMIN_TOKEN)
        .body(reqwest::Body::wrap_stream(tokio_stream_from(rx)))
        .send();
    let upload = tokio::spawn(upload);
    tx.send(Ok("S3\n".into())).await.expect("sent");
    let ready = format!("{}/readyz", gw.admin);
    let client = gw.client.clone();
    // A load balancer watches readiness, so the shutdown delay applies.
    let watched = client.get(&ready).send().await.expect("answered");
    assert_eq!(watched.status(), StatusCode::OK);
    let stopping = tokio::spawn(gw.gateway.stop());
    eventually(
        Duration::from_secs(5),
        "readiness to turn 503",
        || async { client.get(&ready).send().await.map(|r| r.status()).ok() },
        |status| *status == Some(StatusCode::SERVICE_UNAVAILABLE),
    )
    .await;
    tx.send(Ok("S4\n".into()))
        .await
        .expect("the upload is still being read");
    drop(tx);
    let res = upload
        .await
        .expect("task")
        .expect("the in-flight upload completes");
    assert_eq!(res.status(), StatusCode::OK);
    let report: Value = res.json().await.expect("json");
    assert_eq!(report["accepted"], 2);
    stopping.await.expect("stopped");
    assert!(client.get(&ready).send().await.is_err(), "listeners closed");
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<String, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<String, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn engine_outage_answers_unavailable_then_recovers() {
    let mut redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    let gw = TestGateway::start(cfg).await;
    gw.stock("r", &["R1", "R2"]).await;
    redis.kill9();
    let (status, body) = gw.claim("r", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "ERR_UNAVAILABLE");
    let res = gw
        .client
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let res = gw
        .client
        .post(format!("{}/v1/skus/r/claims", gw.public))
        .bearer_auth(MERCHANT_TOKEN)
        .json(&json!({"order_id": "o-1"}))
        .send()
        .await
        .expect("answered");
    assert!(res.headers().contains_key("retry-after"));
    redis.restart().await;
    // Redis ran without persistence: the SKU is gone with its data, which the ledger
    // (re-warm) takes care of; here only the engine's return matters.
    eventually(
        Duration::from_secs(10),
        "the engine to come back",
        || gw.merchant_get("/v1/skus/r"),
        |(status, _)| *status != StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_batch_claim_answers_each_order_as_if_it_came_alone() {
    let gw = TestGateway::embedded().await;
    gw.stock("bulk", &["BULK-1", "BULK-2", "BULK-3"]).await;
    let (_, alone) = gw.claim("bulk", json!({"order_id": "o-1"})).await;
    let (status, body) = gw
        .merchant_post(
            "/v1/skus/bulk/claims/batch",
            json!({"claims": [
                {"order_id": "o-1"},
                {"order_id": "o-2", "quantity": 2},
                {"order_id": "bad|id"},
                {"order_id": "o-3", "colour": "red"},
                {"order_id": "o-4"},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = body["claims"].as_array().expect("one answer per claim");
    assert_eq!(claims.len(), 5);
    assert_eq!(claims[0]["keys"], alone["keys"], "a retry replays");
    assert_eq!(claims[0]["replayed"], true);
    assert_eq!(claims[1]["keys"].as_array().map(Vec::len), Some(2));
    assert_eq!(claims[2]["error"]["code"], "ERR_BAD_REQUEST");
    assert_eq!(claims[3]["error"]["code"], "ERR_BAD_REQUEST");
    assert_eq!(claims[4]["error"]["code"], "ERR_SOLD_OUT");
    // Remembered sold out at the edge: a batch still answers each of its orders, a retry
    // with its codes.
    let (_, late) = gw.claim("bulk", json!({"order_id": "o-5"})).await;
    assert_eq!(late["error"]["code"], "ERR_SOLD_OUT", "{late}");
    let (status, body) = gw
        .merchant_post(
            "/v1/skus/bulk/claims/batch",
            json!({"claims": [{"order_id": "o-6"}, {"order_id": "o-1"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["claims"][0]["error"]["code"], "ERR_SOLD_OUT", "{body}");
    assert_eq!(body["claims"][1]["keys"], alone["keys"], "{body}");
    // Bad claims changed nothing: the orders do not exist.
    let (status, _) = gw.merchant_get("/v1/skus/bulk/claims/o-3").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    for bad in [json!({"claims": []}), json!({"claims": {}}), json!({})] {
        let (status, body) = gw.merchant_post("/v1/skus/bulk/claims/batch", bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
    let too_many: Vec<Value> = (0..501)
        .map(|i| json!({"order_id": format!("m-{i}")}))
        .collect();
    let (status, _) = gw
        .merchant_post("/v1/skus/bulk/claims/batch", json!({"claims": too_many}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    gw.stop().await;
}

/// Every route that returns codes shows them in the SKU's display form — grouped as
/// `kamigate gen` prints them for that format — whatever form they were imported in, and
/// redemption still takes any spelling.
#[tokio::test]
async fn codes_are_shown_in_the_skus_display_form_on_every_route() {
    let gw = TestGateway::embedded().await;
    let format = json!({"preset":"crockford32","min_length":12,"max_length":12,"group_size":4,"check":"luhn"});
    let (status, body) = gw.put_sku("shown", json!({ "format": format })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let format: kamigate::code::Format = serde_json::from_value(format).expect("format");
    let printed: Vec<String> = (0..6).map(|_| format.generate(&mut rand::rng())).collect();
    // Imported ungrouped and in lower case, as a supplier's file might have them.
    let file: Vec<String> = printed
        .iter()
        .map(|c| c.replace('-', "").to_ascii_lowercase())
        .collect();
    let (status, report) = gw.import("shown", file.join("\n")).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["accepted"], 6, "{report}");
    let shown = |order: &Value| -> Vec<String> {
        let codes: Vec<String> = order["keys"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| k["code"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        for code in &codes {
            assert!(
                printed.contains(code),
                "{code} is shown as gen printed it: {order}"
            );
        }
        codes
    };

    let (status, claimed) = gw.claim("shown", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{claimed}");
    let code = shown(&claimed).pop().expect("a final claim shows its code");
    let (_, replayed) = gw.claim("shown", json!({"order_id": "o-1"})).await;
    assert_eq!(replayed["replayed"], true, "{replayed}");
    assert_eq!(shown(&replayed), vec![code.clone()]);
    let (status, read) = gw.merchant_get("/v1/skus/shown/claims/o-1").await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(shown(&read), vec![code.clone()]);

    let (status, batch) = gw
        .merchant_post(
            "/v1/skus/shown/claims/batch",
            json!({"claims": [{"order_id": "b-1", "quantity": 2}, {"order_id": "o-1"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    assert_eq!(shown(&batch["claims"][0]).len(), 2, "{batch}");
    assert_eq!(shown(&batch["claims"][1]), vec![code.clone()]);

    let (_, held) = gw
        .claim("shown", json!({"order_id": "h-1", "hold": true}))
        .await;
    assert!(shown(&held).is_empty(), "a hold reveals no code: {held}");
    let (status, confirmed) = gw
        .merchant_post("/v1/skus/shown/claims/h-1/confirm", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    let confirmed_code = shown(&confirmed).pop().expect("a confirm reveals the code");
    let (_, read) = gw.merchant_get("/v1/skus/shown/claims/h-1").await;
    assert_eq!(shown(&read), vec![confirmed_code.clone()]);

    // Any spelling redeems: the display form, and the form it was imported in.
    let (status, body) = gw
        .redeem(json!({"code": code, "redeemer": "user-1", "sku": "shown"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let imported = confirmed_code.replace('-', "").to_ascii_lowercase();
    let (status, body) = gw
        .redeem(json!({"code": imported, "redeemer": "user-2"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // One display form per SKU: its current format's grouping, for codes of every version.
    let regrouped = json!({"preset":"crockford32","min_length":12,"max_length":12,"group_size":6,"check":"luhn"});
    let (status, body) = gw.put_sku("shown", json!({ "format": regrouped })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, read) = gw.merchant_get("/v1/skus/shown/claims/o-1").await;
    let canonical = code.replace('-', "");
    assert_eq!(
        read["keys"][0]["code"],
        format!("{}-{}", &canonical[..6], &canonical[6..]),
        "{read}"
    );
    gw.stop().await;
}

/// Sends `method target` as written, byte for byte (no client normalises it), with the
/// given token and a `text/plain` body; returns the status and the JSON body.
async fn raw_request(
    addr: std::net::SocketAddr,
    method: &'static str,
    target: String,
    token: &'static str,
    body: String,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: kamigate\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("answered in time")
        .expect("answered");
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {text:?}"));
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

#[tokio::test]
async fn percent_escapes_in_paths_and_queries_are_decoded_then_validated() {
    let gw = TestGateway::embedded().await;
    gw.stock("s1", &["ESC-0001", "ESC-0002"]).await;
    let (public, admin) = (gw.gateway.public_addr, gw.gateway.admin_addr);
    let (status, order) = gw.claim("s1", json!({"order_id": "a:b@c"})).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    let get = |target: String| raw_request(public, "GET", target, MERCHANT_TOKEN, String::new());

    // Escaped or not, upper or lower case, it is the same order of the same SKU.
    for target in [
        "/v1/skus/s1/claims/a:b@c",
        "/v1/skus/s1/claims/a%3Ab%40c",
        "/v1/skus/s1/claims/a%3ab%40c",
        "/v1/skus/s%31/claims/%61%3A%62%40%63",
    ] {
        let (status, body) = get(target.to_owned()).await;
        assert_eq!(status, 200, "{target}: {body}");
        assert_eq!(body["order_id"], "a:b@c", "{target}: {body}");
    }
    // An order named `batch` shares its path with batch claims; escaped, it is the order.
    let (status, body) = gw.claim("s1", json!({"order_id": "batch"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = get("/v1/skus/s1/claims/b%61tch".to_owned()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["order_id"], "batch", "{body}");

    // A key id, escaped.
    let key_id = order["keys"][0]["key_id"]
        .as_str()
        .expect("key id")
        .to_owned();
    let escaped = key_id.replace('.', "%2E");
    let (status, trail) = raw_request(
        admin,
        "GET",
        format!("/v1/keys/{escaped}/events"),
        ADMIN_TOKEN,
        String::new(),
    )
    .await;
    assert_eq!(status, 200, "{trail}");
    assert_eq!(trail["key_id"], key_id.as_str());

    // A decoded value is checked like a raw one: an escaped `|` or `,` is refused with the
    // very answer the raw character gets; a `/` (which raw would be another path) and a NUL
    // are refused as characters outside the identifier set.
    for (escaped, raw) in [("a%7Cb", "a|b"), ("a%2Cb", "a,b"), ("a%2cb", "a,b")] {
        let (status, refused) = get(format!("/v1/skus/s1/claims/{escaped}")).await;
        let (raw_status, raw_refused) = get(format!("/v1/skus/s1/claims/{raw}")).await;
        assert_eq!(
            (status, raw_status),
            (400, 400),
            "{escaped}: {refused} / {raw_refused}"
        );
        assert_eq!(refused, raw_refused, "{escaped} is refused as {raw} is");
    }
    let (status, sku_refused) = get("/v1/skus/s%3A1/claims/o".to_owned()).await;
    let (_, raw_sku_refused) = get("/v1/skus/s:1/claims/o".to_owned()).await;
    assert_eq!(status, 400, "{sku_refused}");
    assert_eq!(sku_refused, raw_sku_refused);
    let outside = "order_id has a character at position 2 outside A-Z a-z 0-9 . _ : @ -";
    for hostile in [
        "a%2Fb",  // an escaped `/`: one segment, never two
        "a%2fb",  //   in lower case
        "a%00b",  // NUL
        "a%zzb",  // not an escape: a literal `%`
        "a%2",    // cut short
        "a%252F", // escaped twice: decoded once, to `%2F`
        "a%0Ab",  // a line feed
        "a%20b",  // a space
    ] {
        let (status, body) = get(format!("/v1/skus/s1/claims/{hostile}")).await;
        assert_eq!(status, 400, "{hostile}: {body}");
        assert_eq!(error_code(&body), "ERR_BAD_REQUEST", "{hostile}: {body}");
        assert_eq!(body["error"]["message"], outside, "{hostile}: {body}");
    }
    // Bytes that are not UTF-8 once decoded: a lone continuation byte, an overlong `/`, a
    // surrogate, a truncated sequence.
    for hostile in ["a%FFb", "a%C0%AFb", "%ED%A0%80", "a%E2%82"] {
        let (status, body) = get(format!("/v1/skus/s1/claims/{hostile}")).await;
        assert_eq!(status, 400, "{hostile}: {body}");
        assert_eq!(error_code(&body), "ERR_BAD_REQUEST", "{hostile}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("UTF-8"), "{hostile}: {message}");
    }
    // Lengths count decoded characters: 128 escaped letters are a valid (unknown) order,
    // 129 are too long.
    let (status, body) = get(format!("/v1/skus/s1/claims/{}", "%41".repeat(128))).await;
    assert_eq!(
        (status, error_code(&body)),
        (404, "ERR_NOT_FOUND"),
        "{body}"
    );
    let (status, body) = get(format!("/v1/skus/s1/claims/{}", "%41".repeat(129))).await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "ERR_BAD_REQUEST"),
        "{body}"
    );

    // Query values are decoded too, then checked.
    let upload = |query: &str, rows: &str| {
        raw_request(
            admin,
            "POST",
            format!("/v1/skus/s1/batches?{query}"),
            ADMIN_TOKEN,
            rows.to_owned(),
        )
    };
    let (status, report) = upload("batch_id=x%3Ay", "ESC-0101\n").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["batch_id"], "x:y", "{report}");
    let (status, report) = upload("batch_id=x:y", "ESC-0102\n").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        (report["batch_id"].as_str(), report["replayed"].as_bool()),
        (Some("x:y"), Some(true)),
        "the same batch id, escaped or not: {report}"
    );
    let (status, report) = upload("batch%5Fid=q-1&activate=f%61lse", "ESC-0103\n").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        (report["batch_id"].as_str(), report["state"].as_str()),
        (Some("q-1"), Some("pending")),
        "{report}"
    );
    let (_, raw_refused) = upload("batch_id=x|y", "ESC-0104\n").await;
    for hostile in [
        "batch_id=x%7Cy",
        "batch_id=x%2Cy",
        "batch_id=x%2Fy",
        "batch_id=x%00y",
        "batch_id=x%zzy",
        "batch_id=x%FFy",
        "batch_id=x%C0%AFy",
        "activate=%FF",
    ] {
        let (status, body) = upload(hostile, "ESC-0104\n").await;
        assert_eq!(status, 400, "{hostile}: {body}");
        assert_eq!(error_code(&body), "ERR_BAD_REQUEST", "{hostile}: {body}");
        if hostile == "batch_id=x%7Cy" {
            assert_eq!(
                body, raw_refused,
                "an escaped `|` is refused as the raw one"
            );
        }
    }
    // Nothing refused was imported: both codes stocked are sold, one more came under `x:y`,
    // and the pending batch is not for sale.
    assert_eq!(gw.counts("s1").await["available"], 1);
    gw.stop().await;
}

#[tokio::test]
async fn an_unknown_sku_and_a_colon_in_a_sku_are_told_in_one_clean_sentence() {
    let gw = TestGateway::embedded().await;
    let (status, body) = gw.import("nosuch", "CODE-1\n").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["message"], "SKU nosuch not found", "{body}");
    let (status, body) = gw.claim("nosuch", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["message"], "SKU nosuch not found", "{body}");

    // `:` is allowed in other identifiers but not in a SKU, and the message says so.
    let (status, body) = gw.put_sku("a:b", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        body["error"]["message"], "sku has a character at position 2 outside A-Z a-z 0-9 . _ @ -",
        "{body}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_upload_without_batch_id_gets_an_id_of_its_own_and_a_retry_with_it_replays() {
    // A stopped clock: two uploads in the same millisecond must still be two batches.
    let clock = ManualClock::new();
    let engine = Arc::new(EmbeddedEngine::start().expect("engine"));
    let gw =
        TestGateway::with_inventory(config(), Inventory::with_clock(engine, clock.clock())).await;
    gw.put_sku("gen", json!({})).await;
    let (status, first) = gw.import("gen", "GEN-1\nGEN-2\n").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (status, second) = gw.import("gen", "GEN-3\n").await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(
        (first["accepted"].as_u64(), second["accepted"].as_u64()),
        (Some(2), Some(1)),
        "{first} {second}"
    );
    let (id, other) = (
        first["batch_id"]
            .as_str()
            .expect("the generated id is returned"),
        second["batch_id"]
            .as_str()
            .expect("the generated id is returned"),
    );
    assert!(id.starts_with('b'), "{id}");
    assert_ne!(
        id, other,
        "each upload without batch_id is a batch of its own"
    );
    assert_eq!(gw.counts("gen").await["available"], 3);

    // The returned id makes a retry idempotent.
    let (status, retried) = gw
        .upload(
            "gen",
            &format!("batch_id={id}"),
            "text/plain",
            "GEN-1\nGEN-2\n",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{retried}");
    assert_eq!(retried["replayed"], true, "{retried}");
    assert_eq!(retried["accepted"], 2, "{retried}");
    assert_eq!(gw.counts("gen").await["available"], 3);
    gw.stop().await;
}
