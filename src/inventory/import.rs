//! Streaming import of codes: upload → validation → ledger → engine.
//!
//! The upload is fed in whatever chunks arrive (HTTP body frames, file reads); memory stays
//! bounded by one row and one chunk of [`CHUNK_ROWS`] validated codes, whatever the upload's
//! size. Rows are parsed by [`super::formats::RowParser`] (a code per line, CSV or NDJSON),
//! validated against the SKU's format, and written to the ledger in multi-row inserts inside
//! transactions. Duplicates — within the upload or against the SKU — are detected by the
//! ledger's unique digest index, never by an in-memory set.
//!
//! The batch stays invisible to claims until it is complete: its keys reach the engine only
//! when the batch is activated, and a failed upload is aborted (its keys deleted), which
//! frees its `batch_id`. The same `batch_id` again after an import finished adds nothing and
//! answers that import's counts; while another upload of it is still running it is refused
//! with [`Error::BatchInProgress`], never answered with counts that are not its own, and so
//! is activating it: a batch goes on sale whole or not at all.
//!
//! Rows are refused for the SKU's format and blacklist, and codes whose `expires_at` has
//! already passed are refused too: they could be sold but never redeemed. A CSV upload whose
//! header cannot be used fails as a whole before anything is written ([`Error::BadRequest`]).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::formats::{Parsed, RowParser, UploadFormat};
use super::warm::{warm_sku, WarmReport};
use super::Inventory;
use crate::error::{timestamp, Error};
use crate::ledger::{
    upload_token, BatchCounts, BatchStart, InsertOutcome, Ledger, LedgerError, NewKey,
    UPLOAD_LEASE_MS,
};
use crate::sku::SkuConfig;

/// Validated codes per ledger transaction. Every transaction is made durable on its own (an
/// fsync on SQLite), and each dirties index pages spread over the SKU's whole digest index,
/// so the fewer the better; the chunk is also what an import holds in memory (a few MB), and
/// what a SQLite writer waits behind (well under a second).
pub const CHUNK_ROWS: usize = 10_000;
/// Rejected or duplicate lines listed in the report; all are counted.
pub const MAX_REPORTED_LINES: usize = 1000;
/// How often an upload renews its hold on the batch: well within the lease, so only an
/// uploader that died or stalled loses it.
const RENEW_EVERY_MS: u64 = UPLOAD_LEASE_MS as u64 / 10;

/// The outcome of an import.
#[derive(Debug, Default, Clone)]
pub struct ImportReport {
    pub accepted: u64,
    pub rejected: u64,
    pub duplicate: u64,
    /// `(line number, reason)` of the first rejected or duplicate lines.
    pub lines: Vec<(u64, String)>,
    /// `active` (warmed into the engine) or `pending` (waiting for activation).
    pub state: String,
    /// True when the batch id had been imported before and nothing was added now.
    pub replayed: bool,
    /// The SKU format version the rows were validated under (the current one); `None` for
    /// a replayed batch.
    pub format_version: Option<u32>,
    /// Why a batch recorded active is not in the engine yet: loading it failed (the engine
    /// unreachable, or rebuilding the SKU after losing its data). The import stands; a
    /// gateway's sync pass loads the batch (not part of the API answer).
    pub unloaded: Option<String>,
}

impl ImportReport {
    /// The API representation.
    pub fn to_json(&self, batch_id: &str) -> Value {
        let lines: Vec<Value> = self
            .lines
            .iter()
            .map(|(line, reason)| json!({ "line": line, "reason": reason }))
            .collect();
        json!({
            "batch_id": batch_id,
            "state": self.state,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "duplicate": self.duplicate,
            "rejected_lines": lines,
            "replayed": self.replayed,
            "format_version": self.format_version,
        })
    }

    fn note(&mut self, line: u64, reason: String) {
        if self.lines.len() < MAX_REPORTED_LINES {
            self.lines.push((line, reason));
        }
    }
}

/// How [`Importer::begin`] started.
pub enum Begun<'a> {
    /// A new batch: feed it.
    Fresh(Box<Importer<'a>>),
    /// The batch id was imported before: its counts, nothing added.
    Replayed(ImportReport),
}

/// The gateway running an upload ([`Importer::begin`]).
pub struct Runner<'g> {
    /// Its name, as it reports itself alive: the next upload of the batch id can tell, soon
    /// after a crash, that this one died with it.
    pub name: &'g str,
    /// The ledger, to abort the batch in the background should the upload end unsettled
    /// (dropped with its connection, or its own abort failing on a ledger out of reach).
    pub ledger: Arc<dyn Ledger>,
}

/// An upload's batch that nothing has settled yet. Should the upload end without settling it,
/// it is aborted in the background, retried while the ledger is unreachable: the request was
/// dropped mid-way (its client went away, and the HTTP server drops the handler with the
/// connection) or the upload's own abort failed (the ledger down). Left as it is, the batch
/// would stay pending under an upload nobody runs, its gateway alive, and every retry of the
/// batch id would be refused with `ERR_BATCH_IN_PROGRESS` until the lease ran out
/// ([`UPLOAD_LEASE_MS`], minutes). The abort names this upload, so it never touches a
/// batch the upload finished or another upload took over.
struct Abandoned {
    ledger: Arc<dyn Ledger>,
    sku: String,
    batch_id: String,
    upload_id: String,
    settled: bool,
}

/// How long an unsettled upload's abort is retried at most: past the lease, the next upload
/// of the batch id takes it over anyway.
const ABANDONED_RETRY_FOR: Duration = Duration::from_millis(UPLOAD_LEASE_MS as u64);

impl Drop for Abandoned {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let ledger = self.ledger.clone();
        let (sku, batch_id) = (
            std::mem::take(&mut self.sku),
            std::mem::take(&mut self.batch_id),
        );
        let upload_id = std::mem::take(&mut self.upload_id);
        runtime.spawn(async move {
            let give_up = tokio::time::Instant::now() + ABANDONED_RETRY_FOR;
            let mut pause = Duration::from_millis(100);
            loop {
                match ledger.abort_batch(&sku, &batch_id, &upload_id).await {
                    Ok(()) => {
                        tracing::info!(sku, batch_id, "aborted the batch of an unfinished upload");
                        return;
                    }
                    Err(e) if e.is_retryable() && tokio::time::Instant::now() < give_up => {
                        tracing::debug!(sku, batch_id, error = %e, "aborting an unfinished upload's batch; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                    // Finished, taken over, or never begun: nothing of this upload to undo.
                    Err(
                        LedgerError::Conflict(_)
                        | LedgerError::BatchBusy(_)
                        | LedgerError::NotFound(_),
                    ) => return,
                    Err(e) => {
                        tracing::warn!(sku, batch_id, error = %e, "gave up aborting an unfinished upload's batch");
                        return;
                    }
                }
            }
        });
    }
}

/// Feeds one upload into a SKU, through the ledger.
pub struct Importer<'a> {
    ledger: &'a dyn Ledger,
    inventory: &'a Inventory,
    sku: &'a str,
    batch_id: &'a str,
    /// This upload's token in the ledger: the batch is its own while the token matches.
    upload_id: String,
    /// Aborts the batch should this upload end before settling it (a gateway's upload).
    abandoned: Option<Abandoned>,
    /// When this upload last renewed its hold on the batch.
    renewed_at_ms: u64,
    settings: &'a SkuConfig,
    parser: RowParser,
    /// Seals the codes and keys their digests, the same one for the whole upload.
    keyring: std::sync::Arc<crate::secrets::Keyring>,
    /// Keyed digests of the SKU's blacklist: rows are compared by digest, as duplicates are.
    blacklist: std::collections::HashSet<String>,
    parsed: Vec<Parsed>,
    pending: Vec<NewKey>,
    /// The smallest local id this import added: warming starts after it.
    first_local: Option<i64>,
    report: ImportReport,
}

impl<'a> Importer<'a> {
    /// Opens batch `batch_id` of `sku` in the ledger, as an upload run by a gateway
    /// (`None`: outside a gateway, where the caller aborts a failed upload itself).
    /// [`Error::BatchInProgress`] while another upload is filling it.
    pub async fn begin(
        ledger: &'a dyn Ledger,
        inventory: &'a Inventory,
        sku: &'a str,
        batch_id: &'a str,
        settings: &'a SkuConfig,
        format: UploadFormat,
        runner: Option<Runner<'_>>,
    ) -> Result<Begun<'a>, Error> {
        // Before the batch is begun: never an import without its blacklist, and a blacklist
        // that does not open leaves the batch id unused.
        let blacklist = blacklist_digests(inventory, settings, sku)?;
        let upload_id = upload_token(runner.as_ref().map(|r| r.name));
        // Armed before the batch is begun: a request dropped while the ledger commits it
        // leaves a batch too.
        let mut abandoned = runner.map(|r| Abandoned {
            ledger: r.ledger,
            sku: sku.to_owned(),
            batch_id: batch_id.to_owned(),
            upload_id: upload_id.clone(),
            settled: false,
        });
        let now = inventory.now_ms();
        let started = ledger
            .begin_batch(sku, batch_id, &upload_id, now as i64)
            .await?;
        if !matches!(started, BatchStart::New) {
            // Another upload's batch: nothing of this one to undo.
            if let Some(abandoned) = &mut abandoned {
                abandoned.settled = true;
            }
        }
        match started {
            BatchStart::New => {}
            BatchStart::Existing(batch) => {
                return Ok(Begun::Replayed(ImportReport {
                    accepted: batch.accepted,
                    rejected: batch.rejected,
                    duplicate: batch.duplicate,
                    lines: Vec::new(),
                    state: batch.state,
                    replayed: true,
                    format_version: None,
                    unloaded: None,
                }))
            }
            BatchStart::InProgress(batch) => {
                let since = batch.created_at_ms.max(0) as u64;
                return Err(Error::BatchInProgress(format!(
                    "batch {batch_id} of SKU {sku} is being imported by another upload, \
                     started at {}; nothing of this one was imported",
                    timestamp(since)
                )));
            }
        }
        let keyring = inventory.keyring();
        Ok(Begun::Fresh(Box::new(Importer {
            ledger,
            inventory,
            sku,
            batch_id,
            upload_id,
            abandoned,
            renewed_at_ms: now,
            settings,
            parser: RowParser::new(format),
            keyring,
            blacklist,
            parsed: Vec::new(),
            pending: Vec::with_capacity(CHUNK_ROWS),
            first_local: None,
            report: ImportReport {
                format_version: Some(settings.format_version),
                ..ImportReport::default()
            },
        })))
    }

    /// Consumes the next bytes of the upload. A CSV header that cannot be used fails the
    /// upload ([`Error::BadRequest`]): abort it then.
    pub async fn feed(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.parser.feed(bytes, &mut self.parsed);
        self.check_header()?;
        self.take_parsed().await?;
        self.renew_if_due().await
    }

    /// Refuses the whole upload when its CSV header cannot be used: every row would be
    /// rejected, and a merchant would rather fix the file than read a million rejections.
    fn check_header(&self) -> Result<(), Error> {
        match self.parser.header_failure() {
            None => Ok(()),
            Some((line, why)) => Err(Error::BadRequest(format!(
                "the CSV header on line {line} cannot be used: {why}; nothing was imported"
            ))),
        }
    }

    /// Tells the ledger this upload is alive, so no other upload of the batch id takes over.
    async fn renew_if_due(&mut self) -> Result<(), Error> {
        let now = self.inventory.now_ms();
        if now.saturating_sub(self.renewed_at_ms) < RENEW_EVERY_MS {
            return Ok(());
        }
        self.ledger
            .touch_batch(self.sku, self.batch_id, &self.upload_id, now as i64)
            .await?;
        self.renewed_at_ms = now;
        Ok(())
    }

    async fn take_parsed(&mut self) -> Result<(), Error> {
        let format = &self.settings.format;
        let now = self.inventory.now_ms();
        for parsed in std::mem::take(&mut self.parsed) {
            match parsed {
                Parsed::Rejected { line, reason } => {
                    self.report.rejected += 1;
                    self.report.note(line, reason);
                }
                Parsed::Row(row) => match format.validate(&row.code) {
                    Err(why) => {
                        self.report.rejected += 1;
                        self.report.note(row.line, why.to_string());
                    }
                    Ok(canonical) => {
                        let digest = self.keyring.digest(&canonical);
                        if self.blacklist.contains(&digest) {
                            self.report.rejected += 1;
                            self.report
                                .note(row.line, "the code is on the SKU's blacklist".into());
                            continue;
                        }
                        // The engine refuses to redeem a code from its `expires_at` on.
                        if let Some(at) = row.expires_at_ms.filter(|at| *at <= now) {
                            self.report.rejected += 1;
                            self.report
                                .note(row.line, format!("expired at {}", timestamp(at)));
                            continue;
                        }
                        self.pending.push(NewKey {
                            line: row.line,
                            digest,
                            code: canonical,
                            expires_at_ms: row.expires_at_ms.map(|ms| ms as i64),
                            max_issues: self.settings.max_issues as i64,
                            max_uses: row.max_uses.unwrap_or(self.settings.max_uses) as i64,
                            // The SKU's version, so redemption knows the rules it was
                            // sold under.
                            format_version: i64::from(self.settings.format_version),
                        });
                        if self.pending.len() >= CHUNK_ROWS {
                            self.flush().await?;
                        }
                    }
                },
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let outcomes = self
            .ledger
            .insert_keys(
                self.sku,
                self.batch_id,
                &self.upload_id,
                &self.pending,
                self.keyring.as_ref(),
            )
            .await?;
        for (key, outcome) in self.pending.iter().zip(outcomes) {
            match outcome {
                InsertOutcome::Inserted { local_id, .. } => {
                    self.report.accepted += 1;
                    self.first_local = Some(self.first_local.map_or(local_id, |f| f.min(local_id)));
                }
                InsertOutcome::Duplicate { same_batch, .. } => {
                    self.report.duplicate += 1;
                    let reason = if same_batch {
                        "duplicate: repeats an earlier line of this upload"
                    } else {
                        "duplicate: the SKU already has this code"
                    };
                    self.report.note(key.line, reason.into());
                }
            }
        }
        self.pending.clear();
        Ok(())
    }

    /// Ends the upload: records the batch, active or pending, and when `warm` loads an
    /// active batch into this process's engine (a CLI over the embedded engine leaves that
    /// to the running gateway, which picks new active keys up by itself). If the batch cannot
    /// be recorded the upload is aborted, so its batch id can be used again.
    pub async fn finish(
        mut self: Box<Self>,
        activate: bool,
        warm: bool,
    ) -> Result<ImportReport, Error> {
        if let Err(e) = self.record(activate).await {
            self.abort().await;
            return Err(e);
        }
        self.settle();
        // Rejections are noted as rows are parsed, duplicates when their chunk is written.
        self.report.lines.sort_by_key(|(line, _)| *line);
        self.report.state = if activate { "active" } else { "pending" }.into();
        if activate && warm {
            if let Some(first) = self.first_local {
                // The batch is in the ledger, active: the import has happened whatever loading
                // it does, and answering it failed would have the merchant upload it again.
                let warmed = warm_sku(self.ledger, self.inventory, self.sku, first - 1, |_| {});
                if let Err(e) = warmed.await {
                    tracing::warn!(
                        sku = self.sku,
                        batch_id = self.batch_id,
                        error = %e,
                        "imported a batch that could not be loaded into the engine yet"
                    );
                    self.report.unloaded = Some(e.to_string());
                }
            }
        }
        Ok(self.report)
    }

    /// Parses and writes what is left of the upload and records the batch's counts.
    async fn record(&mut self, activate: bool) -> Result<(), Error> {
        self.parser.finish(&mut self.parsed);
        self.check_header()?;
        self.take_parsed().await?;
        self.flush().await?;
        let counts = BatchCounts {
            accepted: self.report.accepted,
            rejected: self.report.rejected,
            duplicate: self.report.duplicate,
        };
        let now = self.inventory.now_ms() as i64;
        self.ledger
            .finish_batch(
                self.sku,
                self.batch_id,
                &self.upload_id,
                &counts,
                activate,
                now,
            )
            .await
            .map_err(Error::from)
    }

    /// Gives up on the upload: the ledger forgets the batch and its keys, and the batch id
    /// can be used again. A batch another upload took over is left to that upload. If the
    /// ledger cannot be reached, a gateway's upload goes on trying in the background.
    pub async fn abort(mut self: Box<Self>) {
        let (sku, batch_id) = (self.sku, self.batch_id);
        match self
            .ledger
            .abort_batch(sku, batch_id, &self.upload_id)
            .await
        {
            Ok(()) => self.settle(),
            Err(LedgerError::BatchBusy(_)) => {
                tracing::info!(
                    sku,
                    batch_id,
                    "not aborting a batch another upload took over"
                );
                self.settle();
            }
            Err(e) if e.is_retryable() && self.abandoned.is_some() => {
                tracing::warn!(sku, batch_id, error = %e, "aborting a batch failed; retrying in the background");
            }
            Err(e) => {
                tracing::error!(sku, batch_id, error = %e, "aborting a batch failed");
                self.settle();
            }
        }
    }

    /// The batch is settled: recorded, or aborted, or left to another upload.
    fn settle(&mut self) {
        if let Some(abandoned) = &mut self.abandoned {
            abandoned.settled = true;
        }
    }
}

/// The keyed digests of `sku`'s blacklist. A list sealed under a data key added since the
/// keyring was read makes it read its keys again once, as claims do; one that still does
/// not open fails the import, counted and logged by data key id.
fn blacklist_digests(
    inventory: &Inventory,
    settings: &SkuConfig,
    sku: &str,
) -> Result<std::collections::HashSet<String>, Error> {
    let mut keyring = inventory.keyring();
    let mut digests = settings.blacklist_digests(&keyring, sku);
    if let Err(crate::secrets::OpenError::UnknownKey(_)) = digests {
        if let Some(newer) = inventory.keyring_newer_than(&keyring) {
            keyring = newer;
            digests = settings.blacklist_digests(&keyring, sku);
        }
    }
    digests.map_err(|e| {
        super::count_open_failure(&keyring, &e);
        tracing::error!(
            sku,
            data_key = e.key_id(),
            "the SKU's stored blacklist {e}; the import is refused"
        );
        Error::Internal(format!(
            "the blacklist of SKU {sku} {e}; nothing was imported"
        ))
    })
}

/// Activates a pending batch and loads it into the engine. [`Error::BatchInProgress`] while
/// its upload runs; [`Error::NotFound`] for a batch id no upload filled (never used, or
/// refused or interrupted, which leaves it unused).
pub async fn activate(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    batch_id: &str,
) -> Result<WarmReport, Error> {
    ledger
        .activate_batch(sku, batch_id, inventory.now_ms() as i64)
        .await?;
    // Keys already in the engine are skipped, so warming the whole SKU is safe; it is
    // bounded by the SKU's size, which activation of a large batch is anyway.
    warm_sku(ledger, inventory, sku, 0, |_| {}).await
}
