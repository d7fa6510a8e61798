//! Pauses in the ledger: what is paused now (`pauses`) and every pause and resume
//! (`pause_events`), written together in one transaction so the history never disagrees with
//! what is in force. The statements are plain SQL both backends speak.

use sqlx::database::HasStatementCache;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type};

use super::{Bulk, SqlLedger};
use crate::ledger::{LedgerError, NewPause, PauseEventRecord, PauseRecord};

const PAUSE_COLUMNS: &str = "sku, action, reason, paused_by, paused_at_ms, expected_end_ms";
const PAUSE_EVENT_COLUMNS: &str = "seq, sku, action, kind, reason, actor, at_ms, expected_end_ms";

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
    pub(super) async fn pauses_in_force(&self) -> Result<Vec<PauseRecord>, LedgerError> {
        let sql = format!("SELECT {PAUSE_COLUMNS} FROM pauses ORDER BY sku, action");
        let rows = sqlx::query(&sql).fetch_all(&self.read).await?;
        rows.iter().map(pause_from_row::<DB>).collect()
    }

    pub(super) async fn put_pause(
        &self,
        pause: &NewPause,
    ) -> Result<Option<PauseRecord>, LedgerError> {
        let mut tx = self.begin_write().await?;
        let sql = format!(
            "SELECT {PAUSE_COLUMNS} FROM pauses WHERE sku = $1 AND action = $2{}",
            self.dialect.lock_rows
        );
        let before = sqlx::query(&sql)
            .bind(pause.sku.as_str())
            .bind(pause.action.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| pause_from_row::<DB>(&row))
            .transpose()?;
        // An upsert, not an insert after the read: on PostgreSQL two first pauses may both
        // find no row, and the second must update the first's, not fail.
        sqlx::query(
            "INSERT INTO pauses (sku, action, reason, paused_by, paused_at_ms, expected_end_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (sku, action) DO UPDATE SET \
             reason = excluded.reason, paused_by = excluded.paused_by, \
             expected_end_ms = excluded.expected_end_ms",
        )
        .bind(pause.sku.as_str())
        .bind(pause.action.as_str())
        .bind(pause.reason.as_str())
        .bind(pause.actor.as_str())
        .bind(pause.at_ms)
        .bind(pause.expected_end_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO pause_events (sku, action, kind, reason, actor, at_ms, expected_end_ms) \
             VALUES ($1, $2, 'pause', $3, $4, $5, $6)",
        )
        .bind(pause.sku.as_str())
        .bind(pause.action.as_str())
        .bind(pause.reason.as_str())
        .bind(pause.actor.as_str())
        .bind(pause.at_ms)
        .bind(pause.expected_end_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(before)
    }

    pub(super) async fn lift_pause(
        &self,
        sku: &str,
        action: &str,
        reason: Option<&str>,
        actor: &str,
        at_ms: i64,
    ) -> Result<Option<PauseRecord>, LedgerError> {
        let mut tx = self.begin_write().await?;
        let sql =
            format!("DELETE FROM pauses WHERE sku = $1 AND action = $2 RETURNING {PAUSE_COLUMNS}");
        let lifted = sqlx::query(&sql)
            .bind(sku)
            .bind(action)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| pause_from_row::<DB>(&row))
            .transpose()?;
        if lifted.is_some() {
            sqlx::query(
                "INSERT INTO pause_events (sku, action, kind, reason, actor, at_ms, \
                 expected_end_ms) VALUES ($1, $2, 'resume', $3, $4, $5, NULL)",
            )
            .bind(sku)
            .bind(action)
            .bind(reason)
            .bind(actor)
            .bind(at_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(lifted)
    }

    pub(super) async fn pause_events(
        &self,
        sku: Option<&str>,
        limit: u32,
    ) -> Result<Vec<PauseEventRecord>, LedgerError> {
        let rows = match sku {
            Some(sku) => {
                let sql = format!(
                    "SELECT {PAUSE_EVENT_COLUMNS} FROM pause_events WHERE sku = $1 \
                     ORDER BY seq DESC LIMIT $2"
                );
                sqlx::query(&sql)
                    .bind(sku)
                    .bind(i64::from(limit))
                    .fetch_all(&self.read)
                    .await?
            }
            None => {
                let sql = format!(
                    "SELECT {PAUSE_EVENT_COLUMNS} FROM pause_events ORDER BY seq DESC LIMIT $1"
                );
                sqlx::query(&sql)
                    .bind(i64::from(limit))
                    .fetch_all(&self.read)
                    .await?
            }
        };
        rows.iter()
            .map(|row| {
                Ok(PauseEventRecord {
                    seq: row.try_get(0)?,
                    sku: row.try_get(1)?,
                    action: row.try_get(2)?,
                    kind: row.try_get(3)?,
                    reason: row.try_get(4)?,
                    actor: row.try_get(5)?,
                    at_ms: row.try_get(6)?,
                    expected_end_ms: row.try_get(7)?,
                })
            })
            .collect()
    }
}

fn pause_from_row<DB>(row: &DB::Row) -> Result<PauseRecord, LedgerError>
where
    DB: Database,
    for<'q> i64: Decode<'q, DB> + Type<DB>,
    for<'q> String: Decode<'q, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    Ok(PauseRecord {
        sku: row.try_get(0)?,
        action: row.try_get(1)?,
        reason: row.try_get(2)?,
        paused_by: row.try_get(3)?,
        paused_at_ms: row.try_get(4)?,
        expected_end_ms: row.try_get(5)?,
    })
}
