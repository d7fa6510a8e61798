//! The [`Ledger`] implementation, written once for SQLite and PostgreSQL.
//!
//! # Why one implementation
//!
//! The two schemas are column-for-column identical and every statement here is plain SQL both
//! speak (`ON CONFLICT`, `RETURNING`, `UPDATE … FROM` a `VALUES` list), so the logic that must
//! not diverge (duplicate detection, id allocation, applying events) exists once. What does
//! differ is captured in [`Dialect`]:
//!
//! - **Write transactions.** SQLite starts them with `BEGIN IMMEDIATE`: a deferred transaction
//!   that reads and then writes can fail with `SQLITE_BUSY` at the upgrade instead of waiting.
//!   PostgreSQL uses its default `READ COMMITTED` and takes row locks where it matters.
//! - **Row locks.** PostgreSQL appends `FOR UPDATE` / `FOR SHARE` to reads of rows a
//!   transaction depends on (the SKU's id counter, the batch, the keys an event changes), so
//!   concurrent imports of one SKU serialise on its counter and concurrent writers cannot lose
//!   updates. SQLite has one writer at a time and needs none.
//! - **Bind-parameter limits** (32766 for SQLite, 65535 for PostgreSQL): multi-row statements
//!   are cut to fit, and to at most [`MAX_ROWS_PER_STATEMENT`] rows.
//! - **Placeholders** of generated multi-row statements: `$n` for PostgreSQL, anonymous `?`
//!   for SQLite (fixed statements use `$n`, which both accept); see [`Placeholders`].
//!
//! - **An import's two bulk statements** ([`Bulk`]): finding which codes a SKU already has,
//!   and inserting the fresh ones, are where an import spends its time, and each backend has
//!   its own fastest way to do them (see `sqlite` and `postgres`).
//!
//! Statements built with a variable number of rows would each be a new entry in the
//! prepared-statement cache, evicting useful ones. The event writer's statements, which run
//! for every group commit, are therefore cut into power-of-two chunks and one small rest
//! ([`pow2_chunks`](statements::pow2_chunks)): a bounded set of shapes per statement,
//! parsed once per connection and then reused (parsing a statement of thousands of
//! parameters cost more than running it), while a commit of a few dozen events takes one
//! statement per table. Import statements run once per chunk of a file and stay out of the
//! cache (`persistent(false)`).
//!
//! # Layout
//!
//! Here: the [`Ledger`] implementation's SKUs and reads; `batches`: imports; `events`:
//! applying engine events; `pauses`: incident pauses; `channels`: selling channels and their
//! tokens; `orders`: a channel's orders read back from their events; `statements`:
//! multi-row statement shapes.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;

use futures_util::TryStreamExt;
use sqlx::database::HasStatementCache;
use sqlx::{
    ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Transaction, Type,
};

mod batches;
mod channels;
mod events;
mod orders;
mod pauses;
mod statements;

pub(crate) use statements::{tuples, STATEMENT_CACHE};

use super::rules::KeyState;
use super::sqlite::GroupCommit;
use super::stream::entry_of;
use super::{
    BatchCounts, BatchRecord, BatchStart, ChannelEventRecord, ChannelRecord, ChannelTokenRecord,
    EventRecord, InsertOutcome, KeyRecord, Ledger, LedgerError, LedgerEvent, NewKey, NewPause,
    OrderCursor, OrderRecord, PauseEventRecord, PauseRecord, Recode, Seal, SkuRecord, StateCounts,
    StoredCode,
};
use crate::engine::stream_id::StreamId;
use crate::sku::{key_id, parse_key_id};

/// Most rows one multi-row statement carries, whatever the parameter limit allows: keeps
/// statements (and the time they hold locks) short.
pub(crate) const MAX_ROWS_PER_STATEMENT: usize = 1000;

/// How a backend differs from the other; see the module docs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dialect {
    /// Statement opening a write transaction; `None` for the driver's default `BEGIN`.
    pub begin_write: Option<&'static str>,
    /// Statement opening a commit of engine events (`sql/events.rs`); `None` for
    /// [`Self::begin_write`]'s.
    pub begin_events: Option<&'static str>,
    /// Whether commits of engine events keep a connection of their own from one commit to
    /// the next rather than taking one from the pool each time
    /// ([`SqlLedger::kept_events_connection`]).
    pub hold_events_connection: bool,
    /// Appended to a read of rows the transaction will change.
    pub lock_rows: &'static str,
    /// Appended to a read of rows that must not change before the transaction commits.
    pub share_rows: &'static str,
    /// Most bind parameters one statement may carry.
    pub max_binds: usize,
    /// How generated multi-row statements write their parameters.
    pub placeholders: Placeholders,
    /// How an order's events are found by its id.
    pub order_index: OrderIndex,
}

/// How an order's events are found by its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OrderIndex {
    /// The `events_order` index (PostgreSQL).
    Events,
    /// Sorted runs built behind the commits, and the events above them by `seq` (SQLite:
    /// `sqlite/order_runs.rs`).
    Runs,
}

/// How generated multi-row statements write their parameters. Either way a generated
/// statement names its parameters in the order they are bound, numbered from 1, so one
/// statement text serves both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placeholders {
    /// `$1, $2, …` (PostgreSQL).
    Numbered,
    /// `?, ?, …`, bound in order of appearance (SQLite). Binding a named or numbered
    /// parameter (`?n`, `$n`) makes sqlx ask SQLite for its name, which SQLite finds by a
    /// linear scan: binding a statement of ten thousand such parameters is quadratic and
    /// took most of an import's time. Anonymous ones have no name to look up.
    InOrder,
}

impl Dialect {
    /// A condition on the events `e` that holds for those naming one of the orders `names`
    /// (a parenthesised list or subquery of order ids), answered through the order index.
    pub(crate) fn naming(&self, names: &str) -> String {
        match self.order_index {
            OrderIndex::Events => format!("e.order_id IN {names}"),
            // The runs and the events above them are read in one statement, one snapshot, so
            // the events the live runs cover and those above them meet without a gap. (Every
            // entry of every run names a true event; runs not live, a merge's output being
            // written and its inputs until deleted, would only be read twice.)
            // `CROSS JOIN` makes SQLite seek each live run for the names; left to itself,
            // with no statistics, it may scan every entry instead.
            OrderIndex::Runs => format!(
                "e.order_id IN {names} AND e.seq IN (\
                 SELECT r.seq FROM order_run_list l CROSS JOIN order_runs r ON r.run = l.run \
                 WHERE l.state = 'live' AND r.order_id IN {names} \
                 UNION ALL SELECT t.seq FROM events t WHERE t.seq > (\
                 SELECT coalesce(max(last_seq), 0) FROM order_run_list WHERE state = 'live') \
                 AND t.order_id IN {names})"
            ),
        }
    }

    /// Rows per multi-row statement when each row binds `per_row` parameters and the
    /// statement `fixed` more.
    pub(crate) fn rows_per_statement(&self, per_row: usize, fixed: usize) -> usize {
        (self.max_binds.saturating_sub(fixed) / per_row).clamp(1, MAX_ROWS_PER_STATEMENT)
    }
}

impl Placeholders {
    /// Parameter `n` (from 1), which must be the `n`-th to appear in the statement.
    pub(crate) fn param(self, n: usize) -> String {
        match self {
            Placeholders::Numbered => format!("${n}"),
            Placeholders::InOrder => "?".to_owned(),
        }
    }
}

/// The ledger over one sqlx database. Reads and writes may use different pools: SQLite
/// funnels writes through a single connection so writers queue in-process instead of
/// spinning on the file lock, while reads run concurrently (WAL).
pub(crate) struct SqlLedger<DB: Database> {
    read: Pool<DB>,
    write: Pool<DB>,
    dialect: Dialect,
    /// Where the event writer's group commits go instead of through `write` (SQLite files:
    /// see [`GroupCommit`]).
    group_commit: Option<GroupCommit>,
    /// Event batches waiting to commit together (`sql/events.rs`).
    turns: events::Turns,
    /// The connection commits of engine events keep between two commits, out of the pool
    /// ([`Dialect::hold_events_connection`]).
    events_conn: std::sync::Mutex<Option<DB::Connection>>,
}

/// What each backend does its own way in an import: per chunk, one query finds which codes
/// the SKU already has and one statement inserts the fresh ones. Both run inside the chunk's
/// write transaction, after the SKU's id counter was locked.
#[async_trait::async_trait]
pub(crate) trait Bulk: Database {
    /// Which of `digests` (sorted, distinct) the SKU already has, as
    /// `(digest, local id, batch id)`. Must look each digest up through the `(sku, digest)`
    /// index: a plan that scans the SKU's keys instead makes an import quadratic in its size.
    async fn existing_digests(
        conn: &mut Self::Connection,
        dialect: &Dialect,
        sku: &str,
        digests: &[&str],
    ) -> Result<Vec<(String, i64, String)>, LedgerError>;

    /// Inserts `rows` (each with its allocated local id) as keys of pending batch `batch_id`,
    /// in the state a fresh key has, stamped `updated_at_ms`.
    async fn insert_fresh(
        conn: &mut Self::Connection,
        dialect: &Dialect,
        sku: &str,
        batch_id: &str,
        updated_at_ms: i64,
        rows: &[(i64, &NewKey, String)],
    ) -> Result<(), LedgerError>;

    /// Clears what rows changed or deleted left behind in the database's files (see
    /// [`Ledger::purge_freed`]).
    async fn purge_freed(write: &Pool<Self>) -> Result<(), LedgerError>;

    /// Brings the planner's statistics of `keys` up to date after an upload added many rows,
    /// before they are read back (warm-up pages through them at once).
    async fn analyze_keys(write: &Pool<Self>) -> Result<(), LedgerError>;

    /// The end of a commit's writes in one part of a `WITH`, where the database takes it
    /// there (PostgreSQL; `None` elsewhere, and they are statements of their own): an insert
    /// of the audit links `(sku, local id, event seq)` into `event_keys`, one shape whatever
    /// their number, then a read of the rebuild fences of the SKUs the commit passes,
    /// `(sku, read_gen)`, locked for share until it ends (`pass_fence` in `sql/events.rs`).
    /// It follows `WITH`, or the update of the keys in one, its parameters numbered from
    /// `first`.
    fn links_and_fences(_first: usize) -> Option<String> {
        None
    }

    /// A commit's first two steps as one statement, where the database takes them so
    /// (PostgreSQL; `None` elsewhere, and they are statements of their own): `insert`, an
    /// `INSERT INTO events … RETURNING seq, event_id`, then a read of `columns` (a list of
    /// plain column names) of keys by SKU and local id, locked for update in order of SKU
    /// (bytewise, as Rust orders strings) and local id, the order the keys are read in a SKU
    /// at a time. Its rows are `(seq, event_id, NULL…)` for each event recorded and
    /// `(NULL, sku, columns…)` for each key found. The keys are parameters `first` and
    /// `first + 1`: one shape whatever their number.
    fn record_and_lock(_insert: &str, _columns: &str, _first: usize) -> Option<String> {
        None
    }

    /// Binds the keys, local ids by SKU, to the parameters of [`Bulk::record_and_lock`].
    fn bind_record_and_lock<'q>(
        query: sqlx::query::Query<'q, Self, Self::Arguments<'q>>,
        _keys: &BTreeMap<&'q str, BTreeSet<i64>>,
    ) -> sqlx::query::Query<'q, Self, Self::Arguments<'q>> {
        query
    }

    /// Binds `links` and the SKUs `fenced` to the parameters of [`Bulk::links_and_fences`].
    fn bind_links_and_fences<'q>(
        query: sqlx::query::Query<'q, Self, Self::Arguments<'q>>,
        _links: &[(&'q str, i64, i64)],
        _fenced: &[&'q str],
    ) -> sqlx::query::Query<'q, Self, Self::Arguments<'q>> {
        query
    }
}

/// Keys an upload must have added for its end to refresh the statistics ([`Bulk::analyze_keys`]).
const ANALYZE_AFTER_KEYS: u64 = 10_000;

const SKU_COLUMNS: &str = "sku, config_json, format_version, epoch, created_at_ms, updated_at_ms";
const KEY_COLUMNS: &str = "sku, local_id, digest, code, batch_id, format_version, \
     expires_at_ms, max_issues, max_uses, held, sold, uses, void, state, order_id, user_id, \
     redeemer, redeemed_at_ms, updated_at_ms";
/// The condition on `keys` (its SKU bound as `$1`) that leaves out the keys of batches not
/// active: only those count and warm. A SKU's pending batches are few, usually none, so this
/// is one small lookup per query (migrations/*/0011_batch_visibility.sql).
const VISIBLE: &str =
    "batch_id NOT IN (SELECT batch_id FROM batches WHERE sku = $1 AND state <> 'active')";
const EVENT_COLUMNS: &str =
    "e.event_id, e.sku, e.kind, e.at_ms, e.order_id, e.user_id, e.redeemer, e.reason, e.fields_json";

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
    /// A ledger over already migrated pools.
    pub(crate) fn new(read: Pool<DB>, write: Pool<DB>, dialect: Dialect) -> SqlLedger<DB> {
        SqlLedger {
            read,
            write,
            dialect,
            group_commit: None,
            turns: events::Turns::default(),
            events_conn: std::sync::Mutex::new(None),
        }
    }

    /// Sends the event writer's group commits to `group_commit`.
    pub(crate) fn with_group_commit(mut self, group_commit: GroupCommit) -> SqlLedger<DB> {
        self.group_commit = Some(group_commit);
        self
    }

    async fn begin_write(&self) -> Result<Transaction<'static, DB>, LedgerError> {
        Ok(match self.dialect.begin_write {
            Some(statement) => self.write.begin_with(statement).await?,
            None => self.write.begin().await?,
        })
    }

    /// Opens a commit of engine events ([`Dialect::begin_events`]).
    async fn begin_events(&self) -> Result<Transaction<'static, DB>, LedgerError> {
        match self.dialect.begin_events {
            Some(statement) => Ok(self.write.begin_with(statement).await?),
            None => self.begin_write().await,
        }
    }

    /// The connection the last commit of engine events kept, if any
    /// ([`Dialect::hold_events_connection`]).
    ///
    /// Commits take turns (`sql/events.rs`), so one connection serves them all. Taken from
    /// the pool, a connection costs a commit two more round trips, each a wake-up of a
    /// server process: the pool's check of a connection it hands out, in the commit every
    /// durable answer waits for, and the one of a connection handed back.
    fn kept_events_connection(&self) -> Option<DB::Connection> {
        self.events_conn.lock().expect("events connection").take()
    }

    /// Keeps `conn`, its commit done, for the next commit of engine events. A connection
    /// whose commit failed is not kept but dropped, which ends its session and rolls back
    /// whatever its transaction did.
    fn keep_events_connection(&self, conn: DB::Connection) {
        *self.events_conn.lock().expect("events connection") = Some(conn);
    }

    fn sku_from_row(row: &DB::Row) -> Result<SkuRecord, LedgerError> {
        let version: i64 = row.try_get(2)?;
        Ok(SkuRecord {
            sku: row.try_get(0)?,
            config_json: row.try_get(1)?,
            format_version: u32::try_from(version)
                .map_err(|_| LedgerError::Corrupt(format!("format_version {version}")))?,
            epoch: row.try_get(3)?,
            created_at_ms: row.try_get(4)?,
            updated_at_ms: row.try_get(5)?,
        })
    }

    fn key_from_row(row: &DB::Row) -> Result<KeyRecord, LedgerError> {
        let sku: String = row.try_get(0)?;
        let local_id: i64 = row.try_get(1)?;
        Ok(KeyRecord {
            key_id: key_id(&sku, &local_id.to_string()),
            sku,
            local_id,
            digest: row.try_get(2)?,
            code: row.try_get(3)?,
            batch_id: row.try_get(4)?,
            format_version: row.try_get(5)?,
            expires_at_ms: row.try_get(6)?,
            max_issues: row.try_get(7)?,
            max_uses: row.try_get(8)?,
            held: row.try_get(9)?,
            sold: row.try_get(10)?,
            uses: row.try_get(11)?,
            void: row.try_get(12)?,
            state: row.try_get(13)?,
            order_id: row.try_get(14)?,
            user_id: row.try_get(15)?,
            redeemer: row.try_get(16)?,
            redeemed_at_ms: row.try_get(17)?,
            updated_at_ms: row.try_get(18)?,
        })
    }

    fn event_from_row(row: &DB::Row) -> Result<EventRecord, LedgerError> {
        Ok(EventRecord {
            event_id: row.try_get(0)?,
            sku: row.try_get(1)?,
            kind: row.try_get(2)?,
            at_ms: row.try_get(3)?,
            order_id: row.try_get(4)?,
            user_id: row.try_get(5)?,
            redeemer: row.try_get(6)?,
            reason: row.try_get(7)?,
            fields_json: row.try_get(8)?,
        })
    }
}

#[async_trait::async_trait]
impl<DB> Ledger for SqlLedger<DB>
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
    async fn put_sku(
        &self,
        sku: &str,
        config_json: &str,
        format_version: u32,
        now_ms: i64,
    ) -> Result<bool, LedgerError> {
        let mut tx = self.begin_write().await?;
        let created = sqlx::query(
            "INSERT INTO skus (sku, config_json, format_version, next_local_id, created_at_ms, \
             updated_at_ms) VALUES ($1, $2, $3, 1, $4, $4) ON CONFLICT (sku) DO NOTHING \
             RETURNING sku",
        )
        .bind(sku)
        .bind(config_json)
        .bind(i64::from(format_version))
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        if created {
            // Before any event of the SKU: a commit's fence check locks this row.
            sqlx::query(
                "INSERT INTO rebuild_fences (sku) VALUES ($1) ON CONFLICT (sku) DO NOTHING",
            )
            .bind(sku)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query(
                "UPDATE skus SET config_json = $2, format_version = $3, updated_at_ms = $4 \
                 WHERE sku = $1",
            )
            .bind(sku)
            .bind(config_json)
            .bind(i64::from(format_version))
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(created)
    }

    async fn get_sku(&self, sku: &str) -> Result<Option<SkuRecord>, LedgerError> {
        let sql = format!("SELECT {SKU_COLUMNS} FROM skus WHERE sku = $1");
        let row = sqlx::query(&sql)
            .bind(sku)
            .fetch_optional(&self.read)
            .await?;
        row.map(|r| Self::sku_from_row(&r)).transpose()
    }

    async fn list_skus(&self) -> Result<Vec<String>, LedgerError> {
        let rows = sqlx::query("SELECT sku FROM skus ORDER BY sku")
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(LedgerError::from))
            .collect()
    }

    async fn replace_sku_config(
        &self,
        sku: &str,
        old_json: &str,
        new_json: &str,
        now_ms: i64,
    ) -> Result<bool, LedgerError> {
        let replaced = sqlx::query(
            "UPDATE skus SET config_json = $3, updated_at_ms = $4 \
             WHERE sku = $1 AND config_json = $2 RETURNING sku",
        )
        .bind(sku)
        .bind(old_json)
        .bind(new_json)
        .bind(now_ms)
        .fetch_optional(&self.write)
        .await?;
        Ok(replaced.is_some())
    }

    async fn set_epoch(&self, sku: &str, epoch: &str) -> Result<(), LedgerError> {
        let updated = sqlx::query("UPDATE skus SET epoch = $2 WHERE sku = $1 RETURNING sku")
            .bind(sku)
            .bind(epoch)
            .fetch_optional(&self.write)
            .await?;
        if updated.is_none() {
            return Err(LedgerError::NotFound(format!("SKU {sku}")));
        }
        Ok(())
    }

    async fn fence_rebuild(&self, sku: &str, gen: &str) -> Result<(), LedgerError> {
        let mut tx = self.begin_write().await?;
        // Waits for the commits holding the row for share (`pass_fence`).
        let moved = sqlx::query(
            "INSERT INTO rebuild_fences (sku, read_gen) VALUES ($1, $2) \
             ON CONFLICT (sku) DO UPDATE SET read_gen = excluded.read_gen \
             WHERE rebuild_fences.read_gen IS NULL OR rebuild_fences.read_gen <> excluded.read_gen \
             RETURNING sku",
        )
        .bind(sku)
        .bind(gen)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        if moved {
            sqlx::query("DELETE FROM rereads WHERE sku = $1")
                .bind(sku)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn rereads(&self) -> Result<Vec<String>, LedgerError> {
        let rows = sqlx::query("SELECT sku FROM rereads ORDER BY sku")
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(LedgerError::from))
            .collect()
    }

    async fn begin_batch(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        now_ms: i64,
    ) -> Result<BatchStart, LedgerError> {
        self.start_batch(sku, batch_id, upload_id, now_ms).await
    }

    async fn touch_batch(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        self.touch_upload(sku, batch_id, upload_id, now_ms).await
    }

    async fn insert_keys(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        rows: &[NewKey],
        seal: &dyn Seal,
    ) -> Result<Vec<InsertOutcome>, LedgerError> {
        self.insert_batch_keys(sku, batch_id, upload_id, rows, seal)
            .await
    }

    async fn finish_batch(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        report: &BatchCounts,
        activate: bool,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        self.finish_upload(sku, batch_id, upload_id, report, activate, now_ms)
            .await
    }

    async fn activate_batch(
        &self,
        sku: &str,
        batch_id: &str,
        now_ms: i64,
    ) -> Result<BatchRecord, LedgerError> {
        self.activate_finished(sku, batch_id, now_ms).await
    }

    async fn abort_batch(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
    ) -> Result<(), LedgerError> {
        self.abort_upload(sku, batch_id, upload_id).await
    }

    async fn get_batch(
        &self,
        sku: &str,
        batch_id: &str,
    ) -> Result<Option<BatchRecord>, LedgerError> {
        let mut conn = self.read.acquire().await?;
        Self::batch_in(&mut conn, sku, batch_id, "").await
    }

    async fn keys_after(
        &self,
        sku: &str,
        after_local_id: i64,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, LedgerError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE sku = $1 AND local_id > $2 \
             AND {VISIBLE} ORDER BY local_id LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(sku)
            .bind(after_local_id)
            .bind(i64::from(limit))
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(Self::key_from_row).collect()
    }

    async fn stored_codes_after(
        &self,
        sku: &str,
        after_local_id: i64,
        limit: u32,
    ) -> Result<Vec<StoredCode>, LedgerError> {
        let rows = sqlx::query(
            "SELECT local_id, digest, code FROM keys WHERE sku = $1 AND local_id > $2 \
             ORDER BY local_id LIMIT $3",
        )
        .bind(sku)
        .bind(after_local_id)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredCode {
                    local_id: row.try_get(0)?,
                    digest: row.try_get(1)?,
                    code: row.try_get(2)?,
                })
            })
            .collect()
    }

    async fn recode_keys(&self, sku: &str, recodes: &[Recode]) -> Result<u64, LedgerError> {
        if recodes.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;
        let mut changed = 0;
        for r in recodes {
            let updated = sqlx::query(
                "UPDATE keys SET code = $3, digest = $4 \
                 WHERE sku = $1 AND local_id = $2 AND code = $5 RETURNING local_id",
            )
            .bind(sku)
            .bind(r.local_id)
            .bind(r.code.as_str())
            .bind(r.digest.as_str())
            .bind(r.old_code.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            changed += u64::from(updated.is_some());
        }
        tx.commit().await?;
        Ok(changed)
    }

    async fn key_checks(&self) -> Result<Vec<(String, String, String)>, LedgerError> {
        let rows = sqlx::query("SELECT key_id, kind, check_value FROM key_checks ORDER BY key_id")
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect()
    }

    async fn add_key_check(
        &self,
        key_id: &str,
        kind: &str,
        check_value: &str,
        now_ms: i64,
    ) -> Result<bool, LedgerError> {
        let mut tx = self.begin_write().await?;
        let added = sqlx::query(
            "INSERT INTO key_checks (key_id, kind, check_value, created_at_ms) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (key_id) DO NOTHING RETURNING key_id",
        )
        .bind(key_id)
        .bind(kind)
        .bind(check_value)
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(added.is_some())
    }

    async fn purge_freed(&self) -> Result<(), LedgerError> {
        DB::purge_freed(&self.write).await
    }

    async fn has_unsealed_codes(&self) -> Result<bool, LedgerError> {
        let row = sqlx::query("SELECT local_id FROM keys WHERE code NOT LIKE 'e1.%' LIMIT 1")
            .fetch_optional(&self.read)
            .await?;
        Ok(row.is_some())
    }

    async fn apply_events(&self, events: &[LedgerEvent]) -> Result<u64, LedgerError> {
        self.record_events(events, None).await
    }

    async fn apply_events_beside<'a>(
        &'a self,
        events: &'a [LedgerEvent],
        beside: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    ) -> Result<u64, LedgerError> {
        self.record_events(events, Some(beside)).await
    }

    async fn key_events(&self, key_id: &str) -> Result<Vec<EventRecord>, LedgerError> {
        let Some((sku, local_id)) = parse_local(key_id) else {
            return Ok(Vec::new());
        };
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM event_keys k JOIN events e ON e.seq = k.event_seq \
             WHERE k.sku = $1 AND k.local_id = $2 ORDER BY e.at_ms, e.seq"
        );
        let rows = sqlx::query(&sql)
            .bind(sku)
            .bind(local_id)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(Self::event_from_row).collect()
    }

    async fn order_events_after(
        &self,
        sku: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, EventRecord)>, LedgerError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, e.seq FROM events e \
             WHERE e.sku = $1 AND e.seq > $2 AND e.order_id IS NOT NULL ORDER BY e.seq LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(sku)
            .bind(after_seq)
            .bind(i64::from(limit))
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(9)?, Self::event_from_row(row)?)))
            .collect()
    }

    async fn order_events(
        &self,
        sku: &str,
        order_id: &str,
    ) -> Result<Vec<(i64, EventRecord)>, LedgerError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, e.seq FROM events e WHERE e.sku = $1 AND {} ORDER BY e.seq",
            self.dialect.naming("($2)")
        );
        let rows = sqlx::query(&sql)
            .bind(sku)
            .bind(order_id)
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(9)?, Self::event_from_row(row)?)))
            .collect()
    }

    async fn last_entry(&self, sku: &str) -> Result<Option<StreamId>, LedgerError> {
        // Every event of the SKU, read as a stream: ids are text, and their order is numeric
        // (`<ms>-<seq>`), so no SQL `max` over the column finds the largest. Only a rebuild
        // (which reads every key and order event of the SKU besides) and an epoch check that
        // found the engine replaced ask.
        let mut rows = sqlx::query("SELECT event_id FROM events WHERE sku = $1")
            .bind(sku)
            .fetch(&self.read);
        let mut last = None;
        while let Some(row) = rows.try_next().await? {
            let event_id: String = row.try_get(0)?;
            last = last.max(StreamId::parse(entry_of(&event_id)));
        }
        Ok(last)
    }

    async fn get_key(&self, key_id: &str) -> Result<Option<KeyRecord>, LedgerError> {
        let Some((sku, local_id)) = parse_local(key_id) else {
            return Ok(None);
        };
        let sql = format!("SELECT {KEY_COLUMNS} FROM keys WHERE sku = $1 AND local_id = $2");
        let row = sqlx::query(&sql)
            .bind(sku)
            .bind(local_id)
            .fetch_optional(&self.read)
            .await?;
        row.map(|r| Self::key_from_row(&r)).transpose()
    }

    async fn counts(&self, sku: &str) -> Result<StateCounts, LedgerError> {
        let sql =
            format!("SELECT state, COUNT(*) FROM keys WHERE sku = $1 AND {VISIBLE} GROUP BY state");
        let rows = sqlx::query(&sql).bind(sku).fetch_all(&self.read).await?;
        let mut counts = StateCounts::default();
        for row in rows {
            let name: String = row.try_get(0)?;
            let state = KeyState::parse(&name)
                .ok_or_else(|| LedgerError::Corrupt(format!("unknown key state {name:?}")))?;
            *counts.slot(state) = count(row.try_get(1)?)?;
        }
        Ok(counts)
    }

    async fn counts_by_version(
        &self,
        sku: &str,
    ) -> Result<std::collections::BTreeMap<i64, StateCounts>, LedgerError> {
        let sql = format!(
            "SELECT format_version, state, COUNT(*) FROM keys WHERE sku = $1 AND {VISIBLE} \
             GROUP BY format_version, state"
        );
        let rows = sqlx::query(&sql).bind(sku).fetch_all(&self.read).await?;
        let mut out = std::collections::BTreeMap::<i64, StateCounts>::new();
        for row in rows {
            let name: String = row.try_get(1)?;
            let state = KeyState::parse(&name)
                .ok_or_else(|| LedgerError::Corrupt(format!("unknown key state {name:?}")))?;
            *out.entry(row.try_get(0)?).or_default().slot(state) = count(row.try_get(2)?)?;
        }
        Ok(out)
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    async fn gateway_seen(&self, id: &str, now_ms: i64) -> Result<(), LedgerError> {
        sqlx::query(
            "INSERT INTO gateways (id, seen_at_ms) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET seen_at_ms = excluded.seen_at_ms",
        )
        .bind(id)
        .bind(now_ms)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn gateways_seen_since(&self, since_ms: i64) -> Result<Vec<String>, LedgerError> {
        let rows = sqlx::query("SELECT id FROM gateways WHERE seen_at_ms >= $1 ORDER BY id")
            .bind(since_ms)
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(LedgerError::from))
            .collect()
    }

    async fn gateway_gone(&self, id: &str, now_ms: i64) -> Result<(), LedgerError> {
        // Gateways that died leave their rows: one that stops cleanly removes them too.
        const FORGET_AFTER_MS: i64 = 3_600_000;
        sqlx::query("DELETE FROM gateways WHERE id = $1 OR seen_at_ms < $2")
            .bind(id)
            .bind(now_ms - FORGET_AFTER_MS)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn pauses(&self) -> Result<Vec<PauseRecord>, LedgerError> {
        self.pauses_in_force().await
    }

    async fn pause(&self, pause: &NewPause) -> Result<Option<PauseRecord>, LedgerError> {
        self.put_pause(pause).await
    }

    async fn resume(
        &self,
        sku: &str,
        action: &str,
        reason: Option<&str>,
        actor: &str,
        at_ms: i64,
    ) -> Result<Option<PauseRecord>, LedgerError> {
        self.lift_pause(sku, action, reason, actor, at_ms).await
    }

    async fn pause_history(
        &self,
        sku: Option<&str>,
        limit: u32,
    ) -> Result<Vec<PauseEventRecord>, LedgerError> {
        self.pause_events(sku, limit).await
    }

    async fn pools(&self, sku: &str) -> Result<Vec<(String, i64)>, LedgerError> {
        let rows =
            sqlx::query("SELECT pool, level FROM pools WHERE sku = $1 AND level > 0 ORDER BY pool")
                .bind(sku)
                .fetch_all(&self.read)
                .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    async fn channels(&self) -> Result<Vec<ChannelRecord>, LedgerError> {
        self.all_channels().await
    }

    async fn put_channel(
        &self,
        channel: &str,
        config_json: &str,
        actor: &str,
        at_ms: i64,
    ) -> Result<bool, LedgerError> {
        self.upsert_channel(channel, config_json, actor, at_ms)
            .await
    }

    async fn add_channel_token(
        &self,
        token: &ChannelTokenRecord,
        actor: &str,
    ) -> Result<bool, LedgerError> {
        self.insert_channel_token(token, actor).await
    }

    async fn revoke_channel_token(
        &self,
        channel: &str,
        token_id: &str,
        actor: &str,
        at_ms: i64,
    ) -> Result<Option<ChannelTokenRecord>, LedgerError> {
        self.revoke_token(channel, token_id, actor, at_ms).await
    }

    async fn channel_history(
        &self,
        channel: &str,
        limit: u32,
    ) -> Result<Vec<ChannelEventRecord>, LedgerError> {
        self.channel_events(channel, limit).await
    }

    async fn channel_orders(
        &self,
        channel: &str,
        from_ms: i64,
        to_ms: i64,
        after: Option<OrderCursor>,
        limit: u32,
    ) -> Result<Vec<OrderRecord>, LedgerError> {
        self.orders_of_channel(channel, from_ms, to_ms, after, limit)
            .await
    }

    async fn find_orders(&self, order_keys: &[String]) -> Result<Vec<OrderRecord>, LedgerError> {
        self.orders_by_name(order_keys).await
    }
}

/// Splits a public key id into SKU and numeric local id.
fn parse_local(key_id: &str) -> Option<(&str, i64)> {
    let (sku, local) = parse_key_id(key_id)?;
    Some((sku, local.parse().ok()?))
}

/// A stored count, which is never negative.
fn count(value: i64) -> Result<u64, LedgerError> {
    u64::try_from(value).map_err(|_| LedgerError::Corrupt(format!("negative count {value}")))
}
