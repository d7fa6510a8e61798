//! Admin routes (admin bearer token) and the unauthenticated probes: `/healthz`, `/readyz`
//! (on both listeners), `/metrics` (admin only). The admin listener is meant to stay off the
//! public network.

use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;

use super::body::{self, JsonBody, Reply};
use super::target::query_param;
use super::{App, Params};
use crate::error::timestamp;
use crate::error::Error;
use crate::inventory::formats::UploadFormat;
use crate::inventory::import::{self, Begun, Importer, Runner};
use crate::inventory::reconcile;
use crate::inventory::warm::{restore_sku, warm_sku};
use crate::metrics as m;
use crate::sku::{
    check_id, check_reason, check_sku, parse_key_id, Retirement, SkuConfig, MAX_ID_LEN,
    MAX_REASON_LEN,
};

/// How long `/readyz` waits for the engine.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// Liveness: the process serves requests.
pub fn healthz() -> Reply {
    body::json(StatusCode::OK, &json!({ "status": "ok" }))
}

/// Readiness: not draining, and the engine answers.
pub async fn readyz(app: &App) -> Reply {
    app.readiness_probed();
    let engine = app.inventory.engine();
    let kind = engine.kind().to_string();
    if app.draining() {
        return body::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "status": "draining", "engine": kind }),
        );
    }
    let reason = match tokio::time::timeout(READY_TIMEOUT, engine.ping()).await {
        Ok(Ok(())) => {
            return body::json(
                StatusCode::OK,
                &json!({ "status": "ready", "engine": kind }),
            )
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!(
            "the engine did not answer within {} ms",
            READY_TIMEOUT.as_millis()
        ),
    };
    body::json(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({ "status": "engine unavailable", "engine": kind, "reason": reason }),
    )
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
        "blacklist",
    ];
    let value = JsonBody::parse(&bytes, &fields)?.into_value();
    // Settings hold no secrets, so serde's own messages are safe to return.
    let mut config: SkuConfig = serde_json::from_value(value)
        .map_err(|e| Error::BadRequest(format!("invalid SKU settings: {e}")))?;
    // Codes come in clear and are stored only sealed; the sealed form is the gateway's own.
    let crate::sku::Blacklist::Clear(blacklist) = &config.blacklist else {
        return Err(Error::BadRequest(
            "field `blacklist` must be a list of codes".into(),
        ));
    };
    config.validate()?;
    config.blacklist = crate::sku::Blacklist::sealed(blacklist, &app.inventory.keyring(), sku);
    // A changed format is a new version; the SKU keeps the earlier ones, so codes sold
    // under them stay redeemable by their own rules.
    let now = app.inventory.now_ms();
    let stored = stored_settings(app, sku).await?;
    config.succeed(stored.as_ref(), now);
    // The ledger first: it is the record the engine can always be rebuilt from.
    save_settings(app, sku, &config).await?;
    let created = app.inventory.put_sku(sku, &config).await?;
    if created {
        app.writer.sku_added();
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(body::json(
        status,
        &json!({ "sku": sku, "created": created, "config": config.shown() }),
    ))
}

/// `POST /v1/skus/{sku}/batches?batch_id=…&activate=…`: import codes, streamed, through
/// the ledger. `text/plain` (a code per line, or CSV under a `code` header), `text/csv` (a
/// `code` column, optional `expires_at`, `max_uses`) or `application/x-ndjson`. A file
/// refused before any row is imported (an unsupported type, an unusable CSV header) leaves
/// its batch id unused; another upload still filling the batch id is `409`. Without
/// `batch_id` the upload gets a fresh id, returned in the answer.
pub async fn import(app: &App, params: Params, req: Request<Incoming>) -> Result<Reply, Error> {
    let sku = params.get("sku");
    check_sku(sku)?;
    let query = req.uri().query();
    let batch_id = match query_param(query, "batch_id")? {
        Some(id) => {
            check_id("batch_id", &id, MAX_ID_LEN)?;
            id
        }
        // Unique per upload, not per millisecond: two uploads at once must not share an id,
        // or the second would be answered as a replay of the first and import nothing. The
        // answer carries the id, so a client retries with it.
        None => format!("b{}-{:08x}", app.inventory.now_ms(), rand::random::<u32>()),
    };
    let activate = match query_param(query, "activate")?.as_deref() {
        None | Some("true") | Some("1") => true,
        Some("false") | Some("0") => false,
        Some(_) => return Err(Error::BadRequest("activate must be true or false".into())),
    };
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let format = UploadFormat::from_content_type(content_type).ok_or_else(|| {
        Error::BadRequest(
            "send text/plain (a code per line), text/csv or application/x-ndjson".into(),
        )
    })?;
    let limit = app.limits.max_import_bytes;
    body::check_declared_length(req.headers(), limit)?;
    let settings = app.skus.require(&app.inventory, sku).await?;

    let importer = Importer::begin(
        app.ledger.as_ref(),
        &app.inventory,
        sku,
        &batch_id,
        &settings,
        format,
        Some(Runner {
            name: &app.writer.options().consumer,
            ledger: app.ledger.clone(),
        }),
    )
    .await?;
    let mut importer = match importer {
        Begun::Fresh(importer) => importer,
        Begun::Replayed(report) => {
            return Ok(body::json(StatusCode::OK, &report.to_json(&batch_id)))
        }
    };
    let mut upload = req.into_body();
    let mut received: u64 = 0;
    let fed: Result<(), Error> = async {
        while let Some(frame) = upload.frame().await {
            let frame =
                frame.map_err(|_| Error::BadRequest("the upload was interrupted".into()))?;
            if let Some(data) = frame.data_ref() {
                received += data.len() as u64;
                if received > limit {
                    return Err(Error::PayloadTooLarge { limit_bytes: limit });
                }
                importer.feed(data).await?;
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = fed {
        // Nothing of a failed upload stays: no partial batch is ever visible to claims.
        importer.abort().await;
        return Err(e);
    }
    let report = importer.finish(activate, true).await?;
    if report.accepted > 0 && activate {
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
        state = report.state,
        "imported a batch"
    );
    Ok(body::json(StatusCode::OK, &report.to_json(&batch_id)))
}

/// `POST /v1/skus/{sku}/batches/{batch_id}/activate`: a pending batch goes on sale; `409`
/// while its upload still runs, `404` for a batch id no upload filled.
pub async fn activate(app: &App, params: Params) -> Result<Reply, Error> {
    let (sku, batch_id) = (params.get("sku"), params.get("batch_id"));
    check_sku(sku)?;
    check_id("batch_id", batch_id, MAX_ID_LEN)?;
    app.skus.require(&app.inventory, sku).await?;
    let warmed = import::activate(app.ledger.as_ref(), &app.inventory, sku, batch_id).await?;
    app.edge.sold_out.invalidate(sku);
    Ok(body::json(
        StatusCode::OK,
        &json!({ "sku": sku, "batch_id": batch_id, "state": "active", "loaded": warmed.loaded }),
    ))
}

/// `POST /v1/skus/{sku}/warm`: load every ledger key the engine lacks.
pub async fn warm(app: &App, params: Params) -> Result<Reply, Error> {
    let sku = params.get("sku");
    check_sku(sku)?;
    let restored = restore_sku(app.ledger.as_ref(), &app.inventory, sku, app.rebuild_grace).await?;
    let report = match restored {
        Some(report) => report,
        None => warm_sku(app.ledger.as_ref(), &app.inventory, sku, 0, |_| {}).await?,
    };
    app.edge.sold_out.invalidate(sku);
    Ok(body::json(
        StatusCode::OK,
        &json!({ "sku": sku, "loaded": report.loaded, "present": report.present }),
    ))
}

/// `GET /v1/keys/{key_id}/events`: a key's audit trail, oldest first.
pub async fn key_events(app: &App, params: Params) -> Result<Reply, Error> {
    let key_id = params.get("key_id");
    let not_found = || Error::NotFound(format!("key {key_id}"));
    parse_key_id(key_id).ok_or_else(not_found)?;
    let key = app.ledger.get_key(key_id).await?.ok_or_else(not_found)?;
    let events = app.ledger.key_events(key_id).await?;
    let events: Vec<_> = events
        .iter()
        .map(|e| {
            let fields: serde_json::Value =
                serde_json::from_str(&e.fields_json).unwrap_or(serde_json::Value::Null);
            json!({
                "event_id": e.event_id,
                "kind": e.kind,
                "at": timestamp(e.at_ms.max(0) as u64),
                "order_id": e.order_id,
                "user_id": e.user_id,
                "redeemer": e.redeemer,
                "reason": e.reason,
                "fields": fields,
            })
        })
        .collect();
    Ok(body::json(
        StatusCode::OK,
        &json!({
            "key_id": key.key_id,
            "sku": key.sku,
            "state": key.state,
            "batch_id": key.batch_id,
            "format_version": key.format_version,
            "events": events,
        }),
    ))
}

/// `POST /v1/reconcile` with `{"sku"?, "repair"?}`: compare engine and ledger key by key.
pub async fn reconcile(app: &App, req: Request<Incoming>) -> Result<Reply, Error> {
    let limit = app.limits.max_body_bytes;
    body::check_declared_length(req.headers(), limit)?;
    let bytes = body::read_limited(req.into_body(), limit).await?;
    let body = JsonBody::parse(&bytes, &["sku", "repair"])?;
    let sku = body.opt_str("sku", crate::sku::MAX_SKU_LEN)?;
    if let Some(sku) = sku {
        check_sku(sku)?;
    }
    let repair = body.opt_bool("repair")?.unwrap_or(false);
    let writer = &app.writer;
    let reports = reconcile::reconcile(
        app.ledger.as_ref(),
        &app.inventory,
        sku,
        repair,
        |sku| async move {
            writer
                .backlog(&sku)
                .await
                .map(|b| b.in_flight())
                .map_err(|e| Error::Unavailable(format!("event stream: {e}")))
        },
    )
    .await?;
    if repair {
        for r in reports.iter().filter(|r| r.repaired > 0) {
            app.edge.sold_out.invalidate(&r.sku);
        }
    }
    Ok(body::json(
        StatusCode::OK,
        &json!({ "repair": repair, "skus": reports }),
    ))
}

/// `POST /v1/rekey` with `{"sku"?, "index"?}`: reads the data keys again (a key file may
/// have gained a sealing key), then seals every stored code still under an older data key
/// (or in clear) under the current one; with `index`, digests are keyed anew too.
pub async fn rekey(app: &App, req: Request<Incoming>) -> Result<Reply, Error> {
    let limit = app.limits.max_body_bytes;
    body::check_declared_length(req.headers(), limit)?;
    let bytes = body::read_limited(req.into_body(), limit).await?;
    let body = JsonBody::parse(&bytes, &["sku", "index"])?;
    let sku = body.opt_str("sku", crate::sku::MAX_SKU_LEN)?;
    if let Some(sku) = sku {
        check_sku(sku)?;
    }
    let index = body.opt_bool("index")?.unwrap_or(false);
    app.inventory
        .reload_keys()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let report =
        crate::inventory::rekey::rekey(app.ledger.as_ref(), &app.inventory, sku, index).await?;
    if report.migrated > 0 {
        app.ledger.purge_freed().await?;
    }
    let keyring = app.inventory.keyring();
    Ok(body::json(
        StatusCode::OK,
        &json!({
            "data_key": keyring.current_id(),
            "index_key": keyring.index_id(),
            "index": index,
            "report": report,
        }),
    ))
}

/// `POST /v1/keys/{key_id}/void` and `/restore`, with `{"reason": "…"}`.
pub async fn void(
    app: &App,
    params: Params,
    req: Request<Incoming>,
    void: bool,
) -> Result<Reply, Error> {
    let key_id = params.get("key_id").to_owned();
    let limit = app.limits.max_body_bytes;
    body::check_declared_length(req.headers(), limit)?;
    let bytes = body::read_limited(req.into_body(), limit).await?;
    let body = JsonBody::parse(&bytes, &["reason"])?;
    let reason = body.str("reason", MAX_REASON_LEN)?;
    check_reason(reason)?;
    let change = if void {
        app.inventory.void_change(&key_id, reason).await?
    } else {
        app.inventory.restore_change(&key_id, reason).await?
    };
    // Answered changes are as durable as claims and redemptions.
    if let (Some(change), Some((sku, _))) = (&change, parse_key_id(&key_id)) {
        app.durable(sku, change.event_id.as_deref(), change.emitted.as_ref())
            .await?;
        if !void {
            app.edge.sold_out.invalidate(sku);
        }
    }
    if change.is_none() {
        // Void already (or not): the state may stand on an earlier call's change, whose
        // answer timed out waiting for the ledger (the call a client now retries).
        app.ledger_agrees(|| async {
            let key = app.ledger.get_key(&key_id).await?;
            Ok(key.is_some_and(|key| key.void == void))
        })
        .await?;
    }
    let (changed, state) = match (void, change) {
        (true, change) => (change.is_some(), "void".to_owned()),
        (false, Some(change)) => (true, change.state),
        (false, None) => (false, String::new()),
    };
    let mut answer = json!({ "key_id": key_id, "changed": changed });
    if !state.is_empty() {
        answer["state"] = state.into();
    }
    Ok(body::json(StatusCode::OK, &answer))
}

/// A SKU's settings as the ledger records them, or `None` for a new SKU.
async fn stored_settings(app: &App, sku: &str) -> Result<Option<SkuConfig>, Error> {
    let Some(record) = app.ledger.get_sku(sku).await? else {
        return Ok(None);
    };
    serde_json::from_str(&record.config_json)
        .map(Some)
        .map_err(|e| Error::Internal(format!("ledger settings of SKU {sku}: {e}")))
}

/// Writes a SKU's settings to the ledger (first: the engine is rebuilt from it) and this
/// gateway's cache; the caller writes the engine.
async fn save_settings(app: &App, sku: &str, config: &SkuConfig) -> Result<(), Error> {
    let json = serde_json::to_string(config)
        .map_err(|e| Error::Internal(format!("encoding SKU settings: {e}")))?;
    app.ledger
        .put_sku(
            sku,
            &json,
            config.format_version,
            app.inventory.now_ms() as i64,
        )
        .await?;
    app.skus.put(sku, config.clone());
    Ok(())
}

/// `POST /v1/skus/{sku}/formats/{version}/retire` `{"reason", "force"?}`: an earlier format
/// version goes out of use. Its keys are voided (each void is in the key's audit trail with
/// the reason), so its codes answer like unknown ones, never as malformed. Refused while
/// sold keys of it are not redeemed yet, unless forced.
pub async fn retire_format(
    app: &App,
    params: Params,
    req: Request<Incoming>,
) -> Result<Reply, Error> {
    let sku = params.get("sku");
    check_sku(sku)?;
    let not_found = || Error::NotFound(format!("format version of SKU {sku}"));
    let version: u32 = params.get("version").parse().map_err(|_| not_found())?;
    let limit = app.limits.max_body_bytes;
    body::check_declared_length(req.headers(), limit)?;
    let bytes = body::read_limited(req.into_body(), limit).await?;
    let body = JsonBody::parse(&bytes, &["reason", "force"])?;
    let reason = body.str("reason", MAX_REASON_LEN)?;
    check_reason(reason)?;
    let force = body.opt_bool("force")?.unwrap_or(false);
    let mut config = stored_settings(app, sku)
        .await?
        .ok_or_else(|| Error::NotFound(format!("SKU {sku}")))?;
    if version == config.format_version {
        return Err(Error::BadRequest(format!(
            "format version {version} is the current one: change the format first"
        )));
    }
    let entry = config.earlier_format_mut(version).ok_or_else(not_found)?;
    if entry.retired.is_some() {
        return Ok(body::json(
            StatusCode::OK,
            &json!({ "sku": sku, "version": version, "retired": true, "voided": 0, "replayed": true }),
        ));
    }
    // The version's keys as the engine has them: the ledger may not have heard of the
    // latest sales yet.
    let mut keys = Vec::new();
    let mut cursor = 0;
    loop {
        let page = app.ledger.keys_after(sku, cursor, 500).await?;
        let Some(last) = page.last() else { break };
        cursor = last.local_id;
        keys.extend(
            page.into_iter()
                .filter(|k| k.format_version == i64::from(version)),
        );
    }
    let mut unredeemed = 0;
    for chunk in keys.chunks(500) {
        let ids = chunk.iter().map(|k| k.local_id.to_string()).collect();
        let engine = app
            .inventory
            .run_sku(&crate::engine::SCRIPTS.inspect, sku, ids)
            .await?;
        for (key, reply) in chunk.iter().zip(&engine) {
            let n = |i: usize| {
                reply
                    .item(i)
                    .and_then(crate::engine::Reply::as_i64)
                    .unwrap_or(0)
            };
            let void = reply.item(0).and_then(|v| v.as_str()) == Some("1");
            let (held, sold, uses) = (n(1), n(2), n(3));
            if !void && (held > 0 || (sold > 0 && uses < key.max_uses)) {
                unredeemed += 1;
            }
        }
    }
    if unredeemed > 0 && !force {
        return Err(Error::FormatInUse {
            version,
            unredeemed,
        });
    }
    let void_reason = format!("format version {version} retired: {reason}");
    let mut voided = 0;
    for key in &keys {
        let change = app.inventory.void_change(&key.key_id, &void_reason).await?;
        if let Some(change) = change {
            app.durable(sku, change.event_id.as_deref(), change.emitted.as_ref())
                .await?;
            voided += 1;
        }
    }
    let entry = config.earlier_format_mut(version).ok_or_else(not_found)?;
    entry.retired = Some(Retirement {
        at_ms: app.inventory.now_ms(),
        reason: reason.to_owned(),
        forced: unredeemed > 0,
    });
    save_settings(app, sku, &config).await?;
    app.inventory.put_sku(sku, &config).await?;
    Ok(body::json(
        StatusCode::OK,
        &json!({
            "sku": sku,
            "version": version,
            "retired": true,
            "voided": voided,
            "stranded": unredeemed,
            "replayed": false,
        }),
    ))
}
