//! The public route: `POST /v1/redeem`. No token; rate limits apply per client.

use std::net::IpAddr;

use http::{Request, StatusCode};
use hyper::body::Incoming;

use super::body::{self, JsonBody, Reply};
use super::App;
use crate::code::Format;
use crate::error::Error;
use crate::inventory::{canonical, Redemption};
use crate::metrics as m;
use crate::pause::{or_paused, Action};
use crate::sku::{check_id, check_sku, MAX_ID_LEN, MAX_SKU_LEN};

/// Longest `code` field accepted before any parsing; a canonical code has at most 256
/// characters, the rest is room for spaces and dashes.
pub const MAX_RAW_CODE_BYTES: usize = 1024;

/// Redeems a sold code for a redeemer.
pub async fn redeem(app: &App, req: Request<Incoming>, ip: IpAddr) -> Result<Reply, Error> {
    app.edge.public(ip)?;
    let limit = app.limits.max_body_bytes;
    body::check_declared_length(req.headers(), limit)?;
    let bytes = body::read_limited(req.into_body(), limit).await?;
    let result = redeem_body(app, &bytes, ip).await;
    let outcome = match &result {
        Ok(r) if r.replayed => "replay",
        Ok(_) => "new",
        Err(e) => e.code(),
    };
    let version = result
        .as_ref()
        .ok()
        .and_then(|r| r.format_version)
        .map_or(m::VersionLabel::None, m::VersionLabel::Of);
    metrics::counter!(
        m::REDEMPTIONS,
        "outcome" => outcome,
        "format_version" => version.as_str()
    )
    .increment(1);
    Ok(body::json(StatusCode::OK, &result?.to_json()))
}

async fn redeem_body(app: &App, bytes: &[u8], ip: IpAddr) -> Result<Redemption, Error> {
    let body = JsonBody::parse(bytes, &["code", "redeemer", "sku"])?;
    let raw = body.str("code", MAX_RAW_CODE_BYTES)?;
    let redeemer = body.str("redeemer", MAX_ID_LEN)?;
    check_id("redeemer", redeemer, MAX_ID_LEN)?;
    let sku = body.opt_str("sku", MAX_SKU_LEN)?;
    app.edge.redemption_allowed(ip, redeemer).await?;
    let result = attempt(app, raw, redeemer, sku).await;
    if matches!(
        result,
        Err(Error::CardMalformed(_) | Error::CardInvalid | Error::CardUsed { .. })
    ) {
        app.edge.redemption_failed(ip, redeemer).await;
    }
    result
}

/// One redemption attempt, after the limits let it through. While redemptions of the SKU
/// (or of every SKU) are paused, the script makes no new redemption (see [`crate::pause`]).
async fn attempt(
    app: &App,
    raw: &str,
    redeemer: &str,
    sku: Option<&str>,
) -> Result<Redemption, Error> {
    let inventory = &app.inventory;
    let now = inventory.now_ms();
    match sku {
        Some(sku) => {
            check_sku(sku)?;
            let paused = app.pauses.check(sku, Action::Redemptions, now).err();
            let redeemed = async {
                let settings = app.skus.get(inventory, sku).await?;
                // An unknown SKU answers like an unknown code once the code is well-formed.
                let Some(settings) = settings else {
                    canonical(&Format::default(), raw)?;
                    return Err(Error::CardInvalid);
                };
                // Malformed only under every format version the SKU ever had; the hint is the
                // current format's.
                let candidates = settings.candidates(raw).map_err(Error::CardMalformed)?;
                let redemption = inventory
                    .redeem_any(sku, &candidates, redeemer, paused.as_ref())
                    .await?;
                app.durable(
                    sku,
                    redemption.event_id.as_deref(),
                    redemption.emitted.as_ref(),
                )
                .await?;
                Ok(redemption)
            }
            .await;
            or_paused(redeemed, paused)
        }
        None => {
            canonical(&Format::default(), raw)?;
            let located = inventory.locate(raw).await;
            let located = or_paused(
                located,
                app.pauses.check_gateway(Action::Redemptions, now).err(),
            )?;
            if let Some(sku) = located {
                // The SKU's own format judges the code; failing it here would reveal that
                // the index knew the code, so it gets the uniform answer instead.
                let paused = app.pauses.check(&sku, Action::Redemptions, now).err();
                let redeemed = async {
                    let settings = app.skus.get(inventory, &sku).await?;
                    if let Some(Ok(candidates)) = settings.map(|s| s.candidates(raw)) {
                        let redemption = inventory
                            .redeem_any(&sku, &candidates, redeemer, paused.as_ref())
                            .await?;
                        app.durable(
                            &sku,
                            redemption.event_id.as_deref(),
                            redemption.emitted.as_ref(),
                        )
                        .await?;
                        return Ok(Some(redemption));
                    }
                    Ok(None)
                }
                .await;
                if let Some(redemption) = or_paused(redeemed, paused)? {
                    return Ok(redemption);
                }
            }
            // Not redeemable wherever the index pointed, or nowhere: the same script call as
            // an unsold code costs, so timing does not reveal which codes exist.
            inventory.redeem_unknown(raw, redeemer).await?;
            Err(Error::CardInvalid)
        }
    }
}
