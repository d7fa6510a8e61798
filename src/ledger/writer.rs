//! The event writer: brings every SKU's event stream into the ledger.
//!
//! Every script that changes a SKU appends an event to the SKU's stream (`kg:{sku}:events`) in
//! the same atomic step, so the engine never changes without saying so. [`EventWriter`] reads
//! those streams through one consumer group shared by every gateway, turns entries into
//! [`LedgerEvent`](super::LedgerEvent)s ([`super::stream`]), commits them, and only then acknowledges them. The
//! stream side lives in `lua/stream.lua`; this module decides what happens when.
//!
//! # Exactly-once effect from at-least-once delivery
//!
//! Each pass over a SKU is: read a batch, commit it to the ledger in one
//! [`Ledger::apply_events`] call, acknowledge it, trim. The order is the whole argument:
//!
//! - An entry is acknowledged only after the transaction holding it committed. Whatever fails
//!   before (the ledger is down, the gateway crashes), the entry stays in the group's pending
//!   list and is read again: by this writer (its own pending entries come first on every read)
//!   or, if this writer died, by another one once the entry has been idle for
//!   [`WriterOptions::reclaim_idle_ms`] (`XAUTOCLAIM`). Nothing is lost.
//! - A crash between commit and acknowledgement delivers the entry a second time. The ledger
//!   records each `event_id` (`<sku>/<stream entry id>`) in the same transaction as its effect
//!   and ignores ids it already has, so the second delivery changes nothing. Nothing is doubled.
//! - The stream is trimmed only below what every group has delivered and acknowledged, so
//!   nothing is dropped before it was committed (see `lua/stream.lua`).
//!
//! At-least-once delivery plus idempotent apply is an exactly-once effect on the ledger.
//!
//! # Pipelined passes
//!
//! While a full batch commits (a backlog is waiting), the writer already reads the next one,
//! and that read carries the acknowledgement of the batch committed before: a SKU behind
//! costs one script call per commit, and a commit starts as soon as the previous one ends.
//! The read ahead leaves out this writer's own pending entries (the batch being committed is
//! among them, and would otherwise be read again); if the commit fails, the read ahead is
//! dropped, the failed batch is committed again (see "Failed commits"), and the next read
//! takes every pending entry of this writer again, in order.
//! Acknowledgements carried to the next read wait at most until the writer goes idle, when
//! they are sent on their own.
//!
//! A writer that has caught up (its batch was not full) reads the next batch while the
//! transaction commits, after its statements ran ([`Ledger::apply_events_beside`]), still
//! carrying the acknowledgement and leaving out its own pending entries. Read at the start,
//! that batch would hold only what came during the commit before, and what comes during this
//! one would wait for a further commit: an answer of `durability = "ledger"` waited about two
//! and a half commits, and now about one and a half. The read also hides behind the commit's
//! fsync instead of coming between two commits. The answers a commit settles go as soon as
//! it commits, whether or not the read beside it has returned.
//!
//! # Group commit
//!
//! A batch is up to [`WriterOptions::batch`] entries in one transaction: at flash-sale rates
//! the cost of a commit (an fsync on SQLite, a round trip on PostgreSQL) is shared by hundreds
//! of events, which is also what keeps `durability = "ledger"` requests fast: they wait for
//! the next group commit ([`EventWriter::wait_committed`]), not for a commit of their own.
//!
//! # Lingering
//!
//! A commit's cost is mostly fixed (on SQLite an fsync and the WAL frames of every page it
//! touched), so many small commits cost far more than a few large ones. When no answer waits
//! for a SKU's events (`durability = "engine"`, or a quiet moment), a partial batch is not
//! followed at once by a read of what came during its commit: the writer sleeps
//! [`WriterOptions::linger_ms`], and the events of that time go in one commit. An answer that
//! starts waiting ([`EventWriter::wait_committed`]) wakes it at once, and while answers wait
//! the writer reads ahead as described above. So the ledger trails the engine by up to a
//! linger more when nobody waits for it, at a fraction of the CPU per event.
//!
//! # Failed commits
//!
//! A batch whose commit failed because the ledger was unavailable (down, cut off, a session
//! ended under the transaction) is kept, and the SKU's next pass commits it again before it
//! reads anything; then it reads this writer's own pending entries first, as after any
//! failure. Read again instead, the batch would be gone if the engine lost the stream in the
//! meantime (a FLUSHALL, a restart without persistence): a change whose answer was cut off
//! waiting for the ledger is in no gateway's journal, and this copy is its last one.
//! Committed late, its events name the lost generation, so a rebuild that read the ledger
//! before them is redone (`rebuild_fences`). A rebuild on this gateway waits for the kept
//! batch ([`EventWriter::commit_what_was_read`]). A batch the ledger *rejects* is not kept
//! (see "Poison"): it is read again while the stream has it.
//!
//! # Poison
//!
//! An entry no script writes (no kind, a non-numeric time or key id, bytes that are not
//! UTF-8) can never be committed; retrying it would stall its SKU for good. It is moved to the
//! SKU's dead-letter stream (`kg:{sku}:dead`, with `source_id` and `reason` fields), counted
//! ([`EVENTS_DEAD_LETTERED`](crate::metrics::EVENTS_DEAD_LETTERED)) and logged, and the entries after it go on. A ledger that
//! *rejects* a well-formed batch is a different matter (a schema or configuration problem):
//! nothing is dead-lettered for it, the SKU is retried with backoff and the failure is counted
//! ([`LEDGER_WRITE_FAILURES`](crate::metrics::LEDGER_WRITE_FAILURES)), because moving good events aside would lose them.
//!
//! # Several gateways
//!
//! Every gateway runs a writer with its own consumer name in the same group: the group hands
//! each entry to one of them, and a writer that dies leaves its entries pending until another
//! takes them over. A gateway that waits for a commit learns of commits made by other writers
//! from the group itself: every read reports the oldest entry not yet acknowledged, and
//! everything below it is settled, whoever committed it.
//!
//! # Layout
//!
//! - `run`: the loop over every SKU, the final drain on stop, reaping stale consumers.
//! - `pass`: one pass over one SKU: read, dead-letter, commit, acknowledge.
//! - `reply`: parsing what `lua/stream.lua` answers.
//! - `settled`: what is known committed per SKU, for waiters.
//! - `backoff`: failure streaks and their growing delays.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;

use super::journal::{split_answer_id, Journal};
use super::{Ledger, LedgerError};
use crate::clock::now_ms;
use crate::engine::keys::{dead_letters_key, events_key, meta_key};
use crate::engine::measured::measured;
use crate::engine::stream_id::StreamId;
use crate::engine::{EngineError, Reply, ScriptEngine, SCRIPTS};

mod backoff;
mod inflight;
mod pass;
mod reply;
mod run;
mod settled;

use pass::Cursor;
use reply::shape;
use settled::Watched;

/// Most entries per batch: the acknowledgement passes them as script arguments, and Lua 5.1
/// unpacks at most about 8,000 values at once.
pub const MAX_BATCH: u32 = 5_000;

/// How an [`EventWriter`] reads and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterOptions {
    /// The consumer group every gateway's writer joins; the same for all of them, so each
    /// entry is committed by one writer.
    pub group: String,
    /// This writer's name in the group. Unique per gateway process
    /// ([`WriterOptions::unique_consumer`]): a restarted gateway must not mistake a dead
    /// predecessor's entries for its own failed batch, nor two gateways share a name.
    pub consumer: String,
    /// Most entries per group commit (capped at [`MAX_BATCH`]).
    pub batch: u32,
    /// Sleep between rounds when no SKU had anything to write.
    pub idle_poll_ms: u64,
    /// Sleep between rounds whose batches were all partial with no answer waiting for them
    /// (see "Lingering" in the module docs): events nobody waits for reach the ledger up to
    /// this much later, in fewer commits. At most [`WriterOptions::idle_poll_ms`].
    pub linger_ms: u64,
    /// Entries left unacknowledged this long by another consumer are taken over: that
    /// consumer is presumed dead. Keep it well above a commit's worst latency (a live
    /// consumer's entries taken over are committed twice, harmlessly but for nothing).
    pub reclaim_idle_ms: u64,
    /// Longest wait between retries while the ledger or the engine is unavailable.
    pub max_backoff_ms: u64,
    /// Most answered changes kept in memory until the ledger has them (see
    /// [`super::journal`]); beyond, changes are not answered as made.
    pub journal_max_events: usize,
}

impl Default for WriterOptions {
    fn default() -> WriterOptions {
        WriterOptions {
            group: "ledger".into(),
            consumer: WriterOptions::unique_consumer(),
            batch: 500,
            idle_poll_ms: 50,
            linger_ms: 3,
            reclaim_idle_ms: 30_000,
            max_backoff_ms: 5_000,
            journal_max_events: 1_000_000,
        }
    }
}

impl WriterOptions {
    /// `<host>-<pid>-<random>`: unique per process, and says where it ran.
    pub fn unique_consumer() -> String {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "kamigate".into());
        format!(
            "{host}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    }
}

/// Why a pass over a SKU failed. Nothing was acknowledged that was not committed.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// `lua/stream.lua` answered something it never sends: a bug.
    #[error("stream.lua gave an unexpected reply: {0}")]
    Reply(String),
}

impl WriterError {
    /// Whether the failure concerns every SKU (a store is unreachable), not just this one.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            WriterError::Engine(EngineError::Unavailable(_))
                | WriterError::Ledger(LedgerError::Unavailable(_))
        )
    }
}

/// What a SKU's stream still owes the ledger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Delivered to a writer and not yet acknowledged (being committed, or its writer died).
    pub pending: u64,
    /// Not yet delivered to any writer.
    pub lag: u64,
    /// Age of the oldest of those events (pending or undelivered), 0 when there is none.
    pub oldest_pending_age_ms: u64,
    /// Keys whose state those events change (an upper bound for a very long backlog).
    pub keys: u64,
}

impl Backlog {
    /// Events written by the engine and not yet committed to the ledger.
    pub fn in_flight(&self) -> u64 {
        self.pending + self.lag
    }
}

/// Consumes every SKU's event stream into the ledger. Cheap to clone: clones share one state,
/// so the gateway keeps a handle (for [`EventWriter::wait_committed`] and
/// [`EventWriter::backlog`]) while [`EventWriter::run`] owns another.
#[derive(Clone)]
pub struct EventWriter {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<dyn ScriptEngine>,
    ledger: Arc<dyn Ledger>,
    opts: WriterOptions,
    /// Per SKU, what is known to be committed, and the answers waiting for it.
    settled: DashMap<String, Arc<Watched>>,
    /// Set when a SKU was created here: the next pass lists SKUs again instead of waiting
    /// for the periodic refresh, so a new SKU's first events are not held up.
    relist: AtomicBool,
    /// Woken by waiters, so a commit starts at once instead of after the idle poll.
    wake: Notify,
    /// What this gateway answered and the ledger may not have yet.
    journal: Journal,
    /// What passes hold read and not yet committed, per SKU.
    in_flight: inflight::InFlight,
}

impl fmt::Debug for EventWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventWriter")
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

impl EventWriter {
    /// A writer of `engine`'s streams into `ledger`, its script calls measured. Starts
    /// nothing: call [`EventWriter::run`] (or [`EventWriter::drain_once`]).
    pub fn new(
        engine: Arc<dyn ScriptEngine>,
        ledger: Arc<dyn Ledger>,
        mut opts: WriterOptions,
    ) -> EventWriter {
        opts.batch = opts.batch.clamp(1, MAX_BATCH);
        EventWriter {
            inner: Arc::new(Inner {
                engine: measured(engine),
                ledger,
                journal: Journal::new(opts.journal_max_events),
                opts,
                settled: DashMap::new(),
                relist: AtomicBool::new(false),
                wake: Notify::new(),
                in_flight: inflight::InFlight::default(),
            }),
        }
    }

    /// What this gateway answered and the ledger may not have yet.
    pub fn journal(&self) -> &Journal {
        &self.inner.journal
    }

    /// Writes the journal's events of `sku`'s lost generations (every generation but
    /// `current`; all when the engine lacks the SKU) into the ledger. Call before
    /// rebuilding the SKU from the ledger; on failure the events stay for the next try and
    /// the rebuild must wait. Returns how many of them were new to the ledger (the writer
    /// may have committed some from the stream before it was lost).
    pub async fn flush_lost(&self, sku: &str, current: Option<&str>) -> Result<u64, LedgerError> {
        let journal = &self.inner.journal;
        if !journal.has_lost(sku, current) {
            // Still mark them: a late reply of a generation the engine no longer has must
            // not be answered as made.
            let _ = journal.take_lost(sku, current);
            return Ok(0);
        }
        let events = journal.take_lost(sku, current);
        match self.inner.ledger.apply_events(&events).await {
            Ok(new) => {
                tracing::warn!(
                    sku,
                    events = events.len(),
                    new,
                    "the engine lost changes this gateway answered: written to the ledger"
                );
                Ok(new)
            }
            Err(e) => {
                journal.restore(sku, events);
                Err(e)
            }
        }
    }

    /// Tells the writer a SKU was just created, so it starts consuming its stream at once.
    pub fn sku_added(&self) {
        self.inner.relist.store(true, Ordering::Relaxed);
    }

    /// The options in force (the batch size capped).
    pub fn options(&self) -> &WriterOptions {
        &self.inner.opts
    }

    /// One pass over one SKU: reads a batch (this writer's unacknowledged entries first, then
    /// entries of dead consumers, then new ones), dead-letters poison, commits the rest in one
    /// [`Ledger::apply_events`] call, acknowledges only after the commit, and trims.
    ///
    /// Returns how many stream entries it settled: committed (whether new to the ledger or
    /// already there from an earlier delivery) or dead-lettered. 0 means nothing was waiting,
    /// so `while drain_once(sku).await? > 0 {}` drains a SKU. On error nothing that was not
    /// committed was acknowledged; the entries are read again next time.
    pub async fn drain_once(&self, sku: &str) -> Result<usize, WriterError> {
        let mut cursor = Cursor::default();
        let pass = self.pass(sku, &mut cursor, false).await?;
        self.flush_acks(sku, &mut cursor).await?;
        Ok(pass.committed + pass.dead)
    }

    /// Waits until stream entry `entry_id` of `sku` (e.g. `1767225600000-3`) is known to be
    /// committed to the ledger, for `durability = "ledger"` responses. Returns `true` once it
    /// is, `false` when `timeout` passes first (or `entry_id` is not a stream id).
    ///
    /// "Known" is either of: this writer committed it, or the group's oldest unacknowledged
    /// entry (reported on every read, at most [`WriterOptions::idle_poll_ms`] apart while
    /// idle) is above it, i.e. some writer committed it. The second also counts an entry
    /// another gateway dead-lettered as settled; poison never comes from a script's own
    /// change, so a waiter never waits for one. Ids compare as (ms, seq).
    ///
    /// `answer_id` is `<gen>:<stream id>` as scripts answer it: ids compare only within the
    /// SKU's generation. An entry of a generation the engine lost (its stream went with its
    /// data, and a recreated stream's ids pass the lost ones) is never taken as committed:
    /// the wait ends `false` as soon as the writer sees the generation change.
    pub async fn wait_committed(&self, sku: &str, answer_id: &str, timeout: Duration) -> bool {
        let Some((gen, (ms, seq))) = split_answer_id(answer_id) else {
            return false;
        };
        let id = StreamId { ms, seq };
        // The map guard is dropped before awaiting: a DashMap shard lock must not be held
        // across a suspension point.
        let told = match self.settled_of(sku).wait(gen, id) {
            Ok(settled) => return settled,
            Err(told) => told,
        };
        self.inner.wake.notify_one();
        matches!(tokio::time::timeout(timeout, told).await, Ok(Ok(true)))
    }

    /// The answer id (`<gen>:<ms>-<seq>`) through which every event of `sku`'s stream is
    /// known committed to the ledger (by any writer: the group's acknowledgement floor as the
    /// last read reported it), or `None` before this writer read the SKU. What retires from
    /// the engine must be at or below it ([`crate::inventory::retire`]).
    pub fn committed_through(&self, sku: &str) -> Option<String> {
        self.inner.settled.get(sku).and_then(|s| s.through_answer())
    }

    /// What `sku`'s stream still owes the ledger (the in-flight count of drift, and metrics).
    pub async fn backlog(&self, sku: &str) -> Result<Backlog, WriterError> {
        let args = vec![
            "backlog".into(),
            self.inner.opts.group.clone(),
            now_ms().to_string(),
        ];
        let reply = self.eval(sku, args).await?;
        let n = |i: usize| {
            reply
                .item(i)
                .and_then(Reply::as_i64)
                .and_then(|v| u64::try_from(v).ok())
                .ok_or_else(|| WriterError::Reply(format!("backlog: {}", shape(&reply))))
        };
        Ok(Backlog {
            pending: n(0)?,
            lag: n(1)?,
            oldest_pending_age_ms: n(2)?,
            keys: n(3)?,
        })
    }

    /// Runs `lua/stream.lua` on `sku`'s streams.
    async fn eval(&self, sku: &str, args: Vec<String>) -> Result<Reply, EngineError> {
        self.inner
            .engine
            .eval(&SCRIPTS.stream, self.stream_keys(sku), args)
            .await
    }

    /// `lua/stream.lua`'s keys for `sku`.
    fn stream_keys(&self, sku: &str) -> Vec<String> {
        vec![events_key(sku), dead_letters_key(sku), meta_key(sku)]
    }
}
