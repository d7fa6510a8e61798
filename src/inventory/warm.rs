//! Warm-up: loading the ledger's keys into the engine.
//!
//! The ledger is the source of truth; the engine is a working set that can be rebuilt from
//! it. Keys are loaded in id order, in chunks (no call blocks the engine for long), each in
//! the state the ledger records, so a rebuilt engine never puts a sold or redeemed code
//! back on sale. Loading is idempotent: keys the engine already has are left alone, so an
//! interrupted warm-up simply runs again.

use crate::error::Error;
use crate::ledger::{KeyRecord, Ledger, LedgerError};
use crate::sku::SkuConfig;

use super::Inventory;

/// Keys per engine call while warming.
pub const WARM_CHUNK: u32 = 500;

/// What a warm-up did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmReport {
    /// Keys the engine did not have and now has.
    pub loaded: u64,
    /// Keys the engine already had.
    pub present: u64,
    /// The highest local id seen: where the next warm-up of new keys starts.
    pub last_local_id: i64,
}

/// Maps a ledger failure to the API's error.
pub fn ledger_error(e: LedgerError) -> Error {
    match e {
        LedgerError::Unavailable(why) => Error::Unavailable(format!("ledger: {why}")),
        LedgerError::NotFound(what) => Error::NotFound(what),
        other => Error::Internal(format!("ledger: {other}")),
    }
}

/// Loads every key of `sku` with a local id above `after_local_id` from the ledger into the
/// engine. `progress` is told the running totals after each chunk.
pub async fn warm_sku(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    after_local_id: i64,
    mut progress: impl FnMut(WarmReport),
) -> Result<WarmReport, Error> {
    let mut report = WarmReport {
        last_local_id: after_local_id,
        ..WarmReport::default()
    };
    let mut cursor = after_local_id;
    loop {
        let keys = ledger
            .keys_after(sku, cursor, WARM_CHUNK)
            .await
            .map_err(ledger_error)?;
        let Some(last) = keys.last() else {
            return Ok(report);
        };
        cursor = last.local_id;
        report.last_local_id = cursor;
        let loaded = inventory.warm_keys(sku, &keys).await?;
        report.loaded += loaded;
        report.present += keys.len() as u64 - loaded;
        progress(report);
    }
}

/// Makes sure the engine has `sku`: when it does not (a fresh embedded engine, or Redis that
/// lost its data), recreates it from the ledger's settings and loads all its keys.
/// Returns `None` when the engine already had the SKU.
pub async fn restore_sku(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
) -> Result<Option<WarmReport>, Error> {
    if inventory.get_sku(sku).await?.is_some() {
        return Ok(None);
    }
    let Some(record) = ledger.get_sku(sku).await.map_err(ledger_error)? else {
        return Err(Error::NotFound(format!("SKU {sku}")));
    };
    let config: SkuConfig = serde_json::from_str(&record.config_json)
        .map_err(|e| Error::Internal(format!("ledger settings of SKU {sku}: {e}")))?;
    inventory.put_sku(sku, &config).await?;
    let report = warm_sku(ledger, inventory, sku, 0, |_| {}).await?;
    tracing::info!(
        sku,
        loaded = report.loaded,
        "engine did not have the SKU: restored from the ledger"
    );
    Ok(Some(report))
}

impl Inventory {
    /// Loads ledger keys into the engine (one script call; keep to a few hundred keys) and
    /// the global index. Returns how many were new to the engine.
    pub async fn warm_keys(&self, sku: &str, keys: &[KeyRecord]) -> Result<u64, Error> {
        let mut args = Vec::with_capacity(keys.len() * 12);
        for k in keys {
            args.extend([
                k.local_id.to_string(),
                k.digest.clone(),
                k.code.clone(),
                k.expires_at_ms.unwrap_or(0).to_string(),
                k.max_issues.to_string(),
                k.max_uses.to_string(),
                k.held.to_string(),
                k.sold.to_string(),
                k.uses.to_string(),
                if k.void { "1" } else { "0" }.to_owned(),
                k.redeemer.clone().unwrap_or_default(),
                k.redeemed_at_ms.unwrap_or(0).to_string(),
            ]);
        }
        let reply = self
            .run_sku(&crate::engine::SCRIPTS.warm, sku, args)
            .await?;
        if reply.first().and_then(|r| r.as_str()) == Some("no_sku") {
            return Err(Error::NotFound(format!("SKU {sku}")));
        }
        let loaded = reply
            .iter()
            .filter(|r| r.as_str().is_some_and(|s| !s.starts_with('=')))
            .count() as u64;
        let codes: Vec<&str> = keys.iter().map(|k| k.code.as_str()).collect();
        self.index_codes(sku, &codes).await?;
        Ok(loaded)
    }
}
