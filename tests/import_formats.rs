//! The upload row parser, through its public API: each format's rules, every rejection with
//! its line number, hostile input (binary, wrong encodings, a 100 MB line), and the property
//! that matters most for a streamed body: the output never depends on how the bytes were
//! split into chunks.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use kamigate::inventory::formats::{
    Parsed, ParserStats, Row, RowParser, UploadFormat, MAX_ROW_BYTES,
};
use proptest::prelude::*;

const FORMATS: [UploadFormat; 3] = [UploadFormat::Lines, UploadFormat::Csv, UploadFormat::Ndjson];

/// The parser's buffers never hold more than about two rows.
const BUFFER_BOUND: usize = 3 * MAX_ROW_BYTES;

fn parse(format: UploadFormat, input: &[u8]) -> Vec<Parsed> {
    parse_in_chunks(format, input, &[usize::MAX]).0
}

/// Feeds `input` in chunks of the given sizes (cycled), then finishes.
fn parse_in_chunks(
    format: UploadFormat,
    input: &[u8],
    sizes: &[usize],
) -> (Vec<Parsed>, ParserStats) {
    let mut parser = RowParser::new(format);
    let mut out = Vec::new();
    let mut rest = input;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(size.clamp(1, rest.len()));
        parser.feed(chunk, &mut out);
        assert!(parser.buffered_capacity() <= BUFFER_BOUND);
        rest = tail;
    }
    parser.finish(&mut out);
    (out, parser.stats())
}

fn row(line: u64, code: &str) -> Parsed {
    full_row(line, code, None, None)
}

fn full_row(line: u64, code: &str, expires_at_ms: Option<u64>, max_uses: Option<u64>) -> Parsed {
    Parsed::Row(Row {
        line,
        code: code.into(),
        expires_at_ms,
        max_uses,
    })
}

fn rejected(line: u64, reason: &str) -> Parsed {
    Parsed::Rejected {
        line,
        reason: reason.into(),
    }
}

fn reasons(out: &[Parsed]) -> Vec<(u64, String)> {
    out.iter()
        .filter_map(|p| match p {
            Parsed::Rejected { line, reason } => Some((*line, reason.clone())),
            Parsed::Row(_) => None,
        })
        .collect()
}

fn first_reason(format: UploadFormat, input: &str) -> String {
    let out = parse(format, input.as_bytes());
    match out.as_slice() {
        [Parsed::Rejected { reason, .. }] => reason.clone(),
        other => panic!("{input:?} gave {other:?}"),
    }
}

const TOO_LONG: &str = "row is longer than 4096 bytes";
const NO_CODE_COLUMN: &str = "no `code` column in the header";
const EXPIRES_AT: &str =
    "`expires_at` must be an RFC 3339 time (such as 2030-01-31T23:59:59Z) or unix seconds";
const MAX_USES: &str = "`max_uses` must be a positive integer";

/// 2030-01-31T23:59:59Z.
const EXPIRY_S: u64 = 1_896_134_399;
const EXPIRY_MS: u64 = EXPIRY_S * 1000;

// ---- choosing a format ----

#[test]
fn content_type_picks_the_format() {
    let cases: &[(Option<&str>, Option<UploadFormat>)] = &[
        (None, Some(UploadFormat::Lines)),
        (Some(""), Some(UploadFormat::Lines)),
        (Some("text/plain"), Some(UploadFormat::Lines)),
        (Some("Text/Plain; charset=utf-8"), Some(UploadFormat::Lines)),
        (Some("application/octet-stream"), Some(UploadFormat::Lines)),
        (Some("text/csv"), Some(UploadFormat::Csv)),
        (Some(" TEXT/CSV ;header=present"), Some(UploadFormat::Csv)),
        (Some("application/csv"), Some(UploadFormat::Csv)),
        (Some("application/x-ndjson"), Some(UploadFormat::Ndjson)),
        (Some("application/jsonl"), Some(UploadFormat::Ndjson)),
        (
            Some("application/ndjson; charset=utf-8"),
            Some(UploadFormat::Ndjson),
        ),
        (Some("application/json"), None),
        (Some("application/json-seq"), None),
        (Some("multipart/form-data; boundary=x"), None),
        (Some("text/csvx"), None),
    ];
    for (ct, expected) in cases {
        assert_eq!(UploadFormat::from_content_type(*ct), *expected, "{ct:?}");
    }
}

#[test]
fn file_extension_picks_the_format() {
    let cases = [
        ("codes.txt", UploadFormat::Lines),
        ("codes.lst", UploadFormat::Lines),
        ("codes", UploadFormat::Lines),
        ("codes.xlsx", UploadFormat::Lines),
        ("codes.CSV", UploadFormat::Csv),
        ("dir.csv/codes.ndjson", UploadFormat::Ndjson),
        ("codes.jsonl", UploadFormat::Ndjson),
    ];
    for (path, expected) in cases {
        assert_eq!(UploadFormat::from_path(Path::new(path)), expected, "{path}");
    }
}

#[test]
fn a_lines_upload_opening_with_a_code_header_is_read_as_csv() {
    let cases: &[(&[u8], Vec<Parsed>)] = &[
        (b"code\nAB\nCD", vec![row(2, "AB"), row(3, "CD")]),
        (b"\xEF\xBB\xBF\r\n \nCODE\r\nAB\r\n", vec![row(4, "AB")]),
        (
            b"\"Code\", expires_at ,note\n\"AB\",2030-01-31T23:59:59Z,\"x\ny\"\nCD,,\n",
            vec![full_row(2, "AB", Some(EXPIRY_MS), None), row(4, "CD")],
        ),
        (
            b"max_uses,code\n2,AB\n",
            vec![full_row(2, "AB", None, Some(2))],
        ),
        (b"code", vec![]),
    ];
    for (input, expected) in cases {
        for sizes in [&[usize::MAX][..], &[1], &[3, 1]] {
            let mut parser = RowParser::new(UploadFormat::Lines);
            let mut out = Vec::new();
            let mut rest: &[u8] = input;
            for &size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at(size.min(rest.len()));
                parser.feed(chunk, &mut out);
                rest = tail;
            }
            parser.finish(&mut out);
            assert_eq!(&out, expected, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(parser.format(), UploadFormat::Csv);
            assert!(parser.buffered_capacity() <= BUFFER_BOUND);
        }
    }
}

#[test]
fn a_lines_upload_of_codes_stays_lines() {
    for input in [
        &b"AB\ncode\n"[..],
        b"codes\nAB\n",
        b"code-1\nAB\n",
        b"\"AB,CD\"\n",
        b"code;expires_at\nAB;1\n",
    ] {
        let mut parser = RowParser::new(UploadFormat::Lines);
        let mut out = Vec::new();
        parser.feed(input, &mut out);
        parser.finish(&mut out);
        assert_eq!(parser.format(), UploadFormat::Lines, "{input:?}");
        let lines = input.iter().filter(|&&b| b == b'\n').count();
        assert_eq!(out.len(), lines, "every line is a row or a rejection");
    }
    // Only the first non-blank line within the first row's worth of bytes is looked at.
    let mut input = "\n".repeat(MAX_ROW_BYTES);
    input.push_str("code\nAB\n");
    let out = parse(UploadFormat::Lines, input.as_bytes());
    let line = MAX_ROW_BYTES as u64 + 1;
    assert_eq!(out, vec![row(line, "code"), row(line + 1, "AB")]);
}

#[test]
fn an_unusable_csv_header_is_reported_as_such() {
    let mut parser = RowParser::new(UploadFormat::Csv);
    let mut out = Vec::new();
    parser.feed(b"\nserial\n", &mut out);
    let (line, reason) = parser.header_failure().expect("the header failed");
    assert_eq!(line, 2);
    assert!(reason.contains("no `code` column"), "{reason}");
    for (format, input) in [
        (UploadFormat::Csv, &b"code\nAB\n"[..]),
        (UploadFormat::Csv, b"\n"),
        (UploadFormat::Lines, b"AB\n"),
        (UploadFormat::Ndjson, b"{}\n"),
    ] {
        let mut parser = RowParser::new(format);
        parser.feed(input, &mut out);
        parser.finish(&mut out);
        assert_eq!(parser.header_failure(), None, "{input:?}");
    }
    // A text/plain CSV whose header names `code` twice fails like any CSV.
    let mut parser = RowParser::new(UploadFormat::Lines);
    parser.feed(b"code,CODE\nAB\n", &mut out);
    assert!(parser.header_failure().is_some());
}

// ---- lines ----

#[test]
fn lines_are_trimmed_codes_and_blank_lines_are_skipped() {
    let out = parse(
        UploadFormat::Lines,
        b"AB-CD\n  ef gh \t\r\n\n \t \r\n\xc2\xa0\nIJ\r\nlast",
    );
    assert_eq!(
        out,
        vec![
            row(1, "AB-CD"),
            row(2, "ef gh"),
            row(6, "IJ"),
            row(7, "last")
        ]
    );
}

#[test]
fn lines_are_not_interpreted() {
    let out = parse(UploadFormat::Lines, b"\"AB,CD\"\n{\"code\":\"X\"}\nA\rB\n");
    assert_eq!(
        out,
        vec![
            row(1, "\"AB,CD\""),
            row(2, "{\"code\":\"X\"}"),
            row(3, "A\rB")
        ]
    );
}

// ---- all formats ----

/// The CSV header row, or nothing for the other formats.
fn header(format: UploadFormat, line_ending: &str) -> String {
    if format == UploadFormat::Csv {
        format!("code{line_ending}")
    } else {
        String::new()
    }
}

/// Two codes, `AB` and `CD`, in `format`, with `line_ending` after each row; no header.
fn body(format: UploadFormat, line_ending: &str) -> String {
    match format {
        UploadFormat::Lines | UploadFormat::Csv => format!("AB{line_ending}CD{line_ending}"),
        UploadFormat::Ndjson => {
            format!("{{\"code\":\"AB\"}}{line_ending}{{\"code\":\"CD\"}}{line_ending}")
        }
    }
}

/// A complete two-code upload in `format`.
fn sample(format: UploadFormat, line_ending: &str) -> String {
    header(format, line_ending) + &body(format, line_ending)
}

/// The line of the first code of [`sample`].
fn first_line(format: UploadFormat) -> u64 {
    if format == UploadFormat::Csv {
        2
    } else {
        1
    }
}

#[test]
fn bom_is_skipped_in_every_format_even_split_across_chunks() {
    for format in FORMATS {
        let n = first_line(format);
        let expected = vec![row(n, "AB"), row(n + 1, "CD")];
        let input = format!("\u{feff}{}", sample(format, "\n"));
        for sizes in [&[usize::MAX][..], &[1], &[2], &[1, 1, 5]] {
            let (out, stats) = parse_in_chunks(format, input.as_bytes(), sizes);
            assert_eq!(out, expected, "{format:?} {sizes:?}");
            assert_eq!(stats.bytes, input.len() as u64);
        }
    }
}

#[test]
fn a_partial_bom_is_data() {
    for format in FORMATS {
        for input in [&b"\xEF\xBB"[..], b"\xEFAB\n", b"\xEF\xBB\n"] {
            for sizes in [&[usize::MAX][..], &[1]] {
                let (out, _) = parse_in_chunks(format, input, sizes);
                assert_eq!(
                    out,
                    vec![rejected(1, "not valid UTF-8 at byte 1")],
                    "{format:?} {input:?}"
                );
            }
        }
    }
}

#[test]
fn only_the_first_bom_is_skipped() {
    let out = parse(UploadFormat::Lines, "\u{feff}AB\n\u{feff}CD\n".as_bytes());
    assert_eq!(out, vec![row(1, "AB"), row(2, "\u{feff}CD")]);
    let out = parse(
        UploadFormat::Ndjson,
        "\u{feff}\u{feff}{\"code\":\"AB\"}".as_bytes(),
    );
    assert_eq!(out, vec![rejected(1, "expected a JSON object")]);
}

#[test]
fn crlf_and_lf_end_rows_alike_and_the_last_newline_is_optional() {
    for format in FORMATS {
        let n = first_line(format);
        let expected = vec![row(n, "AB"), row(n + 1, "CD")];
        for ending in ["\n", "\r\n"] {
            let input = sample(format, ending);
            assert_eq!(parse(format, input.as_bytes()), expected, "{format:?}");
            let trimmed = input.trim_end_matches(ending);
            assert_eq!(parse(format, trimmed.as_bytes()), expected, "{format:?}");
        }
    }
}

#[test]
fn empty_and_blank_uploads_give_nothing() {
    for format in FORMATS {
        for input in [
            &b""[..],
            b"\n",
            b"\r\n\r\n",
            b"  \t \n\n",
            b"\xEF\xBB\xBF",
            b"\xEF\xBB\xBF\n",
        ] {
            let (out, stats) = parse_in_chunks(format, input, &[1]);
            assert_eq!(out, vec![], "{format:?} {input:?}");
            assert_eq!((stats.rows, stats.rejected), (0, 0));
        }
    }
}

#[test]
fn invalid_utf8_names_the_byte_within_the_row() {
    for format in FORMATS {
        let n = first_line(format);
        let mut input = header(format, "\n").into_bytes();
        input.extend_from_slice(b"\xffAB\nABC\xe9\n\xe2\x82\nAB\xf0\x9f\x8e\x81\xc0\n");
        let out = parse(format, &input);
        assert_eq!(
            out,
            vec![
                rejected(n, "not valid UTF-8 at byte 1"),
                rejected(n + 1, "not valid UTF-8 at byte 4"),
                rejected(n + 2, "not valid UTF-8 at byte 1"),
                rejected(n + 3, "not valid UTF-8 at byte 7"),
            ],
            "{format:?}"
        );
    }
}

#[test]
fn a_nul_byte_rejects_the_row() {
    for format in FORMATS {
        let n = first_line(format);
        let input = sample(format, "\n").replace("AB", "A\0B");
        let out = parse(format, input.as_bytes());
        assert_eq!(
            out,
            vec![rejected(n, "contains a NUL byte"), row(n + 1, "CD")],
            "{format:?}"
        );
    }
}

#[test]
fn an_overlong_row_is_rejected_and_the_next_rows_keep_their_lines() {
    for format in FORMATS {
        let n = first_line(format);
        let long = "A".repeat(MAX_ROW_BYTES + 1);
        let input = sample(format, "\n").replace("AB", &long);
        let (out, stats) = parse_in_chunks(format, input.as_bytes(), &[7, 4096, 1]);
        assert_eq!(
            out,
            vec![rejected(n, TOO_LONG), row(n + 1, "CD")],
            "{format:?}"
        );
        assert_eq!((stats.rows, stats.rejected), (1, 1));
    }
    // Exactly the limit fits, with either line ending.
    for ending in ["\n", "\r\n", ""] {
        let code = "A".repeat(MAX_ROW_BYTES);
        let out = parse(UploadFormat::Lines, format!("{code}{ending}").as_bytes());
        assert_eq!(out, vec![row(1, &code)]);
    }
}

/// A 100 MB row, fed as the network would: memory stays bounded and the rows after it
/// still parse, on the right lines.
#[test]
fn a_100_mb_line_uses_bounded_memory() {
    let chunk = vec![b'A'; 64 * 1024];
    for format in FORMATS {
        let mut parser = RowParser::new(format);
        let mut out = Vec::new();
        let header = header(format, "\n");
        let n = first_line(format);
        parser.feed(header.as_bytes(), &mut out);
        for _ in 0..1600 {
            parser.feed(&chunk, &mut out);
            assert!(parser.buffered_capacity() <= BUFFER_BOUND);
        }
        assert_eq!(out, vec![]);
        let rest = body(format, "\r\n");
        parser.feed(b"\r\n", &mut out);
        parser.feed(rest.as_bytes(), &mut out);
        parser.finish(&mut out);
        assert!(parser.buffered_capacity() <= BUFFER_BOUND);
        assert_eq!(
            out,
            vec![rejected(n, TOO_LONG), row(n + 1, "AB"), row(n + 2, "CD")],
            "{format:?}"
        );
        assert_eq!(
            parser.stats(),
            ParserStats {
                rows: 2,
                rejected: 1,
                bytes: (header.len() + 1600 * chunk.len() + 2 + rest.len()) as u64,
            }
        );
    }
}

#[test]
fn latin1_and_utf16_files_are_rejected_row_by_row() {
    let latin1 = b"CAF\xc9-1\nCAF\xc9-2\nOK-3\n";
    let out = parse(UploadFormat::Lines, latin1);
    assert_eq!(
        out,
        vec![
            rejected(1, "not valid UTF-8 at byte 4"),
            rejected(2, "not valid UTF-8 at byte 4"),
            row(3, "OK-3"),
        ]
    );

    let utf16le = |text: &str, bom: bool| {
        let mut bytes = if bom { vec![0xFF, 0xFE] } else { vec![] };
        bytes.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
        bytes
    };
    let utf16be =
        |text: &str| -> Vec<u8> { text.encode_utf16().flat_map(u16::to_be_bytes).collect() };
    for format in FORMATS {
        let text = sample(format, "\r\n");
        for input in [utf16le(&text, true), utf16le(&text, false), utf16be(&text)] {
            for sizes in [&[usize::MAX][..], &[3]] {
                let (out, stats) = parse_in_chunks(format, &input, sizes);
                assert!(!out.is_empty(), "{format:?}");
                assert_eq!(stats.rows, 0, "{format:?}: {out:?}");
                for (_, reason) in reasons(&out) {
                    assert!(
                        reason.starts_with("not valid UTF-8")
                            || reason == "contains a NUL byte"
                            || reason == NO_CODE_COLUMN,
                        "{format:?}: {reason}"
                    );
                }
            }
        }
    }
}

#[test]
fn stats_count_rows_rejections_and_bytes() {
    let input = b"code,max_uses\nAB,1\nCD,0\n\n,\nEF,\n";
    let (out, stats) = parse_in_chunks(UploadFormat::Csv, input, &[3]);
    assert_eq!(out.len(), 3);
    assert_eq!(
        stats,
        ParserStats {
            rows: 2,
            rejected: 1,
            bytes: input.len() as u64
        }
    );
}

#[test]
fn nothing_is_parsed_after_finish() {
    for format in FORMATS {
        let mut parser = RowParser::new(format);
        let mut out = Vec::new();
        parser.feed(sample(format, "\n").as_bytes(), &mut out);
        parser.finish(&mut out);
        let stats = parser.stats();
        let len = out.len();
        parser.finish(&mut out);
        parser.feed(b"MORE\n", &mut out);
        parser.finish(&mut out);
        assert_eq!((out.len(), parser.stats()), (len, stats));
    }
}

// ---- CSV ----

#[test]
fn csv_reads_the_named_columns_in_any_order() {
    let input = "Note, MAX_USES ,Code,expires_at\r\n\
                 first,3,AB-1,2030-01-31T23:59:59Z\r\n\
                 second,,AB-2,\r\n\
                 third,1, AB-3 ,1896134399\r\n\
                 ,,,\r\n\
                 fourth,2,AB-4,2030-02-01T07:59:59+08:00,extra,fields\r\n\
                 short,5,AB-5\r\n";
    let out = parse(UploadFormat::Csv, input.as_bytes());
    assert_eq!(
        out,
        vec![
            full_row(2, "AB-1", Some(EXPIRY_MS), Some(3)),
            full_row(3, "AB-2", None, None),
            full_row(4, "AB-3", Some(EXPIRY_MS), Some(1)),
            full_row(6, "AB-4", Some(EXPIRY_MS), Some(2)),
            full_row(7, "AB-5", None, Some(5)),
        ]
    );
}

#[test]
fn csv_quotes_hold_commas_quotes_and_newlines() {
    let input = "code,max_uses\n\
                 \"AB,CD\",1\n\
                 \"AB\"\"CD\",2\n\
                 \"AB\nCD\r\nEF\",3\n\
                 \"\"\"\",\"4\"\n\
                 after,5\n";
    let out = parse(UploadFormat::Csv, input.as_bytes());
    assert_eq!(
        out,
        vec![
            full_row(2, "AB,CD", None, Some(1)),
            full_row(3, "AB\"CD", None, Some(2)),
            full_row(4, "AB\nCD\r\nEF", None, Some(3)),
            full_row(7, "\"", None, Some(4)),
            full_row(8, "after", None, Some(5)),
        ]
    );
}

#[test]
fn csv_header_is_the_first_non_blank_row() {
    let out = parse(UploadFormat::Csv, b"\n  \n,,\r\ncode\nAB\n");
    assert_eq!(out, vec![row(5, "AB")]);
    let out = parse(UploadFormat::Csv, b"sep=,\ncode\nAB\n");
    assert_eq!(out, vec![row(3, "AB")]);
}

#[test]
fn csv_without_a_code_column_rejects_the_header_and_every_row() {
    let input = b"SECRET-CODE-0001\nSECRET-CODE-0002\n\n\"SECRET\nCODE\"\nSECRET-CODE-0004\n";
    let (out, stats) = parse_in_chunks(UploadFormat::Csv, input, &[5]);
    let header_reason = "the header has no `code` column: expected `code`, and optionally \
                         `expires_at` and `max_uses`";
    assert_eq!(
        out,
        vec![
            rejected(1, header_reason),
            rejected(2, NO_CODE_COLUMN),
            rejected(4, NO_CODE_COLUMN),
            rejected(6, NO_CODE_COLUMN),
        ]
    );
    assert_eq!((stats.rows, stats.rejected), (0, 4));
}

#[test]
fn csv_header_naming_a_column_twice_is_rejected() {
    let out = parse(UploadFormat::Csv, b"code,CODE\nAB,CD\n");
    assert_eq!(
        out,
        vec![
            rejected(1, "the header names the `code` column more than once"),
            rejected(2, NO_CODE_COLUMN),
        ]
    );
}

#[test]
fn csv_header_over_the_limit_fails_the_columns() {
    let input = format!("code,{}\nAB\n", "x".repeat(MAX_ROW_BYTES));
    let out = parse(UploadFormat::Csv, input.as_bytes());
    assert_eq!(
        out,
        vec![rejected(1, TOO_LONG), rejected(2, NO_CODE_COLUMN)]
    );
}

#[test]
fn csv_field_rejections_name_the_field() {
    let input = "expires_at,max_uses,code\n\
                 2030-01-31T23:59:59Z,1\n\
                 2030-01-31T23:59:59Z,1,\n\
                 tomorrow,1,CODE-3\n\
                 -5,1,CODE-4\n\
                 1896134399000,1,CODE-5\n\
                 ,0,CODE-6\n\
                 ,-1,CODE-7\n\
                 ,1.5,CODE-8\n\
                 ,many,CODE-9\n\
                 ,99999999999999999999999,CODE-10\n\
                 \"2030-01-31T23:59:59Z\",\"7\",CODE-11\n";
    let out = parse(UploadFormat::Csv, input.as_bytes());
    assert_eq!(
        out,
        vec![
            rejected(2, "missing the code field"),
            rejected(3, "`code` is empty"),
            rejected(4, EXPIRES_AT),
            rejected(5, EXPIRES_AT),
            rejected(6, EXPIRES_AT),
            rejected(7, MAX_USES),
            rejected(8, MAX_USES),
            rejected(9, MAX_USES),
            rejected(10, MAX_USES),
            rejected(11, MAX_USES),
            full_row(12, "CODE-11", Some(EXPIRY_MS), Some(7)),
        ]
    );
}

#[test]
fn csv_unterminated_quote_is_reported_where_its_row_starts() {
    let input = b"code\nAB\n\"CD\nEF\nGH";
    let (out, stats) = parse_in_chunks(UploadFormat::Csv, input, &[2]);
    assert_eq!(
        out,
        vec![
            row(2, "AB"),
            rejected(3, "a quoted field opened on line 3 is never closed"),
        ]
    );
    assert_eq!((stats.rows, stats.rejected), (1, 1));

    let out = parse(UploadFormat::Csv, b"code,max_uses\nAB,\"1\n");
    assert_eq!(
        out,
        vec![rejected(
            2,
            "a quoted field opened on line 2 is never closed"
        )]
    );
}

#[test]
fn csv_unterminated_quote_that_swallows_a_long_tail_reports_the_quote() {
    let mut input = b"code\n\"AB\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', 3 * MAX_ROW_BYTES));
    let out = parse(UploadFormat::Csv, &input);
    assert_eq!(
        out,
        vec![rejected(
            2,
            "a quoted field opened on line 2 is never closed"
        )]
    );
}

#[test]
fn csv_rejections_keep_line_numbers_across_quoted_newlines() {
    let bytes = b"code,max_uses\n\"A\nB\",0\n\"C\n\nD\",\xff\n\"E\nF\",1\n";
    let out = parse(UploadFormat::Csv, bytes);
    assert_eq!(
        out,
        vec![
            rejected(2, MAX_USES),
            rejected(4, "not valid UTF-8 at byte 8"),
            full_row(7, "E\nF", None, Some(1)),
        ]
    );
}

// ---- NDJSON ----

#[test]
fn ndjson_reads_objects_and_ignores_unknown_fields() {
    let input = concat!(
        "{\"code\":\"AB-1\",\"expires_at\":\"2030-01-31T23:59:59Z\",\"max_uses\":3}\n",
        " { \"max_uses\" : 1 , \"code\" : \" AB-2 \" } \r\n",
        "\n",
        "{\"code\":\"AB-3\",\"expires_at\":1896134399,\"batch\":{\"nested\":[1,{\"x\":null}]},\"tags\":[\"a\"]}\n",
        "{\"code\":\"AB-4\",\"expires_at\":null,\"max_uses\":null,\"code_hint\":\"x\"}\n",
        "{\"code\":\"AB\\u002d5\",\"expires_at\":\"\"}",
    );
    let out = parse(UploadFormat::Ndjson, input.as_bytes());
    assert_eq!(
        out,
        vec![
            full_row(1, "AB-1", Some(EXPIRY_MS), Some(3)),
            full_row(2, "AB-2", None, Some(1)),
            full_row(4, "AB-3", Some(EXPIRY_MS), None),
            full_row(5, "AB-4", None, None),
            full_row(6, "AB-5", None, None),
        ]
    );
}

#[test]
fn ndjson_wrong_shapes_and_types_are_rejected_with_our_own_words() {
    let cases = [
        ("[\"SECRET-1\"]", "expected a JSON object"),
        ("\"SECRET-1\"", "expected a JSON object"),
        ("12345", "expected a JSON object"),
        ("SECRET-1", "expected a JSON object"),
        ("{}", "`code` is missing or null"),
        ("{\"code\":null}", "`code` is missing or null"),
        ("{\"code\":12345}", "`code` must be a string"),
        ("{\"code\":[\"SECRET-1\"]}", "`code` must be a string"),
        (
            "{\"code\":{\"value\":\"SECRET-1\"}}",
            "`code` must be a string",
        ),
        ("{\"code\":\"  \"}", "`code` is empty"),
        (
            "{\"code\":\"SECRET-1\",\"expires_at\":\"soon\"}",
            EXPIRES_AT,
        ),
        ("{\"code\":\"SECRET-1\",\"expires_at\":-1}", EXPIRES_AT),
        ("{\"code\":\"SECRET-1\",\"expires_at\":1.5}", EXPIRES_AT),
        ("{\"code\":\"SECRET-1\",\"expires_at\":true}", EXPIRES_AT),
        (
            "{\"code\":\"SECRET-1\",\"expires_at\":1896134399000}",
            EXPIRES_AT,
        ),
        ("{\"code\":\"SECRET-1\",\"max_uses\":0}", MAX_USES),
        ("{\"code\":\"SECRET-1\",\"max_uses\":-2}", MAX_USES),
        ("{\"code\":\"SECRET-1\",\"max_uses\":2.5}", MAX_USES),
        ("{\"code\":\"SECRET-1\",\"max_uses\":\"2\"}", MAX_USES),
        ("{\"code\":\"SECRET-1\",\"max_uses\":{}}", MAX_USES),
        (
            "{\"code\":\"SECRET-1\",\"code\":\"SECRET-2\"}",
            "`code`, `expires_at` or `max_uses` appears more than once",
        ),
        ("{\"code\":\"SECRET-1\"", "malformed JSON at column 18"),
        (
            "{\"code\":\"SECRET-1\"} SECRET-2",
            "malformed JSON at column 21",
        ),
        ("{\"code\":\"SECRET-1\",}", "malformed JSON at column 20"),
        ("{\"code\":'SECRET-1'}", "malformed JSON at column 9"),
        (
            "{\"code\":\"SECRET\u{1}-1\"}",
            "malformed JSON at column 16",
        ),
    ];
    for (input, expected) in cases {
        let reason = first_reason(UploadFormat::Ndjson, input);
        assert_eq!(reason, expected, "{input}");
        assert!(!reason.contains("SECRET"), "{input}: {reason}");
    }
}

#[test]
fn ndjson_deep_nesting_never_overflows_the_stack() {
    let nest = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    // An unknown field is skipped without recursion, however deep.
    let out = parse(
        UploadFormat::Ndjson,
        format!("{{\"code\":\"AB\",\"x\":{}}}", nest(2000)).as_bytes(),
    );
    assert_eq!(out, vec![row(1, "AB")]);
    // A known field is read, up to serde_json's recursion limit.
    let deep = format!("{{\"max_uses\":{},\"code\":\"AB\"}}", nest(2000));
    let reason = first_reason(UploadFormat::Ndjson, &deep);
    assert!(reason.starts_with("malformed JSON at column"), "{reason}");
}

// ---- secrets ----

#[test]
fn no_reason_quotes_the_code() {
    let code = "K7Q2-SECRET-9XZ4";
    let csv = format!(
        "code,expires_at,max_uses\n\
         {code},soon,1\n{code},,none\n{code}\0,,\n\"{code}\n"
    );
    let ndjson = format!(
        "{{\"code\":\"{code}\",\"max_uses\":\"{code}\"}}\n\
         {{\"code\":\"{code}\",\"expires_at\":\"{code}\"}}\n\
         {{\"code\":[\"{code}\"]}}\n[\"{code}\"]\n{{\"code\":\"{code}\" {code}\n\
         {{\"{code}\":1}}\n{code}\n"
    );
    let headerless = format!("{code}\n{code}\n");
    for (format, input) in [
        (UploadFormat::Csv, csv.as_str()),
        (UploadFormat::Csv, headerless.as_str()),
        (UploadFormat::Ndjson, ndjson.as_str()),
    ] {
        let out = parse(format, input.as_bytes());
        let found = reasons(&out);
        assert!(found.len() >= 2, "{format:?}: {out:?}");
        for (_, reason) in found {
            assert!(!reason.contains("SECRET"), "{format:?}: {reason}");
        }
    }
}

// ---- speed ----

#[test]
fn a_million_rows_parse_quickly() {
    let rows = 1_000_000u64;
    for format in FORMATS {
        let mut input = String::with_capacity(rows as usize * 48);
        if format == UploadFormat::Csv {
            input.push_str("code,max_uses\n");
        }
        for i in 0..rows {
            let _ = match format {
                UploadFormat::Lines => writeln!(input, "CODE-{i:012}"),
                UploadFormat::Csv => writeln!(input, "CODE-{i:012},1"),
                UploadFormat::Ndjson => {
                    writeln!(input, "{{\"code\":\"CODE-{i:012}\",\"max_uses\":1}}")
                }
            };
        }
        let started = Instant::now();
        let mut parser = RowParser::new(format);
        let mut out = Vec::with_capacity(8192);
        let mut count = 0;
        for chunk in input.as_bytes().chunks(64 * 1024) {
            parser.feed(chunk, &mut out);
            count += out.len();
            out.clear();
        }
        parser.finish(&mut out);
        count += out.len();
        let elapsed = started.elapsed();
        assert_eq!(count as u64, rows);
        assert_eq!(parser.stats().rows, rows);
        eprintln!("{format:?}: {rows} rows in {elapsed:?}");
        if !cfg!(debug_assertions) {
            assert!(elapsed.as_millis() < 1000, "{format:?}: {elapsed:?}");
        }
    }
}

// ---- properties ----

/// Pieces that exercise every rule when concatenated: line ends, quotes, separators,
/// headers, JSON, BOMs, bad bytes, and runs long enough to cross the row limit.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    let tokens: Vec<&'static [u8]> = vec![
        b"\n",
        b"\r\n",
        b"\r",
        b",",
        b"\"",
        b"\"\"",
        b" ",
        b"\0",
        b"\xff",
        b"\xc3",
        b"\xa9",
        b"\xEF\xBB\xBF",
        b"AB-12",
        b"code",
        b"code,expires_at,max_uses\n",
        b"2030-01-31T23:59:59Z",
        b"1896134399",
        b"sep=,",
        b"{\"code\":\"AB\"}",
        b"{\"code\":",
        b"\"max_uses\":2}",
        b"{",
        b"}",
        b"[",
    ];
    prop_oneof![
        4 => prop::sample::select(tokens).prop_map(<[u8]>::to_vec),
        1 => (0usize..2 * MAX_ROW_BYTES, prop::sample::select(&b"A \"\n,"[..]))
            .prop_map(|(n, b)| vec![b; n]),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

fn structured_input() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(piece(), 0..40).prop_map(|pieces| pieces.concat())
}

fn format() -> impl Strategy<Value = UploadFormat> {
    prop::sample::select(FORMATS.to_vec())
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![1usize..4, 1usize..100, 1usize..10_000], 1..20)
}

fn check_reasons(out: &[Parsed]) -> Result<(), TestCaseError> {
    for parsed in out {
        match parsed {
            Parsed::Row(row) => {
                prop_assert!(row.line >= 1);
                prop_assert!(!row.code.is_empty());
                prop_assert_eq!(row.code.trim(), row.code.as_str());
                prop_assert!(row.code.len() <= MAX_ROW_BYTES);
                prop_assert!(row.max_uses != Some(0));
            }
            Parsed::Rejected { line, reason } => {
                prop_assert!(*line >= 1);
                prop_assert!(!reason.is_empty() && reason.len() < 200, "{}", reason);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn output_does_not_depend_on_chunking(
        format in format(),
        input in structured_input(),
        sizes in chunk_sizes(),
    ) {
        let whole = parse_in_chunks(format, &input, &[usize::MAX]);
        let chunked = parse_in_chunks(format, &input, &sizes);
        check_reasons(&whole.0)?;
        prop_assert_eq!(&whole, &chunked);
        prop_assert_eq!(whole.1.rows + whole.1.rejected, whole.0.len() as u64);
        prop_assert_eq!(whole.1.bytes, input.len() as u64);
        // Lines only go forward.
        prop_assert!(whole.0.windows(2).all(|w| line_of(&w[0]) < line_of(&w[1])));
    }

    #[test]
    fn random_bytes_never_panic_and_chunking_does_not_matter(
        format in format(),
        input in prop::collection::vec(any::<u8>(), 0..4096),
        sizes in chunk_sizes(),
    ) {
        let whole = parse_in_chunks(format, &input, &[usize::MAX]);
        let chunked = parse_in_chunks(format, &input, &sizes);
        check_reasons(&whole.0)?;
        prop_assert_eq!(whole, chunked);
    }

    #[test]
    fn byte_by_byte_equals_all_at_once(format in format(), input in structured_input()) {
        prop_assert_eq!(
            parse_in_chunks(format, &input, &[usize::MAX]),
            parse_in_chunks(format, &input, &[1])
        );
    }

    #[test]
    fn no_reason_contains_the_code(
        code in "[A-Z0-9]{6,24}",
        case in 0usize..REASON_CASES,
    ) {
        check_no_reason_contains(&code, case)?;
    }
}

/// Codes made only of digits read as numbers and times, so every case must
/// still be a rejection for them; the generator above rarely makes one.
#[test]
fn no_reason_contains_an_all_digit_code() {
    for code in ["000001", "999999999999999999999999", "1700000000"] {
        for case in 0..REASON_CASES {
            if let Err(e) = check_no_reason_contains(code, case) {
                panic!("code {code}, case {case}: {e}");
            }
        }
    }
}

const REASON_CASES: usize = 12;

/// One upload per case, each with the code placed where a reason might quote it.
fn check_no_reason_contains(code: &str, case: usize) -> Result<(), TestCaseError> {
    let (format, input) = match case {
        0 => (
            UploadFormat::Csv,
            format!("code,expires_at\n{code},x{code}\n"),
        ),
        // Prefixed: an all-digit code such as 000001 would be a valid count.
        1 => (
            UploadFormat::Csv,
            format!("code,max_uses\n{code},x{code}\n"),
        ),
        2 => (UploadFormat::Csv, format!("{code}\n{code}\n")),
        3 => (UploadFormat::Csv, format!("code\n\"{code}\n")),
        4 => (UploadFormat::Csv, format!("code\n{code}\0\n")),
        5 => (UploadFormat::Ndjson, format!("{{\"code\":\"{code}\"\n")),
        6 => (
            UploadFormat::Ndjson,
            format!("{{\"code\":\"{code}\",\"max_uses\":\"{code}\"}}\n"),
        ),
        // Prefixed, as in case 0: an all-digit code would be a valid unix time.
        7 => (
            UploadFormat::Ndjson,
            format!("{{\"code\":\"{code}\",\"expires_at\":\"x{code}\"}}\n"),
        ),
        8 => (UploadFormat::Ndjson, format!("[\"{code}\"]\n")),
        9 => (
            UploadFormat::Ndjson,
            format!("{{\"code\":\"{code}\"}} {code}\n"),
        ),
        10 => (UploadFormat::Ndjson, format!("{{\"{code}\":{code}x}}\n")),
        _ => (
            UploadFormat::Lines,
            format!("{code}{}\n", "x".repeat(MAX_ROW_BYTES)),
        ),
    };
    let out = parse(format, input.as_bytes());
    let found = reasons(&out);
    prop_assert!(!found.is_empty(), "{:?}", out);
    for (_, reason) in found {
        prop_assert!(!reason.contains(code), "{}", reason);
    }
    Ok(())
}

fn line_of(parsed: &Parsed) -> u64 {
    match parsed {
        Parsed::Row(row) => row.line,
        Parsed::Rejected { line, .. } => *line,
    }
}
