//! Merchant routes (a channel's bearer token): claims, holds and SKU status.
//!
//! Each handler works in its caller's channel: order and user ids reach the engine scoped
//! to it ([`Channel::scoped`]), so two channels' orders never meet, and answers show the ids
//! the client sent.

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::body::{self, JsonBody, Reply};
use super::{App, Params};
use crate::channel::Channel;
use crate::code::Format;
use crate::error::timestamp;
use crate::error::Error;
use crate::inventory::{drift, ClaimRequest, Order, PoolDraw};
use crate::metrics as m;
use crate::pause::{or_paused, Action};
use crate::sku::{check_id, check_sku, FormatVersion, SkuConfig, MAX_ID_LEN};

/// Most codes one claim may take.
pub const MAX_QUANTITY: u64 = 100;

/// `POST /v1/skus/{sku}/claims`: claim or hold codes for an order.
pub async fn claim(
    app: &App,
    channel: &Channel,
    params: Params,
    req: Request<Incoming>,
) -> Result<Reply, Error> {
    let sku = params.get("sku");
    check_sku(sku)?;
    let limit = app.limits.max_body_bytes;
    body::check_declared_length(req.headers(), limit)?;
    let bytes = body::read_limited(req.into_body(), limit).await?;
    let result = or_paused(
        claim_body(app, channel, sku, &bytes).await,
        app.pauses
            .check(sku, Action::Claims, app.inventory.now_ms())
            .err(),
    );
    let outcome = match &result {
        Ok(o) if o.replayed => "replay",
        Ok(o) if o.state == "held" => "held",
        Ok(_) => "new",
        Err(e) => e.code(),
    };
    count_claim(channel, outcome);
    Ok(body::json(StatusCode::OK, &result?.to_json()))
}

/// The fields of one claim.
const CLAIM_FIELDS: &[&str] = &["order_id", "quantity", "user_id", "hold_ms", "hold"];

/// Counts a claim's outcome, in total and for its channel.
fn count_claim(channel: &Channel, outcome: &'static str) {
    metrics::counter!(m::CLAIMS, "outcome" => outcome).increment(1);
    metrics::counter!(m::CHANNEL_CLAIMS, "channel" => channel.name.clone(), "outcome" => outcome)
        .increment(1);
}

async fn claim_body(app: &App, channel: &Channel, sku: &str, bytes: &[u8]) -> Result<Order, Error> {
    let body = JsonBody::parse(bytes, CLAIM_FIELDS)?;
    let settings = app.skus.require(&app.inventory, sku).await?;
    let request = claim_request(app, channel, sku, &settings, &body, Sent::Alone).await?;
    let (result, exhausted) = app.inventory.claim_checked(sku, &request).await;
    let order = claimed(app, sku, result, exhausted).await?;
    Ok(order.displayed(&settings.format))
}

/// How a claim came: alone, or as one order of a batch claim.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sent {
    Alone,
    InBatch,
}

/// Checks one claim's fields against the SKU's settings and the edge's limits: the request
/// to send, or why it is refused without reaching the engine.
async fn claim_request(
    app: &App,
    channel: &Channel,
    sku: &str,
    settings: &SkuConfig,
    body: &JsonBody,
    sent: Sent,
) -> Result<ClaimRequest, Error> {
    let order_id = body.str("order_id", MAX_ID_LEN)?;
    check_id("order_id", order_id, MAX_ID_LEN)?;
    let quantity = body.opt_u64("quantity", 1..=MAX_QUANTITY)?.unwrap_or(1);
    let user_id = body.opt_str("user_id", MAX_ID_LEN)?;
    if let Some(user) = user_id {
        check_id("user_id", user, MAX_ID_LEN)?;
    }
    let order_id = &*channel.scoped(order_id);
    let user_id = user_id.map(|user| channel.scoped(user));
    let user_id = user_id.as_deref();
    if settings.per_user_limit > 0 && user_id.is_none() {
        return Err(Error::BadRequest(
            "field `user_id` is required: this SKU has a per-user limit".into(),
        ));
    }
    let hold_ms = match (
        body.opt_u64("hold_ms", 1..=settings.max_hold_ms)?,
        body.opt_bool("hold")?,
    ) {
        (Some(ms), Some(false)) => {
            return Err(Error::BadRequest(format!(
                "`hold: false` contradicts `hold_ms: {ms}`"
            )))
        }
        (Some(ms), _) => Some(ms),
        (None, Some(true)) => Some(settings.default_hold_ms),
        (None, _) => None,
    };
    if let Err(paused) = app
        .pauses
        .check(sku, Action::Claims, app.inventory.now_ms())
    {
        // Paused, and not a retry: refused at the edge. A retried order goes to the engine,
        // which can only replay it. With the engine unreachable the pause answers: nothing
        // could be claimed either way.
        if !app
            .inventory
            .knows_order(sku, order_id)
            .await
            .unwrap_or(false)
        {
            return Err(paused);
        }
    }
    // Not for an order of a batch claim: telling its retries from new orders would cost a
    // read per order, where the batch's one engine call answers each of them anyway.
    if sent == Sent::Alone
        && app.edge.sold_out.is_sold_out(sku)
        && !app.inventory.knows_order(sku, order_id).await?
    {
        // Known sold out, and not a retry: answered without a claim. A retried order still
        // goes to the engine, which answers it as it did the first time; while the engine
        // has lost the SKU's orders, nobody can tell, and the answer is a retry.
        app.edge.sold_out_at_edge();
        return Err(Error::SoldOut);
    }
    if let Some(user) = user_id {
        app.edge.claim_allowed(user).await?;
    }
    Ok(ClaimRequest {
        order_id: order_id.to_owned(),
        quantity,
        user_id: user_id.map(str::to_owned),
        hold_ms,
        pool: PoolDraw {
            channel: channel.name.clone(),
            share: !channel.config.own_pool_only,
        },
    })
}

/// Finishes one claim the engine answered: remembers a SKU with nothing left, and makes the
/// change as durable as configured before it is answered.
async fn claimed(
    app: &App,
    sku: &str,
    result: Result<Order, Error>,
    exhausted: bool,
) -> Result<Order, Error> {
    // Only when nothing at all was left: a claim asking for more than remains must not
    // turn every other order away.
    if exhausted {
        app.edge.sold_out.mark(sku);
    }
    let order = result?;
    app.durable(sku, order.event_id.as_deref(), order.emitted.as_ref())
        .await?;
    Ok(order)
}

/// Most orders in one batch claim.
pub const MAX_BATCH_CLAIMS: usize = 500;

/// `POST /v1/skus/{sku}/claims/batch` `{"claims": [claim, …]}`: several orders of one SKU
/// in one engine call. Each claim is checked, claimed and answered on its own, exactly as if
/// sent alone (its own idempotency, conflict and error); the answer lists them in order,
/// each an order or an error envelope.
pub async fn claim_batch(
    app: &App,
    channel: &Channel,
    params: Params,
    req: Request<Incoming>,
) -> Result<Reply, Error> {
    let sku = params.get("sku");
    check_sku(sku)?;
    let limit = app.limits.max_body_bytes;
    body::check_declared_length(req.headers(), limit)?;
    let bytes = body::read_limited(req.into_body(), limit).await?;
    let claims = JsonBody::parse(&bytes, &["claims"])?.take_array("claims")?;
    if claims.is_empty() || claims.len() > MAX_BATCH_CLAIMS {
        return Err(Error::BadRequest(format!(
            "field `claims` must hold 1 to {MAX_BATCH_CLAIMS} claims"
        )));
    }
    let paused = app
        .pauses
        .check(sku, Action::Claims, app.inventory.now_ms())
        .err();
    let settings = or_paused(app.skus.require(&app.inventory, sku).await, paused.clone())?;
    let mut answers: Vec<Option<Result<Order, Error>>> = Vec::with_capacity(claims.len());
    let mut requests = Vec::new();
    let mut slots = Vec::new();
    for claim in claims {
        let checked = match JsonBody::from_value(claim, CLAIM_FIELDS) {
            Ok(body) => claim_request(app, channel, sku, &settings, &body, Sent::InBatch).await,
            Err(e) => Err(e),
        };
        match checked {
            Ok(request) => {
                slots.push(answers.len());
                requests.push(request);
                answers.push(None);
            }
            Err(e) => answers.push(Some(Err(e))),
        }
    }
    if !requests.is_empty() {
        let results = or_paused(app.inventory.claim_batch(sku, &requests).await, paused)?;
        for (slot, (result, exhausted)) in slots.into_iter().zip(results) {
            let answer = claimed(app, sku, result, exhausted).await;
            answers[slot] = Some(answer.map(|order| order.displayed(&settings.format)));
        }
    }
    let answers: Vec<Value> = answers
        .into_iter()
        .map(|answer| {
            let answer =
                answer.unwrap_or_else(|| Err(Error::Internal("claim not answered".into())));
            let outcome = match &answer {
                Ok(o) if o.replayed => "replay",
                Ok(o) if o.state == "held" => "held",
                Ok(_) => "new",
                Err(e) => e.code(),
            };
            count_claim(channel, outcome);
            match answer {
                Ok(order) => order.to_json(),
                Err(e) => e.envelope(),
            }
        })
        .collect();
    Ok(body::json(StatusCode::OK, &json!({ "claims": answers })))
}

/// Checks the path of an order route; returns the SKU, the order's engine id (scoped to the
/// caller's channel) and the SKU's format (its codes' display form).
async fn order_route<'p>(
    app: &App,
    channel: &Channel,
    params: &'p Params,
) -> Result<(&'p str, String, Format), Error> {
    let (sku, order_id) = (params.get("sku"), params.get("order_id"));
    check_sku(sku)?;
    check_id("order_id", order_id, MAX_ID_LEN)?;
    let settings = app.skus.require(&app.inventory, sku).await?;
    Ok((
        sku,
        channel.scoped(order_id).into_owned(),
        settings.format.clone(),
    ))
}

/// `GET /v1/skus/{sku}/claims/{order_id}`.
pub async fn order(app: &App, channel: &Channel, params: Params) -> Result<Reply, Error> {
    let (sku, order_id, format) = order_route(app, channel, &params).await?;
    let order = app.inventory.order(sku, &order_id).await?;
    Ok(body::json(
        StatusCode::OK,
        &order.displayed(&format).to_json(),
    ))
}

/// `POST /v1/skus/{sku}/claims/{order_id}/confirm`: payment arrived.
pub async fn confirm(app: &App, channel: &Channel, params: Params) -> Result<Reply, Error> {
    let paused = app
        .pauses
        .check(params.get("sku"), Action::Claims, app.inventory.now_ms())
        .err();
    let confirmed = async {
        let (sku, order_id, format) = order_route(app, channel, &params).await?;
        let order_id = order_id.as_str();
        if let Some(paused) = &paused {
            // A hold still running takes the codes set aside before the pause, and a
            // confirmed order replays; a late confirm would claim fresh codes, which the
            // pause forbids.
            let order = app.inventory.order(sku, order_id).await?;
            if order.state == "expired" {
                return Err(paused.clone());
            }
        }
        let share = !channel.config.own_pool_only;
        let order = app.inventory.confirm(sku, order_id, share).await?;
        app.durable(sku, order.event_id.as_deref(), order.emitted.as_ref())
            .await?;
        Ok(order.displayed(&format))
    }
    .await;
    Ok(body::json(
        StatusCode::OK,
        &or_paused(confirmed, paused)?.to_json(),
    ))
}

/// `POST /v1/skus/{sku}/claims/{order_id}/release`: cancel a hold.
pub async fn release(app: &App, channel: &Channel, params: Params) -> Result<Reply, Error> {
    let (sku, order_id, format) = order_route(app, channel, &params).await?;
    let order = app.inventory.release(sku, &order_id).await?;
    if !order.replayed {
        app.edge.sold_out.invalidate(sku);
    }
    app.durable(sku, order.event_id.as_deref(), order.emitted.as_ref())
        .await?;
    Ok(body::json(
        StatusCode::OK,
        &order.displayed(&format).to_json(),
    ))
}

/// A SKU's settings, its counts by state in the engine and in the ledger, and the drift
/// between them.
pub async fn sku_view(app: &App, sku: &str) -> Result<Reply, Error> {
    check_sku(sku)?;
    let settings = app.skus.require(&app.inventory, sku).await?;
    let (engine, ledger, backlog, by_version) = tokio::join!(
        app.inventory.counts(sku),
        app.ledger.counts(sku),
        app.writer.backlog(sku),
        app.ledger.counts_by_version(sku)
    );
    let engine = engine?;
    let ledger = ledger?;
    let mut by_version = by_version?;
    // Every format the SKU had, the current one first, with its keys (in the ledger) by
    // state.
    let current = FormatVersion {
        version: settings.format_version,
        format: settings.format.clone(),
        since_ms: settings.format_since_ms,
        retired: None,
    };
    let formats: Vec<_> = std::iter::once(&current)
        .chain(settings.earlier_formats.iter().rev())
        .map(|v| {
            let keys = by_version.remove(&i64::from(v.version)).unwrap_or_default();
            json!({
                "version": v.version,
                "format": v.format,
                "since": timestamp(v.since_ms),
                "retired": v.retired.as_ref().map(|r| json!({
                    "at": timestamp(r.at_ms),
                    "reason": r.reason,
                    "forced": r.forced,
                })),
                "keys": keys,
            })
        })
        .collect();
    let backlog = backlog.map_err(|e| Error::Unavailable(format!("event stream: {e}")))?;
    let drift = drift::Drift::between(&engine, &ledger, backlog.in_flight(), backlog.keys);
    Ok(body::json(
        StatusCode::OK,
        &json!({
            "sku": sku,
            "config": settings.shown(),
            "engine": engine,
            "ledger": ledger,
            "in_flight": drift.in_flight,
            "drift": drift.keys,
            "formats": formats,
        }),
    ))
}
