//! Whether a SKU exists, as the edge judges it: a SKU the engine lacks is unknown only when
//! the ledger does not have it either. The ledger is a real SQLite file, the engine the
//! embedded one.

use std::sync::Arc;

use kamigate::engine::embedded::EmbeddedEngine;
use kamigate::error::Error;
use kamigate::inventory::settings::SkuSettings;
use kamigate::inventory::Inventory;
use kamigate::ledger::open;
use kamigate::sku::SkuConfig;
use tempfile::TempDir;

async fn setup() -> (TempDir, Arc<dyn kamigate::ledger::Ledger>, Inventory) {
    let dir = TempDir::new().expect("temp dir");
    let ledger = open(None, dir.path()).await.expect("SQLite ledger opens");
    let engine = EmbeddedEngine::start().expect("embedded engine starts");
    (dir, ledger, Inventory::new(Arc::new(engine)))
}

/// Another gateway created the SKU after this one last listed the ledger's SKUs, and the
/// engine lost it since: buyers are told to retry, never that the product does not exist.
#[tokio::test]
async fn a_sku_only_the_ledger_has_is_being_rebuilt_not_unknown() {
    let (_dir, ledger, inventory) = setup().await;
    let config = serde_json::to_string(&SkuConfig::default()).expect("settings encode");
    ledger
        .put_sku("made-elsewhere", &config, 1, 1)
        .await
        .expect("SKU in the ledger");
    let settings = SkuSettings::with_ledger(ledger.clone());

    for _ in 0..2 {
        // Also the second time: what the ledger said is remembered, not forgotten.
        match settings.require(&inventory, "made-elsewhere").await {
            Err(Error::Unavailable(_)) => {}
            other => panic!("a SKU the ledger has must not be unknown: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_sku_neither_has_is_unknown_and_one_the_engine_has_is_served() {
    let (_dir, ledger, inventory) = setup().await;
    let settings = SkuSettings::with_ledger(ledger.clone());
    for _ in 0..2 {
        match settings.require(&inventory, "never-made").await {
            Err(Error::NotFound(_)) => {}
            other => panic!("a made-up SKU is unknown: {other:?}"),
        }
    }
    inventory
        .put_sku("in-engine", &SkuConfig::default())
        .await
        .expect("SKU in the engine");
    settings
        .require(&inventory, "in-engine")
        .await
        .expect("a SKU the engine has is served");
}
