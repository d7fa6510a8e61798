//! A SQLite ledger's order index: sorted runs of (order id, `seq`), built behind the commits.
//!
//! Statements, reconciliation and the restore of a retired order find an order's events by
//! its id. Order ids are the clients': when they are random, a B-tree over them, once larger
//! than a group commit, takes one leaf per event recorded, and SQLite writes each dirty leaf
//! whole into the WAL and again at the checkpoint, about two thirds of recording a claim event
//! on a long sale (BENCHMARKS.md). Here a thread of its own cuts the events the runs do not
//! cover yet into a run, sorted in memory and written in order (a page holds a hundred
//! entries), and merges runs [`Tiers::fan_in`] at a time as they pile up, so a lookup reads a
//! few dozen runs at most. Readers take the live runs plus the events above them, read by
//! `seq` (`Dialect::naming`): on SQLite `seq` is the commit order (one writer at a time,
//! `AUTOINCREMENT`), so no event can commit below one the runs already cover.
//!
//! # Safe to stop anywhere
//!
//! Every step is a transaction of its own, at most [`Tiers::chunk`] entries long. A run is
//! written as `building`, then in one transaction made `live`: a cut's if the coverage it
//! started from is unchanged, a merge's (taking its inputs' place, which become `dead`) if
//! they are still live. Dead runs' entries are deleted a chunk at a time. Readers see only
//! live runs, which always cover the events up to the largest `last_seq` among them. A process
//! stopped midway leaves a building run, which the next start gives up (`dead`). Two processes
//! indexing one file (two gateways on it) cannot spoil it either: whichever publishes second
//! finds its condition broken and gives its run up.
//!
//! # Taking turns with the commits
//!
//! Each write transaction is made while holding the pool's one write connection, as the
//! commit thread's jobs are sent: this process's writers take turns in-process, and none meets
//! SQLite's busy handler, whose sleeps (up to 100 ms each) would otherwise land on durable
//! answers. The transactions are short (a chunk) and not fsynced (`synchronous = NORMAL`: the
//! runs are derived, and the next commit's fsync covers them), so a commit waits little.
//!
//! The runs are derived data: deleting both tables' rows (as one transaction) makes the next
//! passes rebuild them from the events.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::ledger::LedgerError;

/// When runs are cut and merged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tiers {
    /// Events above the runs before a new run is cut: what a lookup may have to read by
    /// `seq` besides the runs.
    pub run_events: i64,
    /// Most events one run is cut from (a ledger migrated with millions of events catches up
    /// in runs of this many).
    pub most_events: i64,
    /// Longest the events above the runs wait for a cut while commits go on, however few.
    pub max_lag: Duration,
    /// Runs of one level merged into one run of the next.
    pub fan_in: usize,
    /// Entries written or deleted per transaction.
    pub chunk: usize,
}

impl Tiers {
    /// A cut every 20,000 events; eight runs a merge, so a ledger of 100 million events has
    /// at most ~35 runs; 2,000 entries a transaction, a few milliseconds of the write lock.
    pub(crate) const DEFAULT: Tiers = Tiers {
        run_events: 20_000,
        most_events: 50_000,
        max_lag: Duration::from_secs(10),
        fan_in: 8,
        chunk: 2_000,
    };
}

/// The pace of the passes: commits wake the thread, at most this often.
const PASS_EVERY: Duration = Duration::from_millis(250);

/// Whose turn it is to write: the ledger pool's one write connection (see the module's
/// "Taking turns with the commits").
pub(crate) struct Turns {
    pub pool: sqlx::Pool<sqlx::Sqlite>,
    pub runtime: tokio::runtime::Handle,
}

/// Starts the index thread on a connection of its own to the ledger file at `path`. Returns
/// the sender the commit thread tells of each commit through; the thread ends when it is
/// dropped.
pub(super) fn start(
    path: &Path,
    busy_timeout: Duration,
    turns: Turns,
) -> Result<mpsc::SyncSender<()>, LedgerError> {
    let conn = Connection::open(path).map_err(error)?;
    conn.busy_timeout(busy_timeout).map_err(error)?;
    // Not `secure_delete`: the entries are order ids and sequence numbers, nothing sealed,
    // and zeroing the pages of every merged run would double the merges' writes.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(error)?;
    let (committed, commits) = mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("ledger-orders".into())
        .spawn(move || {
            // A pool connection returns to the pool through a task of the runtime.
            let _runtime = turns.runtime.enter();
            let mut index = OrderRuns::new(conn, Tiers::DEFAULT, Some(turns));
            // Lookups stay right while this fails, reading more events by `seq`.
            super::group_commit::after_commits(
                &commits,
                PASS_EVERY,
                || index.pass(),
                "building the ledger's order index failed; lookups read the events it does not cover",
                "the ledger's order index is built again",
            );
        })
        .map_err(|e| LedgerError::Unavailable(format!("starting the order index thread: {e}")))?;
    Ok(committed)
}

/// The runs of one ledger file, kept by one connection.
pub(crate) struct OrderRuns {
    conn: Connection,
    tiers: Tiers,
    /// `None`: no other writer in this process to take turns with (tests).
    turns: Option<Turns>,
    /// When the last run was cut (or the index opened).
    last_cut: Instant,
    /// Building runs of earlier processes are given up once, at the first pass.
    recovered: bool,
}

/// One input of a merge: a run read in order, a chunk at a time.
struct Input {
    run: i64,
    chunk: std::collections::VecDeque<(String, i64)>,
    /// The last entry read; the next chunk starts after it.
    after: (String, i64),
    done: bool,
}

/// What a finished run replaces when it goes live.
enum Publish<'a> {
    /// A cut: the coverage it started from must be unchanged.
    Cut { above: i64 },
    /// A merge: its inputs must still be live; they die.
    Merge { inputs: &'a [i64] },
}

impl OrderRuns {
    pub(crate) fn new(conn: Connection, tiers: Tiers, turns: Option<Turns>) -> OrderRuns {
        OrderRuns {
            conn,
            tiers,
            turns,
            last_cut: Instant::now(),
            recovered: false,
        }
    }

    /// Runs `f` in a write transaction, in this process's turn.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let _turn = match &self.turns {
            Some(turns) => Some(
                turns
                    .runtime
                    .block_on(turns.pool.acquire())
                    // The turn is the write lock: not getting it is being busy.
                    .map_err(|e| {
                        rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                            Some(format!("the ledger's write turn: {e}")),
                        )
                    })?,
            ),
            None => None,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    /// One round of work after commits: runs cut while enough events wait, merges while a
    /// level is full, dead runs deleted.
    pub(crate) fn pass(&mut self) -> rusqlite::Result<()> {
        if !self.recovered {
            self.write(|tx| {
                tx.execute(
                    "UPDATE order_run_list SET state = 'dead' WHERE state = 'building'",
                    [],
                )
            })?;
            self.recovered = true;
        }
        while self.cut()? {
            while self.merge(usize::MAX)? {}
        }
        while self.merge(usize::MAX)? {}
        self.sweep()
    }

    /// Cuts the events above the runs into a new run if [`Tiers::run_events`] of them wait, or
    /// any have waited [`Tiers::max_lag`]. Returns whether it cut one.
    pub(crate) fn cut(&mut self) -> rusqlite::Result<bool> {
        let above = covered(&self.conn)?;
        let top: i64 =
            self.conn
                .query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))?;
        let waiting = top - above;
        if waiting <= 0
            || (waiting < self.tiers.run_events && self.last_cut.elapsed() < self.tiers.max_lag)
        {
            return Ok(false);
        }
        let mut entries: Vec<(String, i64)> = Vec::new();
        let mut last = above;
        {
            let mut read = self.conn.prepare_cached(
                "SELECT seq, order_id FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let mut rows = read.query(params![above, self.tiers.most_events])?;
            while let Some(row) = rows.next()? {
                last = row.get(0)?;
                if let Some(order) = row.get::<_, Option<String>>(1)? {
                    entries.push((order, last));
                }
            }
        }
        // Rust orders strings by their bytes, as SQLite's default (BINARY) collation does.
        entries.sort_unstable();
        let run = self.begin_run(0, last)?;
        let published = self.or_give_up(run, |index| {
            for chunk in entries.chunks(index.tiers.chunk) {
                index.write(|tx| write_entries(tx, run, chunk))?;
            }
            index.publish(run, Publish::Cut { above })
        })?;
        if published {
            self.last_cut = Instant::now();
        }
        Ok(published)
    }

    /// Merges the oldest [`Tiers::fan_in`] live runs of the lowest level that has as many
    /// into one run of the next level, writing at most `chunks` chunks of its output (tests
    /// stop a merge midway with it; the passes never do). Returns whether it merged.
    pub(crate) fn merge(&mut self, chunks: usize) -> rusqlite::Result<bool> {
        let fan_in = self.tiers.fan_in;
        let level: Option<i64> = self
            .conn
            .query_row(
                "SELECT level FROM order_run_list WHERE state = 'live' GROUP BY level \
                 HAVING count(*) >= ?1 ORDER BY level LIMIT 1",
                [fan_in as i64],
                |r| r.get(0),
            )
            .optional()?;
        let Some(level) = level else {
            return Ok(false);
        };
        let mut runs = Vec::with_capacity(fan_in);
        let mut last_seq = 0;
        {
            let mut list = self.conn.prepare_cached(
                "SELECT run, last_seq FROM order_run_list WHERE state = 'live' AND level = ?1 \
                 ORDER BY run LIMIT ?2",
            )?;
            let mut rows = list.query(params![level, fan_in as i64])?;
            while let Some(row) = rows.next()? {
                runs.push(row.get::<_, i64>(0)?);
                last_seq = last_seq.max(row.get(1)?);
            }
        }
        let output = self.begin_run(level + 1, last_seq)?;
        self.or_give_up(output, |index| index.fill(output, &runs, chunks))?;
        Ok(true)
    }

    /// A new building run of `level` covering up to `last_seq`.
    fn begin_run(&mut self, level: i64, last_seq: i64) -> rusqlite::Result<i64> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO order_run_list (level, last_seq, state) VALUES (?1, ?2, 'building')",
                params![level, last_seq],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// Runs `f`, building `run`; should it fail, gives the run up now rather than at the next
    /// start, so the sweep deletes what it wrote.
    fn or_give_up<T>(
        &mut self,
        run: i64,
        f: impl FnOnce(&mut OrderRuns) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let result = f(self);
        if result.is_err() {
            let _ = self.write(|tx| give_up(tx, run));
        }
        result
    }

    /// Makes the building `run` live if `publish`'s condition holds, else gives it up.
    /// Returns whether it went live.
    fn publish(&mut self, run: i64, publish: Publish<'_>) -> rusqlite::Result<bool> {
        self.write(|tx| {
            let building: bool = tx
                .query_row(
                    "SELECT state = 'building' FROM order_run_list WHERE run = ?1",
                    [run],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(false);
            let holds = building
                && match publish {
                    Publish::Cut { above } => covered(tx)? == above,
                    Publish::Merge { inputs } => {
                        let live: i64 = tx.query_row(
                            &format!(
                                "SELECT count(*) FROM order_run_list \
                                 WHERE state = 'live' AND run IN ({})",
                                vec!["?"; inputs.len()].join(", ")
                            ),
                            rusqlite::params_from_iter(inputs),
                            |r| r.get(0),
                        )?;
                        live == inputs.len() as i64
                    }
                };
            if !holds {
                // Another process cut these events or merged these runs first, or gave this
                // run up as a stopped one.
                give_up(tx, run)?;
                return Ok(false);
            }
            if let Publish::Merge { inputs } = publish {
                tx.execute(
                    &format!(
                        "UPDATE order_run_list SET state = 'dead' WHERE run IN ({})",
                        vec!["?"; inputs.len()].join(", ")
                    ),
                    rusqlite::params_from_iter(inputs),
                )?;
            }
            tx.execute(
                "UPDATE order_run_list SET state = 'live' WHERE run = ?1",
                [run],
            )?;
            Ok(true)
        })
    }

    /// Writes the merge of `runs` into the building run `output`, then makes it live in
    /// their place (see [`OrderRuns::merge`]).
    fn fill(&mut self, output: i64, runs: &[i64], chunks: usize) -> rusqlite::Result<()> {
        let mut inputs: Vec<Input> = runs
            .iter()
            .map(|&run| Input {
                run,
                chunk: Default::default(),
                after: (String::new(), i64::MIN),
                done: false,
            })
            .collect();
        let mut merged = Vec::with_capacity(self.tiers.chunk);
        let mut written = 0;
        loop {
            for input in &mut inputs {
                if input.chunk.is_empty() && !input.done {
                    self.read_chunk(input)?;
                }
            }
            let next = inputs
                .iter_mut()
                .filter(|i| !i.chunk.is_empty())
                .min_by(|a, b| a.chunk[0].cmp(&b.chunk[0]));
            let Some(input) = next else { break };
            merged.extend(input.chunk.pop_front());
            if merged.len() == self.tiers.chunk {
                if written == chunks {
                    return Ok(());
                }
                self.write(|tx| write_entries(tx, output, &merged))?;
                merged.clear();
                written += 1;
                // A long merge does not hold up the cuts: lookups keep reading few events by
                // `seq`. A cut adds a run of level 0, never one of this merge's inputs.
                self.cut()?;
            }
        }
        if written == chunks {
            return Ok(());
        }
        self.write(|tx| write_entries(tx, output, &merged))?;
        self.publish(output, Publish::Merge { inputs: runs })?;
        Ok(())
    }

    fn read_chunk(&self, input: &mut Input) -> rusqlite::Result<()> {
        let mut read = self.conn.prepare_cached(
            "SELECT order_id, seq FROM order_runs WHERE run = ?1 AND (order_id, seq) > (?2, ?3) \
             ORDER BY order_id, seq LIMIT ?4",
        )?;
        let mut rows = read.query(params![
            input.run,
            input.after.0,
            input.after.1,
            self.tiers.chunk as i64
        ])?;
        while let Some(row) = rows.next()? {
            input.chunk.push_back((row.get(0)?, row.get(1)?));
        }
        match input.chunk.back() {
            Some(last) => input.after = last.clone(),
            None => input.done = true,
        }
        Ok(())
    }

    /// Deletes the entries of dead runs, a chunk a transaction, then the runs.
    pub(crate) fn sweep(&mut self) -> rusqlite::Result<()> {
        let dead: Vec<i64> = {
            let mut list = self
                .conn
                .prepare_cached("SELECT run FROM order_run_list WHERE state = 'dead'")?;
            let rows = list.query_map([], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let chunk = self.tiers.chunk as i64;
        for run in dead {
            while self.write(|tx| {
                let deleted = tx.execute(
                    "DELETE FROM order_runs WHERE run = ?1 AND (order_id, seq) IN \
                     (SELECT order_id, seq FROM order_runs WHERE run = ?1 LIMIT ?2)",
                    params![run, chunk],
                )?;
                if deleted == 0 {
                    tx.execute(
                        "DELETE FROM order_run_list WHERE run = ?1 AND state = 'dead'",
                        [run],
                    )?;
                }
                Ok(deleted > 0)
            })? {}
        }
        Ok(())
    }
}

/// The largest `seq` the live runs cover: every event up to it is in one of them.
fn covered(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT coalesce(max(last_seq), 0) FROM order_run_list WHERE state = 'live'",
        [],
        |r| r.get(0),
    )
}

fn give_up(tx: &Transaction<'_>, run: i64) -> rusqlite::Result<usize> {
    tx.execute(
        "UPDATE order_run_list SET state = 'dead' WHERE run = ?1",
        [run],
    )
}

fn write_entries(
    tx: &Transaction<'_>,
    run: i64,
    entries: &[(String, i64)],
) -> rusqlite::Result<()> {
    let mut insert =
        tx.prepare_cached("INSERT INTO order_runs (run, order_id, seq) VALUES (?1, ?2, ?3)")?;
    for (order, seq) in entries {
        insert.execute(params![run, order, seq])?;
    }
    Ok(())
}

fn error(e: rusqlite::Error) -> LedgerError {
    LedgerError::Unavailable(format!("ledger order index: {e}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ledger::Ledger;

    /// Tiers small enough that a few hundred events make every kind of step happen.
    const SMALL: Tiers = Tiers {
        run_events: 7,
        most_events: 13,
        max_lag: Duration::from_secs(3600),
        fan_in: 3,
        chunk: 4,
    };

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        ledger: crate::ledger::sql::SqlLedger<sqlx::Sqlite>,
        /// Inserts events and reads the truth: every event scanned, no index.
        conn: Connection,
        next_event: u64,
    }

    impl Fixture {
        async fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ledger.sqlite3");
            let ledger = super::super::open_file(&path).await.unwrap();
            let conn = Connection::open(&path).unwrap();
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
            Fixture {
                _dir: dir,
                path,
                ledger,
                conn,
                next_event: 0,
            }
        }

        fn runs(&self, tiers: Tiers) -> OrderRuns {
            let conn = Connection::open(&self.path).unwrap();
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
            OrderRuns::new(conn, tiers, None)
        }

        /// Records an event of `sku` naming `order` (or none).
        fn record(&mut self, sku: &str, kind: &str, order: Option<&str>) {
            self.next_event += 1;
            let n = self.next_event;
            self.conn
                .execute(
                    "INSERT INTO events (event_id, sku, kind, at_ms, key_local_ids, order_id, \
                     fields_json) VALUES (?1, ?2, ?3, ?4, '1', ?5, '{}')",
                    params![format!("{sku}/{n}-0"), sku, kind, n as i64, order],
                )
                .unwrap();
        }

        /// The events of order `order` of `sku`, (seq, kind), oldest first.
        fn truth(&self, sku: &str, order: &str) -> Vec<(i64, String)> {
            let mut scan = self
                .conn
                .prepare("SELECT seq, sku, order_id, kind FROM events NOT INDEXED ORDER BY seq")
                .unwrap();
            let rows = scan
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .unwrap();
            rows.map(Result::unwrap)
                .filter(|(_, s, o, _)| s == sku && o.as_deref() == Some(order))
                .map(|(seq, _, _, kind)| (seq, kind))
                .collect()
        }

        /// Every order's events as the ledger finds them equal a scan of every event, and the
        /// live runs hold exactly the order events they cover, once each.
        async fn check(&self, names: &[String]) {
            for sku in ["a", "b"] {
                for name in names {
                    let found: Vec<i64> = self
                        .ledger
                        .order_events(sku, name)
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|(seq, _)| seq)
                        .collect();
                    let truth: Vec<i64> = self
                        .truth(sku, name)
                        .into_iter()
                        .map(|(seq, _)| seq)
                        .collect();
                    assert_eq!(found, truth, "order {sku}/{name}");
                }
            }
            let orders = self.ledger.find_orders(names).await.unwrap();
            let found: BTreeMap<(String, String), i64> = orders
                .into_iter()
                .map(|o| ((o.sku, o.order_key), o.cursor.seq))
                .collect();
            let mut expected = BTreeMap::new();
            for sku in ["a", "b"] {
                for name in names {
                    // An order is made by its first hold or claim; events of none are not one.
                    let truth = self.truth(sku, name);
                    if let Some((first, _)) =
                        truth.iter().find(|(_, k)| k == "hold" || k == "claim")
                    {
                        expected.insert((sku.to_owned(), name.clone()), *first);
                    }
                }
            }
            assert_eq!(found, expected, "orders by name");
            let covered = covered(&self.conn).unwrap();
            let entries = |sql: &str| -> Vec<(String, i64)> {
                let mut stmt = self.conn.prepare(sql).unwrap();
                let rows = stmt
                    .query_map([covered], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap();
                let mut rows: Vec<_> = rows.map(Result::unwrap).collect();
                rows.sort();
                rows
            };
            assert_eq!(
                entries(
                    "SELECT r.order_id, r.seq FROM order_run_list l JOIN order_runs r \
                     ON r.run = l.run WHERE l.state = 'live' AND ?1 = ?1"
                ),
                entries(
                    "SELECT order_id, seq FROM events \
                     WHERE order_id IS NOT NULL AND seq <= ?1"
                ),
                "live runs against the events they cover"
            );
        }

        fn count(&self, sql: &str) -> i64 {
            self.conn.query_row(sql, [], |r| r.get(0)).unwrap()
        }
    }

    /// A small generator, so a failing sequence of steps is the same on every run.
    struct Steps(u64);

    impl Steps {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_stay_right_through_cuts_merges_and_stops_midway() {
        let mut f = Fixture::new().await;
        let names: Vec<String> = (0..25).map(|i| format!("ch/o-{i}")).collect();
        let mut runs = f.runs(SMALL);
        let mut steps = Steps(7);
        let mut merged_midway = 0;
        for _ in 0..300 {
            for _ in 0..steps.below(12) {
                let sku = if steps.below(3) == 0 { "b" } else { "a" };
                let kind = ["claim", "hold", "confirm", "void"][steps.below(4) as usize];
                let order = (kind != "void").then(|| names[steps.below(25) as usize].clone());
                f.record(sku, kind, order.as_deref());
            }
            match steps.below(6) {
                0 => runs.pass().unwrap(),
                1 => {
                    runs.cut().unwrap();
                }
                // Stopped after a few chunks of its output, as a process killed midway.
                2 if runs.merge(steps.below(3) as usize).unwrap() => merged_midway += 1,
                3 => runs = f.runs(SMALL),
                _ => {}
            }
            f.check(&names).await;
        }
        assert!(merged_midway > 0, "no merge was stopped midway");
        // A last start gives the stopped merges up; its pass leaves every level short of a
        // merge, nothing building and nothing dead.
        let mut runs = f.runs(SMALL);
        runs.pass().unwrap();
        f.check(&names).await;
        assert_eq!(
            f.count("SELECT count(*) FROM order_run_list WHERE state <> 'live'"),
            0
        );
        assert_eq!(
            f.count(
                "SELECT count(*) FROM order_runs WHERE run NOT IN \
                 (SELECT run FROM order_run_list)"
            ),
            0
        );
        assert!(
            f.count(
                "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM order_run_list \
                 GROUP BY level)"
            ) < SMALL.fan_in as i64,
            "a full level left unmerged"
        );
        assert!(
            f.count("SELECT max(level) FROM order_run_list") >= 2,
            "merged runs were merged again"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_indexers_on_one_file_keep_one_copy_of_each_entry() {
        let mut f = Fixture::new().await;
        let names: Vec<String> = (0..10).map(|i| format!("o-{i}")).collect();
        let mut one = f.runs(SMALL);
        let mut other = f.runs(SMALL);
        let mut steps = Steps(11);
        for round in 0..200 {
            for _ in 0..steps.below(9) {
                let name = names[steps.below(10) as usize].clone();
                f.record("a", "claim", Some(&name));
            }
            let (first, second) = if round % 2 == 0 {
                (&mut one, &mut other)
            } else {
                (&mut other, &mut one)
            };
            // One starts a merge and stops; the other merges the same runs whole, or gives
            // the first's up as stopped when it starts afresh.
            first.merge(steps.below(2) as usize).unwrap();
            if steps.below(4) == 0 {
                *second = f.runs(SMALL);
            }
            second.pass().unwrap();
            f.check(&names).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_few_events_are_cut_once_they_have_waited_long_enough() {
        let mut f = Fixture::new().await;
        let waiting = Tiers {
            max_lag: Duration::ZERO,
            ..SMALL
        };
        f.record("a", "claim", Some("o-1"));
        let mut patient = f.runs(SMALL);
        assert!(!patient.cut().unwrap(), "one event is not a run yet");
        assert!(f.runs(waiting).cut().unwrap());
        assert_eq!(covered(&f.conn).unwrap(), 1);
        f.check(&["o-1".to_owned()]).await;
    }

    /// The readers' statements seek the runs and the events above them, whatever the sizes:
    /// a plan that scans the runs or the events would make every lookup read the ledger.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_seek_and_never_scan() {
        let f = Fixture::new().await;
        let dialect = super::super::DIALECT;
        for (sql, binds) in [
            (
                format!(
                    "SELECT e.seq FROM events e WHERE e.sku = ?1 AND {} ORDER BY e.seq",
                    dialect.naming("(?2)")
                ),
                2,
            ),
            (
                format!(
                    "WITH names (id) AS (VALUES (?1), (?2)) SELECT e.seq FROM events e \
                     WHERE {} ORDER BY e.seq",
                    dialect.naming("(SELECT id FROM names)")
                ),
                2,
            ),
        ] {
            let mut plan = f
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap();
            let steps: Vec<String> = plan
                .query_map(rusqlite::params_from_iter(vec!["x"; binds]), |r| r.get(3))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let scans: Vec<&String> = steps
                .iter()
                .filter(|s| s.starts_with("SCAN") && !s.contains("names") && s != &"SCAN l")
                .filter(|s| !s.starts_with("SCAN 2 CONSTANT ROWS"))
                .collect();
            assert!(scans.is_empty(), "{sql}: {steps:#?}");
            assert!(
                steps
                    .iter()
                    .any(|s| s.contains("SEARCH r USING PRIMARY KEY (run=? AND order_id=?)")),
                "{sql}: {steps:#?}"
            );
        }
    }
}
