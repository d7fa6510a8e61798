//! Upgrading a ledger (and Redis) that stores codes in clear, as every release before
//! sealed codes did: the gateway migrates it in place on start (resumably: a pass cut short
//! is finished by the next), and afterwards no code, nor a code of a SKU's blacklist, is in
//! clear in any file while every code still claims and redeems and every blacklist refuses.

#[path = "support/postgres.rs"]
mod pg_support;
mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kamigate::code::digest as unkeyed_digest;
use kamigate::engine::keys::{index_shard, sku_keys};
use kamigate::engine::redis::{RedisEngine, RedisOptions};
use kamigate::engine::{ScriptEngine, SCRIPTS};
use kamigate::inventory::rekey::{rekey, seal_blacklists};
use kamigate::inventory::Inventory;
use kamigate::ledger::{BatchCounts, BatchStart, Ledger, NewKey, Seal};
use kamigate::sku::{Blacklist, SkuConfig};
use pg_support::TestDatabase;
use reqwest::StatusCode;
use serde_json::json;
use support::dump::{
    assert_absent, assert_absent_from_redis_files, files_under, holds, pg_dump, spellings,
};
use support::eventually::eventually;
use support::gateway::{config, TestGateway};
use support::redis_server::RedisServer;

const UPLOAD: &str = "upload-before-sealing";
const NOW: i64 = 1_700_000_000_000;

/// What releases before sealing stored: the code itself.
struct InClear;

impl Seal for InClear {
    fn seal(&self, _sku: &str, _local_id: i64, code: &str) -> String {
        code.to_owned()
    }
}

fn codes(sku: &str) -> Vec<String> {
    (0..20)
        .map(|i| format!("{}{:010}", sku.to_uppercase(), 7_301_554_000u64 + i * 37))
        .collect()
}

/// The codes of `sku`'s blacklist.
fn blacklisted(sku: &str) -> Vec<String> {
    (0..3)
        .map(|i| format!("BL{}{:08}", sku.to_uppercase(), 31_337_000 + i * 59))
        .collect()
}

/// Settings as releases before sealing stored them: the blacklist in clear.
fn settings_in_clear(sku: &str) -> SkuConfig {
    SkuConfig {
        blacklist: Blacklist::Clear(blacklisted(sku)),
        ..SkuConfig::default()
    }
}

/// The global index's folding, as releases before sealing digested it (unkeyed).
fn folded(code: &str) -> String {
    code.chars()
        .map(|c| match c {
            'O' => '0',
            'I' | 'L' => '1',
            other => other,
        })
        .collect()
}

/// A ledger as releases before sealing left it: SKU `sku` with `codes` in clear under
/// unkeyed digests, in one active batch.
async fn ledger_in_clear(ledger: &dyn Ledger, sku: &str, codes: &[String]) {
    let settings = serde_json::to_string(&settings_in_clear(sku)).expect("json");
    ledger
        .put_sku(sku, &settings, 1, NOW)
        .await
        .expect("put_sku");
    let batch = format!("{sku}-old");
    assert_eq!(
        ledger
            .begin_batch(sku, &batch, UPLOAD, NOW)
            .await
            .expect("begin"),
        BatchStart::New
    );
    let rows: Vec<NewKey> = codes
        .iter()
        .enumerate()
        .map(|(i, code)| NewKey {
            line: i as u64 + 1,
            digest: unkeyed_digest(code),
            code: code.clone(),
            expires_at_ms: None,
            max_issues: 1,
            max_uses: 1,
            format_version: 1,
        })
        .collect();
    ledger
        .insert_keys(sku, &batch, UPLOAD, &rows, &InClear)
        .await
        .expect("insert");
    let report = BatchCounts {
        accepted: rows.len() as u64,
        ..BatchCounts::default()
    };
    ledger
        .finish_batch(sku, &batch, UPLOAD, &report, true, NOW)
        .await
        .expect("activate");
}

/// Redis as releases before sealing left it for `sku`: codes in clear in its `codes` hash,
/// unkeyed digests in its index and in the global index (the scripts then stored whatever
/// they were given, as they still do).
async fn redis_in_clear(engine: Arc<dyn ScriptEngine>, sku: &str, codes: &[String]) {
    let inventory = Inventory::new(engine.clone());
    inventory
        .put_sku(sku, &settings_in_clear(sku))
        .await
        .expect("SKU created");
    let mut args = vec![String::new()];
    for (i, code) in codes.iter().enumerate() {
        args.extend([
            (i + 1).to_string(),
            unkeyed_digest(code),
            code.clone(),
            "0".into(),
            "1".into(),
            "1".into(),
            "0".into(),
            "0".into(),
            "0".into(),
            "0".into(),
            String::new(),
            "0".into(),
        ]);
    }
    engine
        .eval(&SCRIPTS.warm, sku_keys(sku), args)
        .await
        .expect("old keys loaded");
    for code in codes {
        let d = unkeyed_digest(&folded(code));
        engine
            .eval(
                &SCRIPTS.index,
                vec![index_shard(&d)],
                vec!["set".into(), d, sku.into()],
            )
            .await
            .expect("old index entry");
    }
}

/// Claims every code of `sku` (each revealed as it was imported) and redeems each without
/// naming the SKU (through the global index).
async fn every_code_claims_and_redeems(gate: &TestGateway, sku: &str, codes: &[String]) {
    let mut revealed = HashSet::new();
    for i in 0..codes.len() {
        let (status, body) = gate
            .claim(sku, json!({"order_id": format!("up-{i}"), "quantity": 1}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let code = body["keys"][0]["code"]
            .as_str()
            .expect("revealed")
            .to_owned();
        assert!(codes.contains(&code), "an imported code was revealed");
        revealed.insert(code);
    }
    assert_eq!(revealed.len(), codes.len(), "every code once");
    for code in &revealed {
        let (status, body) = gate.redeem(json!({"code": code, "redeemer": "u-1"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let path = format!("/v1/skus/{sku}");
    eventually(
        Duration::from_secs(10),
        "the ledger to have the redemptions",
        || gate.merchant_get(&path),
        |(_, body)| body["ledger"]["redeemed"] == codes.len() && body["in_flight"] == 0,
    )
    .await;
    // The blacklist, sealed on start, still refuses its codes.
    let file: Vec<String> = blacklisted(sku)
        .iter()
        .map(|c| spellings(c)[2].clone())
        .collect();
    let (status, report) = gate.import(sku, file.join("\n")).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["rejected"], file.len(), "{report}");
    let (_, view) = gate.merchant_get(&path).await;
    assert_eq!(view["config"]["blacklist"], json!({"entries": 3}), "{view}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_ledger_in_clear_is_sealed_on_start_and_every_code_still_sells() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (codes("ua"), codes("ub"));
    {
        let ledger = kamigate::ledger::open(None, dir.path())
            .await
            .expect("ledger");
        ledger_in_clear(ledger.as_ref(), "ua", &a).await;
        ledger_in_clear(ledger.as_ref(), "ub", &b).await;
        assert!(ledger.has_unsealed_codes().await.expect("read"));
        // A migration cut short: one SKU done, the other not.
        let inventory = Inventory::new(Arc::new(
            kamigate::engine::embedded::EmbeddedEngine::start().expect("engine"),
        ));
        let mut cfg = config();
        cfg.data_dir = dir.path().to_owned();
        kamigate::gateway::open_keys(&cfg, ledger.as_ref(), &inventory, false)
            .await
            .expect("keys fit");
        let report = rekey(ledger.as_ref(), &inventory, Some("ua"), false)
            .await
            .expect("one SKU migrated");
        assert_eq!(report.migrated, 20);
        assert_eq!(report.blacklists, 1);
        assert!(ledger.has_unsealed_codes().await.expect("read"));
    }

    let mut cfg = config();
    cfg.data_dir = dir.path().to_owned();
    let gate = TestGateway::start(cfg).await;
    {
        let ledger = &gate.gateway.app.ledger;
        assert!(!ledger.has_unsealed_codes().await.expect("read"));
        let again = seal_blacklists(ledger.as_ref(), gate.inventory()).await;
        assert_eq!(again.expect("nothing left to seal"), 0);
    }
    every_code_claims_and_redeems(&gate, "ua", &a).await;
    every_code_claims_and_redeems(&gate, "ub", &b).await;
    gate.stop().await;

    let all: Vec<String> = [a, b, blacklisted("ua"), blacklisted("ub")].concat();
    for (path, bytes) in files_under(dir.path()) {
        if !bytes.is_empty() {
            assert_absent(&path, &bytes, &all);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_ledger_and_redis_in_clear_are_sealed_on_start() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let sold = codes("up");
    let codes: Vec<String> = [sold.clone(), blacklisted("up")].concat();
    {
        let dir = tempfile::tempdir().expect("temp dir");
        let ledger = kamigate::ledger::open(Some(db.url()), dir.path())
            .await
            .expect("ledger");
        ledger_in_clear(ledger.as_ref(), "up", &sold).await;
        let engine = RedisEngine::connect(&redis.url(), RedisOptions::default())
            .await
            .expect("redis");
        redis_in_clear(Arc::new(engine), "up", &sold).await;
    }

    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.database_url = Some(db.url().to_owned());
    let gate = TestGateway::start(cfg).await;
    every_code_claims_and_redeems(&gate, "up", &sold).await;
    gate.stop().await;

    // The old clear text is history in the AOF until it is rewritten (README: part of the
    // upgrade), then a snapshot beside it.
    redis.cmd(&["BGREWRITEAOF"]).await.expect("rewrite started");
    eventually(
        Duration::from_secs(20),
        "the AOF rewrite to finish",
        || async {
            let info = redis.cmd(&["INFO", "persistence"]).await.expect("INFO");
            info.as_str().unwrap_or_default().to_owned()
        },
        |info| {
            info.contains("aof_rewrite_in_progress:0")
                && info.contains("aof_rewrite_scheduled:0")
                && info.contains("aof_last_bgrewrite_status:ok")
        },
    )
    .await;
    redis.cmd(&["SAVE"]).await.expect("SAVE answered");
    // Redis deletes the rewritten AOF's history files in the background.
    eventually(
        Duration::from_secs(10),
        "no Redis file to hold a code in clear (files that do)",
        || async {
            files_under(redis.dir())
                .into_iter()
                .filter(|(p, bytes)| !p.ends_with(".log") && codes.iter().any(|c| holds(bytes, c)))
                .map(|(p, _)| p)
                .collect::<Vec<_>>()
        },
        |holding| holding.is_empty(),
    )
    .await;
    assert_absent_from_redis_files(redis.dir(), &codes);
    assert_absent("pg_dump of the ledger", &pg_dump(db.url()), &codes);
}
