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
//! when the batch is activated, and a failed upload is aborted (its keys deleted). The same
//! `batch_id` again adds nothing and answers the first import's counts.

use serde_json::{json, Value};

use super::formats::{Parsed, RowParser, UploadFormat};
use super::warm::{ledger_error, warm_sku, WarmReport};
use super::Inventory;
use crate::code::digest;
use crate::error::Error;
use crate::ledger::{BatchCounts, BatchStart, InsertOutcome, Ledger, NewKey};
use crate::sku::SkuConfig;

/// Validated codes per ledger transaction.
pub const CHUNK_ROWS: usize = 1000;
/// Rejected or duplicate lines listed in the report; all are counted.
pub const MAX_REPORTED_LINES: usize = 1000;

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

/// Feeds one upload into a SKU, through the ledger.
pub struct Importer<'a> {
    ledger: &'a dyn Ledger,
    inventory: &'a Inventory,
    sku: &'a str,
    batch_id: &'a str,
    settings: &'a SkuConfig,
    parser: RowParser,
    blacklist: std::collections::HashSet<String>,
    parsed: Vec<Parsed>,
    pending: Vec<NewKey>,
    /// The smallest local id this import added: warming starts after it.
    first_local: Option<i64>,
    report: ImportReport,
}

impl<'a> Importer<'a> {
    /// Opens batch `batch_id` of `sku` in the ledger.
    pub async fn begin(
        ledger: &'a dyn Ledger,
        inventory: &'a Inventory,
        sku: &'a str,
        batch_id: &'a str,
        settings: &'a SkuConfig,
        format: UploadFormat,
    ) -> Result<Begun<'a>, Error> {
        let started = ledger
            .begin_batch(sku, batch_id, inventory.now_ms() as i64)
            .await
            .map_err(ledger_error)?;
        if let BatchStart::Existing(batch) = started {
            return Ok(Begun::Replayed(ImportReport {
                accepted: batch.accepted,
                rejected: batch.rejected,
                duplicate: batch.duplicate,
                lines: Vec::new(),
                state: batch.state,
                replayed: true,
            }));
        }
        Ok(Begun::Fresh(Box::new(Importer {
            ledger,
            inventory,
            sku,
            batch_id,
            settings,
            parser: RowParser::new(format),
            blacklist: settings.blacklisted(),
            parsed: Vec::new(),
            pending: Vec::with_capacity(CHUNK_ROWS),
            first_local: None,
            report: ImportReport::default(),
        })))
    }

    /// Consumes the next bytes of the upload.
    pub async fn feed(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.parser.feed(bytes, &mut self.parsed);
        self.take_parsed().await
    }

    async fn take_parsed(&mut self) -> Result<(), Error> {
        let format = &self.settings.format;
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
                    Ok(canonical) if self.blacklist.contains(&canonical) => {
                        self.report.rejected += 1;
                        self.report
                            .note(row.line, "the code is on the SKU's blacklist".into());
                    }
                    Ok(canonical) => {
                        self.pending.push(NewKey {
                            line: row.line,
                            digest: digest(&canonical),
                            code: canonical,
                            expires_at_ms: row.expires_at_ms.map(|ms| ms as i64),
                            max_issues: self.settings.max_issues as i64,
                            max_uses: row.max_uses.unwrap_or(self.settings.max_uses) as i64,
                            format_version: i64::from(format.version),
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
            .insert_keys(self.sku, self.batch_id, &self.pending)
            .await
            .map_err(ledger_error)?;
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
    /// to the running gateway, which picks new active keys up by itself).
    pub async fn finish(
        mut self: Box<Self>,
        activate: bool,
        warm: bool,
    ) -> Result<ImportReport, Error> {
        self.parser.finish(&mut self.parsed);
        self.take_parsed().await?;
        self.flush().await?;
        let counts = BatchCounts {
            accepted: self.report.accepted,
            rejected: self.report.rejected,
            duplicate: self.report.duplicate,
        };
        let now = self.inventory.now_ms() as i64;
        self.ledger
            .finish_batch(self.sku, self.batch_id, &counts, activate, now)
            .await
            .map_err(ledger_error)?;
        // Rejections are noted as rows are parsed, duplicates when their chunk is written.
        self.report.lines.sort_by_key(|(line, _)| *line);
        self.report.state = if activate { "active" } else { "pending" }.into();
        if activate && warm {
            if let Some(first) = self.first_local {
                warm_sku(self.ledger, self.inventory, self.sku, first - 1, |_| {}).await?;
            }
        }
        Ok(self.report)
    }

    /// Gives up on the upload: the ledger forgets the batch and its keys.
    pub async fn abort(self: Box<Self>) {
        if let Err(e) = self.ledger.abort_batch(self.sku, self.batch_id).await {
            tracing::error!(sku = self.sku, batch_id = self.batch_id, error = %e, "aborting a batch failed");
        }
    }
}

/// Activates a pending batch and loads it into the engine.
pub async fn activate(
    ledger: &dyn Ledger,
    inventory: &Inventory,
    sku: &str,
    batch_id: &str,
) -> Result<WarmReport, Error> {
    ledger
        .activate_batch(sku, batch_id, inventory.now_ms() as i64)
        .await
        .map_err(ledger_error)?;
    // Keys already in the engine are skipped, so warming the whole SKU is safe; it is
    // bounded by the SKU's size, which activation of a large batch is anyway.
    warm_sku(ledger, inventory, sku, 0, |_| {}).await
}
