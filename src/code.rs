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

mod spec;

pub use spec::SpecError;

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

        // Indices come from `0..alphabet.len()` or `luhn_check_index` (always below it).
        let canonical: String = indices
            .iter()
            .filter_map(|&i| alphabet.get(i))
            .map(|&b| char::from(b))
            .collect();
        self.display(&canonical)
    }

    /// A canonical code in display form: a `-` between groups of `group_size` characters,
    /// unchanged without grouping. Input is accepted grouped or not, so this is only how a
    /// code is shown — by `kamigate gen` and in every answer that returns codes — one form
    /// per SKU, whatever form the code was imported in.
    pub fn display(&self, canonical: &str) -> String {
        if self.group_size == 0 {
            return canonical.to_owned();
        }
        let mut shown = String::with_capacity(canonical.len() + canonical.len() / self.group_size);
        for (i, c) in canonical.chars().enumerate() {
            if i > 0 && i % self.group_size == 0 {
                shown.push('-');
            }
            shown.push(c);
        }
        shown
    }
}

#[cfg(test)]
mod tests;
