//! One suite, two engines: every scenario runs against the embedded engine and against a
//! real `redis-server` of its own, through the same [`Inventory`].

mod support;

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::engine::keys::sku_keys;
use kamigate::engine::redis::{RedisEngine, RedisOptions};
use kamigate::engine::stream_id::StreamId;
use kamigate::engine::{Script, ScriptEngine};
use kamigate::error::Error;
use kamigate::inventory::{
    Ack, Added, AnswerEntry, ClaimRequest, Counts, Inventory, NewCode, Order, PoolDraw, PoolLevels,
};
use kamigate::ledger::KeyRecord;
use kamigate::sku::{Candidate, SkuConfig};
use support::clock::ManualClock;
use support::eventually::eventually;
use support::proxy::Proxy;
use support::redis_server::RedisServer;

struct Harness {
    inv: Inventory,
    clock: ManualClock,
    _redis: Option<RedisServer>,
}

impl Harness {
    async fn embedded() -> Harness {
        let engine: Arc<dyn ScriptEngine> =
            Arc::new(EmbeddedEngine::start().expect("embedded engine starts"));
        Harness::over(engine, None)
    }

    async fn redis() -> Harness {
        let redis = RedisServer::start().await;
        let engine = RedisEngine::connect(&redis.url(), RedisOptions::default())
            .await
            .expect("connects to its redis-server");
        Harness::over(Arc::new(engine), Some(redis))
    }

    fn over(engine: Arc<dyn ScriptEngine>, redis: Option<RedisServer>) -> Harness {
        let clock = ManualClock::new();
        Harness {
            inv: Inventory::with_clock(engine, clock.clock()),
            clock,
            _redis: redis,
        }
    }

    /// Marks the global index complete, as a gateway does once every SKU is indexed.
    async fn index_complete(&self) {
        let watch = self.inv.watch_index().await.expect("index read");
        assert!(
            self.inv
                .mark_index_ready(&watch)
                .await
                .expect("index marked"),
            "nothing lost meanwhile"
        );
    }

    /// Creates `sku` with `config` and `n` codes; returns the codes.
    async fn stock(&self, sku: &str, config: SkuConfig, n: usize) -> Vec<String> {
        self.index_complete().await;
        self.inv.put_sku(sku, &config).await.expect("SKU created");
        let codes: Vec<String> = (0..n).map(|i| format!("{sku}-CODE-{i:05}")).collect();
        self.add(sku, &codes, None).await;
        codes.iter().map(|c| c.replace('-', "")).collect()
    }

    async fn add(&self, sku: &str, codes: &[String], expires_at_ms: Option<u64>) -> Vec<Added> {
        let new: Vec<NewCode> = codes
            .iter()
            .map(|c| NewCode {
                canonical: c.replace('-', "").to_uppercase(),
                expires_at_ms,
            })
            .collect();
        let mut added = Vec::new();
        for chunk in new.chunks(500) {
            added.extend(self.inv.add_codes(sku, chunk).await.expect("codes added"));
        }
        added
    }

    /// Script calls the Redis server has run so far (`None` on the embedded engine).
    async fn script_calls(&self) -> Option<u64> {
        let calls = commands_run(self._redis.as_ref()?, &["fcall", "evalsha", "eval"]).await;
        Some(calls)
    }

    async fn claim(&self, sku: &str, order: &str, quantity: u64) -> Result<Order, Error> {
        let req = ClaimRequest {
            order_id: order.into(),
            quantity,
            user_id: None,
            hold_ms: None,
            pool: Default::default(),
        };
        self.inv.claim(sku, &req).await
    }

    async fn hold(&self, sku: &str, order: &str, quantity: u64, ms: u64) -> Result<Order, Error> {
        let req = ClaimRequest {
            order_id: order.into(),
            quantity,
            user_id: None,
            hold_ms: Some(ms),
            pool: Default::default(),
        };
        self.inv.claim(sku, &req).await
    }

    async fn counts(&self, sku: &str) -> Counts {
        self.inv.counts(sku).await.expect("counts")
    }

    /// The event types in the SKU's stream, oldest first.
    async fn events(&self, sku: &str) -> Vec<String> {
        static PROBE: OnceLock<&'static Script> = OnceLock::new();
        self.probe(
            &PROBE,
            "probe_events",
            "local out = {}\n\
             for _, e in ipairs(redis.call('XRANGE', K.events, '-', '+')) do\n\
               out[#out + 1] = e[2][2]\n\
             end\n\
             return out",
            sku,
        )
        .await
    }

    /// The ids of the entries in the SKU's stream, oldest first.
    async fn stream_ids(&self, sku: &str) -> Vec<StreamId> {
        static PROBE: OnceLock<&'static Script> = OnceLock::new();
        let ids: Vec<String> = self
            .probe(
                &PROBE,
                "probe_stream_ids",
                "local out = {}\n\
                 for _, e in ipairs(redis.call('XRANGE', K.events, '-', '+')) do\n\
                   out[#out + 1] = e[1]\n\
                 end\n\
                 return out",
                sku,
            )
            .await;
        ids.iter()
            .map(|id| StreamId::parse(id).expect("a stream id"))
            .collect()
    }

    /// The key ids in the SKU's `avail` list, head first (put back as they were).
    async fn listed(&self, sku: &str) -> Vec<String> {
        static PROBE: OnceLock<&'static Script> = OnceLock::new();
        self.probe(
            &PROBE,
            "probe_listed",
            "local ids = redis.call('LPOP', K.avail, 100000) or {}\n\
             if #ids > 0 then redis.call('RPUSH', K.avail, unpack(ids)) end\n\
             return ids",
            sku,
        )
        .await
    }

    /// Runs test script `source` (named `name`, made once into `cell`) over `sku`'s keys;
    /// its reply, a list of strings.
    async fn probe(
        &self,
        cell: &'static OnceLock<&'static Script>,
        name: &'static str,
        source: &'static str,
        sku: &str,
    ) -> Vec<String> {
        let probe = cell.get_or_init(|| Box::leak(Box::new(Script::new(name, source))));
        let reply = self
            .inv
            .engine()
            .eval(probe, sku_keys(sku), vec![])
            .await
            .expect("probe runs");
        reply
            .as_array()
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect()
    }
}

fn codes_of(order: &Order) -> Vec<String> {
    order
        .keys
        .iter()
        .map(|k| k.code.clone().expect("a final claim reveals its codes"))
        .collect()
}

fn total(c: &Counts) -> u64 {
    c.available + c.held + c.claimed + c.redeemed + c.void
}

// ---- scenarios ------------------------------------------------------------------------

async fn concurrent_claims_issue_exactly_the_stock_and_no_code_twice(h: Harness) {
    h.stock("flash", SkuConfig::default(), 40).await;
    let inv = Arc::new(h.inv.clone());
    let mut tasks = Vec::new();
    for i in 0..160 {
        let inv = inv.clone();
        tasks.push(tokio::spawn(async move {
            let req = ClaimRequest {
                order_id: format!("o-{i}"),
                quantity: 1 + (i % 2),
                user_id: None,
                hold_ms: None,
                pool: Default::default(),
            };
            inv.claim("flash", &req).await
        }));
    }
    let mut issued = Vec::new();
    let mut sold_out = 0;
    for t in tasks {
        match t.await.expect("task ran") {
            Ok(order) => issued.extend(codes_of(&order)),
            Err(Error::SoldOut) => sold_out += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    let distinct: HashSet<_> = issued.iter().collect();
    assert_eq!(issued.len(), 40, "exactly the stock is issued");
    assert_eq!(distinct.len(), 40, "no code is issued twice");
    assert!(sold_out > 0);
    let c = h.counts("flash").await;
    assert_eq!((c.available, c.claimed), (0, 40));
}

async fn retried_claim_returns_the_same_codes_even_after_sell_out(h: Harness) {
    h.stock("retry", SkuConfig::default(), 3).await;
    let first = h.claim("retry", "o-1", 2).await.expect("claimed");
    assert!(!first.replayed);
    h.claim("retry", "o-2", 1).await.expect("last code claimed");
    assert!(matches!(
        h.claim("retry", "o-3", 1).await,
        Err(Error::SoldOut)
    ));
    let again = h.claim("retry", "o-1", 2).await.expect("replayed");
    assert!(again.replayed);
    assert_eq!(codes_of(&again), codes_of(&first));
    assert!(first.event_id.is_some());
    assert_eq!(
        again.event_id, first.event_id,
        "a replay waits on the original event"
    );
    assert_eq!(h.counts("retry").await.claimed, 3);
}

async fn doubly_sent_orders_get_identical_answers(h: Harness) {
    h.stock("double", SkuConfig::default(), 10).await;
    let inv = h.inv.clone();
    let send = |inv: Inventory| async move {
        let req = ClaimRequest {
            order_id: "same".into(),
            quantity: 3,
            user_id: Some("u-1".into()),
            hold_ms: None,
            pool: Default::default(),
        };
        inv.claim("double", &req).await.expect("claimed")
    };
    let (a, b) = tokio::join!(send(inv.clone()), send(inv.clone()));
    assert_eq!(codes_of(&a), codes_of(&b));
    assert!(
        a.replayed != b.replayed,
        "exactly one of the two did the work"
    );
    assert_eq!(h.counts("double").await.claimed, 3);
}

async fn reused_order_id_with_other_parameters_is_a_conflict(h: Harness) {
    h.stock("conflict", SkuConfig::default(), 5).await;
    h.claim("conflict", "o-1", 1).await.expect("claimed");
    assert!(matches!(
        h.claim("conflict", "o-1", 2).await,
        Err(Error::OrderConflict(_))
    ));
    assert!(matches!(
        h.hold("conflict", "o-1", 1, 60_000).await,
        Err(Error::OrderConflict(_))
    ));
    assert_eq!(
        h.counts("conflict").await.claimed,
        1,
        "nothing more was claimed"
    );
}

async fn holds_expire_and_their_codes_return(h: Harness) {
    h.stock("hold", SkuConfig::default(), 1).await;
    let held = h.hold("hold", "o-1", 1, 1_000).await.expect("held");
    assert_eq!(held.state, "held");
    assert!(
        held.keys[0].code.is_none(),
        "a hold does not reveal its code"
    );
    assert_eq!(held.hold_expires_at_ms, Some(h.clock.now() + 1_000));
    assert!(matches!(
        h.claim("hold", "o-2", 1).await,
        Err(Error::SoldOut)
    ));
    h.clock.advance(999);
    assert!(matches!(
        h.claim("hold", "o-3", 1).await,
        Err(Error::SoldOut)
    ));
    h.clock.advance(1);
    let next = h
        .claim("hold", "o-4", 1)
        .await
        .expect("the lapsed code is sold again");
    assert_eq!(next.keys[0].key_id, held.keys[0].key_id);
    let lapsed = h.inv.order("hold", "o-1").await.expect("order readable");
    assert_eq!(lapsed.state, "expired");
}

async fn sweep_returns_lapsed_holds_without_other_traffic(h: Harness) {
    h.stock("sweep", SkuConfig::default(), 2).await;
    h.hold("sweep", "o-1", 2, 500).await.expect("held");
    assert_eq!(h.counts("sweep").await.held, 2);
    h.clock.advance(500);
    let (lapsed, more) = h.inv.expire_due("sweep", 10).await.expect("sweep runs");
    assert_eq!((lapsed, more), (1, false));
    let c = h.counts("sweep").await;
    assert_eq!((c.available, c.held), (2, 0));
}

async fn confirm_makes_a_hold_final_and_reveals_codes(h: Harness) {
    h.stock("confirm", SkuConfig::default(), 2).await;
    h.hold("confirm", "o-1", 2, 60_000).await.expect("held");
    let confirmed = h
        .inv
        .confirm("confirm", "o-1", true)
        .await
        .expect("confirmed");
    assert_eq!(confirmed.state, "claimed");
    assert!(!confirmed.late);
    assert_eq!(codes_of(&confirmed).len(), 2);
    let again = h
        .inv
        .confirm("confirm", "o-1", true)
        .await
        .expect("replayed");
    assert!(again.replayed);
    assert_eq!(codes_of(&again), codes_of(&confirmed));
    h.clock.advance(120_000);
    let c = h.counts("confirm").await;
    assert_eq!((c.claimed, c.held, c.available), (2, 0, 0));
}

async fn late_confirm_takes_fresh_codes_or_is_sold_out(h: Harness) {
    h.stock("late", SkuConfig::default(), 2).await;
    h.hold("late", "o-1", 1, 1_000).await.expect("held");
    h.clock.advance(1_000);
    let late = h
        .inv
        .confirm("late", "o-1", true)
        .await
        .expect("late confirm");
    assert!(late.late);
    assert_eq!(late.state, "claimed");
    assert_eq!(late.keys.len(), 1);
    h.hold("late", "o-2", 1, 1_000).await.expect("held");
    h.claim("late", "o-3", 1)
        .await
        .expect_err("only the held code is left");
    h.clock.advance(1_000);
    h.claim("late", "o-4", 1).await.expect("the lapsed code");
    assert!(matches!(
        h.inv.confirm("late", "o-2", true).await,
        Err(Error::SoldOut)
    ));
}

/// A late confirm's fresh codes presume the hold's went back: the reply carries the lapse
/// along with the confirm, whether this call or an earlier sweep lapsed the hold, so the
/// answering gateway keeps (or awaits) both. An in-time confirm stands on nothing earlier.
async fn late_confirm_carries_the_lapse_it_stands_on(h: Harness) {
    let field = |e: &kamigate::inventory::Emitted, name: &str| {
        e.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    h.stock("lapse", SkuConfig::default(), 4).await;
    h.hold("lapse", "in-time", 1, 60_000).await.expect("held");
    let confirmed = h
        .inv
        .confirm("lapse", "in-time", true)
        .await
        .expect("confirmed");
    let emitted = confirmed.emitted.expect("a change");
    assert_eq!(field(&emitted, "t"), "confirm");
    assert!(emitted.before.is_empty(), "{emitted:?}");

    h.hold("lapse", "o-1", 1, 1_000).await.expect("held");
    h.hold("lapse", "o-2", 1, 1_000).await.expect("held");
    h.clock.advance(1_000);
    // o-1 lapses in the confirm's own call; o-2 in a sweep before its confirm.
    let late = h.inv.confirm("lapse", "o-1", true).await.expect("late");
    assert!(late.late);
    let emitted = late.emitted.expect("a change");
    assert_eq!(field(&emitted, "t"), "confirm");
    assert_eq!(emitted.before.len(), 1, "{emitted:?}");
    let lapse = &emitted.before[0];
    assert_eq!(
        (field(lapse, "t"), field(lapse, "order")),
        ("expire".into(), "o-1".into())
    );
    let id = |e: &kamigate::inventory::Emitted| {
        kamigate::ledger::journal::split_answer_id(&e.answer_id)
            .map(|(_, id)| id)
            .expect("an answer id")
    };
    assert!(
        id(lapse) < id(&emitted),
        "the lapse came first: {emitted:?}"
    );
    h.inv.expire_due("lapse", 10).await.expect("sweep runs");
    let late = h.inv.confirm("lapse", "o-2", true).await.expect("late");
    let emitted = late.emitted.expect("a change");
    assert_eq!(emitted.before.len(), 1, "{emitted:?}");
    let lapse = &emitted.before[0];
    assert_eq!(
        (field(lapse, "t"), field(lapse, "order")),
        ("expire".into(), "o-2".into())
    );
    assert_eq!(
        Some(field(&emitted, "lapse").as_str()),
        lapse.answer_id.split_once(':').map(|(_, id)| id),
        "the confirm names its lapse"
    );
    // A replay made no change and carries nothing; it finds both events in the stream.
    let again = h.inv.confirm("lapse", "o-2", true).await.expect("replayed");
    assert!(again.replayed && again.emitted.is_none(), "{again:?}");
    let answer = again.event_id.expect("an answer id");
    assert_eq!(answer, emitted.answer_id);
    assert_eq!(
        h.inv.answer_entry("lapse", &answer).await.expect("read"),
        AnswerEntry::Kept(emitted),
        "a replay keeps the lapse with the confirm"
    );
}

/// A new claim's reply reports its event in short and the gateway rebuilds the entry (see
/// `ClaimEvent`): what it keeps must be the stream's entry byte for byte, for a final claim
/// and a hold, with and without a user, from a pool or the shared remainder, alone
/// (`claim.lua`) and in a batch (`claims_batch.lua`).
async fn claim_events_kept_are_the_streams_entries(h: Harness) {
    h.stock("kept", SkuConfig::default(), 12).await;
    h.inv
        .set_pool("kept", "app", 3, "ops", "a pool to draw on")
        .await
        .expect("pool set");
    let req = |order: &str, qty: u64, user: Option<&str>, hold_ms: Option<u64>, pool: PoolDraw| {
        ClaimRequest {
            order_id: order.into(),
            quantity: qty,
            user_id: user.map(Into::into),
            hold_ms,
            pool,
        }
    };
    let app = |share| PoolDraw {
        channel: "app".into(),
        share,
    };
    let alone = [
        req("o-1", 1, None, None, PoolDraw::default()),
        req("o-2", 2, Some("u-1"), Some(60_000), PoolDraw::default()),
        req("app/o-3", 1, Some("u-2"), None, app(false)),
    ];
    let mut orders = Vec::new();
    for r in &alone {
        orders.push(h.inv.claim("kept", r).await.expect("claimed"));
    }
    let batch = [
        req("app/o-4", 3, None, Some(1_000), app(true)),
        req("o-5", 1, Some("u-1"), None, PoolDraw::default()),
        req("o-1", 1, None, None, PoolDraw::default()),
    ];
    for (answer, _) in h.inv.claim_batch("kept", &batch).await.expect("batch") {
        orders.push(answer.expect("claimed"));
    }
    let replay = orders.pop().expect("o-1 again");
    assert!(replay.replayed && replay.emitted.is_none(), "{replay:?}");
    let mut kinds = Vec::new();
    for order in orders {
        let emitted = order.emitted.expect("a new claim's event");
        assert_eq!(Some(&emitted.answer_id), order.event_id.as_ref());
        kinds.push(emitted.fields[0].1.clone());
        let pooled = emitted
            .fields
            .iter()
            .find(|(n, _)| n == "pooled")
            .expect("pooled");
        if order.order_id == "app/o-4" {
            assert_eq!(pooled.1, "2", "what the pool had left: {emitted:?}");
        }
        assert_eq!(
            h.inv
                .answer_entry("kept", &emitted.answer_id)
                .await
                .expect("read"),
            AnswerEntry::Kept(emitted),
            "{}",
            order.order_id
        );
    }
    assert_eq!(kinds, ["claim", "hold", "claim", "hold", "claim"]);
}

/// A new redemption's reply reports its event in short as a claim's does (see
/// `RedeemEvent`): what the gateway keeps is the stream's entry, for each use of a code.
async fn redemption_events_kept_are_the_streams_entries(h: Harness) {
    let config = SkuConfig {
        max_uses: 2,
        ..SkuConfig::default()
    };
    h.stock("kept-use", config, 1).await;
    let code = codes_of(&h.claim("kept-use", "o-1", 1).await.expect("claimed")).remove(0);
    for (redeemer, uses) in [("first-one", "1"), ("second", "2")] {
        let used = h
            .inv
            .redeem("kept-use", &code, redeemer)
            .await
            .expect("redeemed");
        let emitted = used.emitted.expect("a new redemption's event");
        assert_eq!(Some(&emitted.answer_id), used.event_id.as_ref());
        assert!(emitted.fields.contains(&("uses".into(), uses.into())));
        assert_eq!(
            h.inv
                .answer_entry("kept-use", &emitted.answer_id)
                .await
                .expect("read"),
            AnswerEntry::Kept(emitted),
            "{redeemer}"
        );
    }
    let again = h.inv.redeem("kept-use", &code, "second").await;
    assert!(again.expect("replayed").emitted.is_none());
}

/// Claim calls write counts and settled entries once at their end (see `DEFERRED` in
/// `lua/prelude.lua`). A call that fails on the way keeps what it did before the failure,
/// as a script that wrote at once would: the counts agree with the keys it took, and an
/// order it finished replays and retires as usual.
async fn a_claim_call_failing_midway_keeps_what_it_did(h: Harness) {
    static BREAK: OnceLock<&'static Script> = OnceLock::new();
    static SETTLED: OnceLock<&'static Script> = OnceLock::new();
    h.stock("midway", SkuConfig::default(), 6).await;
    // Per-user counts that are not a hash: the second order's user count fails.
    h.probe(
        &BREAK,
        "break_users",
        "redis.call('RPUSH', K.users, 'not a hash') return {}",
        "midway",
    )
    .await;
    let req = |order: &str, qty: u64, user: Option<&str>| ClaimRequest {
        order_id: order.into(),
        quantity: qty,
        user_id: user.map(Into::into),
        hold_ms: None,
        pool: PoolDraw::default(),
    };
    let failed = h
        .inv
        .claim_batch("midway", &[req("o-1", 2, None), req("o-2", 1, Some("u"))])
        .await;
    assert!(failed.is_err(), "{failed:?}");
    let counts = h.counts("midway").await;
    assert_eq!(
        (counts.available, counts.claimed, total(&counts)),
        (3, 3, 6),
        "o-1's two keys and the one o-2 took before failing: {counts:?}"
    );
    let again = h.claim("midway", "o-1", 2).await.expect("o-1 was made");
    assert!(again.replayed, "{again:?}");
    assert_eq!(codes_of(&again).len(), 2);
    let settled = h
        .probe(
            &SETTLED,
            "settled",
            "local s = redis.call('LPOP', K.settled, 1000) or {}\n\
             if #s > 0 then redis.call('RPUSH', K.settled, unpack(s)) end\n\
             return s",
            "midway",
        )
        .await;
    assert_eq!(settled.len(), 1, "{settled:?}");
    assert!(settled[0].ends_with("|o-1"), "{settled:?}");
}

async fn late_confirm_can_be_disallowed(h: Harness) {
    let config = SkuConfig {
        allow_late_confirm: false,
        ..SkuConfig::default()
    };
    h.stock("strict", config, 2).await;
    h.hold("strict", "o-1", 1, 1_000).await.expect("held");
    h.clock.advance(5_000);
    assert!(matches!(
        h.inv.confirm("strict", "o-1", true).await,
        Err(Error::HoldExpired)
    ));
    assert_eq!(h.counts("strict").await.available, 2);
}

async fn release_returns_codes_and_final_claims_cannot_be_released(h: Harness) {
    h.stock("release", SkuConfig::default(), 2).await;
    h.hold("release", "o-1", 2, 60_000).await.expect("held");
    let released = h.inv.release("release", "o-1").await.expect("released");
    assert_eq!(released.state, "released");
    assert!(
        h.inv
            .release("release", "o-1")
            .await
            .expect("again")
            .replayed
    );
    assert_eq!(h.counts("release").await.available, 2);
    assert!(matches!(
        h.inv.confirm("release", "o-1", true).await,
        Err(Error::HoldExpired)
    ));
    h.claim("release", "o-2", 1).await.expect("claimed");
    assert!(matches!(
        h.inv.release("release", "o-2").await,
        Err(Error::OrderConflict(_))
    ));
    assert!(matches!(
        h.inv.release("release", "nope").await,
        Err(Error::NotFound(_))
    ));
}

async fn per_user_limit_counts_held_and_claimed_codes(h: Harness) {
    let config = SkuConfig {
        per_user_limit: 2,
        ..SkuConfig::default()
    };
    h.stock("limited", config, 10).await;
    let req = |order: &str, qty: u64, hold_ms: Option<u64>| ClaimRequest {
        order_id: order.into(),
        quantity: qty,
        user_id: Some("u-9".into()),
        hold_ms,
        pool: Default::default(),
    };
    h.inv
        .claim("limited", &req("o-1", 1, None))
        .await
        .expect("first");
    h.inv
        .claim("limited", &req("o-2", 1, Some(1_000)))
        .await
        .expect("held");
    match h.inv.claim("limited", &req("o-3", 1, None)).await {
        Err(Error::UserLimit { current, limit }) => assert_eq!((current, limit), (2, 2)),
        other => panic!("expected the user limit, got {other:?}"),
    }
    h.clock.advance(1_000);
    h.inv
        .claim("limited", &req("o-4", 1, None))
        .await
        .expect("the lapsed hold freed a slot");
}

async fn redeem_only_sold_codes_once_per_code(h: Harness) {
    let codes = h.stock("redeem", SkuConfig::default(), 3).await;
    let order = h.claim("redeem", "o-1", 1).await.expect("claimed");
    let sold = codes_of(&order).remove(0);
    let unsold = codes
        .iter()
        .find(|c| **c != sold)
        .expect("an unsold code")
        .clone();

    let first = h
        .inv
        .redeem("redeem", &sold, "user-42")
        .await
        .expect("redeemed");
    assert!(!first.replayed);
    assert_eq!(first.key_id, order.keys[0].key_id);
    let again = h
        .inv
        .redeem("redeem", &sold, "user-42")
        .await
        .expect("replayed");
    assert!(again.replayed);
    assert_eq!(again.redeemed_at_ms, first.redeemed_at_ms);
    match h.inv.redeem("redeem", &sold, "user-77").await {
        Err(Error::CardUsed {
            redeemed_at_ms,
            masked_redeemer,
        }) => {
            assert_eq!(redeemed_at_ms, first.redeemed_at_ms);
            assert_eq!(masked_redeemer, "us****42");
        }
        other => panic!("expected ERR_CARD_USED, got {other:?}"),
    }
    assert!(matches!(
        h.inv.redeem("redeem", &unsold, "user-42").await,
        Err(Error::CardInvalid)
    ));
    let c = h.counts("redeem").await;
    assert_eq!((c.redeemed, c.claimed, c.available), (1, 0, 2));
}

async fn unsold_unknown_held_and_void_codes_are_indistinguishable(h: Harness) {
    let codes = h.stock("uniform", SkuConfig::default(), 4).await;
    let held = h.hold("uniform", "o-h", 1, 60_000).await.expect("held");
    let voided = h.claim("uniform", "o-v", 1).await.expect("claimed");
    h.inv
        .void(&voided.keys[0].key_id, "chargeback")
        .await
        .expect("voided");
    let void_code = codes_of(&voided).remove(0);
    let held_key = &held.keys[0].key_id;
    let taken: HashSet<String> = [void_code.clone()].into();
    let mut answers = Vec::new();
    for code in codes.iter().filter(|c| !taken.contains(*c)) {
        answers.push(h.inv.redeem("uniform", code, "user-1").await);
    }
    answers.push(h.inv.redeem("uniform", "NEVERIMPORTED", "user-1").await);
    answers.push(h.inv.redeem("uniform", &void_code, "user-1").await);
    let bodies: HashSet<String> = answers
        .iter()
        .map(|a| match a {
            Err(e) => e.envelope().to_string(),
            Ok(r) => panic!("redeemed {r:?} (held key {held_key})"),
        })
        .collect();
    assert_eq!(bodies.len(), 1, "one answer for all: {bodies:?}");
    assert!(bodies.iter().all(|b| b.contains("ERR_CARD_INVALID")));
}

async fn multi_use_codes_redeem_up_to_max_uses(h: Harness) {
    let config = SkuConfig {
        max_uses: 2,
        ..SkuConfig::default()
    };
    h.stock("multi", config, 1).await;
    let code = codes_of(&h.claim("multi", "o-1", 1).await.expect("claimed")).remove(0);
    h.inv
        .redeem("multi", &code, "a-1")
        .await
        .expect("first use");
    assert_eq!(h.counts("multi").await.claimed, 1, "still redeemable");
    h.inv
        .redeem("multi", &code, "b-2")
        .await
        .expect("second use");
    assert!(
        h.inv
            .redeem("multi", &code, "a-1")
            .await
            .expect("replay")
            .replayed
    );
    assert!(matches!(
        h.inv.redeem("multi", &code, "c-3").await,
        Err(Error::CardUsed { .. })
    ));
    assert_eq!(h.counts("multi").await.redeemed, 1);
}

async fn reusable_codes_issue_up_to_max_issues(h: Harness) {
    let config = SkuConfig {
        max_issues: 2,
        ..SkuConfig::default()
    };
    h.stock("reuse", config, 1).await;
    let a = h.claim("reuse", "o-1", 1).await.expect("first issue");
    let b = h.claim("reuse", "o-2", 1).await.expect("second issue");
    assert_eq!(codes_of(&a), codes_of(&b));
    assert!(matches!(
        h.claim("reuse", "o-3", 1).await,
        Err(Error::SoldOut)
    ));
    assert!(
        matches!(h.claim("reuse", "o-4", 2).await, Err(Error::SoldOut)),
        "one order never gets the same code twice"
    );
}

async fn expired_cards_cannot_be_redeemed(h: Harness) {
    h.inv
        .put_sku("expiring", &SkuConfig::default())
        .await
        .expect("SKU");
    let deadline = h.clock.now() + 10_000;
    h.add(
        "expiring",
        &["EXP-1".into(), "EXP-2".into()],
        Some(deadline),
    )
    .await;
    let order = h.claim("expiring", "o-1", 2).await.expect("claimed");
    let codes = codes_of(&order);
    h.inv
        .redeem("expiring", &codes[0], "u-1")
        .await
        .expect("before the deadline");
    h.clock.advance(10_000);
    match h.inv.redeem("expiring", &codes[1], "u-1").await {
        Err(Error::CardExpired { expires_at_ms }) => assert_eq!(expires_at_ms, deadline),
        other => panic!("expected ERR_CARD_EXPIRED, got {other:?}"),
    }
}

async fn adding_codes_again_changes_nothing(h: Harness) {
    h.stock("dups", SkuConfig::default(), 5).await;
    let again = h
        .add(
            "dups",
            &(0..5)
                .map(|i| format!("dups-CODE-{i:05}"))
                .collect::<Vec<_>>(),
            None,
        )
        .await;
    assert!(again.iter().all(|a| matches!(a, Added::Duplicate(_))));
    assert_eq!(total(&h.counts("dups").await), 5);
}

async fn void_takes_codes_out_and_restore_puts_them_back(h: Harness) {
    h.stock("void", SkuConfig::default(), 1).await;
    let key = "void.1";
    assert_eq!(
        h.inv.void(key, "leaked").await.expect("void"),
        Some("available".into())
    );
    assert_eq!(h.inv.void(key, "leaked").await.expect("void again"), None);
    assert!(matches!(
        h.claim("void", "o-1", 1).await,
        Err(Error::SoldOut)
    ));
    assert_eq!(
        h.inv.restore(key, "false alarm").await.expect("restore"),
        Some("available".into())
    );
    h.claim("void", "o-2", 1).await.expect("back on sale");
    assert!(matches!(
        h.inv.void("void.99", "x").await,
        Err(Error::NotFound(_))
    ));
}

/// A key that stops being issuable keeps its place in line until a claim reaches it (taking
/// it out at once would scan the whole line); it is then dropped, never issued. A key that
/// becomes issuable again before that is not listed a second time.
async fn keys_leave_and_rejoin_the_line_each_listed_once(h: Harness) {
    let codes: Vec<String> = (h.stock("line", SkuConfig::default(), 6).await)
        .iter()
        .map(|c| c.to_uppercase())
        .collect();
    h.inv.void("line.2", "leaked").await.expect("void");
    h.inv.void("line.4", "leaked").await.expect("void");
    h.inv
        .restore("line.4", "false alarm")
        .await
        .expect("restore");
    for _ in 0..2 {
        h.inv.void("line.6", "leaked").await.expect("void");
        h.inv
            .restore("line.6", "false alarm")
            .await
            .expect("restore");
    }
    h.inv.void("line.6", "leaked").await.expect("void");
    h.hold("line", "h-1", 1, 1_000).await.expect("hold");
    h.inv.release("line", "h-1").await.expect("release");

    let line = h.listed("line").await;
    let unique: HashSet<&String> = line.iter().collect();
    assert_eq!(unique.len(), line.len(), "a key listed twice: {line:?}");
    for id in ["line.1", "line.3", "line.4", "line.5"] {
        assert!(
            line.iter().any(|l| format!("line.{l}") == id),
            "{id} not listed: {line:?}"
        );
    }

    let mut sold = HashSet::new();
    for i in 0..4 {
        let order = h
            .claim("line", &format!("o-{i}"), 1)
            .await
            .expect("in stock");
        for code in codes_of(&order) {
            assert!(sold.insert(code.clone()), "{code} sold twice");
        }
    }
    let expected: HashSet<String> = [0, 2, 3, 4].iter().map(|&i| codes[i].clone()).collect();
    assert_eq!(sold, expected, "the void keys 2 and 6 were never issued");
    assert!(matches!(
        h.claim("line", "o-4", 1).await,
        Err(Error::SoldOut)
    ));
    assert_eq!(
        h.listed("line").await,
        Vec::<String>::new(),
        "stale entries dropped"
    );
    let counts = h.counts("line").await;
    assert_eq!((counts.available, counts.claimed, counts.void), (0, 4, 2));

    // Back on sale exactly once.
    h.inv.restore("line.2", "found").await.expect("restore");
    let order = h.claim("line", "o-5", 1).await.expect("restored key");
    assert_eq!(codes_of(&order), [codes[1].clone()]);
    assert!(matches!(
        h.claim("line", "o-6", 1).await,
        Err(Error::SoldOut)
    ));

    // A reusable key goes back in line after each issue; a void and restore meanwhile
    // leaves it listed once, so it is issued exactly up to max_issues.
    let reusable = SkuConfig {
        max_issues: 3,
        ..SkuConfig::default()
    };
    let code = h.stock("again", reusable, 1).await.remove(0).to_uppercase();
    h.claim("again", "o-1", 1).await.expect("first issue");
    h.inv.void("again.1", "leaked").await.expect("void");
    h.inv
        .restore("again.1", "false alarm")
        .await
        .expect("restore");
    assert_eq!(h.listed("again").await, ["1"]);
    for order in ["o-2", "o-3"] {
        let got = h.claim("again", order, 1).await.expect("issued again");
        assert_eq!(codes_of(&got), std::slice::from_ref(&code));
    }
    assert!(matches!(
        h.claim("again", "o-4", 1).await,
        Err(Error::SoldOut)
    ));
}

/// Key records written before the `listed` flag have nine fields, and back then exactly the
/// issuable keys were in line: such a record reads as listed when the key is issuable, so a
/// key in line stays in line once through a void and a restore, a void key is not issued,
/// and restoring it lines it up once.
async fn keys_recorded_before_the_listed_flag_are_in_line_when_issuable(h: Harness) {
    let codes: Vec<String> = (h.stock("old", SkuConfig::default(), 3).await)
        .iter()
        .map(|c| c.to_uppercase())
        .collect();
    static PROBE: OnceLock<&'static Script> = OnceLock::new();
    // Every record loses its flag; key 2 becomes void, out of line, as a void then was.
    h.probe(
        &PROBE,
        "probe_nine_fields",
        "local flat = redis.call('HGETALL', K.keys)\n\
         for i = 1, #flat, 2 do\n\
           local rec = string.match(flat[i + 1], '^(.*)|[01]$')\n\
           if flat[i] == '2' then rec = '1' .. string.sub(rec, 2) end\n\
           redis.call('HSET', K.keys, flat[i], rec)\n\
         end\n\
         local line = redis.call('LPOP', K.avail, 100) or {}\n\
         for _, id in ipairs(line) do\n\
           if id ~= '2' then redis.call('RPUSH', K.avail, id) end\n\
         end\n\
         redis.call('HINCRBY', K.counts, 'available', '-1')\n\
         redis.call('HINCRBY', K.counts, 'void', '1')\n\
         return {}",
        "old",
    )
    .await;
    assert_eq!(h.listed("old").await, ["1", "3"]);
    // Key 3 is in line already: a void and a restore leave it there once.
    h.inv.void("old.3", "leaked").await.expect("void");
    h.inv
        .restore("old.3", "false alarm")
        .await
        .expect("restore");
    assert_eq!(h.listed("old").await, ["1", "3"], "each in line once");

    let mut sold = Vec::new();
    for order in ["o-1", "o-2"] {
        sold.extend(codes_of(&h.claim("old", order, 1).await.expect("in line")));
    }
    assert_eq!(sold, [codes[0].clone(), codes[2].clone()]);
    assert!(matches!(
        h.claim("old", "o-3", 1).await,
        Err(Error::SoldOut)
    ));

    h.inv.restore("old.2", "found").await.expect("restore");
    assert_eq!(h.listed("old").await, ["2"], "in line once");
    let order = h.claim("old", "o-4", 1).await.expect("restored key");
    assert_eq!(codes_of(&order), [codes[1].clone()]);
    assert!(matches!(
        h.claim("old", "o-5", 1).await,
        Err(Error::SoldOut)
    ));
    let counts = h.counts("old").await;
    assert_eq!((counts.available, counts.claimed, counts.void), (0, 3, 0));
}

async fn every_state_change_is_an_event(h: Harness) {
    h.stock("events", SkuConfig::default(), 4).await;
    let code = codes_of(&h.claim("events", "o-1", 1).await.expect("claim")).remove(0);
    h.hold("events", "o-2", 1, 1_000).await.expect("hold");
    h.inv.confirm("events", "o-2", true).await.expect("confirm");
    h.hold("events", "o-3", 1, 1_000).await.expect("hold");
    h.inv.release("events", "o-3").await.expect("release");
    h.hold("events", "o-4", 1, 1_000).await.expect("hold");
    h.clock.advance(1_000);
    h.inv.expire_due("events", 10).await.expect("sweep");
    h.inv.redeem("events", &code, "u-1").await.expect("redeem");
    let void = h
        .inv
        .void_change("events.4", "test")
        .await
        .expect("void")
        .expect("changed");
    let emitted = void.emitted.expect("a void names its event");
    assert_eq!(Some(emitted.answer_id), void.event_id);
    assert!(emitted.fields.contains(&("t".into(), "void".into())));
    h.inv.restore("events.4", "test").await.expect("restore");
    // Replays and refusals change nothing, so they add no events.
    h.claim("events", "o-1", 1).await.expect("replay");
    h.inv.redeem("events", &code, "u-1").await.expect("replay");
    let _ = h.inv.redeem("events", "UNKNOWN", "u-1").await;
    assert_eq!(
        h.events("events").await,
        [
            "sku", "add", "claim", "hold", "confirm", "hold", "release", "hold", "expire",
            "redeem", "void", "restore"
        ]
    );
}

async fn redeem_without_sku_finds_the_code_through_the_index(h: Harness) {
    h.stock("indexed", SkuConfig::default(), 2).await;
    let code = codes_of(&h.claim("indexed", "o-1", 1).await.expect("claimed")).remove(0);
    let typed = code.to_lowercase();
    assert_eq!(
        h.inv.locate(&typed).await.expect("lookup").as_deref(),
        Some("indexed")
    );
    assert_eq!(h.inv.locate("NOPE").await.expect("lookup"), None);
    assert_eq!(h.inv.list_skus().await.expect("list"), ["indexed"]);
}

// ---- stock pools ----------------------------------------------------------------------

/// A claim of `quantity` codes for `order` by `channel`, drawing on the shared remainder
/// when `share`.
fn pool_claim(order: &str, channel: &str, share: bool, hold_ms: Option<u64>) -> ClaimRequest {
    ClaimRequest {
        order_id: format!("{channel}/{order}"),
        quantity: 1,
        user_id: None,
        hold_ms,
        pool: PoolDraw {
            channel: channel.into(),
            share,
        },
    }
}

/// `rounds` orders of one code for each of channels `a` and `b` of `sku`, all at once:
/// spawned and handed back, each with its channel.
fn race_a_and_b(
    inv: &Arc<Inventory>,
    sku: &'static str,
    rounds: usize,
    share: bool,
) -> Vec<tokio::task::JoinHandle<(&'static str, Result<Order, Error>)>> {
    let mut tasks = Vec::new();
    for i in 0..rounds {
        for channel in ["a", "b"] {
            let inv = inv.clone();
            tasks.push(tokio::spawn(async move {
                let req = pool_claim(&format!("o-{i}"), channel, share, None);
                (channel, inv.claim(sku, &req).await)
            }));
        }
    }
    tasks
}

/// The codes of a race's answers, and how many orders each channel sold; sold out is the
/// only refusal allowed.
async fn race_results(
    tasks: Vec<tokio::task::JoinHandle<(&'static str, Result<Order, Error>)>>,
) -> (Vec<String>, i64, i64) {
    let (mut codes, mut sold_a, mut sold_b) = (Vec::new(), 0, 0);
    for t in tasks {
        match t.await.expect("task ran") {
            (channel, Ok(order)) => {
                codes.extend(codes_of(&order));
                if channel == "a" {
                    sold_a += 1
                } else {
                    sold_b += 1
                }
            }
            (_, Err(Error::SoldOut)) => {}
            (_, Err(e)) => panic!("unexpected error: {e}"),
        }
    }
    (codes, sold_a, sold_b)
}

fn level(levels: &PoolLevels, channel: &str) -> u64 {
    levels.pools.get(channel).copied().unwrap_or(0)
}

/// The pools never promise more than is available, and their sum is the rest's complement.
fn assert_pools_consistent(levels: &PoolLevels, what: &str) {
    let reserved: u64 = levels.pools.values().sum();
    assert!(reserved <= levels.available, "{what}: {levels:?}");
    assert_eq!(
        levels.shared,
        levels.available - reserved,
        "{what}: {levels:?}"
    );
}

/// Two channels race for one SKU with pools of 300 and 200 and a shared remainder of 100:
/// each sells exactly its pool plus what it took from the shared remainder, no code twice.
async fn two_channels_race_for_their_pools_and_the_shared_remainder(h: Harness) {
    h.stock("race", SkuConfig::default(), 600).await;
    h.inv
        .set_pool("race", "a", 300, "test", "launch")
        .await
        .expect("pool a");
    h.inv
        .set_pool("race", "b", 200, "test", "launch")
        .await
        .expect("pool b");
    let levels = h.inv.pools("race").await.expect("levels");
    assert_eq!(
        (level(&levels, "a"), level(&levels, "b"), levels.shared),
        (300, 200, 100)
    );
    let inv = Arc::new(h.inv.clone());
    let (codes, sold_a, sold_b) = race_results(race_a_and_b(&inv, "race", 700, true)).await;
    let distinct: HashSet<_> = codes.iter().collect();
    assert_eq!(
        (codes.len(), distinct.len()),
        (600, 600),
        "the stock, no code twice"
    );
    assert!(
        sold_a >= 300 && sold_b >= 200,
        "each got its pool: {sold_a} {sold_b}"
    );
    assert_eq!(
        (sold_a - 300) + (sold_b - 200),
        100,
        "and together the shared 100"
    );
    let levels = h.inv.pools("race").await.expect("levels");
    assert_eq!((levels.available, levels.shared), (0, 0));
    assert!(levels.pools.is_empty(), "{levels:?}");
}

/// A channel limited to its own pool sells out at its pool while the shared remainder and
/// other pools stay for the others; its sold out does not make the SKU sold out for all.
async fn a_channel_limited_to_its_pool_never_touches_what_is_not_its_own(h: Harness) {
    h.stock("own", SkuConfig::default(), 20).await;
    h.inv
        .set_pool("own", "a", 5, "test", "t")
        .await
        .expect("pool a");
    h.inv
        .set_pool("own", "b", 5, "test", "t")
        .await
        .expect("pool b");
    for i in 0..5 {
        h.inv
            .claim("own", &pool_claim(&format!("o-{i}"), "a", false, None))
            .await
            .expect("from a's pool");
    }
    let (refused, exhausted) = h
        .inv
        .claim_checked("own", &pool_claim("o-5", "a", false, None))
        .await;
    assert!(matches!(refused, Err(Error::SoldOut)), "{refused:?}");
    assert!(
        !exhausted,
        "15 codes are left for others: not sold out for everyone"
    );
    let levels = h.inv.pools("own").await.expect("levels");
    assert_eq!(
        (level(&levels, "a"), level(&levels, "b"), levels.shared),
        (0, 5, 10)
    );
    for i in 0..15 {
        h.inv
            .claim("own", &pool_claim(&format!("o-{i}"), "b", true, None))
            .await
            .expect("b's pool, then the shared remainder");
    }
    let (refused, exhausted) = h
        .inv
        .claim_checked("own", &pool_claim("o-99", "b", true, None))
        .await;
    assert!(matches!(refused, Err(Error::SoldOut)));
    assert!(exhausted, "now nothing is left for anyone");
}

/// Whether a SKU has pools is asked anew by every call: claims of a SKU without pools, or of
/// this SKU before its pools were set, never make a later claim overlook them (in Redis the
/// scripts are one library, whose state outlives a call).
async fn claims_see_pools_set_after_claims_without_any(h: Harness) {
    h.stock("plain", SkuConfig::default(), 5).await;
    h.stock("later", SkuConfig::default(), 4).await;
    for sku in ["plain", "later"] {
        h.inv
            .claim(sku, &pool_claim("o-1", "b", true, None))
            .await
            .expect("no pools: every code is shared");
    }
    h.inv
        .set_pool("later", "a", 3, "test", "t")
        .await
        .expect("pool a");
    h.inv
        .claim("plain", &pool_claim("o-2", "b", true, None))
        .await
        .expect("still no pools here");
    // The three codes `later` has left are all in a's pool.
    let (refused, exhausted) = h
        .inv
        .claim_checked("later", &pool_claim("o-2", "b", true, None))
        .await;
    assert!(matches!(refused, Err(Error::SoldOut)), "{refused:?}");
    assert!(!exhausted, "a's pool holds the rest");
    let levels = h.inv.pools("later").await.expect("levels");
    assert_eq!((level(&levels, "a"), levels.shared), (3, 0));
}

/// Codes of a hold go back to the pool they came from, whether it is released or lapses; a
/// pool change asks for no more than its source holds.
async fn holds_give_their_codes_back_to_their_pool(h: Harness) {
    h.stock("back", SkuConfig::default(), 10).await;
    h.inv
        .set_pool("back", "a", 3, "test", "t")
        .await
        .expect("pool a");
    let first = pool_claim("h-1", "a", true, Some(1_000));
    let second = pool_claim("h-2", "a", true, Some(5_000));
    h.inv.claim("back", &first).await.expect("held");
    h.inv.claim("back", &second).await.expect("held");
    assert_eq!(level(&h.inv.pools("back").await.expect("levels"), "a"), 1);
    h.inv.release("back", "a/h-2").await.expect("released");
    assert_eq!(level(&h.inv.pools("back").await.expect("levels"), "a"), 2);
    h.clock.advance(1_000);
    h.inv.expire_due("back", 100).await.expect("swept");
    let levels = h.inv.pools("back").await.expect("levels");
    assert_eq!((level(&levels, "a"), levels.shared), (3, 7), "{levels:?}");
    let short = h.inv.set_pool("back", "b", 8, "test", "t").await;
    assert!(
        matches!(short, Err(Error::PoolConflict { level: 7, .. })),
        "{short:?}"
    );
    let moved = h
        .inv
        .move_pool("back", Some("a"), Some("b"), 2, "test", "t", Some(3))
        .await
        .expect("moved");
    assert_eq!((moved.from_level, moved.to_level, moved.moved), (1, 2, 2));
    // A set that finds its level answers on the SKU's last change of a pool, which a
    // durable answer waits for (a retry of a set whose answer timed out).
    let same = h
        .inv
        .set_pool("back", "b", 2, "test", "t")
        .await
        .expect("nothing to change");
    assert_eq!(same.moved, 0);
    assert_eq!(same.event_id, moved.event_id, "{same:?}");
    let entry = same.emitted.as_ref().expect("the stream's entry");
    assert_eq!(Some(&entry.answer_id), moved.event_id.as_ref());
    let again = h
        .inv
        .move_pool("back", Some("a"), Some("b"), 2, "test", "t", Some(3))
        .await;
    assert!(
        matches!(again, Err(Error::PoolConflict { level: 1, .. })),
        "a retry moves nothing twice"
    );
    assert_pools_consistent(&h.inv.pools("back").await.expect("levels"), "after moves");
}

/// Voiding codes the pools reserve shrinks the largest pool, so the pools never promise
/// more than is available.
async fn voids_of_reserved_codes_shrink_the_largest_pool(h: Harness) {
    h.stock("shrink", SkuConfig::default(), 10).await;
    h.inv
        .set_pool("shrink", "a", 6, "test", "t")
        .await
        .expect("pool a");
    h.inv
        .set_pool("shrink", "b", 4, "test", "t")
        .await
        .expect("pool b");
    h.inv.void("shrink.3", "leaked").await.expect("void");
    let levels = h.inv.pools("shrink").await.expect("levels");
    assert_eq!(
        (level(&levels, "a"), level(&levels, "b"), levels.available),
        (5, 4, 9)
    );
    assert_pools_consistent(&levels, "after a void");
    h.inv
        .restore("shrink.3", "false alarm")
        .await
        .expect("restore");
    let levels = h.inv.pools("shrink").await.expect("levels");
    assert_eq!(levels.shared, 1, "a restored code is shared: {levels:?}");
}

/// Codes move between pools while both channels claim: never oversold, never lost, and a
/// channel limited to its pool sells no more than its pool ever received.
async fn moving_codes_between_pools_during_claims_never_oversells(h: Harness) {
    h.stock("moves", SkuConfig::default(), 400).await;
    h.inv
        .set_pool("moves", "a", 100, "test", "t")
        .await
        .expect("pool a");
    h.inv
        .set_pool("moves", "b", 100, "test", "t")
        .await
        .expect("pool b");
    let inv = Arc::new(h.inv.clone());
    let tasks = race_a_and_b(&inv, "moves", 300, false);
    let mover = {
        let inv = inv.clone();
        tokio::spawn(async move {
            // Net codes each pool received from moves.
            let (mut into_a, mut into_b) = (0i64, 0i64);
            for i in 0..60 {
                let (from, to) = match i % 3 {
                    0 => (Some("a"), Some("b")),
                    1 => (Some("b"), Some("a")),
                    _ => (None, Some(if i % 2 == 0 { "a" } else { "b" })),
                };
                match inv
                    .move_pool("moves", from, to, 5, "test", "rebalance", None)
                    .await
                {
                    Ok(change) => {
                        assert_eq!(change.moved, 5);
                        let delta = |pool: Option<&str>, name| match pool {
                            Some(p) if p == name => 1,
                            _ => 0,
                        };
                        into_a += 5 * (delta(to, "a") - delta(from, "a"));
                        into_b += 5 * (delta(to, "b") - delta(from, "b"));
                    }
                    Err(Error::PoolConflict { .. }) => {}
                    Err(e) => panic!("unexpected error: {e}"),
                }
                tokio::task::yield_now().await;
            }
            (into_a, into_b)
        })
    };
    let (codes, sold_a, sold_b) = race_results(tasks).await;
    let (into_a, into_b) = mover.await.expect("mover ran");
    let distinct: HashSet<_> = codes.iter().collect();
    assert_eq!(distinct.len(), codes.len(), "no code twice");
    let levels = h.inv.pools("moves").await.expect("levels");
    assert_pools_consistent(&levels, "after the race");
    let c = h.counts("moves").await;
    assert_eq!(c.claimed as usize, codes.len());
    assert_eq!(c.available + c.claimed, 400, "no code lost");
    // Each pool's count is exact: what it received, less what its channel sold.
    assert_eq!(
        level(&levels, "a") as i64,
        100 + into_a - sold_a,
        "{levels:?}"
    );
    assert_eq!(
        level(&levels, "b") as i64,
        100 + into_b - sold_b,
        "{levels:?}"
    );
}

macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                super::$scenario(super::Harness::embedded().await).await
            })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                super::$scenario(super::Harness::redis().await).await
            })*
        }
    };
}

conformance!(
    concurrent_claims_issue_exactly_the_stock_and_no_code_twice,
    retried_claim_returns_the_same_codes_even_after_sell_out,
    doubly_sent_orders_get_identical_answers,
    reused_order_id_with_other_parameters_is_a_conflict,
    holds_expire_and_their_codes_return,
    sweep_returns_lapsed_holds_without_other_traffic,
    confirm_makes_a_hold_final_and_reveals_codes,
    late_confirm_takes_fresh_codes_or_is_sold_out,
    late_confirm_carries_the_lapse_it_stands_on,
    claim_events_kept_are_the_streams_entries,
    redemption_events_kept_are_the_streams_entries,
    a_claim_call_failing_midway_keeps_what_it_did,
    late_confirm_can_be_disallowed,
    release_returns_codes_and_final_claims_cannot_be_released,
    per_user_limit_counts_held_and_claimed_codes,
    redeem_only_sold_codes_once_per_code,
    unsold_unknown_held_and_void_codes_are_indistinguishable,
    multi_use_codes_redeem_up_to_max_uses,
    reusable_codes_issue_up_to_max_issues,
    expired_cards_cannot_be_redeemed,
    adding_codes_again_changes_nothing,
    void_takes_codes_out_and_restore_puts_them_back,
    keys_leave_and_rejoin_the_line_each_listed_once,
    keys_recorded_before_the_listed_flag_are_in_line_when_issuable,
    every_state_change_is_an_event,
    redeem_without_sku_finds_the_code_through_the_index,
    expired_codes_are_never_issued_and_are_retired,
    a_claim_for_more_than_remains_says_codes_are_left,
    a_sku_being_rebuilt_answers_unavailable_never_sold_out_or_unknown,
    a_drained_sku_answers_unavailable_until_dropped,
    a_rebuild_that_reads_the_ledger_is_drained_by_answers_written_late,
    a_load_for_a_serving_sku_never_goes_into_one_being_rebuilt,
    an_incomplete_index_answers_unavailable_never_unknown,
    answers_name_the_generation_of_the_sku,
    a_rebuild_overtaken_by_a_newer_loss_never_declares_the_sku_ready,
    a_late_order_rebuild_never_overwrites_a_live_order,
    a_rebuilt_skus_events_take_ids_above_the_ledgers,
    a_batch_claims_each_order_as_if_it_came_alone,
    coalesced_claims_each_get_the_answer_they_would_get_alone,
    coalesced_redemptions_each_get_the_answer_they_would_get_alone,
    warming_loads_each_key_once_in_the_state_the_ledger_records,
    two_channels_race_for_their_pools_and_the_shared_remainder,
    a_channel_limited_to_its_pool_never_touches_what_is_not_its_own,
    claims_see_pools_set_after_claims_without_any,
    holds_give_their_codes_back_to_their_pool,
    voids_of_reserved_codes_shrink_the_largest_pool,
    moving_codes_between_pools_during_claims_never_oversells,
);

/// Hundreds of claims of one SKU at once, which the inventory gathers into few script
/// calls: new orders, the same order sent twice at once, an order reused with other
/// parameters, holds and per-user limits. Each answer is what the order would have got alone:
/// the order as the engine then knows it, no code twice, exactly the stock issued.
async fn coalesced_claims_each_get_the_answer_they_would_get_alone(h: Harness) {
    let config = SkuConfig {
        per_user_limit: 3,
        ..SkuConfig::default()
    };
    h.stock("rush", config, 150).await;
    let requests: Vec<ClaimRequest> = (0..400u64)
        .map(|i| {
            // Orders 0..50 are each sent twice; order 7 is also sent with another quantity.
            let order = if i < 100 { i % 50 } else { i };
            ClaimRequest {
                order_id: format!("o-{order}"),
                quantity: if i == 399 { 2 } else { 1 },
                user_id: Some(format!("u-{}", order % 90)),
                hold_ms: (order % 5 == 0).then_some(60_000),
                pool: Default::default(),
            }
        })
        .chain(std::iter::once(ClaimRequest {
            order_id: "o-7".into(),
            quantity: 3,
            user_id: Some("u-7".into()),
            hold_ms: None,
            pool: Default::default(),
        }))
        .collect();
    let calls_before = h.script_calls().await;
    let tasks: Vec<_> = requests
        .iter()
        .cloned()
        .map(|req| {
            let inv = h.inv.clone();
            tokio::spawn(async move { (inv.claim("rush", &req).await, req) })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("claim task ran"));
    }
    if let (Some(before), Some(after)) = (calls_before, h.script_calls().await) {
        assert!(
            after - before < requests.len() as u64 / 2,
            "{} claims took {} script calls: they were not gathered",
            requests.len(),
            after - before
        );
    }

    // Per order: every successful answer carries the same codes, exactly one did the work,
    // and a refusal is a conflict with those parameters, or the order was never made.
    type Sent = (Result<Order, Error>, ClaimRequest);
    let mut by_order: std::collections::BTreeMap<&str, Vec<&Sent>> = Default::default();
    for answer in &answers {
        by_order
            .entry(answer.1.order_id.as_str())
            .or_default()
            .push(answer);
    }
    let mut issued = HashSet::new();
    let mut per_user: std::collections::HashMap<String, u64> = Default::default();
    for (order_id, sent) in &by_order {
        let made: Vec<(&Order, &ClaimRequest)> = sent
            .iter()
            .filter_map(|(answer, req)| Some((answer.as_ref().ok()?, req)))
            .collect();
        let Some(&(first, first_req)) = made.first() else {
            for (answer, req) in sent {
                match answer {
                    Err(Error::SoldOut | Error::UserLimit { .. }) => {}
                    other => panic!("unexpected answer to {req:?}: {other:?}"),
                }
            }
            assert!(
                h.inv.order("rush", order_id).await.is_err(),
                "a refused order was never made"
            );
            continue;
        };
        assert_eq!(
            made.iter().filter(|(o, _)| !o.replayed).count(),
            1,
            "exactly one claim of {order_id} did the work"
        );
        for (order, req) in &made {
            assert_eq!(order.keys, first.keys, "the same order, the same codes");
            assert_eq!(req.quantity, first_req.quantity);
            let state = if req.hold_ms.is_some() {
                "held"
            } else {
                "claimed"
            };
            assert_eq!(order.state, state, "{req:?}");
            assert_eq!(order.keys.len() as u64, req.quantity, "{req:?}");
        }
        for (answer, req) in sent {
            if let Err(e) = answer {
                // Other parameters: a conflict once the order exists; judged as a new order
                // (sold out, or over the user's limit) if it came first.
                assert!(
                    req.quantity != first_req.quantity
                        && matches!(
                            e,
                            Error::OrderConflict(_) | Error::SoldOut | Error::UserLimit { .. }
                        ),
                    "{req:?} refused with {e} although {order_id} was made with its parameters"
                );
            }
        }
        let now = h.inv.order("rush", order_id).await.expect("order known");
        assert_eq!(
            now.keys, first.keys,
            "the answer is the order the engine has"
        );
        for key in &first.keys {
            assert!(
                issued.insert(key.key_id.clone()),
                "{} issued twice",
                key.key_id
            );
        }
        *per_user
            .entry(first_req.user_id.clone().unwrap_or_default())
            .or_default() += first_req.quantity;
    }
    assert!(
        per_user.values().all(|&n| n <= 3),
        "per-user limit held: {per_user:?}"
    );
    let c = h.counts("rush").await;
    assert_eq!(c.held + c.claimed, issued.len() as u64);
    assert_eq!(c.available + c.held + c.claimed, 150);
}

/// One script call for several orders: each gets the answer it would have got alone, in
/// order — new, replayed, conflicting, held, sold out — and no code goes to two orders.
async fn a_batch_claims_each_order_as_if_it_came_alone(h: Harness) {
    h.stock("batch", SkuConfig::default(), 5).await;
    let first = h.claim("batch", "o-1", 1).await.expect("claimed alone");
    let req = |order: &str, quantity: u64, hold_ms: Option<u64>| ClaimRequest {
        order_id: order.into(),
        quantity,
        user_id: None,
        hold_ms,
        pool: Default::default(),
    };
    let batch = [
        req("o-1", 1, None),       // a retry: the same codes
        req("o-1", 2, None),       // other parameters: a conflict
        req("o-2", 2, None),       // new
        req("o-2", 2, None),       // the same order twice in one batch: a replay
        req("o-3", 1, Some(1000)), // a hold
        req("o-4", 5, None),       // more than remains: sold out, codes left
        req("o-5", 1, None),       // the last code
        req("o-6", 1, None),       // nothing left at all
    ];
    let answers = h.inv.claim_batch("batch", &batch).await.expect("one call");
    assert_eq!(answers.len(), batch.len());
    let ok = |i: usize| answers[i].0.as_ref().expect("answered").clone();
    assert_eq!(ok(0).keys, first.keys);
    assert!(ok(0).replayed);
    assert!(matches!(answers[1].0, Err(Error::OrderConflict(_))));
    assert_eq!(ok(2).keys.len(), 2);
    assert!(!ok(2).replayed);
    assert_eq!(ok(3).keys, ok(2).keys);
    assert!(ok(3).replayed);
    assert_eq!(ok(4).state, "held");
    assert!(matches!(answers[5], (Err(Error::SoldOut), false)));
    assert_eq!(ok(6).keys.len(), 1);
    assert!(matches!(answers[7], (Err(Error::SoldOut), true)));
    let mut ids: Vec<String> = [0, 2, 4, 6]
        .iter()
        .flat_map(|&i| ok(i).keys.into_iter().map(|k| k.key_id))
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "no code to two orders");
    assert_eq!(n, 5, "the whole stock, once");
    // Each new change names its own event.
    let events: Vec<_> = [2, 4, 6].iter().map(|&i| ok(i).event_id).collect();
    assert!(events.iter().all(Option::is_some));
    assert_ne!(events[0], events[1]);
    assert!(ok(0).emitted.is_none(), "a replay made no change");
    // Each code revealed is its own key's.
    for i in [2, 6] {
        for key in ok(i).keys {
            let code = key.code.expect("revealed");
            let redeemed = h.inv.redeem("batch", &code, "checker").await;
            assert_eq!(redeemed.expect("redeems").key_id, key.key_id);
        }
    }
}

/// Hundreds of redemptions of one SKU at once, which the inventory gathers into few script
/// calls: each code of several uses asked by more redeemers than it has uses, one redeemer
/// twice, one through an older format version, one while redemptions are paused; unsold and
/// unknown codes; decoy calls for codes the index does not know. Each answer is one it could
/// have got alone: a code's uses go to that many redeemers, once each, a retry gets its
/// first answer, a paused redemption changes nothing, and each new redemption's event is
/// the stream's entry.
async fn coalesced_redemptions_each_get_the_answer_they_would_get_alone(h: Harness) {
    const USES: usize = 3;
    let config = SkuConfig {
        max_uses: USES as u64,
        ..SkuConfig::default()
    };
    let codes = h.stock("rush-r", config, 40).await;
    let sold = codes_of(&h.claim("rush-r", "o-1", 30).await.expect("claimed"));
    let unsold: Vec<String> = codes.into_iter().filter(|c| !sold.contains(c)).collect();
    let paused = Error::Paused {
        action: "redemptions",
        gateway_wide: false,
        retry_after_ms: 1_000,
    };
    // (code, redeemer, paused, candidates)
    type Ask = (String, String, bool, Vec<Candidate>);
    let version = |v: u32, canonical: &str| Candidate {
        version: v,
        canonical: canonical.to_owned(),
    };
    let mut asks: Vec<Ask> = Vec::new();
    for (i, code) in sold.iter().enumerate() {
        for j in 0..6 {
            let redeemer = format!("r-{i}-{j}");
            // Redeemer 0 asks while redemptions are paused, first, while the code has uses
            // left; redeemer 1 asks twice; redeemer 2 sends the code as read under two
            // format versions, the one sold (version 7) second.
            let candidates = if j == 2 {
                vec![version(8, &format!("{code}X")), version(7, code)]
            } else {
                vec![version(0, code)]
            };
            asks.push((code.clone(), redeemer.clone(), j == 0, candidates.clone()));
            if j == 1 {
                asks.push((code.clone(), redeemer, false, candidates));
            }
        }
    }
    for code in unsold
        .iter()
        .cloned()
        .chain((0..20).map(|i| format!("NOSUCH{i:04}")))
    {
        asks.push((code.clone(), "r-x".into(), false, vec![version(0, &code)]));
    }
    let calls_before = h.script_calls().await;
    let tasks: Vec<_> = asks
        .iter()
        .cloned()
        .map(|(code, redeemer, pause, candidates)| {
            let inv = h.inv.clone();
            let paused = pause.then(|| paused.clone());
            tokio::spawn(async move {
                let answer = inv
                    .redeem_any("rush-r", &candidates, &redeemer, paused.as_ref())
                    .await;
                ((code, redeemer, pause, candidates), answer)
            })
        })
        .collect();
    let decoys: Vec<_> = (0..40)
        .map(|i| {
            let inv = h.inv.clone();
            tokio::spawn(async move { inv.redeem_unknown(&format!("UNKNOWN{i:04}"), "r-y").await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("redemption task ran"));
    }
    for decoy in decoys {
        decoy
            .await
            .expect("decoy task ran")
            .expect("a decoy call answers");
    }
    if let (Some(before), Some(after)) = (calls_before, h.script_calls().await) {
        assert!(
            after - before < asks.len() as u64 / 2,
            "{} redemptions took {} script calls: they were not gathered",
            asks.len(),
            after - before
        );
    }

    let mut events = HashSet::new();
    for code in &sold {
        let of_code: Vec<_> = answers.iter().filter(|(ask, _)| &ask.0 == code).collect();
        let new: Vec<_> = of_code
            .iter()
            .filter_map(|(ask, answer)| Some((ask, answer.as_ref().ok().filter(|r| !r.replayed)?)))
            .collect();
        assert_eq!(new.len(), USES, "{code}: every use made once");
        let winners: HashSet<&str> = new.iter().map(|(ask, _)| ask.1.as_str()).collect();
        assert_eq!(winners.len(), USES, "{code}: each use for another redeemer");
        for (ask, answer) in &of_code {
            let (_, redeemer, pause, _) = ask;
            match answer {
                Ok(r) => {
                    assert!(winners.contains(redeemer.as_str()), "{ask:?}: {r:?}");
                    let first = new.iter().find(|(a, _)| &a.1 == redeemer).expect("won").1;
                    assert_eq!(r.key_id, first.key_id);
                    assert_eq!(
                        r.redeemed_at_ms, first.redeemed_at_ms,
                        "a retry, its first answer"
                    );
                    let expected = if redeemer.ends_with("-2") { 7 } else { 0 };
                    assert_eq!(r.format_version, Some(expected), "{ask:?}");
                }
                Err(Error::CardUsed { .. }) => {
                    assert!(
                        !winners.contains(redeemer.as_str()),
                        "{ask:?}: a winner told used"
                    );
                }
                Err(Error::Paused { .. }) => assert!(*pause, "{ask:?}: paused though not asked so"),
                Err(e) => panic!("{ask:?}: unexpected {e:?}"),
            }
            assert!(
                !(*pause && answer.is_ok()),
                "{ask:?}: redeemed while paused"
            );
        }
        for (_, r) in &new {
            let emitted = r.emitted.clone().expect("a new redemption's event");
            assert!(
                events.insert(emitted.answer_id.clone()),
                "one event per use"
            );
            assert_eq!(
                h.inv
                    .answer_entry("rush-r", &emitted.answer_id)
                    .await
                    .expect("read"),
                AnswerEntry::Kept(emitted),
                "{code}"
            );
        }
    }
    // Asked first for its code, a paused redemption mostly finds uses left: the pause, not
    // the code, is what refused it.
    let paused_answers = answers
        .iter()
        .filter(|(_, a)| matches!(a, Err(Error::Paused { .. })))
        .count();
    assert!(
        paused_answers > 0,
        "no redemption was refused for the pause"
    );
    for (ask, answer) in &answers {
        if !sold.contains(&ask.0) {
            assert!(
                matches!(answer, Err(Error::CardInvalid)),
                "{ask:?}: {answer:?}"
            );
        }
    }
    let c = h.counts("rush-r").await;
    assert_eq!((c.redeemed, c.claimed, c.available), (30, 0, 10));
}

/// A second gateway finishing a rebuild after the first one already let the SKU serve
/// replays ledger events on a live engine: orders changed live since stay as they are.
async fn a_late_order_rebuild_never_overwrites_a_live_order(h: Harness) {
    h.stock("late", SkuConfig::default(), 3).await;
    let live = h.claim("late", "o-1", 1).await.expect("claimed live");
    let gen = h
        .inv
        .sku_state("late")
        .await
        .expect("state")
        .expect("sku")
        .gen;
    // kind, order, user, ids, event id, at, expires_at, hold ms, quantity, late, seq, pool,
    // pooled
    let event = |kind: &str, order: &str, ids: &str, seq: &str| {
        [
            kind, order, "", ids, "", "1", "0", "0", "1", "0", seq, "", "0",
        ]
        .map(str::to_owned)
    };
    // The generation, and '' for a rebuild (not a restore of retired orders).
    let mut args = vec![gen, String::new()];
    args.extend(event("expire", "o-1", "1", "7"));
    args.extend(event("claim", "o-9", "2", "8"));
    h.inv
        .engine()
        .eval(&kamigate::engine::SCRIPTS.orders, sku_keys("late"), args)
        .await
        .expect("orders.lua runs");
    let after = h.inv.order("late", "o-1").await.expect("order");
    assert_eq!(after.state, "claimed", "the live order is kept");
    assert_eq!(after.keys, live.keys);
    let missing = h.inv.order("late", "o-9").await.expect("order");
    assert_eq!(
        missing.state, "claimed",
        "an order the engine lacked is rebuilt"
    );
}

async fn a_rebuild_overtaken_by_a_newer_loss_never_declares_the_sku_ready(h: Harness) {
    let inv = &h.inv;
    let config = SkuConfig::default();
    let first = inv
        .create_loading("again", &config, None)
        .await
        .expect("created")
        .expect("new");
    assert_eq!(
        inv.create_loading("again", &config, None)
            .await
            .expect("answered"),
        None,
        "a second creation changes nothing"
    );
    // Lost again in the middle of the first rebuild, and recreated by another one.
    static WIPE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
        Script::new(
            "probe_wipe",
            "for _, k in ipairs(KEYS) do redis.call('DEL', k) end\nreturn 1",
        )
    });
    inv.engine()
        .eval(&WIPE, sku_keys("again"), vec![])
        .await
        .expect("wiped");
    let second = inv
        .create_loading("again", &config, None)
        .await
        .expect("created")
        .expect("new");
    assert_ne!(first, second);
    assert!(matches!(
        inv.mark_ready("again", &first, "e").await,
        Err(Error::Unavailable(_))
    ));
    assert!(
        inv.sku_state("again")
            .await
            .expect("state")
            .expect("sku")
            .loading
    );
    inv.mark_ready("again", &second, "e")
        .await
        .expect("the newer rebuild ends it");
    assert!(
        !inv.sku_state("again")
            .await
            .expect("state")
            .expect("sku")
            .loading
    );
}

/// A rebuilt SKU's stream starts empty, its ids from the engine's clock; a clock behind the
/// one that made the ledger's events would repeat their ids. Here the ledger's ids lie in a
/// future no clock has reached.
async fn a_rebuilt_skus_events_take_ids_above_the_ledgers(h: Harness) {
    h.index_complete().await;
    let inv = &h.inv;
    let floor = StreamId {
        ms: 4_000_000_000_000,
        seq: 7,
    };
    let gen = inv
        .create_loading("floor", &SkuConfig::default(), Some(floor))
        .await
        .expect("created")
        .expect("new");
    assert_eq!(
        h.stream_ids("floor").await,
        [floor],
        "the creation's own event takes the floor"
    );
    assert_eq!(h.events("floor").await, ["sku"]);
    inv.start_reading("floor", &gen).await.expect("reading");
    inv.raise_floor("floor", &gen, StreamId { ms: 1, seq: 0 })
        .await
        .expect("a floor the ids passed");
    assert_eq!(h.stream_ids("floor").await, [floor], "nothing appended");
    let raised = StreamId {
        ms: floor.ms,
        seq: u64::MAX,
    };
    inv.raise_floor("floor", &gen, raised)
        .await
        .expect("raised");
    assert_eq!(h.stream_ids("floor").await, [floor, raised]);
    assert!(matches!(
        inv.raise_floor("floor", "another", raised).await,
        Err(Error::Unavailable(_))
    ));
    h.add("floor", &["CODE-1".into()], None).await;
    inv.mark_ready("floor", &gen, "e").await.expect("ready");
    h.claim("floor", "o-1", 1).await.expect("claimed");
    let ids = h.stream_ids("floor").await;
    assert!(ids.len() >= 4, "{ids:?}");
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]) && ids[2] > raised,
        "every later event goes above the floor: {ids:?}"
    );
    // A serving SKU's too (an engine replaced behind the gateway's back).
    let later = StreamId {
        ms: 4_000_000_000_100,
        seq: 0,
    };
    inv.raise_floor("floor", &gen, later).await.expect("raised");
    h.claim("floor", "o-1", 1).await.expect("a replay");
    assert!(matches!(
        h.claim("floor", "o-2", 1).await,
        Err(Error::SoldOut)
    ));
    let after = h.stream_ids("floor").await;
    assert_eq!(after[..ids.len()], ids[..]);
    assert_eq!(after[ids.len()], later);
    assert!(after.windows(2).all(|w| w[0] < w[1]), "{after:?}");
}

async fn expired_codes_are_never_issued_and_are_retired(h: Harness) {
    h.index_complete().await;
    h.inv
        .put_sku("exp", &SkuConfig::default())
        .await
        .expect("SKU created");
    let now = h.clock.now();
    h.add("exp", &["OLD-1".into(), "OLD-2".into()], Some(now + 1_000))
        .await;
    h.add("exp", &["FRESH-1".into()], None).await;
    h.clock.advance(1_000);
    let order = h
        .claim("exp", "o-1", 1)
        .await
        .expect("the fresh code is sold");
    assert_eq!(codes_of(&order), ["FRESH1"]);
    let c = h.counts("exp").await;
    assert_eq!(
        (c.available, c.claimed, c.void),
        (0, 1, 2),
        "the expired codes were retired as void, not left for sale"
    );
    assert!(matches!(
        h.claim("exp", "o-2", 1).await,
        Err(Error::SoldOut)
    ));
    let events = h.events("exp").await;
    assert!(events.contains(&"void".to_owned()), "{events:?}");
}

async fn a_claim_for_more_than_remains_says_codes_are_left(h: Harness) {
    h.stock("partial", SkuConfig::default(), 5).await;
    let big = ClaimRequest {
        order_id: "big".into(),
        quantity: 10,
        user_id: None,
        hold_ms: None,
        pool: Default::default(),
    };
    let (result, exhausted) = h.inv.claim_checked("partial", &big).await;
    assert!(matches!(result, Err(Error::SoldOut)));
    assert!(!exhausted, "5 codes are left: not sold out for everyone");
    assert_eq!(h.counts("partial").await.available, 5, "nothing taken");
    h.claim("partial", "small", 5)
        .await
        .expect("the 5 are sold");
    let again = ClaimRequest {
        order_id: "last".into(),
        ..big
    };
    let (result, exhausted) = h.inv.claim_checked("partial", &again).await;
    assert!(matches!(result, Err(Error::SoldOut)));
    assert!(exhausted, "nothing left at all");
}

async fn a_sku_being_rebuilt_answers_unavailable_never_sold_out_or_unknown(h: Harness) {
    h.index_complete().await;
    let inv = &h.inv;
    let gen = inv
        .create_loading("rebuild", &SkuConfig::default(), None)
        .await
        .expect("created loading")
        .expect("new");
    h.add("rebuild", &["CODE-1".into()], None).await;
    let unavailable = |r: &Result<Order, Error>| matches!(r, Err(Error::Unavailable(_)));
    assert!(unavailable(&h.claim("rebuild", "o-1", 1).await));
    assert!(unavailable(&inv.confirm("rebuild", "o-1", true).await));
    assert!(unavailable(&inv.release("rebuild", "o-1").await));
    assert!(unavailable(&inv.order("rebuild", "o-1").await));
    assert!(matches!(
        inv.redeem("rebuild", "CODE1", "u-1").await,
        Err(Error::Unavailable(_))
    ));
    assert!(matches!(
        inv.counts("rebuild").await,
        Err(Error::Unavailable(_))
    ));
    // The edge's question "a retry, or a new order?" has no answer yet.
    assert!(matches!(
        inv.knows_order("rebuild", "o-1").await,
        Err(Error::Unavailable(_))
    ));
    assert_eq!(
        inv.expire_due("rebuild", 10).await.expect("sweep"),
        (0, false)
    );
    assert!(
        inv.sku_state("rebuild")
            .await
            .expect("state")
            .expect("exists")
            .loading
    );
    assert!(inv.mark_ready("rebuild", &gen, "e1").await.expect("ready"));
    assert!(
        !inv.mark_ready("rebuild", &gen, "e2")
            .await
            .expect("answered"),
        "ended once"
    );
    assert_eq!(
        inv.epoch("rebuild").await.expect("epoch").as_deref(),
        Some("e1")
    );
    h.claim("rebuild", "o-1", 1)
        .await
        .expect("claimable once ready");
    assert!(inv.knows_order("rebuild", "o-1").await.expect("read"));
    assert!(!inv.knows_order("rebuild", "o-2").await.expect("read"));
    // A SKU the engine lost while a request was on its way: unavailable, not unknown.
    assert!(unavailable(&h.claim("never-created", "o-1", 1).await));
    assert!(matches!(
        inv.knows_order("never-created", "o-1").await,
        Err(Error::Unavailable(_))
    ));
}

/// A generation drained for a rebuild (its answers of a lost generation reached the ledger
/// late) serves nobody and changes nothing until it is dropped; only that generation, and
/// only while draining, can be dropped; a dropped SKU is gone as after a loss.
async fn a_drained_sku_answers_unavailable_until_dropped(h: Harness) {
    h.index_complete().await;
    let inv = &h.inv;
    let codes = h.stock("drain", SkuConfig::default(), 3).await;
    h.claim("drain", "o-1", 1).await.expect("claimed");
    let gen = inv
        .sku_state("drain")
        .await
        .expect("state")
        .expect("exists")
        .gen;
    assert!(
        !inv.drop_drained("drain", &gen).await.expect("answered"),
        "a serving SKU is never dropped"
    );
    assert_eq!(
        inv.drain("drain").await.expect("drained"),
        Some(gen.clone())
    );
    assert_eq!(
        inv.drain("drain").await.expect("again"),
        Some(gen.clone()),
        "idempotent"
    );
    let state = inv
        .sku_state("drain")
        .await
        .expect("state")
        .expect("exists");
    assert!(state.draining && !state.loading, "{state:?}");
    let unavailable = |r: &Result<Order, Error>| matches!(r, Err(Error::Unavailable(_)));
    assert!(unavailable(&h.claim("drain", "o-2", 1).await));
    assert!(unavailable(&h.claim("drain", "o-1", 1).await));
    assert!(unavailable(&inv.order("drain", "o-1").await));
    assert!(unavailable(&inv.release("drain", "o-1").await));
    assert!(matches!(
        inv.redeem("drain", &codes[0], "u-1").await,
        Err(Error::Unavailable(_))
    ));
    assert!(matches!(
        inv.counts("drain").await,
        Err(Error::Unavailable(_))
    ));
    assert!(!inv
        .drop_drained("drain", "another-gen")
        .await
        .expect("answered"));
    assert!(inv.drop_drained("drain", &gen).await.expect("dropped"));
    assert!(inv.sku_state("drain").await.expect("state").is_none());
    assert!(inv.drop_drained("drain", &gen).await.expect("gone already"));
    assert!(unavailable(&h.claim("drain", "o-1", 1).await));
    assert_eq!(inv.drain("drain").await.expect("answered"), None, "gone");
}

/// A rebuild waits for the acknowledgements of the gateways alive, then reads the ledger.
/// Answers written into the ledger before it reads are in what it reads, so they do not
/// drain it; from the moment it reads, a gateway that acknowledges is told it is late
/// (recorded all the same), and answers written then drain it: it never serves, however
/// far it got, and is dropped to be rebuilt once more.
async fn a_rebuild_that_reads_the_ledger_is_drained_by_answers_written_late(h: Harness) {
    h.index_complete().await;
    let inv = &h.inv;
    let gen = inv
        .create_loading("late", &SkuConfig::default(), None)
        .await
        .expect("created loading")
        .expect("new");
    assert_eq!(
        inv.ack_rebuild("late", &gen, "gw-a").await.expect("ack"),
        Ack::Acked
    );
    assert_eq!(inv.drain("late").await.expect("answered"), None, "unread");
    assert!(
        inv.sku_state("late")
            .await
            .expect("state")
            .expect("exists")
            .loading
    );
    assert!(matches!(
        inv.start_reading("late", "another-gen").await,
        Err(Error::Unavailable(_))
    ));
    inv.start_reading("late", &gen).await.expect("reading");
    inv.start_reading("late", &gen).await.expect("idempotent");
    assert_eq!(
        inv.ack_rebuild("late", &gen, "gw-b").await.expect("ack"),
        Ack::Late
    );
    let state = inv.sku_state("late").await.expect("state").expect("exists");
    assert_eq!(state.acks, ["gw-a", "gw-b"], "{state:?}");
    let keys = vec![ledger_key("late", 1, "LATE000001")];
    assert_eq!(inv.warm_keys("late", &keys, &gen).await.expect("loaded"), 1);
    assert_eq!(inv.drain("late").await.expect("drained"), Some(gen.clone()));
    let state = inv.sku_state("late").await.expect("state").expect("exists");
    assert!(state.draining && !state.loading, "{state:?}");
    assert_eq!(
        inv.ack_rebuild("late", &gen, "gw-c").await.expect("ack"),
        Ack::Stale
    );
    assert!(
        !inv.mark_ready("late", &gen, "e1").await.expect("answered"),
        "a drained rebuild never ends"
    );
    assert!(matches!(
        h.claim("late", "o-1", 1).await,
        Err(Error::Unavailable(_))
    ));
    assert!(inv.drop_drained("late", &gen).await.expect("dropped"));
    assert!(inv.sku_state("late").await.expect("state").is_none());

    // A rebuild that ended is drained like any generation serving.
    let gen = inv
        .create_loading("late", &SkuConfig::default(), None)
        .await
        .expect("created loading")
        .expect("new");
    inv.start_reading("late", &gen).await.expect("reading");
    assert!(inv.mark_ready("late", &gen, "e2").await.expect("ready"));
    inv.start_reading("late", &gen).await.expect("done already");
    assert_eq!(
        inv.ack_rebuild("late", &gen, "gw-a").await.expect("ack"),
        Ack::Stale
    );
    assert_eq!(inv.drain("late").await.expect("drained"), Some(gen));
}

/// Keys for whatever generation serves (a new batch, a warm-up) never go into a SKU being
/// rebuilt: keys load once, so one loaded before every gateway wrote what it answered
/// would keep that older state through the rebuild. The rebuild itself, naming its
/// generation, loads them.
async fn a_load_for_a_serving_sku_never_goes_into_one_being_rebuilt(h: Harness) {
    h.index_complete().await;
    let gen = h
        .inv
        .create_loading("warm", &SkuConfig::default(), None)
        .await
        .expect("created loading")
        .expect("new");
    let keys = vec![ledger_key("warm", 1, "WARM000001")];
    assert!(matches!(
        h.inv.warm_keys("warm", &keys, "").await,
        Err(Error::Unavailable(_))
    ));
    let mut sold = keys.clone();
    sold[0].sold = 1;
    assert_eq!(
        h.inv.warm_keys("warm", &sold, &gen).await.expect("loaded"),
        1
    );
    assert!(h.inv.mark_ready("warm", &gen, "e1").await.expect("ready"));
    let counts = h.counts("warm").await;
    assert_eq!((counts.available, counts.claimed), (0, 1), "{counts:?}");
    // Serving again: new keys load without naming the generation.
    let more = vec![ledger_key("warm", 2, "WARM000002")];
    assert_eq!(h.inv.warm_keys("warm", &more, "").await.expect("loaded"), 1);
}

/// The global index answers "retry" until a rebuild of it is marked complete; a rebuild the
/// engine's data loss overtook is not, since what it indexed before the loss went with it.
async fn an_incomplete_index_answers_unavailable_never_unknown(h: Harness) {
    assert!(!h.inv.index_ready().await.expect("readable"));
    assert!(matches!(
        h.inv.locate("SOME-CODE").await,
        Err(Error::Unavailable(_))
    ));
    let first = h.inv.watch_index().await.expect("index read");
    assert!(!first.ready());
    // The engine loses the index (FLUSHALL, a restart without persistence) while the rebuild
    // that watched it is indexing.
    static WIPE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
        Script::new(
            "probe_wipe_index",
            "for _, k in ipairs(KEYS) do redis.call('DEL', k) end\nreturn 1",
        )
    });
    let shards: Vec<String> = kamigate::engine::keys::index_shards().collect();
    h.inv
        .engine()
        .eval(&WIPE, shards, vec![])
        .await
        .expect("wiped");
    assert!(
        !h.inv.mark_index_ready(&first).await.expect("answered"),
        "a rebuild the loss overtook"
    );
    assert!(!h.inv.index_ready().await.expect("readable"));
    assert!(matches!(
        h.inv.locate("SOME-CODE").await,
        Err(Error::Unavailable(_))
    ));
    // Two gateways rebuilding it at once: either may mark it, each mark holds.
    let (second, third) = (
        h.inv.watch_index().await.expect("index read"),
        h.inv.watch_index().await.expect("index read"),
    );
    assert!(h.inv.mark_index_ready(&second).await.expect("marked"));
    assert!(h.inv.mark_index_ready(&third).await.expect("marked"));
    assert!(h.inv.index_ready().await.expect("readable"));
    assert!(h.inv.watch_index().await.expect("index read").ready());
    assert_eq!(h.inv.locate("SOME-CODE").await.expect("lookup"), None);
}

async fn answers_name_the_generation_of_the_sku(h: Harness) {
    h.stock("gen", SkuConfig::default(), 2).await;
    let gen = h
        .inv
        .sku_state("gen")
        .await
        .expect("state")
        .expect("exists")
        .gen;
    assert_eq!(gen.len(), 16, "a fresh random generation");
    let order = h.claim("gen", "o-1", 1).await.expect("claimed");
    let answer = order.event_id.expect("an answer id");
    assert!(answer.starts_with(&format!("{gen}:")), "{answer}");
    let emitted = order.emitted.expect("the claim's event");
    assert_eq!(emitted.answer_id, answer);
    assert!(emitted.fields.contains(&("t".into(), "claim".into())));
    let replay = h.claim("gen", "o-1", 1).await.expect("replayed");
    assert!(replay.emitted.is_none(), "a replay made no change");
    assert_eq!(replay.event_id.as_deref(), Some(answer.as_str()));

    // A replay keeps the event it stands on while the stream has it (src/http, durable).
    assert_eq!(
        h.inv.answer_entry("gen", &answer).await.expect("read"),
        AnswerEntry::Kept(kamigate::inventory::Emitted {
            before: Vec::new(),
            ..emitted
        })
    );
    let (_, stream_id) = answer.rsplit_once(':').expect("generation named");
    assert_eq!(
        h.inv
            .answer_entry("gen", &format!("another:{stream_id}"))
            .await
            .expect("read"),
        AnswerEntry::Lost,
        "an answer of a generation the engine lost"
    );
    assert_eq!(
        h.inv.answer_entry("gen", stream_id).await.expect("read"),
        AnswerEntry::Settled,
        "an answer id from before generations: the ledger has its change"
    );
    // Trimmed once every group settled it: committed.
    static TRIM: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
        Script::new(
            "probe_trim",
            "return redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)",
        )
    });
    h.inv
        .engine()
        .eval(
            &TRIM,
            vec![kamigate::engine::keys::events_key("gen")],
            vec![],
        )
        .await
        .expect("trimmed");
    assert_eq!(
        h.inv.answer_entry("gen", &answer).await.expect("read"),
        AnswerEntry::Settled
    );
}

/// A key as the ledger hands it to warm-up: fresh unless the caller changes it.
fn ledger_key(sku: &str, local_id: i64, code: &str) -> KeyRecord {
    KeyRecord {
        key_id: format!("{sku}.{local_id}"),
        sku: sku.into(),
        local_id,
        digest: kamigate::code::digest(code),
        code: code.into(),
        batch_id: "b1".into(),
        format_version: 1,
        expires_at_ms: None,
        max_issues: 1,
        max_uses: 1,
        held: 0,
        sold: 0,
        uses: 0,
        void: false,
        state: "available".into(),
        order_id: None,
        user_id: None,
        redeemer: None,
        redeemed_at_ms: None,
        updated_at_ms: 0,
    }
}

/// Warm-up (a new batch, or a rebuild) loads many keys per script call, in several
/// multi-value commands: every key lands once, in its ledger state, counted and on sale
/// exactly when it may be sold, in id order; keys the engine has are left alone.
async fn warming_loads_each_key_once_in_the_state_the_ledger_records(h: Harness) {
    h.index_complete().await;
    h.inv
        .put_sku("warm", &SkuConfig::default())
        .await
        .expect("SKU created");
    // More keys than one multi-value command takes, so each write is split.
    const TOTAL: i64 = 4500;
    let mut keys: Vec<KeyRecord> = (1..=TOTAL)
        .map(|id| ledger_key("warm", id, &format!("WARM{id:06}")))
        .collect();
    keys[1].sold = 1; // claimed
    keys[2].sold = 1; // redeemed
    keys[2].uses = 1;
    keys[2].redeemer = Some("user-1".into());
    keys[2].redeemed_at_ms = Some(1_700_000_000_000);
    keys[3].void = true;
    keys[4].held = 1;
    keys[5].max_issues = 2; // reusable, issued once: still for sale
    keys[5].sold = 1;
    assert_eq!(
        h.inv.warm_keys("warm", &keys, "").await.expect("warmed"),
        TOTAL as u64
    );
    let counts = h.counts("warm").await;
    assert_eq!(
        (
            counts.available,
            counts.held,
            counts.claimed,
            counts.redeemed,
            counts.void
        ),
        (TOTAL as u64 - 4, 1, 1, 1, 1)
    );

    // Again, and with a digest repeated within one call: nothing more is loaded.
    assert_eq!(
        h.inv
            .warm_keys("warm", &keys[..100], "")
            .await
            .expect("again"),
        0
    );
    let twins = [
        ledger_key("warm", TOTAL + 1, "TWIN"),
        ledger_key("warm", TOTAL + 2, "TWIN"),
    ];
    assert_eq!(h.inv.warm_keys("warm", &twins, "").await.expect("twins"), 1);
    assert_eq!(total(&h.counts("warm").await), TOTAL as u64 + 1);

    // On sale in id order, skipping what may not be sold.
    let mut sold = Vec::new();
    for n in 0..4 {
        let order = h.claim("warm", &format!("o-{n}"), 1).await.expect("claim");
        sold.push(order.keys[0].key_id.clone());
    }
    assert_eq!(sold, ["warm.1", "warm.6", "warm.7", "warm.8"]);
    // The sequence continues after the highest key loaded.
    let added = h.add("warm", &["NEWCODE".to_owned()], None).await;
    assert!(
        matches!(&added[..], [Added::New(id)] if id == &format!("warm.{}", TOTAL + 2)),
        "{added:?}"
    );
    // A code the engine holds redeems once sold; its twin was never loaded on its own.
    let code = keys[2].code.clone();
    assert!(matches!(
        h.inv.redeem("warm", &code, "user-2").await,
        Err(Error::CardUsed { .. })
    ));
}

/// A void whose call timed out on a stalled link to Redis, then retried through another
/// connection and undone by a restore, stays undone when the stalled call reaches Redis at
/// last: it arrives after its deadline and runs nothing. Redis only: the embedded engine has
/// no link to stall, and runs a call only while its caller still waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_void_that_arrives_after_its_caller_gave_up_runs_nothing() {
    let redis = RedisServer::start().await;
    let connect = |url: String, command_timeout_ms| async move {
        let options = RedisOptions {
            command_timeout_ms,
            ..RedisOptions::default()
        };
        RedisEngine::connect(&url, options)
            .await
            .expect("connects to its redis-server")
    };
    // A short timeout on the stalled link, to keep the test short; the default elsewhere,
    // so a busy machine never makes the other calls late.
    let link = Proxy::start(([127, 0, 0, 1], redis.port()).into()).await;
    let stalled = connect(format!("redis://{}", link.addr), 1_000).await;
    let direct = connect(redis.url(), RedisOptions::default().command_timeout_ms).await;
    let h = Harness::over(Arc::new(direct), None);
    let other = Inventory::with_clock(Arc::new(stalled), h.clock.clock());
    h.stock("late", SkuConfig::default(), 2).await;
    let key = "late.1";

    link.freeze_on(b"FCALL");
    assert!(
        matches!(other.void(key, "leaked").await, Err(Error::Unavailable(_))),
        "the stalled void times out"
    );
    assert!(link.is_frozen(), "the void is held on its way to Redis");
    // The operator retries through another gateway, then thinks better of it.
    assert_eq!(
        h.inv.void(key, "leaked").await.expect("void"),
        Some("available".into())
    );
    assert_eq!(
        h.inv.restore(key, "false alarm").await.expect("restore"),
        Some("available".into())
    );

    let calls = fcalls(&redis).await;
    link.thaw();
    eventually(
        Duration::from_secs(10),
        "the held void to reach Redis",
        || fcalls(&redis),
        |n| *n > calls,
    )
    .await;
    let counts = h.inv.counts("late").await.expect("counts");
    assert_eq!((counts.available, counts.void), (2, 0), "{counts:?}");
    // And the link serves again, on time.
    assert_eq!(
        other.void(key, "leaked").await.expect("void"),
        Some("available".into())
    );
}

/// `FCALL`s the server has run, refused ones included.
async fn fcalls(redis: &RedisServer) -> u64 {
    commands_run(redis, &["fcall"]).await
}

/// Calls of `commands` (lower case) the server has run, from `INFO commandstats`.
async fn commands_run(redis: &RedisServer, commands: &[&str]) -> u64 {
    let info = redis.redis_cli(&["INFO", "commandstats"]).await;
    let text = info.as_str().expect("INFO answers text").to_owned();
    let calls = |cmd: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    commands.iter().map(|cmd| calls(cmd)).sum()
}
