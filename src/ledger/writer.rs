//! The event writer: brings every SKU's event stream into the ledger.
//!
//! Every script that changes a SKU appends an event to the SKU's stream (`kg:{sku}:events`) in
//! the same atomic step, so the engine never changes without saying so. [`EventWriter`] reads
//! those streams through one consumer group shared by every gateway, turns entries into
//! [`LedgerEvent`]s ([`super::stream`]), commits them, and only then acknowledges them. The
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
//! While a batch commits, the writer already reads the next one, and that read carries the
//! acknowledgement of the batch committed before: a busy SKU costs one script call per
//! commit, and a commit starts as soon as the previous one ends. The read ahead leaves out
//! this writer's own pending entries (the batch being committed is among them, and would
//! otherwise be read again); if the commit fails, the read ahead is dropped and the next read
//! takes every pending entry of this writer again, in order. Acknowledgements carried to the
//! next read wait at most until the writer goes idle, when they are sent on their own.
//!
//! # Group commit
//!
//! A batch is up to [`WriterOptions::batch`] entries in one transaction: at flash-sale rates
//! the cost of a commit (an fsync on SQLite, a round trip on PostgreSQL) is shared by hundreds
//! of events, which is also what keeps `durability = "ledger"` requests fast: they wait for
//! the next group commit ([`EventWriter::wait_committed`]), not for a commit of their own.
//!
//! # Poison
//!
//! An entry no script writes (no kind, a non-numeric time or key id, bytes that are not
//! UTF-8) can never be committed; retrying it would stall its SKU for good. It is moved to the
//! SKU's dead-letter stream (`kg:{sku}:dead`, with `source_id` and `reason` fields), counted
//! ([`EVENTS_DEAD_LETTERED`]) and logged, and the entries after it go on. A ledger that
//! *rejects* a well-formed batch is a different matter (a schema or configuration problem):
//! nothing is dead-lettered for it, the SKU is retried with backoff and the failure is counted
//! ([`LEDGER_WRITE_FAILURES`]), because moving good events aside would lose them.
//!
//! # Several gateways
//!
//! Every gateway runs a writer with its own consumer name in the same group: the group hands
//! each entry to one of them, and a writer that dies leaves its entries pending until another
//! takes them over. A gateway that waits for a commit learns of commits made by other writers
//! from the group itself: every read reports the oldest entry not yet acknowledged, and
//! everything below it is settled, whoever committed it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{watch, Notify};

use super::journal::{split_answer_id, Journal};
use super::stream::event_from_entry;
use super::{Ledger, LedgerError, LedgerEvent};
use crate::clock::now_ms;
use crate::engine::keys::{dead_letters_key, events_key, meta_key};
use crate::engine::measured::measured;
use crate::engine::stream_id::StreamId;
use crate::engine::{EngineError, Reply, ScriptEngine, SCRIPTS};
use crate::metrics as m;
use crate::metrics::{
    EVENTS_COMMITTED, EVENTS_DEAD_LETTERED, LEDGER_WRITE_DURATION, LEDGER_WRITE_FAILURES,
    STREAM_BACKLOG, STREAM_OLDEST_AGE,
};

/// Most entries per batch: the acknowledgement passes them as script arguments, and Lua 5.1
/// unpacks at most about 8,000 values at once.
pub const MAX_BATCH: u32 = 5_000;

/// How often the SKU list is read again from the ledger.
const SKU_REFRESH: Duration = Duration::from_secs(5);
/// How long a stopping writer keeps committing what the streams still hold.
const DRAIN_ON_STOP: Duration = Duration::from_secs(10);
/// How often a writer reading ahead looks for entries of dead consumers: that scan walks
/// the pending list, which holds the batch being committed.
const RECLAIM_EVERY: Duration = Duration::from_secs(1);
/// Batches drained from one SKU before the others get their turn.
const BATCHES_PER_VISIT: usize = 8;
/// How often consumers of stopped gateways are deleted from the group.
const REAP_EVERY: Duration = Duration::from_secs(300);
/// How long a consumer owning nothing must have been silent to be deleted (at least).
const REAP_IDLE: Duration = Duration::from_secs(3600);
/// First delay after a failure; doubles up to [`WriterOptions::max_backoff_ms`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Commit runs remembered per SKU for waiters (see [`Settled`]); beyond, the oldest go and
/// their waiters fall back on the group's acknowledgement floor.
const MAX_RUNS: usize = 4096;
/// Lost generations of a SKU remembered for waiters (see [`Settled::lost`]).
const LOST_GENERATIONS: usize = 16;

/// The scope logged for outages of the ledger or the engine, which hold up every SKU.
const ALL_SKUS: &str = "all SKUs";

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
    /// Sleep between passes when no SKU had anything to write.
    pub idle_poll_ms: u64,
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
    /// Per SKU, what is known to be committed; waiters watch it.
    settled: DashMap<String, watch::Sender<Settled>>,
    /// Set when a SKU was created here: the next pass lists SKUs again instead of waiting
    /// for the periodic refresh, so a new SKU's first events are not held up.
    relist: AtomicBool,
    /// Woken by waiters, so a commit starts at once instead of after the idle poll.
    wake: Notify,
    /// What this gateway answered and the ledger may not have yet.
    journal: Journal,
}

impl fmt::Debug for EventWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventWriter")
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

/// A SKU's pipeline between passes (see the module docs).
#[derive(Debug, Default)]
struct Cursor {
    /// Ids of committed entries not yet acknowledged: the next read acknowledges them.
    unacked: Vec<String>,
    /// The SKU's generation those ids belong to (acknowledged only while it lasts).
    unacked_gen: String,
    /// A read taken while the last batch committed, to be committed next.
    ahead: Option<Reply>,
    /// When a read last looked for entries dead consumers left.
    reclaimed_at: Option<Instant>,
}

impl Cursor {
    /// Whether the read ahead holds entries.
    fn has_ahead(&self) -> bool {
        self.ahead
            .as_ref()
            .and_then(Reply::as_array)
            .is_some_and(|items| items.len() > READ_HEAD)
    }
}

/// What one pass over a SKU did.
#[derive(Debug, Clone, Copy, Default)]
struct Pass {
    /// Entries read (committed + dead-lettered, once the pass succeeded).
    read: usize,
    committed: usize,
    dead: usize,
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
    /// the rebuild must wait. Returns how many events were written (new or not).
    pub async fn flush_lost(&self, sku: &str, current: Option<&str>) -> Result<usize, LedgerError> {
        let journal = &self.inner.journal;
        if !journal.has_lost(sku, current) {
            // Still mark them: a late reply of a generation the engine no longer has must
            // not be answered as made.
            let _ = journal.take_lost(sku, current);
            return Ok(0);
        }
        let events = journal.take_lost(sku, current);
        match self.inner.ledger.apply_events(&events).await {
            Ok(_) => {
                tracing::warn!(
                    sku,
                    events = events.len(),
                    "the engine lost changes this gateway answered: written to the ledger before the rebuild"
                );
                Ok(events.len())
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

    /// Drains every SKU of the ledger until `stop` turns true (or its sender is dropped).
    ///
    /// Each round visits the SKUs in turn (the list is read again every few seconds) and
    /// drains each while it yields full batches, a bounded number of them so one busy SKU
    /// cannot starve the others; when no SKU had a full batch it sleeps
    /// [`WriterOptions::idle_poll_ms`]. While the ledger or the engine is unavailable it
    /// retries with exponential backoff up to [`WriterOptions::max_backoff_ms`], logging the
    /// outage once when it starts and once when it ends. A SKU whose batch the ledger rejects
    /// is retried with backoff on its own, without holding up the others.
    ///
    /// SKUs are drained one after the other: a ledger takes one write transaction at a time
    /// per SKU anyway (and SQLite one in all), so parallel passes would only queue. An idle
    /// round costs one script call per SKU.
    ///
    /// Stopping waits for the pass in progress (a commit is never cut in half, though that
    /// would be harmless); entries still pending are committed after a restart, by this or
    /// another gateway.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let opts = &self.inner.opts;
        let max_backoff = Duration::from_millis(opts.max_backoff_ms).max(FIRST_BACKOFF);
        let idle = Duration::from_millis(opts.idle_poll_ms);
        let mut outage = Trouble::default();
        let mut troubled: HashMap<String, Trouble> = HashMap::new();
        let mut cursors: HashMap<String, Cursor> = HashMap::new();
        let mut skus: Vec<String> = Vec::new();
        let mut listed_at: Option<Instant> = None;
        let mut reaped_at = Instant::now();
        tracing::info!(
            group = %opts.group,
            consumer = %opts.consumer,
            batch = opts.batch,
            "event writer started"
        );
        loop {
            if *stop.borrow() {
                break;
            }
            let relist = self.inner.relist.swap(false, Ordering::Relaxed);
            if relist || listed_at.is_none_or(|t| t.elapsed() >= SKU_REFRESH) {
                match self.inner.ledger.list_skus().await {
                    Ok(list) => {
                        skus = list;
                        listed_at = Some(Instant::now());
                        troubled.retain(|sku, _| skus.contains(sku));
                        // A SKU gone from the ledger: what this writer holds of it stays
                        // pending in the group, and is read again if the SKU comes back.
                        cursors.retain(|sku, _| skus.contains(sku));
                    }
                    Err(e) => {
                        let delay = outage.fail(ALL_SKUS, &e, max_backoff);
                        if pause(&mut stop, delay).await {
                            break;
                        }
                        continue;
                    }
                }
            }

            let mut busy = false;
            let mut failure: Option<WriterError> = None;
            'skus: for sku in &skus {
                if *stop.borrow() {
                    break;
                }
                if troubled.get(sku).is_some_and(|t| !t.due()) {
                    continue;
                }
                let cursor = cursors.entry(sku.clone()).or_default();
                for _ in 0..BATCHES_PER_VISIT {
                    match self.pass(sku, cursor, true).await {
                        Ok(_) => {
                            if let Some(mut t) = troubled.remove(sku) {
                                t.recover(sku);
                            }
                            // The read ahead is the next batch; without one, the SKU had
                            // nothing more when the commit ended.
                            if !cursor.has_ahead() {
                                break;
                            }
                            busy = true;
                        }
                        Err(e) if e.is_outage() => {
                            failure = Some(e);
                            break 'skus;
                        }
                        Err(e) => {
                            troubled
                                .entry(sku.clone())
                                .or_default()
                                .fail(sku, &e, max_backoff);
                            break;
                        }
                    }
                }
            }
            if let Some(e) = failure {
                let delay = outage.fail(ALL_SKUS, &e, max_backoff);
                if pause(&mut stop, delay).await {
                    break;
                }
                continue;
            }
            outage.recover(ALL_SKUS);

            if reaped_at.elapsed() >= REAP_EVERY {
                reaped_at = Instant::now();
                self.reap(&skus).await;
            }
            if !busy {
                // A waiter wakes the writer at once: its answer waits for the next group
                // commit, not for the idle poll.
                let woken = self.inner.wake.notified();
                tokio::pin!(woken);
                if woken.as_mut().enable() {
                    // A waiter came during the round: its read carries the acknowledgements.
                    continue;
                }
                // Idle: acknowledge now what the next read would have, so other gateways
                // (and the backlog) see it settled without waiting for more events.
                self.flush_all_acks(&mut cursors).await;
                tokio::select! {
                    _ = &mut woken => {}
                    stopped = pause(&mut stop, idle) => if stopped { break },
                }
            }
        }
        self.flush_all_acks(&mut cursors).await;
        // SKUs created since the last listing have events too.
        if let Ok(list) = self.inner.ledger.list_skus().await {
            skus = list;
        }
        self.drain_before_exit(&skus).await;
        tracing::info!(consumer = %opts.consumer, "event writer stopped");
    }

    /// On stop, commits what the streams still hold, for a bounded time: the gateway stops
    /// the writer after its last request, and an embedded engine's streams end with the
    /// process, so what is not committed now would be lost.
    async fn drain_before_exit(&self, skus: &[String]) {
        let deadline = Instant::now() + DRAIN_ON_STOP;
        for sku in skus {
            let mut cursor = Cursor::default();
            loop {
                if Instant::now() >= deadline {
                    tracing::warn!("stopping with events not yet committed to the ledger");
                    break;
                }
                match self.pass(sku, &mut cursor, false).await {
                    Ok(pass) if pass.read > 0 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(sku, error = %e, "final drain failed");
                        break;
                    }
                }
            }
            if let Err(e) = self.flush_acks(sku, &mut cursor).await {
                tracing::warn!(sku, error = %e, "final acknowledgement failed");
            }
            if Instant::now() >= deadline {
                return;
            }
        }
    }

    /// Sends the acknowledgements `cursor` carries (see [`Cursor::unacked`]). They are kept
    /// for the next read if the engine does not answer; acknowledging twice is harmless.
    async fn flush_acks(&self, sku: &str, cursor: &mut Cursor) -> Result<(), WriterError> {
        while !cursor.unacked.is_empty() {
            let n = cursor.unacked.len().min(MAX_BATCH as usize);
            let mut args = Vec::with_capacity(2 + n);
            args.push("ack".to_owned());
            args.push(self.inner.opts.group.clone());
            args.push(cursor.unacked_gen.clone());
            args.extend(cursor.unacked[..n].iter().cloned());
            self.eval(sku, args).await?;
            cursor.unacked.drain(..n);
        }
        Ok(())
    }

    /// [`EventWriter::flush_acks`] for every SKU; failures leave them for the next read.
    async fn flush_all_acks(&self, cursors: &mut HashMap<String, Cursor>) {
        for (sku, cursor) in cursors.iter_mut() {
            if let Err(e) = self.flush_acks(sku, cursor).await {
                tracing::debug!(sku, error = %e, "acknowledgement deferred to the next read");
            }
        }
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
        let mut rx = self.settled_of(sku).subscribe();
        self.inner.wake.notify_one();
        tokio::time::timeout(
            timeout,
            rx.wait_for(|s| s.covers(gen, id) || s.is_lost(gen)),
        )
        .await
        .is_ok_and(|seen| seen.is_ok_and(|s| s.covers(gen, id)))
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
                .as_array()
                .and_then(|a| a.get(i))
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
            .eval(
                &SCRIPTS.stream,
                vec![events_key(sku), dead_letters_key(sku), meta_key(sku)],
                args,
            )
            .await
    }

    /// Reads a batch for this writer, acknowledging what `cursor` carries on the way. `own`
    /// includes this writer's own pending entries (first); entries of dead consumers are
    /// looked for with them, or every [`RECLAIM_EVERY`] while the writer reads ahead.
    async fn read(&self, sku: &str, cursor: &mut Cursor, own: bool) -> Result<Reply, WriterError> {
        if cursor.unacked.len() > MAX_BATCH as usize {
            // Only after failed reads: keep one call's arguments bounded.
            self.flush_acks(sku, cursor).await?;
        }
        let opts = &self.inner.opts;
        let mut args = Vec::with_capacity(7 + cursor.unacked.len());
        args.extend([
            "read".to_owned(),
            opts.group.clone(),
            opts.consumer.clone(),
            opts.batch.to_string(),
            opts.reclaim_idle_ms.to_string(),
        ]);
        let reclaim = own
            || cursor
                .reclaimed_at
                .is_none_or(|t| t.elapsed() >= RECLAIM_EVERY);
        args.push(
            match (own, reclaim) {
                (true, _) => "ocn",
                (false, true) => "cn",
                (false, false) => "n",
            }
            .to_owned(),
        );
        if !cursor.unacked.is_empty() {
            args.push(cursor.unacked_gen.clone());
            args.extend(cursor.unacked.iter().cloned());
        }
        let reply = self.eval(sku, args).await?;
        cursor.unacked.clear();
        if reclaim {
            cursor.reclaimed_at = Some(Instant::now());
        }
        Ok(reply)
    }

    /// One pass: commits the batch read ahead, or a batch read now. With `read_ahead`, the
    /// next batch is read while this one commits (see the module docs) and left in `cursor`;
    /// the acknowledgement of this batch is left in `cursor` for the next read either way.
    async fn pass(
        &self,
        sku: &str,
        cursor: &mut Cursor,
        read_ahead: bool,
    ) -> Result<Pass, WriterError> {
        let (reply, from_ahead) = match cursor.ahead.take() {
            Some(reply) => (reply, true),
            None => (self.read(sku, cursor, true).await?, false),
        };
        let read = ReadReply::parse(&reply)?;
        // A read ahead leaves this writer's own pending entries out, so it must not run while
        // more of them wait than this batch holds (after a failed commit, or a read whose
        // answer was lost): they are older, and are committed first.
        let read_ahead = read_ahead && (from_ahead || read.own < self.inner.opts.batch as usize);
        self.observe(sku, &read);
        if read.entries.is_empty() {
            return Ok(Pass::default());
        }

        // Decode; poison goes aside now, so it cannot hold up the entries behind it.
        let mut events = Vec::with_capacity(read.entries.len());
        let mut committed: Vec<(usize, StreamId, String)> = Vec::with_capacity(read.entries.len());
        let mut dead = 0;
        for (at, entry) in read.entries.iter().enumerate() {
            let (id_text, id, decoded) = decode(sku, entry)?;
            match decoded {
                Ok(event) => {
                    events.push(event);
                    committed.push((at, id, id_text));
                }
                Err(reason) => {
                    self.dead_letter(sku, &id_text, &reason).await?;
                    dead += 1;
                }
            }
        }
        if events.is_empty() {
            return Ok(Pass {
                read: read.entries.len(),
                committed: 0,
                dead,
            });
        }

        let commit = async {
            let started = Instant::now();
            let result = self.inner.ledger.apply_events(&events).await;
            metrics::histogram!(LEDGER_WRITE_DURATION).record(started.elapsed().as_secs_f64());
            result
        };
        let (result, ahead) = if read_ahead {
            let (result, ahead) = tokio::join!(commit, self.read(sku, cursor, false));
            (result, Some(ahead))
        } else {
            (commit.await, None)
        };
        if let Err(e) = result {
            // The read ahead is dropped: the next read takes this batch again, then it.
            let kind = if e.is_retryable() {
                "unavailable"
            } else {
                "rejected"
            };
            metrics::counter!(LEDGER_WRITE_FAILURES, "kind" => kind).increment(1);
            return Err(e.into());
        }

        // Committed: waiters may go, whatever happens to the acknowledgement.
        self.note_committed(sku, &read, &committed);
        for (source, n) in read.sources(committed.iter().map(|(at, _, _)| *at)) {
            if n > 0 {
                metrics::counter!(EVENTS_COMMITTED, "source" => source).increment(n);
            }
        }
        let pass = Pass {
            read: read.entries.len(),
            committed: committed.len(),
            dead,
        };
        if cursor.unacked_gen != read.gen {
            // Ids of a lost generation's stream: nothing to acknowledge there any more.
            cursor.unacked.clear();
            cursor.unacked_gen = read.gen.to_owned();
        }
        cursor
            .unacked
            .extend(committed.into_iter().map(|(_, _, text)| text));
        // A failed read ahead is no failure of this pass: the next pass reads again.
        cursor.ahead = ahead.and_then(Result::ok);
        Ok(pass)
    }

    /// Moves a poison entry to the dead-letter stream and acknowledges it, in one step.
    async fn dead_letter(&self, sku: &str, id: &str, reason: &str) -> Result<(), WriterError> {
        let args = vec![
            "dead".into(),
            self.inner.opts.group.clone(),
            id.to_owned(),
            reason.to_owned(),
        ];
        let moved = self.eval(sku, args).await?.as_i64() == Some(1);
        if moved {
            metrics::counter!(EVENTS_DEAD_LETTERED, "sku" => m::sku_labels().label(sku))
                .increment(1);
            tracing::warn!(
                sku,
                entry = id,
                reason,
                dead_letters = %dead_letters_key(sku),
                "poison stream entry moved to the dead-letter stream"
            );
        }
        Ok(())
    }

    /// Updates the backlog gauges and what is known settled from a read's report.
    fn observe(&self, sku: &str, read: &ReadReply<'_>) {
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
    fn note_committed(
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

    /// The settled state of `sku`, created on first use (a waiter may come before a commit).
    fn settled_of(&self, sku: &str) -> watch::Sender<Settled> {
        if let Some(tx) = self.inner.settled.get(sku) {
            return tx.clone();
        }
        self.inner
            .settled
            .entry(sku.to_owned())
            .or_insert_with(|| watch::channel(Settled::default()).0)
            .clone()
    }

    /// Deletes consumers of stopped gateways (owning nothing, silent for long) from the group.
    async fn reap(&self, skus: &[String]) {
        let opts = &self.inner.opts;
        let idle = REAP_IDLE
            .max(Duration::from_millis(opts.reclaim_idle_ms))
            .as_millis();
        for sku in skus {
            let args = vec!["reap".into(), opts.group.clone(), idle.to_string()];
            match self.eval(sku, args).await {
                Ok(reply) => {
                    if let Some(n) = reply.as_i64().filter(|n| *n > 0) {
                        tracing::debug!(
                            sku,
                            consumers = n,
                            "deleted consumers of stopped gateways"
                        );
                    }
                }
                Err(e) => {
                    // Housekeeping only: the next round tries again.
                    tracing::debug!(sku, error = %e, "could not delete stale consumers");
                    return;
                }
            }
        }
    }
}

/// Values before the entries in a `read` reply of `lua/stream.lua` (pending … gen).
const READ_HEAD: usize = 8;

/// A parsed `read` reply of `lua/stream.lua`.
struct ReadReply<'a> {
    pending: u64,
    lag: u64,
    /// The oldest unsettled entry before the read, if any.
    floor: Option<StreamId>,
    last_delivered: StreamId,
    own: usize,
    claimed: usize,
    /// The SKU's generation in the engine (`""` without one).
    gen: &'a str,
    entries: &'a [Reply],
}

impl<'a> ReadReply<'a> {
    fn parse(reply: &'a Reply) -> Result<ReadReply<'a>, WriterError> {
        let bad = || WriterError::Reply(format!("read: {}", shape(reply)));
        let items = reply.as_array().ok_or_else(bad)?;
        let (head, entries) = items.split_at_checked(READ_HEAD).ok_or_else(bad)?;
        let n = |i: usize| {
            head[i]
                .as_i64()
                .and_then(|v| u64::try_from(v).ok())
                .ok_or_else(bad)
        };
        let floor = match head[2].as_str().ok_or_else(bad)? {
            "" => None,
            id => Some(StreamId::parse(id).ok_or_else(bad)?),
        };
        let last_delivered = head[3].as_str().and_then(StreamId::parse).ok_or_else(bad)?;
        let (own, claimed, new) = (n(4)? as usize, n(5)? as usize, n(6)? as usize);
        if own + claimed + new != entries.len() {
            return Err(bad());
        }
        Ok(ReadReply {
            pending: n(0)?,
            lag: n(1)?,
            floor,
            last_delivered,
            own,
            claimed,
            gen: head[7].as_str().ok_or_else(bad)?,
            entries,
        })
    }

    /// How many of the entries at positions `at` came from each source.
    fn sources(&self, at: impl Iterator<Item = usize>) -> [(&'static str, u64); 3] {
        let mut counts = [("own", 0), ("claimed", 0), ("new", 0)];
        for i in at {
            let slot = if i < self.own {
                0
            } else if i < self.own + self.claimed {
                1
            } else {
                2
            };
            counts[slot].1 += 1;
        }
        counts
    }
}

/// Splits a stream entry (`{id, {field, value, …}}`) into its id and its event, or the reason
/// it is poison. Only a reply without an id is an error: that is not an entry at all.
#[allow(clippy::type_complexity)]
fn decode(
    sku: &str,
    entry: &Reply,
) -> Result<(String, StreamId, Result<LedgerEvent, String>), WriterError> {
    let bad = || WriterError::Reply(format!("entry: {}", shape(entry)));
    let parts = entry.as_array().ok_or_else(bad)?;
    let id_text = parts.first().and_then(Reply::as_str).ok_or_else(bad)?;
    let id = StreamId::parse(id_text).ok_or_else(bad)?;
    let event = fields(parts.get(1)).and_then(|fields| {
        event_from_entry(sku, id_text, &fields).map_err(|e| match e {
            LedgerError::Corrupt(reason) => reason,
            other => other.to_string(),
        })
    });
    Ok((id_text.to_owned(), id, event))
}

/// An entry's field/value pairs, or why they cannot be an event.
fn fields(reply: Option<&Reply>) -> Result<Vec<(String, String)>, String> {
    let items = reply
        .and_then(Reply::as_array)
        .ok_or("fields are not an array")?;
    if items.len() % 2 != 0 {
        return Err("odd number of fields".into());
    }
    items
        .chunks(2)
        .map(|pair| {
            let text = |r: &Reply| {
                r.as_str()
                    // The ledger stores text; PostgreSQL refuses NUL in it.
                    .filter(|s| !s.contains('\0'))
                    .map(str::to_owned)
                    .ok_or_else(|| "a field is not UTF-8 text".to_owned())
            };
            Ok((text(&pair[0])?, text(&pair[1])?))
        })
        .collect()
}

/// A reply's outline, for errors: replies may carry anything, so never their content.
fn shape(reply: &Reply) -> String {
    match reply {
        Reply::Array(items) => format!("array of {}", items.len()),
        Reply::Nil => "nil".into(),
        Reply::Int(_) => "integer".into(),
        Reply::Bulk(_) => "string".into(),
        Reply::Status(_) => "status".into(),
    }
}

/// What is known to be committed for one SKU, in its current generation.
#[derive(Debug, Default)]
struct Settled {
    /// The SKU's generation these ids belong to; `None` until the first read.
    gen: Option<String>,
    /// Generations the engine lost: their entries are never settled by this writer.
    lost: std::collections::VecDeque<String>,
    /// Every entry at or below this id was acknowledged by the group (committed by some
    /// writer, or dead-lettered).
    through: Option<StreamId>,
    /// Runs of entries this writer committed above `through`, first → last. A run holds only
    /// committed entries (see [`EventWriter::note_committed`]).
    runs: BTreeMap<StreamId, StreamId>,
}

impl Settled {
    fn covers(&self, gen: &str, id: StreamId) -> bool {
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

    fn is_lost(&self, gen: &str) -> bool {
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

/// A failure streak (an outage, or one SKU's rejected batches): logged when it starts and
/// when it ends, never per attempt, with an exponentially growing delay.
#[derive(Debug, Default)]
struct Trouble {
    since: Option<Instant>,
    attempts: u32,
    delay: Duration,
    retry_at: Option<Instant>,
}

impl Trouble {
    /// Records a failure of `scope` (a SKU, or [`ALL_SKUS`]); returns how long to wait
    /// before the next attempt.
    fn fail(&mut self, scope: &str, error: &dyn fmt::Display, max: Duration) -> Duration {
        self.attempts += 1;
        if self.since.is_none() {
            self.since = Some(Instant::now());
            self.delay = FIRST_BACKOFF.min(max);
            tracing::warn!(
                scope,
                %error,
                "event writer: ledger writes failing; retrying with backoff until they recover"
            );
        } else {
            self.delay = (self.delay * 2).min(max);
        }
        self.retry_at = Some(Instant::now() + self.delay);
        self.delay
    }

    /// Whether the next attempt is due.
    fn due(&self) -> bool {
        self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// Ends a streak, if any.
    fn recover(&mut self, scope: &str) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                scope,
                after = ?since.elapsed(),
                failed_attempts = self.attempts,
                "event writer: ledger writes recovered"
            );
            *self = Trouble::default();
        }
    }
}

/// Sleeps `delay` unless `stop` fires first; returns whether it did (a dropped sender counts:
/// nobody can stop the writer any more, so it stops now).
async fn pause(stop: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.wait_for(|s| *s) => true,
        _ = tokio::time::sleep(delay) => false,
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

    #[test]
    fn poison_fields_are_reasons_not_errors() {
        let entry = |fields: Vec<Reply>| Reply::Array(vec!["5-0".into(), Reply::Array(fields)]);
        let (_, _, event) = decode("s", &entry(vec!["bogus".into(), "1".into()])).expect("entry");
        assert!(event.is_err());
        let (_, _, event) = decode("s", &entry(vec!["t".into()])).expect("entry");
        assert_eq!(event.err().as_deref(), Some("odd number of fields"));
        let nul = Reply::Bulk(bytes::Bytes::from_static(b"a\0b"));
        let (_, _, event) = decode(
            "s",
            &entry(vec!["t".into(), "claim".into(), "order".into(), nul]),
        )
        .expect("entry");
        assert!(event.is_err());
        let (text, _, event) = decode(
            "s",
            &entry(vec!["t".into(), "sku".into(), "at".into(), "5".into()]),
        )
        .expect("entry");
        assert_eq!(text, "5-0");
        assert_eq!(event.expect("an event").event_id, "s/5-0");
        assert!(decode("s", &Reply::Int(1)).is_err(), "no id: not an entry");
    }
}
