//! `kamigate rekey`: every stored code sealed under the current data key, and a ledger from
//! before codes were sealed migrated, in place, while the gateway serves.
//!
//! A pass pages through each SKU's keys in the ledger (every batch state) and, for a chunk
//! of keys stored under an older data key or in clear, writes the new form into the engine
//! first (`lua/recode.lua`, keys the engine lacks are skipped), then into the ledger, each
//! key only while it still stores what the pass read. Engine first: a pass cut short after
//! the engine and before the ledger leaves the ledger's key to the next pass, which writes
//! both again; the other way round, the engine would keep the old form for good. Every
//! sealed form of a key opens to the same code, so claims go on throughout, and a pass can
//! be interrupted and run again at any point.
//!
//! Blacklists: each SKU's stored blacklist ([`crate::sku::Blacklist`]) is sealed anew by
//! the same pass, and one in clear (settings from before blacklists were sealed) is sealed
//! on start ([`seal_blacklists`]); a re-index has nothing to do for them, imports digest
//! the opened list under the current index key.
//!
//! Digests: a plaintext ledger's unkeyed digests are keyed by the same pass (and the global
//! index moved over, its unkeyed entries removed). Digests under another index key are
//! redone only with `index` (`rekey --index`): until then, codes whose digests are under the
//! old index key are not found by redemptions, so the index key is not rotated lightly.

use crate::error::Error;
use crate::ledger::{Ledger, Recode};
use crate::secrets::{self, Keyring};
use crate::sku::{key_id, Blacklist, SkuConfig};

use super::{fold, open_failed, Inventory};

/// Keys read from the ledger per step; the engine and ledger writes of a step cover those of
/// them that need work.
const PAGE: u32 = 500;

/// What a pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RekeyReport {
    pub skus: u64,
    /// Keys examined.
    pub keys: u64,
    /// Keys sealed anew under the current data key (from an older key or from clear).
    pub resealed: u64,
    /// Of those, keys that were stored in clear (a ledger from before sealing).
    pub migrated: u64,
    /// Keys whose digest was keyed anew.
    pub reindexed: u64,
    /// Keys whose digest is under another index key and were left so (no `index`).
    pub stale_digests: u64,
    /// Keys whose stored code did not open (counted, logged by key id, left as they are),
    /// and blacklists that did not open.
    pub failed: u64,
    /// SKU blacklists sealed anew under the current data key (from an older key or from
    /// clear).
    pub blacklists: u64,
}

/// Rekeys `sku`, or every SKU of the ledger. With `index`, digests under another index key
/// are keyed anew too (a re-index).
pub async fn rekey(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: Option<&str>,
    index: bool,
) -> Result<RekeyReport, Error> {
    let skus = match sku {
        Some(sku) => vec![sku.to_owned()],
        None => ledger.list_skus().await?,
    };
    let mut report = RekeyReport::default();
    for sku in &skus {
        rekey_sku(ledger, inventory, sku, index, &mut report).await?;
        report.skus += 1;
    }
    Ok(report)
}

/// Why a keyring does not fit a ledger ([`check_keys`]). Names keys by id only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misfit {
    /// The key (`<sku>.<local id>`) or key id it showed on.
    pub subject: String,
    pub why: String,
}

/// Whether `keyring` fits the ledger, so a gateway or command refuses to start instead of
/// sealing codes nobody else can open or answering claims it cannot open:
///
/// - each of its keys the ledger recorded a check value for ([`Ledger::key_checks`]) must be
///   the same key material (a key file regenerated in a new data dir has the same ids and
///   other keys); its keys the ledger has no check value for are recorded;
/// - the first sealed code of each SKU must open (a data key missing from the keyring).
pub async fn check_keys(
    ledger: &dyn Ledger,
    keyring: &Keyring,
) -> Result<Option<Misfit>, crate::ledger::LedgerError> {
    let recorded = ledger.key_checks().await?;
    if let Some(misfit) = misfit(keyring, &recorded) {
        return Ok(Some(misfit));
    }
    for sku in ledger.list_skus().await? {
        let first = ledger.stored_codes_after(&sku, 0, 1).await?;
        let Some(row) = first.first() else { continue };
        if !secrets::is_sealed(&row.code) {
            continue;
        }
        let local = row.local_id.to_string();
        if let Err(e) = keyring.open(&sku, &local, &row.code) {
            return Ok(Some(Misfit {
                subject: format!("key {}'s code", key_id(&sku, &local)),
                why: e.to_string(),
            }));
        }
    }
    // Only a keyring that fits records its new keys.
    let known = |id: &str| recorded.iter().any(|(k, _, _)| k == id);
    let mut missing: Vec<(String, &str, String)> = keyring
        .data_ids()
        .into_iter()
        .filter(|id| !known(id))
        .filter_map(|id| Some((id.to_owned(), "data", keyring.data_check(id)?)))
        .collect();
    if !known(keyring.index_id()) {
        missing.push((
            keyring.index_id().to_owned(),
            "index",
            keyring.index_check(),
        ));
    }
    if missing.is_empty() {
        return Ok(None);
    }
    let now = crate::clock::now_ms() as i64;
    for (id, kind, check) in &missing {
        ledger.add_key_check(id, kind, check, now).await?;
    }
    // Read back: another process may have recorded other material under the same id.
    Ok(misfit(keyring, &ledger.key_checks().await?))
}

/// The first recorded check value `keyring` has a key of the same id for and does not
/// match.
fn misfit(keyring: &Keyring, recorded: &[(String, String, String)]) -> Option<Misfit> {
    recorded.iter().find_map(|(id, kind, check)| {
        let fits = match kind.as_str() {
            "index" if id == keyring.index_id() => keyring.index_check() == *check,
            "data" if keyring.data_ids().contains(&id.as_str()) => keyring.opens_check(check),
            _ => true,
        };
        (!fits).then(|| Misfit {
            subject: format!("{kind} key {id}"),
            why: "is other key material than the one this ledger recorded under that id".into(),
        })
    })
}

/// One key's new form, with what the global index needs.
struct Change {
    recode: Recode,
    old_digest: String,
    /// The code in clear, for the global index's folded digest (only when the digest moves).
    plain: Option<String>,
    /// The unkeyed folded digest the global index has for a key stored in clear.
    old_folded: Option<String>,
}

async fn rekey_sku(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    index: bool,
    report: &mut RekeyReport,
) -> Result<(), Error> {
    // The keyring of the whole pass: a rotation meanwhile is picked up by the next pass.
    let keyring = inventory.keyring();
    reseal_blacklist(ledger, inventory, &keyring, sku, report).await?;
    let mut after = 0;
    loop {
        let page = ledger.stored_codes_after(sku, after, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = last.local_id;
        report.keys += page.len() as u64;
        let mut changes = Vec::new();
        for row in page {
            if let Some(change) = plan(&keyring, sku, row, index, report) {
                changes.push(change);
            }
        }
        apply(ledger, inventory, sku, &changes).await?;
    }
}

/// What to write for one key, or `None` when it is current (or cannot be opened).
fn plan(
    keyring: &Keyring,
    sku: &str,
    row: crate::ledger::StoredCode,
    index: bool,
    report: &mut RekeyReport,
) -> Option<Change> {
    let sealed = secrets::is_sealed(&row.code);
    let reseal = !keyring.is_current(&row.code);
    let legacy_digest = !row.digest.contains('.');
    let redigest = legacy_digest || (index && !keyring.is_current_digest(&row.digest));
    if !legacy_digest && !keyring.is_current_digest(&row.digest) && !index {
        report.stale_digests += 1;
    }
    if !reseal && !redigest {
        return None;
    }
    let local = row.local_id.to_string();
    let plain = if sealed {
        match keyring.open(sku, &local, &row.code) {
            Ok(plain) => plain,
            Err(e) => {
                open_failed(keyring, &key_id(sku, &local), &e);
                report.failed += 1;
                return None;
            }
        }
    } else {
        row.code.clone()
    };
    let code = if reseal {
        report.resealed += 1;
        if !sealed {
            report.migrated += 1;
        }
        keyring.seal(sku, &local, &plain)
    } else {
        row.code.clone()
    };
    let digest = if redigest {
        report.reindexed += 1;
        keyring.digest(&plain)
    } else {
        row.digest.clone()
    };
    Some(Change {
        old_folded: legacy_digest.then(|| crate::code::digest(&fold(&plain))),
        plain: redigest.then_some(plain),
        old_digest: row.digest,
        recode: Recode {
            local_id: row.local_id,
            old_code: row.code,
            code,
            digest,
        },
    })
}

/// Writes a chunk of changes: engine, global index, ledger, then the global index's old
/// entries.
async fn apply(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    changes: &[Change],
) -> Result<(), Error> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut args = Vec::with_capacity(changes.len() * 4);
    for c in changes {
        args.extend([
            c.recode.local_id.to_string(),
            c.old_digest.clone(),
            c.recode.digest.clone(),
            c.recode.code.clone(),
        ]);
    }
    // A SKU the engine lacks ({'no_sku'}) is warmed from the ledger later, recoded by then.
    inventory
        .run_sku(&crate::engine::SCRIPTS.recode, sku, args)
        .await?;
    let moved: Vec<&str> = changes.iter().filter_map(|c| c.plain.as_deref()).collect();
    inventory.index_codes(sku, &moved).await?;
    let recodes: Vec<Recode> = changes.iter().map(|c| c.recode.clone()).collect();
    ledger.recode_keys(sku, &recodes).await?;
    let old: Vec<String> = changes
        .iter()
        .filter_map(|c| c.old_folded.clone())
        .collect();
    inventory.unindex(sku, &old).await?;
    Ok(())
}

/// Seals every SKU's blacklist still stored in clear (settings from before blacklists were
/// sealed), as a start on such a ledger does; a SKU whose list is sealed costs one read.
/// Resumable and idempotent like a rekey pass. Returns how many it sealed.
pub async fn seal_blacklists(ledger: &dyn Ledger, inventory: &Inventory) -> Result<u64, Error> {
    let keyring = inventory.keyring();
    let mut report = RekeyReport::default();
    for sku in ledger.list_skus().await? {
        let clear = match ledger.get_sku(&sku).await? {
            Some(record) => stored_settings(&sku, &record.config_json)?
                .blacklist
                .in_clear(),
            None => false,
        };
        if clear {
            reseal_blacklist(ledger, inventory, &keyring, &sku, &mut report).await?;
        }
    }
    Ok(report.blacklists)
}

/// Rounds of [`reseal_blacklist`] against settings changed meanwhile before it leaves the
/// SKU to the next pass.
const BLACKLIST_ATTEMPTS: usize = 3;

/// Seals `sku`'s blacklist under the current data key when it is stored in clear or under
/// an older key. Like keys, the engine's copy of the settings first (when the engine has
/// the SKU; one it lacks is warmed from the ledger), then the ledger's, only while it still
/// holds what was read: settings a `PUT` changed meanwhile are not undone, the engine gets
/// the ledger's back and the SKU is looked at again.
async fn reseal_blacklist(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    keyring: &Keyring,
    sku: &str,
    report: &mut RekeyReport,
) -> Result<(), Error> {
    for _ in 0..BLACKLIST_ATTEMPTS {
        let Some(record) = ledger.get_sku(sku).await? else {
            return Ok(());
        };
        let mut config = stored_settings(sku, &record.config_json)?;
        let stale = match config.blacklist.sealed_text() {
            Some(text) => !keyring.is_current(text),
            None => config.blacklist.in_clear(),
        };
        if !stale {
            return Ok(());
        }
        let codes = match config.blacklist.codes(keyring, sku) {
            Ok(codes) => codes,
            Err(e) => {
                super::count_open_failure(keyring, &e);
                tracing::error!(
                    sku,
                    data_key = e.key_id(),
                    "the SKU's stored blacklist {e}; it is left as it is"
                );
                report.failed += 1;
                return Ok(());
            }
        };
        config.blacklist = Blacklist::sealed(&codes, keyring, sku);
        let json = serde_json::to_string(&config)
            .map_err(|e| Error::Internal(format!("encoding SKU settings: {e}")))?;
        if inventory.sku_state(sku).await?.is_some() {
            inventory.put_sku(sku, &config).await?;
        }
        let now = inventory.now_ms() as i64;
        if ledger
            .replace_sku_config(sku, &record.config_json, &json, now)
            .await?
        {
            report.blacklists += 1;
            return Ok(());
        }
        if let Some(current) = ledger.get_sku(sku).await? {
            if inventory.sku_state(sku).await?.is_some() {
                let current = stored_settings(sku, &current.config_json)?;
                inventory.put_sku(sku, &current).await?;
            }
        }
    }
    tracing::warn!(
        sku,
        "the SKU's settings kept changing: its blacklist is left to the next rekey pass"
    );
    Ok(())
}

fn stored_settings(sku: &str, json: &str) -> Result<SkuConfig, Error> {
    serde_json::from_str(json)
        .map_err(|e| Error::Internal(format!("ledger settings of SKU {sku}: {e}")))
}
