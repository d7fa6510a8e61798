//! Turning an entry of a SKU's event stream into a [`LedgerEvent`].
//!
//! The scripts append entries with `emit(kind, now, fields)` (`lua/prelude.lua`): `t` is the
//! kind, `at` the engine time, then kind-specific fields (`order`, `user`, `ids`, `late`,
//! `redeemer`, `reason`, …). This module is the one place that knows those names, so the
//! writer only moves entries. Entries carry key ids, never codes, so the raw fields are safe
//! to keep for the audit.

use std::collections::BTreeMap;

use super::{LedgerError, LedgerEvent};

/// The stream entry id an event id (`<sku>/<entry id>`, see [`event_from_entry`]) names; the
/// whole id when it has no `/` (none of the engine's).
pub fn entry_of(event_id: &str) -> &str {
    event_id.rsplit_once('/').map_or(event_id, |(_, id)| id)
}

/// Builds the event for stream entry `entry_id` of `sku`'s stream from its field/value pairs.
///
/// Fails with [`LedgerError::Corrupt`] for an entry no script writes (no `t`, a non-numeric
/// `at` or id): the writer should move such a poison entry to its dead-letter stream rather
/// than retry it. Unknown kinds and extra fields are accepted (forward compatibility).
pub fn event_from_entry(
    sku: &str,
    entry_id: &str,
    fields: &[(String, String)],
) -> Result<LedgerEvent, LedgerError> {
    let poison =
        |what: &str| LedgerError::Corrupt(format!("stream entry {sku}/{entry_id}: {what}"));
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let text = |name: &str| get(name).filter(|v| !v.is_empty()).map(str::to_owned);

    let kind = text("t").ok_or_else(|| poison("no kind (t)"))?;
    let at_ms = get("at")
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or_else(|| poison("no numeric time (at)"))?;
    let key_local_ids = match get("ids") {
        None | Some("") => Vec::new(),
        Some(ids) => ids
            .split(',')
            .map(|id| id.parse::<i64>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| poison("a key id (ids) is not a number"))?,
    };
    // The same object `serde_json::Value` would write (keys sorted, a repeated field's last
    // value), without copying every field into one first: this runs for every event.
    let fields_json = serde_json::to_string(
        &fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<BTreeMap<_, _>>(),
    )
    .map_err(|e| poison(&format!("fields: {e}")))?;

    Ok(LedgerEvent {
        event_id: format!("{sku}/{entry_id}"),
        sku: sku.to_owned(),
        kind,
        at_ms,
        key_local_ids,
        order_id: text("order"),
        user_id: text("user"),
        redeemer: text("redeemer"),
        reason: text("reason"),
        late: get("late") == Some("1"),
        fields_json,
        gen: None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn late_confirm_entry_becomes_an_event() {
        let f = fields(&[
            ("t", "confirm"),
            ("at", "1700000000123"),
            ("order", "o-1"),
            ("user", ""),
            ("ids", "4,7"),
            ("late", "1"),
        ]);
        let e = event_from_entry("gift", "1700000000123-0", &f).expect("valid entry");
        assert_eq!(e.event_id, "gift/1700000000123-0");
        assert_eq!(e.kind, "confirm");
        assert_eq!(e.at_ms, 1_700_000_000_123);
        assert_eq!(e.key_local_ids, vec![4, 7]);
        assert_eq!(e.order_id.as_deref(), Some("o-1"));
        assert_eq!(e.user_id, None);
        assert!(e.late);
        let json: Value = serde_json::from_str(&e.fields_json).expect("json");
        assert_eq!(json["ids"], "4,7");
    }

    #[test]
    fn redeem_and_void_entries_carry_their_fields() {
        let r = event_from_entry(
            "s",
            "1-0",
            &fields(&[
                ("t", "redeem"),
                ("at", "5"),
                ("ids", "3"),
                ("redeemer", "u-42"),
            ]),
        )
        .expect("valid");
        assert_eq!(r.redeemer.as_deref(), Some("u-42"));
        assert!(!r.late);
        let v = event_from_entry(
            "s",
            "2-0",
            &fields(&[
                ("t", "void"),
                ("at", "6"),
                ("ids", "3"),
                ("reason", "fraud"),
            ]),
        )
        .expect("valid");
        assert_eq!(v.reason.as_deref(), Some("fraud"));
        let sku =
            event_from_entry("s", "3-0", &fields(&[("t", "sku"), ("at", "7")])).expect("valid");
        assert!(sku.key_local_ids.is_empty());
    }

    #[test]
    fn poison_entries_are_rejected() {
        for bad in [
            fields(&[("at", "1")]),
            fields(&[("t", "hold"), ("at", "soon")]),
            fields(&[("t", "hold"), ("at", "1"), ("ids", "1,x")]),
        ] {
            assert!(matches!(
                event_from_entry("s", "1-0", &bad),
                Err(LedgerError::Corrupt(_))
            ));
        }
    }
}
