//! Stock pools on the admin listener (admin token): how a SKU's available codes are split
//! between channels (`GET /v1/skus/{sku}/pools`), a channel's pool set to a count or a
//! share (`PUT /v1/skus/{sku}/pools/{channel}`), and codes moved from one pool to another
//! (`POST /v1/skus/{sku}/pool-moves`). Each change is one atomic script step with an event,
//! so the ledger audits it and restores the pools after the engine lost the SKU; see
//! `lua/prelude.lua`, "Stock pools".

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::body::{self, JsonBody, Reply};
use super::pauses::read_body;
use super::{App, Params};
use crate::channel::check_channel;
use crate::error::Error;
use crate::inventory::PoolChange;
use crate::sku::{check_id, check_reason, check_sku, MAX_ID_LEN, MAX_REASON_LEN};

/// Who a change is recorded as made by when the request does not say (`by`).
const DEFAULT_ACTOR: &str = "admin-api";
/// Most codes one change may move: any count fits in one O(1) step, this only bounds typos.
const MAX_MOVE: u64 = 1_000_000_000;

/// `GET /v1/skus/{sku}/pools`: the engine's pools, and the ledger's record of them.
pub async fn levels(app: &App, params: Params) -> Result<Reply, Error> {
    let sku = params.get("sku");
    check_sku(sku)?;
    app.skus.require(&app.inventory, sku).await?;
    let (engine, ledger) = tokio::join!(app.inventory.pools(sku), app.ledger.pools(sku));
    let engine = engine?;
    let ledger: serde_json::Map<String, Value> = ledger?
        .into_iter()
        .map(|(pool, level)| (pool, level.into()))
        .collect();
    Ok(body::json(
        StatusCode::OK,
        &json!({
            "sku": sku,
            "available": engine.available,
            "shared": engine.shared,
            "pools": engine.pools,
            "ledger": ledger,
        }),
    ))
}

/// `PUT /v1/skus/{sku}/pools/{channel}` `{"count"|"share", "reason"?, "by"?}`: the channel's
/// pool holds `count` codes, or `share` (0 to 1) of the codes available now; the
/// difference comes from, or goes back to, the shared remainder. Sending it again changes
/// nothing.
pub async fn set(app: &App, params: Params, req: Request<Incoming>) -> Result<Reply, Error> {
    let (sku, channel) = (params.get("sku"), params.get("channel"));
    check_sku(sku)?;
    check_channel(channel)?;
    let body = read_body(app, req, &["count", "share", "reason", "by"]).await?;
    let (reason, by) = audit(&body)?;
    let count = body.opt_u64("count", 0..=MAX_MOVE)?;
    let share = match body.into_value().get("share") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|s| (0.0..=1.0).contains(s))
                .ok_or_else(|| Error::BadRequest("field `share` must be from 0 to 1".into()))?,
        ),
    };
    require(app, sku, &[channel]).await?;
    let count = match (count, share) {
        (Some(n), None) => n,
        (None, Some(share)) => {
            let available = app.inventory.pools(sku).await?.available;
            (available as f64 * share).floor() as u64
        }
        _ => {
            return Err(Error::BadRequest(
                "send exactly one of `count` and `share`".into(),
            ))
        }
    };
    let change = app
        .inventory
        .set_pool(sku, channel, count, &by, &reason)
        .await?;
    answer(
        app,
        sku,
        change,
        json!({ "channel": channel, "count": count }),
    )
    .await
}

/// `POST /v1/skus/{sku}/pool-moves` `{"from"?, "to"?, "count", "expected"?, "reason"?,
/// "by"?}`: moves `count` codes from one channel's pool to another's (`null` or absent:
/// the shared remainder), in one step, in the middle of a sale too. With `expected`, only
/// if `from` holds exactly that many: a retried move then cannot move twice.
pub async fn move_codes(app: &App, params: Params, req: Request<Incoming>) -> Result<Reply, Error> {
    let sku = params.get("sku");
    check_sku(sku)?;
    let body = read_body(
        app,
        req,
        &["from", "to", "count", "expected", "reason", "by"],
    )
    .await?;
    let (reason, by) = audit(&body)?;
    let from = body.opt_str("from", 64)?;
    let to = body.opt_str("to", 64)?;
    for channel in [from, to].into_iter().flatten() {
        check_channel(channel)?;
    }
    if from == to {
        return Err(Error::BadRequest(
            "`from` and `to` name the same pool".into(),
        ));
    }
    let count = body
        .opt_u64("count", 1..=MAX_MOVE)?
        .ok_or_else(|| Error::BadRequest("field `count` is required".into()))?;
    let expected = body.opt_u64("expected", 0..=MAX_MOVE)?;
    let named: Vec<&str> = [from, to].into_iter().flatten().collect();
    require(app, sku, &named).await?;
    let change = app
        .inventory
        .move_pool(sku, from, to, count, &by, &reason, expected)
        .await?;
    answer(
        app,
        sku,
        change,
        json!({ "from": from, "to": to, "count": count }),
    )
    .await
}

/// The reason and actor of a change, checked.
fn audit(body: &JsonBody) -> Result<(String, String), Error> {
    let reason = body.opt_str("reason", MAX_REASON_LEN)?.unwrap_or("");
    if !reason.is_empty() {
        check_reason(reason)?;
    }
    let by = body.opt_str("by", MAX_ID_LEN)?.unwrap_or(DEFAULT_ACTOR);
    check_id("by", by, MAX_ID_LEN)?;
    Ok((reason.to_owned(), by.to_owned()))
}

/// Requires the SKU, single-issue codes, and channels this gateway serves.
async fn require(app: &App, sku: &str, channels: &[&str]) -> Result<(), Error> {
    let settings = app.skus.require(&app.inventory, sku).await?;
    if settings.max_issues > 1 {
        return Err(Error::BadRequest(format!(
            "SKU {sku} has reusable codes (max_issues {}): pools count single-issue codes",
            settings.max_issues
        )));
    }
    for channel in channels {
        app.channels.serving(channel)?;
    }
    Ok(())
}

/// Makes a change as durable as configured, then answers it with the levels after it.
async fn answer(app: &App, sku: &str, change: PoolChange, asked: Value) -> Result<Reply, Error> {
    app.durable(sku, change.event_id.as_deref(), change.emitted.as_ref())
        .await?;
    tracing::info!(sku, %asked, moved = change.moved, "stock pools changed");
    let levels = app.inventory.pools(sku).await?;
    Ok(body::json(
        StatusCode::OK,
        &json!({
            "sku": sku,
            "moved": change.moved,
            "available": levels.available,
            "shared": levels.shared,
            "pools": levels.pools,
        }),
    ))
}
