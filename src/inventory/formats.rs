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

use std::ops::Range;
use std::path::Path;
use std::time::UNIX_EPOCH;

use csv_core::{ReadFieldResult, Reader, ReaderBuilder, Terminator};
use serde::Deserialize;
use serde_json::Value;

/// Longest row accepted, in bytes, not counting its line ending. A code is at most 256
/// characters; the rest leaves room for CSV and JSON columns and padding.
pub const MAX_ROW_BYTES: usize = 4096;

/// The UTF-8 byte order mark, skipped at the very start of an upload.
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// 9999-12-31T23:59:59Z: the last second RFC 3339 can write. Larger unix times are almost
/// always milliseconds sent as seconds, so they are refused rather than read as year 50000.
const MAX_UNIX_SECONDS: u64 = 253_402_300_799;

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

// ---- stage 1: framing rows ----

/// What the splitter hands on: a complete row, or why it has none.
#[derive(Debug, PartialEq, Eq)]
enum Split<'a> {
    /// A row's bytes, line ending excluded, at most [`MAX_ROW_BYTES`].
    Row { line: u64, bytes: &'a [u8] },
    /// A row over [`MAX_ROW_BYTES`], not kept.
    TooLong { line: u64 },
    /// The input ended inside a quoted CSV field opened on `quote_line`.
    UnclosedQuote { line: u64, quote_line: u64 },
}

/// Where the splitter is within a CSV row: the states of csv-core's reader that decide
/// whether a `\n` ends the row (`StartField`, `InField`, `InQuotedField`,
/// `InDoubleEscapedQuote`), with the same transitions for `,`, `"` and `\n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldState {
    FieldStart,
    Unquoted,
    Quoted,
    /// A `"` inside a quoted field: either the field's end or the first of `""`.
    QuoteInQuoted,
}

/// Finds row ends and keeps at most one row.
struct Splitter {
    /// Whether `"` quotes newlines (CSV).
    quoting: bool,
    /// The current row so far, unless it is already too long.
    row: Vec<u8>,
    /// The current row is too long: its bytes are being skipped.
    overlong: bool,
    /// The physical line of the next byte.
    line: u64,
    /// The physical line where the current row started.
    row_line: u64,
    quote: FieldState,
    /// The line where the quoted field being read opened.
    quote_line: u64,
}

impl Splitter {
    fn new(quoting: bool) -> Splitter {
        Splitter {
            quoting,
            // One spare byte: a `\r` that a following `\n` will strip.
            row: Vec::with_capacity(MAX_ROW_BYTES + 1),
            overlong: false,
            line: 1,
            row_line: 1,
            quote: FieldState::FieldStart,
            quote_line: 0,
        }
    }

    fn feed(&mut self, bytes: &[u8], emit: &mut impl FnMut(Split<'_>)) {
        if self.quoting {
            self.feed_quoted(bytes, emit);
        } else {
            self.feed_lines(bytes, emit);
        }
    }

    fn feed_lines(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(Split<'_>)) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            self.append(&bytes[..nl]);
            self.end_row(true, emit);
            bytes = &bytes[nl + 1..];
        }
        self.append(bytes);
    }

    fn feed_quoted(&mut self, bytes: &[u8], emit: &mut impl FnMut(Split<'_>)) {
        let mut start = 0;
        let mut state = self.quote;
        for (i, &b) in bytes.iter().enumerate() {
            state = match (state, b) {
                (FieldState::Quoted, b'"') => FieldState::QuoteInQuoted,
                (FieldState::Quoted, b'\n') => {
                    self.line += 1;
                    FieldState::Quoted
                }
                (FieldState::Quoted, _) => FieldState::Quoted,
                (_, b'\n') => {
                    self.append(&bytes[start..i]);
                    self.end_row(true, emit);
                    start = i + 1;
                    FieldState::FieldStart
                }
                (_, b',') => FieldState::FieldStart,
                (FieldState::FieldStart, b'"') => {
                    self.quote_line = self.line;
                    FieldState::Quoted
                }
                (FieldState::QuoteInQuoted, b'"') => FieldState::Quoted,
                _ => FieldState::Unquoted,
            };
        }
        self.quote = state;
        self.append(&bytes[start..]);
    }

    /// Adds bytes to the current row, or gives up on keeping it once it cannot fit.
    fn append(&mut self, bytes: &[u8]) {
        if self.overlong || bytes.is_empty() {
            return;
        }
        if self.row.len() + bytes.len() > MAX_ROW_BYTES + 1 {
            self.overlong = true;
            self.row.clear();
        } else {
            self.row.extend_from_slice(bytes);
        }
    }

    /// Ends the current row, at a `\n` (`terminated`) or at the end of the input.
    fn end_row(&mut self, terminated: bool, emit: &mut impl FnMut(Split<'_>)) {
        let line = self.row_line;
        if terminated {
            self.line += 1;
        }
        self.row_line = self.line;
        if terminated && self.row.last() == Some(&b'\r') {
            self.row.pop();
        }
        if std::mem::take(&mut self.overlong) || self.row.len() > MAX_ROW_BYTES {
            self.row.clear();
            emit(Split::TooLong { line });
            return;
        }
        emit(Split::Row {
            line,
            bytes: &self.row,
        });
        self.row.clear();
    }

    fn finish(&mut self, emit: &mut impl FnMut(Split<'_>)) {
        if self.quote == FieldState::Quoted {
            self.quote = FieldState::FieldStart;
            self.overlong = false;
            self.row.clear();
            emit(Split::UnclosedQuote {
                line: self.row_line,
                quote_line: self.quote_line,
            });
        } else if !self.row.is_empty() || self.overlong {
            self.quote = FieldState::FieldStart;
            self.end_row(false, emit);
        }
    }
}

// ---- stage 2: decoding rows ----

/// Where the CSV header stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    /// Not seen yet; `first` until the first non-blank row (which may be `sep=,`).
    Pending { first: bool },
    /// Read: data rows follow these columns.
    Ready(Columns),
    /// Unusable: data rows cannot be interpreted.
    Failed,
}

/// Indexes of the columns the importer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Columns {
    code: usize,
    expires_at: Option<usize>,
    max_uses: Option<usize>,
}

/// A field value that is neither empty nor valid.
struct Invalid;

/// Turns complete rows into [`Parsed`] values.
struct Decoder {
    format: UploadFormat,
    csv: Reader,
    /// Unescaped CSV fields of one row: never longer than the row, plus one spare byte so
    /// csv-core always has room when it is handed the row's final `\n`.
    fields: Vec<u8>,
    header: Header,
    /// Why the CSV header failed, and its line.
    header_failure: Option<(u64, String)>,
    stats: ParserStats,
}

impl Decoder {
    fn new(format: UploadFormat) -> Decoder {
        let fields = if format == UploadFormat::Csv {
            vec![0; MAX_ROW_BYTES + 1]
        } else {
            Vec::new()
        };
        Decoder {
            format,
            csv: csv_reader(),
            fields,
            header: Header::Pending { first: true },
            header_failure: None,
            stats: ParserStats::default(),
        }
    }

    fn take(&mut self, split: Split<'_>, out: &mut Vec<Parsed>) {
        match split {
            Split::Row { line, bytes } => self.decode(line, bytes, out),
            Split::TooLong { line } => {
                let reason = format!("row is longer than {MAX_ROW_BYTES} bytes");
                self.unreadable(line, reason, out);
            }
            Split::UnclosedQuote { line, quote_line } => {
                let reason = format!("a quoted field opened on line {quote_line} is never closed");
                self.unreadable(line, reason, out);
            }
        }
    }

    fn decode(&mut self, line: u64, bytes: &[u8], out: &mut Vec<Parsed>) {
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let reason = format!("not valid UTF-8 at byte {}", e.valid_up_to() + 1);
                return self.unreadable(line, reason, out);
            }
        };
        if text.trim().is_empty() {
            return;
        }
        if bytes.contains(&0) {
            return self.unreadable(line, "contains a NUL byte".into(), out);
        }
        match self.format {
            UploadFormat::Lines => self.accept(line, text.trim().to_owned(), None, None, out),
            UploadFormat::Csv => self.decode_csv(line, text, out),
            UploadFormat::Ndjson => self.decode_json(line, text, out),
        }
    }

    /// Rejects a row that could not be read at all. A CSV header that cannot be read leaves
    /// the columns unknown.
    fn unreadable(&mut self, line: u64, reason: String, out: &mut Vec<Parsed>) {
        if let Header::Pending { .. } = self.header {
            if self.format == UploadFormat::Csv {
                self.header = Header::Failed;
                self.header_failure = Some((line, reason.clone()));
            }
        }
        self.reject(line, reason, out);
    }

    fn reject(&mut self, line: u64, reason: impl Into<String>, out: &mut Vec<Parsed>) {
        self.stats.rejected += 1;
        out.push(Parsed::Rejected {
            line,
            reason: reason.into(),
        });
    }

    fn accept(
        &mut self,
        line: u64,
        code: String,
        expires_at_ms: Option<u64>,
        max_uses: Option<u64>,
        out: &mut Vec<Parsed>,
    ) {
        self.stats.rows += 1;
        out.push(Parsed::Row(Row {
            line,
            code,
            expires_at_ms,
            max_uses,
        }));
    }

    // ---- CSV ----

    fn decode_csv(&mut self, line: u64, text: &str, out: &mut Vec<Parsed>) {
        match self.header {
            Header::Pending { first } => {
                if first && is_sep_directive(text) {
                    self.header = Header::Pending { first: false };
                    return;
                }
                self.read_header(line, text, out);
            }
            Header::Failed => self.reject(line, "no `code` column in the header", out),
            Header::Ready(columns) => self.read_record(columns, line, text, out),
        }
    }

    fn read_header(&mut self, line: u64, text: &str, out: &mut Vec<Parsed>) {
        let mut code = None;
        let mut expires_at = None;
        let mut max_uses = None;
        let mut repeated: Option<&'static str> = None;
        let mut count = 0;
        let mut blank = true;
        let mut foreign_separator = false;
        let split = split_fields(
            &mut self.csv,
            &mut self.fields,
            text.as_bytes(),
            |index, _, field| {
                count += 1;
                let name = std::str::from_utf8(field).unwrap_or_default().trim();
                blank &= name.is_empty();
                foreign_separator |= name.contains([';', '\t', '|']);
                let (slot, column) = if name.eq_ignore_ascii_case("code") {
                    (&mut code, "code")
                } else if name.eq_ignore_ascii_case("expires_at") {
                    (&mut expires_at, "expires_at")
                } else if name.eq_ignore_ascii_case("max_uses") {
                    (&mut max_uses, "max_uses")
                } else {
                    return;
                };
                if slot.is_some() {
                    repeated.get_or_insert(column);
                } else {
                    *slot = Some(index);
                }
            },
        );
        if split.is_none() {
            self.csv = csv_reader();
            return self.unreadable(line, "row could not be split into CSV fields".into(), out);
        }
        if blank {
            return;
        }
        if let Some(column) = repeated {
            let reason = format!("the header names the `{column}` column more than once");
            return self.unreadable(line, reason, out);
        }
        let Some(code) = code else {
            let hint = if count == 1 && foreign_separator {
                " (only commas separate columns)"
            } else {
                ""
            };
            let reason = format!(
                "the header has no `code` column: expected `code`, and optionally \
                 `expires_at` and `max_uses`{hint}"
            );
            return self.unreadable(line, reason, out);
        };
        self.header = Header::Ready(Columns {
            code,
            expires_at,
            max_uses,
        });
    }

    fn read_record(&mut self, columns: Columns, line: u64, text: &str, out: &mut Vec<Parsed>) {
        let mut code = None;
        let mut expires_at = None;
        let mut max_uses = None;
        let split = split_fields(
            &mut self.csv,
            &mut self.fields,
            text.as_bytes(),
            |index, range, _| {
                if index == columns.code {
                    code = Some(range);
                } else if Some(index) == columns.expires_at {
                    expires_at = Some(range);
                } else if Some(index) == columns.max_uses {
                    max_uses = Some(range);
                }
            },
        );
        let decoded = split
            .and_then(|len| self.fields.get(..len))
            .and_then(|fields| std::str::from_utf8(fields).ok());
        let Some(decoded) = decoded else {
            self.csv = csv_reader();
            return self.reject(line, "row could not be split into CSV fields", out);
        };
        // Fields are split at ASCII bytes, so every field is a whole part of `decoded`, and
        // the row is blank exactly when their concatenation is.
        if decoded.trim().is_empty() {
            return;
        }
        let field = |range: Option<Range<usize>>| range.and_then(|r| decoded.get(r)).map(str::trim);
        let Some(code) = field(code) else {
            return self.reject(line, "missing the code field", out);
        };
        if code.is_empty() {
            return self.reject(line, "`code` is empty", out);
        }
        let Ok(expires_at_ms) = parse_expiry(field(expires_at).unwrap_or("")) else {
            return self.reject(line, EXPIRES_AT_EXPECTED, out);
        };
        let Ok(max_uses) = parse_max_uses(field(max_uses).unwrap_or("")) else {
            return self.reject(line, MAX_USES_EXPECTED, out);
        };
        let code = code.to_owned();
        self.accept(line, code, expires_at_ms, max_uses, out);
    }

    // ---- NDJSON ----

    fn decode_json(&mut self, line: u64, text: &str, out: &mut Vec<Parsed>) {
        if !text.trim_start().starts_with('{') {
            // Also keeps serde from reading a JSON array as the struct's fields in order.
            return self.reject(line, "expected a JSON object", out);
        }
        let object: JsonRow = match serde_json::from_str(text) {
            Ok(object) => object,
            Err(e) => {
                // Only the position: serde_json's messages quote the input.
                let reason = match e.classify() {
                    // The text is an object and every field accepts any value, so the
                    // only data error left is a field given twice.
                    serde_json::error::Category::Data => {
                        "`code`, `expires_at` or `max_uses` appears more than once".to_owned()
                    }
                    _ => format!("malformed JSON at column {}", e.column()),
                };
                return self.reject(line, reason, out);
            }
        };
        let code = match object.code {
            Some(Value::String(code)) => code,
            None => return self.reject(line, "`code` is missing or null", out),
            Some(_) => return self.reject(line, "`code` must be a string", out),
        };
        let code = match code.trim() {
            "" => return self.reject(line, "`code` is empty", out),
            trimmed if trimmed.len() == code.len() => code,
            trimmed => trimmed.to_owned(),
        };
        let expires_at_ms = match object.expires_at {
            None => Ok(None),
            Some(Value::String(s)) => parse_expiry(&s),
            Some(Value::Number(n)) => n.as_u64().ok_or(Invalid).and_then(seconds_to_ms),
            Some(_) => Err(Invalid),
        };
        let Ok(expires_at_ms) = expires_at_ms else {
            return self.reject(line, EXPIRES_AT_EXPECTED, out);
        };
        let max_uses = match object.max_uses {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().filter(|&n| n > 0).map(Some).ok_or(Invalid),
            Some(_) => Err(Invalid),
        };
        let Ok(max_uses) = max_uses else {
            return self.reject(line, MAX_USES_EXPECTED, out);
        };
        self.accept(line, code, expires_at_ms, max_uses, out);
    }
}

const EXPIRES_AT_EXPECTED: &str =
    "`expires_at` must be an RFC 3339 time (such as 2030-01-31T23:59:59Z) or unix seconds";
const MAX_USES_EXPECTED: &str = "`max_uses` must be a positive integer";

/// The fields of an NDJSON row. Unknown fields are skipped without being stored; absent and
/// `null` read as `None`.
#[derive(Deserialize)]
struct JsonRow {
    code: Option<Value>,
    expires_at: Option<Value>,
    max_uses: Option<Value>,
}

/// A csv-core reader for single framed rows: `,` separated, `"` quoted with `""` escapes,
/// and only `\n` ending a record (the splitter already removed a `\r` before it).
fn csv_reader() -> Reader {
    let mut reader = ReaderBuilder::new()
        .terminator(Terminator::Any(b'\n'))
        .build();
    // csv-core strips a BOM from the first input it ever reads; the stream's BOM is the
    // splitter's job, and a BOM-like row start mid-file is data. A blank line spends that
    // first read without changing the reader's state.
    let _ = reader.read_field(b"\n", &mut [0u8; 1]);
    reader
}

/// Splits one framed CSV row into fields, unescaped into `buf`, calling `each` with every
/// field's index, range in `buf` and bytes. Returns the length of all the fields together,
/// or `None` if csv-core disagreed with the splitter about where the row ends (which the
/// mirrored state machine rules out; the reader must then be replaced).
fn split_fields(
    reader: &mut Reader,
    buf: &mut [u8],
    row: &[u8],
    mut each: impl FnMut(usize, Range<usize>, &[u8]),
) -> Option<usize> {
    let mut written = 0;
    let mut field_start = 0;
    let mut index = 0;
    // The row, then the `\n` that ends it without signalling the end of all input (which
    // would leave the reader unusable for the next row).
    for (part, last) in [(row, false), (&b"\n"[..], true)] {
        let mut input = part;
        while !input.is_empty() {
            let output = buf.get_mut(written..)?;
            let (result, read, wrote) = reader.read_field(input, output);
            input = input.get(read..)?;
            written += wrote;
            match result {
                ReadFieldResult::Field { record_end } => {
                    let range = field_start..written;
                    each(index, range.clone(), buf.get(range)?);
                    index += 1;
                    field_start = written;
                    if record_end {
                        return (last && input.is_empty()).then_some(written);
                    }
                }
                ReadFieldResult::InputEmpty if read > 0 || wrote > 0 => {}
                ReadFieldResult::InputEmpty
                | ReadFieldResult::OutputFull
                | ReadFieldResult::End => return None,
            }
        }
    }
    None
}

/// Excel's `sep=,` first line, which declares the separator rather than holding data.
fn is_sep_directive(text: &str) -> bool {
    let text = text.trim();
    text.len() == 5
        && text
            .get(..4)
            .is_some_and(|sep| sep.eq_ignore_ascii_case("sep="))
}

/// `expires_at`: empty for none, integer unix seconds, or an RFC 3339 time (see
/// [`parse_rfc3339`]); in milliseconds since the epoch.
fn parse_expiry(text: &str) -> Result<Option<u64>, Invalid> {
    let text = text.trim();
    if text.is_empty() {
        Ok(None)
    } else if text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().map_err(|_| Invalid).and_then(seconds_to_ms)
    } else {
        parse_rfc3339(text).map(Some).ok_or(Invalid)
    }
}

fn seconds_to_ms(seconds: u64) -> Result<Option<u64>, Invalid> {
    if seconds > MAX_UNIX_SECONDS {
        return Err(Invalid);
    }
    Ok(Some(seconds * 1000))
}

/// `max_uses`: empty for none, else a positive integer in ASCII digits.
fn parse_max_uses(text: &str) -> Result<Option<u64>, Invalid> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Invalid);
    }
    match text.parse() {
        Ok(0) | Err(_) => Err(Invalid),
        Ok(n) => Ok(Some(n)),
    }
}

/// An RFC 3339 time in milliseconds since the epoch, read leniently the way suppliers write
/// it: `T`, `t` or a space between date and time, any fraction of a second, and `Z`, `z`,
/// a `±hh:mm` offset or nothing (UTC). humantime reads everything but offsets other than
/// `+00:00` and lower-case letters, which are handled here.
fn parse_rfc3339(text: &str) -> Option<u64> {
    let mut buf = [0u8; 64];
    let upper = buf.get_mut(..text.len())?;
    upper.copy_from_slice(text.as_bytes());
    upper.make_ascii_uppercase();
    let (local, offset_seconds) = split_offset(upper);
    // humantime checks the date and time but lets anything short follow a `Z`.
    let tail = local.get(19..).unwrap_or_default();
    let tail = tail.strip_suffix(b"Z").unwrap_or(tail);
    let tail_ok = match tail {
        [] => true,
        [b'.', digits @ ..] => !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if !tail_ok {
        return None;
    }
    let at = humantime::parse_rfc3339_weak(std::str::from_utf8(local).ok()?).ok()?;
    let ms = at.duration_since(UNIX_EPOCH).ok()?.as_millis();
    let ms = i128::try_from(ms).ok()? - i128::from(offset_seconds) * 1000;
    let ms = u64::try_from(ms).ok()?;
    (ms / 1000 <= MAX_UNIX_SECONDS).then_some(ms)
}

/// Splits a trailing `±hh:mm` offset (in seconds east of UTC) from a time written without
/// `Z`. Anything else is left for humantime to judge.
fn split_offset(text: &[u8]) -> (&[u8], i64) {
    // The shortest time with an offset: 2030-01-31T23:59:59+08:00.
    if text.len() >= 25 {
        let (local, offset) = text.split_at(text.len() - 6);
        if let [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] = *offset {
            let digits = [h1, h2, m1, m2];
            if digits.iter().all(u8::is_ascii_digit) && local.last() != Some(&b'Z') {
                let [h1, h2, m1, m2] = digits.map(|d| i64::from(d - b'0'));
                let (hours, minutes) = (h1 * 10 + h2, m1 * 10 + m2);
                if hours <= 23 && minutes <= 59 {
                    let seconds = hours * 3600 + minutes * 60;
                    return (local, if sign == b'-' { -seconds } else { seconds });
                }
            }
        }
    }
    (text, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(format: UploadFormat, input: &[u8]) -> Vec<Parsed> {
        let mut parser = RowParser::new(format);
        let mut out = Vec::new();
        parser.feed(input, &mut out);
        parser.finish(&mut out);
        out
    }

    /// The splitter's rows, as (line, bytes) or a marker for rows it could not keep.
    fn split(quoting: bool, input: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut splitter = Splitter::new(quoting);
        let mut rows = Vec::new();
        let mut emit = |s: Split<'_>| match s {
            Split::Row { line, bytes } => rows.push((line, bytes.to_vec())),
            Split::TooLong { line } => rows.push((line, b"<too long>".to_vec())),
            Split::UnclosedQuote { line, .. } => rows.push((line, b"<unclosed>".to_vec())),
        };
        splitter.feed(input, &mut emit);
        splitter.finish(&mut emit);
        rows
    }

    fn row(line: u64, code: &str) -> Parsed {
        Parsed::Row(Row {
            line,
            code: code.into(),
            expires_at_ms: None,
            max_uses: None,
        })
    }

    #[test]
    fn splitter_counts_lines_through_quoted_newlines() {
        let rows = split(true, b"a,\"x\ny\"\r\n\nb\rc\n\"\"\"\n\"\nlast");
        let expected: Vec<(u64, Vec<u8>)> = vec![
            (1, b"a,\"x\ny\"".to_vec()),
            (3, b"".to_vec()),
            (4, b"b\rc".to_vec()),
            (5, b"\"\"\"\n\"".to_vec()),
            (7, b"last".to_vec()),
        ];
        assert_eq!(rows, expected);
    }

    #[test]
    fn a_quote_inside_an_unquoted_field_is_literal() {
        let rows = split(true, b"ab\"c\nd\"\n");
        assert_eq!(rows, vec![(1, b"ab\"c".to_vec()), (2, b"d\"".to_vec())]);
    }

    #[test]
    fn a_crlf_row_of_exactly_the_limit_fits() {
        let mut input = vec![b'A'; MAX_ROW_BYTES];
        input.extend_from_slice(b"\r\nB");
        let rows = split(false, &input);
        assert_eq!(rows[0].1.len(), MAX_ROW_BYTES);
        assert_eq!(rows[1], (2, b"B".to_vec()));
        // Without the `\n`, the `\r` is content and the row is one byte too long.
        input.truncate(MAX_ROW_BYTES + 1);
        assert_eq!(split(false, &input), vec![(1, b"<too long>".to_vec())]);
    }

    #[test]
    fn csv_reader_keeps_a_bom_like_start_of_a_row() {
        let out = parse_all(UploadFormat::Csv, b"code\n\xEF\xBB\xBFAB\n");
        assert_eq!(out, vec![row(2, "\u{feff}AB")]);
    }

    #[test]
    fn header_that_cannot_be_read_fails_every_row() {
        let out = parse_all(UploadFormat::Csv, b"co\xffde\nAB\n\nCD\n");
        assert_eq!(
            out,
            vec![
                Parsed::Rejected {
                    line: 1,
                    reason: "not valid UTF-8 at byte 3".into()
                },
                Parsed::Rejected {
                    line: 2,
                    reason: "no `code` column in the header".into()
                },
                Parsed::Rejected {
                    line: 4,
                    reason: "no `code` column in the header".into()
                },
            ]
        );
    }

    #[test]
    fn excel_separator_line_is_skipped() {
        let out = parse_all(UploadFormat::Csv, b"sep=,\r\ncode\r\nAB\r\n");
        assert_eq!(out, vec![row(3, "AB")]);
    }

    #[test]
    fn semicolon_header_gets_a_hint() {
        let out = parse_all(UploadFormat::Csv, b"code;expires_at\nAB;1\n");
        let Parsed::Rejected { line: 1, reason } = &out[0] else {
            panic!("{out:?}");
        };
        assert!(reason.contains("only commas"), "{reason}");
    }

    #[test]
    fn rfc3339_variants() {
        let base = 1_896_134_399_000; // 2030-01-31T23:59:59Z
        for text in [
            "2030-01-31T23:59:59Z",
            "2030-01-31t23:59:59z",
            "2030-01-31 23:59:59",
            "2030-01-31T23:59:59+00:00",
            "2030-02-01T07:59:59+08:00",
            "2030-01-31T18:59:59-05:00",
            "2030-02-01T07:59:59.000+08:00",
        ] {
            assert_eq!(parse_rfc3339(text), Some(base), "{text}");
        }
        assert_eq!(parse_rfc3339("2030-01-31T23:59:59.250Z"), Some(base + 250));
        for text in [
            "",
            "2030-01-31",
            "2030-02-30T00:00:00Z",
            "2030-01-31T24:00:00Z",
            "2030-01-31T23:59:59Z+08:00",
            "2030-01-31T23:59:59+24:00",
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:00:00+01:00",
            "2030-01-31T23:59:59Zjunk",
            "2030-01-31T23:59:59ZZ",
            "2030-01-31T23:59:59.",
            "2030-01-31T23:59:59.5.5",
            "tomorrow",
            "2030-01-31T23:59:59\u{e9}\u{e9}\u{e9}",
        ] {
            assert_eq!(parse_rfc3339(text), None, "{text}");
        }
    }

    #[test]
    fn expiry_accepts_unix_seconds_within_rfc3339_range() {
        assert!(matches!(parse_expiry(" "), Ok(None)));
        assert!(matches!(parse_expiry("0"), Ok(Some(0))));
        assert!(matches!(
            parse_expiry("1896134399"),
            Ok(Some(1_896_134_399_000))
        ));
        assert!(matches!(
            parse_expiry("253402300799"),
            Ok(Some(253_402_300_799_000))
        ));
        // Milliseconds by mistake, overflow, signs, fractions.
        for text in [
            "1896134399000",
            "99999999999999999999999",
            "-1",
            "+1",
            "1.5",
        ] {
            assert!(parse_expiry(text).is_err(), "{text}");
        }
    }

    #[test]
    fn max_uses_is_a_positive_integer() {
        assert!(matches!(parse_max_uses(""), Ok(None)));
        assert!(matches!(parse_max_uses(" 3 "), Ok(Some(3))));
        for text in ["0", "-1", "+1", "1.0", "x", "99999999999999999999999"] {
            assert!(parse_max_uses(text).is_err(), "{text}");
        }
    }

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

    /// Bytes that steer the CSV state machines: quotes, separators, line ends.
    fn csv_soup() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(prop::sample::select(&b"ab ,\"\n"[..]), 0..200)
    }

    /// Every record csv-core finds in the whole input, as fields; csv-core skips empty
    /// lines, and the splitter's empty rows are dropped to match.
    fn csv_core_records(input: &[u8]) -> Vec<Vec<Vec<u8>>> {
        let mut reader = ReaderBuilder::new()
            .terminator(Terminator::Any(b'\n'))
            .build();
        let mut records = Vec::new();
        let mut fields = Vec::new();
        let mut field = Vec::new();
        let mut input = input;
        let mut buf = [0u8; 64];
        loop {
            let (result, read, wrote) = reader.read_field(input, &mut buf);
            input = &input[read..];
            field.extend_from_slice(&buf[..wrote]);
            match result {
                ReadFieldResult::Field { record_end } => {
                    fields.push(std::mem::take(&mut field));
                    if record_end {
                        records.push(std::mem::take(&mut fields));
                    }
                }
                ReadFieldResult::End => return records,
                ReadFieldResult::InputEmpty | ReadFieldResult::OutputFull => {}
            }
        }
    }

    proptest! {
        #[test]
        fn splitter_frames_rows_exactly_where_csv_core_ends_records(input in csv_soup()) {
            let rows = split(true, &input);
            prop_assume!(rows.iter().all(|(_, r)| r.as_slice() != b"<unclosed>"));
            let mut ours = Vec::new();
            let mut reader = csv_reader();
            let mut buf = vec![0u8; MAX_ROW_BYTES + 1];
            for (_, raw) in rows.iter().filter(|(_, r)| !r.is_empty()) {
                let mut fields = Vec::new();
                let len = split_fields(&mut reader, &mut buf, raw, |_, _, f| fields.push(f.to_vec()));
                prop_assert!(len.is_some());
                ours.push(fields);
            }
            prop_assert_eq!(ours, csv_core_records(&input));
        }

        #[test]
        fn timestamps_never_panic(text in "\\PC{0,40}") {
            let _ = parse_rfc3339(&text);
            let _ = parse_expiry(&text);
        }

        #[test]
        fn timestamps_near_rfc3339_never_panic(text in "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}[.0-9]{0,12}[Zz+:0-9-]{0,7}") {
            let _ = parse_rfc3339(&text);
        }
    }
}
