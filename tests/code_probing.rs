//! Probing for codes: a redemption without `sku` must not reveal, by its answer or by the
//! engine work behind it, whether the global index knew the code.
//!
//! Alone in its test binary because it counts engine script calls in the process-wide
//! metrics recorder: other gateways in the same process would add to the counts.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use support::eventually::eventually;
use support::gateway::{config, metric, TestGateway};

const SCRIPT_CALLS: &str = "kamigate_engine_script_duration_seconds_count";

/// Calls of `script` so far.
fn calls(text: &str, script: &str) -> f64 {
    metric(text, SCRIPT_CALLS, &[&format!("script=\"{script}\"")]).unwrap_or(0.0)
}

/// Status, content type and body of a redemption without `sku`.
async fn redeem(gw: &TestGateway, code: &str) -> (StatusCode, String, bytes::Bytes) {
    let res = gw
        .client
        .post(format!("{}/v1/redeem", gw.public))
        .json(&json!({"code": code, "redeemer": "prober-1"}))
        .send()
        .await
        .expect("answered");
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (res.status(), content_type, res.bytes().await.expect("body"))
}

#[tokio::test]
async fn unknown_and_unsold_codes_cost_the_same_engine_work() {
    // The hold sweep also lists SKUs through the index script: let it run its first pass
    // (which publishes `kamigate_engine_up`) and then stay quiet for the test.
    let mut cfg = config();
    cfg.hold_sweep_interval_ms = 3_600_000;
    let gw = TestGateway::start(cfg).await;
    eventually(
        Duration::from_secs(10),
        "the first sweep to run",
        || async { metric(&gw.metrics().await, "kamigate_engine_up", &[]) },
        |up| *up == Some(1.0),
    )
    .await;

    const N: usize = 12;
    let unsold: Vec<String> = (0..N).map(|i| format!("UNSOLD-{i:04}")).collect();
    let stocked: Vec<&str> = unsold.iter().map(String::as_str).collect();
    gw.stock("s", &stocked).await;
    gw.stock("v", &["VOIDED-0001"]).await;
    let (status, body) = gw
        .admin_post("/v1/keys/v.1/void", json!({"reason": "leaked"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(gw.counts("v").await["void"], 1);

    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "unknown",
            (0..N).map(|i| format!("NEVER-SEEN-{i:04}")).collect(),
        ),
        ("unsold", unsold),
        ("voided", vec!["VOIDED-0001".to_owned(); N]),
    ];
    // The gateway's own background checks (the engine-loss check reads the index every
    // second) can land inside a measurement and only ever add calls: each case is measured
    // up to a few times and its least count per script kept, which is what the requests cost.
    let expected = vec![("index", N as f64), ("redeem", N as f64)];
    let mut work = Vec::new();
    let mut answers = Vec::new();
    for (case, codes) in &cases {
        let mut least: Option<Vec<(&str, f64)>> = None;
        for _ in 0..5 {
            let before = gw.metrics().await;
            for code in codes {
                answers.push((*case, redeem(&gw, code).await));
            }
            let after = gw.metrics().await;
            let per_script: Vec<(&str, f64)> = ["index", "redeem"]
                .into_iter()
                .map(|script| (script, calls(&after, script) - calls(&before, script)))
                .collect();
            least = Some(match least {
                None => per_script,
                Some(l) => l
                    .iter()
                    .zip(&per_script)
                    .map(|(a, b)| (a.0, a.1.min(b.1)))
                    .collect(),
            });
            if least.as_ref() == Some(&expected) {
                break;
            }
        }
        work.push((*case, least.expect("measured at least once")));
    }

    let (_, first) = &answers[0];
    assert_eq!(first.0, StatusCode::NOT_FOUND);
    assert!(
        String::from_utf8_lossy(&first.2).contains("ERR_CARD_INVALID"),
        "{first:?}"
    );
    for (case, answer) in &answers {
        assert_eq!(answer, first, "{case}: byte-identical answers");
    }
    for (case, per_script) in &work {
        assert_eq!(
            per_script, &expected,
            "{case}: one index lookup and one redemption script per request"
        );
    }
    gw.stop().await;
}
