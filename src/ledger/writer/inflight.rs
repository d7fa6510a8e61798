//! What this writer holds read from a SKU's stream and not yet committed: the batch of a pass
//! under way, a batch read ahead for the next pass, and a batch whose commit failed. A
//! rebuild from the ledger waits for it ([`EventWriter::commit_what_was_read`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::EventWriter;

/// Passes per SKU, begun and ended, and what the last one left held.
#[derive(Default)]
pub(super) struct InFlight {
    marks: Mutex<HashMap<String, Mark>>,
    ended: Notify,
}

#[derive(Default, Clone, Copy)]
struct Mark {
    begun: u64,
    ended: u64,
    held: Held,
}

/// What a pass leaves held, read and not committed, for the next pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    #[default]
    Nothing,
    /// A batch read ahead: the next pass commits it, or drops it if its own commit fails.
    Ahead,
    /// A batch whose commit failed, kept to be committed again: it may hold anything read
    /// before, until a pass ends without one.
    Failed,
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

    fn end(&self, sku: &str, held: Held) {
        if let Some(mark) = self
            .marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(sku)
        {
            mark.ended += 1;
            mark.held = held;
        }
        self.ended.notify_waiters();
    }

    /// The passes begun so far, if this writer holds anything of `sku` read and not yet
    /// committed (a pass under way, a batch read ahead, a failed batch).
    fn holding(&self, sku: &str) -> Option<u64> {
        let marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let mark = marks.get(sku)?;
        (mark.begun > mark.ended || mark.held != Held::Nothing).then_some(mark.begun)
    }

    /// Whether what was held when `begun` passes had begun is committed or dropped: those
    /// passes ended leaving nothing held, or the pass after them (which takes a batch read
    /// ahead) ended too, without keeping a failed batch.
    fn released(&self, sku: &str, begun: u64) -> bool {
        let marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        marks.get(sku).is_none_or(|m| match m.held {
            Held::Nothing => m.ended >= begun,
            Held::Ahead => m.ended > begun,
            Held::Failed => false,
        })
    }
}

/// A pass under way ([`InFlight::begin`]).
pub(super) struct PassMark<'a> {
    in_flight: &'a InFlight,
    sku: &'a str,
    done: bool,
}

impl PassMark<'_> {
    /// The pass ended, leaving `held` for the next.
    pub(super) fn end(mut self, held: Held) {
        self.done = true;
        self.in_flight.end(self.sku, held);
    }
}

impl Drop for PassMark<'_> {
    fn drop(&mut self) {
        // A pass cut off (the writer stopping) keeps nothing of what it read.
        if !self.done {
            self.in_flight.end(self.sku, Held::Nothing);
        }
    }
}

impl EventWriter {
    /// Waits until everything this writer had read of `sku`'s stream when called is
    /// committed, or dropped because the ledger rejected it (then it is read again from the
    /// stream, or was lost with it). A batch whose commit failed while the ledger was away is
    /// kept and committed again, and waited for. False if that takes longer than `within`.
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
        pass.end(Held::Ahead);
        assert!(
            !in_flight.released("s", begun),
            "its read ahead is not committed yet"
        );
        assert_eq!(
            in_flight.holding("s"),
            Some(begun),
            "the read ahead is held"
        );

        in_flight.begin("s").end(Held::Nothing);
        assert!(in_flight.released("s", begun), "the next pass committed it");
        assert_eq!(in_flight.holding("s"), None);

        // Cut off: nothing of it is kept.
        drop(in_flight.begin("s"));
        assert_eq!(in_flight.holding("s"), None);
        assert_eq!(in_flight.holding("other"), None, "per SKU");
    }

    #[test]
    fn a_failed_batch_is_held_until_a_pass_ends_without_one() {
        let in_flight = InFlight::default();
        in_flight.begin("s").end(Held::Ahead);
        let begun = in_flight.holding("s").expect("the read ahead is held");
        // The pass taking the read ahead fails to commit it, and so do the next ones.
        in_flight.begin("s").end(Held::Failed);
        assert!(!in_flight.released("s", begun), "kept, not committed");
        in_flight.begin("s").end(Held::Failed);
        assert!(!in_flight.released("s", begun), "failed again");
        assert!(in_flight.holding("s").is_some());
        // Committed at last, with a new read ahead beside it.
        in_flight.begin("s").end(Held::Ahead);
        assert!(in_flight.released("s", begun));
    }
}
