//! Selling channels in the ledger: their settings (`channels`), their tokens by digest
//! (`channel_tokens`) and every change of either (`channel_events`), each change written
//! with its history entry in one transaction.

use sqlx::database::HasStatementCache;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type};

use super::{Bulk, SqlLedger};
use crate::ledger::{ChannelEventRecord, ChannelRecord, ChannelTokenRecord, LedgerError};

const TOKEN_COLUMNS: &str = "token_id, channel, digest, label, created_at_ms, revoked_at_ms";

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
    pub(super) async fn all_channels(&self) -> Result<Vec<ChannelRecord>, LedgerError> {
        let rows = sqlx::query(
            "SELECT channel, config_json, created_at_ms, updated_at_ms FROM channels \
             ORDER BY channel",
        )
        .fetch_all(&self.read)
        .await?;
        let mut channels = rows
            .iter()
            .map(|row| {
                Ok(ChannelRecord {
                    channel: row.try_get(0)?,
                    config_json: row.try_get(1)?,
                    created_at_ms: row.try_get(2)?,
                    updated_at_ms: row.try_get(3)?,
                    tokens: Vec::new(),
                })
            })
            .collect::<Result<Vec<_>, LedgerError>>()?;
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM channel_tokens ORDER BY channel, created_at_ms, token_id"
        );
        let tokens = sqlx::query(&sql).fetch_all(&self.read).await?;
        for row in &tokens {
            let token = token_from_row::<DB>(row)?;
            if let Some(channel) = channels.iter_mut().find(|c| c.channel == token.channel) {
                channel.tokens.push(token);
            }
        }
        Ok(channels)
    }

    pub(super) async fn upsert_channel(
        &self,
        channel: &str,
        config_json: &str,
        actor: &str,
        at_ms: i64,
    ) -> Result<bool, LedgerError> {
        let mut tx = self.begin_write().await?;
        let sql = format!(
            "SELECT channel FROM channels WHERE channel = $1{}",
            self.dialect.lock_rows
        );
        let existed = sqlx::query(&sql)
            .bind(channel)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        // An upsert, so that two first writes at once on PostgreSQL both succeed.
        sqlx::query(
            "INSERT INTO channels (channel, config_json, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $3) ON CONFLICT (channel) DO UPDATE SET \
             config_json = excluded.config_json, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(channel)
        .bind(config_json)
        .bind(at_ms)
        .execute(&mut *tx)
        .await?;
        let kind = if existed { "updated" } else { "created" };
        record(&mut tx, channel, kind, config_json, actor, at_ms).await?;
        tx.commit().await?;
        Ok(!existed)
    }

    pub(super) async fn insert_channel_token(
        &self,
        token: &ChannelTokenRecord,
        actor: &str,
    ) -> Result<bool, LedgerError> {
        let mut tx = self.begin_write().await?;
        let sql = format!(
            "SELECT channel FROM channels WHERE channel = $1{}",
            self.dialect.lock_rows
        );
        let exists = sqlx::query(&sql)
            .bind(token.channel.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !exists {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO channel_tokens (token_id, channel, digest, label, created_at_ms, \
             revoked_at_ms) VALUES ($1, $2, $3, $4, $5, NULL)",
        )
        .bind(token.token_id.as_str())
        .bind(token.channel.as_str())
        .bind(token.digest.as_str())
        .bind(token.label.as_deref())
        .bind(token.created_at_ms)
        .execute(&mut *tx)
        .await?;
        let detail = serde_json::json!({ "token_id": token.token_id, "label": token.label });
        record(
            &mut tx,
            &token.channel,
            "token_added",
            &detail.to_string(),
            actor,
            token.created_at_ms,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn revoke_token(
        &self,
        channel: &str,
        token_id: &str,
        actor: &str,
        at_ms: i64,
    ) -> Result<Option<ChannelTokenRecord>, LedgerError> {
        let mut tx = self.begin_write().await?;
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM channel_tokens WHERE token_id = $1 AND channel = $2{}",
            self.dialect.lock_rows
        );
        let Some(mut token) = sqlx::query(&sql)
            .bind(token_id)
            .bind(channel)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| token_from_row::<DB>(&row))
            .transpose()?
        else {
            return Ok(None);
        };
        if token.revoked_at_ms.is_none() {
            sqlx::query("UPDATE channel_tokens SET revoked_at_ms = $1 WHERE token_id = $2")
                .bind(at_ms)
                .bind(token_id)
                .execute(&mut *tx)
                .await?;
            let detail = serde_json::json!({ "token_id": token_id, "label": token.label });
            record(
                &mut tx,
                channel,
                "token_revoked",
                &detail.to_string(),
                actor,
                at_ms,
            )
            .await?;
            token.revoked_at_ms = Some(at_ms);
        }
        tx.commit().await?;
        Ok(Some(token))
    }

    pub(super) async fn channel_events(
        &self,
        channel: &str,
        limit: u32,
    ) -> Result<Vec<ChannelEventRecord>, LedgerError> {
        let rows = sqlx::query(
            "SELECT seq, channel, kind, detail_json, actor, at_ms FROM channel_events \
             WHERE channel = $1 ORDER BY seq DESC LIMIT $2",
        )
        .bind(channel)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ChannelEventRecord {
                    seq: row.try_get(0)?,
                    channel: row.try_get(1)?,
                    kind: row.try_get(2)?,
                    detail_json: row.try_get(3)?,
                    actor: row.try_get(4)?,
                    at_ms: row.try_get(5)?,
                })
            })
            .collect()
    }
}

/// Appends a channel's history entry inside the transaction that made the change.
async fn record<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    channel: &str,
    kind: &str,
    detail_json: &str,
    actor: &str,
    at_ms: i64,
) -> Result<(), LedgerError>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
{
    sqlx::query(
        "INSERT INTO channel_events (channel, kind, detail_json, actor, at_ms) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(channel)
    .bind(kind)
    .bind(detail_json)
    .bind(actor)
    .bind(at_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn token_from_row<DB>(row: &DB::Row) -> Result<ChannelTokenRecord, LedgerError>
where
    DB: Database,
    for<'q> i64: Decode<'q, DB> + Type<DB>,
    for<'q> String: Decode<'q, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    Ok(ChannelTokenRecord {
        token_id: row.try_get(0)?,
        channel: row.try_get(1)?,
        digest: row.try_get(2)?,
        label: row.try_get(3)?,
        created_at_ms: row.try_get(4)?,
        revoked_at_ms: row.try_get(5)?,
    })
}
