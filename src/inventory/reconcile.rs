//! Reconcile: compare the engine with the ledger key by key, and optionally repair.
//!
//! The ledger only learns of changes from the engine's events, so where the two disagree
//! one of them is ahead:
//!
//! - the **engine is ahead** (more holds, sales or uses, or a void the ledger lacks): the
//!   change is on its way to the ledger, or its event was lost. Either way the engine's
//!   state is the newer truth and is never rolled back; it is reported as `engine_ahead`.
//! - the **ledger is ahead** (the engine lost a change, e.g. Redis restarted from an older
//!   snapshot): the engine is set to the ledger's state (`repair`), or reported.
//! - the engine **lacks the key**: it is loaded in the ledger's state.
//!
//! While events of the SKU are in flight, a key's engine state may legitimately be behind
//! the ledger's in one counter (a release lowers `held` before the ledger hears of it), so
//! keys the engine has are then only reported (`deferred`), never repaired; keys it lacks
//! are still loaded, since no event removes a key.

use serde::Serialize;

use super::Inventory;
use crate::engine::{Reply, SCRIPTS};
use crate::error::Error;
use crate::ledger::{KeyRecord, Ledger};

/// Keys compared per round trip.
const CHUNK: u32 = 500;
/// Differences listed per SKU; all are counted.
const MAX_LISTED: usize = 1000;

/// One key on which engine and ledger disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub key_id: String,
    /// `missing_in_engine`, `ledger_ahead`, `engine_ahead` or `differs` (while events are in
    /// flight).
    pub kind: &'static str,
    /// `repaired`, `would_repair`, `kept` (an engine-only change is never rolled back) or
    /// `deferred` (events in flight: reported, not touched).
    pub action: &'static str,
}

/// The outcome for one SKU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SkuReconcile {
    pub sku: String,
    pub checked: u64,
    pub missing_in_engine: u64,
    pub ledger_ahead: u64,
    pub engine_ahead: u64,
    /// Differing keys left alone because events were in flight.
    pub deferred: u64,
    pub repaired: u64,
    pub differences: Vec<Difference>,
}

/// The engine's view of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EngineKey {
    void: bool,
    held: i64,
    sold: i64,
    uses: i64,
}

impl EngineKey {
    fn from_reply(reply: &Reply) -> Option<EngineKey> {
        let f = reply.as_array()?;
        let n = |i: usize| f.get(i).and_then(Reply::as_i64).unwrap_or(0);
        (!f.is_empty()).then(|| EngineKey {
            void: f.first().and_then(Reply::as_str) == Some("1"),
            held: n(1),
            sold: n(2),
            uses: n(3),
        })
    }

    fn matches(&self, k: &KeyRecord) -> bool {
        self.void == k.void
            && self.held == k.held.max(0)
            && self.sold == k.sold
            && self.uses == k.uses
    }

    /// Whether every counter of the engine is at least the ledger's: the engine has seen
    /// everything the ledger has, and more.
    fn ahead_of(&self, k: &KeyRecord) -> bool {
        self.sold >= k.sold
            && self.uses >= k.uses
            && self.held + self.sold >= k.held.max(0) + k.sold
            && (self.void || !k.void)
    }
}

/// Compares every ledger key of `sku` with the engine; with `repair`, loads missing keys and
/// sets keys where the ledger is ahead to the ledger's state. `in_flight` is the number of
/// the SKU's events not yet committed to the ledger.
pub async fn reconcile_sku(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    repair: bool,
    in_flight: u64,
) -> Result<SkuReconcile, Error> {
    let mut out = SkuReconcile {
        sku: sku.to_owned(),
        ..SkuReconcile::default()
    };
    let mut cursor = 0;
    loop {
        let keys = ledger.keys_after(sku, cursor, CHUNK).await?;
        let Some(last) = keys.last() else {
            return Ok(out);
        };
        cursor = last.local_id;
        let ids = keys.iter().map(|k| k.local_id.to_string()).collect();
        let engine = inventory.run_sku(&SCRIPTS.inspect, sku, ids).await?;
        let mut missing = Vec::new();
        let mut behind = Vec::new();
        for (k, reply) in keys.iter().zip(&engine) {
            out.checked += 1;
            let (kind, action) = match EngineKey::from_reply(reply) {
                None => {
                    out.missing_in_engine += 1;
                    missing.push(k.clone());
                    ("missing_in_engine", repaired_or_not(repair))
                }
                Some(e) if e.matches(k) => continue,
                Some(_) if in_flight > 0 => {
                    out.deferred += 1;
                    ("differs", "deferred")
                }
                Some(e) if e.ahead_of(k) => {
                    out.engine_ahead += 1;
                    ("engine_ahead", "kept")
                }
                Some(_) => {
                    out.ledger_ahead += 1;
                    behind.push(k);
                    ("ledger_ahead", repaired_or_not(repair))
                }
            };
            if out.differences.len() < MAX_LISTED {
                out.differences.push(Difference {
                    key_id: k.key_id.clone(),
                    kind,
                    action,
                });
            }
        }
        if repair {
            if !missing.is_empty() {
                out.repaired += inventory.warm_keys(sku, &missing, "").await?;
            }
            if !behind.is_empty() {
                out.repaired += set_to_ledger(inventory, sku, &behind).await?;
            }
        }
    }
}

fn repaired_or_not(repair: bool) -> &'static str {
    if repair {
        "repaired"
    } else {
        "would_repair"
    }
}

async fn set_to_ledger(
    inventory: &Inventory,
    sku: &str,
    keys: &[&KeyRecord],
) -> Result<u64, Error> {
    let mut args = Vec::with_capacity(keys.len() * 7);
    for k in keys {
        args.extend([
            k.local_id.to_string(),
            if k.void { "1" } else { "0" }.to_owned(),
            // Below zero only while an earlier event is on its way (see ledger::rules).
            k.held.max(0).to_string(),
            k.sold.to_string(),
            k.uses.to_string(),
            k.redeemer.clone().unwrap_or_default(),
            k.redeemed_at_ms.unwrap_or(0).to_string(),
        ]);
    }
    let reply = inventory.eval_plain(&SCRIPTS.repair, sku, args).await?;
    Ok(reply.as_i64().unwrap_or(0).max(0) as u64)
}

/// Reconciles `sku`, or every SKU of the ledger. `in_flight` tells a SKU's events not yet
/// in the ledger.
pub async fn reconcile<F, Fut>(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: Option<&str>,
    repair: bool,
    in_flight: F,
) -> Result<Vec<SkuReconcile>, Error>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<u64, Error>>,
{
    let skus = match sku {
        Some(sku) => vec![sku.to_owned()],
        None => ledger.list_skus().await?,
    };
    let mut out = Vec::with_capacity(skus.len());
    for sku in skus {
        let pending = in_flight(sku.clone()).await?;
        out.push(reconcile_sku(ledger, inventory, &sku, repair, pending).await?);
    }
    Ok(out)
}
