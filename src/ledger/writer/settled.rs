//! What is known committed per SKU, in its current generation: the floor the group reports
//! and the runs this writer committed above it. [`super::EventWriter::wait_committed`]
//! waits on it, each answer for its own entry: a commit wakes the answers it settles and
//! no other (a channel every waiter watched woke them all at every commit and read, several
//! times an answer under load).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

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
        if let Some(gen) = settled.switch_to(read.gen) {
            self.inner.journal.mark_lost(sku, &gen);
        }

        // Everything below the oldest unsettled entry is settled; with none, everything
        // delivered so far (later entries get larger ids).
        let through = match read.floor {
            Some(floor) => floor.prev(),
            None => Some(read.last_delivered),
        };
        if let Some(through) = through {
            settled.advance(through);
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
        self.settled_of(sku).add(read.gen, &runs);
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
            .is_some_and(|s| s.waiting.load(Ordering::Relaxed) > 0)
    }

    /// The settled state of `sku`, created on first use (a waiter may come before a commit).
    pub(super) fn settled_of(&self, sku: &str) -> Arc<Watched> {
        if let Some(s) = self.inner.settled.get(sku) {
            return s.clone();
        }
        self.inner
            .settled
            .entry(sku.to_owned())
            .or_default()
            .clone()
    }
}

/// One SKU's [`Settled`] and the answers waiting for entries of it, each told once its
/// entry is settled (`true`) or its generation lost (`false`).
#[derive(Debug, Default)]
pub(super) struct Watched {
    inner: Mutex<Waiting>,
    /// How many answers wait, readable without the lock (the writer's loop asks often).
    waiting: AtomicUsize,
}

#[derive(Debug, Default)]
struct Waiting {
    settled: Settled,
    /// Answers waiting for entries of the current generation, by entry (and arrival: two
    /// answers may wait for one entry).
    current: BTreeMap<(StreamId, u64), oneshot::Sender<bool>>,
    /// Answers waiting for entries of a generation this writer has not read yet.
    other: Vec<(String, StreamId, oneshot::Sender<bool>)>,
    arrivals: u64,
}

/// Waiters kept before those that gave up (timed out) are looked for and dropped.
const WAITERS_BEFORE_PRUNING: usize = 64;

impl Watched {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether entry `id` of generation `gen` is known settled: `Ok` at once (`false` for a
    /// lost generation), or else a receiver told when it is.
    pub(super) fn wait(&self, gen: &str, id: StreamId) -> Result<bool, oneshot::Receiver<bool>> {
        let mut w = self.lock();
        if w.settled.covers(gen, id) {
            return Ok(true);
        }
        if w.settled.is_lost(gen) {
            return Ok(false);
        }
        let (done, told) = oneshot::channel();
        if w.current.len() + w.other.len() >= WAITERS_BEFORE_PRUNING {
            w.current.retain(|_, done| !done.is_closed());
            w.other.retain(|(_, _, done)| !done.is_closed());
        }
        if w.settled.gen.as_deref() == Some(gen) {
            w.arrivals += 1;
            let arrival = w.arrivals;
            w.current.insert((id, arrival), done);
        } else {
            w.other.push((gen.to_owned(), id, done));
        }
        self.count(&w);
        Err(told)
    }

    /// See [`Settled::switch_to`]. Answers waiting for the lost generation are told so, and
    /// those waiting for the new one are kept by entry.
    fn switch_to(&self, gen: &str) -> Option<String> {
        let mut w = self.lock();
        if w.settled.gen.as_deref() == Some(gen) {
            return None;
        }
        let lost = w.settled.switch_to(gen);
        for (_, done) in std::mem::take(&mut w.current) {
            let _ = done.send(false);
        }
        let Waiting {
            settled,
            current,
            other,
            arrivals,
        } = &mut *w;
        for (waited, id, done) in std::mem::take(other) {
            if waited == gen {
                *arrivals += 1;
                current.insert((id, *arrivals), done);
            } else if settled.is_lost(&waited) {
                let _ = done.send(false);
            } else {
                other.push((waited, id, done));
            }
        }
        self.count(&w);
        lost
    }

    /// See [`Settled::advance`]; answers waiting for entries at or below `through` go.
    fn advance(&self, through: StreamId) {
        let mut w = self.lock();
        if !w.settled.advance(through) {
            return;
        }
        while let Some(entry) = w.current.first_entry() {
            if entry.key().0 > through {
                break;
            }
            let _ = entry.remove().send(true);
        }
        self.count(&w);
    }

    /// Records runs this writer committed of generation `gen` (see [`Settled::add`]);
    /// answers waiting for entries in them go. Runs of a generation no longer current
    /// belong to a stream nobody waits on any more.
    fn add(&self, gen: &str, runs: &[(StreamId, StreamId)]) {
        let mut w = self.lock();
        if w.settled.gen.as_deref() != Some(gen) {
            return;
        }
        for &(first, last) in runs {
            w.settled.add(first, last);
            let settled: Vec<(StreamId, u64)> = w
                .current
                .range((first, 0)..=(last, u64::MAX))
                .map(|(key, _)| *key)
                .collect();
            for key in settled {
                if let Some(done) = w.current.remove(&key) {
                    let _ = done.send(true);
                }
            }
        }
        self.count(&w);
    }

    /// `<gen>:<ms>-<seq>` of the floor (see [`Settled::through_answer`]).
    pub(super) fn through_answer(&self) -> Option<String> {
        self.lock().settled.through_answer()
    }

    fn count(&self, w: &Waiting) {
        self.waiting
            .store(w.current.len() + w.other.len(), Ordering::Relaxed);
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

    /// A waiter's answer, if it has one yet.
    fn told(rx: &mut oneshot::Receiver<bool>) -> Option<bool> {
        rx.try_recv().ok()
    }

    #[test]
    fn each_waiter_is_told_when_its_own_entry_settles() {
        let w = Watched::default();
        w.switch_to("g");
        let mut low = w.wait("g", id("5-0")).expect_err("waits");
        let mut high = w.wait("g", id("9-0")).expect_err("waits");
        let mut same = w.wait("g", id("9-0")).expect_err("two wait for one entry");
        assert_eq!(w.waiting.load(Ordering::Relaxed), 3);
        w.add("g", &[(id("8-0"), id("9-0"))]);
        assert_eq!((told(&mut high), told(&mut same)), (Some(true), Some(true)));
        assert_eq!(told(&mut low), None, "a commit wakes only what it settles");
        w.advance(id("4-9"));
        assert_eq!(told(&mut low), None);
        w.advance(id("5-0"));
        assert_eq!(told(&mut low), Some(true));
        assert_eq!(w.waiting.load(Ordering::Relaxed), 0);
        assert!(
            matches!(w.wait("g", id("9-0")), Ok(true)),
            "settled already"
        );
        w.add("other", &[(id("20-0"), id("20-0"))]);
        assert!(
            w.wait("g", id("20-0")).is_err(),
            "a run of another generation"
        );
    }

    #[test]
    fn waiters_of_a_lost_generation_are_told_it_is_lost() {
        let w = Watched::default();
        let mut early = w.wait("g", id("3-0")).expect_err("before the first read");
        w.switch_to("g");
        let mut old = w.wait("g", id("7-0")).expect_err("waits");
        let mut next = w
            .wait("h", id("1-0"))
            .expect_err("a generation not read yet");
        w.advance(id("3-0"));
        assert_eq!(
            told(&mut early),
            Some(true),
            "kept by entry once its generation came"
        );
        assert_eq!(w.switch_to("h").as_deref(), Some("g"));
        assert_eq!(told(&mut old), Some(false));
        assert_eq!(told(&mut next), None);
        assert!(matches!(w.wait("g", id("8-0")), Ok(false)), "lost already");
        w.advance(id("1-0"));
        assert_eq!(told(&mut next), Some(true));
    }

    #[test]
    fn waiters_that_gave_up_are_dropped() {
        let w = Watched::default();
        w.switch_to("g");
        for n in 0..WAITERS_BEFORE_PRUNING as u64 {
            drop(w.wait("g", StreamId { ms: n + 1, seq: 0 }));
        }
        let mut kept = w.wait("g", id("1000-0")).expect_err("waits");
        assert_eq!(
            w.waiting.load(Ordering::Relaxed),
            1,
            "only the one still waiting"
        );
        w.advance(id("1000-0"));
        assert_eq!(told(&mut kept), Some(true));
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
