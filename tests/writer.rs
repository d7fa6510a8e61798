//! The event writer, end to end: engine changes reach the ledger once each, through poison,
//! dead consumers and ledger outages.
//!
//! Every behaviour runs on the embedded engine and on a real `redis-server` of its own, with
//! the SQLite ledger in a temp dir; the main scenario also runs on PostgreSQL (skipped with a
//! note when no server answers, see `support/postgres.rs`). SKUs are stocked the way imports
//! do it: keys go into the ledger first, then into the engine, under the same local ids.

mod support;

#[path = "support/postgres.rs"]
mod pg_support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::engine::keys::{dead_letters_key, events_key, meta_key, sku_keys};
use kamigate::engine::redis::{RedisEngine, RedisOptions};
use kamigate::engine::stream_id::StreamId;
use kamigate::engine::{EngineError, Reply, Script, ScriptEngine, SCRIPTS};
use kamigate::inventory::drift::Drift;
use kamigate::inventory::reconcile::reconcile_sku;
use kamigate::inventory::warm::{
    begin_restore, finish_restore, rebuild_acknowledged, Acknowledged,
};
use kamigate::inventory::{Ack, Added, ClaimRequest, Inventory, NewCode, Order};
use kamigate::ledger::writer::{Backlog, EventWriter, WriterError, WriterOptions};
use kamigate::ledger::{
    BatchCounts, BatchRecord, BatchStart, ChannelEventRecord, ChannelRecord, ChannelTokenRecord,
    EventRecord, InsertOutcome, KeyRecord, Ledger, LedgerError, LedgerEvent, NewKey, NewPause,
    OrderCursor, OrderRecord, PauseEventRecord, PauseRecord, Recode, Seal, SkuRecord, StateCounts,
    StoredCode,
};
use kamigate::sku::SkuConfig;
use pg_support::TestDatabase;
use support::clock::ManualClock;
use support::eventually::eventually;
use support::redis_server::RedisServer;
use tempfile::TempDir;

const GROUP: &str = "ledger";
/// The one upload that stocks each test batch.
const UPLOAD: &str = "upload-1";

/// Runs one command given as `ARGV` (keys named in it): for looking at streams directly.
static PROBE: LazyLock<Script> =
    LazyLock::new(|| Script::new("writer_probe", "return redis.call(unpack(ARGV))"));

#[derive(Clone, Copy)]
enum EngineKind {
    Embedded,
    Redis,
}

#[derive(Clone, Copy)]
enum Store {
    Sqlite,
    Postgres,
}

/// One engine and one ledger, with everything they need kept alive.
struct Env {
    inv: Inventory,
    engine: Arc<dyn ScriptEngine>,
    ledger: Arc<dyn Ledger>,
    clock: ManualClock,
    _dir: TempDir,
    _redis: Option<RedisServer>,
    // Dropped last: the database outlives the pools that use it.
    _pg: Option<TestDatabase>,
}

impl Env {
    /// `None` when PostgreSQL is asked for and not running (outside CI).
    async fn start(engine: EngineKind, store: Store) -> Option<Env> {
        let dir = TempDir::new().expect("temp dir");
        let (url, pg) = match store {
            Store::Sqlite => (None, None),
            Store::Postgres => {
                let pg = TestDatabase::create().await?;
                (Some(pg.url().to_owned()), Some(pg))
            }
        };
        let ledger = kamigate::ledger::open(url.as_deref(), dir.path())
            .await
            .expect("open the ledger");
        let (engine, redis): (Arc<dyn ScriptEngine>, _) = match engine {
            EngineKind::Embedded => (
                Arc::new(EmbeddedEngine::start().expect("embedded engine starts")),
                None,
            ),
            EngineKind::Redis => {
                let redis = RedisServer::start().await;
                let engine = RedisEngine::connect(&redis.url(), RedisOptions::default())
                    .await
                    .expect("connects to its redis-server");
                (Arc::new(engine), Some(redis))
            }
        };
        let clock = ManualClock::new();
        Some(Env {
            inv: Inventory::with_clock(engine.clone(), clock.clock()),
            engine,
            ledger,
            clock,
            _dir: dir,
            _redis: redis,
            _pg: pg,
        })
    }

    fn now(&self) -> i64 {
        self.clock.now() as i64
    }

    /// A writer over this env's engine and `ledger`, as consumer `consumer`.
    fn writer_over(
        &self,
        ledger: Arc<dyn Ledger>,
        consumer: &str,
        reclaim_idle_ms: u64,
    ) -> EventWriter {
        self.writer_with(ledger, consumer, reclaim_idle_ms, 500)
    }

    fn writer_with(
        &self,
        ledger: Arc<dyn Ledger>,
        consumer: &str,
        reclaim_idle_ms: u64,
        batch: u32,
    ) -> EventWriter {
        EventWriter::new(
            self.engine.clone(),
            ledger,
            WriterOptions {
                group: GROUP.into(),
                consumer: consumer.into(),
                batch,
                idle_poll_ms: 10,
                reclaim_idle_ms,
                max_backoff_ms: 50,
                ..WriterOptions::default()
            },
        )
    }

    /// A writer over this env's own ledger that never takes over live consumers' entries.
    fn writer(&self, consumer: &str) -> EventWriter {
        self.writer_over(self.ledger.clone(), consumer, 60_000)
    }

    /// Creates `sku` with `n` codes in the ledger, then in the engine, and checks both gave
    /// the keys the same local ids (1..n). Returns the codes.
    async fn stock(&self, sku: &str, n: usize) -> Vec<String> {
        let config = SkuConfig::default();
        let json = serde_json::to_string(&config).expect("settings encode");
        self.ledger
            .put_sku(sku, &json, 1, self.now())
            .await
            .expect("ledger put_sku");
        let codes: Vec<String> = (1..=n)
            .map(|i| format!("{}X{i:05}", sku.to_uppercase()))
            .collect();
        let batch = format!("{sku}-b1");
        assert_eq!(
            self.ledger
                .begin_batch(sku, &batch, UPLOAD, self.now())
                .await
                .expect("begin"),
            BatchStart::New
        );
        let rows: Vec<NewKey> = codes
            .iter()
            .enumerate()
            .map(|(i, code)| NewKey {
                line: i as u64 + 1,
                digest: self.inv.digest(code),
                code: code.clone(),
                expires_at_ms: None,
                max_issues: 1,
                max_uses: 1,
                format_version: 1,
            })
            .collect();
        let outcomes = self
            .ledger
            .insert_keys(sku, &batch, UPLOAD, &rows, self.inv.keyring().as_ref())
            .await
            .expect("insert");
        let report = BatchCounts {
            accepted: n as u64,
            ..BatchCounts::default()
        };
        self.ledger
            .finish_batch(sku, &batch, UPLOAD, &report, true, self.now())
            .await
            .expect("activate");

        self.inv
            .put_sku(sku, &config)
            .await
            .expect("engine put_sku");
        let new: Vec<NewCode> = codes
            .iter()
            .map(|c| NewCode {
                canonical: c.clone(),
                expires_at_ms: None,
            })
            .collect();
        let added = self.inv.add_codes(sku, &new).await.expect("codes added");
        for (i, (ledger, engine)) in outcomes.iter().zip(&added).enumerate() {
            let key_id = format!("{sku}.{}", i + 1);
            assert_eq!(
                ledger,
                &InsertOutcome::Inserted {
                    key_id: key_id.clone(),
                    local_id: i as i64 + 1
                }
            );
            assert_eq!(engine, &Added::New(key_id), "engine and ledger ids agree");
        }
        codes
    }

    async fn claim(&self, sku: &str, order: &str, quantity: u64, hold_ms: Option<u64>) -> Order {
        let req = ClaimRequest {
            order_id: order.into(),
            quantity,
            user_id: Some("u-9".into()),
            hold_ms,
            pool: Default::default(),
        };
        self.inv.claim(sku, &req).await.expect("claim succeeds")
    }

    /// Deletes every key of `sku` from the engine, as FLUSHALL or a restart without
    /// persistence would.
    async fn lose_sku(&self, sku: &str) {
        static WIPE: LazyLock<Script> = LazyLock::new(|| {
            Script::new(
                "probe_wipe",
                "for _, k in ipairs(KEYS) do redis.call('DEL', k) end\nreturn 1",
            )
        });
        let mut keys = sku_keys(sku);
        keys.push(dead_letters_key(sku));
        self.engine.eval(&WIPE, keys, vec![]).await.expect("wiped");
    }

    /// Adds one fresh code to `sku` and claims it as order `o-new`; returns the answer id.
    async fn claim_new_stock(&self, sku: &str) -> String {
        let code = NewCode {
            canonical: format!("NEW{}", self.clock.now()),
            expires_at_ms: None,
        };
        self.inv.add_codes(sku, &[code]).await.expect("added");
        self.claim(sku, "o-new", 1, None)
            .await
            .event_id
            .expect("event")
    }

    /// Voids and restores key `key_id`: two events.
    async fn void_and_restore(&self, key_id: &str) {
        self.inv.void(key_id, "check").await.expect("void");
        self.inv.restore(key_id, "check").await.expect("restore");
    }

    /// The consumers of `sku`'s group.
    async fn consumers(&self, sku: &str) -> usize {
        let key = events_key(sku);
        let reply = self.cmd(&["XINFO", "CONSUMERS", &key, GROUP]).await;
        reply.as_array().expect("an array").len()
    }

    /// Runs one command through the probe script.
    async fn cmd(&self, args: &[&str]) -> Reply {
        self.engine
            .eval(
                &PROBE,
                Vec::new(),
                args.iter().map(|a| (*a).to_owned()).collect(),
            )
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    async fn xlen(&self, key: &str) -> i64 {
        self.cmd(&["XLEN", key])
            .await
            .as_i64()
            .expect("XLEN answers a number")
    }

    /// Ids of the entries of `sku`'s event stream, oldest first.
    async fn entry_ids(&self, sku: &str) -> Vec<String> {
        let key = events_key(sku);
        let reply = self.cmd(&["XRANGE", &key, "-", "+"]).await;
        reply
            .as_array()
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.as_array()?.first()?.as_str().map(str::to_owned))
            .collect()
    }

    /// Has consumer `consumer` read up to `count` entries of `sku`'s stream without ever
    /// acknowledging them: a writer that dies right after reading.
    async fn read_and_die(&self, sku: &str, consumer: &str, count: u32) -> usize {
        let reply = self
            .engine
            .eval(
                &SCRIPTS.stream,
                vec![events_key(sku), dead_letters_key(sku), meta_key(sku)],
                vec![
                    "read".into(),
                    GROUP.into(),
                    consumer.into(),
                    count.to_string(),
                    "3600000".into(),
                ],
            )
            .await
            .expect("read");
        // The head: pending, lag, floor, last delivered, own, claimed, new, gen, owned.
        reply.as_array().expect("an array").len() - 9
    }

    /// Engine and ledger agree on `sku`: counts by state, and every key's counters.
    async fn assert_in_step(&self, sku: &str) {
        let engine = self.inv.counts(sku).await.expect("engine counts");
        let ledger = self.ledger.counts(sku).await.expect("ledger counts");
        assert_eq!(
            (
                engine.available,
                engine.held,
                engine.claimed,
                engine.redeemed,
                engine.void
            ),
            (
                ledger.available,
                ledger.held,
                ledger.claimed,
                ledger.redeemed,
                ledger.void
            ),
            "counts by state: engine (left) vs ledger (right)"
        );
        let report = reconcile_sku(self.ledger.as_ref(), &self.inv, sku, false, 0)
            .await
            .expect("reconcile");
        assert_eq!(report.checked, ledger.total(), "every key compared");
        assert!(report.differences.is_empty(), "{:?}", report.differences);

        let ids: Vec<String> = (1..=ledger.total()).map(|i| i.to_string()).collect();
        let inspected = self
            .engine
            .eval(&SCRIPTS.inspect, sku_keys(sku), ids.clone())
            .await
            .expect("inspect");
        for (local, record) in ids.iter().zip(inspected.as_array().expect("array")) {
            let f = record.as_array().expect("the engine has the key");
            let n = |i: usize| f[i].as_i64().expect("a number");
            let key = self
                .ledger
                .get_key(&format!("{sku}.{local}"))
                .await
                .expect("get_key")
                .expect("the ledger has the key");
            assert_eq!(
                (f[0].as_str() == Some("1"), n(1), n(2), n(3)),
                (key.void, key.held, key.sold, key.uses),
                "key {sku}.{local}: (void, held, sold, uses), engine (left) vs ledger (right)"
            );
            assert_eq!(
                f[4].as_str().filter(|r| !r.is_empty()),
                key.redeemer.as_deref(),
                "key {sku}.{local}: redeemer"
            );
        }
    }

    /// Every key's audit trail names each event once, and holds `expected` events in all.
    async fn assert_audit_once(&self, sku: &str, keys: u64) -> usize {
        let mut total = 0;
        for local in 1..=keys {
            let trail = self
                .ledger
                .key_events(&format!("{sku}.{local}"))
                .await
                .expect("audit trail");
            let unique: HashSet<&str> = trail.iter().map(|e| e.event_id.as_str()).collect();
            assert_eq!(
                unique.len(),
                trail.len(),
                "key {sku}.{local}: an event twice"
            );
            total += trail.len();
        }
        total
    }
}

/// Drains `sku` until a pass finds nothing; returns the entries settled.
async fn drain(writer: &EventWriter, sku: &str) -> usize {
    let mut total = 0;
    for _ in 0..1000 {
        match writer.drain_once(sku).await.expect("drain") {
            0 => return total,
            n => total += n,
        }
    }
    panic!("{sku}: the stream never ran dry");
}

// ---- scenarios ------------------------------------------------------------------------

/// Claims, holds, confirms, releases, expiries, redemptions, voids and restores all reach
/// the ledger, which then agrees with the engine key by key; draining again changes nothing.
async fn ledger_follows_every_kind_of_change(env: Env) {
    let sku = "gift";
    env.stock(sku, 10).await;
    let sold: Vec<String> = env
        .claim(sku, "o-1", 2, None)
        .await
        .keys
        .into_iter()
        .map(|k| k.code.expect("a final claim reveals its codes"))
        .collect();
    env.claim(sku, "o-2", 2, Some(60_000)).await;
    env.inv.confirm(sku, "o-2", true).await.expect("confirm");
    env.claim(sku, "o-3", 1, Some(60_000)).await;
    env.inv.release(sku, "o-3").await.expect("release");
    env.claim(sku, "o-4", 1, Some(60_000)).await;
    env.clock.advance(120_000);
    assert_eq!(env.inv.expire_due(sku, 100).await.expect("expire").0, 1);
    env.inv
        .redeem(sku, &sold[0], "user-42")
        .await
        .expect("redeem");
    env.inv.void("gift.10", "fraud").await.expect("void");
    env.inv.void("gift.9", "mistake").await.expect("void");
    env.inv.restore("gift.9", "mistake").await.expect("restore");

    let engine = env.inv.counts(sku).await.expect("counts");
    assert_eq!(
        (
            engine.available,
            engine.held,
            engine.claimed,
            engine.redeemed,
            engine.void
        ),
        (5, 0, 3, 1, 1),
        "the scenario did what it says"
    );
    let entries = env.entry_ids(sku).await.len();
    let writer = env.writer("w1");
    assert_eq!(drain(&writer, sku).await, entries);
    env.assert_in_step(sku).await;
    let trail = env.assert_audit_once(sku, 10).await;

    assert_eq!(
        writer.drain_once(sku).await.expect("drain"),
        0,
        "nothing left"
    );
    assert_eq!(env.assert_audit_once(sku, 10).await, trail);
    assert_eq!(
        writer.backlog(sku).await.expect("backlog"),
        Backlog::default()
    );
    env.assert_in_step(sku).await;
}

/// A bogus entry goes to the dead-letter stream with its id and the reason, and the entries
/// after it are committed all the same.
async fn poison_is_dead_lettered_and_does_not_block_later_entries(env: Env) {
    let sku = "gift";
    env.stock(sku, 3).await;
    env.claim(sku, "o-1", 1, None).await;
    let events = events_key(sku);
    let bogus = env.cmd(&["XADD", &events, "*", "bogus", "1"]).await;
    let bogus = bogus.as_str().expect("XADD answers the id").to_owned();
    env.claim(sku, "o-2", 1, None).await;

    let writer = env.writer("w1");
    drain(&writer, sku).await;
    env.assert_in_step(sku).await;
    assert_eq!(env.ledger.counts(sku).await.expect("counts").claimed, 2);

    let dead = dead_letters_key(sku);
    let letters = env.cmd(&["XRANGE", &dead, "-", "+"]).await;
    let letters = letters.as_array().expect("array");
    assert_eq!(letters.len(), 1, "one dead letter");
    let fields: Vec<&str> = letters[0].as_array().expect("entry")[1]
        .as_array()
        .expect("fields")
        .iter()
        .map(|f| f.as_str().expect("text"))
        .collect();
    assert_eq!(&fields[..2], &["source_id", bogus.as_str()]);
    assert_eq!(fields[2], "reason");
    assert!(!fields[3].is_empty(), "a reason is given");
    assert_eq!(
        &fields[4..],
        &["bogus", "1"],
        "the entry's own fields follow"
    );
    assert_eq!(writer.backlog(sku).await.expect("backlog").in_flight(), 0);
    assert_eq!(writer.drain_once(sku).await.expect("drain"), 0);
}

/// Entries a consumer read and never acknowledged stay with it while it may be alive, and are
/// taken over once they have been idle for `reclaim_idle_ms` (0 here).
async fn entries_of_a_dead_consumer_are_taken_over(env: Env) {
    let sku = "gift";
    env.stock(sku, 5).await;
    env.claim(sku, "o-1", 1, None).await;
    env.claim(sku, "o-2", 2, None).await;
    let entries = env.entry_ids(sku).await.len();
    assert_eq!(env.read_and_die(sku, "ghost", 100).await, entries);

    let patient = env.writer("w1");
    assert_eq!(
        patient.drain_once(sku).await.expect("drain"),
        0,
        "entries of a consumer that may be alive are left alone"
    );
    let backlog = patient.backlog(sku).await.expect("backlog");
    assert_eq!((backlog.pending, backlog.lag), (entries as u64, 0));
    assert_eq!(env.ledger.counts(sku).await.expect("counts").claimed, 0);

    let taker = env.writer_over(env.ledger.clone(), "w2", 0);
    assert_eq!(drain(&taker, sku).await, entries);
    env.assert_in_step(sku).await;
    assert_eq!(
        taker.backlog(sku).await.expect("backlog"),
        Backlog::default()
    );
}

/// A gateway dies holding a void it read; the restore that undid the void is committed by a
/// live writer first, and the void only when its entry is taken over. The ledger must still
/// end where the engine is: the key restored.
async fn a_void_taken_over_after_its_restore_leaves_the_key_restored(env: Env) {
    let sku = "gift";
    env.stock(sku, 2).await;
    let patient = env.writer("w1");
    while patient.drain_once(sku).await.expect("drain the adds") > 0 {}

    env.inv.void("gift.2", "check").await.expect("void");
    assert_eq!(
        env.read_and_die(sku, "ghost", 1).await,
        1,
        "the ghost reads the void"
    );
    env.inv.restore("gift.2", "checked").await.expect("restore");
    assert_eq!(
        drain(&patient, sku).await,
        1,
        "the live writer commits the restore"
    );

    let taker = env.writer_over(env.ledger.clone(), "w2", 0);
    assert_eq!(drain(&taker, sku).await, 1, "the void is taken over");
    let key = env
        .ledger
        .get_key("gift.2")
        .await
        .expect("read the key")
        .expect("the key");
    assert!(!key.void, "the ledger's key ends restored, as the engine's");
    assert_eq!(key.state, "available");
    env.assert_in_step(sku).await;

    // And the pair can repeat: void again, and the ledger follows.
    env.inv.void("gift.2", "again").await.expect("void again");
    assert_eq!(drain(&taker, sku).await, 1);
    env.assert_in_step(sku).await;
    assert_eq!(env.ledger.counts(sku).await.expect("counts").void, 1);
}

/// Acknowledged entries are trimmed from the stream; entries still pending are not.
async fn acked_entries_are_trimmed_and_pending_ones_kept(env: Env) {
    let sku = "gift";
    env.stock(sku, 6).await;
    env.claim(sku, "o-1", 1, None).await;
    let events = events_key(sku);
    let before = env.xlen(&events).await;
    assert!(before >= 3, "sku, add and claim events");

    let writer = env.writer("w1");
    drain(&writer, sku).await;
    assert!(
        env.xlen(&events).await <= 1,
        "committed entries are trimmed"
    );

    // A dead consumer's entries are older than the ones committed after them: kept.
    env.claim(sku, "o-2", 1, None).await;
    env.claim(sku, "o-3", 1, None).await;
    assert_eq!(env.read_and_die(sku, "ghost", 2).await, 2);
    env.claim(sku, "o-4", 1, None).await;
    assert_eq!(drain(&writer, sku).await, 1);
    assert!(
        env.xlen(&events).await >= 3,
        "pending entries and what follows stay"
    );

    let taker = env.writer_over(env.ledger.clone(), "w2", 0);
    assert_eq!(drain(&taker, sku).await, 2);
    assert!(env.xlen(&events).await <= 1);
    env.assert_in_step(sku).await;
}

/// A read that carries acknowledgements settles them before it reports and trims, as the
/// writer's reads do beside each commit: the entries acknowledged leave the stream, the
/// report's floor is past them, and what another consumer or another group still holds
/// stays.
async fn a_read_carrying_acknowledgements_trims_what_they_settle(env: Env) {
    let sku = "gift";
    env.stock(sku, 6).await;
    for order in ["o-1", "o-2", "o-3"] {
        env.claim(sku, order, 1, None).await;
    }
    let ids = env.entry_ids(sku).await;
    assert!(ids.len() >= 5, "sku, add and claim events: {ids:?}");
    let events = events_key(sku);
    let total = ids.len() as i64;
    let read = |consumer: &'static str, count: u32, acks: Vec<String>| {
        let env = &env;
        async move {
            let mut args = vec![
                "read".to_owned(),
                GROUP.to_owned(),
                consumer.to_owned(),
                count.to_string(),
                "3600000".to_owned(),
                "n".to_owned(),
            ];
            args.extend(acks);
            env.engine
                .eval(
                    &SCRIPTS.stream,
                    vec![events_key(sku), dead_letters_key(sku), meta_key(sku)],
                    args,
                )
                .await
                .expect("read")
                .as_array()
                .expect("an array")
                .to_vec()
        }
    };
    // The head: pending, lag, floor, last delivered, own, claimed, new, gen, owned.
    let text = |reply: &[Reply], at: usize| reply[at].as_str().unwrap_or_default().to_owned();
    let number = |reply: &[Reply], at: usize| reply[at].as_i64().expect("a number");

    let first = read("c1", 2, Vec::new()).await;
    assert_eq!(first.len() - 9, 2, "two entries read");
    let gen = text(&first, 7);
    let with_acks = |gen: &str, acked: &[String]| {
        let mut acks = vec![gen.to_owned()];
        acks.extend(acked.iter().cloned());
        acks
    };

    // c1 acknowledges both with its next read: they are settled, and the report starts after
    // them.
    let second = read("c1", 1, with_acks(&gen, &ids[..2])).await;
    assert_eq!(number(&second, 0), 0, "nothing pending once acknowledged");
    assert_eq!(
        text(&second, 2),
        ids[2],
        "the floor is the first entry not settled"
    );
    assert_eq!(second.len() - 9, 1, "one entry read");
    // The last entry delivered stays (the stream is cut below it; see stream.lua).
    assert_eq!(
        env.xlen(&events).await,
        total - 1,
        "the acknowledged entries are trimmed up to the last delivered"
    );

    // c2 reads the next one and holds it; c1 acknowledges the one it read: that goes, with
    // the one kept before as the last delivered, and c2's stays.
    let held = read("c2", 1, Vec::new()).await;
    assert_eq!(held.len() - 9, 1);
    let third = read("c1", 1, with_acks(&gen, &ids[2..3])).await;
    assert_eq!(number(&third, 0), 1, "c2's entry is still pending");
    assert_eq!(text(&third, 2), ids[3], "the floor is c2's pending entry");
    assert_eq!(env.xlen(&events).await, total - 3);

    // Another group that has delivered less holds the stream back for itself: c2's
    // acknowledgement settles its entry for this group only.
    env.cmd(&["XGROUP", "CREATE", &events, "audit", &ids[3]])
        .await;
    let fourth = read("c2", 1, with_acks(&gen, &ids[3..4])).await;
    assert_eq!(number(&fourth, 0), 1, "c1's entry is still pending");
    assert_eq!(text(&fourth, 2), ids[4]);
    assert_eq!(
        env.xlen(&events).await,
        total - 3,
        "nothing the other group has not delivered goes"
    );

    // Acknowledgements of another generation settle nothing.
    let pending = 1 + (fourth.len() - 9) as i64;
    let stale = read("c1", 1, with_acks("another-gen", &ids[4..5])).await;
    assert_eq!(number(&stale, 0), pending, "nothing acknowledged");
    assert_eq!(text(&stale, 2), ids[4]);
    assert_eq!(env.xlen(&events).await, total - 3);
}

/// The backlog counts entries pending on a consumer and entries not yet delivered, and how
/// old the oldest of them is.
async fn backlog_reports_pending_and_lag(env: Env) {
    let sku = "gift";
    let writer = env.writer("w1");
    assert_eq!(
        writer.backlog("nothing-here").await.expect("backlog"),
        Backlog::default()
    );

    env.stock(sku, 4).await;
    env.claim(sku, "o-1", 1, None).await;
    env.claim(sku, "o-2", 1, None).await;
    let entries = env.entry_ids(sku).await.len() as u64;
    let backlog = writer.backlog(sku).await.expect("backlog");
    assert_eq!(
        (backlog.pending, backlog.lag),
        (0, entries),
        "nothing read yet"
    );
    assert!(backlog.oldest_pending_age_ms < 60_000);

    env.read_and_die(sku, "ghost", 2).await;
    let backlog = writer.backlog(sku).await.expect("backlog");
    assert_eq!((backlog.pending, backlog.lag), (2, entries - 2));
    assert_eq!(backlog.in_flight(), entries);
    assert!(backlog.oldest_pending_age_ms < 60_000);

    drain(&env.writer_over(env.ledger.clone(), "w2", 0), sku).await;
    assert_eq!(
        writer.backlog(sku).await.expect("backlog"),
        Backlog::default()
    );
}

/// A waiter learns of its event's commit: not before, at once after, also when another
/// gateway's writer committed it.
async fn wait_committed_answers_after_the_commit(env: Env) {
    let sku = "gift";
    env.stock(sku, 3).await;
    let order = env.claim(sku, "o-1", 1, None).await;
    let last = order.event_id.expect("a claim names its event");
    let gen = env
        .inv
        .sku_state(sku)
        .await
        .expect("state")
        .expect("sku")
        .gen;
    let entry = env.entry_ids(sku).await.pop().expect("an entry");
    assert_eq!(
        last,
        format!("{gen}:{entry}"),
        "answers name generation and entry"
    );

    let writer = env.writer("w1");
    let other = env.writer("w2");
    assert!(
        !writer
            .wait_committed(sku, &last, Duration::from_millis(30))
            .await
    );
    assert!(
        !writer
            .wait_committed(sku, "not-an-id", Duration::from_millis(30))
            .await
    );

    let waiter = {
        let writer = writer.clone();
        let last = last.clone();
        tokio::spawn(async move {
            writer
                .wait_committed(sku, &last, Duration::from_secs(30))
                .await
        })
    };
    drain(&writer, sku).await;
    assert!(waiter.await.expect("waiter"), "woken by the commit");
    assert!(
        writer
            .wait_committed(sku, &last, Duration::from_millis(10))
            .await
    );

    // The other writer committed nothing; its next read shows everything was acknowledged.
    assert!(
        !other
            .wait_committed(sku, &last, Duration::from_millis(30))
            .await
    );
    assert_eq!(other.drain_once(sku).await.expect("drain"), 0);
    assert!(
        other
            .wait_committed(sku, &last, Duration::from_millis(10))
            .await
    );

    // A later event is not covered by an earlier commit.
    let next = env
        .claim(sku, "o-2", 1, None)
        .await
        .event_id
        .expect("event");
    assert!(
        !writer
            .wait_committed(sku, &next, Duration::from_millis(30))
            .await
    );
}

/// The engine loses a SKU's data (FLUSHALL, a restart without persistence) and the SKU is
/// recreated: its new stream's ids pass the lost entries' ids, and its acknowledgement floor
/// with them. A waiter for a lost entry must learn it was lost, never that it was committed.
async fn an_answer_of_a_lost_generation_is_never_taken_as_committed(env: Env) {
    let sku = "gift";
    env.stock(sku, 3).await;
    let writer = env.writer("w1");
    drain(&writer, sku).await;
    let lost = env
        .claim(sku, "o-1", 1, None)
        .await
        .event_id
        .expect("event");
    env.lose_sku(sku).await;
    env.inv
        .put_sku(sku, &SkuConfig::default())
        .await
        .expect("recreated");
    env.clock.advance(5_000);
    let later = env.claim_new_stock(sku).await;
    drain(&writer, sku).await;
    assert!(
        writer
            .wait_committed(sku, &later, Duration::from_millis(10))
            .await,
        "the new generation's entries are committed"
    );
    let started = Instant::now();
    assert!(
        !writer
            .wait_committed(sku, &lost, Duration::from_secs(20))
            .await,
        "a lost entry is never taken as committed"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the waiter learns of the loss at once, not at its timeout"
    );
    assert_eq!(
        writer.journal().keep(sku, &lost, &[]),
        kamigate::ledger::journal::Kept::Lost,
        "a late reply of the lost generation is not answered"
    );
}

/// With `durability = "engine"`, what a gateway answered is kept until the ledger has it;
/// when the engine lost it, it is written into the ledger before the rebuild.
async fn answers_the_engine_lost_reach_the_ledger_from_the_journal(env: Env) {
    let sku = "gift";
    env.stock(sku, 3).await;
    let writer = env.writer("w1");
    let order = env.claim(sku, "o-1", 1, None).await;
    let emitted = order.emitted.clone().expect("the claim's event");
    assert_eq!(
        writer
            .journal()
            .keep(sku, &emitted.answer_id, &emitted.fields),
        kamigate::ledger::journal::Kept::Kept
    );
    assert_eq!(writer.journal().len(), 1);
    env.lose_sku(sku).await;
    // The writer never saw the entry: it is gone with the engine's data.
    drain(&writer, sku).await;
    let key_id = order.keys[0].key_id.clone();
    let key = env
        .ledger
        .get_key(&key_id)
        .await
        .expect("read")
        .expect("key");
    assert_eq!(key.sold, 0, "the ledger never heard of the claim");
    assert_eq!(writer.flush_lost(sku, None).await.expect("flushed"), 1);
    let key = env
        .ledger
        .get_key(&key_id)
        .await
        .expect("read")
        .expect("key");
    assert_eq!((key.sold, key.state.as_str()), (1, "claimed"));
    assert!(writer.journal().is_empty());
    // Written once; a second flush has nothing to write and changes nothing.
    assert_eq!(writer.flush_lost(sku, None).await.expect("flushed"), 0);

    // Committed entries are forgotten as the writer settles them.
    env.inv
        .put_sku(sku, &SkuConfig::default())
        .await
        .expect("recreated");
    let later = env.claim_new_stock(sku).await;
    let fields = vec![
        ("t".to_owned(), "claim".to_owned()),
        ("at".to_owned(), "1".to_owned()),
    ];
    writer.journal().keep(sku, &later, &fields);
    assert_eq!(writer.journal().len(), 1);
    drain(&writer, sku).await;
    assert!(writer.journal().is_empty(), "settled entries are forgotten");
}

/// A rebuild after the engine lost a SKU finishes only once every gateway alive (reported
/// to the ledger within the grace) has recorded that the ledger has what it answered, and
/// not before two reporting intervals: a gateway slow to notice the loss is waited for as
/// long as it reports; one silent for the grace is not.
async fn a_rebuild_waits_for_every_gateway_alive_to_write_its_answers(env: Env) {
    let sku = "gift";
    env.stock(sku, 3).await;
    let grace = Duration::from_secs(5);
    let now = || env.now();
    for gw in ["gw-a", "gw-b", "gw-dead"] {
        env.ledger.gateway_seen(gw, now()).await.expect("seen");
    }
    env.clock.advance(6_000);
    env.ledger.gateway_seen("gw-a", now()).await.expect("seen");
    env.ledger.gateway_seen("gw-b", now()).await.expect("seen");
    env.lose_sku(sku).await;
    let rebuild = begin_restore(env.ledger.as_ref(), &env.inv, sku)
        .await
        .expect("begun")
        .expect("the engine lacked the SKU");
    let check = || rebuild_acknowledged(env.ledger.as_ref(), &env.inv, sku, &rebuild, grace);
    let ack = |gen: &str, gw: &str| {
        let (inv, gen, gw) = (&env.inv, gen.to_owned(), gw.to_owned());
        async move { inv.ack_rebuild(sku, &gen, &gw).await.expect("answered") }
    };
    let waiting =
        |names: &[&str]| Acknowledged::Waiting(names.iter().map(|n| n.to_string()).collect());
    assert_eq!(check().await.expect("read"), waiting(&["gw-a", "gw-b"]));
    assert_eq!(ack(&rebuild.gen, "gw-a").await, Ack::Acked);
    assert_eq!(ack(&rebuild.gen, "gw-a").await, Ack::Acked);
    assert_eq!(check().await.expect("read"), waiting(&["gw-b"]));
    // Still reporting, however long it takes: still waited for.
    env.clock.advance(4_000);
    env.ledger.gateway_seen("gw-b", now()).await.expect("seen");
    assert_eq!(check().await.expect("read"), waiting(&["gw-b"]));
    assert_eq!(ack("another-gen", "gw-b").await, Ack::Stale);
    assert_eq!(ack(&rebuild.gen, "gw-b").await, Ack::Acked);
    assert_eq!(check().await.expect("read"), Acknowledged::Yes);
    // A gateway that reports again is waited for again; one that stopped is not.
    env.ledger.gateway_seen("gw-c", now()).await.expect("seen");
    assert_eq!(check().await.expect("read"), waiting(&["gw-c"]));
    env.ledger.gateway_gone("gw-c", now()).await.expect("gone");
    assert_eq!(check().await.expect("read"), Acknowledged::Yes);
    finish_restore(env.ledger.as_ref(), &env.inv, sku, &rebuild.gen)
        .await
        .expect("finished");
    assert_eq!(check().await.expect("read"), Acknowledged::Over);
    assert_eq!(
        ack(&rebuild.gen, "gw-a").await,
        Ack::Stale,
        "a finished rebuild takes no acknowledgement"
    );
    assert!(env
        .inv
        .sku_state(sku)
        .await
        .expect("state")
        .expect("sku")
        .acks
        .is_empty());
}

/// A rebuild reads the ledger's largest stream id of the SKU only once it reads the ledger:
/// answers of the lost generation a gateway writes while the rebuild waits for it may carry
/// larger ids than any the ledger had when the SKU was recreated (the lost stream's clock
/// ahead of the one the new stream takes its ids from). The new generation's events go above
/// them all the same.
async fn answers_written_while_a_rebuild_waits_set_its_stream_ids(env: Env) {
    let sku = "gift";
    env.stock(sku, 3).await;
    let writer = env.writer("w1");
    env.claim(sku, "o-1", 1, None).await;
    drain(&writer, sku).await;
    let before = env
        .ledger
        .last_entry(sku)
        .await
        .expect("read")
        .expect("an id");
    env.lose_sku(sku).await;
    let rebuild = begin_restore(env.ledger.as_ref(), &env.inv, sku)
        .await
        .expect("begun")
        .expect("the engine lacked the SKU");
    // A gateway writes an answer of the lost generation: key 2 sold to `o-2`.
    let ahead = StreamId {
        ms: 4_000_000_000_000,
        seq: 5,
    };
    assert!(ahead > before);
    let answered = LedgerEvent {
        event_id: format!("{sku}/{ahead}"),
        sku: sku.into(),
        kind: "claim".into(),
        at_ms: env.now(),
        key_local_ids: vec![2],
        order_id: Some("o-2".into()),
        user_id: Some("u-9".into()),
        redeemer: None,
        reason: None,
        late: false,
        fields_json: r#"{"t":"claim"}"#.into(),
        gen: None,
    };
    assert_eq!(
        env.ledger.apply_events(&[answered]).await.expect("written"),
        1
    );
    finish_restore(env.ledger.as_ref(), &env.inv, sku, &rebuild.gen)
        .await
        .expect("finished");
    let order = env.claim(sku, "o-3", 1, None).await;
    assert_eq!(order.keys.len(), 1);
    assert_eq!(
        order.keys[0].key_id,
        format!("{sku}.3"),
        "keys 1 and 2 are sold"
    );
    drain(&writer, sku).await;
    let trail = env
        .ledger
        .key_events(&format!("{sku}.3"))
        .await
        .expect("read");
    let entry = trail
        .last()
        .and_then(|e| e.event_id.rsplit_once('/'))
        .and_then(|(_, id)| StreamId::parse(id))
        .expect("key 3's claim is in the ledger");
    assert!(entry > ahead, "{entry} after {ahead}");
    assert_eq!(env.ledger.last_entry(sku).await.expect("read"), Some(entry));
}

/// Drift counts keys, not events: one claim of 20 codes in flight explains 20 differing
/// keys, so the SKU shows no drift while it is on its way.
async fn a_claim_of_many_codes_in_flight_is_no_drift(env: Env) {
    let sku = "gift";
    env.stock(sku, 30).await;
    let writer = env.writer("w1");
    drain(&writer, sku).await;
    env.claim(sku, "o-big", 20, None).await;
    let backlog = writer.backlog(sku).await.expect("backlog");
    assert_eq!((backlog.in_flight(), backlog.keys), (1, 20));
    let engine = env.inv.counts(sku).await.expect("engine counts");
    let ledger = env.ledger.counts(sku).await.expect("ledger counts");
    let drift = Drift::between(&engine, &ledger, backlog.in_flight(), backlog.keys);
    assert_eq!((drift.differing, drift.keys), (20, 0));
    drain(&writer, sku).await;
    let backlog = writer.backlog(sku).await.expect("backlog");
    assert_eq!((backlog.in_flight(), backlog.keys), (0, 0));
    env.assert_in_step(sku).await;
}

/// A backlog larger than a batch is committed a batch at a time, and a batch whose commit
/// failed is read again first, topped up with new entries.
async fn backlogs_commit_in_batches_failed_ones_first(env: Env) {
    let sku = "gift";
    env.stock(sku, 2).await;
    for _ in 0..3 {
        env.void_and_restore("gift.1").await;
    }
    assert_eq!(
        env.entry_ids(sku).await.len(),
        8,
        "sku, add, then 3 × void and restore"
    );
    let flaky = Flaky::new(env.ledger.clone());
    let writer = env.writer_with(flaky.clone(), "w1", 60_000, 3);
    let mut passes = Vec::new();
    loop {
        match writer.drain_once(sku).await.expect("drain") {
            0 => break,
            n => passes.push(n),
        }
    }
    assert_eq!(passes, [3, 3, 2]);

    env.void_and_restore("gift.2").await;
    flaky.fail_next(1);
    assert!(
        writer.drain_once(sku).await.is_err(),
        "2 read, not committed"
    );
    env.void_and_restore("gift.2").await;
    assert_eq!(
        writer.drain_once(sku).await.expect("drain"),
        3,
        "the 2 again, and 1 new"
    );
    assert_eq!(writer.drain_once(sku).await.expect("drain"), 1);
    assert_eq!(writer.drain_once(sku).await.expect("drain"), 0);
    env.assert_in_step(sku).await;
    // add + 3 × (void, restore) on key 1; add + 2 × (void, restore) on key 2.
    assert_eq!(env.assert_audit_once(sku, 2).await, 7 + 5);
}

/// With passes pipelined (the next batch read while one commits, carrying the previous
/// batch's acknowledgement), commits that fail behind a read ahead lose nothing, double
/// nothing and reorder nothing: the failed batch and the batch read ahead are committed
/// again, oldest first. Every key's trail in the ledger is in stream order.
async fn failed_commits_behind_reads_ahead_are_retried_oldest_first(env: Env) {
    let sku = "gift";
    env.stock(sku, 2).await;
    for _ in 0..12 {
        env.void_and_restore("gift.1").await;
    }
    let flaky = Flaky::new(env.ledger.clone());
    flaky.fail_every(3);
    let writer = env.writer_with(flaky.clone(), "w1", 60_000, 3);
    let running = Running::start(&writer);
    // More arrive while it runs.
    for _ in 0..6 {
        env.void_and_restore("gift.2").await;
    }
    env.inv.void("gift.1", "check").await.expect("void");
    caught_up(&writer, sku).await;
    assert!(
        flaky.calls() >= 9,
        "commits failed: {} calls",
        flaky.calls()
    );
    env.assert_in_step(sku).await;
    // gift.1: add, 12 × (void, restore), void; gift.2: add, 6 × (void, restore).
    assert_eq!(env.assert_audit_once(sku, 2).await, 26 + 13);
    for key in ["gift.1", "gift.2"] {
        let trail = env.ledger.key_events(key).await.expect("audit trail");
        let ids: Vec<(u64, u64)> = trail
            .iter()
            .map(|e| {
                let id = e.event_id.rsplit('/').next().expect("an entry id");
                let (ms, seq) = id.split_once('-').expect("ms-seq");
                (ms.parse().expect("ms"), seq.parse().expect("seq"))
            })
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{key}: committed out of stream order: {ids:?}"
        );
    }
    running.stop().await;
}

/// A batch whose commit failed is kept and committed again before anything is read: the
/// engine may lose the stream it came from meanwhile (a FLUSHALL, a restart without
/// persistence), and read again from the stream it would be gone. Here the SKU's keys go
/// while the ledger is away; the claim still reaches the ledger.
async fn a_failed_batch_reaches_the_ledger_after_the_engine_lost_its_stream(env: Env) {
    let sku = "gift";
    env.stock(sku, 4).await;
    let flaky = Flaky::new(env.ledger.clone());
    let writer = env.writer_over(flaky.clone(), "w1", 60_000);
    drain(&writer, sku).await;
    env.claim(sku, "o-1", 1, None).await;
    let before = flaky.calls();
    flaky.fail_next(u32::MAX);
    let running = Running::start(&writer);
    eventually(
        Duration::from_secs(20),
        "the claim's commit failing",
        || async { flaky.calls() },
        |calls| *calls > before,
    )
    .await;
    env.lose_sku(sku).await;
    flaky.fail_next(0);
    eventually(
        Duration::from_secs(30),
        "the claim in the ledger",
        || async { env.ledger.counts(sku).await.expect("counts").claimed },
        |claimed| *claimed == 1,
    )
    .await;
    running.stop().await;
}

/// Consumers of stopped gateways, owning nothing, are deleted from the group once silent for
/// long; a consumer that still owns entries is kept whatever its silence.
async fn consumers_of_stopped_gateways_are_reaped(env: Env) {
    let sku = "gift";
    env.stock(sku, 2).await;
    env.read_and_die(sku, "ghost", 1).await;
    let reap = |idle_ms: &str| {
        let args = vec!["reap".into(), GROUP.into(), idle_ms.to_owned()];
        let keys = vec![events_key(sku), dead_letters_key(sku)];
        let engine = env.engine.clone();
        async move {
            let reply = engine
                .eval(&SCRIPTS.stream, keys, args)
                .await
                .expect("reap");
            reply.as_i64().expect("a count")
        }
    };
    assert_eq!(reap("0").await, 0, "the ghost still owns an entry");
    drain(&env.writer_over(env.ledger.clone(), "w2", 0), sku).await;
    assert_eq!(env.consumers(sku).await, 2);
    assert_eq!(reap("3600000").await, 0, "not silent for long enough");
    assert_eq!(reap("0").await, 2, "owning nothing, both go");
    assert_eq!(env.consumers(sku).await, 0);
}

/// While the ledger is down nothing is acknowledged; once it is back every event is
/// committed, once, including a batch whose commit went through but whose answer was lost.
async fn ledger_outage_loses_nothing_and_doubles_nothing(env: Env) {
    let sku = "gift";
    env.stock(sku, 6).await;
    let flaky = Flaky::new(env.ledger.clone());
    let writer = env.writer_over(flaky.clone(), "w1", 60_000);

    env.claim(sku, "o-1", 1, None).await;
    flaky.fail_next(2);
    for _ in 0..2 {
        match writer.drain_once(sku).await {
            Err(WriterError::Ledger(LedgerError::Unavailable(_))) => {}
            other => panic!("expected the ledger to be unavailable, got {other:?}"),
        }
    }
    let entries = env.entry_ids(sku).await.len() as u64;
    let backlog = writer.backlog(sku).await.expect("backlog");
    assert_eq!(backlog.in_flight(), entries, "nothing acknowledged");
    assert_eq!(env.ledger.counts(sku).await.expect("counts").claimed, 0);

    // Committed, but the writer never hears so: it must not acknowledge, and the retry
    // must not apply anything twice.
    env.claim(sku, "o-2", 2, Some(60_000)).await;
    flaky.lose_next_replies(1);
    assert!(writer.drain_once(sku).await.is_err());
    assert_eq!(env.ledger.counts(sku).await.expect("counts").claimed, 1);
    assert_eq!(
        writer.backlog(sku).await.expect("backlog").pending,
        entries + 1
    );

    env.inv.confirm(sku, "o-2", true).await.expect("confirm");
    drain(&writer, sku).await;
    env.assert_in_step(sku).await;
    // Each key's trail: o-1's key: add, claim; o-2's keys: add, hold, confirm; others: add.
    assert_eq!(env.assert_audit_once(sku, 6).await, 2 + 3 * 2 + 3);
    assert_eq!(
        writer.backlog(sku).await.expect("backlog"),
        Backlog::default()
    );
}

/// `run` drains every SKU of the ledger, rides out a ledger outage, and stops when told.
async fn run_drains_every_sku_through_an_outage(env: Env) {
    env.stock("gift", 4).await;
    env.stock("game", 4).await;
    let flaky = Flaky::new(env.ledger.clone());
    flaky.fail_next(3);
    let writer = env.writer_over(flaky.clone(), "w1", 60_000);
    let running = Running::start(&writer);

    env.claim("gift", "o-1", 2, None).await;
    let held = env.claim("game", "o-1", 1, Some(60_000)).await;
    let last = held.event_id.expect("a hold names its event");
    assert!(
        writer
            .wait_committed("game", &last, Duration::from_secs(20))
            .await
    );
    for sku in ["gift", "game"] {
        let w = &writer;
        eventually(
            Duration::from_secs(20),
            "the ledger to catch up",
            || async move { w.backlog(sku).await.expect("backlog").in_flight() },
            |in_flight| *in_flight == 0,
        )
        .await;
        env.assert_in_step(sku).await;
    }
    assert_eq!(flaky.failures_left(), 0, "the outage happened");

    running.stop().await;
}

/// A writer that lingers, and polls when idle, only once a minute: within a test, only an
/// answer that waits for it wakes it.
fn writer_slow_to_poll(env: &Env) -> EventWriter {
    EventWriter::new(
        env.engine.clone(),
        env.ledger.clone(),
        WriterOptions {
            group: GROUP.into(),
            consumer: "w1".into(),
            idle_poll_ms: 60_000,
            linger_ms: 60_000,
            ..WriterOptions::default()
        },
    )
}

/// A writer that committed a partial batch nobody waited for lingers before reading again,
/// but an answer that starts waiting wakes it at once: here the linger (and the idle poll)
/// last a minute, and the waiter is answered within its 20 s.
async fn a_lingering_writer_is_woken_by_a_waiter(env: Env) {
    let sku = "gift";
    env.stock(sku, 4).await;
    env.claim(sku, "o-1", 1, None).await;
    let writer = writer_slow_to_poll(&env);
    let running = Running::start(&writer);
    // The first round commits o-1's event, a partial batch nobody waits for: it lingers
    // (with its acknowledgement, which the next read carries).
    let ledger = &env.ledger;
    eventually(
        Duration::from_secs(20),
        "the first event to be committed",
        || async move { ledger.counts(sku).await.expect("counts").claimed },
        |claimed| *claimed == 1,
    )
    .await;
    let next = env
        .claim(sku, "o-2", 1, None)
        .await
        .event_id
        .expect("a claim names its event");
    assert!(
        writer
            .wait_committed(sku, &next, Duration::from_secs(20))
            .await,
        "the waiter woke the lingering writer"
    );
    env.assert_in_step(sku).await;
    running.stop().await;
}

/// Answers one after the other, each waiting for its commit: each wakes the writer, which
/// reads at once. The commit of one answer reads ahead beside it and finds nothing; the
/// next answer comes after that read, so it must not be taken for the next batch (which
/// would find nothing and leave the answer for the idle poll, here a minute).
async fn answers_in_turn_each_wake_the_writer_to_read(env: Env) {
    let sku = "gift";
    env.stock(sku, 4).await;
    let writer = writer_slow_to_poll(&env);
    let running = Running::start(&writer);
    for n in 1..=4 {
        let answer = env
            .claim(sku, &format!("o-{n}"), 1, None)
            .await
            .event_id
            .expect("a claim names its event");
        assert!(
            writer
                .wait_committed(sku, &answer, Duration::from_secs(20))
                .await,
            "answer {n} was committed while it waited"
        );
    }
    env.assert_in_step(sku).await;
    running.stop().await;
}

/// A read of new entries whose answer is lost (the entries were delivered to the writer,
/// the answer never came) is no loss: the writer reads its own pending entries again before
/// it trusts reads of new entries only, and every event is committed once. The first such
/// read is a read ahead (the first read of a SKU includes its own entries and goes through
/// the script), whose failure fails no pass: nothing else sends the writer back to them.
async fn read_ahead_answers_lost_are_read_again(env: Env) {
    let sku = "gift";
    env.stock(sku, 2).await;
    for _ in 0..12 {
        env.void_and_restore("gift.1").await;
    }
    let lossy = Arc::new(FaultyReads {
        inner: env.engine.clone(),
        fault: ReadFault::Lost,
        struck: AtomicBool::new(false),
    });
    let writer = EventWriter::new(
        lossy.clone(),
        env.ledger.clone(),
        WriterOptions {
            group: GROUP.into(),
            consumer: "w1".into(),
            batch: 3,
            idle_poll_ms: 10,
            max_backoff_ms: 50,
            ..WriterOptions::default()
        },
    );
    let running = Running::start(&writer);
    for _ in 0..6 {
        env.void_and_restore("gift.2").await;
    }
    caught_up(&writer, sku).await;
    assert!(lossy.struck.load(Ordering::SeqCst), "an answer was lost");
    env.assert_in_step(sku).await;
    // gift.1: add, 12 × (void, restore); gift.2: add, 6 × (void, restore).
    assert_eq!(env.assert_audit_once(sku, 2).await, 25 + 13);
    running.stop().await;
}

/// What [`FaultyReads`] does to the first read of new entries that delivers some.
#[derive(Debug, Clone, Copy)]
enum ReadFault {
    /// Its answer is lost: the call fails, the entries stay delivered.
    Lost,
    /// It is sent a second time, as a client library does when the connection drops with
    /// the command in flight, and only the second answer arrives.
    SentTwice,
}

/// An engine whose first read of new entries that delivers some suffers `fault`.
struct FaultyReads {
    inner: Arc<dyn ScriptEngine>,
    fault: ReadFault,
    struck: AtomicBool,
}

impl ScriptEngine for FaultyReads {
    fn eval(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> futures_util::future::BoxFuture<'_, Result<Reply, EngineError>> {
        self.inner.eval(script, keys, args)
    }

    fn read_new_entries(
        &self,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> futures_util::future::BoxFuture<'_, Result<Reply, EngineError>> {
        Box::pin(async move {
            let reply = self
                .inner
                .read_new_entries(keys.clone(), args.clone())
                .await?;
            // Past the head (pending … owned), entries.
            let entries = reply.as_array().map_or(0, |r| r.len().saturating_sub(9));
            if entries > 0 && !self.struck.swap(true, Ordering::SeqCst) {
                return match self.fault {
                    ReadFault::Lost => Err(EngineError::Unavailable("the answer was lost".into())),
                    ReadFault::SentTwice => self.inner.read_new_entries(keys, args).await,
                };
            }
            Ok(reply)
        })
    }

    fn ping(&self) -> futures_util::future::BoxFuture<'_, Result<(), EngineError>> {
        self.inner.ping()
    }

    fn kind(&self) -> kamigate::engine::EngineKind {
        self.inner.kind()
    }
}

/// A read of new entries whose reply never reached the writer, though Redis ran it, and
/// that its client then sent again, as a client library does when a connection drops with
/// the command in flight: the second read succeeds with the next entries (or none), and
/// the first read's entries sit delivered to the writer. The writer notices that it holds
/// more than it knows of and reads its own entries next, instead of leaving them (and the
/// answers waiting for them) until they are reclaimed as a dead consumer's.
async fn entries_of_a_read_sent_twice_are_read_again(env: Env) {
    let sku = "gift";
    env.stock(sku, 2).await;
    let replayed = Arc::new(FaultyReads {
        inner: env.engine.clone(),
        fault: ReadFault::SentTwice,
        struck: AtomicBool::new(false),
    });
    let writer = EventWriter::new(
        replayed.clone(),
        env.ledger.clone(),
        WriterOptions {
            group: GROUP.into(),
            consumer: "w1".into(),
            idle_poll_ms: 10,
            max_backoff_ms: 50,
            // A reclaim would take the entries over only after an hour.
            reclaim_idle_ms: 3_600_000,
            ..WriterOptions::default()
        },
    );
    let running = Running::start(&writer);
    caught_up(&writer, sku).await;
    for _ in 0..4 {
        env.void_and_restore("gift.2").await;
    }
    caught_up(&writer, sku).await;
    assert!(
        replayed.struck.load(Ordering::SeqCst),
        "a read was sent twice"
    );
    env.assert_in_step(sku).await;
    // gift.1: add; gift.2: add, 4 × (void, restore).
    assert_eq!(env.assert_audit_once(sku, 2).await, 1 + 9);
    running.stop().await;
}

/// The same fault between a void and the restore that undid it: the lost reply held the
/// restore, the read sent again the void after it. A SKU's events are committed in stream
/// order whatever a read's reply did, so the ledger's key ends as the engine's: void.
async fn a_read_sent_twice_keeps_the_events_in_order(env: Env) {
    let sku = "gift";
    env.stock(sku, 2).await;
    let plain = EventWriter::new(
        env.engine.clone(),
        env.ledger.clone(),
        WriterOptions {
            group: GROUP.into(),
            consumer: "w0".into(),
            ..WriterOptions::default()
        },
    );
    while plain.drain_once(sku).await.expect("drain the adds") > 0 {}
    // Entries: void, restore, void. One entry a read: the first read (of its own and new
    // entries) takes the first void, the next (of new entries only) is the one sent twice.
    env.inv.void("gift.2", "check").await.expect("void");
    env.inv.restore("gift.2", "check").await.expect("restore");
    env.inv.void("gift.2", "again").await.expect("void again");
    let replayed = Arc::new(FaultyReads {
        inner: env.engine.clone(),
        fault: ReadFault::SentTwice,
        struck: AtomicBool::new(false),
    });
    let writer = EventWriter::new(
        replayed.clone(),
        env.ledger.clone(),
        WriterOptions {
            group: GROUP.into(),
            consumer: "w1".into(),
            batch: 1,
            idle_poll_ms: 10,
            max_backoff_ms: 50,
            reclaim_idle_ms: 3_600_000,
            ..WriterOptions::default()
        },
    );
    let running = Running::start(&writer);
    caught_up(&writer, sku).await;
    assert!(
        replayed.struck.load(Ordering::SeqCst),
        "a read was sent twice"
    );
    assert!(
        env.ledger
            .get_key("gift.2")
            .await
            .expect("read the key")
            .expect("the key")
            .void,
        "the ledger's key ends void, as the engine's"
    );
    env.assert_in_step(sku).await;
    running.stop().await;
}

/// A writer's `run`, spawned, to be stopped.
struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(writer: &EventWriter) -> Running {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(writer.clone().run(stopped));
        Running { stop, task }
    }

    /// Tells it to stop; it must within 10 s, without panicking.
    async fn stop(self) {
        self.stop.send(true).expect("the writer listens");
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("run stops when told")
            .expect("run does not panic");
    }
}

/// Waits (30 s at most) until nothing of `sku`'s stream is owed to the ledger.
async fn caught_up(writer: &EventWriter, sku: &str) {
    eventually(
        Duration::from_secs(30),
        "the ledger to catch up",
        || async move { writer.backlog(sku).await.expect("backlog").in_flight() },
        |in_flight| *in_flight == 0,
    )
    .await;
}

// ---- a ledger that fails on demand -----------------------------------------------------

/// Wraps a ledger; `apply_events` fails as told, everything else passes through.
struct Flaky {
    inner: Arc<dyn Ledger>,
    /// Calls that fail before touching the database.
    fail: AtomicU32,
    /// Calls that commit and then fail, as when the connection drops before the answer.
    lose: AtomicU32,
    /// When above 0, every so many calls fail, alternately before and after committing.
    every: AtomicU32,
    calls: AtomicU32,
}

impl Flaky {
    fn new(inner: Arc<dyn Ledger>) -> Arc<Flaky> {
        Arc::new(Flaky {
            inner,
            fail: AtomicU32::new(0),
            lose: AtomicU32::new(0),
            every: AtomicU32::new(0),
            calls: AtomicU32::new(0),
        })
    }

    fn fail_every(&self, n: u32) {
        self.every.store(n, Ordering::SeqCst);
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    fn fail_next(&self, n: u32) {
        self.fail.store(n, Ordering::SeqCst);
    }

    fn lose_next_replies(&self, n: u32) {
        self.lose.store(n, Ordering::SeqCst);
    }

    fn failures_left(&self) -> u32 {
        self.fail.load(Ordering::SeqCst)
    }
}

/// Takes one from `n` if it is above 0.
fn take(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

#[async_trait::async_trait]
impl Ledger for Flaky {
    async fn put_sku(&self, sku: &str, c: &str, v: u32, now: i64) -> Result<bool, LedgerError> {
        self.inner.put_sku(sku, c, v, now).await
    }
    async fn replace_sku_config(
        &self,
        sku: &str,
        old: &str,
        new: &str,
        now: i64,
    ) -> Result<bool, LedgerError> {
        self.inner.replace_sku_config(sku, old, new, now).await
    }
    async fn get_sku(&self, sku: &str) -> Result<Option<SkuRecord>, LedgerError> {
        self.inner.get_sku(sku).await
    }
    async fn list_skus(&self) -> Result<Vec<String>, LedgerError> {
        self.inner.list_skus().await
    }
    async fn set_epoch(&self, sku: &str, epoch: &str) -> Result<(), LedgerError> {
        self.inner.set_epoch(sku, epoch).await
    }
    async fn fence_rebuild(&self, sku: &str, gen: &str) -> Result<(), LedgerError> {
        self.inner.fence_rebuild(sku, gen).await
    }
    async fn rereads(&self) -> Result<Vec<String>, LedgerError> {
        self.inner.rereads().await
    }
    async fn begin_batch(
        &self,
        sku: &str,
        b: &str,
        upload: &str,
        now: i64,
    ) -> Result<BatchStart, LedgerError> {
        self.inner.begin_batch(sku, b, upload, now).await
    }
    async fn touch_batch(
        &self,
        sku: &str,
        b: &str,
        upload: &str,
        now: i64,
    ) -> Result<(), LedgerError> {
        self.inner.touch_batch(sku, b, upload, now).await
    }
    async fn insert_keys(
        &self,
        sku: &str,
        b: &str,
        upload: &str,
        rows: &[NewKey],
        seal: &dyn Seal,
    ) -> Result<Vec<InsertOutcome>, LedgerError> {
        self.inner.insert_keys(sku, b, upload, rows, seal).await
    }
    async fn finish_batch(
        &self,
        sku: &str,
        b: &str,
        upload: &str,
        report: &BatchCounts,
        activate: bool,
        now: i64,
    ) -> Result<(), LedgerError> {
        self.inner
            .finish_batch(sku, b, upload, report, activate, now)
            .await
    }
    async fn activate_batch(
        &self,
        sku: &str,
        b: &str,
        now: i64,
    ) -> Result<BatchRecord, LedgerError> {
        self.inner.activate_batch(sku, b, now).await
    }
    async fn abort_batch(&self, sku: &str, b: &str, upload: &str) -> Result<(), LedgerError> {
        self.inner.abort_batch(sku, b, upload).await
    }
    async fn get_batch(&self, sku: &str, b: &str) -> Result<Option<BatchRecord>, LedgerError> {
        self.inner.get_batch(sku, b).await
    }
    async fn keys_after(
        &self,
        sku: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, LedgerError> {
        self.inner.keys_after(sku, after, limit).await
    }
    async fn stored_codes_after(
        &self,
        sku: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<StoredCode>, LedgerError> {
        self.inner.stored_codes_after(sku, after, limit).await
    }
    async fn recode_keys(&self, sku: &str, recodes: &[Recode]) -> Result<u64, LedgerError> {
        self.inner.recode_keys(sku, recodes).await
    }
    async fn has_unsealed_codes(&self) -> Result<bool, LedgerError> {
        self.inner.has_unsealed_codes().await
    }
    async fn purge_freed(&self) -> Result<(), LedgerError> {
        self.inner.purge_freed().await
    }
    async fn key_checks(&self) -> Result<Vec<(String, String, String)>, LedgerError> {
        self.inner.key_checks().await
    }
    async fn add_key_check(
        &self,
        key_id: &str,
        kind: &str,
        check_value: &str,
        now_ms: i64,
    ) -> Result<bool, LedgerError> {
        self.inner
            .add_key_check(key_id, kind, check_value, now_ms)
            .await
    }
    async fn apply_events(&self, events: &[LedgerEvent]) -> Result<u64, LedgerError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let every = self.every.load(Ordering::SeqCst);
        if every > 0 && call.is_multiple_of(every) {
            if (call / every).is_multiple_of(2) {
                self.inner.apply_events(events).await?;
                return Err(LedgerError::Unavailable(
                    "connection lost after commit".into(),
                ));
            }
            return Err(LedgerError::Unavailable("injected outage".into()));
        }
        if take(&self.fail) {
            return Err(LedgerError::Unavailable("injected outage".into()));
        }
        if take(&self.lose) {
            self.inner.apply_events(events).await?;
            return Err(LedgerError::Unavailable(
                "connection lost after commit".into(),
            ));
        }
        self.inner.apply_events(events).await
    }
    async fn key_events(&self, key_id: &str) -> Result<Vec<EventRecord>, LedgerError> {
        self.inner.key_events(key_id).await
    }
    async fn order_events_after(
        &self,
        sku: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, EventRecord)>, LedgerError> {
        self.inner.order_events_after(sku, after_seq, limit).await
    }
    async fn order_events(
        &self,
        sku: &str,
        order_id: &str,
    ) -> Result<Vec<(i64, EventRecord)>, LedgerError> {
        self.inner.order_events(sku, order_id).await
    }
    async fn last_entry(&self, sku: &str) -> Result<Option<StreamId>, LedgerError> {
        self.inner.last_entry(sku).await
    }
    async fn get_key(&self, key_id: &str) -> Result<Option<KeyRecord>, LedgerError> {
        self.inner.get_key(key_id).await
    }
    async fn counts(&self, sku: &str) -> Result<StateCounts, LedgerError> {
        self.inner.counts(sku).await
    }
    async fn counts_by_version(
        &self,
        sku: &str,
    ) -> Result<std::collections::BTreeMap<i64, StateCounts>, LedgerError> {
        self.inner.counts_by_version(sku).await
    }
    async fn pauses(&self) -> Result<Vec<PauseRecord>, LedgerError> {
        self.inner.pauses().await
    }
    async fn pause(&self, pause: &NewPause) -> Result<Option<PauseRecord>, LedgerError> {
        self.inner.pause(pause).await
    }
    async fn resume(
        &self,
        sku: &str,
        action: &str,
        reason: Option<&str>,
        actor: &str,
        at_ms: i64,
    ) -> Result<Option<PauseRecord>, LedgerError> {
        self.inner.resume(sku, action, reason, actor, at_ms).await
    }
    async fn pause_history(
        &self,
        sku: Option<&str>,
        limit: u32,
    ) -> Result<Vec<PauseEventRecord>, LedgerError> {
        self.inner.pause_history(sku, limit).await
    }
    async fn pools(&self, sku: &str) -> Result<Vec<(String, i64)>, LedgerError> {
        self.inner.pools(sku).await
    }
    async fn channels(&self) -> Result<Vec<ChannelRecord>, LedgerError> {
        self.inner.channels().await
    }
    async fn put_channel(
        &self,
        channel: &str,
        config_json: &str,
        actor: &str,
        at_ms: i64,
    ) -> Result<bool, LedgerError> {
        self.inner
            .put_channel(channel, config_json, actor, at_ms)
            .await
    }
    async fn add_channel_token(
        &self,
        token: &ChannelTokenRecord,
        actor: &str,
    ) -> Result<bool, LedgerError> {
        self.inner.add_channel_token(token, actor).await
    }
    async fn revoke_channel_token(
        &self,
        channel: &str,
        token_id: &str,
        actor: &str,
        at_ms: i64,
    ) -> Result<Option<ChannelTokenRecord>, LedgerError> {
        self.inner
            .revoke_channel_token(channel, token_id, actor, at_ms)
            .await
    }
    async fn channel_history(
        &self,
        channel: &str,
        limit: u32,
    ) -> Result<Vec<ChannelEventRecord>, LedgerError> {
        self.inner.channel_history(channel, limit).await
    }
    async fn channel_orders(
        &self,
        channel: &str,
        from_ms: i64,
        to_ms: i64,
        after: Option<OrderCursor>,
        limit: u32,
    ) -> Result<Vec<OrderRecord>, LedgerError> {
        self.inner
            .channel_orders(channel, from_ms, to_ms, after, limit)
            .await
    }
    async fn find_orders(&self, order_keys: &[String]) -> Result<Vec<OrderRecord>, LedgerError> {
        self.inner.find_orders(order_keys).await
    }
    async fn gateway_seen(&self, id: &str, now_ms: i64) -> Result<(), LedgerError> {
        self.inner.gateway_seen(id, now_ms).await
    }
    async fn gateways_seen_since(&self, since_ms: i64) -> Result<Vec<String>, LedgerError> {
        self.inner.gateways_seen_since(since_ms).await
    }
    async fn gateway_gone(&self, id: &str, now_ms: i64) -> Result<(), LedgerError> {
        self.inner.gateway_gone(id, now_ms).await
    }
    async fn ping(&self) -> Result<(), LedgerError> {
        self.inner.ping().await
    }
}

// ---- both engines ----------------------------------------------------------------------

macro_rules! on_both_engines {
    ($($scenario:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let env = super::Env::start(super::EngineKind::Embedded, super::Store::Sqlite)
                    .await
                    .expect("SQLite is always there");
                super::$scenario(env).await
            })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let env = super::Env::start(super::EngineKind::Redis, super::Store::Sqlite)
                    .await
                    .expect("SQLite is always there");
                super::$scenario(env).await
            })*
        }
    };
}

on_both_engines!(
    ledger_follows_every_kind_of_change,
    poison_is_dead_lettered_and_does_not_block_later_entries,
    entries_of_a_dead_consumer_are_taken_over,
    acked_entries_are_trimmed_and_pending_ones_kept,
    a_read_carrying_acknowledgements_trims_what_they_settle,
    backlog_reports_pending_and_lag,
    wait_committed_answers_after_the_commit,
    an_answer_of_a_lost_generation_is_never_taken_as_committed,
    answers_the_engine_lost_reach_the_ledger_from_the_journal,
    a_claim_of_many_codes_in_flight_is_no_drift,
    backlogs_commit_in_batches_failed_ones_first,
    consumers_of_stopped_gateways_are_reaped,
    ledger_outage_loses_nothing_and_doubles_nothing,
    run_drains_every_sku_through_an_outage,
    a_lingering_writer_is_woken_by_a_waiter,
    answers_in_turn_each_wake_the_writer_to_read,
    read_ahead_answers_lost_are_read_again,
    entries_of_a_read_sent_twice_are_read_again,
    a_read_sent_twice_keeps_the_events_in_order,
    a_void_taken_over_after_its_restore_leaves_the_key_restored,
    failed_commits_behind_reads_ahead_are_retried_oldest_first,
    a_failed_batch_reaches_the_ledger_after_the_engine_lost_its_stream,
    a_rebuild_waits_for_every_gateway_alive_to_write_its_answers,
    answers_written_while_a_rebuild_waits_set_its_stream_ids,
);

/// Redis 7.0 counts a group's lag from a read counter that can fall behind the group's
/// deliveries (the nemesis found one 44 behind after Redis was killed, restarted from its
/// AOF and paused under load): its lag then never drains. Set wrong by hand here, as it was
/// found; the backlog must still drain to nothing, and never report more than the stream
/// holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_counter_redis_got_wrong_leaves_no_backlog_behind() {
    let env = Env::start(EngineKind::Redis, Store::Sqlite)
        .await
        .expect("SQLite is always there");
    let sku = "gift";
    env.stock(sku, 4).await;
    env.claim(sku, "o-1", 1, None).await;
    let writer = env.writer("w1");
    drain(&writer, sku).await;
    assert_eq!(
        writer.backlog(sku).await.expect("backlog"),
        Backlog::default()
    );

    let events = events_key(sku);
    env.cmd(&["XGROUP", "SETID", &events, GROUP, "$", "ENTRIESREAD", "0"])
        .await;
    let redis_lag = || async {
        let groups = env.cmd(&["XINFO", "GROUPS", &events]).await;
        let group = groups.as_array().expect("groups")[0].clone();
        let fields = group.as_array().expect("a group");
        let at = fields
            .iter()
            .position(|f| f.as_str() == Some("lag"))
            .expect("lag");
        fields[at + 1].as_i64().expect("a lag")
    };
    let phantom = redis_lag().await;
    assert!(
        phantom > 1,
        "Redis reports a lag of {phantom} with nothing undelivered"
    );
    assert_eq!(
        writer.backlog(sku).await.expect("backlog"),
        Backlog::default(),
        "nothing is undelivered"
    );

    env.claim(sku, "o-2", 1, None).await;
    let backlog = writer.backlog(sku).await.expect("backlog");
    assert!(
        (1..=2).contains(&backlog.lag) && backlog.lag < redis_lag().await as u64,
        "one entry undelivered, and the stream holds two: {backlog:?}"
    );
    drain(&writer, sku).await;
    assert_eq!(
        writer.backlog(sku).await.expect("backlog"),
        Backlog::default()
    );
    env.assert_in_step(sku).await;
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_rebuild_waits_for_every_gateway_alive_to_write_its_answers() {
        if let Some(env) = super::Env::start(super::EngineKind::Redis, super::Store::Postgres).await
        {
            super::a_rebuild_waits_for_every_gateway_alive_to_write_its_answers(env).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_ledger_follows_every_kind_of_change() {
        if let Some(env) =
            super::Env::start(super::EngineKind::Embedded, super::Store::Postgres).await
        {
            super::ledger_follows_every_kind_of_change(env).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_ledger_follows_every_kind_of_change() {
        if let Some(env) = super::Env::start(super::EngineKind::Redis, super::Store::Postgres).await
        {
            super::ledger_follows_every_kind_of_change(env).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_ledger_outage_loses_nothing_and_doubles_nothing() {
        if let Some(env) =
            super::Env::start(super::EngineKind::Embedded, super::Store::Postgres).await
        {
            super::ledger_outage_loses_nothing_and_doubles_nothing(env).await
        }
    }
}
