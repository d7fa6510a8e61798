//! The PostgreSQL ledger, for production: shared by every gateway of a deployment.
//!
//! One pool serves reads and writes. Write transactions run at `READ COMMITTED` and lock what
//! they depend on (see `sql`): the SKU's id counter (`FOR UPDATE`) serialises concurrent
//! imports of one SKU, the keys an event batch changes are locked before they are read, so
//! concurrent writers never lose an update. A deadlock or serialisation failure surfaces as
//! [`LedgerError::Unavailable`]: the transaction rolled back whole, and retrying is safe.
//! Migrations take sqlx's advisory lock, so gateways starting together migrate once.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::Postgres;

use super::sql::{Dialect, Placeholders, SqlLedger};
use super::LedgerError;

/// The protocol's limit on bind parameters per statement.
const MAX_BINDS: usize = 65_535;

/// Connections per gateway.
const MAX_CONNECTIONS: u32 = 16;

/// How long a caller waits for a connection before the ledger reports itself unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

const DIALECT: Dialect = Dialect {
    begin_write: None,
    lock_rows: " FOR UPDATE",
    share_rows: " FOR SHARE",
    max_binds: MAX_BINDS,
    placeholders: Placeholders::Numbered,
};

/// Connects to `url` and migrates the database.
pub(crate) async fn open(url: &str) -> Result<SqlLedger<Postgres>, LedgerError> {
    let pool = PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect(url)
        .await?;
    sqlx::migrate!("./migrations/postgres").run(&pool).await?;
    Ok(SqlLedger::new(pool.clone(), pool, DIALECT))
}
