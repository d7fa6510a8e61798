//! Channel administration on the admin listener (admin token): create or change a channel
//! (`PUT /v1/channels/{channel}`), list them, make and revoke their tokens, read a
//! channel's history. The ledger records every change (see [`crate::channel`]); this
//! gateway serves a change made through it at once, the others within
//! `channel_refresh_ms`.

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::body::{self, Reply};
use super::pauses::read_body;
use super::target::query_param;
use super::{App, Params};
use crate::channel::{
    check_channel, token_digest, ChannelConfig, MAX_CHANNELS, MAX_LABEL_LEN, MAX_LIVE_TOKENS,
};
use crate::error::{timestamp, Error};
use crate::ledger::{ChannelRecord, ChannelTokenRecord};
use crate::sku::MAX_ID_LEN;

/// Who a change is recorded as made by when the request does not say (`by`).
const DEFAULT_ACTOR: &str = "admin-api";
/// History entries listed when the request does not say (`limit`).
const DEFAULT_HISTORY: u32 = 100;
/// Most history entries one listing returns.
const MAX_HISTORY: u32 = 1000;

/// The fields of `PUT /v1/channels/{channel}`.
const SETTINGS_FIELDS: &[&str] = &[
    "skus",
    "limits",
    "breaker",
    "description",
    "own_pool_only",
    "by",
];

/// `PUT /v1/channels/{channel}`: create a channel or replace its settings.
pub async fn put(app: &App, params: Params, req: Request<Incoming>) -> Result<Reply, Error> {
    let name = params.get("channel");
    check_channel(name)?;
    let body = read_body(app, req, SETTINGS_FIELDS).await?;
    let by = actor(body.opt_str("by", MAX_ID_LEN)?)?;
    let mut value = body.into_value();
    if let Some(fields) = value.as_object_mut() {
        fields.remove("by");
    }
    // Settings hold no secrets, so serde's own messages are safe to return.
    let config: ChannelConfig = serde_json::from_value(value)
        .map_err(|e| Error::BadRequest(format!("invalid channel settings: {e}")))?;
    config.validate()?;
    let existing = app.ledger.channels().await?;
    if existing.len() >= MAX_CHANNELS && !existing.iter().any(|c| c.channel == name) {
        return Err(Error::BadRequest(format!(
            "a ledger holds at most {MAX_CHANNELS} channels (names are a metric label)"
        )));
    }
    let json = serde_json::to_string(&config)
        .map_err(|e| Error::Internal(format!("channel settings as JSON: {e}")))?;
    let now = app.inventory.now_ms();
    let created = app.ledger.put_channel(name, &json, &by, now as i64).await?;
    app.channels.refresh(app.ledger.as_ref()).await;
    tracing::info!(channel = name, created, by, "channel settings put");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(body::json(
        status,
        &json!({ "channel": name, "created": created, "config": config }),
    ))
}

/// `GET /v1/channels`: every channel, with its tokens (never the tokens themselves).
pub async fn list(app: &App) -> Result<Reply, Error> {
    let records = app.ledger.channels().await?;
    let now = app.inventory.now_ms();
    let channels: Vec<Value> = records.iter().map(|r| channel_json(app, r, now)).collect();
    Ok(body::json(StatusCode::OK, &json!({ "channels": channels })))
}

/// `GET /v1/channels/{channel}`.
pub async fn get(app: &App, params: Params) -> Result<Reply, Error> {
    let record = require(app, params.get("channel")).await?;
    let now = app.inventory.now_ms();
    Ok(body::json(StatusCode::OK, &channel_json(app, &record, now)))
}

/// `POST /v1/channels/{channel}/tokens` `{"label"?, "by"?}`: a new token for the channel,
/// shown this once. Several tokens are valid at once, so a client can switch to the new one
/// before the old one is revoked.
pub async fn add_token(app: &App, params: Params, req: Request<Incoming>) -> Result<Reply, Error> {
    let name = params.get("channel");
    let body = read_body(app, req, &["label", "by"]).await?;
    let label = body.opt_str("label", MAX_LABEL_LEN)?;
    if label.is_some_and(|l| l.trim().is_empty() || l.contains(char::is_control)) {
        return Err(Error::BadRequest(
            "field `label` must be one line of text".into(),
        ));
    }
    let by = actor(body.opt_str("by", MAX_ID_LEN)?)?;
    let record = require(app, name).await?;
    let live = record
        .tokens
        .iter()
        .filter(|t| t.revoked_at_ms.is_none())
        .count();
    if live >= MAX_LIVE_TOKENS {
        return Err(Error::BadRequest(format!(
            "channel {name} has {live} live tokens, the most it may have; revoke one first"
        )));
    }
    let token = crate::tokens::generate_token();
    let record = ChannelTokenRecord {
        token_id: format!("tok-{:012x}", rand::random::<u64>() >> 16),
        channel: name.to_owned(),
        digest: hex::encode(token_digest(token.as_bytes())),
        label: label.map(str::to_owned),
        created_at_ms: app.inventory.now_ms() as i64,
        revoked_at_ms: None,
    };
    if !app.ledger.add_channel_token(&record, &by).await? {
        return Err(Error::NotFound(format!("channel {name}")));
    }
    app.channels.refresh(app.ledger.as_ref()).await;
    tracing::info!(
        channel = name,
        token_id = record.token_id,
        by,
        "channel token added"
    );
    let mut answer = token_json(&record);
    answer["token"] = token.into();
    Ok(body::json(StatusCode::CREATED, &answer))
}

/// `POST /v1/channels/{channel}/tokens/{token_id}/revoke` `{"by"?}`: the token stops
/// authenticating, here at once, on other gateways within `channel_refresh_ms`.
pub async fn revoke_token(
    app: &App,
    params: Params,
    req: Request<Incoming>,
) -> Result<Reply, Error> {
    let (name, token_id) = (params.get("channel"), params.get("token_id"));
    check_channel(name)?;
    let body = read_body(app, req, &["by"]).await?;
    let by = actor(body.opt_str("by", MAX_ID_LEN)?)?;
    let now = app.inventory.now_ms() as i64;
    let Some(token) = app
        .ledger
        .revoke_channel_token(name, token_id, &by, now)
        .await?
    else {
        return Err(Error::NotFound(format!(
            "token {token_id} of channel {name}"
        )));
    };
    app.channels.refresh(app.ledger.as_ref()).await;
    tracing::info!(channel = name, token_id, by, "channel token revoked");
    Ok(body::json(StatusCode::OK, &token_json(&token)))
}

/// `GET /v1/channels/{channel}/events?limit=`: the channel's changes, newest first.
pub async fn history(app: &App, params: Params, req: Request<Incoming>) -> Result<Reply, Error> {
    let name = params.get("channel");
    check_channel(name)?;
    let limit = match query_param(req.uri().query(), "limit")? {
        None => DEFAULT_HISTORY,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_HISTORY).contains(n))
            .ok_or_else(|| Error::BadRequest(format!("limit must be from 1 to {MAX_HISTORY}")))?,
    };
    let events = app.ledger.channel_history(name, limit).await?;
    let events: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "kind": e.kind,
                "detail": serde_json::from_str::<Value>(&e.detail_json).unwrap_or(Value::Null),
                "by": e.actor,
                "at": timestamp(e.at_ms.max(0) as u64),
            })
        })
        .collect();
    Ok(body::json(
        StatusCode::OK,
        &json!({ "channel": name, "events": events }),
    ))
}

/// The channel's ledger record; `ERR_NOT_FOUND` when there is none.
async fn require(app: &App, name: &str) -> Result<ChannelRecord, Error> {
    check_channel(name)?;
    app.ledger
        .channels()
        .await?
        .into_iter()
        .find(|c| c.channel == name)
        .ok_or_else(|| Error::NotFound(format!("channel {name}")))
}

fn actor(by: Option<&str>) -> Result<String, Error> {
    let by = by.unwrap_or(DEFAULT_ACTOR);
    crate::sku::check_id("by", by, MAX_ID_LEN)?;
    Ok(by.to_owned())
}

fn channel_json(app: &App, record: &ChannelRecord, now_ms: u64) -> Value {
    let config = serde_json::from_str::<Value>(&record.config_json).unwrap_or(Value::Null);
    let breaker = app
        .channels
        .serving(&record.channel)
        .ok()
        .map(|c| c.breaker_state(now_ms).as_str());
    json!({
        "channel": record.channel,
        "config": config,
        "tokens": record.tokens.iter().map(token_json).collect::<Vec<_>>(),
        "breaker": breaker,
        "created_at": timestamp(record.created_at_ms.max(0) as u64),
        "updated_at": timestamp(record.updated_at_ms.max(0) as u64),
    })
}

fn token_json(token: &ChannelTokenRecord) -> Value {
    json!({
        "token_id": token.token_id,
        "label": token.label,
        "created_at": timestamp(token.created_at_ms.max(0) as u64),
        "revoked_at": token.revoked_at_ms.map(|t| timestamp(t.max(0) as u64)),
    })
}
