//! The PostgreSQL ledger, for production: shared by every gateway of a deployment.
//!
//! One pool serves reads and writes. Write transactions run at `READ COMMITTED` and lock what
//! they depend on (see `sql`): the SKU's id counter (`FOR UPDATE`) serialises concurrent
//! imports of one SKU, the keys an event batch changes are locked before they are read, so
//! concurrent writers never lose an update. A deadlock or serialisation failure surfaces as
//! [`LedgerError::Unavailable`]: the transaction rolled back whole, and retrying is safe.
//! Migrations take sqlx's advisory lock, so gateways starting together migrate once.
//!
//! # Imports
//!
//! A chunk of an import finds the codes the SKU already has with one statement binding all
//! its digests as one array, each looked up through the `(sku, digest)` index (a `LATERAL`
//! subquery: while an import fills a table its statistics lag behind, and a plain join or
//! `= ANY` was planned as a scan of every key of the SKU, per chunk). The fresh keys then go
//! in with one `COPY`, which PostgreSQL parses far cheaper than a statement of thousands of
//! bind parameters.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;

use std::io::Write;

use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::query::Query;
use sqlx::{Postgres, Row};

use super::rules::key_state;
use super::sql::{Bulk, Dialect, OrderIndex, Placeholders, SqlLedger};
use super::{LedgerError, NewKey};

/// The protocol's limit on bind parameters per statement.
const MAX_BINDS: usize = 65_535;

/// Connections per gateway in the pool; commits of engine events keep one more of their own
/// (`hold_events_connection`).
const MAX_CONNECTIONS: u32 = 16;

/// How long a caller waits for a connection before the ledger reports itself unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a commit of engine events, in the same round trip as its `BEGIN` (one simple query
/// of two statements). Its statements are prepared once per connection and shape, and
/// PostgreSQL would otherwise plan them afresh at every execution, a custom plan for the
/// parameters: binding a durable commit's statements took 0.25 ms of the server's 1.55
/// against 0.13 with generic plans, in the commit every durable answer waits for.
/// Their generic plans are the custom ones: lookups by primary key and unique index, and
/// inserts. Set for the transaction only: imports and reads keep their custom plans, which
/// depend on the statistics of the moment (see "Imports").
const BEGIN_EVENTS: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan";

const DIALECT: Dialect = Dialect {
    begin_write: None,
    begin_events: Some(BEGIN_EVENTS),
    hold_events_connection: true,
    lock_rows: " FOR UPDATE",
    share_rows: " FOR SHARE",
    max_binds: MAX_BINDS,
    placeholders: Placeholders::Numbered,
    order_index: OrderIndex::Events,
};

/// How long PostgreSQL lets a ledger session sit idle inside a transaction before it ends
/// the session, unless the URL's options set `idle_in_transaction_session_timeout`. A
/// gateway paused, or cut off from the database, in the middle of a commit holds the locks
/// its transaction took, its SKUs' rebuild fences among them (`pass_fence` in
/// `sql/events.rs`): unbounded, a rebuild of those SKUs would wait on it for as long as it
/// stays away. Ended, the commit rolls back, and its writer commits the events again later,
/// behind the fence. No commit or import waits this long on its own client between two
/// statements.
const IDLE_IN_TRANSACTION: &str = "10s";

/// The options of `url`, with the ledger's session settings the URL leaves unset.
fn connect_options(url: &str) -> Result<PgConnectOptions, LedgerError> {
    let options =
        PgConnectOptions::from_str(url)?.statement_cache_capacity(super::sql::STATEMENT_CACHE);
    let set_by_url = options
        .get_options()
        .is_some_and(|o| o.contains("idle_in_transaction_session_timeout"));
    Ok(if set_by_url {
        options
    } else {
        options.options([("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION)])
    })
}

/// Connects to `url` and migrates the database.
pub(crate) async fn open(url: &str) -> Result<SqlLedger<Postgres>, LedgerError> {
    let options = connect_options(url)?;
    // One connection first: the pool retries a refused connection until its acquire timeout
    // and then reports only that it timed out, while this says why.
    match <PgConnection as sqlx::Connection>::connect_with(&options).await {
        Ok(probe) => {
            let _ = sqlx::Connection::close(probe).await;
        }
        Err(sqlx::Error::Io(e)) => {
            return Err(LedgerError::Unavailable(format!(
                "PostgreSQL at {}:{} is unreachable: {}",
                options.get_host(),
                options.get_port(),
                e.kind()
            )))
        }
        Err(e) => return Err(e.into()),
    }
    let pool = PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await?;
    sqlx::migrate!("./migrations/postgres").run(&pool).await?;
    Ok(SqlLedger::new(pool.clone(), pool, DIALECT))
}

#[async_trait::async_trait]
impl Bulk for Postgres {
    async fn purge_freed(_write: &sqlx::Pool<Postgres>) -> Result<(), LedgerError> {
        // Dead row versions stay in the table's files until `VACUUM FULL keys`, which locks
        // the table: an operator's call (README, "Upgrading a ledger with codes in clear").
        Ok(())
    }

    async fn analyze_keys(write: &sqlx::Pool<Postgres>) -> Result<(), LedgerError> {
        // Autovacuum analyzes a table only once its periodic check sees enough changed rows,
        // up to a minute later. Until then a table filled by one large import has no
        // statistics, and PostgreSQL answers warm-up's `local_id > $2 ORDER BY local_id
        // LIMIT $3` by reading all the SKU's later keys and sorting them: over a second a
        // page of a million-key SKU, against under a millisecond through the primary key.
        sqlx::query("ANALYZE keys").execute(write).await?;
        Ok(())
    }

    fn links_and_fences(first: usize) -> Option<String> {
        let (skus, ids, seqs, fenced) = (first, first + 1, first + 2, first + 3);
        Some(format!(
            "linked AS (INSERT INTO event_keys (sku, local_id, event_seq) \
             SELECT * FROM unnest(${skus}::text[], ${ids}::int8[], ${seqs}::int8[])) \
             SELECT sku, read_gen FROM rebuild_fences WHERE sku = ANY(${fenced}::text[]) \
             FOR SHARE"
        ))
    }

    fn record_and_lock(insert: &str, columns: &str, first: usize) -> Option<String> {
        let (skus, ids) = (first, first + 1);
        let nulls = vec!["NULL"; columns.split(',').count()].join(", ");
        Some(format!(
            "WITH recorded AS ({insert}), \
             locked AS (SELECT sku, {columns} FROM keys WHERE (sku, local_id) IN \
             (SELECT * FROM unnest(${skus}::text[], ${ids}::int8[])) \
             ORDER BY sku COLLATE \"C\", local_id FOR UPDATE) \
             SELECT seq, event_id, {nulls} FROM recorded \
             UNION ALL SELECT NULL, sku, {columns} FROM locked"
        ))
    }

    fn bind_record_and_lock<'q>(
        query: Query<'q, Postgres, PgArguments>,
        keys: &BTreeMap<&'q str, BTreeSet<i64>>,
    ) -> Query<'q, Postgres, PgArguments> {
        let (skus, ids): (Vec<&'q str>, Vec<i64>) = keys
            .iter()
            .flat_map(|(sku, ids)| ids.iter().map(move |id| (*sku, *id)))
            .unzip();
        query.bind(skus).bind(ids)
    }

    fn bind_links_and_fences<'q>(
        query: Query<'q, Postgres, PgArguments>,
        links: &[(&'q str, i64, i64)],
        fenced: &[&'q str],
    ) -> Query<'q, Postgres, PgArguments> {
        let skus: Vec<&'q str> = links.iter().map(|(sku, _, _)| *sku).collect();
        let ids: Vec<i64> = links.iter().map(|(_, id, _)| *id).collect();
        let seqs: Vec<i64> = links.iter().map(|(_, _, seq)| *seq).collect();
        query.bind(skus).bind(ids).bind(seqs).bind(fenced.to_vec())
    }

    async fn existing_digests(
        conn: &mut PgConnection,
        _dialect: &Dialect,
        sku: &str,
        digests: &[&str],
    ) -> Result<Vec<(String, i64, String)>, LedgerError> {
        // `LIMIT 1` keeps the subquery from being pulled up into a plain join, whose plan
        // would again be the planner's choice.
        let rows = sqlx::query(
            "SELECT v.digest, k.local_id, k.batch_id FROM unnest($2::text[]) AS v (digest) \
             CROSS JOIN LATERAL (SELECT local_id, batch_id FROM keys \
             WHERE sku = $1 AND digest = v.digest LIMIT 1) AS k",
        )
        .bind(sku)
        .bind(digests)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect()
    }

    async fn insert_fresh(
        conn: &mut PgConnection,
        _dialect: &Dialect,
        sku: &str,
        batch_id: &str,
        updated_at_ms: i64,
        rows: &[(i64, &NewKey, String)],
    ) -> Result<(), LedgerError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut data = Vec::with_capacity(rows.len() * 192);
        for (local_id, row, sealed) in rows {
            let state = key_state(false, 0, 0, 0, row.max_issues, row.max_uses);
            copy_text(&mut data, sku);
            copy_value(&mut data, local_id);
            copy_text(&mut data, &row.digest);
            copy_text(&mut data, sealed);
            copy_text(&mut data, batch_id);
            copy_value(&mut data, row.format_version);
            match row.expires_at_ms {
                Some(at) => copy_value(&mut data, at),
                None => data.extend_from_slice(b"\\N\t"),
            }
            copy_value(&mut data, row.max_issues);
            copy_value(&mut data, row.max_uses);
            copy_text(&mut data, state.as_str());
            // The row's last column ends the line instead of a tab.
            let _ = writeln!(data, "{updated_at_ms}");
        }
        let mut copy = conn
            .copy_in_raw(
                "COPY keys (sku, local_id, digest, code, batch_id, format_version, \
                 expires_at_ms, max_issues, max_uses, state, updated_at_ms) FROM STDIN",
            )
            .await?;
        copy.send(data).await?;
        copy.finish().await?;
        Ok(())
    }
}

/// Appends a text column in `COPY`'s text format, and the tab after it. Codes may hold any
/// printable ASCII, a backslash too.
fn copy_text(out: &mut Vec<u8>, value: &str) {
    for b in value.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
    out.push(b'\t');
}

/// Appends a number column in `COPY`'s text format, and the tab after it.
fn copy_value(out: &mut Vec<u8>, value: impl std::fmt::Display) {
    // Writing into a `Vec` cannot fail.
    let _ = write!(out, "{value}\t");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_when_idle_in_a_transaction_unless_the_url_says_otherwise() {
        let options = connect_options("postgres://kg@db.example/kg").expect("options");
        assert_eq!(
            options.get_options(),
            Some("-c idle_in_transaction_session_timeout=10s")
        );
        // The URL's own setting is kept, and no second one follows it (the later would win).
        let options = connect_options(
            "postgres://kg@db.example/kg?options[idle_in_transaction_session_timeout]=1min",
        )
        .expect("options");
        assert_eq!(
            options.get_options(),
            Some("-c idle_in_transaction_session_timeout=1min")
        );
        // Other options of the URL stay, with the default added.
        let options =
            connect_options("postgres://kg@db.example/kg?options=-c%20statement_timeout%3D5min")
                .expect("options");
        assert_eq!(
            options.get_options(),
            Some("-c statement_timeout=5min -c idle_in_transaction_session_timeout=10s")
        );
    }
}
