//! The SQLite ledger: a file in the data directory, the zero-setup default.
//!
//! # Settings, and why
//!
//! - **WAL journal**: readers never block the writer nor each other, so counts and warm-up run
//!   while events are applied.
//! - **`synchronous = FULL`**: every commit is on disk before it returns. The event writer
//!   acknowledges stream entries once their transaction commits; with `NORMAL` a power loss
//!   could drop commits whose entries were already acknowledged, losing events for good. The
//!   cost is one fsync per transaction, which the writer's group commits amortise.
//! - **One writer connection**: SQLite allows one writer at a time anyway. Funnelling writes
//!   through a single pooled connection makes in-process writers queue fairly on the pool
//!   instead of sleeping in SQLite's busy handler; reads get their own small pool. The
//!   event writer's group commits run on a connection of their own, on its own thread, one
//!   hand-off per commit ([`group_commit`]), while holding the pool's write connection.
//! - **`busy_timeout`** still covers other processes on the same file (a `kamigate import`
//!   next to a running gateway), together with `BEGIN IMMEDIATE` write transactions.
//! - **Foreign keys on**: keys must belong to a batch, batches to a SKU.
//! - **No ping before each use**: a pooled connection is a handle on a local file, not a
//!   socket that may have gone stale; the pool's default test before handing it out is one
//!   more round trip to the connection's thread on every statement and group commit, and the
//!   first statement would report a broken file just as well.
//!
//! # Imports
//!
//! Without statistics (nobody runs `ANALYZE`) SQLite's planner guesses that `sku = ?` narrows
//! the keys to a handful, and answered `sku = ? AND digest IN (…)` by scanning every key of
//! the SKU through the primary key: each chunk of an import read the whole SKU, and an import
//! was quadratic in its size. The duplicate check therefore joins the digests as the outer
//! loop (`CROSS JOIN` fixes the join order in SQLite), so each one is a lookup in the
//! `(sku, digest)` index.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite};

mod group_commit;
pub(crate) mod order_runs;

pub(crate) use group_commit::GroupCommit;

use super::rules::key_state;
use super::sql::{tuples, Bulk, Dialect, OrderIndex, Placeholders, SqlLedger};
use super::{LedgerError, NewKey};

/// SQLite's default `SQLITE_MAX_VARIABLE_NUMBER` since 3.32.
const MAX_BINDS: usize = 32_766;

/// How long a statement waits for another process's write lock before failing as busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a caller waits for the writer connection before the ledger reports itself
/// unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Concurrent readers.
const READERS: u32 = 4;

const DIALECT: Dialect = Dialect {
    begin_write: Some("BEGIN IMMEDIATE"),
    begin_events: None,
    // An in-memory ledger's pool has one connection, its database: taken out, the pool
    // would open an empty one. Files commit through `GroupCommit`.
    hold_events_connection: false,
    lock_rows: "",
    share_rows: "",
    max_binds: MAX_BINDS,
    placeholders: Placeholders::InOrder,
    order_index: OrderIndex::Runs,
};

/// Opens (creating it and its directory if needed) the ledger file at `path`.
pub(crate) async fn open_file(path: &Path) -> Result<SqlLedger<Sqlite>, LedgerError> {
    open_with(SqliteConnectOptions::new().filename(path)).await
}

/// Opens the ledger at a `sqlite:` URL.
pub(crate) async fn open_url(url: &str) -> Result<SqlLedger<Sqlite>, LedgerError> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| LedgerError::Corrupt(format!("SQLite URL: {e}")))?;
    open_with(options).await
}

async fn open_with(options: SqliteConnectOptions) -> Result<SqlLedger<Sqlite>, LedgerError> {
    if let Some(dir) = options.get_filename().parent() {
        if !dir.as_os_str().is_empty() {
            tokio::fs::create_dir_all(dir).await.map_err(|e| {
                LedgerError::Unavailable(format!("creating {}: {e}", dir.display()))
            })?;
        }
    }
    let options = options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        // Deleted and overwritten content is zeroed, not left in free pages: a code sealed
        // by `kamigate rekey` must not survive in clear in the file.
        .pragma("secure_delete", "ON")
        .statement_cache_capacity(super::sql::STATEMENT_CACHE);
    // The writer stays open for good: no reconnect on the write path, and an in-memory
    // database (`sqlite::memory:`) lives as long as the ledger.
    let write = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .connect_with(options.clone())
        .await?;
    sqlx::migrate!("./migrations/sqlite").run(&write).await?;
    let read = SqlitePoolOptions::new()
        .max_connections(READERS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .connect_with(options)
        .await?;
    let ledger = SqlLedger::new(read, write.clone(), DIALECT);
    // The file the pool opened (empty for an in-memory database, which a second connection
    // would not see: its commits stay on the pool).
    let file: String =
        sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
            .fetch_one(&write)
            .await?;
    if file.is_empty() {
        return Ok(ledger);
    }
    let turns = order_runs::Turns {
        pool: write,
        runtime: tokio::runtime::Handle::current(),
    };
    Ok(ledger.with_group_commit(GroupCommit::start(Path::new(&file), BUSY_TIMEOUT, turns)?))
}

#[async_trait::async_trait]
impl Bulk for Sqlite {
    async fn existing_digests(
        conn: &mut SqliteConnection,
        dialect: &Dialect,
        sku: &str,
        digests: &[&str],
    ) -> Result<Vec<(String, i64, String)>, LedgerError> {
        let p = dialect.placeholders;
        let mut found = Vec::new();
        for chunk in digests.chunks(dialect.rows_per_statement(1, 1)) {
            let sql = format!(
                "WITH v (digest) AS (VALUES {}) SELECT v.digest, k.local_id, k.batch_id \
                 FROM v CROSS JOIN keys k WHERE k.sku = {} AND k.digest = v.digest",
                tuples(p, chunk.len(), 1, 1),
                p.param(chunk.len() + 1)
            );
            let mut query = sqlx::query(&sql).persistent(false);
            for digest in chunk {
                query = query.bind(*digest);
            }
            for row in query.bind(sku).fetch_all(&mut *conn).await? {
                found.push((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?));
            }
        }
        Ok(found)
    }

    async fn purge_freed(write: &sqlx::Pool<Sqlite>) -> Result<(), LedgerError> {
        sqlx::query("VACUUM").execute(write).await?;
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(write)
            .await?;
        Ok(())
    }

    async fn analyze_keys(_write: &sqlx::Pool<Sqlite>) -> Result<(), LedgerError> {
        // SQLite plans these reads by the indexes alone: without `ANALYZE` ever run it keeps
        // no statistics to go stale.
        Ok(())
    }

    async fn insert_fresh(
        conn: &mut SqliteConnection,
        dialect: &Dialect,
        sku: &str,
        batch_id: &str,
        updated_at_ms: i64,
        rows: &[(i64, &NewKey, String)],
    ) -> Result<(), LedgerError> {
        let p = dialect.placeholders;
        for chunk in rows.chunks(dialect.rows_per_statement(11, 0)) {
            let sql = format!(
                "INSERT INTO keys (sku, local_id, digest, code, batch_id, format_version, \
                 expires_at_ms, max_issues, max_uses, state, updated_at_ms) VALUES {}",
                tuples(p, chunk.len(), 11, 1)
            );
            let mut query = sqlx::query(&sql).persistent(false);
            for (local_id, row, sealed) in chunk {
                let state = key_state(false, 0, 0, 0, row.max_issues, row.max_uses);
                query = query
                    .bind(sku)
                    .bind(*local_id)
                    .bind(row.digest.as_str())
                    .bind(sealed.as_str())
                    .bind(batch_id)
                    .bind(row.format_version)
                    .bind(row.expires_at_ms)
                    .bind(row.max_issues)
                    .bind(row.max_uses)
                    .bind(state.as_str())
                    .bind(updated_at_ms);
            }
            query.execute(&mut *conn).await?;
        }
        Ok(())
    }
}
