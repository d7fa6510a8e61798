//! The event writer's group commits on SQLite, each in one hand-off to a thread of their own.
//!
//! Through sqlx, every statement of a group commit is a round trip to the connection's
//! worker thread: begin, record the events, load their keys, write the keys back, link the
//! audit rows, commit. Each trip wakes that thread and then the task waiting for it, and on a
//! busy machine each wake-up waits for a CPU: with `durability = "ledger"` a request waits
//! for a commit, and those waits were most of a commit's time, more than the SQL or the
//! fsync. Here the whole commit is one job for one thread that owns a connection of its own
//! and runs the statements back to back, row by row through cached statements (without a
//! round trip each, a statement per row costs little on SQLite): one wake-up there, one back.
//!
//! # Checkpoints
//!
//! SQLite's automatic checkpoint (copying committed pages from the WAL into the ledger file,
//! then fsyncing it) runs inside the commit that takes the WAL past 1,000 pages, on the
//! committing thread, before the commit returns. A group commit of a few hundred events
//! touches a few hundred pages, so nearly every large commit paid for one: about a fifth of
//! this thread's time, and with `durability = "ledger"` the answers waited for it. Here a
//! thread of its own checkpoints instead, `PASSIVE` (it never holds up a commit), after the
//! commits of each [`CHECKPOINT_EVERY`]: a page rewritten by many commits in that time (a
//! busy key, an index's last leaf) is copied once. The commit connection keeps an automatic
//! checkpoint at [`BACKSTOP_PAGES`], should that thread ever fall so far behind.
//!
//! The rules are the same as the generic path's (`sql/events.rs`), the replay is the same
//! code ([`replay`]); the ledger suites run every SQLite file ledger through this path.
//!
//! # One writer
//!
//! The connection is a second writer on the file. A job is sent while the caller holds the
//! pool's one write connection, so the writes of this process still take turns on one lock
//! and never meet SQLite's busy handler; other processes on the file (a `kamigate import`)
//! are waited for by `busy_timeout`, as on the pool's connection. An in-memory database has
//! no file a second connection could open: its group commits stay on the pool.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use crate::ledger::replay::{self, NewEvent};
use crate::ledger::rules::KeyStatus;
use crate::ledger::{LedgerError, LedgerEvent};

/// Statements kept prepared: the few this thread runs.
const CACHED_STATEMENTS: usize = 16;

/// The checkpoint thread's pace (see the module's "Checkpoints"): the ledger file trails the
/// WAL by about this long's commits, plus one checkpoint's time.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// WAL pages (4 KiB each) at which a commit checkpoints on the commit thread after all.
const BACKSTOP_PAGES: i64 = 10_000;

/// One group commit for the thread.
struct Job {
    events: Vec<LedgerEvent>,
    /// Told once the statements ran, before `COMMIT`: the caller starts its work beside the
    /// commit then ([`crate::ledger::Ledger::apply_events_beside`]).
    statements_done: oneshot::Sender<()>,
    done: oneshot::Sender<Result<Vec<bool>, LedgerError>>,
}

/// The thread's handle: jobs go in, answers come back on each job's channel. The thread
/// ends when this is dropped.
pub(crate) struct GroupCommit {
    jobs: mpsc::Sender<Job>,
}

impl GroupCommit {
    /// Opens a connection to the ledger file at `path` (already created and migrated) with
    /// the pool's settings, and starts the thread.
    pub(crate) fn start(
        path: &Path,
        busy_timeout: Duration,
        turns: super::order_runs::Turns,
    ) -> Result<GroupCommit, LedgerError> {
        let conn = Connection::open(path).map_err(error)?;
        // As the pool's connections (see the module above): WAL, every commit on disk,
        // foreign keys checked, deleted content zeroed.
        conn.busy_timeout(busy_timeout).map_err(error)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))
            .map_err(error)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(error)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(error)?;
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(error)?;
        // Each row's statement inside a commit of many keeps a statement journal (the pages
        // it touches, so that it alone could roll back); once that outgrew SQLite's in-memory
        // spill size it went to a temporary file, a `pwrite` per page: a tenth of this
        // thread's time. In memory it is a copy. This connection runs only the few
        // statements below, none with a large sort that would also stay in memory.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(error)?;
        conn.pragma_update(None, "wal_autocheckpoint", BACKSTOP_PAGES)
            .map_err(error)?;
        conn.set_prepared_statement_cache_capacity(CACHED_STATEMENTS);
        let committed = start_checkpoints(path, busy_timeout)?;
        let indexed = super::order_runs::start(path, busy_timeout, turns)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("ledger-commit".into())
            .spawn(move || {
                let mut conn = conn;
                for job in queue {
                    // A panic fails its job, not every later one: the transaction rolls back
                    // as it unwinds, and the connection serves the next job.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        commit(&mut conn, &job.events, job.statements_done)
                    }))
                    .unwrap_or_else(|_| {
                        Err(LedgerError::Corrupt("a group commit panicked".into()))
                    });
                    if result.is_ok() {
                        // Full: a checkpoint (an index pass) is already due, and covers this
                        // commit too.
                        let _ = committed.try_send(());
                        let _ = indexed.try_send(());
                    }
                    let _ = job.done.send(result);
                }
            })
            .map_err(|e| LedgerError::Unavailable(format!("starting the commit thread: {e}")))?;
        Ok(GroupCommit { jobs })
    }

    /// Records `events` (each `event_id` once) as
    /// [`crate::ledger::Ledger::apply_events_beside`] does: `beside` runs while the
    /// transaction commits, and is dropped unrun if a statement fails. Says of each event
    /// whether it was new to the ledger.
    pub(crate) async fn record(
        &self,
        events: Vec<LedgerEvent>,
        beside: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>>,
    ) -> Result<Vec<bool>, LedgerError> {
        let (statements_done, ran) = oneshot::channel();
        let (done, answer) = oneshot::channel();
        let job = Job {
            events,
            statements_done,
            done,
        };
        self.jobs
            .send(job)
            .map_err(|_| LedgerError::Unavailable("the commit thread stopped".into()))?;
        let answer = async {
            answer
                .await
                .map_err(|_| LedgerError::Unavailable("the commit thread stopped".into()))?
        };
        let Some(beside) = beside else {
            return answer.await;
        };
        // Sent before COMMIT; dropped unsent when a statement failed, and `beside` with it.
        if ran.await.is_err() {
            return answer.await;
        }
        tokio::join!(answer, beside).0
    }
}

/// Starts the checkpoint thread on a connection of its own to the ledger file at `path`
/// (see the module's "Checkpoints"). Returns the sender the commit thread tells of each
/// commit through; the thread ends when it is dropped.
fn start_checkpoints(
    path: &Path,
    busy_timeout: Duration,
) -> Result<mpsc::SyncSender<()>, LedgerError> {
    let conn = Connection::open(path).map_err(error)?;
    // A `PASSIVE` checkpoint waits for no reader or writer; this covers the rest (reading the
    // schema while another connection recovers the WAL).
    conn.busy_timeout(busy_timeout).map_err(error)?;
    // As the commits: a checkpoint fsyncs the ledger file before the WAL is reused.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(error)?;
    let (committed, commits) = mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("ledger-checkpt".into())
        .spawn(move || {
            // (busy, WAL pages, pages copied): busy when a reader still needs older pages,
            // which the next checkpoint copies.
            after_commits(
                &commits,
                CHECKPOINT_EVERY,
                || conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())),
                "ledger checkpoint failed; the WAL grows until one succeeds",
                "ledger checkpoints succeed again",
            );
        })
        .map_err(|e| LedgerError::Unavailable(format!("starting the checkpoint thread: {e}")))?;
    Ok(committed)
}

/// Runs `work` after commits, at most once every `every`, until the commit thread ends
/// (`commits` disconnects). A failure is said once a streak (`failed`, then `recovered`),
/// not at every pass while it lasts.
pub(super) fn after_commits(
    commits: &mpsc::Receiver<()>,
    every: Duration,
    mut work: impl FnMut() -> rusqlite::Result<()>,
    failed: &str,
    recovered: &str,
) {
    let mut failing = false;
    while commits.recv().is_ok() {
        let started = std::time::Instant::now();
        match work() {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("{recovered}");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "{failed}");
            }
            Err(_) => {}
        }
        std::thread::sleep(every.saturating_sub(started.elapsed()));
    }
}

/// One group commit: the same steps as the generic path, in one transaction. Says of each
/// event whether it was new to the ledger.
fn commit(
    conn: &mut Connection,
    events: &[LedgerEvent],
    statements_done: oneshot::Sender<()>,
) -> Result<Vec<bool>, LedgerError> {
    if events.is_empty() {
        let _ = statements_done.send(());
        return Ok(Vec::new());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(error)?;

    // Record the events; those already recorded change nothing. Without `RETURNING`: SQLite
    // compiles it as a trigger, and a statement with a trigger keeps a statement journal, a
    // copy of every page it touches (the leaves of the table and its five indexes), two fifths of
    // this insert's time. A row inserted is the one change, its `seq` the last rowid.
    let mut applied = Vec::with_capacity(events.len());
    let mut new = Vec::with_capacity(events.len());
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO events (event_id, sku, kind, at_ms, key_local_ids, order_id, \
                 user_id, redeemer, reason, late, fields_json) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (event_id) DO NOTHING",
            )
            .map_err(error)?;
        let mut ids = String::new();
        for e in events {
            ids.clear();
            for (i, id) in e.key_local_ids.iter().enumerate() {
                if i > 0 {
                    ids.push(',');
                }
                ids.push_str(&id.to_string());
            }
            let inserted = insert
                .execute(params![
                    e.event_id,
                    e.sku,
                    e.kind,
                    e.at_ms,
                    ids,
                    e.order_id,
                    e.user_id,
                    e.redeemer,
                    e.reason,
                    e.late,
                    e.fields_json
                ])
                .map_err(error)?;
            if inserted == 1 {
                applied.push(NewEvent::new(e, tx.last_insert_rowid()));
            }
            new.push(inserted == 1);
        }
    }

    // The rebuild fence (src/ledger/sql/events.rs, `pass_fence`): SQLite runs one write
    // transaction at a time, so reading the row inside this one orders it.
    for (sku, gen) in replay::generations(&applied) {
        let fence: Option<Option<String>> = tx
            .prepare_cached("SELECT read_gen FROM rebuild_fences WHERE sku = ?")
            .map_err(error)?
            .query_row(params![sku], |row| row.get(0))
            .optional()
            .map_err(error)?;
        if fence.flatten().is_some_and(|read| read != gen) {
            let marked = tx
                .prepare_cached(
                    "INSERT INTO rereads (sku, marked_at_ms) VALUES (?, ?) \
                     ON CONFLICT (sku) DO NOTHING",
                )
                .map_err(error)?
                .execute(params![sku, crate::clock::now_ms() as i64])
                .map_err(error)?;
            if marked > 0 {
                tracing::warn!(
                    sku,
                    gen,
                    "events of a lost generation committed after the SKU's rebuild read \
                     the ledger: it is to be rebuilt again"
                );
            }
        }
    }

    let mut keys = std::collections::BTreeMap::new();
    {
        let mut load = tx
            .prepare_cached(
                "SELECT voids, held, sold, uses, max_issues, max_uses, order_id, user_id, \
                 redeemer, redeemed_at_ms, updated_at_ms, order_entry, redeem_entry \
                 FROM keys WHERE sku = ? AND local_id = ?",
            )
            .map_err(error)?;
        for (sku, ids) in replay::keys_to_load(&applied) {
            for id in ids {
                let status = load
                    .query_row(params![sku, id], |row| {
                        Ok(KeyStatus {
                            voids: row.get(0)?,
                            held: row.get(1)?,
                            sold: row.get(2)?,
                            uses: row.get(3)?,
                            max_issues: row.get(4)?,
                            max_uses: row.get(5)?,
                            order_id: row.get(6)?,
                            user_id: row.get(7)?,
                            redeemer: row.get(8)?,
                            redeemed_at_ms: row.get(9)?,
                            updated_at_ms: row.get(10)?,
                            order_entry: row.get(11)?,
                            redeem_entry: row.get(12)?,
                        })
                    })
                    .optional()
                    .map_err(error)?;
                if let Some(status) = status {
                    keys.insert((sku, id), status);
                }
            }
        }
    }
    let replayed = replay::replay(&applied, keys);
    replayed.log_skipped();
    {
        let mut store = tx
            .prepare_cached(
                "UPDATE keys SET voids = ?, void = ?, held = ?, sold = ?, uses = ?, state = ?, \
                 order_id = ?, user_id = ?, redeemer = ?, redeemed_at_ms = ?, updated_at_ms = ?, \
                 order_entry = ?, redeem_entry = ? WHERE sku = ? AND local_id = ?",
            )
            .map_err(error)?;
        for (sku, rows) in &replayed.changed {
            for (id, k) in rows {
                store
                    .execute(params![
                        k.voids,
                        k.void(),
                        k.held,
                        k.sold,
                        k.uses,
                        k.state().as_str(),
                        k.order_id,
                        k.user_id,
                        k.redeemer,
                        k.redeemed_at_ms,
                        k.updated_at_ms,
                        k.order_entry,
                        k.redeem_entry,
                        sku,
                        id
                    ])
                    .map_err(error)?;
            }
        }
    }

    {
        let mut pools = tx
            .prepare_cached(
                "INSERT INTO pools (sku, pool, level, updated_at_ms) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (sku, pool) DO UPDATE SET level = pools.level + excluded.level, \
                 updated_at_ms = excluded.updated_at_ms",
            )
            .map_err(error)?;
        for ((sku, pool), (delta, at_ms)) in replay::pool_changes(&applied) {
            pools
                .execute(params![sku, pool, delta, at_ms])
                .map_err(error)?;
        }
    }

    {
        let mut link = tx
            .prepare_cached("INSERT INTO event_keys (sku, local_id, event_seq) VALUES (?, ?, ?)")
            .map_err(error)?;
        for (sku, id, seq) in replay::audit_links(&applied) {
            link.execute(params![sku, id, seq]).map_err(error)?;
        }
    }

    let _ = statements_done.send(());
    tx.commit().map_err(error)?;
    Ok(new)
}

/// As the pool's errors map ([`LedgerError`]'s `From<sqlx::Error>`): busy, locked, I/O, a
/// full disk and an unopenable file are transient; a unique or foreign key violation a
/// conflict; the rest a bug or a damaged file.
fn error(e: rusqlite::Error) -> LedgerError {
    use rusqlite::ffi;
    use rusqlite::ErrorCode as C;
    let extended = match &e {
        rusqlite::Error::SqliteFailure(failure, _) => failure.extended_code,
        _ => 0,
    };
    match e.sqlite_error_code() {
        Some(
            C::DatabaseBusy | C::DatabaseLocked | C::SystemIoFailure | C::DiskFull | C::CannotOpen,
        ) => LedgerError::Unavailable(e.to_string()),
        Some(C::ConstraintViolation)
            if matches!(
                extended,
                ffi::SQLITE_CONSTRAINT_UNIQUE
                    | ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    | ffi::SQLITE_CONSTRAINT_FOREIGNKEY
            ) =>
        {
            LedgerError::Conflict(e.to_string())
        }
        _ => LedgerError::Corrupt(e.to_string()),
    }
}
