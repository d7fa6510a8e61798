//! Reconcile, key by key, on both engines: keys the engine lost are loaded again, keys where
//! the ledger is ahead are set to the ledger's state, and a change only the engine has is
//! never rolled back.
//!
//! What reconcile reports depends on which events the ledger has committed, so the test owns
//! the event writer instead of running a gateway whose writer commits whenever the scheduler
//! lets it: the engine's claim stays in flight exactly until the test drains the stream.

mod support;

use std::sync::Arc;

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::engine::keys::sku_keys;
use kamigate::engine::redis::{RedisEngine, RedisOptions};
use kamigate::engine::{Script, ScriptEngine};
use kamigate::inventory::formats::UploadFormat;
use kamigate::inventory::import::{Begun, Importer};
use kamigate::inventory::reconcile::reconcile_sku;
use kamigate::inventory::{ClaimRequest, Inventory};
use kamigate::ledger::writer::{EventWriter, WriterOptions};
use kamigate::ledger::{Ledger, LedgerEvent};
use kamigate::sku::SkuConfig;
use support::redis_server::RedisServer;
use tempfile::TempDir;

/// An engine, a SQLite ledger and an event writer that runs only when the test drains it.
struct Env {
    inv: Inventory,
    ledger: Arc<dyn Ledger>,
    writer: EventWriter,
    _dir: TempDir,
}

impl Env {
    async fn start(engine: Arc<dyn ScriptEngine>) -> Env {
        let dir = TempDir::new().expect("temp dir");
        let ledger = kamigate::ledger::open(None, dir.path())
            .await
            .expect("open the ledger");
        let writer = EventWriter::new(engine.clone(), ledger.clone(), WriterOptions::default());
        Env {
            inv: Inventory::new(engine),
            ledger,
            writer,
            _dir: dir,
        }
    }

    /// Creates `sku` and imports `codes` the way the admin API does: ledger first, then
    /// warmed into the engine.
    async fn stock(&self, sku: &str, codes: &[&str]) {
        let config = SkuConfig::default();
        let json = serde_json::to_string(&config).expect("settings encode");
        let now = self.inv.now_ms() as i64;
        self.ledger
            .put_sku(sku, &json, config.format.version, now)
            .await
            .expect("ledger put_sku");
        self.inv
            .put_sku(sku, &config)
            .await
            .expect("engine put_sku");
        let begun = Importer::begin(
            self.ledger.as_ref(),
            &self.inv,
            sku,
            "b-1",
            &config,
            UploadFormat::Lines,
            None,
        )
        .await
        .expect("batch begins");
        let Begun::Fresh(mut importer) = begun else {
            panic!("a new batch id");
        };
        importer
            .feed(codes.join("\n").as_bytes())
            .await
            .expect("codes fed");
        let report = importer.finish(true, true).await.expect("batch finished");
        assert_eq!(report.accepted, codes.len() as u64, "{report:?}");
    }

    /// Commits every event the engine wrote for `sku` to the ledger.
    async fn drain(&self, sku: &str) {
        while self.writer.drain_once(sku).await.expect("drain") > 0 {}
    }

    /// Events of `sku` the engine wrote and the ledger has not committed.
    async fn in_flight(&self, sku: &str) -> u64 {
        self.writer.backlog(sku).await.expect("backlog").in_flight()
    }
}

/// Deletes key `id` of `sku` from the engine behind kamigate's back.
async fn lose_key(inv: &Inventory, sku: &str, id: &str) {
    let probe: &'static Script = Box::leak(Box::new(Script::new(
        "probe_lose",
        "redis.call('HDEL', K.keys, ARGV[1]) \
         redis.call('HINCRBY', K.counts, 'available', -1) return 1",
    )));
    inv.engine()
        .eval(probe, sku_keys(sku), vec![id.to_owned()])
        .await
        .expect("probe runs");
}

async fn scenario(env: Env) {
    env.stock("rec", &["REC-1", "REC-2", "REC-3", "REC-4"])
        .await;
    env.drain("rec").await;
    assert_eq!(env.in_flight("rec").await, 0);
    let ledger = env.ledger.clone();
    let inv = &env.inv;

    let clean = reconcile_sku(ledger.as_ref(), inv, "rec", false, 0)
        .await
        .expect("reconcile");
    assert_eq!((clean.checked, clean.differences.len()), (4, 0));

    // The engine lost key 1; the ledger recorded a sale of key 4 the engine lacks; the
    // engine sold key 2 (first in line) and the ledger has not heard yet.
    lose_key(inv, "rec", "1").await;
    let sale = LedgerEvent {
        event_id: "rec/test-1".into(),
        sku: "rec".into(),
        kind: "claim".into(),
        at_ms: 1,
        key_local_ids: vec![4],
        order_id: Some("o-lost".into()),
        user_id: None,
        redeemer: None,
        reason: None,
        late: false,
        fields_json: "{}".into(),
        gen: None,
    };
    ledger.apply_events(&[sale]).await.expect("applied");
    let claim = ClaimRequest {
        order_id: "o-new".into(),
        quantity: 1,
        user_id: None,
        hold_ms: None,
        pool: Default::default(),
    };
    let claimed = inv.claim("rec", &claim).await.expect("claimed");
    let engine_only = claimed.keys[0].key_id.clone();
    assert_eq!(engine_only, "rec.2");
    // The claim's event is written and, with no writer draining, stays uncommitted until
    // the end of the test.
    let in_flight = env.in_flight("rec").await;
    assert_eq!(in_flight, 1, "the claim's event");

    let report = reconcile_sku(ledger.as_ref(), inv, "rec", false, 0)
        .await
        .expect("reconcile");
    assert_eq!(report.missing_in_engine, 1, "{report:?}");
    assert_eq!(
        (report.engine_ahead, report.ledger_ahead),
        (1, 1),
        "{report:?}"
    );
    assert!(report.differences.iter().all(|d| d.action != "repaired"));

    // While events are in flight, keys the engine has are left alone.
    let deferred = reconcile_sku(ledger.as_ref(), inv, "rec", true, in_flight)
        .await
        .expect("reconcile");
    assert_eq!(deferred.deferred, 2, "{deferred:?}");
    assert_eq!(deferred.repaired, 1, "only the missing key was loaded");

    let repaired = reconcile_sku(ledger.as_ref(), inv, "rec", true, 0)
        .await
        .expect("reconcile");
    assert!(
        repaired
            .differences
            .iter()
            .any(|d| d.key_id == engine_only && d.action == "kept"),
        "{repaired:?}"
    );
    assert_eq!(
        repaired.repaired, 1,
        "the key the ledger was ahead on: {repaired:?}"
    );
    let after = reconcile_sku(ledger.as_ref(), inv, "rec", false, 0)
        .await
        .expect("reconcile");
    assert_eq!(after.missing_in_engine + after.ledger_ahead, 0, "{after:?}");
    let counts = inv.counts("rec").await.expect("counts");
    assert_eq!(
        (counts.available, counts.claimed),
        (2, 2),
        "key 1 back on sale, keys 2 and 4 sold: {counts:?}"
    );

    // Once the claim's event is committed, engine and ledger agree on every key.
    env.drain("rec").await;
    assert_eq!(env.in_flight("rec").await, 0);
    let settled = reconcile_sku(ledger.as_ref(), inv, "rec", false, 0)
        .await
        .expect("reconcile");
    assert_eq!(
        (settled.checked, settled.differences.len()),
        (4, 0),
        "{settled:?}"
    );
}

#[tokio::test]
async fn reconcile_on_the_embedded_engine() {
    let engine = EmbeddedEngine::start().expect("embedded engine starts");
    scenario(Env::start(Arc::new(engine)).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_on_redis() {
    let redis = RedisServer::start().await;
    let engine = RedisEngine::connect(&redis.url(), RedisOptions::default())
        .await
        .expect("connects to its redis-server");
    scenario(Env::start(Arc::new(engine)).await).await;
}
