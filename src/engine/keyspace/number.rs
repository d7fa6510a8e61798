//! Numbers as Redis reads and writes them: integer and score arguments, and doubles printed
//! with C's `%.17g`.

use bytes::Bytes;

/// Redis's `string2ll`: optional `-`, no `+`, no leading zeros, no spaces, within i64.
pub(super) fn parse_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if !matches!(digits.first(), Some(b'1'..=b'9')) {
        return None;
    }
    let mut value: u64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    if negative {
        0i64.checked_sub_unsigned(value)
    } else {
        i64::try_from(value).ok()
    }
}

/// A score argument: decimal or exponent notation, `inf`, `+inf`, `-inf`; never NaN.
pub(super) fn parse_f64(s: &[u8]) -> Option<f64> {
    let v: f64 = std::str::from_utf8(s).ok()?.parse().ok()?;
    (!v.is_nan()).then_some(v)
}

/// Formats a score like Redis 7.0's `addReplyDouble`: `inf`/`-inf`, otherwise C's `%.17g`
/// (`1`, `1.5`, `1e+20`, `0.10000000000000001`). Redis 7.2+ prints the shortest round-trip
/// form instead; the two agree on every integral score, which is all the scripts store.
pub(super) fn format_score(v: f64) -> Bytes {
    if v.is_infinite() {
        return Bytes::from_static(if v > 0.0 { b"inf" } else { b"-inf" });
    }
    Bytes::from(format_g17(v))
}

/// C's `printf("%.17g", v)`, which Redis uses for doubles it turns into strings: score
/// replies, and Lua numbers passed to `redis.call`.
pub(crate) fn format_g17(v: f64) -> String {
    if v.is_nan() {
        return if v.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf" } else { "-inf" }.into();
    }
    // Integral values below 1e17 have at most 17 digits: %.17g prints them exactly. This is
    // the common case (ids, counts, millisecond times) and avoids float formatting.
    if v == v.trunc() && v.abs() < 1e17 {
        if v == 0.0 && v.is_sign_negative() {
            return "-0".into();
        }
        return (v as i64).to_string();
    }
    // %g: with X the exponent of the value rounded to 17 significant digits, fixed notation
    // with 16 - X decimals when -4 <= X < 17, else scientific; trailing zeros removed.
    let sci = format!("{v:.16e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..17).contains(&exp) {
        let decimals = usize::try_from(16 - exp).unwrap_or(0);
        trim_fraction(&format!("{v:.decimals$}")).to_string()
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!(
            "{}e{sign}{:02}",
            trim_fraction(mantissa),
            exp.unsigned_abs()
        )
    }
}

/// Drops trailing zeros of a decimal fraction, and the point if nothing is left after it.
fn trim_fraction(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_parsing_matches_redis() {
        for (s, v) in [
            ("0", Some(0)),
            ("-1", Some(-1)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("-0", None),
            ("+1", None),
            ("01", None),
            (" 1", None),
            ("1 ", None),
            ("", None),
            ("-", None),
            ("1.0", None),
        ] {
            assert_eq!(parse_i64(s.as_bytes()), v, "{s:?}");
        }
    }

    #[test]
    fn double_formatting_matches_redis() {
        for (v, s) in [
            (1.0, "1"),
            (-3.0, "-3"),
            (0.0, "0"),
            (-0.0, "-0"),
            (1.5, "1.5"),
            (0.25, "0.25"),
            (0.1, "0.10000000000000001"),
            (10.0 / 3.0, "3.3333333333333335"),
            (1_700_000_000_000.0, "1700000000000"),
            (1e16, "10000000000000000"),
            (1e17, "1e+17"),
            (1e20, "1e+20"),
            (-2.5e-7, "-2.4999999999999999e-07"),
            (0.0001, "0.0001"),
            (0.00001, "1.0000000000000001e-05"),
            (123456.789, "123456.789"),
            (f64::NAN, "nan"),
        ] {
            assert_eq!(format_g17(v), s, "{v}");
        }
        assert_eq!(format_score(f64::INFINITY), Bytes::from("inf"));
        assert_eq!(format_score(f64::NEG_INFINITY), Bytes::from("-inf"));
        assert_eq!(format_score(2.0), Bytes::from("2"));
    }
}
