//! Import batches in the ledger: starting one (or recognising a retry, or taking over from a
//! dead upload), inserting its keys with duplicate detection and id allocation, finishing,
//! activating and aborting it. Each step is one write transaction; PostgreSQL locks the
//! batch row and the SKU's id counter where concurrent uploads could race.

use std::collections::HashMap;

use sqlx::database::HasStatementCache;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type};

use super::{count, Bulk, SqlLedger, ANALYZE_AFTER_KEYS};
use crate::ledger::{
    upload_gateway, BatchCounts, BatchRecord, BatchStart, InsertOutcome, LedgerError, NewKey, Seal,
    UPLOAD_LEASE_MS, UPLOAD_OWNER_SILENT_MS,
};
use crate::sku::key_id;

const BATCH_COLUMNS: &str = "sku, batch_id, state, accepted, rejected, duplicate, \
     created_at_ms, activated_at_ms, upload_id, touched_at_ms";

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
    /// [`Ledger::begin_batch`](crate::ledger::Ledger::begin_batch).
    pub(super) async fn start_batch(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        now_ms: i64,
    ) -> Result<BatchStart, LedgerError> {
        let mut tx = self.begin_write().await?;
        Self::abort_dead_uploads(&mut tx, sku, now_ms, self.dialect.lock_rows).await?;
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
            // Not presumed dead: `abort_dead_uploads` left it to its upload.
            ("pending", Some(_)) => return Ok(BatchStart::InProgress(batch)),
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

    /// [`Ledger::touch_batch`](crate::ledger::Ledger::touch_batch).
    pub(super) async fn touch_upload(
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

    /// [`Ledger::insert_keys`](crate::ledger::Ledger::insert_keys).
    pub(super) async fn insert_batch_keys(
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

    /// [`Ledger::finish_batch`](crate::ledger::Ledger::finish_batch).
    pub(super) async fn finish_upload(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        report: &BatchCounts,
        activate: bool,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let mut tx = self.begin_write().await?;
        // Activation waits for the upload to finish ([`Ledger::activate_batch`]), so the
        // batch is still pending and this upload's.
        Self::owned_batch(&mut tx, sku, batch_id, upload_id, self.dialect.lock_rows).await?;
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
        if report.accepted >= ANALYZE_AFTER_KEYS {
            // The batch is recorded whatever this does: stale statistics slow reads, they
            // change no answer.
            if let Err(e) = DB::analyze_keys(&self.write).await {
                tracing::warn!(sku, batch_id, error = %e, "could not refresh the keys' statistics");
            }
        }
        Ok(())
    }

    /// [`Ledger::activate_batch`](crate::ledger::Ledger::activate_batch).
    pub(super) async fn activate_finished(
        &self,
        sku: &str,
        batch_id: &str,
        now_ms: i64,
    ) -> Result<BatchRecord, LedgerError> {
        let mut tx = self.begin_write().await?;
        // An upload presumed dead left its batch unused, as one interrupted in a live gateway.
        Self::abort_dead_uploads(&mut tx, sku, now_ms, self.dialect.lock_rows).await?;
        let batch = Self::known_batch(&mut tx, sku, batch_id, self.dialect.lock_rows).await?;
        let batch = match (batch.state.as_str(), &batch.upload_id) {
            ("active", _) => batch,
            // Its upload has not finished: part of the file may not be here yet, and the
            // upload would find its batch gone from under it.
            ("pending", Some(_)) => {
                return Err(LedgerError::BatchBusy(format!(
                    "batch {batch_id} of SKU {sku} cannot be activated yet: its upload has \
                     not finished"
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
            ("aborted", _) => return Err(no_such_batch(sku, batch_id)),
            (state, _) => {
                return Err(LedgerError::Corrupt(format!(
                    "batch {batch_id} of SKU {sku} is in state {state}"
                )))
            }
        };
        tx.commit().await?;
        Ok(batch)
    }

    /// [`Ledger::abort_batch`](crate::ledger::Ledger::abort_batch).
    pub(super) async fn abort_upload(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
    ) -> Result<(), LedgerError> {
        let mut tx = self.begin_write().await?;
        let batch = Self::known_batch(&mut tx, sku, batch_id, self.dialect.lock_rows).await?;
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
        Self::delete_keys(&mut tx, sku, batch_id).await?;
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

    /// Aborts every batch of `sku` whose upload is presumed dead ([`upload_presumed_dead`]),
    /// deleting its keys: nothing of it was ever visible, and its codes must not count as
    /// duplicates of a new upload (perhaps the same file again, under a batch id of its own).
    /// The dead upload, should it wake up, is refused on its next call ([`check_owner`]).
    async fn abort_dead_uploads(
        conn: &mut DB::Connection,
        sku: &str,
        now_ms: i64,
        lock: &str,
    ) -> Result<(), LedgerError> {
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches \
             WHERE sku = $1 AND state = 'pending' AND upload_id IS NOT NULL{lock}"
        );
        let rows = sqlx::query(&sql).bind(sku).fetch_all(&mut *conn).await?;
        for row in rows {
            let batch = Self::batch_from_row(&row)?;
            let gateway = batch.upload_id.as_deref().and_then(upload_gateway);
            let seen_ms = match gateway {
                Some(gateway) => Self::gateway_seen_at(conn, gateway).await?,
                None => None,
            };
            if !upload_presumed_dead(&batch, gateway.is_some(), seen_ms, now_ms) {
                continue;
            }
            tracing::warn!(
                sku,
                batch_id = batch.batch_id,
                gateway,
                silent_ms = silent_ms(&batch, now_ms),
                "aborting a batch whose upload is presumed dead"
            );
            Self::delete_keys(conn, sku, &batch.batch_id).await?;
            sqlx::query(
                "UPDATE batches SET state = 'aborted', upload_id = NULL \
                 WHERE sku = $1 AND batch_id = $2",
            )
            .bind(sku)
            .bind(&batch.batch_id)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// When gateway `id` last reported alive (`None`: never, or it stopped or died long ago).
    async fn gateway_seen_at(
        conn: &mut DB::Connection,
        id: &str,
    ) -> Result<Option<i64>, LedgerError> {
        let row = sqlx::query("SELECT seen_at_ms FROM gateways WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// A batch, read inside `conn`'s transaction with the lock clause `lock`.
    pub(super) async fn batch_in(
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

    /// A batch that must exist, read inside `conn`'s transaction with the lock clause `lock`.
    async fn known_batch(
        conn: &mut DB::Connection,
        sku: &str,
        batch_id: &str,
        lock: &str,
    ) -> Result<BatchRecord, LedgerError> {
        Self::batch_in(conn, sku, batch_id, lock)
            .await?
            .ok_or_else(|| no_such_batch(sku, batch_id))
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
        let batch = Self::known_batch(conn, sku, batch_id, lock).await?;
        check_owner(&batch, upload_id)?;
        Ok(batch)
    }

    /// Marks a pending batch active, and with it its keys, which are visible while their
    /// batch is: one row, however many keys.
    async fn activate_in(
        conn: &mut DB::Connection,
        sku: &str,
        batch_id: &str,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
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

    /// Deletes a pending batch's keys, none of which was ever visible.
    async fn delete_keys(
        conn: &mut DB::Connection,
        sku: &str,
        batch_id: &str,
    ) -> Result<(), LedgerError> {
        sqlx::query("DELETE FROM keys WHERE sku = $1 AND batch_id = $2")
            .bind(sku)
            .bind(batch_id)
            .execute(&mut *conn)
            .await?;
        Ok(())
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
}

/// Whether upload `upload_id` may still write into `batch`: [`LedgerError::BatchBusy`] when
/// it was presumed dead and its batch taken over or aborted ([`upload_presumed_dead`]),
/// [`LedgerError::Conflict`] when the batch is finished.
fn check_owner(batch: &BatchRecord, upload_id: &str) -> Result<(), LedgerError> {
    let (sku, batch_id) = (&batch.sku, &batch.batch_id);
    match batch.state.as_str() {
        "pending" if batch.upload_id.as_deref() == Some(upload_id) => Ok(()),
        "pending" | "aborted" => Err(LedgerError::BatchBusy(format!(
            "batch {batch_id} of SKU {sku} was taken from this upload, presumed dead after no \
             sign of life for {} s (or its gateway unseen for {} s)",
            UPLOAD_LEASE_MS / 1000,
            UPLOAD_OWNER_SILENT_MS / 1000
        ))),
        state => Err(LedgerError::Conflict(format!(
            "batch {batch_id} of SKU {sku} is {state}, not pending"
        ))),
    }
}

/// The answer for a batch id the SKU does not have.
fn no_such_batch(sku: &str, batch_id: &str) -> LedgerError {
    LedgerError::NotFound(format!("batch {batch_id} of SKU {sku}"))
}

/// Whether the upload filling `batch` is presumed dead at `now_ms`: it gave no sign of life
/// for [`UPLOAD_LEASE_MS`] (its client stalled, or the process running it died), or it runs
/// in a gateway (`named`) that has not been seen alive for [`UPLOAD_OWNER_SILENT_MS`] (last
/// seen at `seen_ms`; `None`: not since it stopped or died), counted from no earlier than the
/// upload's start, so a gateway's upload in the moments before its first report is safe.
fn upload_presumed_dead(
    batch: &BatchRecord,
    named: bool,
    seen_ms: Option<i64>,
    now_ms: i64,
) -> bool {
    if silent_ms(batch, now_ms) >= UPLOAD_LEASE_MS {
        return true;
    }
    let since = seen_ms.map_or(batch.created_at_ms, |seen| seen.max(batch.created_at_ms));
    named && now_ms.saturating_sub(since) >= UPLOAD_OWNER_SILENT_MS
}

/// How long a batch's upload has given no sign of life, at `now_ms`.
fn silent_ms(batch: &BatchRecord, now_ms: i64) -> i64 {
    now_ms.saturating_sub(batch.touched_at_ms.unwrap_or(i64::MIN))
}

/// A count to store.
fn signed(value: u64) -> Result<i64, LedgerError> {
    i64::try_from(value).map_err(|_| LedgerError::Corrupt(format!("count {value} too large")))
}
