//! Retention: settled orders and redemption marks leave the engine, retries still replay.
//!
//! Without it a SKU's `orders` and `redemptions` hashes grow with every order and
//! redemption ever made. [`Inventory::retire`] runs `lua/retire.lua`, which takes out what
//! settled longer than the retention ago, but only what the ledger has every event of (the
//! writer's settled floor, [`crate::ledger::writer::EventWriter::committed_through`]): a
//! change that exists only in the stream never leaves the engine.
//!
//! A retired order leaves a fingerprint (40 bits of the SHA-1 of its id, see `fingerprint`
//! in `lua/prelude.lua`), so a later claim, confirm, release or lookup of that order id is
//! answered `{'moved'}` instead of being taken for a new order. The inventory then restores
//! the order from the ledger's events of it (`lua/orders.lua`) and asks again
//! (`Inventory::run_order`): a retry gets its first answer at any age, and changes nothing
//! more. A fingerprint can match another order id (about one in 2^40 / retired orders);
//! the ledger then has no such order and the call goes on as a new order.
//!
//! A redemption mark retires only when the key record answers the same retry alike (the
//! code's last redeemer, see `lua/redeem.lua`); marks of earlier redemptions of a reusable
//! code stay.

use sha1_smol::Sha1;

use super::warm::order_event_args;
use super::{rebuilding, tag, Inventory};
use crate::engine::keys::retired_key;
use crate::engine::{Reply, Script, SCRIPTS};
use crate::error::Error;
use crate::metrics as m;

/// How often one call restores an order that keeps being retired again before its retry
/// runs; past it the retry is `ERR_UNAVAILABLE` (only a retention far shorter than a call
/// gets there).
const RESTORE_ATTEMPTS: usize = 3;

/// What one [`Inventory::retire`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retired {
    /// Orders taken out of the engine.
    pub orders: u64,
    /// Redemption marks taken out of the engine.
    pub marks: u64,
    /// Whether the call stopped at its limit: more may be due.
    pub more: bool,
}

/// Where order `order_id` leaves its mark when retired: its bucket of the SKU's `retired`
/// hash and its fingerprint there, exactly as `fingerprint` in `lua/prelude.lua` makes them.
fn fingerprint(order_id: &str) -> (String, String) {
    let hex = Sha1::from(order_id).digest().to_string();
    (hex[..4].to_owned(), format!(",{}", &hex[4..10]))
}

impl Inventory {
    /// Restores orders this engine retired from `ledger` when they are retried. Set once, by
    /// whoever opens the ledger (the gateway).
    pub fn restore_retired_from(&self, ledger: std::sync::Arc<dyn crate::ledger::Ledger>) {
        let _ = self.ledger.set(ledger);
    }

    /// Retires up to `limit` entries of `sku` settled at or before `cutoff_ms` whose events
    /// the ledger has through answer id `committed_through` (`<gen>:<ms>-<seq>`, `""` when
    /// nothing is known committed). With `keep`, retention is off: the entries are dropped
    /// and every record stays.
    pub async fn retire(
        &self,
        sku: &str,
        cutoff_ms: u64,
        committed_through: &str,
        limit: u64,
        keep: bool,
    ) -> Result<Retired, Error> {
        let args = vec![
            cutoff_ms.to_string(),
            committed_through.to_owned(),
            limit.to_string(),
            if keep { "0" } else { "1" }.to_owned(),
        ];
        let reply = self.run(&SCRIPTS.retire, sku, args).await?;
        let n = |i: usize| reply.get(i).and_then(Reply::as_i64).unwrap_or(0).max(0) as u64;
        Ok(Retired {
            orders: n(0),
            marks: n(1),
            more: n(2) > 0,
        })
    }

    /// Whether order `order_id` of `sku`, which the engine's `orders` lacks, may have been
    /// retired: a plain read of its fingerprint's bucket.
    pub(super) async fn may_be_retired(&self, sku: &str, order_id: &str) -> Result<bool, Error> {
        let (bucket, mark) = fingerprint(order_id);
        let prints = self.engine.hget(retired_key(sku), bucket).await?;
        Ok(prints.is_some_and(|p| p.contains(&mark)))
    }

    /// Runs order script `script` (claim, confirm, release, order) for `order_id`. When the
    /// engine answers that the order may have been retired, restores it from the ledger and
    /// runs the script again. When the ledger has no such order, runs `fresh` instead if
    /// given (a claim, as a new order), else answers `not_found`.
    pub(super) async fn run_order(
        &self,
        script: &'static Script,
        sku: &str,
        order_id: &str,
        args: Vec<String>,
        fresh: Option<Vec<String>>,
    ) -> Result<Vec<Reply>, Error> {
        for _ in 0..RESTORE_ATTEMPTS {
            let reply = self.run(script, sku, args.clone()).await?;
            if tag(&reply) != "moved" {
                return Ok(reply);
            }
            if !self.restore_retired(sku, order_id).await? {
                return match fresh {
                    Some(fresh) => self.run(script, sku, fresh).await,
                    None => Ok(vec![Reply::from("not_found")]),
                };
            }
        }
        Err(Error::Unavailable(format!(
            "order {order_id} keeps being retired while it is restored; retry shortly"
        )))
    }

    /// Restores retired order `order_id` of `sku` from the ledger's events of it. Returns
    /// whether the ledger has the order (`false`: its fingerprint is another order's).
    pub(super) async fn restore_retired(&self, sku: &str, order_id: &str) -> Result<bool, Error> {
        let Some(ledger) = self.ledger.get() else {
            return Err(Error::Unavailable(format!(
                "order {order_id} was retired from the engine and no ledger is open to \
                 restore it from"
            )));
        };
        let events = ledger.order_events(sku, order_id).await?;
        if events.is_empty() {
            metrics::counter!(m::ORDERS_RESTORED, "result" => "unknown").increment(1);
            return Ok(false);
        }
        let mut args = Vec::with_capacity(2 + events.len() * 13);
        args.extend([String::new(), self.now_ms().to_string()]);
        for (seq, e) in &events {
            args.extend(order_event_args(*seq, e));
        }
        let reply = self.eval_plain(&SCRIPTS.orders, sku, args).await?;
        if reply.as_i64().is_none() {
            // `loading` or `no_sku`: the SKU is being rebuilt, which brings the order back.
            return Err(rebuilding(sku));
        }
        metrics::counter!(m::ORDERS_RESTORED, "result" => "restored").increment(1);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_four_hex_digits_of_bucket_and_six_led_by_a_comma() {
        let (bucket, mark) = fingerprint("o-1");
        let hex = Sha1::from("o-1").digest().to_string();
        assert_eq!(bucket, hex[..4]);
        assert_eq!(mark, format!(",{}", &hex[4..10]));
        assert_ne!(fingerprint("o-2"), fingerprint("o-1"));
    }
}
