//! The typed columns of a row: `expires_at` (an RFC 3339 time or unix seconds) and
//! `max_uses` (a positive integer), each empty for none.

use std::time::UNIX_EPOCH;

/// 9999-12-31T23:59:59Z: the last second RFC 3339 can write. Larger unix times are almost
/// always milliseconds sent as seconds, so they are refused rather than read as year 50000.
const MAX_UNIX_SECONDS: u64 = 253_402_300_799;

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
