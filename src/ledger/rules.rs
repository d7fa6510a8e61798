//! The key state rules, mirrored from `lua/prelude.lua` and the scripts that emit events.
//!
//! The engine changes a key and appends an event in the same script; the ledger replays that
//! event here. Both must land on the same numbers, or drift appears that no one caused, so
//! these functions are a line-by-line transcription of the Lua (`key_state`, `issue`, `unhold`,
//! the confirm, redeem, void and restore scripts) and nothing else. They are pure, so both
//! backends share them and unit tests pin them down without a database.

use super::stream::entry_of;
use super::LedgerEvent;
use crate::engine::stream_id::StreamId;

/// What an event does to the keys it names. Parsed from the stream's `t` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Codes were added (`add.lua`); the ledger already has them.
    Add,
    /// SKU settings were created or updated (`sku.lua`).
    Sku,
    /// Keys were reserved for an order (`claim.lua` with a hold).
    Hold,
    /// Keys were issued to an order for good (`claim.lua` without a hold).
    Claim,
    /// A hold became final, or a late confirm claimed fresh keys (`confirm.lua`).
    Confirm,
    /// A hold was cancelled (`release.lua`).
    Release,
    /// A hold lapsed (`expire_order` in the prelude).
    Expire,
    /// A sold key was redeemed once more (`redeem.lua`).
    Redeem,
    /// A key was taken out of circulation (`void.lua`).
    Void,
    /// A void was undone (`restore.lua`).
    Restore,
    /// Stock pools were set, moved or cut (`pool.lua`, `fit_pools` in the prelude): no key
    /// changes, only pool levels (`replay::pool_changes`).
    Pool,
    /// A kind this version does not know: recorded for the audit, changes nothing.
    Unknown,
}

impl EventKind {
    /// The kind named by an event's `kind` field.
    pub fn parse(kind: &str) -> EventKind {
        match kind {
            "add" => EventKind::Add,
            "sku" => EventKind::Sku,
            "hold" => EventKind::Hold,
            "claim" => EventKind::Claim,
            "confirm" => EventKind::Confirm,
            "release" => EventKind::Release,
            "expire" => EventKind::Expire,
            "redeem" => EventKind::Redeem,
            "void" => EventKind::Void,
            "restore" => EventKind::Restore,
            "pool" => EventKind::Pool,
            _ => EventKind::Unknown,
        }
    }

    /// Whether applying the event changes the keys it names.
    pub fn changes_keys(self) -> bool {
        !matches!(
            self,
            EventKind::Add | EventKind::Sku | EventKind::Pool | EventKind::Unknown
        )
    }
}

/// A key's derived state, as `key_state` in `lua/prelude.lua` computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    Available,
    Held,
    Claimed,
    Redeemed,
    Void,
}

impl KeyState {
    /// The name stored in the ledger's `state` column and used by the engine's counts.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Available => "available",
            KeyState::Held => "held",
            KeyState::Claimed => "claimed",
            KeyState::Redeemed => "redeemed",
            KeyState::Void => "void",
        }
    }

    /// The state with this name, if any.
    pub fn parse(name: &str) -> Option<KeyState> {
        Some(match name {
            "available" => KeyState::Available,
            "held" => KeyState::Held,
            "claimed" => KeyState::Claimed,
            "redeemed" => KeyState::Redeemed,
            "void" => KeyState::Void,
            _ => return None,
        })
    }
}

/// A key's state from its counters, exactly as the engine derives it.
pub fn key_state(
    void: bool,
    held: i64,
    sold: i64,
    uses: i64,
    max_issues: i64,
    max_uses: i64,
) -> KeyState {
    if void {
        KeyState::Void
    } else if sold > 0 && uses >= max_uses {
        KeyState::Redeemed
    } else if sold + held >= max_issues {
        if sold > 0 {
            KeyState::Claimed
        } else {
            KeyState::Held
        }
    } else {
        KeyState::Available
    }
}

/// The part of a key that events change.
///
/// Several writers commit a SKU's events, each its own batch, so the ledger may apply a
/// key's events in another order than the engine made them (a release committed before the
/// hold it ends). The counters therefore only ever add and subtract, never clamp: the sums
/// are the same in any order, and a counter below zero only means an earlier event is still
/// on its way. The derived state and what is loaded into an engine read `held` as at least
/// zero ([`KeyStatus::held_now`]). Voids are counted the same way ([`KeyStatus::voids`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// Voids applied less restores applied. The engine voids a key only when it is not void
    /// and restores it only when it is, so in the engine's order this is 1 while the key is
    /// void and 0 otherwise; a sum, it ends there in any order ([`KeyStatus::void`]).
    pub voids: i64,
    /// Orders holding the key (more than one only for reusable codes).
    pub held: i64,
    /// Orders owning the key.
    pub sold: i64,
    /// Times the key was redeemed.
    pub uses: i64,
    pub max_issues: i64,
    pub max_uses: i64,
    /// The order that most recently took the key (held or claimed it).
    pub order_id: Option<String>,
    /// The user of that order, if it named one.
    pub user_id: Option<String>,
    /// The stream entry id of the event that set `order_id`: a take applied after a later
    /// one (another writer's batch committed first) leaves them alone.
    pub order_entry: Option<String>,
    /// Who redeemed the key last.
    pub redeemer: Option<String>,
    pub redeemed_at_ms: Option<i64>,
    /// The stream entry id of the redemption that set `redeemer` and `redeemed_at_ms`.
    pub redeem_entry: Option<String>,
    /// Engine time of the latest event applied to the key.
    pub updated_at_ms: i64,
}

impl KeyStatus {
    /// Orders holding the key, as far as the events applied so far tell.
    pub fn held_now(&self) -> i64 {
        self.held.max(0)
    }

    /// Whether the key is void, as far as the events applied so far tell (a restore applied
    /// before its void reads as not void).
    pub fn void(&self) -> bool {
        self.voids > 0
    }

    /// The key's derived state.
    pub fn state(&self) -> KeyState {
        key_state(
            self.void(),
            self.held_now(),
            self.sold,
            self.uses,
            self.max_issues,
            self.max_uses,
        )
    }
}

/// Applies one event to one key it names, exactly as the engine changed that key.
///
/// Returns whether the key changed. Events of kinds that change no key (`add`, `sku`, `pool`,
/// unknown kinds) leave it alone. A key named twice by an event is applied twice, as the scripts loop
/// over ids.
pub fn apply_to_key(key: &mut KeyStatus, kind: EventKind, event: &LedgerEvent) -> bool {
    let before = key.clone();
    match kind {
        EventKind::Add | EventKind::Sku | EventKind::Pool | EventKind::Unknown => return false,
        EventKind::Hold => {
            key.held += 1;
            take_for_order(key, event);
        }
        EventKind::Claim => {
            key.sold += 1;
            take_for_order(key, event);
        }
        EventKind::Confirm => {
            // A late confirm claimed fresh keys (`issue(ids, false)`); an ordinary one turns
            // the order's own hold into a sale.
            if !event.late {
                key.held -= 1;
            }
            key.sold += 1;
            take_for_order(key, event);
        }
        EventKind::Release | EventKind::Expire => {
            key.held -= 1;
        }
        EventKind::Redeem => {
            key.uses += 1;
            if let Some(entry) = later_entry(event, key.redeem_entry.as_deref()) {
                key.redeemer = non_empty(&event.redeemer);
                key.redeemed_at_ms = Some(event.at_ms);
                key.redeem_entry = Some(entry.to_owned());
            }
        }
        EventKind::Void => key.voids += 1,
        EventKind::Restore => key.voids -= 1,
    }
    key.updated_at_ms = key.updated_at_ms.max(event.at_ms);
    *key != before
}

/// Records the order (and its user) that took the key, unless a later take is already
/// applied; the audit trail keeps earlier ones.
fn take_for_order(key: &mut KeyStatus, event: &LedgerEvent) {
    let Some(order) = non_empty(&event.order_id) else {
        return;
    };
    if let Some(entry) = later_entry(event, key.order_entry.as_deref()) {
        key.order_id = Some(order);
        key.user_id = non_empty(&event.user_id);
        key.order_entry = Some(entry.to_owned());
    }
}

/// `event`'s stream entry id when the event comes after the one whose entry id is
/// `applied` (or there is none), i.e. when a "latest" field should follow it.
///
/// Writers commit a SKU's events in batches of their own, so the last event applied is not
/// always the last the engine made (two gateways' writers, or a batch taken over from a dead
/// one). The entry ids of a SKU's stream are the engine's order: `<ms>-<seq>`, increasing.
/// An id that does not read as one (none of the engine's) compares as later, so the event
/// applied last wins, as it did before entries were compared.
fn later_entry<'e>(event: &'e LedgerEvent, applied: Option<&str>) -> Option<&'e str> {
    let entry = entry_of(&event.event_id);
    match (StreamId::parse(entry), applied.and_then(StreamId::parse)) {
        (Some(this), Some(that)) if this < that => None,
        _ => Some(entry),
    }
}

/// The scripts write `''` for "none"; the ledger stores NULL.
fn non_empty(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(max_issues: i64, max_uses: i64) -> KeyStatus {
        KeyStatus {
            voids: 0,
            held: 0,
            sold: 0,
            uses: 0,
            max_issues,
            max_uses,
            order_id: None,
            user_id: None,
            order_entry: None,
            redeemer: None,
            redeemed_at_ms: None,
            redeem_entry: None,
            updated_at_ms: 0,
        }
    }

    fn event(kind: &str, at_ms: i64) -> LedgerEvent {
        LedgerEvent {
            event_id: format!("s/{at_ms}-0"),
            sku: "s".into(),
            kind: kind.into(),
            at_ms,
            key_local_ids: vec![1],
            order_id: Some("o-1".into()),
            user_id: Some("u-1".into()),
            redeemer: None,
            reason: None,
            late: false,
            fields_json: "{}".into(),
            gen: None,
        }
    }

    fn apply(key: &mut KeyStatus, e: &LedgerEvent) -> bool {
        apply_to_key(key, EventKind::parse(&e.kind), e)
    }

    #[test]
    fn state_follows_the_prelude() {
        use KeyState::*;
        // (void, held, sold, uses, max_issues, max_uses) -> state
        let cases = [
            ((false, 0, 0, 0, 1, 1), Available),
            ((false, 1, 0, 0, 1, 1), Held),
            ((false, 0, 1, 0, 1, 1), Claimed),
            ((false, 0, 1, 1, 1, 1), Redeemed),
            ((true, 0, 1, 1, 1, 1), Void),
            ((true, 0, 0, 0, 1, 1), Void),
            // Reusable: one of two issues taken is still available.
            ((false, 1, 0, 0, 2, 1), Available),
            ((false, 1, 1, 0, 2, 1), Claimed),
            ((false, 2, 0, 0, 2, 1), Held),
            // Redeemed wins over claimed once uses reach max_uses, even with issues left.
            ((false, 0, 1, 1, 2, 1), Redeemed),
            // Multi-use: one use of two leaves it claimed.
            ((false, 0, 1, 1, 1, 2), Claimed),
            ((false, 0, 1, 2, 1, 2), Redeemed),
            // Unsold keys are never redeemed, whatever `uses` says.
            ((false, 0, 0, 5, 1, 1), Available),
        ];
        for ((void, held, sold, uses, mi, mu), want) in cases {
            assert_eq!(
                key_state(void, held, sold, uses, mi, mu),
                want,
                "{:?}",
                (void, held, sold, uses, mi, mu)
            );
        }
    }

    #[test]
    fn state_names_round_trip() {
        use KeyState::*;
        for s in [Available, Held, Claimed, Redeemed, Void] {
            assert_eq!(KeyState::parse(s.as_str()), Some(s));
        }
        assert_eq!(KeyState::parse("sold"), None);
    }

    #[test]
    fn hold_then_confirm_sells_and_records_the_order() {
        let mut k = fresh(1, 1);
        assert!(apply(&mut k, &event("hold", 10)));
        assert_eq!((k.held, k.sold, k.state()), (1, 0, KeyState::Held));
        assert_eq!(k.order_id.as_deref(), Some("o-1"));
        assert_eq!(k.user_id.as_deref(), Some("u-1"));
        assert!(apply(&mut k, &event("confirm", 20)));
        assert_eq!((k.held, k.sold, k.state()), (0, 1, KeyState::Claimed));
        assert_eq!(k.updated_at_ms, 20);
    }

    #[test]
    fn late_confirm_sells_without_touching_holds() {
        let mut k = fresh(2, 1);
        apply(&mut k, &event("hold", 10));
        let mut late = event("confirm", 20);
        late.late = true;
        apply(&mut k, &late);
        assert_eq!((k.held, k.sold), (1, 1));
    }

    #[test]
    fn a_keys_events_land_on_the_same_state_in_any_order() {
        // What two writers committing their batches in either order can do.
        for ending in ["release", "expire", "confirm"] {
            let (hold, end) = (event("hold", 1), event(ending, 2));
            let mut in_order = fresh(1, 1);
            apply(&mut in_order, &hold);
            apply(&mut in_order, &end);
            let mut reversed = fresh(1, 1);
            apply(&mut reversed, &end);
            assert!(
                reversed.held_now() == 0,
                "a counter below zero reads as none held"
            );
            apply(&mut reversed, &hold);
            assert_eq!(
                (reversed.held, reversed.sold, reversed.state()),
                (in_order.held, in_order.sold, in_order.state()),
                "{ending}"
            );
        }
        let mut k = fresh(1, 1);
        apply(&mut k, &event("release", 1));
        assert_eq!(
            (k.held, k.held_now(), k.state()),
            (-1, 0, KeyState::Available)
        );
        let mut k = fresh(1, 1);
        apply(&mut k, &event("confirm", 1));
        assert_eq!((k.held_now(), k.sold, k.state()), (0, 1, KeyState::Claimed));
    }

    /// Every ordering of `items`.
    fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut out = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut tail in permutations(&rest) {
                tail.insert(0, first.clone());
                out.push(tail);
            }
        }
        out
    }

    #[test]
    fn the_latest_order_and_redeemer_follow_the_engines_order_whatever_commits_last() {
        // A key two orders take and two redeemers use. Entry ids 9-0 and 10-0 compare as
        // numbers, not as text.
        let take = |kind: &str, at: i64, order: &str| {
            let mut e = event(kind, at);
            e.order_id = Some(order.into());
            e.user_id = Some(format!("user-{order}"));
            e
        };
        let redeem = |at: i64, who: &str| {
            let mut e = event("redeem", at);
            e.order_id = None;
            e.redeemer = Some(who.into());
            e
        };
        let events = [
            take("hold", 8, "a"),
            take("claim", 9, "b"),
            take("confirm", 10, "a"),
            redeem(11, "first"),
            redeem(12, "second"),
        ];
        let mut in_order = fresh(2, 2);
        for e in &events {
            apply(&mut in_order, e);
        }
        assert_eq!(in_order.order_id.as_deref(), Some("a"));
        assert_eq!(in_order.user_id.as_deref(), Some("user-a"));
        assert_eq!(in_order.redeemer.as_deref(), Some("second"));
        assert_eq!(in_order.redeemed_at_ms, Some(12));
        assert_eq!((in_order.sold, in_order.uses), (2, 2));
        for order in permutations(&events) {
            let mut k = fresh(2, 2);
            for e in &order {
                apply(&mut k, e);
            }
            let entries: Vec<i64> = order.iter().map(|e| e.at_ms).collect();
            assert_eq!(k, in_order, "applied in the order {entries:?}");
        }
    }

    #[test]
    fn an_entry_id_that_is_not_the_engines_lets_the_last_event_applied_win() {
        let mut k = fresh(1, 1);
        let mut first = event("claim", 5);
        first.order_id = Some("first".into());
        apply(&mut k, &first);
        let mut odd = event("claim", 4);
        odd.event_id = "s/imported".into();
        odd.order_id = Some("odd".into());
        apply(&mut k, &odd);
        assert_eq!(k.order_id.as_deref(), Some("odd"));
        assert_eq!(k.order_entry.as_deref(), Some("imported"));
        apply(&mut k, &first);
        assert_eq!(
            k.order_id.as_deref(),
            Some("first"),
            "a stored id not read as one"
        );
    }

    #[test]
    fn redeem_counts_uses_and_records_the_redeemer() {
        let mut k = fresh(1, 2);
        apply(&mut k, &event("claim", 1));
        let mut r = event("redeem", 5);
        r.redeemer = Some("user-42".into());
        apply(&mut k, &r);
        assert_eq!((k.uses, k.state()), (1, KeyState::Claimed));
        assert_eq!(k.redeemer.as_deref(), Some("user-42"));
        assert_eq!(k.redeemed_at_ms, Some(5));
        apply(&mut k, &event("redeem", 6));
        assert_eq!((k.uses, k.state()), (2, KeyState::Redeemed));
    }

    #[test]
    fn void_and_restore_change_only_whether_it_is_void() {
        let mut k = fresh(1, 1);
        apply(&mut k, &event("claim", 1));
        assert!(apply(&mut k, &event("void", 2)));
        assert_eq!(k.state(), KeyState::Void);
        assert!(apply(&mut k, &event("restore", 3)));
        assert_eq!(k.state(), KeyState::Claimed);
        assert_eq!(k.sold, 1);
    }

    #[test]
    fn a_restore_applied_before_its_void_ends_restored() {
        let mut k = fresh(1, 1);
        apply(&mut k, &event("claim", 1));
        apply(&mut k, &event("restore", 3));
        assert_eq!(k.state(), KeyState::Claimed);
        apply(&mut k, &event("void", 2));
        assert_eq!(
            k.state(),
            KeyState::Claimed,
            "as the engine: voided, then restored"
        );
        apply(&mut k, &event("void", 4));
        assert_eq!(k.state(), KeyState::Void);
    }

    #[test]
    fn record_only_kinds_change_nothing() {
        for kind in ["add", "sku", "pool", "teleport"] {
            let mut k = fresh(1, 1);
            assert!(!apply(&mut k, &event(kind, 9)), "{kind}");
            assert_eq!(k, fresh(1, 1));
        }
        assert!(!EventKind::parse("teleport").changes_keys());
        // Known, so not logged as a kind this version does not understand.
        assert_eq!(EventKind::parse("pool"), EventKind::Pool);
        assert!(EventKind::parse("hold").changes_keys());
    }

    #[test]
    fn empty_identifiers_are_stored_as_none() {
        let mut k = fresh(1, 1);
        let mut e = event("claim", 1);
        e.user_id = Some(String::new());
        apply(&mut k, &e);
        assert_eq!(k.user_id, None);
        assert_eq!(k.order_id.as_deref(), Some("o-1"));
    }
}
