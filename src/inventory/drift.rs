//! Drift: how far the engine and the ledger disagree about a SKU.
//!
//! Both count keys by state. Events still on their way to the ledger explain part of any
//! difference; what they cannot explain is drift, and drift that stays above zero means a
//! change was lost or a store was altered behind kamigate's back (alerts fire on it).

use serde::Serialize;

use super::Counts;
use crate::ledger::StateCounts;

/// The comparison of one SKU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// Keys whose state differs, as far as the per-state totals show (a lower bound: two
    /// opposite differences cancel out; `reconcile` compares key by key).
    pub differing: u64,
    /// Events written by the engine and not yet committed to the ledger.
    pub in_flight: u64,
    /// Differences the events in flight cannot explain: each is allowed for the keys it
    /// changes (a claim of 20 codes in flight explains 20 differing keys, not one).
    pub keys: u64,
}

impl Drift {
    /// Compares engine and ledger counts, allowing for `in_flight` events that change
    /// `in_flight_keys` keys.
    pub fn between(
        engine: &Counts,
        ledger: &StateCounts,
        in_flight: u64,
        in_flight_keys: u64,
    ) -> Drift {
        let pairs = [
            (engine.available, ledger.available),
            (engine.held, ledger.held),
            (engine.claimed, ledger.claimed),
            (engine.redeemed, ledger.redeemed),
            (engine.void, ledger.void),
        ];
        // A key in another state is extra in one count and missing from another; a key only
        // one side has is extra (or missing) once. Either way the larger side counts it.
        let extra: u64 = pairs.iter().map(|(e, l)| e.saturating_sub(*l)).sum();
        let missing: u64 = pairs.iter().map(|(e, l)| l.saturating_sub(*e)).sum();
        let differing = extra.max(missing);
        Drift {
            differing,
            in_flight,
            keys: differing.saturating_sub(in_flight_keys),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_not_yet_in_the_ledger_is_one_differing_key() {
        let engine = Counts {
            available: 9,
            claimed: 1,
            ..Counts::default()
        };
        let ledger = StateCounts {
            available: 10,
            ..StateCounts::default()
        };
        let settled = Drift::between(&engine, &ledger, 0, 0);
        assert_eq!((settled.differing, settled.keys), (1, 1));
        let in_flight = Drift::between(&engine, &ledger, 1, 1);
        assert_eq!(in_flight.keys, 0, "explained by the event in flight");
    }

    #[test]
    fn one_event_in_flight_explains_every_key_it_changes() {
        let engine = Counts {
            available: 80,
            claimed: 20,
            ..Counts::default()
        };
        let ledger = StateCounts {
            available: 100,
            ..StateCounts::default()
        };
        let drift = Drift::between(&engine, &ledger, 1, 20);
        assert_eq!((drift.in_flight, drift.keys), (1, 0));
    }

    #[test]
    fn keys_missing_from_the_engine_count_as_drift() {
        let engine = Counts::default();
        let ledger = StateCounts {
            available: 3,
            ..StateCounts::default()
        };
        assert_eq!(Drift::between(&engine, &ledger, 0, 0).keys, 3);
    }
}
