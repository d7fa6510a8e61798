//! What is known committed per SKU, in its current generation: the floor the group reports
//! and the runs this writer committed above it. [`super::EventWriter::wait_committed`]
//! waits on it.

use std::collections::{BTreeMap, VecDeque};

use tokio::sync::watch;

use super::reply::ReadReply;
use super::EventWriter;
use crate::clock::now_ms;
use crate::engine::stream_id::StreamId;
use crate::metrics as m;
use crate::metrics::{STREAM_BACKLOG, STREAM_OLDEST_AGE};

/// Commit runs remembered per SKU for waiters (see [`Settled`]); beyond, the oldest go and
/// their waiters fall back on the group's acknowledgement floor.
const MAX_RUNS: usize = 4096;
/// Lost generations of a SKU remembered for waiters (see [`Settled::lost`]).
const LOST_GENERATIONS: usize = 16;

impl EventWriter {
    /// Updates the backlog gauges and what is known settled from a read's report.
    pub(super) fn observe(&self, sku: &str, read: &ReadReply<'_>) {
        let backlog = read.pending.saturating_add(read.lag);
        let age_ms = read
            .floor
            .map_or(0, |floor| now_ms().saturating_sub(floor.ms));
        // A SKU past the label cap is published summed under `(other)` by the gauge sweep,
        // which sees all of them at once; here, after every pass, only SKUs of their own.
        if m::sku_labels().is_named(sku) {
            metrics::gauge!(STREAM_BACKLOG, "sku" => sku.to_owned()).set(backlog as f64);
            metrics::gauge!(STREAM_OLDEST_AGE, "sku" => sku.to_owned()).set(age_ms as f64 / 1000.0);
        }

        // A new generation: the engine lost the SKU's data (its stream too) and it was
        // rebuilt. What was known of the old stream says nothing of the new one.
        let settled = self.settled_of(sku);
        let mut lost_gen = None;
        settled.send_if_modified(|s| {
            if s.gen.as_deref() == Some(read.gen) {
                return false;
            }
            lost_gen = s.switch_to(read.gen);
            true
        });
        if let Some(gen) = lost_gen {
            self.inner.journal.mark_lost(sku, &gen);
        }

        // Everything below the oldest unsettled entry is settled; with none, everything
        // delivered so far (later entries get larger ids).
        let through = match read.floor {
            Some(floor) => floor.prev(),
            None => Some(read.last_delivered),
        };
        if let Some(through) = through {
            settled.send_if_modified(|s| s.advance(through));
            self.inner
                .journal
                .settled_through(sku, read.gen, (through.ms, through.seq));
        }
    }

    /// Records the entries of a committed batch for waiters. Entries delivered new form
    /// runs of consecutive stream entries (a `>` read hands out the next entries in order),
    /// split only by poison; entries read again or taken over are not consecutive and count
    /// one by one.
    pub(super) fn note_committed(
        &self,
        sku: &str,
        read: &ReadReply<'_>,
        committed: &[(usize, StreamId, String)],
    ) {
        let first_new = read.own + read.claimed;
        let mut runs: Vec<(StreamId, StreamId)> = Vec::new();
        let mut previous: Option<usize> = None;
        for (at, id, _) in committed {
            let extends =
                *at >= first_new && previous.is_some_and(|p| p >= first_new && p + 1 == *at);
            match runs.last_mut() {
                Some(run) if extends => run.1 = *id,
                _ => runs.push((*id, *id)),
            }
            previous = Some(*at);
        }
        self.settled_of(sku).send_if_modified(|s| {
            // Runs name entries of the generation read; if it changed meanwhile they
            // belong to a stream nobody waits on any more.
            if s.gen.as_deref() != Some(read.gen) {
                return false;
            }
            for (first, last) in runs {
                s.add(first, last);
            }
            true
        });
        self.inner.journal.committed(
            sku,
            read.gen,
            committed.iter().map(|(_, id, _)| (id.ms, id.seq)),
        );
    }

    /// Whether an answer waits for a commit of `sku` now ([`EventWriter::wait_committed`]).
    pub(super) fn awaited(&self, sku: &str) -> bool {
        self.inner
            .settled
            .get(sku)
            .is_some_and(|tx| tx.receiver_count() > 0)
    }

    /// The settled state of `sku`, created on first use (a waiter may come before a commit).
    pub(super) fn settled_of(&self, sku: &str) -> watch::Sender<Settled> {
        if let Some(tx) = self.inner.settled.get(sku) {
            return tx.clone();
        }
        self.inner
            .settled
            .entry(sku.to_owned())
            .or_insert_with(|| watch::channel(Settled::default()).0)
            .clone()
    }
}

/// What is known to be committed for one SKU, in its current generation.
#[derive(Debug, Default)]
pub(super) struct Settled {
    /// The SKU's generation these ids belong to; `None` until the first read.
    gen: Option<String>,
    /// Generations the engine lost: their entries are never settled by this writer.
    lost: VecDeque<String>,
    /// Every entry at or below this id was acknowledged by the group (committed by some
    /// writer, or dead-lettered).
    through: Option<StreamId>,
    /// Runs of entries this writer committed above `through`, first → last. A run holds only
    /// committed entries (see [`EventWriter::note_committed`]).
    runs: BTreeMap<StreamId, StreamId>,
}

impl Settled {
    pub(super) fn covers(&self, gen: &str, id: StreamId) -> bool {
        if self.gen.as_deref() != Some(gen) {
            return false;
        }
        self.through.is_some_and(|t| id <= t)
            || self
                .runs
                .range(..=id)
                .next_back()
                .is_some_and(|(_, last)| id <= *last)
    }

    /// `<gen>:<ms>-<seq>` of the floor: everything at or below it is committed.
    pub(super) fn through_answer(&self) -> Option<String> {
        let gen = self.gen.as_deref()?;
        let t = self.through?;
        Some(format!("{gen}:{}-{}", t.ms, t.seq))
    }

    pub(super) fn is_lost(&self, gen: &str) -> bool {
        self.lost.iter().any(|g| g == gen)
    }

    /// Starts over for generation `gen`; returns the generation that was lost, if any.
    fn switch_to(&mut self, gen: &str) -> Option<String> {
        let old = self.gen.replace(gen.to_owned());
        self.through = None;
        self.runs.clear();
        self.lost.retain(|g| g != gen);
        let old = old?;
        self.lost.push_back(old.clone());
        if self.lost.len() > LOST_GENERATIONS {
            self.lost.pop_front();
        }
        Some(old)
    }

    /// Raises `through`; returns whether it moved (waiters are woken only then).
    fn advance(&mut self, through: StreamId) -> bool {
        if self.through.is_some_and(|t| t >= through) {
            return false;
        }
        self.through = Some(through);
        self.runs.retain(|_, last| *last > through);
        true
    }

    fn add(&mut self, first: StreamId, last: StreamId) {
        if self.through.is_some_and(|t| last <= t) {
            return;
        }
        self.runs.insert(first, last);
        if self.runs.len() > MAX_RUNS {
            self.runs.pop_first();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> StreamId {
        StreamId::parse(text).expect("an id")
    }

    #[test]
    fn settled_covers_the_floor_and_runs_committed_here() {
        let mut s = Settled::default();
        assert_eq!(s.switch_to("g"), None);
        assert!(!s.covers("g", id("1-0")));
        s.add(id("5-0"), id("7-0"));
        s.add(id("9-1"), id("9-1"));
        assert!(s.covers("g", id("6-3")) && s.covers("g", id("9-1")));
        assert!(
            !s.covers("g", id("8-0")) && !s.covers("g", id("9-2")) && !s.covers("g", id("4-0"))
        );
        assert!(s.advance(id("8-0")));
        assert!(!s.advance(id("3-0")), "the floor never goes back");
        assert!(s.covers("g", id("4-0")) && s.covers("g", id("8-0")) && s.covers("g", id("9-1")));
        assert_eq!(s.runs.len(), 1, "runs below the floor are forgotten");
        assert!(
            !s.covers("other", id("4-0")),
            "ids compare only within a generation"
        );
    }

    #[test]
    fn a_lost_generation_is_never_covered_by_the_next_one() {
        let mut s = Settled::default();
        s.switch_to("old");
        s.advance(id("10-0"));
        assert_eq!(s.switch_to("new").as_deref(), Some("old"));
        s.advance(id("99-0"));
        assert!(
            !s.covers("old", id("20-0")),
            "the new stream's floor passes old ids"
        );
        assert!(s.is_lost("old") && !s.is_lost("new"));
    }
}
