//! The typed columns of a row: `expires_at` (an RFC 3339 time or unix seconds) and
//! `max_uses` (a positive integer), each empty for none.

use std::borrow::Cow;

use jiff::civil::{self, DateTime};
use jiff::fmt::temporal::Pieces;
use jiff::tz::Offset;

/// 9999-12-31T23:59:59Z: the last second RFC 3339 can write. Larger unix times are almost
/// always milliseconds sent as seconds, so they are refused rather than read as year 50000.
const MAX_UNIX_SECONDS: u64 = 253_402_300_799;

/// Where unix time starts, as a civil time.
const EPOCH: DateTime = civil::datetime(1970, 1, 1, 0, 0, 0, 0);

/// Longest time read, in bytes: far more than any supplier writes.
const MAX_TIME_BYTES: usize = 64;

/// Digits of a fraction of a second jiff reads (nanoseconds); only milliseconds are kept.
const MAX_FRACTION_DIGITS: usize = 9;

/// `YYYY-MM-DDThh:mm:ss`: `d` stands for any digit, `T` for the separator.
const DATE_TIME_SHAPE: &[u8; 19] = b"dddd-dd-ddTdd:dd:dd";

/// A field value that is neither empty nor valid.
pub(super) struct Invalid;

/// `expires_at`: empty for none, integer unix seconds, or an RFC 3339 time (see
/// [`parse_rfc3339`]); in milliseconds since the epoch.
pub(super) fn parse_expiry(text: &str) -> Result<Option<u64>, Invalid> {
    let text = text.trim();
    if text.is_empty() {
        Ok(None)
    } else if text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().map_err(|_| Invalid).and_then(seconds_to_ms)
    } else {
        parse_rfc3339(text).map(Some).ok_or(Invalid)
    }
}

pub(super) fn seconds_to_ms(seconds: u64) -> Result<Option<u64>, Invalid> {
    if seconds > MAX_UNIX_SECONDS {
        return Err(Invalid);
    }
    Ok(Some(seconds * 1000))
}

/// `max_uses`: empty for none, else a positive integer in ASCII digits.
pub(super) fn parse_max_uses(text: &str) -> Result<Option<u64>, Invalid> {
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
/// it: `T`, `t` or a space between date and time, any fraction of a second (digits past the
/// ninth are ignored), a leap second `:60` read as `:59`, and `Z`, `z`, a `±hh:mm` offset or
/// nothing (UTC). The date as written must be in 1970 or later.
///
/// jiff parses it; `rfc3339_profile` first holds the text to that profile, because jiff
/// reads a wider grammar (`2030-01-31T23:59Z`, `+08`, `20300131T235959Z`, annotations, …)
/// that the importer never took.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let text = rfc3339_profile(text)?;
    let pieces = Pieces::parse(text.as_ref()).ok()?;
    let date = pieces.date();
    if date.year() < 1970 {
        return None;
    }
    let offset = pieces.to_numeric_offset().unwrap_or(Offset::UTC);
    // RFC 3339 offsets stop at ±23:59; jiff reads up to ±25:59.
    if offset.seconds().unsigned_abs() >= 24 * 3600 {
        return None;
    }
    // Civil arithmetic, not jiff's Timestamp: that range ends a day before year 10000 (so
    // every timestamp has a date at every offset), and RFC 3339 reaches 9999-12-31.
    let written = date.to_datetime(pieces.time()?);
    let ms = written.duration_since(EPOCH).as_millis() - i128::from(offset.seconds()) * 1000;
    let ms = u64::try_from(ms).ok()?;
    (ms / 1000 <= MAX_UNIX_SECONDS).then_some(ms)
}

/// `text` if it has the shape [`parse_rfc3339`] reads (`YYYY-MM-DD`, `T`, `t` or a space,
/// `hh:mm:ss`, an optional `.` and digits, an optional `Z`, `z` or `±hh:mm`), its fraction
/// cut to the nine digits jiff reads. Ranges (month 13, hour 24, …) are jiff's to check.
fn rfc3339_profile(text: &str) -> Option<Cow<'_, str>> {
    let bytes = text.as_bytes();
    if bytes.len() > MAX_TIME_BYTES {
        return None;
    }
    let (head, rest) = bytes.split_at_checked(DATE_TIME_SHAPE.len())?;
    let head_ok = head.iter().zip(DATE_TIME_SHAPE).all(|(&b, &s)| match s {
        b'd' => b.is_ascii_digit(),
        b'T' => matches!(b, b'T' | b't' | b' '),
        _ => b == s,
    });
    let (fraction, offset) = match rest {
        [b'.', tail @ ..] => {
            let digits = tail.iter().take_while(|b| b.is_ascii_digit()).count();
            (Some(digits), tail.get(digits..)?)
        }
        _ => (None, rest),
    };
    let offset_ok = match offset {
        [] | [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|b| b.is_ascii_digit()),
        _ => false,
    };
    if !head_ok || !offset_ok || fraction == Some(0) {
        return None;
    }
    match fraction {
        Some(digits) if digits > MAX_FRACTION_DIGITS => {
            // Only ASCII digits are dropped, so both ends are char boundaries.
            let cut = DATE_TIME_SHAPE.len() + 1 + MAX_FRACTION_DIGITS;
            let resume = DATE_TIME_SHAPE.len() + 1 + digits;
            Some(Cow::Owned([text.get(..cut)?, text.get(resume..)?].concat()))
        }
        _ => Some(Cow::Borrowed(text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
    fn rfc3339_offsets_fractions_and_edges() {
        let base = 1_896_134_399_000; // 2030-01-31T23:59:59Z
        for (text, ms) in [
            ("2030-02-01 07:59:59+08:00", base),
            ("2030-02-01T07:59:59.125+08:00", base + 125),
            ("2030-01-31T23:59:59-00:00", base),
            ("2030-02-01T23:58:59+23:59", base),
            ("2030-01-31T00:00:00-23:59", base - 59_000),
            ("2030-01-31T23:59:59.9Z", base + 900),
            // Milliseconds are kept, later digits ignored, however many.
            ("2030-01-31T23:59:59.123999999Z", base + 123),
            ("2030-01-31T23:59:59.1239999999999Z", base + 123),
            ("2030-01-31T23:59:60Z", base),
            ("2030-01-31T23:59:60.5+00:00", base + 500),
            ("1970-01-01T00:00:00Z", 0),
            ("1970-01-01T08:00:00+08:00", 0),
            ("9999-12-31T23:59:59.999Z", 253_402_300_799_999),
            ("9999-12-31T23:59:59+23:59", 253_402_214_459_000),
        ] {
            assert_eq!(parse_rfc3339(text), Some(ms), "{text}");
        }
        for text in [
            "2030-01-31T23:59Z",
            "2030-01-31T23Z",
            "20300131T235959Z",
            "2030-01-31T23:59:59+08",
            "2030-01-31T23:59:59+0800",
            "2030-01-31T23:59:59+08:00:00",
            "2030-01-31T23:59:59+08:60",
            "2030-01-31T23:59:59+25:00",
            "2030-01-31T23:59:59,5Z",
            "2030-01-31T23:59:59Z[UTC]",
            "2030-01-31T23:59:59.5.Z",
            "+002030-01-31T23:59:59Z",
            "2030-1-31T23:59:59Z",
            "2030-01-31T23:59:59 Z",
            "2030-01-31T23:59:59+08:00 ",
            "2030-01-31\t23:59:59Z",
            // The written date counts, not the instant: 1970-01-01T00:30:00Z written west.
            "1969-12-31T23:30:00-01:00",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59-00:01",
        ] {
            assert_eq!(parse_rfc3339(text), None, "{text}");
        }
        let long = format!("2030-01-31T23:59:59.{}Z", "1".repeat(64));
        assert_eq!(parse_rfc3339(&long), None, "longer than any time written");
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

    proptest! {
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
