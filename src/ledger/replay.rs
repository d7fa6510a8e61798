//! Replaying newly recorded events onto the keys they name, in memory.
//!
//! [`Ledger::apply_events`](super::Ledger::apply_events) works in one transaction: record the
//! events (those already recorded drop out), load the keys the rest name, replay them here in
//! order, write back the keys that changed. Keeping the middle step pure means both backends
//! replay identically and it is tested without a database; each key is read and written once
//! per call, however many events touch it.

use std::collections::{BTreeMap, BTreeSet};

use super::rules::{apply_to_key, EventKind, KeyStatus};
use super::LedgerEvent;

/// An event newly recorded in this transaction: its kind, and the sequence number the ledger
/// gave it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewEvent<'e> {
    pub event: &'e LedgerEvent,
    pub kind: EventKind,
    pub seq: i64,
}

impl<'e> NewEvent<'e> {
    pub(crate) fn new(event: &'e LedgerEvent, seq: i64) -> NewEvent<'e> {
        NewEvent {
            event,
            kind: EventKind::parse(&event.kind),
            seq,
        }
    }
}

/// The keys to load, per SKU: those named by events that change keys. Warns once per event
/// of a kind this version does not know (forward compatibility: recorded, no effect).
pub(crate) fn keys_to_load<'e>(events: &[NewEvent<'e>]) -> BTreeMap<&'e str, BTreeSet<i64>> {
    let mut wanted: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
    for e in events {
        if e.kind == EventKind::Unknown {
            tracing::warn!(
                event_id = %e.event.event_id,
                kind = %e.event.kind,
                "unknown event kind: recorded for the audit, no key changed"
            );
        } else if e.kind.changes_keys() {
            wanted
                .entry(e.event.sku.as_str())
                .or_default()
                .extend(&e.event.key_local_ids);
        }
    }
    wanted
}

/// The keys named by those of `events` that change keys, per SKU, whether or not the events
/// are new to the ledger: what a commit may lock before it knows which are new
/// ([`keys_to_load`] then picks the keys the new ones name).
pub(crate) fn keys_named(events: &[LedgerEvent]) -> BTreeMap<&str, BTreeSet<i64>> {
    let mut named: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
    for e in events {
        if EventKind::parse(&e.kind).changes_keys() {
            named
                .entry(e.sku.as_str())
                .or_default()
                .extend(&e.key_local_ids);
        }
    }
    named
}

/// What replaying changed.
#[derive(Debug, Default)]
pub(crate) struct Replayed<'e> {
    /// Keys whose status changed, per SKU, by local id.
    pub changed: BTreeMap<&'e str, Vec<(i64, KeyStatus)>>,
    /// Key ids events named that were not loaded (unknown to the ledger: skipped).
    pub skipped: u64,
}

impl Replayed<'_> {
    /// Logs the keys events named that the ledger does not have, if any.
    pub(crate) fn log_skipped(&self) {
        if self.skipped > 0 {
            tracing::info!(
                skipped = self.skipped,
                "events named keys the ledger does not have (aborted batches); skipped them"
            );
        }
    }
}

/// Applies `events` in order to the loaded `keys` (by SKU and local id).
pub(crate) fn replay<'e>(
    events: &[NewEvent<'e>],
    mut keys: BTreeMap<(&'e str, i64), KeyStatus>,
) -> Replayed<'e> {
    let mut dirty: BTreeSet<(&str, i64)> = BTreeSet::new();
    let mut skipped = 0;
    for e in events.iter().filter(|e| e.kind.changes_keys()) {
        let sku = e.event.sku.as_str();
        for &id in &e.event.key_local_ids {
            match keys.get_mut(&(sku, id)) {
                Some(status) => {
                    if apply_to_key(status, e.kind, e.event) {
                        dirty.insert((sku, id));
                    }
                }
                None => skipped += 1,
            }
        }
    }
    let mut changed: BTreeMap<&str, Vec<(i64, KeyStatus)>> = BTreeMap::new();
    for (sku, id) in dirty {
        if let Some(status) = keys.remove(&(sku, id)) {
            changed.entry(sku).or_default().push((id, status));
        }
    }
    Replayed { changed, skipped }
}

/// How newly recorded events change the stock pools (see `lua/prelude.lua`, "Stock pools"):
/// the sum of their parts per (SKU, pool), with the latest event time. Claims, holds and
/// late confirms take their `pooled` codes from their `pool`; releases and lapses give
/// `pooled` back; `pool` events move `delta` codes `from` one pool `to` another ('' is the
/// shared remainder, which is not stored), or cut a pool by `delta` (negative).
pub(crate) fn pool_changes<'e>(events: &[NewEvent<'e>]) -> BTreeMap<(&'e str, String), (i64, i64)> {
    let mut out: BTreeMap<(&str, String), (i64, i64)> = BTreeMap::new();
    for e in events {
        // Most events move no pool: only these kinds can, and then only with a `pool` that
        // names one and a `pooled` other than 0 (keys of the JSON; a value holding quotes is
        // escaped, so it cannot look like one). A claim names its channel (the default one
        // unless the token is another's) and how many codes it drew from that channel's pool,
        // `"pooled":"0"` for a channel without one: skipping those spares parsing nearly
        // every event's fields again.
        let may_move = match e.event.kind.as_str() {
            "claim" | "hold" | "confirm" | "release" | "expire" => {
                let fields = e.event.fields_json.as_str();
                fields.contains("\"pooled\":\"")
                    && !fields.contains("\"pooled\":\"0\"")
                    && !fields.contains("\"pool\":\"\"")
            }
            "pool" => true,
            _ => false,
        };
        if !may_move {
            continue;
        }
        let Ok(serde_json::Value::Object(fields)) =
            serde_json::from_str::<serde_json::Value>(&e.event.fields_json)
        else {
            continue;
        };
        let text = |name: &str| fields.get(name).and_then(|v| v.as_str()).unwrap_or("");
        let number = |name: &str| text(name).parse::<i64>().unwrap_or(0);
        let mut add = |pool: &str, delta: i64| {
            if !pool.is_empty() && delta != 0 {
                let entry = out
                    .entry((e.event.sku.as_str(), pool.to_owned()))
                    .or_default();
                entry.0 += delta;
                entry.1 = entry.1.max(e.event.at_ms);
            }
        };
        match e.event.kind.as_str() {
            "claim" | "hold" | "confirm" => add(text("pool"), -number("pooled")),
            "release" | "expire" => add(text("pool"), number("pooled")),
            "pool" if fields.contains_key("to") => {
                add(text("from"), -number("delta"));
                add(text("to"), number("delta"));
            }
            "pool" => add(text("pool"), number("delta")),
            _ => {}
        }
    }
    out
}

/// The (SKU, generation) pairs newly recorded events came from, events of no known
/// generation left out: a commit checks each against the SKU's rebuild fence
/// (migrations/*/*_rebuild_fences.sql).
pub(crate) fn generations<'e>(events: &[NewEvent<'e>]) -> BTreeSet<(&'e str, &'e str)> {
    events
        .iter()
        .filter_map(|e| Some((e.event.sku.as_str(), e.event.gen.as_deref()?)))
        .collect()
}

/// Rows of the audit index: (SKU, local id, event seq), once per key an event names.
pub(crate) fn audit_links<'e>(events: &[NewEvent<'e>]) -> Vec<(&'e str, i64, i64)> {
    let mut links = Vec::new();
    for e in events {
        let ids: BTreeSet<i64> = e.event.key_local_ids.iter().copied().collect();
        links.extend(ids.into_iter().map(|id| (e.event.sku.as_str(), id, e.seq)));
    }
    links
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sku: &str, kind: &str, ids: &[i64]) -> LedgerEvent {
        LedgerEvent {
            event_id: format!("{sku}/{kind}"),
            sku: sku.into(),
            kind: kind.into(),
            at_ms: 10,
            key_local_ids: ids.to_vec(),
            order_id: None,
            user_id: None,
            redeemer: None,
            reason: None,
            late: false,
            fields_json: "{}".into(),
            gen: None,
        }
    }

    fn fresh() -> KeyStatus {
        KeyStatus {
            voids: 0,
            held: 0,
            sold: 0,
            uses: 0,
            max_issues: 1,
            max_uses: 1,
            order_id: None,
            user_id: None,
            order_entry: None,
            redeemer: None,
            redeemed_at_ms: None,
            redeem_entry: None,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn only_key_changing_events_load_keys() {
        let add = event("a", "add", &[1, 2]);
        let hold = event("a", "hold", &[2, 3]);
        let odd = event("b", "teleport", &[9]);
        let void = event("b", "void", &[4]);
        let events: Vec<NewEvent> = [&add, &hold, &odd, &void]
            .into_iter()
            .enumerate()
            .map(|(i, e)| NewEvent::new(e, i as i64))
            .collect();
        let wanted = keys_to_load(&events);
        assert_eq!(wanted["a"], BTreeSet::from([2, 3]));
        assert_eq!(wanted["b"], BTreeSet::from([4]));
    }

    #[test]
    fn replay_applies_in_order_and_skips_unknown_keys() {
        let hold = event("a", "hold", &[1, 7]);
        let confirm = event("a", "confirm", &[1]);
        let events = [NewEvent::new(&hold, 1), NewEvent::new(&confirm, 2)];
        let keys = BTreeMap::from([(("a", 1), fresh()), (("a", 2), fresh())]);
        let out = replay(&events, keys);
        assert_eq!(out.skipped, 1);
        let changed = &out.changed["a"];
        assert_eq!(changed.len(), 1, "key 2 was not touched");
        let (id, status) = &changed[0];
        assert_eq!((*id, status.held, status.sold), (1, 0, 1));
    }

    #[test]
    fn pools_move_by_the_pool_fields_of_the_events() {
        let with = |kind: &str, at_ms: i64, fields: serde_json::Value| {
            let mut e = event("a", kind, &[1]);
            e.event_id = format!("a/{kind}-{at_ms}");
            e.at_ms = at_ms;
            e.fields_json = fields.to_string();
            e
        };
        let events = [
            with("claim", 1, serde_json::json!({"pool": "", "pooled": "0"})),
            with(
                "claim",
                2,
                serde_json::json!({"pool": "ch1", "pooled": "3"}),
            ),
            // Another field's value holding the text of an empty pool changes nothing.
            with(
                "hold",
                3,
                serde_json::json!({"user": "\"pool\":\"\"", "pool": "ch1", "pooled": "2"}),
            ),
            with(
                "release",
                4,
                serde_json::json!({"pool": "ch1", "pooled": "1"}),
            ),
            with(
                "claim",
                5,
                serde_json::json!({"pool": "ch2", "pooled": "0"}),
            ),
            with(
                "expire",
                5,
                serde_json::json!({"pool": "ch2", "pooled": "05"}),
            ),
            with(
                "pool",
                6,
                serde_json::json!({"from": "", "to": "ch2", "delta": "7"}),
            ),
            with("pool", 7, serde_json::json!({"pool": "ch1", "delta": "-1"})),
            with(
                "redeem",
                8,
                serde_json::json!({"pool": "ch1", "pooled": "5"}),
            ),
        ];
        let new: Vec<NewEvent> = events
            .iter()
            .enumerate()
            .map(|(i, e)| NewEvent::new(e, i as i64))
            .collect();
        let changes = pool_changes(&new);
        assert_eq!(
            changes.into_iter().collect::<Vec<_>>(),
            vec![
                (("a", "ch1".to_owned()), (-3 - 2 + 1 - 1, 7)),
                (("a", "ch2".to_owned()), (5 + 7, 6)),
            ]
        );
    }

    #[test]
    fn audit_links_name_each_key_once_per_event() {
        let claim = event("a", "claim", &[3, 1, 3]);
        let links = audit_links(&[NewEvent::new(&claim, 5)]);
        assert_eq!(links, vec![("a", 1, 5), ("a", 3, 5)]);
    }
}
