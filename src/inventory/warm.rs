//! Warm-up: loading the ledger's keys into the engine.
//!
//! The ledger is the source of truth; the engine is a working set that can be rebuilt from
//! it. Keys are read in id order and loaded in chunks (no call blocks the engine for long),
//! each in the state the ledger records, so a rebuilt engine never puts a sold or redeemed
//! code back on sale. Loading is idempotent: keys the engine already has are left alone, so an
//! interrupted warm-up simply runs again.

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, StreamExt};

use crate::engine::stream_id::StreamId;
use crate::error::Error;
use crate::ledger::{EventRecord, KeyRecord, Ledger};
use crate::sku::SkuConfig;

use super::Inventory;

/// Keys per engine call while warming, and per page read from the ledger (at most
/// [`WARM_IN_FLIGHT`] and one more are in memory at once). `lua/warm.lua` gathers its writes
/// into multi-value commands, so a call of a thousand keys holds Redis about as long (some
/// 20 ms) as one of 500 did before; larger pages loaded no faster and held more memory.
pub const WARM_CHUNK: u32 = 1000;

/// Pages loading into the engine at once while the next is read. Two keep Redis busy while
/// the gateway prepares a page (opening and sealing its codes takes about half as long as
/// Redis's call); a third also covers the ledger read.
pub const WARM_IN_FLIGHT: usize = 3;

/// What a warm-up did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmReport {
    /// Keys the engine did not have and now has.
    pub loaded: u64,
    /// Keys the engine already had.
    pub present: u64,
    /// The highest local id seen: where the next warm-up of new keys starts.
    pub last_local_id: i64,
}

/// Loads every key of `sku` with a local id above `after_local_id` from the ledger into the
/// engine. `progress` is told the running totals after each chunk.
pub async fn warm_sku(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    after_local_id: i64,
    progress: impl FnMut(WarmReport),
) -> Result<WarmReport, Error> {
    warm_generation(ledger, inventory, sku, after_local_id, "", progress).await
}

/// Like [`warm_sku`], for a rebuild of generation `gen` (`""`: whatever generation the
/// engine has): fails as soon as the SKU turns out lost and recreated since.
async fn warm_generation<'a>(
    ledger: &'a dyn Ledger,
    inventory: &'a Inventory,
    sku: &'a str,
    after_local_id: i64,
    gen: &'a str,
    mut progress: impl FnMut(WarmReport),
) -> Result<WarmReport, Error> {
    let mut report = WarmReport {
        last_local_id: after_local_id,
        ..WarmReport::default()
    };
    // Pages are read from the ledger one after another (each starts after the last id of the
    // one before) and loaded into the engine up to WARM_IN_FLIGHT at a time: while the engine
    // runs one page's call, the next is read, opened and sealed here, so neither side waits
    // for the other. Pages are independent (each key is loaded once, whichever call gets it
    // there first, in the state the ledger records), so their calls may run in any order;
    // loads are reported in page order, so the report's last id never passes a page that
    // has not loaded.
    let mut loading: FuturesOrdered<BoxFuture<'a, Result<PageLoad, Error>>> = FuturesOrdered::new();
    let mut reading: Option<BoxFuture<'a, Result<Vec<KeyRecord>, Error>>> = None;
    // Where the next page starts; `None` once a page came back empty.
    let mut after = Some(after_local_id);
    loop {
        if reading.is_none() && loading.len() < WARM_IN_FLIGHT {
            if let Some(after) = after {
                reading = Some(Box::pin(async move {
                    Ok(ledger.keys_after(sku, after, WARM_CHUNK).await?)
                }));
            }
        }
        if reading.is_none() && loading.is_empty() {
            return Ok(report);
        }
        tokio::select! {
            page = async {
                match reading.as_mut() {
                    Some(read) => read.await,
                    None => std::future::pending().await,
                }
            }, if reading.is_some() => {
                reading = None;
                let page = page?;
                after = page.last().map(|last| last.local_id);
                if !page.is_empty() {
                    loading.push_back(Box::pin(load_page(inventory, sku, gen, page)));
                }
            }
            Some(loaded) = loading.next(), if !loading.is_empty() => {
                let page = loaded?;
                report.last_local_id = page.last_local_id;
                report.loaded += page.loaded;
                report.present += page.keys - page.loaded;
                progress(report);
            }
        }
    }
}

/// What loading one page did.
struct PageLoad {
    last_local_id: i64,
    keys: u64,
    /// Keys new to the engine.
    loaded: u64,
}

/// Loads `page` (not empty) into the engine.
async fn load_page(
    inventory: &Inventory,
    sku: &str,
    gen: &str,
    page: Vec<KeyRecord>,
) -> Result<PageLoad, Error> {
    let loaded = inventory.warm_keys(sku, &page, gen).await?;
    Ok(PageLoad {
        last_local_id: page.last().map_or(0, |last| last.local_id),
        keys: page.len() as u64,
        loaded,
    })
}

/// Makes sure the engine has `sku`: when it does not (a fresh embedded engine, or Redis that
/// lost its data), recreates it from the ledger's settings and loads all its keys and
/// orders. Returns `None` when the engine already had the SKU, ready.
///
/// The SKU is created *loading* ([`begin_restore`]): until every key and order is in, its
/// scripts answer `ERR_UNAVAILABLE`, never "sold out" or "unknown" from a partial load.
/// Keys are loaded ([`finish_restore`]) only once every gateway alive has written what it
/// answered into the ledger ([`rebuild_acknowledged`], [`crate::ledger::journal`]); after
/// 30 s (or `grace`, if longer) without that, the rebuild is left loading and this fails
/// with [`Error::Unavailable`]. `grace` zero: nobody else shares the engine.
pub async fn restore_sku(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    grace: std::time::Duration,
) -> Result<Option<WarmReport>, Error> {
    let Some(rebuild) = begin_restore(ledger, inventory, sku).await? else {
        return Ok(None);
    };
    if !grace.is_zero() {
        let deadline = tokio::time::Instant::now() + grace.max(RESTORE_WAIT);
        loop {
            match rebuild_acknowledged(ledger, inventory, sku, &rebuild, grace).await? {
                Acknowledged::Yes | Acknowledged::Over => break,
                Acknowledged::Waiting(missing) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::Unavailable(format!(
                            "SKU {sku} is being rebuilt: gateways {} have not yet written \
                             what they answered into the ledger",
                            missing.join(", ")
                        )));
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    finish_restore(ledger, inventory, sku, &rebuild.gen)
        .await
        .map(Some)
}

/// How long [`restore_sku`] waits for gateways before it gives up (unless `grace` is longer).
const RESTORE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How often every gateway reports itself alive to the ledger
/// ([`Ledger::gateway_seen`]).
pub const ALIVE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Where a rebuild stands with the gateways that may hold answers it must not miss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acknowledged {
    /// Every gateway alive wrote what it answered into the ledger: the rebuild may finish.
    Yes,
    /// These gateways, alive, have not yet.
    Waiting(Vec<String>),
    /// The rebuild is over: ended by another gateway, or the SKU lost again (finishing it
    /// tells which).
    Over,
}

/// Whether every gateway alive (reported to the ledger within `grace`) has recorded in the
/// rebuild of `sku` that the ledger has what it answered before the loss
/// ([`Inventory::ack_rebuild`]). A gateway slow to notice the loss, or to reach the ledger,
/// is waited for as long as it reports alive; one silent for `grace` (killed, paused, cut
/// off) is presumed gone. Not before two reporting intervals since the rebuild began: a
/// gateway that came back with the ledger, or started, moments ago may not have reported.
pub async fn rebuild_acknowledged(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    rebuild: &Rebuild,
    grace: std::time::Duration,
) -> Result<Acknowledged, Error> {
    let now = inventory.now_ms();
    let since = now.saturating_sub(grace.as_millis() as u64);
    let alive = ledger.gateways_seen_since(since as i64).await?;
    let Some(state) = inventory
        .sku_state(sku)
        .await?
        .filter(|s| s.loading && s.gen == rebuild.gen)
    else {
        return Ok(Acknowledged::Over);
    };
    let missing: Vec<String> = alive
        .into_iter()
        .filter(|g| !state.acks.contains(g))
        .collect();
    let settled = now >= rebuild.began_ms + 2 * ALIVE_EVERY.as_millis() as u64;
    Ok(if missing.is_empty() && settled {
        Acknowledged::Yes
    } else {
        Acknowledged::Waiting(missing)
    })
}

/// A rebuild under way: the generation it loads, and when it began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuild {
    pub gen: String,
    pub began_ms: u64,
}

/// Starts rebuilding `sku` if the engine lacks it: creates it loading from the ledger's
/// settings. Returns the rebuild, also one found under way (interrupted, or run by another
/// gateway: every step of it is idempotent), or `None` when the engine has the SKU, ready.
pub async fn begin_restore(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
) -> Result<Option<Rebuild>, Error> {
    let found = |state: super::EngineSku| {
        state.loading.then_some(Rebuild {
            gen: state.gen,
            began_ms: state.created_at_ms,
        })
    };
    if let Some(state) = inventory.sku_state(sku).await? {
        return Ok(found(state));
    }
    let Some(record) = ledger.get_sku(sku).await? else {
        return Err(Error::NotFound(format!("SKU {sku}")));
    };
    let config: SkuConfig = serde_json::from_str(&record.config_json)
        .map_err(|e| Error::Internal(format!("ledger settings of SKU {sku}: {e}")))?;
    // Its first event (`sku` create) already above the ledger's (see `finish_restore`), and
    // not below this gateway's clock: an id that reads as old would show as the writer's
    // oldest entry waiting since then.
    let floor = ledger
        .last_entry(sku)
        .await?
        .and_then(StreamId::next)
        .map(|id| {
            id.max(StreamId {
                ms: inventory.now_ms(),
                seq: 0,
            })
        });
    if let Some(gen) = inventory.create_loading(sku, &config, floor).await? {
        tracing::warn!(
            sku,
            "the engine lacks the SKU: rebuilding it from the ledger"
        );
        return Ok(Some(Rebuild {
            gen,
            began_ms: inventory.now_ms(),
        }));
    }
    // Created by someone else meanwhile.
    match inventory.sku_state(sku).await? {
        Some(state) => Ok(found(state)),
        None => Err(super::lost_again(sku)),
    }
}

/// Ends a rebuild of generation `gen` [`begin_restore`] began: loads every key and order of
/// `sku` from the ledger, marks engine and ledger alike, and lets the SKU serve again. If
/// the SKU is lost and recreated meanwhile (a newer generation), every step refuses, and
/// the rebuild of the newer one does the work: a rebuild never declares ready a stock it
/// loaded only partly.
pub async fn finish_restore(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    gen: &str,
) -> Result<WarmReport, Error> {
    // Before the first read: a gateway that writes answers into the ledger from now on
    // learns that this rebuild may lack them (its acknowledgement is late), and has it
    // done again.
    inventory.start_reading(sku, gen).await?;
    // And a writer that commits events of a lost generation from now on (its gateway was
    // presumed gone, or held them past its acknowledgement) marks the SKU to be rebuilt
    // again, in the commit's own transaction.
    ledger.fence_rebuild(sku, gen).await?;
    // The new stream's ids come from the engine's clock, which may be behind the one that
    // made the ledger's events of the SKU (the lost generation's, answers written since the
    // rebuild began among them): its events go above every id the ledger holds, so none
    // repeats one (the ledger would drop it as a copy) or sorts before an earlier take.
    if let Some(floor) = ledger.last_entry(sku).await?.and_then(StreamId::next) {
        inventory.raise_floor(sku, gen, floor).await?;
    }
    let report = warm_generation(ledger, inventory, sku, 0, gen, |_| {}).await?;
    let orders = restore_orders(ledger, inventory, sku, gen).await?;
    restore_pools(ledger, inventory, sku, gen).await?;
    // The rebuilt engine now agrees with the ledger: mark both alike. The engine first, in
    // the same step that ends the rebuild, so of two gateways finishing one rebuild only
    // one marks (the other's marker would not match).
    let epoch = hex::encode(rand::random::<[u8; 8]>());
    if inventory.mark_ready(sku, gen, &epoch).await? {
        ledger.set_epoch(sku, &epoch).await?;
    }
    tracing::info!(
        sku,
        loaded = report.loaded,
        order_events = orders,
        "SKU restored from the ledger"
    );
    Ok(report)
}

/// Sets the stock pools of `sku` (generation `gen`, being rebuilt) to what the ledger's
/// applied events leave them, so each channel keeps the codes reserved for it. Nothing
/// changes once `gen` serves: another rebuild of it ended first.
pub async fn restore_pools(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    gen: &str,
) -> Result<(), Error> {
    let pools = ledger.pools(sku).await?;
    let mut args = vec!["load".to_owned(), gen.to_owned()];
    for (pool, level) in pools {
        args.push(pool);
        args.push(level.to_string());
    }
    let reply = inventory
        .eval_plain(&crate::engine::SCRIPTS.pool, sku, args)
        .await?;
    match reply.item(0).and_then(crate::engine::Reply::as_str) {
        // Done: another rebuild of `gen` ended (and loaded them); `mark_ready` says so.
        Some("loaded" | "done") => Ok(()),
        _ => Err(super::lost_again(sku)),
    }
}

/// Order events per engine call while restoring orders.
const ORDER_CHUNK: u32 = 200;

/// Rebuilds the engine's order records of `sku` (generation `gen`) from the ledger's order
/// events, so orders placed before the engine lost its data are recognised when retried.
/// Returns how many events were replayed.
pub async fn restore_orders(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    gen: &str,
) -> Result<u64, Error> {
    let mut cursor = 0;
    let mut applied = 0;
    loop {
        let events = ledger.order_events_after(sku, cursor, ORDER_CHUNK).await?;
        let Some((last, _)) = events.last() else {
            return Ok(applied);
        };
        cursor = *last;
        let mut args = Vec::with_capacity(2 + events.len() * 13);
        // A rebuild, not a restore (see `lua/orders.lua`).
        args.extend([gen.to_owned(), String::new()]);
        for (seq, e) in &events {
            args.extend(order_event_args(*seq, e));
        }
        let reply = inventory
            .eval_plain(&crate::engine::SCRIPTS.orders, sku, args)
            .await?;
        let Some(n) = reply.as_i64() else {
            return Err(super::lost_again(sku));
        };
        applied += n.max(0) as u64;
    }
}

/// One ledger event as `lua/orders.lua` takes it.
pub(crate) fn order_event_args(seq: i64, e: &EventRecord) -> [String; 13] {
    let fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&e.fields_json).unwrap_or_default();
    let field = |name: &str| {
        fields
            .get(name)
            .and_then(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .or_else(|| Some(v.to_string()))
            })
            .filter(|v| v != "null")
            .unwrap_or_default()
    };
    let number = |name: &str| {
        let v = field(name);
        if v.parse::<i64>().is_ok() {
            v
        } else {
            "0".to_owned()
        }
    };
    [
        e.kind.clone(),
        e.order_id.clone().unwrap_or_default(),
        e.user_id.clone().unwrap_or_default(),
        field("ids"),
        // No answer id: the ledger has these events, so a replayed answer need not wait for
        // them (and the stream they came from may be gone).
        String::new(),
        e.at_ms.to_string(),
        number("expires_at"),
        number("hold_ms"),
        number("qty"),
        if field("late") == "1" { "1" } else { "0" }.to_owned(),
        seq.to_string(),
        field("pool"),
        number("pooled"),
    ]
}

impl Inventory {
    /// Loads ledger keys into the engine (one script call; keep to a few hundred keys) and
    /// the global index. Returns how many were new to the engine.
    /// `gen`: the SKU generation a rebuild loads (`""`: any).
    ///
    /// The engine gets every code sealed and every digest keyed, also from a ledger not yet
    /// migrated ([`super::rekey`]). The global index needs each code's folded digest, so
    /// codes are opened here; one that does not open is loaded as stored (a claim of it fails
    /// and is reported, see [`super::open_failed`]) but not indexed.
    pub async fn warm_keys(&self, sku: &str, keys: &[KeyRecord], gen: &str) -> Result<u64, Error> {
        let keyring = self.keyring();
        let mut args = Vec::with_capacity(1 + keys.len() * 12);
        let mut plain = Vec::with_capacity(keys.len());
        args.push(gen.to_owned());
        for k in keys {
            let local = k.local_id.to_string();
            let (code, sealed) = if crate::secrets::is_sealed(&k.code) {
                match keyring.open(sku, &local, &k.code) {
                    Ok(code) => (Some(code), k.code.clone()),
                    Err(e) => {
                        super::open_failed(&keyring, &k.key_id, &e);
                        (None, k.code.clone())
                    }
                }
            } else {
                (Some(k.code.clone()), keyring.seal(sku, &local, &k.code))
            };
            let digest = match &code {
                Some(code) if !keyring.is_current_digest(&k.digest) => keyring.digest(code),
                _ => k.digest.clone(),
            };
            plain.extend(code);
            args.extend([
                local,
                digest,
                sealed,
                k.expires_at_ms.unwrap_or(0).to_string(),
                k.max_issues.to_string(),
                k.max_uses.to_string(),
                // Below zero only while an earlier event is on its way (see ledger::rules).
                k.held.max(0).to_string(),
                k.sold.to_string(),
                k.uses.to_string(),
                if k.void { "1" } else { "0" }.to_owned(),
                k.redeemer.clone().unwrap_or_default(),
                k.redeemed_at_ms.unwrap_or(0).to_string(),
            ]);
        }
        let reply = self
            .run_sku(&crate::engine::SCRIPTS.warm, sku, args)
            .await?;
        match reply.first().and_then(|r| r.as_str()) {
            // Warming is for SKUs the ledger has: one the engine lacks was lost with its data
            // (a rebuild is on its way), not unknown.
            Some("no_sku" | "loading") => return Err(super::rebuilding(sku)),
            Some("stale") => return Err(super::lost_again(sku)),
            _ => {}
        }
        let loaded = reply
            .iter()
            .filter(|r| r.as_str().is_some_and(|s| !s.starts_with('=')))
            .count() as u64;
        let codes: Vec<&str> = plain.iter().map(String::as_str).collect();
        self.index_codes(sku, &codes).await?;
        Ok(loaded)
    }
}

/// What [`check_epoch`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpochCheck {
    /// Engine and ledger carry the same marker.
    Same,
    /// Neither had one yet (a new SKU): both carry a fresh one now.
    Marked,
    /// The engine's marker differed: it was replaced behind the gateway's back. It was
    /// reconciled (missing keys loaded, keys the ledger is ahead on repaired, nothing only
    /// the engine has rolled back) and both carry a fresh marker.
    Diverged(super::reconcile::SkuReconcile),
}

/// Compares the engine's epoch marker of `sku` with the ledger's and acts on a difference.
/// `in_flight` is the SKU's events not yet in the ledger. Call only when the engine has
/// the SKU (see [`restore_sku`]).
pub async fn check_epoch(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    in_flight: u64,
) -> Result<EpochCheck, Error> {
    let Some(engine_epoch) = inventory.epoch(sku).await? else {
        return Err(Error::NotFound(format!("SKU {sku} in the engine")));
    };
    let ledger_epoch = ledger
        .get_sku(sku)
        .await?
        .and_then(|r| r.epoch)
        .unwrap_or_default();
    if !engine_epoch.is_empty() && engine_epoch == ledger_epoch {
        return Ok(EpochCheck::Same);
    }
    let outcome = if engine_epoch.is_empty() && ledger_epoch.is_empty() {
        EpochCheck::Marked
    } else {
        // The replaced engine's stream may be a recreated one, its ids from a clock behind
        // the ledger's events (see `finish_restore`).
        let gen = inventory
            .sku_state(sku)
            .await?
            .map(|s| s.gen)
            .unwrap_or_default();
        if let Some(floor) = ledger.last_entry(sku).await?.and_then(StreamId::next) {
            inventory.raise_floor(sku, &gen, floor).await?;
        }
        let report =
            super::reconcile::reconcile_sku(ledger, inventory, sku, true, in_flight).await?;
        // If the engine lost its orders too (its oldest order is gone), rebuild them. One
        // probe decides: rebuilding on top of surviving orders would count users twice.
        let oldest = ledger.order_events_after(sku, 0, 1).await?;
        if let Some((_, first)) = oldest.first() {
            let order_id = first.order_id.as_deref().unwrap_or_default();
            if !inventory.order_exists(sku, order_id).await? {
                restore_orders(ledger, inventory, sku, &gen).await?;
            }
        }
        tracing::warn!(
            sku,
            repaired = report.repaired,
            deferred = report.deferred,
            "the engine's epoch differs from the ledger's: reconciled"
        );
        EpochCheck::Diverged(report)
    };
    let epoch = hex::encode(rand::random::<[u8; 8]>());
    ledger.set_epoch(sku, &epoch).await?;
    inventory.mark_epoch(sku, &epoch).await?;
    Ok(outcome)
}
