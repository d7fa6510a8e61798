//! A short-lived cache of SKU settings, so the edge can validate codes and reject unknown
//! SKUs without a round trip per request. Entries live [`SETTINGS_TTL`]: a change made
//! through another gateway instance is seen within that time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::Inventory;
use crate::error::Error;
use crate::ledger::Ledger;
use crate::sku::SkuConfig;

/// How long a cached SKU's settings are trusted.
pub const SETTINGS_TTL: Duration = Duration::from_secs(5);

/// Names the ledger said it does not have, remembered at most (each for [`SETTINGS_TTL`]):
/// requests for made-up SKUs then cost no ledger read each, and cannot grow the memory.
pub const UNKNOWN_MAX: usize = 10_000;

/// SKU name → settings, as last read from the engine.
#[derive(Default)]
pub struct SkuSettings {
    entries: DashMap<String, (Arc<SkuConfig>, Instant)>,
    /// SKUs the ledger has: one the engine lacks is being rebuilt, not unknown.
    known: DashMap<String, ()>,
    /// Asked about a SKU the engine lacks and `known` does not list (created through
    /// another gateway since this one last listed the ledger's SKUs).
    ledger: Option<Arc<dyn Ledger>>,
    /// Names the ledger did not have, and when it said so.
    unknown: DashMap<String, Instant>,
}

impl SkuSettings {
    /// Settings that ask `ledger` whether a SKU the engine lacks exists.
    pub fn with_ledger(ledger: Arc<dyn Ledger>) -> SkuSettings {
        SkuSettings {
            ledger: Some(ledger),
            ..SkuSettings::default()
        }
    }

    /// The settings of `sku`, or `None` if it does not exist.
    pub async fn get(
        &self,
        inventory: &Inventory,
        sku: &str,
    ) -> Result<Option<Arc<SkuConfig>>, Error> {
        if let Some(entry) = self.entries.get(sku) {
            if entry.1.elapsed() < SETTINGS_TTL {
                return Ok(Some(entry.0.clone()));
            }
        }
        let Some(config) = inventory.get_sku(sku).await? else {
            self.entries.remove(sku);
            if self.known.contains_key(sku) || self.in_ledger(sku).await? {
                // The engine lost it: the gateway is (about to be) rebuilding it. "Unknown
                // SKU" would tell buyers the product does not exist.
                return Err(super::rebuilding(sku));
            }
            return Ok(None);
        };
        let config = Arc::new(config);
        self.entries
            .insert(sku.to_owned(), (config.clone(), Instant::now()));
        Ok(Some(config))
    }

    /// Whether the ledger has `sku`, for a SKU neither the engine nor `known` has: another
    /// gateway may have created it since this one listed the ledger's SKUs, and the engine
    /// lost it since. A ledger that cannot say is `ERR_UNAVAILABLE`, never "unknown".
    async fn in_ledger(&self, sku: &str) -> Result<bool, Error> {
        let Some(ledger) = &self.ledger else {
            return Ok(false);
        };
        if self
            .unknown
            .get(sku)
            .is_some_and(|at| at.elapsed() < SETTINGS_TTL)
        {
            return Ok(false);
        }
        let found = ledger.get_sku(sku).await.map_err(|e| {
            Error::Unavailable(format!(
                "SKU {sku} is not in the engine and the ledger cannot be asked: {e}"
            ))
        })?;
        if found.is_some() {
            self.known.insert(sku.to_owned(), ());
            self.unknown.remove(sku);
            return Ok(true);
        }
        if self.unknown.len() >= UNKNOWN_MAX {
            self.unknown.retain(|_, at| at.elapsed() < SETTINGS_TTL);
        }
        if self.unknown.len() < UNKNOWN_MAX {
            self.unknown.insert(sku.to_owned(), Instant::now());
        }
        Ok(false)
    }

    /// Like [`SkuSettings::get`], but an unknown SKU is `ERR_NOT_FOUND`.
    pub async fn require(&self, inventory: &Inventory, sku: &str) -> Result<Arc<SkuConfig>, Error> {
        self.get(inventory, sku)
            .await?
            .ok_or_else(|| Error::NotFound(format!("SKU {sku}")))
    }

    /// Records settings just written by this instance.
    pub fn put(&self, sku: &str, config: SkuConfig) {
        self.known.insert(sku.to_owned(), ());
        self.entries
            .insert(sku.to_owned(), (Arc::new(config), Instant::now()));
    }

    /// Records the SKUs the ledger has (they only ever grow: there is no deletion).
    pub fn know(&self, skus: &[String]) {
        for sku in skus {
            if !self.known.contains_key(sku) {
                self.known.insert(sku.clone(), ());
            }
        }
    }
}
