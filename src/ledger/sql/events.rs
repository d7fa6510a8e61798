//! Applying engine events to the ledger: each event recorded once (its `event_id` is
//! unique), the keys it names loaded and locked, replayed in memory with the same rules as
//! the engine, written back, and linked to the event for the audit trail, all in one
//! transaction.
//!
//! # Commits that meet go together
//!
//! The event writer commits each SKU's batches on its own, concurrently for different SKUs.
//! Calls that come while a commit of this ledger runs wait for their turn, and the next turn
//! commits every batch waiting then in one transaction, in the order they came: one fsync,
//! one round of statements, for a sale of several SKUs as for one. Each call still gets its
//! own answer: how many of its events were new, or the error. A batch the ledger rejects
//! (not a passing outage) is not allowed to fail the others: the batches of a rejected turn
//! are committed again one by one, so each gets the answer it would have got alone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;

use sqlx::database::HasStatementCache;
use sqlx::{
    ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Transaction, Type,
};

use super::statements::{pow2_chunks, tuples};
use super::{Bulk, SqlLedger};
use crate::ledger::replay::{self, NewEvent};
use crate::ledger::rules::KeyStatus;
use crate::ledger::{LedgerError, LedgerEvent};

/// Work `apply_events_beside` runs beside a commit.
type Beside<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The batches waiting for the next turn to commit (see "Commits that meet go together").
#[derive(Default)]
pub(crate) struct Turns {
    /// Held by the call committing.
    turn: tokio::sync::Mutex<()>,
    waiting: Mutex<Vec<Waiting>>,
    next_id: AtomicU64,
}

/// One call's batch, waiting.
struct Waiting {
    id: u64,
    events: Vec<LedgerEvent>,
    /// Told once the statements ran (the caller starts its work beside the commit then);
    /// dropped if they failed.
    ran: Option<oneshot::Sender<()>>,
    done: oneshot::Sender<Result<u64, LedgerError>>,
}

/// What applying events reads and writes of a key ([`KeyStatus`] plus its id).
const STATUS_COLUMNS: &str = "local_id, voids, held, sold, uses, max_issues, max_uses, \
     order_id, user_id, redeemer, redeemed_at_ms, updated_at_ms, order_entry, redeem_entry";

impl<DB> SqlLedger<DB>
where
    DB: Database + HasStatementCache + Bulk,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    usize: ColumnIndex<DB::Row>,
{
    /// [`Ledger::apply_events`](crate::ledger::Ledger::apply_events), with `beside` run
    /// alongside the commit ([`Ledger::apply_events_beside`](crate::ledger::Ledger::apply_events_beside)),
    /// in one transaction with the batches of other calls waiting at the same time (see
    /// "Commits that meet go together").
    pub(super) async fn record_events(
        &self,
        events: &[LedgerEvent],
        beside: Option<Beside<'_>>,
    ) -> Result<u64, LedgerError> {
        // A writer's batch may carry an entry twice (a reclaim racing a read): once is enough.
        let mut seen = HashSet::new();
        let events: Vec<LedgerEvent> = events
            .iter()
            .filter(|e| seen.insert(e.event_id.as_str()))
            .cloned()
            .collect();
        if events.is_empty() {
            if let Some(beside) = beside {
                beside.await;
            }
            return Ok(0);
        }
        let turns = &self.turns;
        let id = turns.next_id.fetch_add(1, Ordering::Relaxed);
        let (ran, statements_ran) = oneshot::channel();
        let (done, answer) = oneshot::channel();
        turns
            .waiting
            .lock()
            .expect("waiting batches")
            .push(Waiting {
                id,
                events,
                ran: Some(ran),
                done,
            });
        let mut answer = answer;
        let commit = async {
            tokio::select! {
                // A turn under way took this batch along: its answer comes when that commit
                // ends, not after the next turn's, which would hold the lock by then.
                answered = &mut answer => answered,
                turn = turns.turn.lock() => {
                    let batches = {
                        let mut waiting = turns.waiting.lock().expect("waiting batches");
                        if waiting.iter().any(|w| w.id == id) {
                            std::mem::take(&mut *waiting)
                        } else {
                            Vec::new()
                        }
                    };
                    if !batches.is_empty() {
                        self.commit_turn(batches).await;
                    }
                    drop(turn);
                    (&mut answer).await
                }
            }
        };
        let alongside = async {
            if let Some(beside) = beside {
                if statements_ran.await.is_ok() {
                    beside.await;
                }
            }
        };
        let (answered, ()) = tokio::join!(commit, alongside);
        answered.unwrap_or_else(|_| Err(LedgerError::Unavailable("a commit was dropped".into())))
    }

    /// Commits `batches` (in the order they came) in one transaction, and answers each.
    async fn commit_turn(&self, mut batches: Vec<Waiting>) {
        if let [one] = batches.as_mut_slice() {
            let signal = one.ran.take().map(|ran| {
                Box::pin(async move {
                    let _ = ran.send(());
                }) as Beside<'static>
            });
            let result = self.commit_events(&one.events, signal).await;
            let batch = batches.pop().expect("one batch");
            let _ = batch
                .done
                .send(result.map(|new| new.iter().filter(|n| **n).count() as u64));
            return;
        }
        // Each event once, the first batch that has it first: as if committed in turn.
        let mut seen = HashSet::new();
        let events: Vec<LedgerEvent> = batches
            .iter()
            .flat_map(|b| &b.events)
            .filter(|e| seen.insert(e.event_id.as_str()))
            .cloned()
            .collect();
        let rans: Vec<_> = batches.iter_mut().filter_map(|b| b.ran.take()).collect();
        let signal: Beside<'static> = Box::pin(async move {
            for ran in rans {
                let _ = ran.send(());
            }
        });
        match self.commit_events(&events, Some(signal)).await {
            Ok(new) => {
                let mut new: HashMap<&str, bool> = events
                    .iter()
                    .map(|e| e.event_id.as_str())
                    .zip(new)
                    .collect();
                for batch in batches {
                    // An event two batches carry counts for the first.
                    let n = batch
                        .events
                        .iter()
                        .filter(|e| new.get_mut(e.event_id.as_str()).is_some_and(std::mem::take))
                        .count();
                    let _ = batch.done.send(Ok(n as u64));
                }
            }
            Err(e) if e.is_retryable() => {
                for batch in batches {
                    let _ = batch.done.send(Err(e.clone()));
                }
            }
            Err(_) => {
                for batch in batches {
                    let result = self.commit_events(&batch.events, None).await;
                    let _ = batch
                        .done
                        .send(result.map(|new| new.iter().filter(|n| **n).count() as u64));
                }
            }
        }
    }

    /// Records `events` (each `event_id` once) in one transaction, `beside` run alongside
    /// its `COMMIT` (dropped unrun if a statement fails). Says of each event whether it was
    /// new to the ledger.
    async fn commit_events(
        &self,
        events: &[LedgerEvent],
        mut beside: Option<Beside<'static>>,
    ) -> Result<Vec<bool>, LedgerError> {
        if let Some(group_commit) = &self.group_commit {
            // Held for the job: this process's writes take turns on one lock.
            let _writer = self.write.acquire().await?;
            return group_commit.record(events.to_vec(), beside).await;
        }
        if !self.dialect.hold_events_connection {
            let tx = self.begin_events().await?;
            return self.record_and_commit(tx, events, beside).await;
        }
        let begin = self.dialect.begin_events.unwrap_or("BEGIN");
        if let Some(mut conn) = self.kept_events_connection() {
            let done = match sqlx::Connection::begin_with(&mut conn, begin).await {
                Ok(tx) => Some(self.record_and_commit(tx, events, beside.take()).await),
                // Ended while it waited (a restarted server, an operator, a server-side idle
                // timeout): nothing ran on it, so a new connection takes the commit.
                Err(_) => None,
            };
            if let Some(done) = done {
                let new = done?;
                self.keep_events_connection(conn);
                return Ok(new);
            }
        }
        let mut conn = self.write.acquire().await?.detach();
        let tx = sqlx::Connection::begin_with(&mut conn, begin).await?;
        let new = self.record_and_commit(tx, events, beside).await?;
        self.keep_events_connection(conn);
        Ok(new)
    }

    /// Records `events` in `tx` and commits it, `beside` run alongside the `COMMIT`. On an
    /// error the transaction is rolled back (its connection is then dropped, not kept).
    async fn record_and_commit(
        &self,
        mut tx: Transaction<'_, DB>,
        events: &[LedgerEvent],
        beside: Option<Beside<'static>>,
    ) -> Result<Vec<bool>, LedgerError> {
        let new = self.record(&mut tx, events).await?;
        commit_beside(tx.commit(), beside).await?;
        Ok(new)
    }

    /// The statements of a commit of `events`, on `conn`, in its transaction: says of each
    /// event whether it was new to the ledger.
    async fn record(
        &self,
        conn: &mut DB::Connection,
        events: &[LedgerEvent],
    ) -> Result<Vec<bool>, LedgerError> {
        // Record the events; those already recorded are not returned and change nothing.
        // Where the database can, the statement that records them also reads and locks the
        // keys they name (all of them: which events are new is known only after), whatever
        // their SKUs: a round trip per SKU fewer in the commit every durable answer waits
        // for. For one statement's events, a durable commit's usual shape; otherwise the keys
        // are read on their own below, a SKU at a time.
        let mut recorded: HashMap<String, i64> = HashMap::new();
        let p = self.dialect.placeholders;
        let chunks = pow2_chunks(events, self.dialect.rows_per_statement(11, 2));
        let named = replay::keys_named(events);
        let lock_with = (chunks.len() == 1 && !named.is_empty()).then_some(&named);
        // The keys read with the events, by SKU: every SKU `named` has, once read.
        let mut locked: Option<BTreeMap<&str, Vec<(i64, KeyStatus)>>> = None;
        for chunk in chunks {
            let insert = format!(
                "INSERT INTO events (event_id, sku, kind, at_ms, key_local_ids, order_id, \
                 user_id, redeemer, reason, late, fields_json) VALUES {} \
                 ON CONFLICT (event_id) DO NOTHING RETURNING seq, event_id",
                tuples(p, chunk.len(), 11, 1)
            );
            let with_keys = lock_with.and_then(|named| {
                let sql = DB::record_and_lock(&insert, STATUS_COLUMNS, chunk.len() * 11 + 1)?;
                Some((sql, named))
            });
            let mut query = sqlx::query(with_keys.as_ref().map_or(&insert, |(sql, _)| sql));
            for e in chunk {
                let ids: Vec<String> = e.key_local_ids.iter().map(i64::to_string).collect();
                query = query
                    .bind(e.event_id.as_str())
                    .bind(e.sku.as_str())
                    .bind(e.kind.as_str())
                    .bind(e.at_ms)
                    .bind(ids.join(","))
                    .bind(e.order_id.as_deref())
                    .bind(e.user_id.as_deref())
                    .bind(e.redeemer.as_deref())
                    .bind(e.reason.as_deref())
                    .bind(e.late)
                    .bind(e.fields_json.as_str());
            }
            if let Some((_, named)) = &with_keys {
                query = DB::bind_record_and_lock(query, named);
            }
            let mut statuses: BTreeMap<&str, Vec<(i64, KeyStatus)>> = BTreeMap::new();
            for row in query.fetch_all(&mut *conn).await? {
                // An event's row has its seq; a key's has none, and its SKU instead of an
                // event id (see `Bulk::record_and_lock`).
                match row.try_get::<Option<i64>, _>(0)? {
                    Some(seq) => {
                        recorded.insert(row.try_get(1)?, seq);
                    }
                    None => {
                        let sku: String = row.try_get(1)?;
                        let (sku, _) = named.get_key_value(sku.as_str()).ok_or_else(|| {
                            LedgerError::Corrupt(format!("a key of {sku} read unasked"))
                        })?;
                        statuses
                            .entry(sku)
                            .or_default()
                            .push(Self::status_from_row(&row, 2)?);
                    }
                }
            }
            if with_keys.is_some() {
                locked = Some(statuses);
            }
        }
        let new: Vec<bool> = events
            .iter()
            .map(|e| recorded.contains_key(&e.event_id))
            .collect();
        let applied: Vec<NewEvent> = events
            .iter()
            .filter_map(|e| Some(NewEvent::new(e, *recorded.get(&e.event_id)?)))
            .collect();

        let mut keys = BTreeMap::new();
        for (sku, ids) in replay::keys_to_load(&applied) {
            // Read with the events, the keys of events already recorded too: replay changes
            // only those the new ones name.
            let statuses = match &mut locked {
                Some(locked) => locked.remove(sku).unwrap_or_default(),
                None => self.load_statuses(conn, sku, &ids).await?,
            };
            for (id, status) in statuses {
                keys.insert((sku, id), status);
            }
        }
        let replayed = replay::replay(&applied, keys);
        replayed.log_skipped();
        let links = replay::audit_links(&applied);
        let gens = replay::generations(&applied);
        let fenced: BTreeSet<&str> = gens.iter().map(|(sku, _)| *sku).collect();
        let fenced: Vec<&str> = fenced.into_iter().collect();
        // Where the database can, the audit links and the rebuild fences go with the first
        // update of the keys: two round trips fewer in the commit every durable answer waits
        // for.
        let mut tail = Tail {
            links: &links,
            fenced: &fenced,
            fences: None,
        };
        for (sku, rows) in &replayed.changed {
            self.store_statuses(conn, sku, rows, &mut tail).await?;
        }
        for ((sku, pool), (delta, at_ms)) in replay::pool_changes(&applied) {
            sqlx::query(
                "INSERT INTO pools (sku, pool, level, updated_at_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (sku, pool) DO UPDATE SET level = pools.level + excluded.level, \
                 updated_at_ms = excluded.updated_at_ms",
            )
            .bind(sku)
            .bind(pool.as_str())
            .bind(delta)
            .bind(at_ms)
            .execute(&mut *conn)
            .await?;
        }

        if tail.fences.is_none() && !(links.is_empty() && fenced.is_empty()) {
            if let Some(alone) = DB::links_and_fences(1) {
                let sql = format!("WITH {alone}");
                let query = DB::bind_links_and_fences(sqlx::query(&sql), &links, &fenced);
                tail.fences = Some(fences_read(query.fetch_all(&mut *conn).await?)?);
            }
        }
        match &tail.fences {
            Some(fences) => {
                for (sku, gen) in gens {
                    let read = fences.get(sku).and_then(Option::as_deref);
                    self.mark_if_behind(conn, sku, gen, read).await?;
                }
            }
            None => {
                let p = self.dialect.placeholders;
                for chunk in pow2_chunks(&links, self.dialect.rows_per_statement(3, 0)) {
                    let sql = format!(
                        "INSERT INTO event_keys (sku, local_id, event_seq) VALUES {}",
                        tuples(p, chunk.len(), 3, 1)
                    );
                    let mut query = sqlx::query(&sql);
                    for (sku, id, seq) in chunk {
                        query = query.bind(*sku).bind(*id).bind(*seq);
                    }
                    query.execute(&mut *conn).await?;
                }
                for (sku, gen) in gens {
                    self.pass_fence(conn, sku, gen).await?;
                }
            }
        }

        Ok(new)
    }

    /// Checks a commit of events of generation `gen` of `sku` against the SKU's rebuild
    /// fence (migrations/*/*_rebuild_fences.sql): the row is locked for share until the
    /// commit, so a rebuild's fence comes wholly before or after it; behind the fence of
    /// another generation, the SKU is marked to be rebuilt again. Where the database reads
    /// the fences with the commit's last writes ([`Bulk::links_and_fences`]), only the mark
    /// is left ([`Self::mark_if_behind`]): when in the transaction the lock is taken does
    /// not matter, as long as the fence is read under it and held until `COMMIT`.
    async fn pass_fence(
        &self,
        conn: &mut DB::Connection,
        sku: &str,
        gen: &str,
    ) -> Result<(), LedgerError> {
        let sql = format!(
            "SELECT read_gen FROM rebuild_fences WHERE sku = $1{}",
            self.dialect.share_rows
        );
        let read: Option<Option<String>> = match sqlx::query(&sql)
            .bind(sku)
            .fetch_optional(&mut *conn)
            .await?
        {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        };
        self.mark_if_behind(conn, sku, gen, read.flatten().as_deref())
            .await
    }

    /// Marks `sku` to be rebuilt again if its fence, read under the lock [`Self::pass_fence`]
    /// takes, names a generation (`read`) other than `gen`, that of events this commit records.
    async fn mark_if_behind(
        &self,
        conn: &mut DB::Connection,
        sku: &str,
        gen: &str,
        read: Option<&str>,
    ) -> Result<(), LedgerError> {
        if read.is_some_and(|read| read != gen) {
            let marked = sqlx::query(
                "INSERT INTO rereads (sku, marked_at_ms) VALUES ($1, $2) \
                 ON CONFLICT (sku) DO NOTHING RETURNING sku",
            )
            .bind(sku)
            .bind(crate::clock::now_ms() as i64)
            .fetch_optional(&mut *conn)
            .await?;
            if marked.is_some() {
                tracing::warn!(
                    sku,
                    gen,
                    "events of a lost generation committed after the SKU's rebuild read \
                     the ledger: it is to be rebuilt again"
                );
            }
        }
        Ok(())
    }

    /// Loads the status of `ids` of `sku` (those that exist), locking them for the update.
    async fn load_statuses(
        &self,
        conn: &mut DB::Connection,
        sku: &str,
        ids: &BTreeSet<i64>,
    ) -> Result<Vec<(i64, KeyStatus)>, LedgerError> {
        let ids: Vec<i64> = ids.iter().copied().collect();
        let mut out = Vec::with_capacity(ids.len());
        let p = self.dialect.placeholders;
        for chunk in pow2_chunks(&ids, self.dialect.rows_per_statement(1, 1)) {
            let sql = format!(
                "SELECT {STATUS_COLUMNS} FROM keys WHERE sku = {} AND local_id IN {} \
                 ORDER BY local_id{}",
                p.param(1),
                tuples(p, 1, chunk.len(), 2),
                self.dialect.lock_rows
            );
            let mut query = sqlx::query(&sql).bind(sku);
            for id in chunk {
                query = query.bind(*id);
            }
            for row in query.fetch_all(&mut *conn).await? {
                out.push(Self::status_from_row(&row, 0)?);
            }
        }
        Ok(out)
    }

    /// A key's id and status from [`STATUS_COLUMNS`] in `row`, from column `at` on.
    fn status_from_row(row: &DB::Row, at: usize) -> Result<(i64, KeyStatus), LedgerError> {
        let status = KeyStatus {
            voids: row.try_get(at + 1)?,
            held: row.try_get(at + 2)?,
            sold: row.try_get(at + 3)?,
            uses: row.try_get(at + 4)?,
            max_issues: row.try_get(at + 5)?,
            max_uses: row.try_get(at + 6)?,
            order_id: row.try_get(at + 7)?,
            user_id: row.try_get(at + 8)?,
            redeemer: row.try_get(at + 9)?,
            redeemed_at_ms: row.try_get(at + 10)?,
            updated_at_ms: row.try_get(at + 11)?,
            order_entry: row.try_get(at + 12)?,
            redeem_entry: row.try_get(at + 13)?,
        };
        Ok((row.try_get(at)?, status))
    }

    /// Writes changed key statuses back, many rows per `UPDATE … FROM (VALUES …)`, the first
    /// of them with `tail` where the database takes it in the same statement
    /// ([`Bulk::links_and_fences`]).
    async fn store_statuses(
        &self,
        conn: &mut DB::Connection,
        sku: &str,
        rows: &[(i64, KeyStatus)],
        tail: &mut Tail<'_, '_>,
    ) -> Result<(), LedgerError> {
        let p = self.dialect.placeholders;
        // The SKU, and the tail's parameters.
        for chunk in pow2_chunks(rows, self.dialect.rows_per_statement(14, 5)) {
            let values = tuples(p, chunk.len(), 14, 1);
            // The SKU comes last in the update's text, so it is bound last, then the tail's.
            let sku_param = p.param(chunk.len() * 14 + 1);
            let then = match tail.fences {
                None => DB::links_and_fences(chunk.len() * 14 + 2),
                Some(_) => None,
            };
            let update = format!(
                "UPDATE keys SET voids = v.voids, void = v.void, held = v.held, sold = v.sold, \
                 uses = v.uses, state = v.state, order_id = v.order_id, user_id = v.user_id, \
                 redeemer = v.redeemer, redeemed_at_ms = v.redeemed_at_ms, \
                 updated_at_ms = v.updated_at_ms, order_entry = v.order_entry, \
                 redeem_entry = v.redeem_entry \
                 FROM v WHERE keys.sku = {sku_param} AND keys.local_id = v.local_id"
            );
            let columns = "v (local_id, voids, void, held, sold, uses, state, order_id, user_id, \
                 redeemer, redeemed_at_ms, updated_at_ms, order_entry, redeem_entry)";
            let sql = match &then {
                Some(then) => {
                    format!("WITH {columns} AS (VALUES {values}), changed AS ({update}), {then}")
                }
                None => format!("WITH {columns} AS (VALUES {values}) {update}"),
            };
            let mut query = sqlx::query(&sql);
            for (local_id, k) in chunk {
                query = query
                    .bind(*local_id)
                    .bind(k.voids)
                    .bind(k.void())
                    .bind(k.held)
                    .bind(k.sold)
                    .bind(k.uses)
                    .bind(k.state().as_str())
                    .bind(k.order_id.as_deref())
                    .bind(k.user_id.as_deref())
                    .bind(k.redeemer.as_deref())
                    .bind(k.redeemed_at_ms)
                    .bind(k.updated_at_ms)
                    .bind(k.order_entry.as_deref())
                    .bind(k.redeem_entry.as_deref());
            }
            query = query.bind(sku);
            if then.is_some() {
                query = DB::bind_links_and_fences(query, tail.links, tail.fenced);
                tail.fences = Some(fences_read(query.fetch_all(&mut *conn).await?)?);
            } else {
                query.execute(&mut *conn).await?;
            }
        }
        Ok(())
    }
}

/// Runs `commit` (a transaction's `COMMIT`) with `beside` alongside.
async fn commit_beside<T>(
    commit: impl Future<Output = Result<T, sqlx::Error>>,
    beside: Option<Beside<'static>>,
) -> Result<(), LedgerError> {
    match beside {
        Some(beside) => tokio::join!(commit, beside).0?,
        None => commit.await?,
    };
    Ok(())
}

/// What a commit writes after the keys where the database can take it with their first
/// update ([`Bulk::links_and_fences`]).
struct Tail<'a, 'l> {
    /// The audit links, `(sku, local id, event seq)`.
    links: &'a [(&'l str, i64, i64)],
    /// The SKUs whose rebuild fences the commit passes.
    fenced: &'a [&'l str],
    /// Once written: the fences read, by SKU (a fence not yet set is `None`).
    fences: Option<HashMap<String, Option<String>>>,
}

/// The rows of [`Bulk::links_and_fences`]: each fence's SKU and `read_gen`.
fn fences_read<R>(rows: Vec<R>) -> Result<HashMap<String, Option<String>>, LedgerError>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
{
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}
