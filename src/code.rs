//! Per-SKU card-code formats: normalisation, validation, check characters, generation and the
//! digest used as a storage key.
//!
//! # Why this module exists
//!
//! A card code is a bearer secret typed (or pasted) by a human. The same code arrives as
//! `abcd-efgh`, ` ABCD EFGH `, or with an `O` where a `0` was printed, so every code passes
//! through one deterministic [`Format::normalise`] before anything else happens; the result
//! (the *canonical* code) is what gets stored, compared and [`digest`]ed. Because the
//! canonical form feeds the digest that keys the store, normalisation must be stable:
//! it is idempotent, ASCII-only in its case mapping, and versioned ([`Format::version`]) so a
//! future rule change cannot silently re-key existing inventory.
//!
//! Validation exists to give a typo a *useful* answer ("character 5, not counting spaces and dashes, is not allowed: expected
//! one of 0-9, A-Z except I L O U") before the code ever reaches the store, and to bound what
//! is hashed and looked up. Its hints ([`Malformed`]'s `Display`) name a *position* and the
//! *expectation*, never the offending character or the code: hints end up in HTTP responses
//! and logs, and a code is a secret.
//!
//! A SKU that knows its supplier's format can declare it: a stricter charset, a length
//! range, display grouping, case sensitivity, and an optional Luhn mod N check character
//! that catches every single-character typo without a round trip to the store.
//!
//! Everything here is pure (no I/O, no async) and total: no input string makes it panic.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The longest code any format accepts, in characters (after normalisation).
pub const MAX_CODE_LENGTH: usize = 256;

/// The charset of the `default` preset: what merchants import from suppliers (ASCII letters,
/// digits and `_`, upper-cased; `-` and spaces are dropped by normalisation).
pub const DEFAULT_CHARSET: &str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_";

/// The charset of the `crockford32` preset: Crockford's base 32, which leaves out the
/// look-alikes `I`, `L`, `O` and `U`.
pub const CROCKFORD32_CHARSET: &str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// The only value of [`Format::version`] this build understands.
pub const FORMAT_VERSION: u32 = 1;

/// Length of codes produced by [`Format::generate`] when `max_length` exceeds
/// [`GENERATED_LENGTH_CAP`].
const GENERATED_DEFAULT_LENGTH: usize = 16;

/// Above this `max_length`, [`Format::generate`] does not generate `max_length` characters.
const GENERATED_LENGTH_CAP: usize = 64;

/// Domain-separation prefix of [`digest`].
const DIGEST_PREFIX: &[u8] = b"kamigate/code/v1\0";

/// Look-alike pairs `(source, target)` applied by normalisation when `target` is in the
/// charset and `source` is not.
const LOOKALIKES: [(char, char); 3] = [('O', '0'), ('I', '1'), ('L', '1')];

/// A named starting point for a [`Format`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Anything suppliers commonly issue: [`DEFAULT_CHARSET`], 1 to 256 characters,
    /// case-insensitive. A custom `charset` may replace the default one.
    #[default]
    Default,
    /// Crockford's base 32 ([`CROCKFORD32_CHARSET`]), case-insensitive, with `O`→`0` and
    /// `I`/`L`→`1` mapped on input. The charset and case rules are fixed by the preset.
    Crockford32,
}

/// The check character scheme of a [`Format`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    /// No check character.
    #[default]
    None,
    /// A Luhn mod N check character, N being the charset size, appended as the last
    /// character (and counted by the length limits).
    ///
    /// For an even N this is exactly the Luhn mod N algorithm (with the charset `0-9` it is
    /// the credit-card Luhn check), which catches every single-character substitution and
    /// every adjacent transposition except of the first and last charset symbols. For an odd
    /// N, Luhn's "sum the digits of the doubled value" step is not a bijection (it would miss
    /// some substitutions), so doubled values are reduced modulo N instead; that variant
    /// catches every single-character substitution and every adjacent transposition.
    Luhn,
}

/// A per-SKU code format (the `"format"` object of `PUT /v1/skus/{sku}`).
///
/// JSON shape, every field optional (defaults shown):
///
/// ```json
/// {"preset": "default", "min_length": 1, "max_length": 256, "group_size": 0,
///  "case_sensitive": false, "check": "none", "version": 1}
/// ```
///
/// plus an optional `"charset"` (absent means "the preset's charset"; it is an `Option` so
/// that `{"preset": "crockford32"}` alone is enough). Unknown fields are rejected.
///
/// A format read from outside must pass [`Format::validate_spec`] before use. The other
/// methods never panic on any format, but their results for a format that fails
/// `validate_spec` are unspecified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Format {
    /// The preset this format starts from.
    pub preset: Preset,
    /// The allowed symbols of a canonical code, in check-character order; `None` means the
    /// preset's charset. Printable ASCII only, no space, no `-`, no duplicates, at least two
    /// symbols; upper-case letters only unless `case_sensitive`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub charset: Option<String>,
    /// Fewest characters of a canonical code (check character included).
    pub min_length: usize,
    /// Most characters of a canonical code (check character included), at most
    /// [`MAX_CODE_LENGTH`].
    pub max_length: usize,
    /// Display grouping: [`Format::generate`] puts a `-` between groups of this many
    /// characters. `0` means no grouping. Input is accepted grouped or not either way.
    pub group_size: usize,
    /// When `false` (the default) input is upper-cased (ASCII only) before checking.
    pub case_sensitive: bool,
    /// The check character scheme.
    pub check: Check,
    /// Version of the normalisation and validation rules. Canonical codes (and so stored
    /// digests) depend on these rules, so a rule change gets a new version instead of
    /// silently re-keying existing inventory. Only [`FORMAT_VERSION`] is accepted.
    pub version: u32,
}

impl Default for Format {
    /// The `default` preset: [`DEFAULT_CHARSET`], 1 to 256 characters, case-insensitive, no
    /// grouping, no check character.
    fn default() -> Format {
        Format {
            preset: Preset::Default,
            charset: None,
            min_length: 1,
            max_length: MAX_CODE_LENGTH,
            group_size: 0,
            case_sensitive: false,
            check: Check::None,
            version: FORMAT_VERSION,
        }
    }
}

/// Why a code was rejected. `Display` is the hint shown to the user: it names a position
/// (1-based, in the normalised code, counted in characters) and what was expected, never the
/// offending character or the code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Nothing left after normalisation.
    #[error("code is empty")]
    Empty,
    /// Fewer characters than the format's minimum.
    #[error("code has {}: at least {min} required", characters(.got))]
    TooShort {
        /// The minimum length.
        min: usize,
        /// The normalised code's length.
        got: usize,
    },
    /// More characters than the format's maximum.
    #[error("code has {}: at most {max} allowed", characters(.got))]
    TooLong {
        /// The maximum length.
        max: usize,
        /// The normalised code's length.
        got: usize,
    },
    /// The first character outside the charset.
    #[error("character {position}, not counting spaces and dashes, is not allowed: expected one of {expected}")]
    BadCharacter {
        /// 1-based position in the normalised code.
        position: usize,
        /// A compact description of the charset, such as `0-9, A-Z except I L O U`.
        expected: String,
    },
    /// The check character does not match the rest of the code.
    #[error("check character at position {position} does not match: the code has a typo")]
    CheckMismatch {
        /// 1-based position of the check character (the last one).
        position: usize,
    },
}

/// `"1 character"`, `"3 characters"`.
fn characters(n: &usize) -> String {
    if *n == 1 {
        "1 character".to_owned()
    } else {
        format!("{n} characters")
    }
}

/// Digest of a canonical code: lowercase hex of SHA-256 over `b"kamigate/code/v1\0"` followed
/// by the code. Used as the lookup key so codes never appear in key names.
pub fn digest(canonical: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(DIGEST_PREFIX);
    hasher.update(canonical.as_bytes());
    hex::encode(hasher.finalize())
}

/// The effective charset as a lookup table over ASCII, deduplicated in charset order.
struct Symbols {
    /// Symbols in charset order (first occurrence wins).
    list: [u8; 128],
    /// How many entries of `list` are used.
    len: usize,
    /// Index into `list` per ASCII byte; `ABSENT` when not in the charset.
    index: [u8; 128],
}

/// Marks a byte outside the charset in [`Symbols::index`].
const ABSENT: u8 = u8::MAX;

impl Symbols {
    fn new(charset: &str) -> Symbols {
        let mut symbols = Symbols {
            list: [0; 128],
            len: 0,
            index: [ABSENT; 128],
        };
        for b in charset.bytes() {
            // Non-ASCII and duplicate symbols are spec errors; they are skipped so that an
            // invalid spec still behaves deterministically. At most 128 distinct ASCII bytes
            // exist, so `len` stays below `ABSENT`.
            if let Some(slot) = symbols.index.get_mut(usize::from(b)) {
                if *slot == ABSENT {
                    *slot = symbols.len as u8;
                    symbols.list[symbols.len] = b;
                    symbols.len += 1;
                }
            }
        }
        symbols
    }

    /// The charset index of `c`, if it is in the charset.
    fn index_of(&self, c: char) -> Option<usize> {
        let code = usize::try_from(u32::from(c)).ok()?;
        match self.index.get(code) {
            Some(&i) if i != ABSENT => Some(usize::from(i)),
            _ => None,
        }
    }

    fn contains(&self, c: char) -> bool {
        self.index_of(c).is_some()
    }

    fn symbols(&self) -> &[u8] {
        &self.list[..self.len]
    }
}

/// One term of the Luhn mod N sum: `index` as is, or "doubled" (see [`Check::Luhn`]).
fn luhn_term(index: usize, doubled: bool, n: usize) -> usize {
    if !doubled || n == 0 {
        index
    } else if n % 2 == 1 {
        // Odd N: doubling modulo N is a bijection; Luhn's digit sum would not be.
        (2 * index) % n
    } else {
        let twice = 2 * index;
        twice / n + twice % n
    }
}

/// The Luhn mod N sum (modulo `n`, which must be non-zero) of `indices` taken right to left,
/// doubling every other term starting with the rightmost one when `rightmost_doubled`.
fn luhn_sum(indices: &[usize], rightmost_doubled: bool, n: usize) -> usize {
    let mut doubled = rightmost_doubled;
    let mut sum = 0;
    for &index in indices.iter().rev() {
        sum = (sum + luhn_term(index, doubled, n)) % n;
        doubled = !doubled;
    }
    sum
}

/// The check symbol index for `payload` (charset indices, in code order).
fn luhn_check_index(payload: &[usize], n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    // The rightmost payload symbol is doubled: the check symbol will sit to its right.
    (n - luhn_sum(payload, true, n)) % n
}

/// Whether `code` (charset indices, check symbol last) has a consistent check symbol.
fn luhn_is_valid(code: &[usize], n: usize) -> bool {
    n != 0 && luhn_sum(code, false, n) == 0
}

/// A compact human description of a charset, such as `0-9, A-Z except I L O U`.
fn describe_charset(symbols: &Symbols) -> String {
    let present = |b: u8| {
        symbols
            .index
            .get(usize::from(b))
            .is_some_and(|&i| i != ABSENT)
    };

    let punctuation: Vec<u8> = (0x21u8..=0x7e)
        .filter(|b| !b.is_ascii_alphanumeric() && present(*b))
        .collect();
    // Every printable ASCII symbol a charset may hold: 10 + 26 + 26 + 31 (no space, no '-').
    if symbols.len == 93 && punctuation.len() == 31 {
        return "printable ASCII except space and -".to_owned();
    }

    let mut parts: Vec<String> = Vec::new();
    for (lo, hi) in [(b'0', b'9'), (b'A', b'Z'), (b'a', b'z')] {
        let members: Vec<u8> = (lo..=hi).filter(|b| present(*b)).collect();
        if members.is_empty() {
            continue;
        }
        let runs = runs(&members);
        let missing: Vec<u8> = (lo..=hi).filter(|b| !present(*b)).collect();
        if let [run] = runs.as_slice() {
            parts.push(describe_run(*run));
        } else if missing.len() <= 4 {
            let mut part = format!("{}-{} except", char::from(lo), char::from(hi));
            for b in missing {
                part.push(' ');
                part.push(char::from(b));
            }
            parts.push(part);
        } else {
            parts.extend(runs.into_iter().map(describe_run));
        }
    }
    if punctuation.len() > 12 {
        parts.push(format!("{} punctuation symbols", punctuation.len()));
    } else {
        parts.extend(punctuation.into_iter().map(|b| match b {
            b',' => "comma".to_owned(),
            _ => char::from(b).to_string(),
        }));
    }
    if parts.is_empty() {
        "nothing (the format has no usable charset)".to_owned()
    } else {
        parts.join(", ")
    }
}

/// Maximal runs of consecutive bytes in sorted `members`, as `(first, last)`.
fn runs(members: &[u8]) -> Vec<(u8, u8)> {
    let mut runs: Vec<(u8, u8)> = Vec::new();
    for &b in members {
        match runs.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(b) => *last = b,
            _ => runs.push((b, b)),
        }
    }
    runs
}

/// `A-F` for runs of three or more, `A, B` for shorter ones.
fn describe_run((first, last): (u8, u8)) -> String {
    let (first, last) = (char::from(first), char::from(last));
    match u32::from(last).saturating_sub(u32::from(first)) {
        0 => first.to_string(),
        1 => format!("{first}, {last}"),
        _ => format!("{first}-{last}"),
    }
}

impl Format {
    /// A Crockford base 32 format with codes of exactly `length` characters (check character
    /// included when `check`), displayed in groups of `group_size` (`0`: no grouping).
    ///
    /// `length` must be 1 to 256 (2 to 256 with `check`) for the format to pass
    /// [`Format::validate_spec`].
    pub fn crockford32(length: usize, group_size: usize, check: bool) -> Format {
        Format {
            preset: Preset::Crockford32,
            charset: None,
            min_length: length,
            max_length: length,
            group_size,
            case_sensitive: false,
            check: if check { Check::Luhn } else { Check::None },
            version: FORMAT_VERSION,
        }
    }

    /// The charset in effect: [`Format::charset`] if given, otherwise the preset's.
    pub fn effective_charset(&self) -> &str {
        match (&self.charset, self.preset) {
            (Some(charset), _) => charset,
            (None, Preset::Default) => DEFAULT_CHARSET,
            (None, Preset::Crockford32) => CROCKFORD32_CHARSET,
        }
    }

    /// Checks that a format spec is usable; `Err(message)` is suitable for a 400 response.
    ///
    /// Rules: version is [`FORMAT_VERSION`]; the charset has at least two symbols, all
    /// printable ASCII other than space and `-`, without duplicates, and no lower-case
    /// letters unless `case_sensitive`; `1 <= min_length <= max_length <= 256`; `group_size`
    /// is 0 or at most `max_length`; a check character needs `max_length >= 2`; the
    /// `crockford32` preset allows no other charset and no case sensitivity.
    pub fn validate_spec(&self) -> Result<(), String> {
        if self.version != FORMAT_VERSION {
            return Err(format!(
                "unsupported format version {}: only version {FORMAT_VERSION} is supported",
                self.version
            ));
        }
        if self.preset == Preset::Crockford32 {
            if self
                .charset
                .as_deref()
                .is_some_and(|c| c != CROCKFORD32_CHARSET)
            {
                return Err(
                    "preset \"crockford32\" fixes the charset: omit \"charset\" or use \
                            preset \"default\" with a custom charset"
                        .to_owned(),
                );
            }
            if self.case_sensitive {
                return Err(
                    "preset \"crockford32\" is case-insensitive: \"case_sensitive\" \
                            must be false"
                        .to_owned(),
                );
            }
        }

        let charset = self.effective_charset();
        if charset.is_empty() {
            return Err("charset must not be empty".to_owned());
        }
        let mut seen = [false; 128];
        for (i, c) in charset.chars().enumerate() {
            let position = i + 1;
            if !c.is_ascii_graphic() || c == '-' {
                return Err(format!(
                    "charset character {position} is not allowed: only printable ASCII other \
                     than space and '-' may be used"
                ));
            }
            if c.is_ascii_lowercase() && !self.case_sensitive {
                return Err(format!(
                    "charset character {position} ({c:?}) is lower-case but the format is \
                     case-insensitive (codes are upper-cased before checking): use upper-case \
                     letters or set \"case_sensitive\": true"
                ));
            }
            // `c` is ASCII here, so the index is in bounds.
            if let Some(slot) = seen.get_mut(c as usize) {
                if *slot {
                    return Err(format!(
                        "charset character {position} ({c:?}) is a duplicate: each symbol may \
                         appear once"
                    ));
                }
                *slot = true;
            }
        }
        if charset.len() < 2 {
            return Err("charset needs at least 2 symbols".to_owned());
        }

        if self.min_length < 1 {
            return Err("min_length must be at least 1".to_owned());
        }
        if self.max_length > MAX_CODE_LENGTH {
            return Err(format!("max_length must be at most {MAX_CODE_LENGTH}"));
        }
        if self.min_length > self.max_length {
            return Err(format!(
                "min_length ({}) must not exceed max_length ({})",
                self.min_length, self.max_length
            ));
        }
        if self.group_size > self.max_length {
            return Err(format!(
                "group_size must be 0 (no grouping) or at most max_length ({})",
                self.max_length
            ));
        }
        if self.check == Check::Luhn && self.max_length < 2 {
            return Err(
                "check \"luhn\" needs max_length of at least 2 (the check character \
                        is part of the code)"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// Normalisation only: trim (Unicode whitespace), drop every space and `-`, upper-case
    /// ASCII letters unless `case_sensitive`, then map look-alikes (`O`→`0`, `I`→`1`,
    /// `L`→`1`) where the target is in the charset and the source is not.
    ///
    /// Non-ASCII characters are left in place for [`Format::validate`] to reject. The result
    /// never starts or ends with whitespace and is a fixed point: normalising it again
    /// returns it unchanged.
    pub fn normalise(&self, raw: &str) -> String {
        self.normalise_with(&Symbols::new(self.effective_charset()), raw)
    }

    fn normalise_with(&self, symbols: &Symbols, raw: &str) -> String {
        let mut mapping: Vec<(char, char)> = Vec::new();
        for (source, target) in LOOKALIKES {
            if symbols.contains(target) && !symbols.contains(source) {
                mapping.push((source, target));
            }
        }

        let mut out = String::with_capacity(raw.len());
        for c in raw.chars() {
            if c == ' ' || c == '-' {
                continue;
            }
            let c = if self.case_sensitive {
                c
            } else {
                c.to_ascii_uppercase()
            };
            let c = mapping
                .iter()
                .find(|(source, _)| *source == c)
                .map_or(c, |&(_, target)| target);
            out.push(c);
        }
        // Trimming after dropping spaces and dashes (rather than only before) keeps the
        // result a fixed point: "- \tX" must not leave a tab that a second pass would trim.
        // Dropping, case mapping and look-alike mapping never create or remove whitespace,
        // so this is the same as trimming first.
        let trimmed = out.trim();
        if trimmed.len() == out.len() {
            out
        } else {
            trimmed.to_owned()
        }
    }

    /// Normalises then validates `raw`. `Ok` holds the canonical code (what is stored and
    /// [`digest`]ed).
    ///
    /// Checks, in order: empty → [`Malformed::Empty`]; too long → [`Malformed::TooLong`]
    /// (before scanning characters); the first character outside the charset →
    /// [`Malformed::BadCharacter`]; too short → [`Malformed::TooShort`] (with a check
    /// character the minimum is at least 2); a wrong check character →
    /// [`Malformed::CheckMismatch`].
    pub fn validate(&self, raw: &str) -> Result<String, Malformed> {
        let symbols = Symbols::new(self.effective_charset());
        let canonical = self.normalise_with(&symbols, raw);
        if canonical.is_empty() {
            return Err(Malformed::Empty);
        }
        let length = canonical.chars().count();
        if length > self.max_length {
            return Err(Malformed::TooLong {
                max: self.max_length,
                got: length,
            });
        }

        let mut indices = Vec::with_capacity(length);
        for (i, c) in canonical.chars().enumerate() {
            match symbols.index_of(c) {
                Some(index) => indices.push(index),
                None => {
                    return Err(Malformed::BadCharacter {
                        position: i + 1,
                        expected: describe_charset(&symbols),
                    })
                }
            }
        }

        let min = match self.check {
            Check::None => self.min_length,
            Check::Luhn => self.min_length.max(2),
        };
        if length < min {
            return Err(Malformed::TooShort { min, got: length });
        }
        if self.check == Check::Luhn && !luhn_is_valid(&indices, symbols.len) {
            return Err(Malformed::CheckMismatch { position: length });
        }
        Ok(canonical)
    }

    /// A uniformly random valid code, in display form: grouped with `-` every `group_size`
    /// characters when `group_size > 0`.
    ///
    /// Length: `max_length` when it is at most 64, otherwise `max(16, min_length)` (a
    /// 256-character code is valid but nobody wants to type one). With a check character,
    /// the last character is the check character and the others are random. Every result
    /// passes [`Format::validate`] for a format that passes [`Format::validate_spec`]; for
    /// one that does not, the result is unspecified (possibly empty).
    pub fn generate<R: rand::Rng + ?Sized>(&self, rng: &mut R) -> String {
        let symbols = Symbols::new(self.effective_charset());
        let alphabet = symbols.symbols();
        if alphabet.is_empty() {
            return String::new();
        }
        let length = if self.max_length <= GENERATED_LENGTH_CAP {
            self.max_length
        } else {
            GENERATED_DEFAULT_LENGTH.max(self.min_length)
        };
        let payload_length = match self.check {
            Check::None => length,
            Check::Luhn => length.saturating_sub(1),
        };

        let mut indices: Vec<usize> = (0..payload_length)
            .map(|_| rng.random_range(0..alphabet.len()))
            .collect();
        if self.check == Check::Luhn && length > 0 {
            indices.push(luhn_check_index(&indices, alphabet.len()));
        }

        // `chunks` needs a non-zero size; no grouping is one group of everything.
        let group_size = match self.group_size {
            0 => indices.len().max(1),
            size => size,
        };
        let mut code = String::with_capacity(length + length / group_size);
        for (g, group) in indices.chunks(group_size).enumerate() {
            if g > 0 {
                code.push('-');
            }
            // Indices come from `0..alphabet.len()` or `luhn_check_index` (always below it).
            code.extend(
                group
                    .iter()
                    .filter_map(|&i| alphabet.get(i))
                    .map(|&b| char::from(b)),
            );
        }
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const HOSTILE: &[&str] = &[
        "'; DROP TABLE keys; --",
        "\0",
        "ABCD\0EFGH",
        "ABC\u{202E}DEF",
        "\u{202E}ABCDEFGH",
        "AB🎁CD",
        "🎁🎁🎁🎁",
        "\u{FEFF}ABCD",
        "ＡＢＣＤ",
        "<script>alert(1)</script>",
        "%00%0a",
        "ABCD\r\nEFGH",
        "ß",
    ];

    fn crockford_checked() -> Format {
        Format::crockford32(16, 4, true)
    }

    fn decimal_luhn() -> Format {
        Format {
            charset: Some("0123456789".to_owned()),
            check: Check::Luhn,
            ..Format::default()
        }
    }

    fn case_sensitive_odd() -> Format {
        // 0-9, a-z, A-Z minus 'O', plus '_' and '.' = 63 symbols: odd N for Luhn.
        let mut charset: String = ('0'..='9').chain('a'..='z').collect();
        charset.extend(('A'..='Z').filter(|&c| c != 'O'));
        charset.push_str("_.");
        Format {
            charset: Some(charset),
            min_length: 8,
            max_length: 20,
            group_size: 5,
            case_sensitive: true,
            check: Check::Luhn,
            ..Format::default()
        }
    }

    fn formats() -> Vec<Format> {
        vec![
            Format::default(),
            crockford_checked(),
            Format::crockford32(10, 0, false),
            Format::crockford32(2, 1, true),
            decimal_luhn(),
            Format {
                check: Check::Luhn,
                group_size: 4,
                ..Format::default()
            },
            case_sensitive_odd(),
            Format {
                charset: Some("AB".to_owned()),
                min_length: 100,
                max_length: 200,
                check: Check::Luhn,
                ..Format::default()
            },
        ]
    }

    fn checked_formats() -> Vec<Format> {
        formats()
            .into_iter()
            .filter(|f| f.check == Check::Luhn)
            .collect()
    }

    #[test]
    fn all_test_formats_are_valid_specs() {
        for format in formats() {
            assert_eq!(format.validate_spec(), Ok(()), "{format:?}");
        }
    }

    // ---- serde ----

    #[test]
    fn empty_json_is_the_default_preset() {
        let format: Format = serde_json::from_str("{}").unwrap();
        assert_eq!(format, Format::default());
        assert_eq!(format.effective_charset(), DEFAULT_CHARSET);
        assert_eq!(format.min_length, 1);
        assert_eq!(format.max_length, 256);
        assert_eq!(format.group_size, 0);
        assert!(!format.case_sensitive);
        assert_eq!(format.check, Check::None);
        assert_eq!(format.version, 1);
    }

    #[test]
    fn crockford_preset_alone_brings_its_charset() {
        let format: Format = serde_json::from_str(r#"{"preset":"crockford32"}"#).unwrap();
        assert_eq!(format.effective_charset(), CROCKFORD32_CHARSET);
        assert_eq!(format.validate_spec(), Ok(()));
        assert_eq!(format.validate("o1l-i"), Ok("0111".to_owned()));
    }

    #[test]
    fn full_json_round_trips() {
        let json = r#"{"preset":"default","charset":"0123456789","min_length":12,
            "max_length":12,"group_size":4,"case_sensitive":false,"check":"luhn","version":1}"#;
        let format: Format = serde_json::from_str(json).unwrap();
        assert_eq!(format.charset.as_deref(), Some("0123456789"));
        assert_eq!(format.check, Check::Luhn);
        let again: Format = serde_json::from_str(&serde_json::to_string(&format).unwrap()).unwrap();
        assert_eq!(again, format);
    }

    #[test]
    fn default_serialises_without_charset() {
        let json = serde_json::to_value(Format::default()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"preset":"default","min_length":1,"max_length":256,
                "group_size":0,"case_sensitive":false,"check":"none","version":1})
        );
        let crockford = serde_json::to_value(crockford_checked()).unwrap();
        assert_eq!(crockford["preset"], "crockford32");
        assert_eq!(crockford["check"], "luhn");
    }

    #[test]
    fn unknown_fields_and_values_are_rejected() {
        assert!(serde_json::from_str::<Format>(r#"{"charsets":"AB"}"#).is_err());
        assert!(serde_json::from_str::<Format>(r#"{"preset":"base64"}"#).is_err());
        assert!(serde_json::from_str::<Format>(r#"{"check":"crc"}"#).is_err());
        assert!(serde_json::from_str::<Format>(r#"{"min_length":-1}"#).is_err());
    }

    #[test]
    fn null_charset_means_preset_charset() {
        let format: Format = serde_json::from_str(r#"{"charset":null}"#).unwrap();
        assert_eq!(format, Format::default());
    }

    // ---- validate_spec ----

    fn spec_error(format: Format) -> String {
        match format.validate_spec() {
            Err(message) => message,
            Ok(()) => panic!("spec unexpectedly valid: {format:?}"),
        }
    }

    fn with_charset(charset: &str) -> Format {
        Format {
            charset: Some(charset.to_owned()),
            ..Format::default()
        }
    }

    #[test]
    fn spec_rejects_bad_charsets() {
        assert!(spec_error(with_charset("")).contains("empty"));
        assert!(spec_error(with_charset("A")).contains("at least 2"));
        assert!(spec_error(with_charset("ABA")).contains("duplicate"));
        assert!(spec_error(with_charset("AB C")).contains("character 3"));
        assert!(spec_error(with_charset("AB-")).contains("character 3"));
        assert!(spec_error(with_charset("AB\0")).contains("printable ASCII"));
        assert!(spec_error(with_charset("ABÉ")).contains("printable ASCII"));
        assert!(spec_error(with_charset("AB🎁")).contains("printable ASCII"));
        assert!(spec_error(with_charset("AB\t")).contains("printable ASCII"));
        assert!(spec_error(with_charset("abc")).contains("case_sensitive"));
        let lower = Format {
            case_sensitive: true,
            ..with_charset("abc")
        };
        assert_eq!(lower.validate_spec(), Ok(()));
        let everything: String = (0x21u8..=0x7e)
            .filter(|&b| b != b'-')
            .map(char::from)
            .collect();
        let everything = Format {
            case_sensitive: true,
            ..with_charset(&everything)
        };
        assert_eq!(everything.validate_spec(), Ok(()));
    }

    #[test]
    fn spec_rejects_bad_lengths() {
        let f = |min_length, max_length| Format {
            min_length,
            max_length,
            ..Format::default()
        };
        assert!(spec_error(f(0, 10)).contains("min_length"));
        assert!(spec_error(f(1, 257)).contains("at most 256"));
        assert!(spec_error(f(11, 10)).contains("must not exceed"));
        assert!(spec_error(f(1, 0)).contains("must not exceed"));
        assert_eq!(f(256, 256).validate_spec(), Ok(()));
        assert_eq!(f(1, 1).validate_spec(), Ok(()));
    }

    #[test]
    fn spec_rules_for_check_grouping_version_and_preset() {
        assert!(spec_error(Format::crockford32(1, 0, true)).contains("luhn"));
        assert_eq!(Format::crockford32(1, 0, false).validate_spec(), Ok(()));
        assert!(spec_error(Format::crockford32(0, 0, false)).contains("min_length"));
        assert!(spec_error(Format::crockford32(300, 0, false)).contains("256"));
        assert!(spec_error(Format::crockford32(8, 9, false)).contains("group_size"));
        assert!(spec_error(Format {
            version: 2,
            ..Format::default()
        })
        .contains("version 2"));
        assert!(spec_error(Format {
            charset: Some("ABC".to_owned()),
            ..Format::crockford32(8, 0, false)
        })
        .contains("crockford32"));
        assert_eq!(
            Format {
                charset: Some(CROCKFORD32_CHARSET.to_owned()),
                ..Format::crockford32(8, 0, false)
            }
            .validate_spec(),
            Ok(())
        );
        assert!(spec_error(Format {
            case_sensitive: true,
            ..Format::crockford32(8, 0, false)
        })
        .contains("case_sensitive"));
    }

    // ---- normalise ----

    #[test]
    fn normalise_trims_drops_separators_and_upper_cases() {
        let f = Format::default();
        assert_eq!(f.normalise("  abcd-efgh ijkl\t\n"), "ABCDEFGHIJKL");
        assert_eq!(f.normalise("\u{3000}ab_cd\u{00A0}"), "AB_CD");
        assert_eq!(f.normalise("- \tX"), "X");
        assert_eq!(f.normalise("a\tb"), "A\tB");
        assert_eq!(f.normalise("ß"), "ß", "non-ASCII is left alone");
        assert_eq!(f.normalise("---"), "");
    }

    #[test]
    fn default_charset_maps_no_lookalikes() {
        assert_eq!(Format::default().normalise("oil-OIL"), "OILOIL");
    }

    #[test]
    fn crockford_maps_lookalikes() {
        let f = crockford_checked();
        assert_eq!(f.normalise("o0 iI lL uU"), "001111UU");
    }

    #[test]
    fn lookalikes_only_where_the_charset_allows() {
        // '0' is not in the charset: 'O' stays.
        assert_eq!(with_charset("ABO").normalise("o"), "O");
        // Both 'O' and '0' are in the charset: no mapping.
        assert_eq!(with_charset("O0").normalise("o"), "O");
        // '1' in the charset, 'I' and 'L' not.
        assert_eq!(with_charset("0123456789").normalise("I l O"), "110");
        // Case-sensitive: no upper-casing, so lower-case look-alikes stay.
        let cs = Format {
            case_sensitive: true,
            ..with_charset("01ab")
        };
        assert_eq!(cs.normalise("Ab o O"), "Abo0");
    }

    // ---- validate ----

    #[test]
    fn default_accepts_supplier_codes() {
        let f = Format::default();
        assert_eq!(f.validate("abcd-1234_xyz"), Ok("ABCD1234_XYZ".to_owned()));
        assert_eq!(f.validate(" X "), Ok("X".to_owned()));
        assert_eq!(f.validate(&"a".repeat(256)), Ok("A".repeat(256)));
    }

    #[test]
    fn empty_codes() {
        let f = Format::default();
        for raw in ["", "   ", "- - -", "\t\n", "\u{2003}"] {
            assert_eq!(f.validate(raw), Err(Malformed::Empty), "{raw:?}");
        }
        assert_eq!(Malformed::Empty.to_string(), "code is empty");
    }

    #[test]
    fn too_long_hint() {
        let err = Format::default().validate(&"A".repeat(300)).unwrap_err();
        assert_eq!(err, Malformed::TooLong { max: 256, got: 300 });
        assert_eq!(
            err.to_string(),
            "code has 300 characters: at most 256 allowed"
        );
    }

    #[test]
    fn too_long_is_reported_before_bad_characters() {
        let err = crockford_checked().validate(&"U".repeat(17)).unwrap_err();
        assert_eq!(err, Malformed::TooLong { max: 16, got: 17 });
    }

    #[test]
    fn too_short_hint() {
        let f = crockford_checked();
        let err = f.validate("ABC").unwrap_err();
        assert_eq!(err, Malformed::TooShort { min: 16, got: 3 });
        assert_eq!(
            err.to_string(),
            "code has 3 characters: at least 16 required"
        );
        let err = f.validate("A").unwrap_err();
        assert_eq!(
            err.to_string(),
            "code has 1 character: at least 16 required"
        );
    }

    #[test]
    fn check_raises_the_minimum_to_two() {
        let f = Format {
            check: Check::Luhn,
            ..Format::default()
        };
        assert_eq!(f.validate("0"), Err(Malformed::TooShort { min: 2, got: 1 }));
        assert_eq!(f.validate("00"), Ok("00".to_owned()));
    }

    #[test]
    fn bad_character_is_reported_before_too_short() {
        let err = crockford_checked().validate("ABCDU").unwrap_err();
        assert!(matches!(err, Malformed::BadCharacter { position: 5, .. }));
    }

    #[test]
    fn bad_character_hint_for_crockford() {
        let err = crockford_checked().validate("ABCD-U123").unwrap_err();
        assert_eq!(
            err,
            Malformed::BadCharacter {
                position: 5,
                expected: "0-9, A-Z except I L O U".to_owned()
            }
        );
        assert_eq!(
            err.to_string(),
            "character 5, not counting spaces and dashes, is not allowed: expected one of 0-9, A-Z except I L O U"
        );
    }

    #[test]
    fn bad_character_positions_count_characters_in_the_normalised_code() {
        let f = Format::default();
        assert!(matches!(
            f.validate("  ab-cd é"),
            Err(Malformed::BadCharacter { position: 5, .. })
        ));
        assert!(matches!(
            f.validate("🎁🎁A!"),
            Err(Malformed::BadCharacter { position: 1, .. })
        ));
        assert!(matches!(
            f.validate("AB🎁CD"),
            Err(Malformed::BadCharacter { position: 3, .. })
        ));
    }

    #[test]
    fn charset_descriptions() {
        let describe = |f: &Format| describe_charset(&Symbols::new(f.effective_charset()));
        assert_eq!(describe(&Format::default()), "0-9, A-Z, _");
        assert_eq!(describe(&crockford_checked()), "0-9, A-Z except I L O U");
        assert_eq!(describe(&with_charset("0123456789")), "0-9");
        assert_eq!(describe(&with_charset("0123456789ABCDEF")), "0-9, A-F");
        assert_eq!(describe(&with_charset("23456789")), "2-9");
        assert_eq!(describe(&with_charset("AB")), "A, B");
        assert_eq!(
            describe(&with_charset("ACEGXYZ,.")),
            "A, C, E, G, X-Z, comma, ."
        );
        assert_eq!(
            describe(&case_sensitive_odd()),
            "0-9, A-Z except O, a-z, ., _"
        );
        let everything: String = (0x21u8..=0x7e)
            .filter(|&b| b != b'-')
            .map(char::from)
            .collect();
        assert_eq!(
            describe(&with_charset(&everything)),
            "printable ASCII except space and -"
        );
        let many: String = (0x21u8..=0x7e)
            .filter(|&b| b != b'-' && !b.is_ascii_lowercase())
            .map(char::from)
            .collect();
        assert_eq!(
            describe(&with_charset(&many)),
            "0-9, A-Z, 31 punctuation symbols"
        );
        assert_eq!(
            describe(&with_charset("")),
            "nothing (the format has no usable charset)"
        );
    }

    #[test]
    fn case_sensitive_format_keeps_case() {
        let f = case_sensitive_odd();
        let code = f.generate(&mut StdRng::seed_from_u64(7));
        let canonical = f.validate(&code).unwrap();
        assert_eq!(canonical, code.replace('-', ""));
        let upper = Format {
            charset: Some("ABC".to_owned()),
            case_sensitive: true,
            ..Format::default()
        };
        assert!(matches!(
            upper.validate("AbC"),
            Err(Malformed::BadCharacter { position: 2, .. })
        ));
    }

    // ---- check character ----

    #[test]
    fn decimal_luhn_is_the_credit_card_check() {
        let f = decimal_luhn();
        assert_eq!(f.validate("7992 7398 713"), Ok("79927398713".to_owned()));
        assert_eq!(
            f.validate("4539 1488 0343 6467"),
            Ok("4539148803436467".to_owned())
        );
        assert_eq!(
            f.validate("79927398710"),
            Err(Malformed::CheckMismatch { position: 11 })
        );
    }

    #[test]
    fn crockford_check_mismatch_hint() {
        let f = crockford_checked();
        let code = f.generate(&mut StdRng::seed_from_u64(1));
        let mut canonical: Vec<u8> = f.validate(&code).unwrap().into_bytes();
        let last = canonical.len() - 1;
        canonical[last] = if canonical[last] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(canonical).unwrap();
        let err = f.validate(&tampered).unwrap_err();
        assert_eq!(err, Malformed::CheckMismatch { position: 16 });
        assert_eq!(
            err.to_string(),
            "check character at position 16 does not match: the code has a typo"
        );
    }

    #[test]
    fn luhn_doubling_is_a_permutation_for_every_charset_size() {
        for n in 2..=93 {
            let mut seen = vec![false; n];
            for index in 0..n {
                let term = luhn_term(index, true, n);
                assert!(term < n && !seen[term], "n = {n}, index = {index}");
                seen[term] = true;
            }
        }
    }

    #[test]
    fn luhn_catches_adjacent_transpositions() {
        for format in checked_formats() {
            let n = Symbols::new(format.effective_charset()).len;
            let mut missed = 0;
            let mut total = 0;
            for seed in 0..50 {
                let code = format.generate(&mut StdRng::seed_from_u64(seed));
                let canonical = format.validate(&code).unwrap().into_bytes();
                for i in 0..canonical.len() - 1 {
                    if canonical[i] == canonical[i + 1] {
                        continue;
                    }
                    let mut swapped = canonical.clone();
                    swapped.swap(i, i + 1);
                    let swapped = String::from_utf8(swapped).unwrap();
                    total += 1;
                    if format.validate(&swapped).is_ok() {
                        missed += 1;
                    }
                }
            }
            // Even N misses only swaps of the first and last symbols; odd N misses none.
            // With N = 2 those are the only symbols: a parity bit cannot see swaps.
            if n == 2 {
                continue;
            }
            if n % 2 == 1 {
                assert_eq!(missed, 0, "{format:?}");
            } else {
                assert!(missed * 10 <= total, "{format:?}: {missed}/{total}");
            }
        }
    }

    #[test]
    fn check_character_is_part_of_the_length() {
        let f = crockford_checked();
        let code = f.generate(&mut StdRng::seed_from_u64(3));
        assert_eq!(code.len(), 19, "16 characters in 4 groups: {code}");
        assert_eq!(f.validate(&code).unwrap().len(), 16);
    }

    // ---- generate ----

    #[test]
    fn generate_lengths_and_grouping() {
        let mut rng = StdRng::seed_from_u64(42);
        let code = Format::default().generate(&mut rng);
        assert_eq!(code.len(), 16, "max_length 256 > 64 generates 16");
        assert!(!code.contains('-'));

        let code = Format::crockford32(10, 4, false).generate(&mut rng);
        let groups: Vec<usize> = code.split('-').map(str::len).collect();
        assert_eq!(groups, [4, 4, 2]);

        let code = Format {
            min_length: 100,
            max_length: 200,
            ..Format::default()
        }
        .generate(&mut rng);
        assert_eq!(code.len(), 100);

        let code = Format {
            max_length: 64,
            group_size: 8,
            ..Format::default()
        }
        .generate(&mut rng);
        assert_eq!(code.len(), 64 + 7);
    }

    #[test]
    fn generate_on_an_unusable_format_does_not_panic() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(with_charset("").generate(&mut rng), "");
        let weird = Format {
            charset: Some("A🎁A".to_owned()),
            min_length: 0,
            max_length: 0,
            group_size: 0,
            check: Check::Luhn,
            ..Format::default()
        };
        assert_eq!(weird.generate(&mut rng), "");
        let one = Format {
            max_length: 3,
            check: Check::Luhn,
            ..with_charset("A")
        };
        assert_eq!(one.generate(&mut rng), "AAA");
    }

    #[test]
    fn validate_on_an_unusable_format_does_not_panic() {
        let formats = [
            with_charset(""),
            Format {
                check: Check::Luhn,
                ..with_charset("A")
            },
            Format {
                min_length: 0,
                max_length: 0,
                check: Check::Luhn,
                ..with_charset("A🎁\0A")
            },
        ];
        for format in formats {
            for raw in ["", "A", "AA", "🎁", "\0"] {
                let _ = format.validate(raw);
                let _ = format.normalise(raw);
            }
        }
    }

    // ---- digest ----

    #[test]
    fn digest_is_prefixed_sha256_hex() {
        let expected = {
            let mut hasher = Sha256::new();
            hasher.update(b"kamigate/code/v1\0ABCD");
            hex::encode(hasher.finalize())
        };
        assert_eq!(digest("ABCD"), expected);
        assert_eq!(digest("ABCD").len(), 64);
        assert!(digest("ABCD")
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(digest("ABCD"), digest("ABCE"));
        assert!(!digest("ABCD").contains("ABCD"));
    }

    #[test]
    fn digest_of_empty_is_the_prefix_hash() {
        let mut hasher = Sha256::new();
        hasher.update(b"kamigate/code/v1\0");
        assert_eq!(digest(""), hex::encode(hasher.finalize()));
    }

    // ---- hostile input ----

    fn assert_hint_hides(raw: &str, err: &Malformed, format: &Format) {
        let hint = err.to_string();
        let debug = format!("{err:?}");
        let normalised = format.normalise(raw);
        for text in [hint, debug] {
            if raw.trim().chars().count() >= 2 {
                assert!(!text.contains(raw), "{text:?} contains {raw:?}");
                assert!(!text.contains(raw.trim()), "{text:?} contains {raw:?}");
            }
            if normalised.chars().count() >= 2 {
                assert!(!text.contains(&normalised), "{text:?} contains {raw:?}");
            }
            // Characters the format refuses are never echoed either.
            for c in normalised.chars().filter(|c| !c.is_ascii_alphanumeric()) {
                if !format.effective_charset().contains(c) {
                    assert!(!text.contains(c), "{text:?} echoes {c:?}");
                }
            }
        }
    }

    #[test]
    fn hostile_inputs_are_rejected_with_positions() {
        let f = Format::default();
        let cases: &[(&str, Malformed)] = &[
            (
                "'; DROP TABLE keys; --",
                Malformed::BadCharacter {
                    position: 1,
                    expected: "0-9, A-Z, _".to_owned(),
                },
            ),
            (
                "\0",
                Malformed::BadCharacter {
                    position: 1,
                    expected: "0-9, A-Z, _".to_owned(),
                },
            ),
            (
                "ABCD\0EFGH",
                Malformed::BadCharacter {
                    position: 5,
                    expected: "0-9, A-Z, _".to_owned(),
                },
            ),
            (
                "ABC\u{202E}DEF",
                Malformed::BadCharacter {
                    position: 4,
                    expected: "0-9, A-Z, _".to_owned(),
                },
            ),
            (
                "AB🎁CD",
                Malformed::BadCharacter {
                    position: 3,
                    expected: "0-9, A-Z, _".to_owned(),
                },
            ),
        ];
        for (raw, expected) in cases {
            let err = f.validate(raw).unwrap_err();
            assert_eq!(&err, expected, "{raw:?}");
            assert_hint_hides(raw, &err, &f);
        }
    }

    #[test]
    fn huge_inputs_fail_as_too_long() {
        for format in formats() {
            for raw in [
                "A".repeat(10_000),
                "🎁".repeat(10_000),
                "\0".repeat(10_000),
                format!("{}{}", "'; DROP TABLE keys; --".repeat(500), "\u{202E}"),
            ] {
                let err = format.validate(&raw).unwrap_err();
                assert!(
                    matches!(err, Malformed::TooLong { got, .. } if got > format.max_length),
                    "{err:?}"
                );
                assert_hint_hides(&raw, &err, &format);
            }
        }
        assert_eq!(
            Format::default().validate(&"🎁".repeat(10_000)),
            Err(Malformed::TooLong {
                max: 256,
                got: 10_000
            })
        );
    }

    #[test]
    fn hostile_inputs_never_leak_into_hints() {
        for format in formats() {
            for raw in HOSTILE {
                let err = format.validate(raw).unwrap_err();
                assert_hint_hides(raw, &err, &format);
            }
        }
    }

    #[test]
    fn hints_never_contain_a_secret_code() {
        // A code that is almost right: every error variant, none echoing it.
        let f = crockford_checked();
        let code = f.generate(&mut StdRng::seed_from_u64(9));
        let canonical = f.validate(&code).unwrap();
        let mut tampered = canonical.clone().into_bytes();
        tampered[0] = if tampered[0] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap();
        let inputs = [
            format!("{canonical}U"),
            canonical[..10].to_owned(),
            format!("{}!{}", &canonical[..8], &canonical[9..]),
            tampered,
        ];
        for raw in &inputs {
            let err = f.validate(raw).unwrap_err();
            assert_hint_hides(raw, &err, &f);
            assert!(!err.to_string().contains(&canonical[..8]));
        }
    }

    // ---- properties ----

    fn format_strategy() -> impl Strategy<Value = Format> {
        proptest::sample::select(formats())
    }

    fn checked_format_strategy() -> impl Strategy<Value = Format> {
        proptest::sample::select(checked_formats())
    }

    proptest! {
        #[test]
        fn normalise_is_idempotent(format in format_strategy(), raw in any::<String>()) {
            let once = format.normalise(&raw);
            prop_assert_eq!(format.normalise(&once), once);
        }

        #[test]
        fn normalise_is_idempotent_on_separator_soup(
            format in format_strategy(),
            raw in "[ \\-\t\u{a0}\u{2003}oOiIlLuU0aZ_é🎁\u{202e}]{0,24}",
        ) {
            let once = format.normalise(&raw);
            prop_assert_eq!(format.normalise(&once), once);
        }

        #[test]
        fn every_generated_code_validates(format in format_strategy(), seed in any::<u64>()) {
            let code = format.generate(&mut StdRng::seed_from_u64(seed));
            let canonical = format.validate(&code);
            prop_assert!(canonical.is_ok(), "{:?}: {:?}", format, canonical);
            let canonical = canonical.unwrap_or_default();
            prop_assert_eq!(canonical.replace('-', ""), code.replace('-', ""));
            // The canonical form is a fixed point of validation.
            prop_assert_eq!(format.validate(&canonical), Ok(canonical.clone()));
            // Lower-cased and re-spaced input is the same code for case-insensitive formats.
            if !format.case_sensitive {
                let sloppy = format!("  {}  ", code.to_ascii_lowercase().replace('-', " - "));
                prop_assert_eq!(format.validate(&sloppy), Ok(canonical));
            }
        }

        #[test]
        fn every_single_substitution_is_caught(
            format in checked_format_strategy(),
            seed in any::<u64>(),
            position in any::<prop::sample::Index>(),
            shift in any::<prop::sample::Index>(),
        ) {
            let code = format.generate(&mut StdRng::seed_from_u64(seed));
            let canonical = format.validate(&code);
            prop_assert!(canonical.is_ok());
            let canonical = canonical.unwrap_or_default().into_bytes();
            let alphabet = Symbols::new(format.effective_charset());
            let alphabet = alphabet.symbols();
            let n = alphabet.len();
            let at = position.index(canonical.len());
            let old = alphabet.iter().position(|&b| b == canonical[at]).unwrap_or(0);
            // Shift by 1..n so the new symbol always differs from the old one.
            let new = (old + 1 + shift.index(n - 1)) % n;
            let mut tampered = canonical.clone();
            tampered[at] = alphabet[new];
            let tampered = String::from_utf8(tampered).unwrap_or_default();
            prop_assert_eq!(
                format.validate(&tampered),
                Err(Malformed::CheckMismatch { position: canonical.len() })
            );
        }

        #[test]
        fn validate_never_panics(format in format_strategy(), raw in any::<String>()) {
            match format.validate(&raw) {
                Ok(canonical) => {
                    prop_assert_eq!(&canonical, &format.normalise(&raw));
                    prop_assert!(canonical.chars().count() <= format.max_length);
                }
                Err(err) => {
                    let _ = err.to_string();
                }
            }
        }

        #[test]
        fn validate_never_panics_on_long_strings(
            format in format_strategy(),
            raw in ".{200,400}",
        ) {
            let _ = format.validate(&raw);
        }

        #[test]
        fn rejected_inputs_never_appear_in_hints(
            format in format_strategy(),
            raw in "[ -~\u{0}\u{202e}🎁é]{12,40}",
        ) {
            if let Err(err) = format.validate(&raw) {
                let hint = err.to_string();
                prop_assert!(!hint.contains(&raw));
                prop_assert!(raw.trim().chars().count() < 12 || !hint.contains(raw.trim()));
                let normalised = format.normalise(&raw);
                prop_assert!(normalised.chars().count() < 12 || !hint.contains(&normalised));
            }
        }
    }
}
