//! Upload formats of code imports (plain lines, CSV, NDJSON), parsed as a stream of rows.
//!
//! # Why a hand-fed row parser
//!
//! Merchants upload millions of secret codes in files their suppliers produced: BOMs, CRLF,
//! quotes, Latin-1 or UTF-16 text, binary garbage, a 100 MB line with no newline at all. The
//! HTTP body arrives in whatever chunks the network delivers, so [`RowParser`] is fed bytes and
//! emits each row as soon as its end is seen. It never holds more than one row: a row longer
//! than [`MAX_ROW_BYTES`] is not buffered but scanned past and reported, so memory stays
//! bounded whatever the upload. Every problem is a per-row [`Parsed::Rejected`] with a line
//! number; nothing in the input can make the parser panic or fail as a whole.
//!
//! # Layout
//!
//! Parsing happens in two stages, so that chunk boundaries can never change the outcome:
//!
//! 1. A *splitter* finds where rows end in the raw bytes, counts physical lines, skips the
//!    stream's BOM, and keeps at most one row (`MAX_ROW_BYTES + 1` bytes: room for a `\r`
//!    that turns out to precede the `\n`). Its decisions depend on the bytes only, never on
//!    where a chunk ended. For CSV it tracks the four quoting states of RFC 4180, mirroring
//!    csv-core's own state machine, so a quoted field may span lines.
//! 2. A *decoder* turns one complete row into a [`Row`] or a rejection: UTF-8, NUL and
//!    blank checks, then the format's own rules. CSV fields are unescaped by csv-core.
//!
//! csv-core could find record ends by itself, but it cannot say where a record *started*
//! (it skips blank lines silently), nor report a quote left open at the end of the input
//! (it prefers *a* parse to none), and its CRLF mode also ends records at a lone `\r`,
//! which here is just a character. So the splitter frames rows and csv-core decodes fields
//! of one framed row at a time; a property test checks that the two agree on every input.
//!
//! # Secrets
//!
//! Rows carry bearer secrets, so no rejection reason ever quotes input: a reason names the
//! line (in [`Parsed::Rejected::line`]), the field or byte position, and what was expected.
//! That is also why JSON errors are re-worded rather than passed on: serde_json's messages
//! quote the offending value.
//!
//! The splitter is `split`, the decoder `decode`; `values` reads the typed columns
//! (`expires_at`, `max_uses`).

use std::path::Path;

mod decode;
mod split;
mod values;

use decode::Decoder;
use split::{Split, Splitter};
pub use values::parse_rfc3339;

/// Longest row accepted, in bytes, not counting its line ending. A code is at most 256
/// characters; the rest leaves room for CSV and JSON columns and padding.
pub const MAX_ROW_BYTES: usize = 4096;

/// The UTF-8 byte order mark, skipped at the very start of an upload.
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// The content types of each format, compared case-insensitively on the essence.
const LINES_TYPES: &[&str] = &["text/plain", "application/octet-stream"];
const CSV_TYPES: &[&str] = &["text/csv", "application/csv"];
const NDJSON_TYPES: &[&str] = &[
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/jsonlines",
];

/// How an upload is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadFormat {
    /// One code per line, nothing else; unless the first non-blank line is a CSV header
    /// naming a `code` column (`code`, `Code,expires_at`, …): a CSV file sent as plain
    /// text is then read as [`UploadFormat::Csv`], so its header never becomes a code.
    Lines,
    /// RFC 4180 CSV (`,` separated, `"` quoted with `""` escapes, quoted fields may span
    /// lines) under a header row whose names are matched trimmed and case-insensitively:
    /// `code` (required), `expires_at` (an RFC 3339 time or integer unix seconds) and
    /// `max_uses` (a positive integer), both optional and empty for none. Other columns are
    /// ignored.
    Csv,
    /// One JSON object per line: `code` (a string, required), `expires_at` (an RFC 3339
    /// string or integer unix seconds) and `max_uses` (a positive integer), both optional,
    /// absent or `null` for none. Other fields are ignored.
    Ndjson,
}

impl UploadFormat {
    /// The format of a body with Content-Type `ct` (only the essence counts: parameters such
    /// as `charset` are ignored, case does not matter):
    ///
    /// - absent, `text/plain`, `application/octet-stream` → [`UploadFormat::Lines`];
    /// - `text/csv`, `application/csv` → [`UploadFormat::Csv`];
    /// - `application/x-ndjson`, `application/ndjson`, `application/jsonl`,
    ///   `application/x-jsonlines`, `application/jsonlines` → [`UploadFormat::Ndjson`];
    /// - anything else → `None`, for the caller to answer 415. That includes
    ///   `application/json` (one document, not one per line) and `application/json-seq`
    ///   (RFC 7464 frames each record with a RS byte, so reading it as NDJSON would reject
    ///   every row with a misleading reason).
    pub fn from_content_type(ct: Option<&str>) -> Option<UploadFormat> {
        let Some(ct) = ct else {
            return Some(UploadFormat::Lines);
        };
        let essence = ct.split_once(';').map_or(ct, |(essence, _)| essence).trim();
        let is = |types: &[&str]| types.iter().any(|t| t.eq_ignore_ascii_case(essence));
        if essence.is_empty() || is(LINES_TYPES) {
            Some(UploadFormat::Lines)
        } else if is(CSV_TYPES) {
            Some(UploadFormat::Csv)
        } else if is(NDJSON_TYPES) {
            Some(UploadFormat::Ndjson)
        } else {
            None
        }
    }

    /// The format of a file, from its extension (case-insensitive): `.csv` → CSV,
    /// `.ndjson`, `.jsonl`, `.jsonlines` → NDJSON, anything else (`.txt`, `.lst`, none)
    /// → lines.
    pub fn from_path(path: &Path) -> UploadFormat {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let is = |names: &[&str]| names.iter().any(|n| n.eq_ignore_ascii_case(ext));
        if is(&["csv"]) {
            UploadFormat::Csv
        } else if is(&["ndjson", "jsonl", "jsonlines"]) {
            UploadFormat::Ndjson
        } else {
            UploadFormat::Lines
        }
    }
}

/// One parsed row. The code is as written (trimmed), not yet validated against the SKU's
/// format: that is the caller's job, with [`crate::code::Format::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The 1-based physical line where the row starts.
    pub line: u64,
    /// The code, trimmed of surrounding whitespace, never empty.
    pub code: String,
    /// When the code expires, in milliseconds since the epoch.
    pub expires_at_ms: Option<u64>,
    /// How many times the code may be redeemed; at least 1.
    pub max_uses: Option<u64>,
}

/// What one row of an upload turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A usable row.
    Row(Row),
    /// A row that cannot be used, and why. The reason never quotes the row.
    Rejected {
        /// The 1-based physical line where the row starts.
        line: u64,
        /// What is wrong, naming a position or a field and what was expected.
        reason: String,
    },
}

/// Counters of a [`RowParser`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParserStats {
    /// [`Parsed::Row`]s emitted.
    pub rows: u64,
    /// [`Parsed::Rejected`]s emitted (a rejected CSV header counts).
    pub rejected: u64,
    /// Bytes fed, BOM included.
    pub bytes: u64,
}

/// A streaming parser of one upload. See the module docs for the design.
///
/// Rules common to every format:
///
/// - a UTF-8 BOM at the very start is skipped;
/// - `\n` and `\r\n` end rows; a lone `\r` is an ordinary character;
/// - blank rows (whitespace only; in CSV, rows whose fields are all blank, such as `,,`) are
///   skipped without a trace;
/// - a row over [`MAX_ROW_BYTES`] (line ending excluded) is rejected without being buffered;
/// - a row that is not UTF-8 is rejected with the 1-based byte position of the first bad
///   byte within the row; a row with a NUL byte is rejected (the mark of UTF-16 text);
/// - every [`Parsed`] carries the physical line where its row starts, however many lines
///   earlier rows (or quoted CSV fields) spanned.
///
/// Lines: if the first non-blank line, within the first [`MAX_ROW_BYTES`] bytes, is a CSV
/// header naming a `code` column (comma-separated names, trimmed, optionally quoted, matched
/// case-insensitively), the whole upload is read as CSV ([`RowParser::format`] tells which).
/// Until that line is complete the parser holds at most that many bytes.
///
/// CSV: the first non-blank row is the header (an Excel `sep=` line before it is skipped).
/// If the header cannot be used (no `code` column, a column named twice, or the row itself
/// unreadable), the header is rejected with the reason, and then *every* later non-blank row
/// is rejected on its own with "no `code` column in the header", so that the counts of an
/// import stay truthful (a million rows not imported are a million rejections, not one).
/// [`RowParser::header_failure`] tells a caller who would rather refuse the upload at once.
///
/// The output does not depend on how the input is split into chunks.
pub struct RowParser {
    bom: Bom,
    /// A lines upload's first bytes, held until they show whether it is really CSV; `None`
    /// once that is settled (at once for CSV and NDJSON).
    sniff: Option<Vec<u8>>,
    finished: bool,
    bytes: u64,
    splitter: Splitter,
    decoder: Decoder,
}

/// Bytes a lines upload is held for while looking for its first non-blank line: the longest
/// row and its line ending.
const SNIFF_BYTES: usize = MAX_ROW_BYTES + 2;

impl RowParser {
    /// A parser for an upload in `format`.
    pub fn new(format: UploadFormat) -> RowParser {
        RowParser {
            bom: Bom::Checking(0),
            sniff: (format == UploadFormat::Lines).then(|| Vec::with_capacity(SNIFF_BYTES)),
            finished: false,
            bytes: 0,
            splitter: Splitter::new(format == UploadFormat::Csv),
            decoder: Decoder::new(format),
        }
    }

    /// Parses as much as `bytes` completes, appending to `out`. Never panics, whatever the
    /// bytes. Bytes fed after [`RowParser::finish`] are ignored.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Parsed>) {
        if self.finished {
            return;
        }
        self.bytes += bytes.len() as u64;
        let mut bytes = bytes;
        // The BOM may arrive split across chunks: match it byte by byte, and if the input
        // turns out not to start with one, hand the bytes matched so far on as data.
        while let Bom::Checking(matched) = self.bom {
            let Some((&first, rest)) = bytes.split_first() else {
                break;
            };
            if BOM.get(matched) == Some(&first) {
                bytes = rest;
                self.bom = if matched + 1 == BOM.len() {
                    Bom::Done
                } else {
                    Bom::Checking(matched + 1)
                };
            } else {
                self.bom = Bom::Done;
                self.pass(&BOM[..matched], out);
            }
        }
        self.pass(bytes, out);
    }

    /// Ends the input: emits the last row (a file need not end with a newline) and reports a
    /// structural problem, such as a CSV quote never closed, as a rejection. Later calls to
    /// [`RowParser::feed`] or `finish` do nothing.
    pub fn finish(&mut self, out: &mut Vec<Parsed>) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Bom::Checking(matched) = self.bom {
            self.bom = Bom::Done;
            self.pass(&BOM[..matched], out);
        }
        if let Some(head) = &self.sniff {
            let csv = sniff_csv(head, true) == Some(true);
            self.settle(csv, out);
        }
        let RowParser {
            splitter, decoder, ..
        } = self;
        splitter.finish(&mut |split: Split<'_>| decoder.take(split, out));
    }

    /// The format rows are read in: the one asked for, except a lines upload found to be CSV
    /// (see [`UploadFormat::Lines`]), which is known once its first non-blank line is.
    pub fn format(&self) -> UploadFormat {
        self.decoder.format
    }

    /// Why a CSV header could not be used, and its line: every later row is rejected for it,
    /// so nothing of the upload can be imported. `None` while the header is fine or unread.
    pub fn header_failure(&self) -> Option<(u64, &str)> {
        self.decoder
            .header_failure
            .as_ref()
            .map(|(line, reason)| (*line, reason.as_str()))
    }

    /// Rows emitted and rejected so far, bytes fed.
    pub fn stats(&self) -> ParserStats {
        ParserStats {
            bytes: self.bytes,
            ..self.decoder.stats
        }
    }

    /// Bytes of memory the parser holds in its buffers: for tests and metrics, to show that
    /// it stays bounded by about two rows whatever the input.
    pub fn buffered_capacity(&self) -> usize {
        self.splitter.row.capacity()
            + self.decoder.fields.capacity()
            + self.sniff.as_ref().map_or(0, Vec::capacity)
    }

    /// Hands bytes that follow the BOM on: to the sniffer while a lines upload's format is
    /// open, then to the splitter.
    fn pass(&mut self, bytes: &[u8], out: &mut Vec<Parsed>) {
        let mut bytes = bytes;
        if let Some(head) = &mut self.sniff {
            // Never more than SNIFF_BYTES: the decision depends on those alone, so the
            // chunking of the input cannot change it.
            let take = bytes.len().min(SNIFF_BYTES - head.len());
            head.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            match sniff_csv(head, false) {
                Some(csv) => self.settle(csv, out),
                None => return,
            }
        }
        let RowParser {
            splitter, decoder, ..
        } = self;
        splitter.feed(bytes, &mut |split: Split<'_>| decoder.take(split, out));
    }

    /// Ends sniffing: a lines upload found to be CSV is parsed as CSV from its first byte.
    fn settle(&mut self, csv: bool, out: &mut Vec<Parsed>) {
        let Some(head) = self.sniff.take() else {
            return;
        };
        if csv {
            self.splitter = Splitter::new(true);
            self.decoder = Decoder::new(UploadFormat::Csv);
        }
        let RowParser {
            splitter, decoder, ..
        } = self;
        splitter.feed(&head, &mut |split: Split<'_>| decoder.take(split, out));
    }
}

/// Whether a lines upload starting with `head` is CSV: whether its first non-blank line is a
/// CSV header naming a `code` column. `None` while that cannot be told yet: no complete
/// non-blank line in `head`, which has room for more, and the input has not `ended`.
fn sniff_csv(head: &[u8], ended: bool) -> Option<bool> {
    let mut rest = head;
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..nl];
        rest = &rest[nl + 1..];
        if !is_blank(line) {
            return Some(is_code_header(line));
        }
    }
    if ended {
        Some(!is_blank(rest) && is_code_header(rest))
    } else {
        (head.len() >= SNIFF_BYTES).then_some(false)
    }
}

/// A line the decoder skips: UTF-8 and whitespace only.
fn is_blank(line: &[u8]) -> bool {
    std::str::from_utf8(line).is_ok_and(|text| text.trim().is_empty())
}

/// A CSV header naming a `code` column, by the header's own rules (names trimmed, matched
/// case-insensitively), also when the names are quoted.
fn is_code_header(line: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(line) else {
        return false;
    };
    text.split(',').any(|name| {
        let name = name.trim();
        let name = name
            .strip_prefix('"')
            .and_then(|n| n.strip_suffix('"'))
            .unwrap_or(name);
        name.trim().eq_ignore_ascii_case("code")
    })
}

/// Progress of skipping a BOM at the start of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bom {
    /// This many bytes of the BOM matched so far.
    Checking(usize),
    /// Skipped, or not there.
    Done,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_allocated_once() {
        let mut parser = RowParser::new(UploadFormat::Csv);
        let before = parser.buffered_capacity();
        let mut out = Vec::new();
        parser.feed(b"code\n", &mut out);
        for _ in 0..100 {
            parser.feed(&[b'x'; 10_000], &mut out);
            parser.feed(b"\"\n", &mut out);
        }
        parser.finish(&mut out);
        assert_eq!(parser.buffered_capacity(), before);
        assert!(before <= 2 * (MAX_ROW_BYTES + 1));
    }
}
