//! What this writer holds read from a SKU's stream and not yet committed: the batch of a pass
//! under way, and a batch read ahead for the next pass. A rebuild from the ledger waits for
//! it ([`EventWriter::commit_what_was_read`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::EventWriter;

/// Passes per SKU, begun and ended, and whether the last one left a batch read ahead.
#[derive(Default)]
pub(super) struct InFlight {
    marks: Mutex<HashMap<String, Mark>>,
    ended: Notify,
}

#[derive(Default, Clone, Copy)]
struct Mark {
    begun: u64,
    ended: u64,
    ahead: bool,
}

impl InFlight {
    /// A pass over `sku` begins; it ends when the returned guard is ended or dropped.
    pub(super) fn begin<'a>(&'a self, sku: &'a str) -> PassMark<'a> {
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        // Every pass comes here: no allocation but a SKU's first.
        match marks.get_mut(sku) {
            Some(mark) => mark.begun += 1,
            None => {
                marks.insert(
                    sku.to_owned(),
                    Mark {
                        begun: 1,
                        ..Mark::default()
                    },
                );
            }
        }
        drop(marks);
        PassMark {
            in_flight: self,
            sku,
            done: false,
        }
    }

    fn end(&self, sku: &str, ahead: bool) {
        if let Some(mark) = self
            .marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(sku)
        {
            mark.ended += 1;
            mark.ahead = ahead;
        }
        self.ended.notify_waiters();
    }

    /// The passes begun so far, if this writer holds anything of `sku` read and not yet
    /// committed (a pass under way, or a batch read ahead).
    fn holding(&self, sku: &str) -> Option<u64> {
        let marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let mark = marks.get(sku)?;
        (mark.begun > mark.ended || mark.ahead).then_some(mark.begun)
    }

    /// Whether what was held when `begun` passes had begun is committed or dropped: those
    /// passes ended without leaving a batch read ahead, or the pass after them (which takes
    /// that batch) ended too.
    fn released(&self, sku: &str, begun: u64) -> bool {
        let marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        marks
            .get(sku)
            .is_none_or(|m| m.ended > begun || (m.ended == begun && !m.ahead))
    }
}

/// A pass under way ([`InFlight::begin`]).
pub(super) struct PassMark<'a> {
    in_flight: &'a InFlight,
    sku: &'a str,
    done: bool,
}

impl PassMark<'_> {
    /// The pass ended, leaving a batch read ahead or not.
    pub(super) fn end(mut self, ahead: bool) {
        self.done = true;
        self.in_flight.end(self.sku, ahead);
    }
}

impl Drop for PassMark<'_> {
    fn drop(&mut self) {
        // A pass cut off (the writer stopping) keeps nothing of what it read.
        if !self.done {
            self.in_flight.end(self.sku, false);
        }
    }
}

impl EventWriter {
    /// Waits until everything this writer had read of `sku`'s stream when called is
    /// committed, or its commit failed (then nothing of it is kept: it is read again from
    /// the stream, or was lost with it). False if that takes longer than `within`.
    ///
    /// A rebuild of a SKU that lost its data reads the ledger only once every gateway has
    /// called this: a change nobody was answered yet (its answer waiting for the ledger) may
    /// have been read from the lost stream, its commit under way, and committed after the
    /// rebuild read the ledger it would be in the ledger and not in the engine (a pool's
    /// level, which events move by deltas, would differ between the two for good).
    pub async fn commit_what_was_read(&self, sku: &str, within: Duration) -> bool {
        let in_flight = &self.inner.in_flight;
        let Some(begun) = in_flight.holding(sku) else {
            return true;
        };
        let deadline = Instant::now() + within;
        loop {
            let ended = in_flight.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if in_flight.released(sku, begun) {
                return true;
            }
            // A batch read ahead is committed by the next pass: not after a linger.
            self.inner.wake.notify_one();
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return in_flight.released(sku, begun);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_pass_read_is_released_when_it_ends_or_when_the_next_takes_its_read_ahead() {
        let in_flight = InFlight::default();
        assert_eq!(in_flight.holding("s"), None, "nothing read yet");

        let pass = in_flight.begin("s");
        let begun = in_flight
            .holding("s")
            .expect("a pass under way holds its batch");
        assert!(!in_flight.released("s", begun));
        pass.end(true);
        assert!(
            !in_flight.released("s", begun),
            "its read ahead is not committed yet"
        );
        assert_eq!(
            in_flight.holding("s"),
            Some(begun),
            "the read ahead is held"
        );

        in_flight.begin("s").end(false);
        assert!(in_flight.released("s", begun), "the next pass committed it");
        assert_eq!(in_flight.holding("s"), None);

        // Cut off: nothing of it is kept.
        drop(in_flight.begin("s"));
        assert_eq!(in_flight.holding("s"), None);
        assert_eq!(in_flight.holding("other"), None, "per SKU");
    }
}
