//! The operator commands besides `serve`: `import`, `warm`, `reconcile`, `rekey`, the
//! incident controls `pause`, `resume` and `pauses`, and `gen --sku`'s look-up of a SKU's
//! format. They open the same ledger and engine a gateway with the same configuration would;
//! the incident controls and `gen --sku` open only the ledger, so they work while the engine
//! is down.

use std::path::Path;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::AsyncReadExt;

use crate::clock;
use crate::code::Format;
use crate::config::Config;
use crate::datadir;
use crate::engine::EngineKind;
use crate::error::Error;
use crate::gateway::{open_engine, open_keys, KeysError};
use crate::inventory::formats::UploadFormat;
use crate::inventory::import::{Begun, ImportReport, Importer};
use crate::inventory::reconcile::{self, SkuReconcile};
use crate::inventory::rekey::{self, RekeyReport};
use crate::inventory::warm::{restore_sku, warm_sku, WarmReport};
use crate::inventory::Inventory;
use crate::ledger::writer::{EventWriter, WriterOptions};
use crate::ledger::{self, Ledger, PauseEventRecord};
use crate::pause::{self, Action, Pause, PauseOrder, ResumeOrder};
use crate::secrets::keyfile::{self, KEY_FILE, KEY_VAR};
use crate::sku::{check_id, check_sku, SkuConfig, MAX_ID_LEN};

/// Bytes read from the file per step.
const READ_CHUNK: usize = 256 * 1024;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Api(#[from] Error),
    #[error("{0}")]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error("{0}")]
    Keys(#[from] KeysError),
    /// The API's `ERR_NOT_FOUND` says only what is missing; an operator also learns what to
    /// do about it.
    #[error("SKU {0} not found: create it first with PUT /v1/skus/{0} on the admin listener")]
    NoSku(String),
    /// Standard output could not take what the command printed (a closed pipe, a full disk).
    #[error("writing to standard output: {0}")]
    Output(#[source] std::io::Error),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

async fn open(config: &Config) -> Result<(Arc<dyn Ledger>, Inventory), CommandError> {
    let ledger = ledger::open(config.database_url.as_deref(), &config.data_dir).await?;
    let inventory = Inventory::new(open_engine(config).await?);
    open_keys(config, ledger.as_ref(), &inventory, true).await?;
    Ok((ledger, inventory))
}

async fn settings(ledger: &dyn Ledger, sku: &str) -> Result<SkuConfig, CommandError> {
    let record = ledger
        .get_sku(sku)
        .await?
        .ok_or_else(|| CommandError::NoSku(sku.to_owned()))?;
    serde_json::from_str(&record.config_json)
        .map_err(|e| Error::Internal(format!("ledger settings of SKU {sku}: {e}")).into())
}

/// The format of a SKU as its ledger records it, for `kamigate gen --sku S`: only the
/// ledger is opened, so this works with or without a gateway running.
pub async fn sku_format(config: &Config, sku: &str) -> Result<Format, CommandError> {
    check_sku(sku)?;
    let ledger = ledger::open(config.database_url.as_deref(), &config.data_dir).await?;
    Ok(settings(ledger.as_ref(), sku).await?.format)
}

/// `kamigate import FILE --sku S --batch B`: streams a file into the ledger, with a progress
/// bar on a terminal. With Redis configured the batch is also loaded into Redis; with the
/// embedded engine the running gateway loads it within seconds.
pub async fn import(
    config: &Config,
    file: &Path,
    sku: &str,
    batch_id: &str,
    activate: bool,
) -> Result<ImportReport, CommandError> {
    check_sku(sku)?;
    check_id("batch_id", batch_id, MAX_ID_LEN)?;
    let (ledger, inventory) = open(config).await?;
    let settings = settings(ledger.as_ref(), sku).await?;
    let shared_engine = inventory.engine().kind() == EngineKind::Redis;
    if shared_engine {
        restore_sku(ledger.as_ref(), &inventory, sku, grace(config)).await?;
    }
    let read_error = |source| CommandError::Read {
        path: file.display().to_string(),
        source,
    };
    let mut input = tokio::fs::File::open(file).await.map_err(read_error)?;
    let size = input.metadata().await.map_err(read_error)?.len();
    let format = UploadFormat::from_path(file);
    let begun = Importer::begin(
        ledger.as_ref(),
        &inventory,
        sku,
        batch_id,
        &settings,
        format,
        None,
    )
    .await?;
    let mut importer = match begun {
        Begun::Fresh(importer) => importer,
        Begun::Replayed(report) => return Ok(report),
    };
    let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = match input.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                importer.abort().await;
                return Err(read_error(e));
            }
        };
        if let Err(e) = importer.feed(&buf[..n]).await {
            importer.abort().await;
            return Err(e.into());
        }
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let report = importer.finish(activate, shared_engine).await?;
    if let Some(why) = &report.unloaded {
        return Err(Error::Unavailable(format!(
            "batch {batch_id} was imported ({} codes accepted, {} duplicate, {} rejected), \
             but loading it into Redis failed: {why}; `kamigate warm --sku {sku}` or a \
             running gateway loads it",
            report.accepted, report.duplicate, report.rejected
        ))
        .into());
    }
    Ok(report)
}

/// `kamigate warm [--sku S]`: loads ledger keys Redis lacks. The embedded engine lives
/// inside the gateway process, which warms itself on start: warming one here would fill an
/// engine thrown away when the command exits, so it is refused with a pointer.
pub async fn warm(
    config: &Config,
    sku: Option<&str>,
) -> Result<Vec<(String, WarmReport)>, CommandError> {
    if config.redis_url.is_none() {
        return Err(Error::BadRequest(
            "warm loads the ledger into Redis; the embedded engine lives inside kamigate \
             serve, which loads the ledger on start: use POST /v1/skus/{sku}/warm on the \
             running gateway"
                .into(),
        )
        .into());
    }
    let (ledger, inventory) = open(config).await?;
    let skus = match sku {
        Some(sku) => {
            check_sku(sku)?;
            vec![sku.to_owned()]
        }
        None => ledger.list_skus().await.map_err(Error::from)?,
    };
    let mut reports = Vec::new();
    for sku in skus {
        let report = match restore_sku(ledger.as_ref(), &inventory, &sku, grace(config)).await? {
            Some(report) => report,
            None => {
                // Resumable by design: keys already in the engine are skipped, so an
                // interrupted warm-up is simply run again.
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg} {pos} keys checked")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_message(sku.clone());
                let report = warm_sku(ledger.as_ref(), &inventory, &sku, 0, |r| {
                    bar.set_position(r.loaded + r.present);
                })
                .await?;
                bar.finish_and_clear();
                report
            }
        };
        reports.push((sku, report));
    }
    Ok(reports)
}

/// `kamigate reconcile [--sku S] [--repair]`: compares Redis with the ledger key by key. The
/// embedded engine lives inside the gateway: use `POST /v1/reconcile` there.
pub async fn reconcile(
    config: &Config,
    sku: Option<&str>,
    repair: bool,
) -> Result<Vec<SkuReconcile>, CommandError> {
    if config.redis_url.is_none() {
        return Err(Error::BadRequest(
            "reconcile compares Redis with the ledger; with the embedded engine use \
             POST /v1/reconcile on the running gateway"
                .into(),
        )
        .into());
    }
    if let Some(sku) = sku {
        check_sku(sku)?;
    }
    let (ledger, inventory) = open(config).await?;
    let writer = EventWriter::new(
        inventory.engine().clone(),
        ledger.clone(),
        WriterOptions::default(),
    );
    let writer = &writer;
    Ok(
        reconcile::reconcile(ledger.as_ref(), &inventory, sku, repair, |sku| async move {
            writer
                .backlog(&sku)
                .await
                .map(|b| b.in_flight())
                .map_err(|e| Error::Unavailable(format!("event stream: {e}")))
        })
        .await?,
    )
}

/// What `kamigate rekey` did, and under which keys.
#[derive(Debug, Clone)]
pub struct Rekeyed {
    pub data_key: String,
    pub index_key: String,
    pub report: RekeyReport,
}

/// `kamigate rekey [--sku S] [--index] [--new-key ID]`: seals every stored code still under
/// an older data key (or in clear, from before codes were sealed) under the current one; with
/// `--index`, keys digests anew under the current index key. `--new-key` first adds a fresh
/// data key to the data dir's key file as the sealing one.
///
/// With the embedded engine a running gateway owns the engine: the command refuses while one
/// holds the data dir (`POST /v1/rekey` rekeys there) and otherwise rekeys the ledger, which
/// the next start loads.
pub async fn rekey(
    config: &Config,
    sku: Option<&str>,
    index: bool,
    new_key: Option<&str>,
) -> Result<Rekeyed, CommandError> {
    if let Some(sku) = sku {
        check_sku(sku)?;
    }
    if let Some(id) = new_key {
        if config.data_key.is_some() {
            return Err(Error::BadRequest(format!(
                "--new-key adds a key to {}, but {KEY_VAR} is set: put a new `data <id> <64 hex \
                 digits>` entry first in {KEY_VAR} instead",
                config.data_dir.join(KEY_FILE).display()
            ))
            .into());
        }
        keyfile::add_data_key(&config.data_dir.join(KEY_FILE), id).map_err(KeysError::Source)?;
    }
    let _lock = match config.redis_url {
        Some(_) => None,
        None => Some(datadir::lock(&config.data_dir).map_err(|_| {
            Error::BadRequest(
                "a gateway runs on this data dir and owns its embedded engine: POST /v1/rekey \
                 on its admin listener rekeys there (it reads the key file again first)"
                    .into(),
            )
        })?),
    };
    let ledger = ledger::open(config.database_url.as_deref(), &config.data_dir).await?;
    let inventory = Inventory::new(open_engine(config).await?);
    open_keys(config, ledger.as_ref(), &inventory, false).await?;
    let report = rekey::rekey(ledger.as_ref(), &inventory, sku, index).await?;
    if report.migrated > 0 {
        ledger.purge_freed().await?;
    }
    let keyring = inventory.keyring();
    Ok(Rekeyed {
        data_key: keyring.current_id().to_owned(),
        index_key: keyring.index_id().to_owned(),
        report,
    })
}

/// How long a rebuild from the command line waits for running gateways to write what they
/// answered into the ledger (see [`crate::ledger::journal`]).
fn grace(config: &Config) -> std::time::Duration {
    std::time::Duration::from_millis(config.rebuild_grace_ms)
}

/// `kamigate pause ACTION (--sku S | --gateway) --reason R`: records the pause in the ledger,
/// where every running gateway reads it within its `pause_refresh_ms`. Returns each pause
/// as now in force, and whether it was in force already.
pub async fn pause(
    config: &Config,
    order: &PauseOrder,
) -> Result<Vec<(Pause, bool)>, CommandError> {
    let ledger = ledger::open(config.database_url.as_deref(), &config.data_dir).await?;
    Ok(pause::pause(ledger.as_ref(), order, clock::now_ms()).await?)
}

/// `kamigate resume ACTION (--sku S | --gateway)`: lifts the pause in the ledger. Returns,
/// per action, the pause lifted, or `None` when it was not paused.
pub async fn resume(
    config: &Config,
    order: &ResumeOrder,
) -> Result<Vec<(Action, Option<Pause>)>, CommandError> {
    let ledger = ledger::open(config.database_url.as_deref(), &config.data_dir).await?;
    Ok(pause::resume(ledger.as_ref(), order, clock::now_ms()).await?)
}

/// `kamigate pauses [--sku S] [--limit N]`: the pauses in force and the latest pauses and
/// resumes (of one SKU with `sku`), newest first.
pub async fn pauses(
    config: &Config,
    sku: Option<&str>,
    limit: u32,
) -> Result<(Vec<Pause>, Vec<PauseEventRecord>), CommandError> {
    if let Some(sku) = sku {
        check_sku(sku)?;
    }
    if !(1..=pause::MAX_HISTORY).contains(&limit) {
        return Err(
            Error::BadRequest(format!("--limit must be from 1 to {}", pause::MAX_HISTORY)).into(),
        );
    }
    let ledger = ledger::open(config.database_url.as_deref(), &config.data_dir).await?;
    let in_force = ledger.pauses().await?;
    let history = ledger.pause_history(sku, limit).await?;
    Ok((
        in_force.iter().filter_map(Pause::from_record).collect(),
        history,
    ))
}
