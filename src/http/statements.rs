//! A channel's statement and its reconciliation against the channel's own books.
//!
//! - `GET /v1/channels/{channel}/statement?from=&to=`: the channel's orders created in the
//!   range, each with its SKU, key ids and state, then the totals. Streamed: the ledger is
//!   read a page at a time ([`PAGE_ORDERS`]) and each page written as it comes, so a year of
//!   a marketplace's orders costs the gateway one page of memory.
//! - `POST /v1/channels/{channel}/reconcile`: the channel's list of orders against ours:
//!   those it lists that we do not know, those we issued in the range that it does not
//!   list, and those whose state differs.
//!
//! Both are admin routes, and also merchant routes a channel's own token may call for
//! itself only: a reseller reconciles its own books, never another's (another channel's
//! name answers as an unknown one).
//!
//! An order's state is its latest order event: `held`, `claimed`, `released` or `expired`,
//! and `redeemed` for a claimed order all of whose codes were redeemed. Orders are placed in
//! a range by when they were created (held or claimed); their state is as of now.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use super::body::{self, BodyError, JsonBody, Reply};
use super::target::query_param;
use super::App;
use crate::channel::{check_channel, order_name, scoped, DEFAULT};
use crate::error::{timestamp, Error};
use crate::inventory::formats::parse_rfc3339;
use crate::ledger::{Ledger, OrderCursor, OrderRecord};
use crate::sku::{check_id, check_sku, key_id, MAX_ID_LEN};

/// Orders read from the ledger (and written out) at a time.
pub const PAGE_ORDERS: u32 = 500;
/// Most orders one reconcile request may list.
pub const MAX_RECONCILE_ORDERS: usize = 10_000;
/// Largest reconcile body: room for [`MAX_RECONCILE_ORDERS`] orders of the longest ids.
pub const MAX_RECONCILE_BYTES: u64 = 4 * 1024 * 1024;
/// Most entries each list of a reconcile answer holds; the counts are always whole.
pub const MAX_DIFFERENCES: usize = 10_000;
/// Longest time value accepted.
const MAX_TIME_LEN: usize = 64;

/// An order's state as statements show it and reconciliation compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OrderState {
    Held,
    Claimed,
    Redeemed,
    Released,
    Expired,
}

impl OrderState {
    const ALL: [OrderState; 5] = [
        OrderState::Held,
        OrderState::Claimed,
        OrderState::Redeemed,
        OrderState::Released,
        OrderState::Expired,
    ];

    fn as_str(self) -> &'static str {
        match self {
            OrderState::Held => "held",
            OrderState::Claimed => "claimed",
            OrderState::Redeemed => "redeemed",
            OrderState::Released => "released",
            OrderState::Expired => "expired",
        }
    }

    fn parse(text: &str) -> Option<OrderState> {
        OrderState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// The state of a ledger order.
    fn of(order: &OrderRecord) -> Result<OrderState, Error> {
        Ok(match order.last_kind.as_str() {
            "hold" => OrderState::Held,
            "claim" | "confirm" => {
                let keys = order.key_local_ids.len() as u64;
                if keys > 0 && order.redeemed_keys >= keys {
                    OrderState::Redeemed
                } else {
                    OrderState::Claimed
                }
            }
            "release" => OrderState::Released,
            "expire" => OrderState::Expired,
            other => {
                return Err(Error::Internal(format!(
                    "order {} has an event of kind {other:?}",
                    order.order_key
                )))
            }
        })
    }
}

/// The time range of a statement or reconcile, in ms since the epoch: `[from, to)`.
#[derive(Debug, Clone, Copy)]
struct Range {
    from_ms: i64,
    to_ms: i64,
    /// Whether each end was given (absent ends are open and answered as `null`).
    given: (bool, bool),
}

impl Range {
    fn parse(from: Option<&str>, to: Option<&str>) -> Result<Range, Error> {
        let read = |name: &str, text: Option<&str>| -> Result<Option<i64>, Error> {
            let Some(text) = text else { return Ok(None) };
            if text.len() > MAX_TIME_LEN {
                return Err(Error::BadRequest(format!("`{name}` is too long")));
            }
            parse_rfc3339(text)
                .and_then(|ms| i64::try_from(ms).ok())
                .map(Some)
                .ok_or_else(|| {
                    Error::BadRequest(format!(
                        "`{name}` must be an RFC 3339 time such as 2030-01-31T23:59:59Z"
                    ))
                })
        };
        let (from, to) = (read("from", from)?, read("to", to)?);
        let range = Range {
            from_ms: from.unwrap_or(0),
            to_ms: to.unwrap_or(i64::MAX),
            given: (from.is_some(), to.is_some()),
        };
        if range.from_ms > range.to_ms {
            return Err(Error::BadRequest("`from` is after `to`".into()));
        }
        Ok(range)
    }

    fn json(&self) -> (Value, Value) {
        let end = |given: bool, ms: i64| {
            if given {
                Value::from(timestamp(ms.max(0) as u64))
            } else {
                Value::Null
            }
        };
        (
            end(self.given.0, self.from_ms),
            end(self.given.1, self.to_ms),
        )
    }
}

/// `ERR_NOT_FOUND` unless the channel exists (the default one always does).
async fn require_channel(app: &App, name: &str) -> Result<(), Error> {
    check_channel(name)?;
    if name == DEFAULT
        || app
            .ledger
            .channels()
            .await?
            .iter()
            .any(|c| c.channel == name)
    {
        Ok(())
    } else {
        Err(Error::NotFound(format!("channel {name}")))
    }
}

/// An order as a statement lists it.
fn order_json(order: &OrderRecord, state: OrderState) -> Value {
    let local = |id: &i64| key_id(&order.sku, &id.to_string());
    json!({
        "order_id": order_name(&order.order_key),
        "sku": order.sku,
        "state": state.as_str(),
        "key_ids": order.key_local_ids.iter().map(local).collect::<Vec<_>>(),
        "redeemed_keys": order.redeemed_keys,
        "created_at": timestamp(order.created_at_ms.max(0) as u64),
        "updated_at": timestamp(order.updated_at_ms.max(0) as u64),
    })
}

/// Orders and keys by state, as a statement ends.
#[derive(Debug, Default)]
struct Totals {
    orders: u64,
    keys: u64,
    redeemed_keys: u64,
    by_state: HashMap<OrderState, (u64, u64)>,
}

impl Totals {
    fn add(&mut self, order: &OrderRecord, state: OrderState) {
        let keys = order.key_local_ids.len() as u64;
        self.orders += 1;
        self.keys += keys;
        self.redeemed_keys += order.redeemed_keys;
        let slot = self.by_state.entry(state).or_default();
        slot.0 += 1;
        slot.1 += keys;
    }

    fn json(&self) -> Value {
        let by_state: Map<String, Value> = OrderState::ALL
            .iter()
            .map(|s| {
                let (orders, keys) = self.by_state.get(s).copied().unwrap_or_default();
                (
                    s.as_str().to_owned(),
                    json!({ "orders": orders, "keys": keys }),
                )
            })
            .collect();
        json!({
            "orders": self.orders,
            "keys": self.keys,
            "redeemed_keys": self.redeemed_keys,
            "by_state": by_state,
        })
    }
}

/// Where a streamed statement is.
struct Statement {
    ledger: Arc<dyn Ledger>,
    channel: String,
    range: Range,
    /// The page to write next; `None` once the last page was written.
    page: Option<Vec<OrderRecord>>,
    /// Whether an order was written already (a comma goes before the next).
    written: bool,
    totals: Totals,
    /// Whether the closing (the totals) was written.
    closed: bool,
}

impl Statement {
    /// The next chunk of the body: a page of orders, or the totals; `None` after them.
    async fn next_chunk(&mut self) -> Option<Result<Bytes, BodyError>> {
        if self.closed {
            return None;
        }
        let Some(page) = self.page.take() else {
            self.closed = true;
            let close = format!("],\"totals\":{}}}", self.totals.json());
            return Some(Ok(Bytes::from(close)));
        };
        let mut chunk = Vec::with_capacity(page.len() * 200);
        for order in &page {
            let state = match OrderState::of(order) {
                Ok(state) => state,
                Err(e) => return Some(Err(self.failed(e))),
            };
            self.totals.add(order, state);
            if self.written {
                chunk.push(b',');
            }
            self.written = true;
            chunk.extend_from_slice(order_json(order, state).to_string().as_bytes());
        }
        if page.len() == PAGE_ORDERS as usize {
            let after = page.last().map(|o| o.cursor);
            match self.fetch(after).await {
                Ok(next) => self.page = Some(next),
                Err(e) => return Some(Err(self.failed(e))),
            }
        }
        Some(Ok(Bytes::from(chunk)))
    }

    async fn fetch(&self, after: Option<OrderCursor>) -> Result<Vec<OrderRecord>, Error> {
        Ok(self
            .ledger
            .channel_orders(
                &self.channel,
                self.range.from_ms,
                self.range.to_ms,
                after,
                PAGE_ORDERS,
            )
            .await?)
    }

    /// Ends the body part way: the client sees the answer cut, never a short one that
    /// looks whole.
    fn failed(&mut self, e: Error) -> BodyError {
        self.closed = true;
        tracing::warn!(channel = self.channel, error = %e, "statement cut short");
        Box::new(e)
    }
}

/// `GET /v1/channels/{channel}/statement?from=&to=`.
pub async fn statement(app: &App, channel: &str, req: Request<Incoming>) -> Result<Reply, Error> {
    require_channel(app, channel).await?;
    let query = req.uri().query();
    let from = query_param(query, "from")?;
    let to = query_param(query, "to")?;
    let range = Range::parse(from.as_deref(), to.as_deref())?;
    let mut statement = Statement {
        ledger: app.ledger.clone(),
        channel: channel.to_owned(),
        range,
        page: None,
        written: false,
        totals: Totals::default(),
        closed: false,
    };
    // The first page is read before answering, so an unreachable ledger is a 503, not a
    // cut body.
    statement.page = Some(statement.fetch(None).await?);
    let (from, to) = range.json();
    let head = json!({ "channel": channel, "from": from, "to": to }).to_string();
    // `{"channel":…,"to":…}` opened up to take the orders.
    let head = format!("{},\"orders\":[", &head[..head.len() - 1]);
    let first = futures_util::stream::once(async move { Ok::<_, BodyError>(Bytes::from(head)) });
    let rest = futures_util::stream::unfold(statement, |mut statement| async move {
        let chunk = statement.next_chunk().await?;
        Some((chunk, statement))
    });
    Ok(body::stream(
        StatusCode::OK,
        "application/json",
        futures_util::StreamExt::chain(first, rest),
    ))
}

/// One order of the channel's list.
struct Listed {
    order_id: String,
    sku: Option<String>,
    state: Option<OrderState>,
}

fn listed(index: usize, value: Value) -> Result<Listed, Error> {
    let at = |e: Error| match e {
        Error::BadRequest(m) => Error::BadRequest(format!("orders[{index}]: {m}")),
        other => other,
    };
    let item = JsonBody::from_value(value, &["order_id", "sku", "state"]).map_err(at)?;
    let order_id = item.str("order_id", MAX_ID_LEN).map_err(at)?;
    check_id("order_id", order_id, MAX_ID_LEN).map_err(at)?;
    let sku = item.opt_str("sku", MAX_ID_LEN).map_err(at)?;
    if let Some(sku) = sku {
        check_sku(sku).map_err(at)?;
    }
    let state = match item.opt_str("state", 16).map_err(at)? {
        None => None,
        Some(text) => Some(OrderState::parse(text).ok_or_else(|| {
            Error::BadRequest(format!(
                "orders[{index}]: `state` must be one of held, claimed, redeemed, released, \
                 expired"
            ))
        })?),
    };
    Ok(Listed {
        order_id: order_id.to_owned(),
        sku: sku.map(str::to_owned),
        state,
    })
}

/// A capped list of differences with its whole count.
#[derive(Default)]
struct Differences {
    entries: Vec<Value>,
    count: u64,
}

impl Differences {
    fn push(&mut self, entry: Value) {
        self.count += 1;
        if self.entries.len() < MAX_DIFFERENCES {
            self.entries.push(entry);
        }
    }

    fn truncated(&self) -> bool {
        self.count > self.entries.len() as u64
    }
}

/// `POST /v1/channels/{channel}/reconcile`
/// `{"orders":[{"order_id","sku"?,"state"?}, …], "from"?, "to"?}`.
pub async fn reconcile(app: &App, channel: &str, req: Request<Incoming>) -> Result<Reply, Error> {
    require_channel(app, channel).await?;
    body::check_declared_length(req.headers(), MAX_RECONCILE_BYTES)?;
    let bytes = body::read_limited(req.into_body(), MAX_RECONCILE_BYTES).await?;
    let mut body = JsonBody::parse(&bytes, &["orders", "from", "to"])?;
    let range = Range::parse(
        body.opt_str("from", MAX_TIME_LEN)?,
        body.opt_str("to", MAX_TIME_LEN)?,
    )?;
    let items = body.take_array("orders")?;
    if items.len() > MAX_RECONCILE_ORDERS {
        return Err(Error::BadRequest(format!(
            "field `orders` lists more than {MAX_RECONCILE_ORDERS} orders; reconcile a \
             shorter range at a time"
        )));
    }
    let mut list: Vec<Listed> = Vec::with_capacity(items.len());
    let mut seen: HashMap<String, Vec<Option<String>>> = HashMap::new();
    for (index, item) in items.into_iter().enumerate() {
        let order = listed(index, item)?;
        let skus = seen.entry(order.order_id.clone()).or_default();
        // Without a SKU an entry stands for the order id in every SKU.
        if skus
            .iter()
            .any(|s| s.is_none() || order.sku.is_none() || *s == order.sku)
        {
            return Err(Error::BadRequest(format!(
                "orders[{index}]: order {} is listed twice",
                order.order_id
            )));
        }
        skus.push(order.sku.clone());
        list.push(order);
    }

    let names: Vec<String> = seen
        .keys()
        .map(|id| scoped(channel, id).into_owned())
        .collect();
    let mut ours: HashMap<String, Vec<OrderRecord>> = HashMap::new();
    for order in app.ledger.find_orders(&names).await? {
        ours.entry(order.order_key.clone()).or_default().push(order);
    }

    let mut missing_here = Differences::default();
    let mut state_differs = Differences::default();
    let mut matched: HashSet<(String, String)> = HashSet::new();
    for entry in &list {
        let name = scoped(channel, &entry.order_id);
        let candidates: Vec<&OrderRecord> = ours
            .get(name.as_ref())
            .map(|orders| {
                orders
                    .iter()
                    .filter(|o| entry.sku.as_ref().is_none_or(|sku| *sku == o.sku))
                    .collect()
            })
            .unwrap_or_default();
        if candidates.is_empty() {
            missing_here.push(json!({ "order_id": entry.order_id, "sku": entry.sku }));
            continue;
        }
        for order in candidates {
            matched.insert((order.sku.clone(), order.order_key.clone()));
            let state = OrderState::of(order)?;
            if let Some(theirs) = entry.state.filter(|theirs| *theirs != state) {
                state_differs.push(json!({
                    "order_id": entry.order_id,
                    "sku": order.sku,
                    "ours": state.as_str(),
                    "theirs": theirs.as_str(),
                }));
            }
        }
    }

    let mut missing_there = Differences::default();
    let mut issued = 0u64;
    let mut after = None;
    loop {
        let page = app
            .ledger
            .channel_orders(channel, range.from_ms, range.to_ms, after, PAGE_ORDERS)
            .await?;
        for order in &page {
            issued += 1;
            if !matched.contains(&(order.sku.clone(), order.order_key.clone())) {
                missing_there.push(order_json(order, OrderState::of(order)?));
            }
        }
        if page.len() < PAGE_ORDERS as usize {
            break;
        }
        after = page.last().map(|o| o.cursor);
    }

    let (from, to) = range.json();
    let truncated =
        missing_here.truncated() || missing_there.truncated() || state_differs.truncated();
    Ok(body::json(
        StatusCode::OK,
        &json!({
            "channel": channel,
            "from": from,
            "to": to,
            "listed": list.len(),
            "issued": issued,
            "counts": {
                "missing_here": missing_here.count,
                "missing_there": missing_there.count,
                "state_differs": state_differs.count,
            },
            "missing_here": missing_here.entries,
            "missing_there": missing_there.entries,
            "state_differs": state_differs.entries,
            "truncated": truncated,
        }),
    ))
}
