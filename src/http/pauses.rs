//! Incident controls on the admin listener (admin token): pause and resume claims or
//! redemptions of one SKU (`POST /v1/skus/{sku}/pause`, `/resume`) or of every SKU
//! (`POST /v1/pause`, `/v1/resume`), and the pauses in force with their history
//! (`GET /v1/pauses`). The ledger records them (see [`crate::pause`]); this gateway enforces
//! a change made through it at once, the others within `pause_refresh_ms`.

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::body::{self, JsonBody, Reply};
use super::target::query_param;
use super::App;
use crate::error::{timestamp, Error};
use crate::pause::{
    self, event_json, Action, PauseOrder, ResumeOrder, Target, MAX_EXPECTED_DURATION_MS,
    MAX_HISTORY,
};
use crate::sku::{check_sku, MAX_ID_LEN, MAX_REASON_LEN};

/// Who a change is recorded as made by when the request does not say (`by`).
const DEFAULT_ACTOR: &str = "admin-api";
/// History entries listed when the request does not say (`limit`).
const DEFAULT_HISTORY: u32 = 100;

/// The target a route names, checked.
fn target(sku: Option<&str>) -> Result<Target, Error> {
    match sku {
        Some(sku) => {
            check_sku(sku)?;
            Ok(Target::Sku(sku.to_owned()))
        }
        None => Ok(Target::Gateway),
    }
}

/// Reads the JSON body of a pause or resume.
pub(super) async fn read_body(
    app: &App,
    req: Request<Incoming>,
    fields: &[&str],
) -> Result<JsonBody, Error> {
    let limit = app.limits.max_body_bytes;
    body::check_declared_length(req.headers(), limit)?;
    let bytes = body::read_limited(req.into_body(), limit).await?;
    JsonBody::parse(&bytes, fields)
}

/// `POST /v1/pause` and `POST /v1/skus/{sku}/pause`
/// `{"action": "claims"|"redemptions"|"all", "reason", "expected_duration_ms"?, "by"?}`.
/// Pausing what is paused already keeps its start and takes the new reason and expected end.
pub async fn pause(app: &App, sku: Option<&str>, req: Request<Incoming>) -> Result<Reply, Error> {
    let target = target(sku)?;
    let body = read_body(
        app,
        req,
        &["action", "reason", "expected_duration_ms", "by"],
    )
    .await?;
    let order = PauseOrder {
        target,
        actions: Action::parse_many(body.str("action", 32)?)?,
        reason: body.str("reason", MAX_REASON_LEN)?.to_owned(),
        by: body
            .opt_str("by", MAX_ID_LEN)?
            .unwrap_or(DEFAULT_ACTOR)
            .to_owned(),
        expected_duration_ms: body
            .opt_u64("expected_duration_ms", 1000..=MAX_EXPECTED_DURATION_MS)?,
    };
    let now = app.inventory.now_ms();
    let done = pause::pause(app.ledger.as_ref(), &order, now).await?;
    let mut answers = Vec::with_capacity(done.len());
    for (paused, already) in done {
        tracing::warn!(
            scope = paused.target.scope(),
            sku = sku.unwrap_or(""),
            action = paused.action.as_str(),
            reason = paused.reason,
            by = paused.by,
            expected_end = paused.expected_end_ms.map(timestamp),
            "paused"
        );
        let mut answer = paused.to_json(now);
        answer["already_paused"] = already.into();
        answers.push(answer);
        app.pauses.applied(paused);
    }
    Ok(body::json(StatusCode::OK, &json!({ "pauses": answers })))
}

/// `POST /v1/resume` and `POST /v1/skus/{sku}/resume`
/// `{"action": "claims"|"redemptions"|"all", "reason"?, "by"?}`. Resuming what is not paused
/// changes nothing (`was_paused: false`).
pub async fn resume(app: &App, sku: Option<&str>, req: Request<Incoming>) -> Result<Reply, Error> {
    let target = target(sku)?;
    let body = read_body(app, req, &["action", "reason", "by"]).await?;
    let order = ResumeOrder {
        target,
        actions: Action::parse_many(body.str("action", 32)?)?,
        reason: body.opt_str("reason", MAX_REASON_LEN)?.map(str::to_owned),
        by: body
            .opt_str("by", MAX_ID_LEN)?
            .unwrap_or(DEFAULT_ACTOR)
            .to_owned(),
    };
    let now = app.inventory.now_ms();
    let done = pause::resume(app.ledger.as_ref(), &order, now).await?;
    let mut answers = Vec::with_capacity(done.len());
    for (action, lifted) in done {
        app.pauses.lifted(&order.target, action);
        if let Some(lifted) = &lifted {
            tracing::warn!(
                scope = order.target.scope(),
                sku = sku.unwrap_or(""),
                action = action.as_str(),
                by = order.by,
                paused_for_ms = now.saturating_sub(lifted.since_ms),
                "resumed"
            );
        }
        answers.push(json!({
            "scope": order.target.scope(),
            "sku": sku,
            "action": action.as_str(),
            "was_paused": lifted.is_some(),
            "paused_since": lifted.as_ref().map(|l| timestamp(l.since_ms)),
        }));
    }
    Ok(body::json(StatusCode::OK, &json!({ "resumed": answers })))
}

/// `GET /v1/pauses?sku=…&limit=…`: the pauses in force (every one, gateway-wide first) and
/// the history of pauses and resumes, newest first (of one SKU with `sku`; at most `limit`,
/// 100 by default).
pub async fn list(app: &App, req: Request<Incoming>) -> Result<Reply, Error> {
    let query = req.uri().query();
    let sku = query_param(query, "sku")?;
    if let Some(sku) = &sku {
        check_sku(sku)?;
    }
    let limit = match query_param(query, "limit")? {
        None => DEFAULT_HISTORY,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_HISTORY).contains(n))
            .ok_or_else(|| {
                Error::BadRequest(format!("limit must be an integer from 1 to {MAX_HISTORY}"))
            })?,
    };
    let (in_force, history) = tokio::join!(
        app.ledger.pauses(),
        app.ledger.pause_history(sku.as_deref(), limit)
    );
    let now = app.inventory.now_ms();
    let mut in_force: Vec<_> = in_force?
        .iter()
        .filter_map(pause::Pause::from_record)
        .collect();
    in_force.sort_by_key(|p| p.target != Target::Gateway);
    let in_force: Vec<Value> = in_force.iter().map(|p| p.to_json(now)).collect();
    let history: Vec<Value> = history?.iter().map(event_json).collect();
    Ok(body::json(
        StatusCode::OK,
        &json!({ "pauses": in_force, "history": history }),
    ))
}
