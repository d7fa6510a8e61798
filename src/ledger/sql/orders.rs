//! Orders as the ledger's events tell them, for channel statements and reconciliation.
//!
//! The ledger keeps no table of orders: an order is its events (`hold` or `claim` made it,
//! `confirm`, `release` or `expire` changed it), each naming the order and its keys. A
//! channel's orders are found by the events' `channel` column (migration 0007) in creation
//! time, a page at a time; each page then reads the events of its orders by id and the
//! keys of its claimed orders, so memory stays bounded by the page.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sqlx::database::HasStatementCache;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type};

use super::statements::tuples;
use super::{Bulk, SqlLedger};
use crate::ledger::{LedgerError, OrderCursor, OrderRecord};

/// The kinds of event that make an order.
const CREATING: [&str; 2] = ["hold", "claim"];
/// Every kind of event that names an order.
const ORDER_KINDS: [&str; 5] = ["hold", "claim", "confirm", "release", "expire"];
/// Names bound in one `IN` list.
const NAMES_PER_STATEMENT: usize = 500;

/// One order event as read back.
struct OrderEvent {
    seq: i64,
    sku: String,
    order_key: String,
    kind: String,
    at_ms: i64,
    key_local_ids: String,
}

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
    /// [`Ledger::channel_orders`](crate::ledger::Ledger::channel_orders).
    pub(super) async fn orders_of_channel(
        &self,
        channel: &str,
        from_ms: i64,
        to_ms: i64,
        after: Option<OrderCursor>,
        limit: u32,
    ) -> Result<Vec<OrderRecord>, LedgerError> {
        let after = after.unwrap_or(OrderCursor {
            at_ms: i64::MIN,
            seq: i64::MIN,
        });
        let rows = sqlx::query(
            "SELECT seq, sku, order_id FROM events \
             WHERE channel = $1 AND kind IN ('hold', 'claim') AND at_ms >= $2 AND at_ms < $3 \
             AND at_ms >= $4 AND (at_ms > $4 OR seq > $5) \
             ORDER BY at_ms, seq LIMIT $6",
        )
        .bind(channel)
        .bind(from_ms)
        .bind(to_ms)
        .bind(after.at_ms)
        .bind(after.seq)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        let mut created = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq: i64 = row.try_get(0)?;
            let sku: String = row.try_get(1)?;
            let order_key: String = row.try_get(2)?;
            created.push((seq, sku, order_key));
        }
        let names: BTreeSet<&str> = created.iter().map(|(_, _, o)| o.as_str()).collect();
        let mut orders = self.orders_named(&names).await?;
        // An order is listed at its first creation event only: one made again (an engine
        // that lost it took a retry for a new order) is not listed twice.
        let mut page = Vec::with_capacity(created.len());
        for (seq, sku, order_key) in created {
            if let Some(order) = orders.remove(&(sku, order_key)) {
                if order.cursor.seq == seq {
                    page.push(order);
                }
            }
        }
        self.count_redeemed(&mut page).await?;
        Ok(page)
    }

    /// [`Ledger::find_orders`](crate::ledger::Ledger::find_orders).
    pub(super) async fn orders_by_name(
        &self,
        order_keys: &[String],
    ) -> Result<Vec<OrderRecord>, LedgerError> {
        let mut found = Vec::new();
        let names: Vec<&str> = order_keys.iter().map(String::as_str).collect();
        for chunk in names.chunks(NAMES_PER_STATEMENT) {
            let names: BTreeSet<&str> = chunk.iter().copied().collect();
            let mut orders: Vec<OrderRecord> =
                self.orders_named(&names).await?.into_values().collect();
            self.count_redeemed(&mut orders).await?;
            found.extend(orders);
        }
        Ok(found)
    }

    /// The orders of every SKU named `names`, from their events, by (SKU, name).
    async fn orders_named(
        &self,
        names: &BTreeSet<&str>,
    ) -> Result<HashMap<(String, String), OrderRecord>, LedgerError> {
        let mut events: BTreeMap<(String, String), Vec<OrderEvent>> = BTreeMap::new();
        let names: Vec<&str> = names.iter().copied().collect();
        let p = self.dialect.placeholders;
        for chunk in names.chunks(NAMES_PER_STATEMENT) {
            // The names are bound once: SQLite's runs read them three times (`naming`).
            let sql = format!(
                "WITH names (id) AS (VALUES {}) \
                 SELECT e.seq, e.sku, e.order_id, e.kind, e.at_ms, e.key_local_ids FROM events e \
                 WHERE {} ORDER BY e.seq",
                tuples(p, chunk.len(), 1, 1),
                self.dialect.naming("(SELECT id FROM names)")
            );
            let mut query = sqlx::query(&sql).persistent(false);
            for name in chunk {
                query = query.bind(*name);
            }
            for row in query.fetch_all(&self.read).await? {
                let event = OrderEvent {
                    seq: row.try_get(0)?,
                    sku: row.try_get(1)?,
                    order_key: row.try_get(2)?,
                    kind: row.try_get(3)?,
                    at_ms: row.try_get(4)?,
                    key_local_ids: row.try_get(5)?,
                };
                if ORDER_KINDS.contains(&event.kind.as_str()) {
                    events
                        .entry((event.sku.clone(), event.order_key.clone()))
                        .or_default()
                        .push(event);
                }
            }
        }
        let mut orders = HashMap::with_capacity(events.len());
        for (name, events) in events {
            if let Some(order) = order_from_events(&events)? {
                orders.insert(name, order);
            }
        }
        Ok(orders)
    }

    /// Fills in how many keys of each claimed order were redeemed; the others have none.
    async fn count_redeemed(&self, orders: &mut [OrderRecord]) -> Result<(), LedgerError> {
        let mut by_sku: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
        for order in orders.iter() {
            if claimed(&order.last_kind) {
                by_sku
                    .entry(order.sku.as_str())
                    .or_default()
                    .extend(&order.key_local_ids);
            }
        }
        let mut redeemed: BTreeSet<(String, i64)> = BTreeSet::new();
        let p = self.dialect.placeholders;
        for (sku, ids) in by_sku {
            let ids: Vec<i64> = ids.into_iter().collect();
            for chunk in ids.chunks(NAMES_PER_STATEMENT) {
                let sql = format!(
                    "SELECT local_id FROM keys WHERE sku = {} AND uses > 0 AND local_id IN {}",
                    p.param(1),
                    tuples(p, 1, chunk.len(), 2)
                );
                let mut query = sqlx::query(&sql).persistent(false).bind(sku);
                for id in chunk {
                    query = query.bind(*id);
                }
                for row in query.fetch_all(&self.read).await? {
                    redeemed.insert((sku.to_owned(), row.try_get(0)?));
                }
            }
        }
        for order in orders.iter_mut() {
            if claimed(&order.last_kind) {
                order.redeemed_keys = order
                    .key_local_ids
                    .iter()
                    .filter(|id| redeemed.contains(&(order.sku.clone(), **id)))
                    .count() as u64;
            }
        }
        Ok(())
    }
}

fn claimed(kind: &str) -> bool {
    matches!(kind, "claim" | "confirm")
}

/// An order from its events (in any order): made by its first `hold` or `claim`, in the
/// state of its latest event by engine time (the ledger's sequence breaks ties: writers
/// may commit a SKU's events out of order).
fn order_from_events(events: &[OrderEvent]) -> Result<Option<OrderRecord>, LedgerError> {
    let first = events
        .iter()
        .filter(|e| CREATING.contains(&e.kind.as_str()))
        .min_by_key(|e| (e.at_ms, e.seq));
    let (Some(first), Some(last)) = (first, events.iter().max_by_key(|e| (e.at_ms, e.seq))) else {
        return Ok(None);
    };
    let key_local_ids = if last.key_local_ids.is_empty() {
        Vec::new()
    } else {
        last.key_local_ids
            .split(',')
            .map(|id| {
                id.parse::<i64>()
                    .map_err(|_| LedgerError::Corrupt(format!("event {} key ids", last.seq)))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    Ok(Some(OrderRecord {
        sku: last.sku.clone(),
        order_key: last.order_key.clone(),
        last_kind: last.kind.clone(),
        key_local_ids,
        redeemed_keys: 0,
        created_at_ms: first.at_ms,
        updated_at_ms: last.at_ms,
        cursor: OrderCursor {
            at_ms: first.at_ms,
            seq: first.seq,
        },
    }))
}
