//! Streaming import of codes, a code per line.
//!
//! The body is fed in whatever chunks the network delivers; memory stays bounded by one line
//! and one engine chunk, whatever the upload size. A line longer than [`MAX_LINE_BYTES`] is
//! skipped without being buffered. Every line is validated against the SKU's format;
//! duplicates (against the SKU or within the file) are detected by the engine itself, which
//! checks the code index atomically as it adds.

use serde_json::{json, Value};

use super::{Added, Inventory, NewCode};
use crate::code::Format;
use crate::error::Error;

/// Longest line accepted; a code is at most 256 characters, the rest is slack for spaces.
pub const MAX_LINE_BYTES: usize = 1024;
/// Codes per engine call: large enough to amortise the round trip, small enough that no
/// single script blocks the engine for long.
pub const CHUNK_CODES: usize = 500;
/// Rejected lines listed in the report; all are counted.
pub const MAX_REPORTED_LINES: usize = 1000;

/// The outcome of an import.
#[derive(Debug, Default, Clone)]
pub struct ImportReport {
    pub accepted: u64,
    pub rejected: u64,
    pub duplicate: u64,
    /// `(line number, reason)` of the first rejected or duplicate lines.
    pub lines: Vec<(u64, String)>,
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
            "accepted": self.accepted,
            "rejected": self.rejected,
            "duplicate": self.duplicate,
            "rejected_lines": lines,
        })
    }

    fn note(&mut self, line: u64, reason: String) {
        if self.lines.len() < MAX_REPORTED_LINES {
            self.lines.push((line, reason));
        }
    }
}

/// Feeds an upload, chunk by chunk, into a SKU's inventory.
pub struct Importer<'a> {
    inventory: &'a Inventory,
    sku: &'a str,
    format: &'a Format,
    line: Vec<u8>,
    line_no: u64,
    overlong: bool,
    pending: Vec<(u64, NewCode)>,
    /// Key ids are allocated in increasing order per SKU, so a duplicate whose existing key is
    /// at least the first one this import added repeats a line of this very file.
    first_new: Option<u64>,
    report: ImportReport,
}

impl<'a> Importer<'a> {
    /// Starts an import into `sku`, validating codes with `format`.
    pub fn new(inventory: &'a Inventory, sku: &'a str, format: &'a Format) -> Importer<'a> {
        Importer {
            inventory,
            sku,
            format,
            line: Vec::new(),
            line_no: 0,
            overlong: false,
            pending: Vec::with_capacity(CHUNK_CODES),
            first_new: None,
            report: ImportReport::default(),
        }
    }

    /// Consumes the next bytes of the upload.
    pub async fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Error> {
        if self.line_no == 0 && self.line.is_empty() {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            self.push(&bytes[..nl]);
            self.end_line().await?;
            bytes = &bytes[nl + 1..];
        }
        self.push(bytes);
        Ok(())
    }

    /// Ends the upload and returns the report.
    pub async fn finish(mut self) -> Result<ImportReport, Error> {
        if !self.line.is_empty() || self.overlong {
            self.end_line().await?;
        }
        self.flush().await?;
        // Rejections are noted as lines are read, duplicates when their chunk is added.
        self.report.lines.sort_by_key(|(line, _)| *line);
        Ok(self.report)
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.overlong {
            return;
        }
        if self.line.len() + bytes.len() > MAX_LINE_BYTES {
            self.overlong = true;
            self.line.clear();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    async fn end_line(&mut self) -> Result<(), Error> {
        self.line_no += 1;
        let line_no = self.line_no;
        if std::mem::take(&mut self.overlong) {
            self.reject(
                line_no,
                format!("line is longer than {MAX_LINE_BYTES} bytes"),
            );
            return Ok(());
        }
        let line = std::mem::take(&mut self.line);
        let text = match std::str::from_utf8(&line) {
            Ok(text) => text.trim(),
            Err(e) => {
                let at = e.valid_up_to() + 1;
                self.reject(line_no, format!("not valid UTF-8 at byte {at}"));
                return Ok(());
            }
        };
        if text.is_empty() {
            return Ok(());
        }
        match self.format.validate(text) {
            Ok(canonical) => {
                self.pending.push((
                    line_no,
                    NewCode {
                        canonical,
                        expires_at_ms: None,
                    },
                ));
                if self.pending.len() >= CHUNK_CODES {
                    self.flush().await?;
                }
            }
            Err(why) => self.reject(line_no, why.to_string()),
        }
        self.line = line;
        self.line.clear();
        Ok(())
    }

    fn reject(&mut self, line: u64, reason: String) {
        self.report.rejected += 1;
        self.report.note(line, reason);
    }

    async fn flush(&mut self) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (lines, codes): (Vec<u64>, Vec<NewCode>) = self.pending.drain(..).unzip();
        let added = self.inventory.add_codes(self.sku, &codes).await?;
        for (line, outcome) in lines.into_iter().zip(added) {
            match outcome {
                Added::New(key_id) => {
                    self.report.accepted += 1;
                    if self.first_new.is_none() {
                        self.first_new = local_number(&key_id);
                    }
                }
                Added::Duplicate(key_id) => {
                    self.report.duplicate += 1;
                    let within = matches!(
                        (self.first_new, local_number(&key_id)),
                        (Some(first), Some(n)) if n >= first
                    );
                    let reason = if within {
                        "duplicate: repeats an earlier line of this upload"
                    } else {
                        "duplicate: the SKU already has this code"
                    };
                    self.report.note(line, reason.into());
                }
            }
        }
        Ok(())
    }
}

fn local_number(key_id: &str) -> Option<u64> {
    key_id.rsplit_once('.')?.1.parse().ok()
}
