//! Stage 1: framing rows. The splitter finds where rows end in the raw bytes, counts physical
//! lines and keeps at most one row; its decisions depend on the bytes only, never on where a
//! chunk ended (see the parent module's docs).

use super::MAX_ROW_BYTES;

/// What the splitter hands on: a complete row, or why it has none.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Split<'a> {
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
pub(super) struct Splitter {
    /// Whether `"` quotes newlines (CSV).
    quoting: bool,
    /// The current row so far, unless it is already too long.
    pub(super) row: Vec<u8>,
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
    pub(super) fn new(quoting: bool) -> Splitter {
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

    pub(super) fn feed(&mut self, bytes: &[u8], emit: &mut impl FnMut(Split<'_>)) {
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

    pub(super) fn finish(&mut self, emit: &mut impl FnMut(Split<'_>)) {
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

#[cfg(test)]
mod tests {
    use super::super::decode::{csv_reader, split_fields};
    use super::*;
    use csv_core::{ReadFieldResult, ReaderBuilder, Terminator};
    use proptest::prelude::*;

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
    }
}
