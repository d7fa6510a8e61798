//! Format versions: a code stays redeemable under the rules it was sold with.
//!
//! A merchant changes a SKU's code rules while sold codes are in buyers' hands: every change
//! is a new version, keys keep the version they were imported under, redemption tries every
//! version the SKU had (one script call), and retiring an old version is explicit.

mod support;

use proptest::prelude::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::eventually::eventually;
use support::gateway::{audit_trail, config, metric, TestGateway, ADMIN_TOKEN};
use support::redis_server::RedisServer;

use kamigate::code::{Check, Format, Preset};
use kamigate::sku::SkuConfig;

fn codes_of(order: &Value) -> Vec<String> {
    order["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            k["code"]
                .as_str()
                .expect("a final claim carries codes")
                .to_owned()
        })
        .collect()
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// Imports `codes` into `sku` and claims each in its own order; returns the codes as sold.
async fn sell(gw: &TestGateway, sku: &str, batch: &str, codes: &[&str]) -> Vec<String> {
    let (status, report) = gw
        .upload(
            sku,
            &format!("batch_id={batch}"),
            "text/plain",
            codes.join("\n"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["accepted"], codes.len(), "{report}");
    let mut sold = Vec::new();
    for i in 0..codes.len() {
        let (status, order) = gw
            .claim(sku, json!({"order_id": format!("{batch}-{i}")}))
            .await;
        assert_eq!(status, StatusCode::OK, "{order}");
        sold.extend(codes_of(&order));
    }
    sold
}

/// The SKU view once the ledger has every change the engine made.
async fn settled_view(gw: &TestGateway, sku: &str) -> Value {
    let path = format!("/v1/skus/{sku}");
    let (_, view) = eventually(
        std::time::Duration::from_secs(20),
        "the ledger to have every change the engine made",
        || gw.merchant_get(&path),
        |(_, view)| view["in_flight"] == 0 && view["engine"] == view["ledger"],
    )
    .await;
    view
}

async fn put_format(gw: &TestGateway, sku: &str, format: Value) -> Value {
    let (status, body) = gw.put_sku(sku, json!({ "format": format })).await;
    assert!(status.is_success(), "{body}");
    body
}

async fn redeem(
    gw: &TestGateway,
    code: &str,
    redeemer: &str,
    sku: Option<&str>,
) -> (StatusCode, Value) {
    let mut body = json!({"code": code, "redeemer": redeemer});
    if let Some(sku) = sku {
        body["sku"] = json!(sku);
    }
    gw.redeem(body).await
}

/// The walk of the issue: old codes redeem after the format changed, with and without `sku`,
/// and a code generated under the new format redeems too.
async fn old_codes_stay_redeemable_after_the_format_changes(gw: TestGateway) {
    gw.put_sku("walk", json!({})).await;
    let old = sell(&gw, "walk", "old", &["OLD-CODE-0001", "OLDCODE0002XYZ"]).await;
    let before = gw.merchant_get("/v1/skus/walk").await.1;
    assert_eq!(before["config"]["format_version"], 1, "{before}");

    // Other settings: no new version.
    gw.put_sku("walk", json!({"per_user_limit": 0, "max_uses": 1}))
        .await;
    let view = gw.merchant_get("/v1/skus/walk").await.1;
    assert_eq!(view["config"]["format_version"], 1);

    let new_format = json!({"preset":"crockford32","min_length":16,"max_length":16,"group_size":4,"check":"luhn"});
    let put = put_format(&gw, "walk", new_format.clone()).await;
    assert_eq!(put["config"]["format_version"], 2, "{put}");
    // Keys by state per version come from the ledger: wait until it has every change.
    let view = settled_view(&gw, "walk").await;
    let formats = view["formats"].as_array().expect("formats listed");
    assert_eq!(formats.len(), 2, "{view}");
    assert_eq!(formats[0]["version"], 2);
    assert_eq!(formats[0]["format"]["check"], "luhn");
    assert_eq!(formats[1]["version"], 1);
    assert_eq!(formats[1]["keys"]["claimed"], 2, "{view}");
    assert!(formats[1]["since"].is_string());

    let (status, body) = redeem(&gw, &old[0], "holder-1", Some("walk")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = redeem(&gw, "oldcode0002xyz", "holder-2", None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "found through the global index: {body}"
    );

    // A fresh code under the new version.
    let format: Format = serde_json::from_value(new_format).expect("format");
    let fresh = format.generate(&mut rand::rng());
    let (status, report) = gw
        .upload("walk", "batch_id=new", "text/plain", fresh.clone())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        report["format_version"], 2,
        "imports say their version: {report}"
    );
    let (status, order) = gw.claim("walk", json!({"order_id": "fresh"})).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    let key_id = order["keys"][0]["key_id"].as_str().expect("key").to_owned();
    let (status, body) = redeem(&gw, &fresh, "holder-3", Some("walk")).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The audit trail says which version each key was born under.
    let (trail, _) = audit_trail(&gw.client, &gw.admin, &key_id).await;
    assert_eq!(trail["format_version"], 2);
    let (trail, _) = audit_trail(&gw.client, &gw.admin, "walk.1").await;
    assert_eq!(trail["format_version"], 1);

    // Malformed under every version: the newest version's hint.
    let (status, body) = redeem(&gw, "BAD!", "holder-4", Some("walk")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["error"]["hint"].as_str().is_some(), "{body}");

    let metrics = gw.metrics().await;
    assert!(
        metric(
            &metrics,
            "kamigate_redemptions_total",
            &["outcome=\"new\"", "format_version=\"1\""]
        )
        .is_some_and(|n| n >= 2.0),
        "redemptions by matched version"
    );
    assert!(metric(
        &metrics,
        "kamigate_redemptions_total",
        &["outcome=\"new\"", "format_version=\"2\""]
    )
    .is_some_and(|n| n >= 1.0));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_old_codes_stay_redeemable_after_the_format_changes() {
    old_codes_stay_redeemable_after_the_format_changes(TestGateway::embedded().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_old_codes_stay_redeemable_after_the_format_changes() {
    let redis = RedisServer::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    old_codes_stay_redeemable_after_the_format_changes(TestGateway::start(cfg).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_valid_under_an_old_version_is_not_a_failed_attempt() {
    let mut cfg = config();
    cfg.limits.failed_redemptions.max_failures = 1;
    let gw = TestGateway::start(cfg).await;
    gw.put_sku("strict", json!({})).await;
    let old = sell(&gw, "strict", "old", &["LEGACY-1", "LEGACY-2", "LEGACY-3"]).await;
    put_format(
        &gw,
        "strict",
        json!({"preset": "crockford32", "min_length": 12, "max_length": 12}),
    )
    .await;
    for (i, code) in old.iter().enumerate() {
        let (status, body) = redeem(&gw, code, "same-holder", Some("strict")).await;
        assert_eq!(status, StatusCode::OK, "old code {i}: {body}");
    }
    // One real failure is allowed before the lockout: none was counted so far.
    let (status, body) = redeem(&gw, "NOT A CODE !", "same-holder", Some("strict")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    gw.stop().await;
}

/// Case sensitivity, then length, then a check character, one after another: a code of
/// each version redeems, a typo in a check-character code is caught with its hint, and a
/// retired version's code answers exactly like an unknown one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_of_several_versions_redeems_and_a_retired_one_answers_like_unknown() {
    let mut cfg = config();
    cfg.limits.public = kamigate::limit::BucketRule::enforced(100_000, 100_000);
    let gw = TestGateway::start(cfg).await;
    let lower = "0123456789ABCDEFGHJKMNPQRSTVWXYZabcdefghjkmnpqrstvwxyz";
    let v1 = json!({"preset": "crockford32", "min_length": 10, "max_length": 10});
    let v2 = json!({"charset": lower, "case_sensitive": true, "min_length": 10, "max_length": 10});
    let v3 = json!({"charset": lower, "case_sensitive": true, "min_length": 12, "max_length": 12});
    let v4 = json!({"charset": lower, "case_sensitive": true, "min_length": 13, "max_length": 13,
                    "check": "luhn"});
    let mut sold = Vec::new();
    for (n, spec) in [&v1, &v2, &v3, &v4].into_iter().enumerate() {
        put_format(&gw, "multi", spec.clone()).await;
        let format: Format = serde_json::from_value(spec.clone()).expect("format");
        let codes: Vec<String> = (0..3).map(|_| format.generate(&mut rand::rng())).collect();
        let refs: Vec<&str> = codes.iter().map(String::as_str).collect();
        sold.push(sell(&gw, "multi", &format!("v{}", n + 1), &refs).await);
    }
    let view = gw.merchant_get("/v1/skus/multi").await.1;
    assert_eq!(view["config"]["format_version"], 4, "{view}");
    for (n, codes) in sold.iter().enumerate() {
        let (status, body) = redeem(&gw, &codes[0], "holder", Some("multi")).await;
        assert_eq!(status, StatusCode::OK, "version {}: {body}", n + 1);
    }

    // A typo in a version-4 code: malformed under every version, with the check's hint.
    let good = &sold[3][1];
    let mut typo: Vec<char> = good.chars().collect();
    typo[2] = if typo[2] == 'a' { 'b' } else { 'a' };
    let typo: String = typo.into_iter().collect();
    let (status, body) = redeem(&gw, &typo, "holder", Some("multi")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["hint"]
            .as_str()
            .unwrap_or("")
            .contains("check character"),
        "{body}"
    );

    // Version 2 still has sold keys nobody redeemed: retiring it needs force.
    let retire = |version: u32, force: bool| {
        let client = gw.client.clone();
        let url = format!("{}/v1/skus/multi/formats/{version}/retire", gw.admin);
        async move {
            let res = client
                .post(url)
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({"reason": "supplier switched", "force": force}))
                .send()
                .await
                .expect("answered");
            let status = res.status();
            (status, res.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, body) = retire(2, false).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "ERR_FORMAT_IN_USE"),
        "{body}"
    );
    let (status, body) = retire(2, true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stranded"], 2, "{body}");
    let (status, body) = retire(4, false).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "the current version stays: {body}"
    );

    // A retired version's sold code answers exactly like an unknown well-formed code.
    let stranded = &sold[1][1];
    let (s1, retired) = redeem(&gw, stranded, "holder", Some("multi")).await;
    let (s2, unknown) = redeem(&gw, "abcdefghjk", "holder", Some("multi")).await;
    assert_eq!(
        (s1, error_code(&retired)),
        (StatusCode::NOT_FOUND, "ERR_CARD_INVALID")
    );
    assert_eq!((s1, &retired), (s2, &unknown), "byte for byte");
    // Its audit trail says why.
    let view = settled_view(&gw, "multi").await;
    let formats = view["formats"].as_array().expect("formats");
    let v2_view = formats
        .iter()
        .find(|f| f["version"] == 2)
        .expect("version 2 listed");
    assert_eq!(v2_view["retired"]["forced"], true, "{view}");
    // Version 2's second key; the void reaches the ledger through the event stream.
    let key = format!("multi.{}", 3 + 2);
    let (trail, _) = eventually(
        std::time::Duration::from_secs(20),
        "the void to reach the audit trail",
        || audit_trail(&gw.client, &gw.admin, &key),
        |(_, kinds)| kinds.iter().any(|k| k == "void"),
    )
    .await;
    assert!(
        trail.to_string().contains("format version 2 retired"),
        "{trail}"
    );

    // Versions 1, 3 and 4 still redeem.
    for n in [0, 2, 3] {
        let (status, body) = redeem(&gw, &sold[n][2], "holder", Some("multi")).await;
        assert_eq!(status, StatusCode::OK, "version {}: {body}", n + 1);
    }
    gw.stop().await;
}

fn any_format() -> impl Strategy<Value = Format> {
    (
        any::<bool>(),
        1usize..=20,
        0usize..=12,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(crockford, min, spread, check, grouped)| {
            let min = if check { min.max(2) } else { min };
            Format {
                preset: if crockford {
                    Preset::Crockford32
                } else {
                    Preset::Default
                },
                min_length: min,
                max_length: min + spread,
                group_size: if grouped { 4 } else { 0 },
                check: if check { Check::Luhn } else { Check::None },
                ..Format::default()
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For any two formats A → B, a code generated under A (and so sold under A) is still
    /// found after the change to B, as the very canonical form it was stored under.
    #[test]
    fn a_code_of_any_format_survives_a_change_to_any_other(a in any_format(), b in any_format()) {
        prop_assume!(a.validate_spec().is_ok() && b.validate_spec().is_ok());
        let mut first = SkuConfig { format: a.clone(), ..SkuConfig::default() };
        first.succeed(None, 1);
        let code = a.generate(&mut rand::rng());
        let stored = a.validate(&code).expect("a generated code validates");
        let mut second = SkuConfig { format: b, ..first.clone() };
        second.succeed(Some(&first), 2);
        let candidates = second.candidates(&code).expect("not malformed after the change");
        prop_assert!(candidates.iter().any(|c| c.canonical == stored));
    }
}
