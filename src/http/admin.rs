//! Admin routes (admin bearer token) and the unauthenticated probes: `/healthz`, `/readyz`,
//! `/metrics`. The admin listener is meant to stay off the public network.

use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;

use super::body::{self, JsonBody, Reply};
use super::{App, Params};
use crate::error::Error;
use crate::inventory::import::Importer;
use crate::metrics as m;
use crate::sku::{check_id, check_sku, SkuConfig, MAX_ID_LEN};

/// How long `/readyz` waits for the engine.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// Liveness: the process serves requests.
pub fn healthz() -> Reply {
    body::json(StatusCode::OK, &json!({ "status": "ok" }))
}

/// Readiness: not draining, and the engine answers.
pub async fn readyz(app: &App) -> Reply {
    let engine = app.inventory.engine();
    let kind = engine.kind().to_string();
    if app.draining() {
        return body::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "status": "draining", "engine": kind }),
        );
    }
    match tokio::time::timeout(READY_TIMEOUT, engine.ping()).await {
        Ok(Ok(())) => body::json(
            StatusCode::OK,
            &json!({ "status": "ready", "engine": kind }),
        ),
        _ => body::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "status": "engine unavailable", "engine": kind }),
        ),
    }
}

/// Prometheus text exposition.
pub fn metrics() -> Reply {
    body::text(
        m::handle().render(),
        "text/plain; version=0.0.4; charset=utf-8",
    )
}

/// `PUT /v1/skus/{sku}`: create or update a SKU's settings.
pub async fn put_sku(app: &App, params: Params, req: Request<Incoming>) -> Result<Reply, Error> {
    app.admin(&req)?;
    let sku = params.get("sku");
    check_sku(sku)?;
    let limit = app.limits.max_body_bytes;
    body::check_declared_length(req.headers(), limit)?;
    let bytes = body::read_limited(req.into_body(), limit).await?;
    let fields = [
        "format",
        "per_user_limit",
        "default_hold_ms",
        "max_hold_ms",
        "allow_late_confirm",
        "max_issues",
        "max_uses",
    ];
    let value = JsonBody::parse(&bytes, &fields)?.into_value();
    // Settings hold no secrets, so serde's own messages are safe to return.
    let config: SkuConfig = serde_json::from_value(value)
        .map_err(|e| Error::BadRequest(format!("invalid SKU settings: {e}")))?;
    config.validate()?;
    let created = app.inventory.put_sku(sku, &config).await?;
    app.skus.put(sku, config.clone());
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(body::json(
        status,
        &json!({ "sku": sku, "created": created, "config": config }),
    ))
}

/// `POST /v1/skus/{sku}/batches?batch_id=…`: import codes, a code per line, streamed.
pub async fn import(app: &App, params: Params, req: Request<Incoming>) -> Result<Reply, Error> {
    app.admin(&req)?;
    let sku = params.get("sku");
    check_sku(sku)?;
    let batch_id = match query_param(req.uri().query(), "batch_id") {
        Some(id) => {
            check_id("batch_id", &id, MAX_ID_LEN)?;
            id
        }
        None => format!("b{}", app.inventory.now_ms()),
    };
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !matches!(essence, "text/plain" | "application/octet-stream") {
        return Err(Error::BadRequest(
            "send codes as text/plain, one per line".into(),
        ));
    }
    let limit = app.limits.max_import_bytes;
    body::check_declared_length(req.headers(), limit)?;
    let settings = app.skus.require(&app.inventory, sku).await?;

    let mut importer = Importer::new(&app.inventory, sku, &settings.format);
    let mut upload = req.into_body();
    let mut received: u64 = 0;
    while let Some(frame) = upload.frame().await {
        let frame = frame.map_err(|_| Error::BadRequest("the upload was interrupted".into()))?;
        if let Some(data) = frame.data_ref() {
            received += data.len() as u64;
            if received > limit {
                return Err(Error::PayloadTooLarge { limit_bytes: limit });
            }
            importer.feed(data).await?;
        }
    }
    let report = importer.finish().await?;
    if report.accepted > 0 {
        app.edge.sold_out.invalidate(sku);
    }
    metrics::counter!(m::IMPORT_ROWS, "result" => "accepted").increment(report.accepted);
    metrics::counter!(m::IMPORT_ROWS, "result" => "rejected").increment(report.rejected);
    metrics::counter!(m::IMPORT_ROWS, "result" => "duplicate").increment(report.duplicate);
    tracing::info!(
        sku,
        batch_id,
        accepted = report.accepted,
        rejected = report.rejected,
        duplicate = report.duplicate,
        "imported a batch"
    );
    Ok(body::json(StatusCode::OK, &report.to_json(&batch_id)))
}

/// `POST /v1/keys/{key_id}/void` and `/restore`, with `{"reason": "…"}`.
pub async fn void(
    app: &App,
    params: Params,
    req: Request<Incoming>,
    void: bool,
) -> Result<Reply, Error> {
    app.admin(&req)?;
    let key_id = params.get("key_id").to_owned();
    let limit = app.limits.max_body_bytes;
    body::check_declared_length(req.headers(), limit)?;
    let bytes = body::read_limited(req.into_body(), limit).await?;
    let body = JsonBody::parse(&bytes, &["reason"])?;
    let reason = body.str("reason", 500)?;
    if reason.trim().is_empty() || reason.contains(['|', '\n', '\r', '\0']) {
        return Err(Error::BadRequest(
            "field `reason` must be one line of text".into(),
        ));
    }
    let (changed, state) = if void {
        let before = app.inventory.void(&key_id, reason).await?;
        (before.is_some(), "void".to_owned())
    } else {
        match app.inventory.restore(&key_id, reason).await? {
            Some(after) => {
                if let Some((sku, _)) = crate::sku::parse_key_id(&key_id) {
                    app.edge.sold_out.invalidate(sku);
                }
                (true, after)
            }
            None => (false, String::new()),
        }
    };
    let mut answer = json!({ "key_id": key_id, "changed": changed });
    if !state.is_empty() {
        answer["state"] = state.into();
    }
    Ok(body::json(StatusCode::OK, &answer))
}

/// The first value of `name` in a query string, percent-decoding only `%XX` sequences of
/// the identifier charset (anything else fails identifier checks anyway).
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.to_owned())
    })
}
