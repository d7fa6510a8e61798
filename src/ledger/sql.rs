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
//! ([`pow2_chunks`]): a bounded set of shapes per statement, parsed once per connection and
//! then reused (parsing a statement of thousands of parameters cost more than running it),
//! while a commit of a few dozen events takes one statement per table. Import statements run
//! once per chunk of a file and stay out of the cache (`persistent(false)`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use sqlx::database::HasStatementCache;
use sqlx::{
    ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Transaction, Type,
};

mod pauses;

use super::replay::{self, NewEvent};
use super::rules::{KeyState, KeyStatus};
use super::{
    BatchCounts, BatchRecord, BatchStart, EventRecord, InsertOutcome, KeyRecord, Ledger,
    LedgerError, LedgerEvent, NewKey, NewPause, PauseEventRecord, PauseRecord, Recode, Seal,
    SkuRecord, StateCounts, StoredCode, UPLOAD_LEASE_MS,
};
use crate::sku::{key_id, parse_key_id};

/// Most rows one multi-row statement carries, whatever the parameter limit allows: keeps
/// statements (and the time they hold locks) short.
pub(crate) const MAX_ROWS_PER_STATEMENT: usize = 1000;

/// How a backend differs from the other; see the module docs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dialect {
    /// Statement opening a write transaction; `None` for the driver's default `BEGIN`.
    pub begin_write: Option<&'static str>,
    /// Appended to a read of rows the transaction will change.
    pub lock_rows: &'static str,
    /// Appended to a read of rows that must not change before the transaction commits.
    pub share_rows: &'static str,
    /// Most bind parameters one statement may carry.
    pub max_binds: usize,
    /// How generated multi-row statements write their parameters.
    pub placeholders: Placeholders,
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
}

const SKU_COLUMNS: &str = "sku, config_json, format_version, epoch, created_at_ms, updated_at_ms";
const BATCH_COLUMNS: &str = "sku, batch_id, state, accepted, rejected, duplicate, \
     created_at_ms, activated_at_ms, upload_id, touched_at_ms";
const KEY_COLUMNS: &str = "sku, local_id, digest, code, batch_id, format_version, \
     expires_at_ms, max_issues, max_uses, held, sold, uses, void, state, order_id, user_id, \
     redeemer, redeemed_at_ms, updated_at_ms";
/// What applying events reads and writes of a key ([`KeyStatus`] plus its id).
const STATUS_COLUMNS: &str = "local_id, void, held, sold, uses, max_issues, max_uses, \
     order_id, user_id, redeemer, redeemed_at_ms, updated_at_ms";
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
        }
    }

    async fn begin_write(&self) -> Result<Transaction<'static, DB>, LedgerError> {
        Ok(match self.dialect.begin_write {
            Some(statement) => self.write.begin_with(statement).await?,
            None => self.write.begin().await?,
        })
    }

    /// A batch, read inside `conn`'s transaction with the lock clause `lock`.
    async fn batch_in(
        conn: &mut DB::Connection,
        sku: &str,
        batch_id: &str,
        lock: &str,
    ) -> Result<Option<BatchRecord>, LedgerError> {
        let sql =
            format!("SELECT {BATCH_COLUMNS} FROM batches WHERE sku = $1 AND batch_id = $2{lock}");
        let row = sqlx::query(&sql)
            .bind(sku)
            .bind(batch_id)
            .fetch_optional(&mut *conn)
            .await?;
        row.map(|r| Self::batch_from_row(&r)).transpose()
    }

    /// The pending batch upload `upload_id` is filling, read inside `conn`'s transaction with
    /// the lock clause `lock` (see [`check_owner`]).
    async fn owned_batch(
        conn: &mut DB::Connection,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        lock: &str,
    ) -> Result<BatchRecord, LedgerError> {
        let batch = Self::batch_in(conn, sku, batch_id, lock)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("batch {batch_id} of SKU {sku}")))?;
        check_owner(&batch, upload_id)?;
        Ok(batch)
    }

    /// Marks a pending batch and its keys active: one `UPDATE` of the keys, however many.
    async fn activate_in(
        conn: &mut DB::Connection,
        sku: &str,
        batch_id: &str,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        sqlx::query("UPDATE keys SET active = TRUE WHERE sku = $1 AND batch_id = $2")
            .bind(sku)
            .bind(batch_id)
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "UPDATE batches SET state = 'active', activated_at_ms = $3 \
             WHERE sku = $1 AND batch_id = $2",
        )
        .bind(sku)
        .bind(batch_id)
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
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
                let status = KeyStatus {
                    void: row.try_get(1)?,
                    held: row.try_get(2)?,
                    sold: row.try_get(3)?,
                    uses: row.try_get(4)?,
                    max_issues: row.try_get(5)?,
                    max_uses: row.try_get(6)?,
                    order_id: row.try_get(7)?,
                    user_id: row.try_get(8)?,
                    redeemer: row.try_get(9)?,
                    redeemed_at_ms: row.try_get(10)?,
                    updated_at_ms: row.try_get(11)?,
                };
                out.push((row.try_get(0)?, status));
            }
        }
        Ok(out)
    }

    /// Writes changed key statuses back, many rows per `UPDATE … FROM (VALUES …)`.
    async fn store_statuses(
        &self,
        conn: &mut DB::Connection,
        sku: &str,
        rows: &[(i64, KeyStatus)],
    ) -> Result<(), LedgerError> {
        let p = self.dialect.placeholders;
        for chunk in pow2_chunks(rows, self.dialect.rows_per_statement(11, 1)) {
            // The SKU comes last in the text, so it is bound last.
            let sql = format!(
                "WITH v (local_id, void, held, sold, uses, state, order_id, user_id, redeemer, \
                 redeemed_at_ms, updated_at_ms) AS (VALUES {}) \
                 UPDATE keys SET void = v.void, held = v.held, sold = v.sold, uses = v.uses, \
                 state = v.state, order_id = v.order_id, user_id = v.user_id, \
                 redeemer = v.redeemer, redeemed_at_ms = v.redeemed_at_ms, \
                 updated_at_ms = v.updated_at_ms \
                 FROM v WHERE keys.sku = {} AND keys.local_id = v.local_id",
                tuples(p, chunk.len(), 11, 1),
                p.param(chunk.len() * 11 + 1)
            );
            let mut query = sqlx::query(&sql);
            for (local_id, k) in chunk {
                query = query
                    .bind(*local_id)
                    .bind(k.void)
                    .bind(k.held)
                    .bind(k.sold)
                    .bind(k.uses)
                    .bind(k.state().as_str())
                    .bind(k.order_id.as_deref())
                    .bind(k.user_id.as_deref())
                    .bind(k.redeemer.as_deref())
                    .bind(k.redeemed_at_ms)
                    .bind(k.updated_at_ms);
            }
            query.bind(sku).execute(&mut *conn).await?;
        }
        Ok(())
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

    fn batch_from_row(row: &DB::Row) -> Result<BatchRecord, LedgerError> {
        Ok(BatchRecord {
            sku: row.try_get(0)?,
            batch_id: row.try_get(1)?,
            state: row.try_get(2)?,
            accepted: count(row.try_get(3)?)?,
            rejected: count(row.try_get(4)?)?,
            duplicate: count(row.try_get(5)?)?,
            created_at_ms: row.try_get(6)?,
            activated_at_ms: row.try_get(7)?,
            upload_id: row.try_get(8)?,
            touched_at_ms: row.try_get(9)?,
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
        if !created {
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

    async fn begin_batch(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        now_ms: i64,
    ) -> Result<BatchStart, LedgerError> {
        let mut tx = self.begin_write().await?;
        // Concurrent first attempts race on the primary key; exactly one inserts.
        let inserted = sqlx::query(
            "INSERT INTO batches (sku, batch_id, state, created_at_ms, upload_id, touched_at_ms) \
             SELECT $1, $2, 'pending', $3, $4, $3 WHERE EXISTS (SELECT 1 FROM skus WHERE sku = $1) \
             ON CONFLICT (sku, batch_id) DO NOTHING RETURNING batch_id",
        )
        .bind(sku)
        .bind(batch_id)
        .bind(now_ms)
        .bind(upload_id)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        if inserted {
            tx.commit().await?;
            return Ok(BatchStart::New);
        }
        let Some(batch) = Self::batch_in(&mut tx, sku, batch_id, self.dialect.lock_rows).await?
        else {
            return Err(LedgerError::NotFound(format!("SKU {sku}")));
        };
        let start = match (batch.state.as_str(), &batch.upload_id) {
            // An aborted import left nothing behind: the merchant's retry starts afresh.
            ("aborted", _) => BatchStart::New,
            ("pending", Some(_)) => {
                let silent_ms = now_ms.saturating_sub(batch.touched_at_ms.unwrap_or(i64::MIN));
                if silent_ms < UPLOAD_LEASE_MS {
                    return Ok(BatchStart::InProgress(batch));
                }
                // Its uploader died mid-upload (or stalled): nothing of it was ever visible,
                // and its successor starts the batch afresh.
                tracing::warn!(
                    sku,
                    batch_id,
                    silent_ms,
                    "taking over a batch whose upload gave no sign of life"
                );
                sqlx::query("DELETE FROM keys WHERE sku = $1 AND batch_id = $2")
                    .bind(sku)
                    .bind(batch_id)
                    .execute(&mut *tx)
                    .await?;
                BatchStart::New
            }
            _ => BatchStart::Existing(batch),
        };
        if start == BatchStart::New {
            sqlx::query(
                "UPDATE batches SET state = 'pending', accepted = 0, rejected = 0, \
                 duplicate = 0, created_at_ms = $3, activated_at_ms = NULL, upload_id = $4, \
                 touched_at_ms = $3 WHERE sku = $1 AND batch_id = $2",
            )
            .bind(sku)
            .bind(batch_id)
            .bind(now_ms)
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(start)
    }

    async fn touch_batch(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let mut tx = self.begin_write().await?;
        Self::owned_batch(&mut tx, sku, batch_id, upload_id, self.dialect.lock_rows).await?;
        sqlx::query("UPDATE batches SET touched_at_ms = $3 WHERE sku = $1 AND batch_id = $2")
            .bind(sku)
            .bind(batch_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_keys(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        rows: &[NewKey],
        seal: &dyn Seal,
    ) -> Result<Vec<InsertOutcome>, LedgerError> {
        if let Some(bad) = rows.iter().find(|r| r.max_issues < 1 || r.max_uses < 1) {
            return Err(LedgerError::Corrupt(format!(
                "line {}: max_issues and max_uses must be at least 1",
                bad.line
            )));
        }
        let mut tx = self.begin_write().await?;
        let batch =
            Self::owned_batch(&mut tx, sku, batch_id, upload_id, self.dialect.share_rows).await?;
        // Locking the counter first serialises imports of one SKU, so the duplicate check
        // below sees every key committed before this transaction allocates.
        let sql = format!(
            "SELECT next_local_id FROM skus WHERE sku = $1{}",
            self.dialect.lock_rows
        );
        let first_id: i64 = sqlx::query(&sql)
            .bind(sku)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("SKU {sku}")))?
            .try_get(0)?;

        let mut digests: Vec<&str> = rows.iter().map(|r| r.digest.as_str()).collect();
        digests.sort_unstable();
        digests.dedup();
        let existing: HashMap<String, (i64, bool)> =
            DB::existing_digests(&mut tx, &self.dialect, sku, &digests)
                .await?
                .into_iter()
                .map(|(digest, local_id, batch)| (digest, (local_id, batch == batch_id)))
                .collect();

        let mut outcomes = Vec::with_capacity(rows.len());
        let mut fresh: Vec<(i64, &NewKey, String)> = Vec::with_capacity(rows.len());
        // Earlier rows of this chunk, which the ledger does not have yet.
        let mut earlier: HashMap<&str, i64> = HashMap::with_capacity(rows.len());
        let mut next_id = first_id;
        for row in rows {
            let known = existing
                .get(&row.digest)
                .copied()
                .or_else(|| Some((*earlier.get(row.digest.as_str())?, true)));
            if let Some((local_id, same_batch)) = known {
                outcomes.push(InsertOutcome::Duplicate {
                    key_id: key_id(sku, &local_id.to_string()),
                    same_batch,
                });
                continue;
            }
            earlier.insert(&row.digest, next_id);
            fresh.push((next_id, row, seal.seal(sku, next_id, &row.code)));
            outcomes.push(InsertOutcome::Inserted {
                key_id: key_id(sku, &next_id.to_string()),
                local_id: next_id,
            });
            next_id += 1;
        }
        DB::insert_fresh(
            &mut tx,
            &self.dialect,
            sku,
            batch_id,
            batch.created_at_ms,
            &fresh,
        )
        .await?;
        if next_id != first_id {
            sqlx::query("UPDATE skus SET next_local_id = $2 WHERE sku = $1")
                .bind(sku)
                .bind(next_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(outcomes)
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
        let mut tx = self.begin_write().await?;
        let batch = Self::batch_in(&mut tx, sku, batch_id, self.dialect.lock_rows)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("batch {batch_id} of SKU {sku}")))?;
        // Activation waits for the upload to finish ([`Ledger::activate_batch`]), so the
        // batch is still pending and this upload's.
        check_owner(&batch, upload_id)?;
        sqlx::query(
            "UPDATE batches SET accepted = $3, rejected = $4, duplicate = $5, upload_id = NULL, \
             touched_at_ms = $6 WHERE sku = $1 AND batch_id = $2",
        )
        .bind(sku)
        .bind(batch_id)
        .bind(signed(report.accepted)?)
        .bind(signed(report.rejected)?)
        .bind(signed(report.duplicate)?)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        if activate {
            Self::activate_in(&mut tx, sku, batch_id, now_ms).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn activate_batch(
        &self,
        sku: &str,
        batch_id: &str,
        now_ms: i64,
    ) -> Result<BatchRecord, LedgerError> {
        let mut tx = self.begin_write().await?;
        let batch = Self::batch_in(&mut tx, sku, batch_id, self.dialect.lock_rows)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("batch {batch_id} of SKU {sku}")))?;
        let batch = match (batch.state.as_str(), &batch.upload_id) {
            ("active", _) => batch,
            // Its upload has not finished: part of the file may not be here yet, and the
            // upload would find its batch gone from under it.
            ("pending", Some(_)) => {
                let silent_ms = now_ms.saturating_sub(batch.touched_at_ms.unwrap_or(i64::MIN));
                let why = if silent_ms < UPLOAD_LEASE_MS {
                    "its upload has not finished".to_owned()
                } else {
                    format!(
                        "its upload gave no sign of life for {} s: upload the file again",
                        silent_ms / 1000
                    )
                };
                return Err(LedgerError::BatchBusy(format!(
                    "batch {batch_id} of SKU {sku} cannot be activated yet: {why}"
                )));
            }
            ("pending", None) => {
                Self::activate_in(&mut tx, sku, batch_id, now_ms).await?;
                BatchRecord {
                    state: "active".into(),
                    activated_at_ms: Some(now_ms),
                    ..batch
                }
            }
            // A refused or interrupted upload left nothing behind: its batch id is unused.
            ("aborted", _) => {
                return Err(LedgerError::NotFound(format!(
                    "batch {batch_id} of SKU {sku}"
                )))
            }
            (state, _) => {
                return Err(LedgerError::Corrupt(format!(
                    "batch {batch_id} of SKU {sku} is in state {state}"
                )))
            }
        };
        tx.commit().await?;
        Ok(batch)
    }

    async fn abort_batch(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
    ) -> Result<(), LedgerError> {
        let mut tx = self.begin_write().await?;
        let batch = Self::batch_in(&mut tx, sku, batch_id, self.dialect.lock_rows)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("batch {batch_id} of SKU {sku}")))?;
        match batch.state.as_str() {
            "aborted" => return Ok(()),
            "active" => {
                return Err(LedgerError::Conflict(format!(
                    "batch {batch_id} of SKU {sku} is active: void its keys instead"
                )))
            }
            _ => {}
        }
        // A successor's keys are not this upload's to delete.
        check_owner(&batch, upload_id)?;
        sqlx::query("DELETE FROM keys WHERE sku = $1 AND batch_id = $2")
            .bind(sku)
            .bind(batch_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE batches SET state = 'aborted', upload_id = NULL \
             WHERE sku = $1 AND batch_id = $2",
        )
        .bind(sku)
        .bind(batch_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
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
            "SELECT {KEY_COLUMNS} FROM keys WHERE sku = $1 AND local_id > $2 AND active = TRUE \
             ORDER BY local_id LIMIT $3"
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
        // A writer's batch may carry an entry twice (a reclaim racing a read): once is enough.
        let mut seen = HashSet::new();
        let events: Vec<&LedgerEvent> = events
            .iter()
            .filter(|e| seen.insert(e.event_id.as_str()))
            .collect();
        if events.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;

        // Record the events; those already recorded are not returned and change nothing.
        let mut recorded: HashMap<String, i64> = HashMap::new();
        let p = self.dialect.placeholders;
        for chunk in pow2_chunks(&events, self.dialect.rows_per_statement(11, 0)) {
            let sql = format!(
                "INSERT INTO events (event_id, sku, kind, at_ms, key_local_ids, order_id, \
                 user_id, redeemer, reason, late, fields_json) VALUES {} \
                 ON CONFLICT (event_id) DO NOTHING RETURNING seq, event_id",
                tuples(p, chunk.len(), 11, 1)
            );
            let mut query = sqlx::query(&sql);
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
            for row in query.fetch_all(&mut *tx).await? {
                recorded.insert(row.try_get(1)?, row.try_get(0)?);
            }
        }
        let applied: Vec<NewEvent> = events
            .iter()
            .filter_map(|e| Some(NewEvent::new(e, *recorded.get(&e.event_id)?)))
            .collect();

        let mut keys = BTreeMap::new();
        for (sku, ids) in replay::keys_to_load(&applied) {
            for (id, status) in self.load_statuses(&mut tx, sku, &ids).await? {
                keys.insert((sku, id), status);
            }
        }
        let replayed = replay::replay(&applied, keys);
        if replayed.skipped > 0 {
            tracing::info!(
                skipped = replayed.skipped,
                "events named keys the ledger does not have (aborted batches); skipped them"
            );
        }
        for (sku, rows) in &replayed.changed {
            self.store_statuses(&mut tx, sku, rows).await?;
        }

        let links = replay::audit_links(&applied);
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
            query.execute(&mut *tx).await?;
        }

        tx.commit().await?;
        Ok(applied.len() as u64)
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
        let rows = sqlx::query(
            "SELECT state, COUNT(*) FROM keys WHERE sku = $1 AND active = TRUE GROUP BY state",
        )
        .bind(sku)
        .fetch_all(&self.read)
        .await?;
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
        let rows = sqlx::query(
            "SELECT format_version, state, COUNT(*) FROM keys WHERE sku = $1 AND active = TRUE \
             GROUP BY format_version, state",
        )
        .bind(sku)
        .fetch_all(&self.read)
        .await?;
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
}

/// Whether upload `upload_id` may still write into `batch`: [`LedgerError::Conflict`] when the
/// batch is no longer pending, [`LedgerError::BatchBusy`] when another upload took it over.
fn check_owner(batch: &BatchRecord, upload_id: &str) -> Result<(), LedgerError> {
    let (sku, batch_id) = (&batch.sku, &batch.batch_id);
    if batch.state != "pending" {
        return Err(LedgerError::Conflict(format!(
            "batch {batch_id} of SKU {sku} is {}, not pending",
            batch.state
        )));
    }
    if batch.upload_id.as_deref() != Some(upload_id) {
        return Err(LedgerError::BatchBusy(format!(
            "batch {batch_id} of SKU {sku} was taken over by another upload after this one \
             gave no sign of life for {} s",
            UPLOAD_LEASE_MS / 1000
        )));
    }
    Ok(())
}

/// Up to this many items go in one statement of exactly their number: the group commits
/// of `durability = "ledger"` are about as large as the number of clients waiting, and each
/// statement is a round trip (to SQLite's worker thread, or to PostgreSQL) within the
/// commit every one of them waits for.
const EXACT_ROWS_MAX: usize = 64;

/// Prepared statements kept per connection: the writer's four statements in every shape
/// [`pow2_chunks`] makes (up to [`EXACT_ROWS_MAX`] exact ones and a dozen powers of two
/// each), with room for the rest.
pub(crate) const STATEMENT_CACHE: usize = 512;

/// `items` cut into chunks of at most `max` items: powers of two, largest first, then the
/// last [`EXACT_ROWS_MAX`] or fewer in one chunk: 300 items with `max` 1000 are 256 + 44,
/// and 40 items are one chunk. A statement per chunk size then has fewer than a hundred
/// shapes, which the prepared-statement cache keeps ([`STATEMENT_CACHE`]).
fn pow2_chunks<T>(items: &[T], max: usize) -> Vec<&[T]> {
    let max = if max == 0 { 1 } else { 1 << max.ilog2() };
    let exact = EXACT_ROWS_MAX.min(max);
    let mut chunks = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let size = if rest.len() <= exact {
            rest.len()
        } else {
            (1 << rest.len().ilog2()).min(max)
        };
        let (chunk, tail) = rest.split_at(size);
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

/// `rows` parenthesised tuples of `width` placeholders, numbering from `first`:
/// `tuples(Placeholders::Numbered, 2, 2, 3)` is `($3, $4), ($5, $6)`.
pub(crate) fn tuples(
    placeholders: Placeholders,
    rows: usize,
    width: usize,
    first: usize,
) -> String {
    let mut sql = String::with_capacity(rows * width * 7);
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..width {
            if c > 0 {
                sql.push_str(", ");
            }
            match placeholders {
                Placeholders::Numbered => {
                    sql.push('$');
                    sql.push_str(&(first + r * width + c).to_string());
                }
                Placeholders::InOrder => sql.push('?'),
            }
        }
        sql.push(')');
    }
    sql
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

/// A count to store.
fn signed(value: u64) -> Result<i64, LedgerError> {
    i64::try_from(value).map_err(|_| LedgerError::Corrupt(format!("count {value} too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_powers_of_two_then_one_small_rest_within_the_limit_covering_every_item_once() {
        let items: Vec<usize> = (0..1300).collect();
        for (n, max) in [(0, 8), (1, 8), (300, 1000), (1300, 1000), (1300, 3), (7, 0)] {
            let chunks = pow2_chunks(&items[..n], max);
            let sizes: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
            let (last, head) = sizes.split_last().unwrap_or((&0, &[]));
            assert!(
                head.iter().all(|s| s.is_power_of_two() && *s <= max.max(1))
                    && *last <= max.max(1)
                    && (last.is_power_of_two() || *last <= EXACT_ROWS_MAX),
                "{sizes:?}"
            );
            let joined: Vec<usize> = chunks.concat();
            assert_eq!(joined, items[..n], "{n} items, max {max}");
        }
        let sizes = |n, max| -> Vec<usize> {
            pow2_chunks(&items[..n], max)
                .iter()
                .map(|c| c.len())
                .collect()
        };
        assert_eq!(sizes(300, 1000), [256, 44]);
        assert_eq!(sizes(1300, 1000), [512, 512, 256, 20]);
        assert_eq!(sizes(40, 1000), [40]);
        assert_eq!(sizes(64, 1000), [64]);
        assert_eq!(sizes(65, 1000), [64, 1]);
        assert_eq!(sizes(7, 4), [4, 3]);
    }
}
