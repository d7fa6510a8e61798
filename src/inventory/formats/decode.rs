//! Stage 2: decoding rows. The decoder turns one complete row into a [`Row`] or a
//! rejection: UTF-8, NUL and blank checks, then the format's own rules. CSV fields are
//! unescaped by csv-core, one framed row at a time.

use std::ops::Range;

use csv_core::{ReadFieldResult, Reader, ReaderBuilder, Terminator};
use serde::Deserialize;
use serde_json::Value;

use super::split::Split;
use super::values::{parse_expiry, parse_max_uses, seconds_to_ms, Invalid};
use super::{Parsed, ParserStats, Row, UploadFormat, MAX_ROW_BYTES};

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

/// Turns complete rows into [`Parsed`] values.
pub(super) struct Decoder {
    pub(super) format: UploadFormat,
    csv: Reader,
    /// Unescaped CSV fields of one row: never longer than the row, plus one spare byte so
    /// csv-core always has room when it is handed the row's final `\n`.
    pub(super) fields: Vec<u8>,
    header: Header,
    /// Why the CSV header failed, and its line.
    pub(super) header_failure: Option<(u64, String)>,
    pub(super) stats: ParserStats,
}

impl Decoder {
    pub(super) fn new(format: UploadFormat) -> Decoder {
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

    pub(super) fn take(&mut self, split: Split<'_>, out: &mut Vec<Parsed>) {
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
pub(super) fn csv_reader() -> Reader {
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
pub(super) fn split_fields(
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

#[cfg(test)]
mod tests {
    use super::super::RowParser;
    use super::*;

    fn parse_all(format: UploadFormat, input: &[u8]) -> Vec<Parsed> {
        let mut parser = RowParser::new(format);
        let mut out = Vec::new();
        parser.feed(input, &mut out);
        parser.finish(&mut out);
        out
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
}
