//! The answer journal: what this gateway answered, kept until the ledger has it.
//!
//! With `durability = "engine"` a change is answered as soon as its script ran; its event
//! reaches the ledger moments later through the SKU's stream. If the engine loses its data
//! in between (Redis restarted without persistence, FLUSHALL, a failover to a replica that
//! missed writes), the stream entry is gone with it, and a rebuild from the ledger would put
//! the answered codes back on sale. So every answered change is also kept here, in the
//! memory of the gateway that answered it (a replay of a change an earlier call made too,
//! while the stream still holds it), until the writer sees it settled; when the SKU
//! is found lost, whatever is still here is written into the ledger *before* the engine is
//! rebuilt from it ([`Journal::take_lost`]). Only losing the engine's data and the
//! answering gateway at the same time loses an answer.
//!
//! Entries are named by the SKU's generation in the engine (`<gen>:<stream id>`, see
//! `emit` in `lua/prelude.lua`). Once a generation is known lost, a reply of that
//! generation arriving late (its script ran before the loss) is refused
//! ([`Kept::Lost`]): the change is not in the rebuilt engine, so it must not be answered
//! as made.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::stream::event_from_entry;
use super::LedgerEvent;

/// Lost generations remembered per SKU (a loss is rare; a few cover any realistic run).
const LOST_GENERATIONS: usize = 16;

/// What [`Journal::keep`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Kept until the ledger has it: the change may be answered.
    Kept,
    /// The change belongs to a generation of the SKU the engine lost: do not answer it as
    /// made (the client retries, and the rebuilt engine answers).
    Lost,
    /// The journal holds its maximum: the ledger is far behind; do not answer.
    Full,
}

/// Answered changes not yet known to be in the ledger, per SKU.
#[derive(Debug)]
pub struct Journal {
    skus: Mutex<HashMap<String, SkuJournal>>,
    len: AtomicUsize,
    max_events: usize,
}

#[derive(Debug, Default)]
struct SkuJournal {
    /// Entries by generation, then by stream id: the stream id and fields as the script
    /// reported them (a new claim's as the gateway rebuilt them from its short report, the
    /// same bytes: see `ClaimEvent` in `src/inventory/mod.rs`). Turned into ledger events only when lost ([`Journal::take_lost`]):
    /// keeping one is on every answer's path, writing one almost never is.
    by_gen: HashMap<String, BTreeMap<(u64, u64), Entry>>,
    lost: VecDeque<String>,
}

#[derive(Debug)]
struct Entry {
    stream_id: String,
    fields: Vec<(String, String)>,
}

impl Journal {
    /// A journal holding at most `max_events` events across SKUs.
    pub fn new(max_events: usize) -> Journal {
        Journal {
            skus: Mutex::new(HashMap::new()),
            len: AtomicUsize::new(0),
            max_events,
        }
    }

    /// Events held, across SKUs.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SkuJournal>> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the process would.
        self.skus.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the change answered as `answer_id` (`<gen>:<stream id>`) with its stream
    /// fields, unless its generation is known lost.
    pub fn keep(&self, sku: &str, answer_id: &str, fields: &[(String, String)]) -> Kept {
        let Some((gen, id)) = split_answer_id(answer_id) else {
            return Kept::Kept;
        };
        let mut skus = self.lock();
        let journal = skus.entry(sku.to_owned()).or_default();
        if journal.lost.iter().any(|g| g == gen) {
            return Kept::Lost;
        }
        if self.len() >= self.max_events {
            return Kept::Full;
        }
        let stream_id = answer_id.rsplit_once(':').map_or(answer_id, |(_, s)| s);
        let event = Entry {
            stream_id: stream_id.to_owned(),
            fields: fields.to_vec(),
        };
        if journal
            .by_gen
            .entry(gen.to_owned())
            .or_default()
            .insert(id, event)
            .is_none()
        {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        Kept::Kept
    }

    /// Forgets what the writer saw settled: `gen`'s entries up to `through` (inclusive).
    pub fn settled_through(&self, sku: &str, gen: &str, through: (u64, u64)) {
        let mut skus = self.lock();
        let Some(entries) = skus.get_mut(sku).and_then(|j| j.by_gen.get_mut(gen)) else {
            return;
        };
        let kept = entries.split_off(&next(through));
        let dropped = std::mem::replace(entries, kept).len();
        self.len.fetch_sub(dropped, Ordering::Relaxed);
    }

    /// Forgets single entries the writer committed.
    pub fn committed(&self, sku: &str, gen: &str, ids: impl Iterator<Item = (u64, u64)>) {
        let mut skus = self.lock();
        let Some(entries) = skus.get_mut(sku).and_then(|j| j.by_gen.get_mut(gen)) else {
            return;
        };
        for id in ids {
            if entries.remove(&id).is_some() {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Marks every generation of `sku` other than `current` (all of them when the engine
    /// lacks the SKU) as lost, and hands over their events, oldest first, for the ledger.
    /// On a failed write, give them back with [`Journal::restore`].
    pub fn take_lost(&self, sku: &str, current: Option<&str>) -> Vec<LedgerEvent> {
        let mut skus = self.lock();
        let Some(journal) = skus.get_mut(sku) else {
            return Vec::new();
        };
        let lost: Vec<String> = journal
            .by_gen
            .keys()
            .filter(|g| Some(g.as_str()) != current)
            .cloned()
            .collect();
        let mut events = Vec::new();
        for gen in lost {
            if let Some(entries) = journal.by_gen.remove(&gen) {
                self.len.fetch_sub(entries.len(), Ordering::Relaxed);
                // A script's own entry always parses; one that did not could not reach the
                // ledger through the stream either.
                events.extend(entries.into_values().filter_map(|e| {
                    let mut event = event_from_entry(sku, &e.stream_id, &e.fields).ok()?;
                    // Not the placeholder of events of no known generation (`restore`).
                    event.gen = (!gen.starts_with('\u{0}')).then(|| gen.clone());
                    Some(event)
                }));
            }
            journal.mark_lost(gen);
        }
        events
    }

    /// Marks a generation of `sku` as lost (the writer saw the engine's generation change),
    /// keeping its events for [`Journal::take_lost`].
    pub fn mark_lost(&self, sku: &str, gen: &str) {
        self.lock()
            .entry(sku.to_owned())
            .or_default()
            .mark_lost(gen.to_owned());
    }

    /// Whether `sku` holds events of generations other than `current`.
    pub fn has_lost(&self, sku: &str, current: Option<&str>) -> bool {
        self.lock().get(sku).is_some_and(|j| {
            j.by_gen
                .iter()
                .any(|(g, e)| !e.is_empty() && Some(g.as_str()) != current)
        })
    }

    /// Gives back events [`Journal::take_lost`] handed over whose write failed.
    pub fn restore(&self, sku: &str, events: Vec<LedgerEvent>) {
        let mut skus = self.lock();
        let journal = skus.entry(sku.to_owned()).or_default();
        for event in events {
            // Under their own generation, which is lost (`take_lost` named it); else under a
            // name no live generation has.
            let gen = event.gen.clone().unwrap_or_else(|| "\u{0}lost".to_owned());
            let entries = journal.by_gen.entry(gen).or_default();
            let stream_id = event
                .event_id
                .rsplit_once('/')
                .map_or("", |(_, s)| s)
                .to_owned();
            let id = parse_stream_id(&stream_id).unwrap_or((0, 0));
            let fields = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(
                &event.fields_json,
            )
            .map(|m| {
                m.into_iter()
                    .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
            if entries.insert(id, Entry { stream_id, fields }).is_none() {
                self.len.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl SkuJournal {
    fn mark_lost(&mut self, gen: String) {
        if !self.lost.contains(&gen) {
            self.lost.push_back(gen);
            if self.lost.len() > LOST_GENERATIONS {
                self.lost.pop_front();
            }
        }
    }
}

/// `<gen>:<ms>-<seq>` → (gen, (ms, seq)).
pub fn split_answer_id(answer_id: &str) -> Option<(&str, (u64, u64))> {
    let (gen, stream_id) = answer_id.rsplit_once(':').unwrap_or(("", answer_id));
    Some((gen, parse_stream_id(stream_id)?))
}

fn parse_stream_id(text: &str) -> Option<(u64, u64)> {
    let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn next((ms, seq): (u64, u64)) -> (u64, u64) {
    match seq.checked_add(1) {
        Some(seq) => (ms, seq),
        None => (ms.saturating_add(1), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(kind: &str) -> Vec<(String, String)> {
        vec![
            ("t".into(), kind.into()),
            ("at".into(), "5".into()),
            ("ids".into(), "1".into()),
        ]
    }

    #[test]
    fn settled_entries_are_forgotten_and_lost_generations_handed_over() {
        let j = Journal::new(100);
        assert_eq!(j.keep("s", "g1:10-0", &fields("claim")), Kept::Kept);
        assert_eq!(j.keep("s", "g1:11-0", &fields("claim")), Kept::Kept);
        assert_eq!(j.keep("s", "g1:12-3", &fields("claim")), Kept::Kept);
        assert_eq!(j.len(), 3);
        j.settled_through("s", "g1", (11, 0));
        assert_eq!(j.len(), 1);
        assert!(!j.has_lost("s", Some("g1")));
        assert!(j.has_lost("s", Some("g2")));
        let lost = j.take_lost("s", Some("g2"));
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].event_id, "s/12-3");
        assert_eq!(j.len(), 0);
        assert_eq!(
            j.keep("s", "g1:13-0", &fields("claim")),
            Kept::Lost,
            "a late reply of a lost generation is never answered"
        );
        assert_eq!(j.keep("s", "g2:14-0", &fields("claim")), Kept::Kept);
        j.restore("s", lost);
        assert_eq!(j.len(), 2);
        assert_eq!(j.take_lost("s", Some("g2")).len(), 1);
    }

    #[test]
    fn a_full_journal_refuses() {
        let j = Journal::new(1);
        assert_eq!(j.keep("s", "g:1-0", &fields("claim")), Kept::Kept);
        assert_eq!(j.keep("s", "g:2-0", &fields("claim")), Kept::Full);
        j.committed("s", "g", [(1, 0)].into_iter());
        assert!(j.is_empty());
    }
}
