//! Retention: settled orders and redemption marks leave the engine once the ledger has them,
//! and a retry of any of them still gets its first answer and changes nothing more.
//!
//! The scenarios run on both engines (embedded, and a `redis-server` of their own) and both
//! ledgers (SQLite, and a PostgreSQL database of their own), through the same
//! [`Inventory`] and a real event writer; the last tests run whole gateways.

mod support;

#[path = "support/postgres.rs"]
mod pg_support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::engine::keys::orders_key;
use kamigate::engine::redis::{RedisEngine, RedisOptions};
use kamigate::engine::{Script, ScriptEngine};
use kamigate::error::Error;
use kamigate::inventory::retire::Retired;
use kamigate::inventory::{ClaimRequest, Counts, Inventory, NewCode, Order, PoolDraw};
use kamigate::ledger::writer::{EventWriter, WriterOptions};
use kamigate::sku::SkuConfig;
use pg_support::TestDatabase;
use reqwest::StatusCode;
use serde_json::json;
use support::clock::ManualClock;
use support::eventually::eventually;
use support::gateway::{config, metric, TestGateway};
use support::postgres_server::Postgres;
use support::redis_server::RedisServer;

/// Past the default retention of seven days.
const EIGHT_DAYS_MS: u64 = 8 * 24 * 3600 * 1000;
const WEEK_MS: u64 = 7 * 24 * 3600 * 1000;

struct Harness {
    inv: Inventory,
    clock: ManualClock,
    writer: EventWriter,
    _redis: Option<RedisServer>,
    _dir: tempfile::TempDir,
    _pg: Option<TestDatabase>,
}

#[derive(Clone, Copy)]
enum Engine {
    Embedded,
    Redis,
}

#[derive(Clone, Copy)]
enum Ledger {
    Sqlite,
    Postgres,
}

impl Harness {
    /// `None` when PostgreSQL is wanted and not reachable (outside CI, see `pg_support`).
    async fn start(engine: Engine, ledger: Ledger) -> Option<Harness> {
        let pg = match ledger {
            Ledger::Sqlite => None,
            Ledger::Postgres => Some(TestDatabase::create().await?),
        };
        let (engine, redis): (Arc<dyn ScriptEngine>, _) = match engine {
            Engine::Embedded => (
                Arc::new(EmbeddedEngine::start().expect("embedded engine starts")),
                None,
            ),
            Engine::Redis => {
                let redis = RedisServer::start().await;
                let engine = RedisEngine::connect(&redis.url(), RedisOptions::default())
                    .await
                    .expect("connects to its redis-server");
                (Arc::new(engine), Some(redis))
            }
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let ledger = kamigate::ledger::open(pg.as_ref().map(|db| db.url()), dir.path())
            .await
            .expect("ledger opens");
        let clock = ManualClock::new();
        let inv = Inventory::with_clock(engine.clone(), clock.clock());
        inv.restore_retired_from(ledger.clone());
        let writer = EventWriter::new(engine, ledger, WriterOptions::default());
        Some(Harness {
            inv,
            clock,
            writer,
            _redis: redis,
            _dir: dir,
            _pg: pg,
        })
    }

    /// Creates `sku` with `n` codes; returns the codes.
    async fn stock(&self, sku: &str, config: SkuConfig, n: usize) -> Vec<String> {
        let index = self.inv.watch_index().await.expect("index read");
        self.inv
            .mark_index_ready(&index)
            .await
            .expect("index marked");
        self.inv.put_sku(sku, &config).await.expect("SKU created");
        let codes: Vec<String> = (0..n).map(|i| format!("{sku}CODE{i:05}")).collect();
        let new: Vec<NewCode> = codes
            .iter()
            .map(|c| NewCode {
                canonical: c.to_uppercase(),
                expires_at_ms: None,
            })
            .collect();
        self.inv.add_codes(sku, &new).await.expect("codes added");
        codes.iter().map(|c| c.to_uppercase()).collect()
    }

    async fn claim(
        &self,
        sku: &str,
        order: &str,
        quantity: u64,
        user: Option<&str>,
        hold_ms: Option<u64>,
    ) -> Result<Order, Error> {
        let req = ClaimRequest {
            order_id: order.into(),
            quantity,
            user_id: user.map(str::to_owned),
            hold_ms,
            pool: PoolDraw::default(),
        };
        self.inv.claim(sku, &req).await
    }

    /// Commits every event of `sku` to the ledger, and reads once more so the writer knows
    /// the group's floor is past them.
    async fn commit(&self, sku: &str) -> String {
        while self.writer.drain_once(sku).await.expect("drained") > 0 {}
        self.writer.drain_once(sku).await.expect("floor read");
        self.writer
            .committed_through(sku)
            .expect("the writer read the SKU")
    }

    /// Retires what is due after the default retention, through `through`.
    async fn retire(&self, sku: &str, through: &str) -> Retired {
        let cutoff = self.clock.now() - WEEK_MS;
        let mut total = Retired::default();
        loop {
            let r = self
                .inv
                .retire(sku, cutoff, through, 3, false)
                .await
                .expect("retire runs");
            total.orders += r.orders;
            total.marks += r.marks;
            if !r.more {
                return total;
            }
        }
    }

    /// Whether the engine holds a record of order `order` (not only its fingerprint).
    async fn has_record(&self, sku: &str, order: &str) -> bool {
        self.inv
            .engine()
            .hexists(orders_key(sku), order.into())
            .await
            .expect("read")
    }

    async fn counts(&self, sku: &str) -> Counts {
        self.inv.counts(sku).await.expect("counts")
    }

    /// The number of entries in the SKU's event stream: a retry that changes nothing adds none.
    async fn events(&self, sku: &str) -> i64 {
        static PROBE: OnceLock<&'static Script> = OnceLock::new();
        let script = *PROBE.get_or_init(|| {
            Box::leak(Box::new(Script::new(
                "probe_events",
                "return redis.call('XLEN', K.events)",
            )))
        });
        let reply = self
            .inv
            .engine()
            .eval(script, kamigate::engine::keys::sku_keys(sku), vec![])
            .await
            .expect("probe runs");
        reply.as_i64().expect("a count")
    }

    /// Leaves the fingerprint of order `order` as if it had retired, though it never existed.
    async fn plant_fingerprint(&self, sku: &str, order: &str) {
        static PROBE: OnceLock<&'static Script> = OnceLock::new();
        let script = *PROBE.get_or_init(|| {
            Box::leak(Box::new(Script::new(
                "probe_plant",
                "local h = redis.sha1hex(ARGV[1])\n\
                 local bucket = string.sub(h, 1, 4)\n\
                 local prints = redis.call('HGET', K.retired, bucket) or ''\n\
                 return redis.call('HSET', K.retired, bucket, prints .. ',' .. string.sub(h, 5, 10))",
            )))
        });
        self.inv
            .engine()
            .eval(
                script,
                kamigate::engine::keys::sku_keys(sku),
                vec![order.into()],
            )
            .await
            .expect("probe runs");
    }
}

/// What a client sees of an order: state, keys with their codes, hold expiry, late.
type Seen = (String, Vec<(String, Option<String>)>, Option<u64>, bool);

/// What a client sees of an order: equal for a retry and its first answer.
fn seen(o: &Order) -> Seen {
    (
        o.state.clone(),
        o.keys
            .iter()
            .map(|k| (k.key_id.clone(), k.code.clone()))
            .collect(),
        o.hold_expires_at_ms,
        o.late,
    )
}

/// Orders of every kind and a redemption, retired once the ledger has them; each retried:
/// the same answer as before, no code issued, no event written, nothing counted twice.
async fn retired_orders_and_redemptions_replay_their_first_answer(h: Harness) {
    let config = SkuConfig {
        per_user_limit: 3,
        ..SkuConfig::default()
    };
    let codes = h.stock("ret", config, 8).await;
    let claimed = h
        .claim("ret", "o-claim", 2, Some("u-1"), None)
        .await
        .expect("claimed");
    h.claim("ret", "o-conf", 1, Some("u-2"), Some(60_000))
        .await
        .expect("held");
    h.inv
        .confirm("ret", "o-conf", true)
        .await
        .expect("confirmed");
    h.claim("ret", "o-rel", 1, Some("u-2"), Some(60_000))
        .await
        .expect("held");
    h.inv.release("ret", "o-rel").await.expect("released");
    h.claim("ret", "o-exp", 1, Some("u-3"), Some(60_000))
        .await
        .expect("held");
    h.clock.advance(60_000);
    h.inv.expire_due("ret", 10).await.expect("swept");
    let live = h
        .claim("ret", "o-live", 1, Some("u-3"), Some(WEEK_MS * 4))
        .await
        .expect("a hold that is still live");
    let code = claimed.keys[0]
        .code
        .clone()
        .expect("a final claim shows codes");
    assert!(codes.contains(&code));
    let redeemed = h.inv.redeem("ret", &code, "r-1").await.expect("redeemed");

    let orders = ["o-claim", "o-conf", "o-rel", "o-exp", "o-live"];
    let mut before = Vec::new();
    for order in orders {
        before.push(seen(&h.inv.order("ret", order).await.expect("order")));
    }
    let counts = h.counts("ret").await;

    let through = h.commit("ret").await;
    h.clock.advance(EIGHT_DAYS_MS);
    let retired = h.retire("ret", &through).await;
    assert_eq!(
        (retired.orders, retired.marks),
        (4, 1),
        "every settled order and the redemption retire, the live hold stays"
    );
    for order in ["o-claim", "o-conf", "o-rel", "o-exp"] {
        assert!(!h.has_record("ret", order).await, "{order} retired");
    }
    assert!(
        h.has_record("ret", "o-live").await,
        "a live hold never retires"
    );
    assert!(!h.inv.knows_order("ret", "o-never").await.expect("read"));
    let events = h.events("ret").await;

    // Each retry answers as before.
    let again = h
        .claim("ret", "o-claim", 2, Some("u-1"), None)
        .await
        .expect("replayed");
    assert!(again.replayed);
    assert_eq!(seen(&again), before[0]);
    assert!(matches!(
        h.claim("ret", "o-claim", 1, Some("u-1"), None).await,
        Err(Error::OrderConflict(_))
    ));
    let confirmed = h
        .inv
        .confirm("ret", "o-conf", true)
        .await
        .expect("replayed");
    assert!(confirmed.replayed);
    assert_eq!(seen(&confirmed), before[1]);
    let released = h.inv.release("ret", "o-rel").await.expect("replayed");
    assert!(released.replayed);
    assert_eq!(seen(&released), before[2]);
    assert!(matches!(
        h.inv.confirm("ret", "o-rel", true).await,
        Err(Error::HoldExpired)
    ));
    let expired = h
        .claim("ret", "o-exp", 1, Some("u-3"), Some(60_000))
        .await
        .expect("replayed");
    assert!(expired.replayed);
    assert_eq!(seen(&expired), before[3]);
    for (order, first) in orders.iter().zip(&before) {
        assert_eq!(
            &seen(&h.inv.order("ret", order).await.expect("order")),
            first
        );
    }
    assert_eq!(seen(&live), before[4]);
    let redeemed_again = h.inv.redeem("ret", &code, "r-1").await.expect("replayed");
    assert!(redeemed_again.replayed);
    assert_eq!(redeemed_again.redeemed_at_ms, redeemed.redeemed_at_ms);
    assert!(matches!(
        h.inv.redeem("ret", &code, "r-2").await,
        Err(Error::CardUsed { .. })
    ));

    assert_eq!(h.counts("ret").await, counts, "no code moved");
    assert_eq!(h.events("ret").await, events, "no change was made");
    // The user's retired order still counts toward the limit: 2 of 3 used.
    assert!(matches!(
        h.claim("ret", "o-more", 2, Some("u-1"), None).await,
        Err(Error::UserLimit {
            current: 2,
            limit: 3
        })
    ));

    // Restored orders stay for another retention period, then retire again.
    let through = h.commit("ret").await;
    assert_eq!(h.retire("ret", &through).await, Retired::default());
    h.clock.advance(EIGHT_DAYS_MS);
    let through = h.commit("ret").await;
    assert_eq!(h.retire("ret", &through).await.orders, 4);

    // The edge's check (sold out, paused) knows a retired order by its fingerprint, and
    // brings it back for the retry that follows.
    for order in ["o-claim", "o-conf", "o-rel", "o-exp"] {
        assert!(!h.has_record("ret", order).await, "{order} retired again");
        assert!(
            h.inv.knows_order("ret", order).await.expect("read"),
            "{order} is known by its fingerprint"
        );
        assert!(h.has_record("ret", order).await, "{order} restored");
    }
    assert_eq!(h.events("ret").await, events, "no change was made");
}

/// An expired hold confirmed after it retired takes the late path, as it would have.
async fn a_retired_lapsed_hold_confirmed_late_takes_fresh_codes(h: Harness) {
    h.stock("late", SkuConfig::default(), 2).await;
    h.claim("late", "o-1", 1, None, Some(60_000))
        .await
        .expect("held");
    h.clock.advance(60_000);
    h.inv.expire_due("late", 10).await.expect("swept");
    let through = h.commit("late").await;
    h.clock.advance(EIGHT_DAYS_MS);
    assert_eq!(h.retire("late", &through).await.orders, 1);
    let late = h
        .inv
        .confirm("late", "o-1", true)
        .await
        .expect("confirmed late");
    assert!(late.late && !late.replayed);
    assert_eq!(late.state, "claimed");
    assert_eq!(late.keys.len(), 1);
    assert_eq!(h.counts("late").await.claimed, 1);
    let again = h.inv.confirm("late", "o-1", true).await.expect("replayed");
    assert!(again.replayed);
    assert_eq!(seen(&again), seen(&late));
}

/// A new order id whose fingerprint matches a retired order's costs a ledger read and is
/// then claimed as new; looked up, it is unknown.
async fn an_order_id_matching_another_fingerprint_is_claimed_as_new(h: Harness) {
    h.stock("fp", SkuConfig::default(), 2).await;
    h.plant_fingerprint("fp", "o-new").await;
    h.plant_fingerprint("fp", "o-ghost").await;
    assert!(
        !h.inv.knows_order("fp", "o-new").await.expect("read"),
        "a fingerprint the ledger knows no order of is no order: the edge may refuse it as new"
    );
    assert!(matches!(
        h.inv.order("fp", "o-ghost").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        h.inv.confirm("fp", "o-ghost", true).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        h.inv.release("fp", "o-ghost").await,
        Err(Error::NotFound(_))
    ));
    let order = h
        .claim("fp", "o-new", 1, None, None)
        .await
        .expect("claimed");
    assert!(!order.replayed);
    let again = h.claim("fp", "o-new", 1, None, None).await.expect("replay");
    assert!(again.replayed);
    assert_eq!(seen(&again), seen(&order));
    // In a batch too.
    let batch = h
        .inv
        .claim_batch(
            "fp",
            &[ClaimRequest {
                order_id: "o-ghost".into(),
                quantity: 1,
                user_id: None,
                hold_ms: None,
                pool: PoolDraw::default(),
            }],
        )
        .await
        .expect("batch runs");
    let (answer, _) = &batch[0];
    let answer = answer.as_ref().expect("claimed");
    assert!(!answer.replayed);
    assert_eq!(h.counts("fp").await.claimed, 2);
}

/// Nothing retires before the ledger has its events: the pass stops at the first record
/// whose change exists only in the stream, and goes on once it is committed.
async fn nothing_retires_before_the_ledger_has_it(h: Harness) {
    h.stock("uc", SkuConfig::default(), 4).await;
    h.claim("uc", "o-1", 1, None, None).await.expect("claimed");
    let through = h.commit("uc").await;
    h.claim("uc", "o-2", 1, None, None).await.expect("claimed");
    h.claim("uc", "o-3", 1, None, None).await.expect("claimed");
    h.clock.advance(EIGHT_DAYS_MS);
    assert_eq!(
        h.retire("uc", "").await,
        Retired::default(),
        "nothing known"
    );
    assert_eq!(h.retire("uc", &through).await.orders, 1, "only o-1");
    assert!(h.has_record("uc", "o-2").await && h.has_record("uc", "o-3").await);
    assert_eq!(h.retire("uc", &through).await, Retired::default());
    let through = h.commit("uc").await;
    assert_eq!(h.retire("uc", &through).await.orders, 2);

    // With retention off, the entries go and every record stays.
    h.claim("uc", "o-4", 1, None, None).await.expect("claimed");
    let through = h.commit("uc").await;
    h.clock.advance(EIGHT_DAYS_MS);
    let kept = h
        .inv
        .retire("uc", h.clock.now(), &through, 100, true)
        .await
        .expect("runs");
    assert_eq!((kept.orders, kept.marks), (0, 0));
    assert!(h.has_record("uc", "o-4").await);
    assert_eq!(h.retire("uc", &through).await, Retired::default());
}

/// Of a reusable code's redemptions only the last one's mark retires: the code's record
/// answers that redeemer alike, and the earlier ones keep their marks.
async fn only_the_mark_the_code_record_answers_for_retires(h: Harness) {
    let config = SkuConfig {
        max_uses: 2,
        ..SkuConfig::default()
    };
    h.stock("multi", config, 1).await;
    let order = h
        .claim("multi", "o-1", 1, None, None)
        .await
        .expect("claimed");
    let code = order.keys[0].code.clone().expect("code");
    let first = h.inv.redeem("multi", &code, "r-1").await.expect("redeemed");
    let second = h.inv.redeem("multi", &code, "r-2").await.expect("redeemed");
    let through = h.commit("multi").await;
    h.clock.advance(EIGHT_DAYS_MS);
    let retired = h.retire("multi", &through).await;
    assert_eq!((retired.orders, retired.marks), (1, 1));
    for (redeemer, answer) in [("r-1", &first), ("r-2", &second)] {
        let again = h
            .inv
            .redeem("multi", &code, redeemer)
            .await
            .expect("replay");
        assert!(again.replayed, "{redeemer}");
        assert_eq!(again.redeemed_at_ms, answer.redeemed_at_ms, "{redeemer}");
    }
    assert!(matches!(
        h.inv.redeem("multi", &code, "r-3").await,
        Err(Error::CardUsed { .. })
    ));
}

/// Claims retrying retired orders while the retention pass runs: every retry gets its first
/// codes, no code goes to two orders, and the stock is exactly what was claimed.
async fn retries_racing_the_retention_pass_never_claim_again(h: Harness) {
    const ORDERS: usize = 40;
    let h = Arc::new(h);
    h.stock("race", SkuConfig::default(), ORDERS + 10).await;
    let mut first = Vec::new();
    for i in 0..ORDERS {
        let o = h
            .claim("race", &format!("o-{i}"), 1, None, None)
            .await
            .expect("claimed");
        first.push(seen(&o));
    }
    let through = h.commit("race").await;
    h.clock.advance(EIGHT_DAYS_MS);
    let retiring = {
        let h = h.clone();
        let through = through.clone();
        tokio::spawn(async move {
            let mut total = 0;
            for _ in 0..100 {
                let r = h
                    .inv
                    .retire("race", h.clock.now() - WEEK_MS, &through, 2, false)
                    .await
                    .expect("retire runs");
                total += r.orders;
            }
            total
        })
    };
    let mut retries = Vec::new();
    for round in 0..3 {
        for i in 0..ORDERS {
            let h = h.clone();
            retries.push(tokio::spawn(async move {
                let o = h
                    .claim("race", &format!("o-{i}"), 1, None, None)
                    .await
                    .expect("replayed");
                (i, round, o)
            }));
        }
    }
    for retry in retries {
        let (i, round, o) = retry.await.expect("task");
        assert!(o.replayed, "o-{i}, round {round}");
        assert_eq!(seen(&o), first[i], "o-{i}, round {round}");
    }
    assert!(retiring.await.expect("task") > 0, "the pass retired orders");
    assert_eq!(h.counts("race").await.claimed, ORDERS as u64);
    assert_eq!(h.counts("race").await.available, 10);
}

macro_rules! matrix {
    ($($scenario:ident),* $(,)?) => {
        mod embedded_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let h = super::Harness::start(super::Engine::Embedded, super::Ledger::Sqlite);
                super::$scenario(h.await.expect("SQLite needs no server")).await
            })*
        }
        mod redis_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let h = super::Harness::start(super::Engine::Redis, super::Ledger::Sqlite);
                super::$scenario(h.await.expect("SQLite needs no server")).await
            })*
        }
        mod embedded_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let h = super::Harness::start(super::Engine::Embedded, super::Ledger::Postgres);
                if let Some(h) = h.await {
                    super::$scenario(h).await
                }
            })*
        }
        mod redis_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let h = super::Harness::start(super::Engine::Redis, super::Ledger::Postgres);
                if let Some(h) = h.await {
                    super::$scenario(h).await
                }
            })*
        }
    };
}

matrix!(
    retired_orders_and_redemptions_replay_their_first_answer,
    a_retired_lapsed_hold_confirmed_late_takes_fresh_codes,
    an_order_id_matching_another_fingerprint_is_claimed_as_new,
    nothing_retires_before_the_ledger_has_it,
    only_the_mark_the_code_record_answers_for_retires,
    retries_racing_the_retention_pass_never_claim_again,
);

// ---- whole gateways --------------------------------------------------------------------------

/// A gateway over an embedded engine on a clock the test moves.
async fn gateway_on(clock: &ManualClock, mut cfg: kamigate::config::Config) -> TestGateway {
    let engine = Arc::new(EmbeddedEngine::start().expect("embedded engine starts"));
    cfg.redis_url = None;
    TestGateway::with_inventory(cfg, Inventory::with_clock(engine, clock.clock())).await
}

/// Which of `orders` of `sku` the gateway's engine no longer holds a record of. (Read from
/// the engine: the metrics are the process's, shared by every gateway of this test binary.)
async fn retired(gw: &TestGateway, sku: &str, orders: &[String]) -> Vec<String> {
    let mut gone = Vec::new();
    for order in orders {
        let held = gw
            .inventory()
            .engine()
            .hexists(orders_key(sku), order.clone())
            .await
            .expect("read");
        if !held {
            gone.push(order.clone());
        }
    }
    gone
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Through the HTTP API: orders retire after the retention, and their retries get their
/// first answers, also while the SKU is sold out at the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_retires_settled_orders_and_answers_their_retries() {
    let clock = ManualClock::new();
    let gw = gateway_on(&clock, config()).await;
    gw.stock("gw", &["GW-1", "GW-2", "GW-3"]).await;
    let (status, first) = gw.claim("gw", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (status, _) = gw
        .claim("gw", json!({"order_id": "o-2", "hold_ms": 60000}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = gw
        .merchant_post("/v1/skus/gw/claims/o-2/release", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let code = first["keys"][0]["code"]
        .as_str()
        .expect("a code")
        .to_owned();
    let (status, redeemed) = gw.redeem(json!({"code": code, "redeemer": "user-1"})).await;
    assert_eq!(status, StatusCode::OK, "{redeemed}");

    clock.advance(EIGHT_DAYS_MS);
    let orders = vec!["o-1".to_owned(), "o-2".to_owned()];
    eventually(
        Duration::from_secs(20),
        "both orders to retire",
        || retired(&gw, "gw", &orders),
        |gone| gone.len() == 2,
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "the redemption to retire",
        || async {
            let text = gw.metrics().await;
            metric(&text, "kamigate_retired_total", &["record=\"redemption\""]).unwrap_or(0.0)
        },
        |n| *n >= 1.0,
    )
    .await;

    // Sold out, remembered at the edge: new orders are refused there, retries still answered.
    let (status, _) = gw
        .claim("gw", json!({"order_id": "o-3", "quantity": 2}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = gw.claim("gw", json!({"order_id": "o-4"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("ERR_SOLD_OUT"))
    );
    let (status, again) = gw.claim("gw", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["keys"], first["keys"]);
    assert_eq!(again["replayed"], true);
    let (status, again) = gw
        .merchant_post("/v1/skus/gw/claims/o-2/release", json!({}))
        .await;
    assert_eq!(
        (status, again["state"].as_str()),
        (StatusCode::OK, Some("released"))
    );
    let (status, again) = gw.redeem(json!({"code": code, "redeemer": "user-1"})).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["redeemed_at"], redeemed["redeemed_at"]);
    assert_eq!(again["replayed"], true);
    // Claims paused: a retired order's retry is still answered, a new order refused.
    let (status, body) = gw
        .admin_post(
            "/v1/skus/gw/pause",
            json!({"action": "claims", "reason": "supplier leak"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    clock.advance(EIGHT_DAYS_MS);
    eventually(
        Duration::from_secs(20),
        "the restored order to retire again",
        || retired(&gw, "gw", &orders),
        |gone| gone.len() == 2,
    )
    .await;
    let (status, again) = gw.claim("gw", json!({"order_id": "o-1"})).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["keys"], first["keys"]);
    let (status, body) = gw.claim("gw", json!({"order_id": "o-5"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("ERR_PAUSED"))
    );
    let text = gw.metrics().await;
    assert!(
        metric(
            &text,
            "kamigate_orders_restored_total",
            &["result=\"restored\""]
        )
        .unwrap_or(0.0)
            >= 2.0
    );
    let counts = gw.counts("gw").await;
    assert_eq!(counts["claimed"], 2, "{counts}");
    assert_eq!(counts["redeemed"], 1, "{counts}");
    gw.stop().await;
}

/// With the ledger's database down, orders whose events it has not committed never retire;
/// once it is back, they do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_retires_while_the_ledger_is_down() {
    let pg = Postgres::start();
    let clock = ManualClock::new();
    let mut cfg = config();
    cfg.durability = Some(kamigate::config::Durability::Engine);
    cfg.database_url = Some(pg.url());
    let gw = gateway_on(&clock, cfg).await;
    let codes: Vec<String> = (0..20).map(|i| format!("DOWN-{i:03}")).collect();
    let refs: Vec<&str> = codes.iter().map(String::as_str).collect();
    gw.stock("down", &refs).await;
    for i in 0..5 {
        let (status, _) = gw
            .claim("down", json!({"order_id": format!("a-{i}")}))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    eventually(
        Duration::from_secs(20),
        "the ledger to have the first orders",
        || gw.merchant_get("/v1/skus/down"),
        |(status, v)| *status == StatusCode::OK && v["in_flight"] == 0,
    )
    .await;
    pg.down();
    for i in 0..5 {
        let (status, _) = gw
            .claim("down", json!({"order_id": format!("b-{i}")}))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    clock.advance(EIGHT_DAYS_MS);
    let (first, rest) = (ids("a", 5), ids("b", 5));
    eventually(
        Duration::from_secs(20),
        "the committed orders to retire",
        || retired(&gw, "down", &first),
        |gone| gone.len() == 5,
    )
    .await;
    assert_eq!(
        retired(&gw, "down", &rest).await,
        Vec::<String>::new(),
        "orders whose events exist only in the stream stay"
    );
    pg.up();
    eventually(
        Duration::from_secs(30),
        "the rest to retire once the ledger has them",
        || retired(&gw, "down", &rest),
        |gone| gone.len() == 5,
    )
    .await;
    for i in 0..5 {
        let (status, body) = gw
            .claim("down", json!({"order_id": format!("b-{i}")}))
            .await;
        assert_eq!(
            (status, body["replayed"].as_bool()),
            (StatusCode::OK, Some(true))
        );
    }
    gw.stop().await;
}
