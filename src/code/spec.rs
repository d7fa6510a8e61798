//! Which format specs are usable, and why one is not.
//!
//! [`SpecError`] is one variant per rule rather than a sentence, so that each caller can
//! speak the user's language: the HTTP API names the JSON fields of `"format"` (its
//! `Display`), `kamigate gen` names the flags the user passed.

use super::{Check, Format, Preset, CROCKFORD32_CHARSET, FORMAT_VERSION, MAX_CODE_LENGTH};

/// Why a format spec is unusable. `Display` speaks of the fields of the `"format"` JSON
/// object, as sent to `PUT /v1/skus/{sku}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// `version` is not [`FORMAT_VERSION`].
    #[error("unsupported format version {0}: only version {FORMAT_VERSION} is supported")]
    Version(u32),
    /// The `crockford32` preset with a charset of its own.
    #[error(
        "preset \"crockford32\" fixes the charset: omit \"charset\" or use preset \"default\" \
         with a custom charset"
    )]
    PresetCharset,
    /// The `crockford32` preset made case-sensitive.
    #[error("preset \"crockford32\" is case-insensitive: \"case_sensitive\" must be false")]
    PresetCaseSensitive,
    /// An empty charset.
    #[error("charset must not be empty")]
    EmptyCharset,
    /// A charset symbol that is not printable ASCII, or is a space or `-`.
    #[error(
        "charset character {position} is not allowed: only printable ASCII other than space \
         and '-' may be used"
    )]
    CharsetSymbol {
        /// 1-based position in the charset.
        position: usize,
    },
    /// A lower-case letter in the charset of a case-insensitive format.
    #[error(
        "charset character {position} ({symbol:?}) is lower-case but the format is \
         case-insensitive (codes are upper-cased before checking): use upper-case letters or \
         set \"case_sensitive\": true"
    )]
    CharsetLowerCase {
        /// 1-based position in the charset.
        position: usize,
        symbol: char,
    },
    /// A symbol given twice.
    #[error(
        "charset character {position} ({symbol:?}) is a duplicate: each symbol may appear once"
    )]
    CharsetDuplicate {
        /// 1-based position of the second occurrence.
        position: usize,
        symbol: char,
    },
    /// A charset of one symbol.
    #[error("charset needs at least 2 symbols")]
    CharsetTooSmall,
    /// `min_length` 0.
    #[error("min_length must be at least 1")]
    MinLengthZero,
    /// `max_length` over [`MAX_CODE_LENGTH`].
    #[error("max_length must be at most {MAX_CODE_LENGTH}")]
    MaxLengthTooLong,
    /// `min_length` over `max_length`.
    #[error("min_length ({min}) must not exceed max_length ({max})")]
    LengthsCrossed { min: usize, max: usize },
    /// Groups longer than the longest code.
    #[error("group_size must be 0 (no grouping) or at most max_length ({max})")]
    GroupTooLarge {
        /// The format's `max_length`.
        max: usize,
    },
    /// A check character with no room for anything before it.
    #[error(
        "check \"luhn\" needs max_length of at least 2 (the check character is part of the \
         code)"
    )]
    CheckTooShort,
}

impl Format {
    /// Checks that a format spec is usable; the error's `Display` is suitable for a 400
    /// response.
    ///
    /// Rules: version is [`FORMAT_VERSION`]; the charset has at least two symbols, all
    /// printable ASCII other than space and `-`, without duplicates, and no lower-case
    /// letters unless `case_sensitive`; `1 <= min_length <= max_length <= 256`; `group_size`
    /// is 0 or at most `max_length`; a check character needs `max_length >= 2`; the
    /// `crockford32` preset allows no other charset and no case sensitivity.
    pub fn validate_spec(&self) -> Result<(), SpecError> {
        if self.version != FORMAT_VERSION {
            return Err(SpecError::Version(self.version));
        }
        if self.preset == Preset::Crockford32 {
            if self
                .charset
                .as_deref()
                .is_some_and(|c| c != CROCKFORD32_CHARSET)
            {
                return Err(SpecError::PresetCharset);
            }
            if self.case_sensitive {
                return Err(SpecError::PresetCaseSensitive);
            }
        }

        let charset = self.effective_charset();
        if charset.is_empty() {
            return Err(SpecError::EmptyCharset);
        }
        let mut seen = [false; 128];
        for (i, symbol) in charset.chars().enumerate() {
            let position = i + 1;
            if !symbol.is_ascii_graphic() || symbol == '-' {
                return Err(SpecError::CharsetSymbol { position });
            }
            if symbol.is_ascii_lowercase() && !self.case_sensitive {
                return Err(SpecError::CharsetLowerCase { position, symbol });
            }
            // `symbol` is ASCII here, so the index is in bounds.
            if let Some(slot) = seen.get_mut(symbol as usize) {
                if *slot {
                    return Err(SpecError::CharsetDuplicate { position, symbol });
                }
                *slot = true;
            }
        }
        if charset.len() < 2 {
            return Err(SpecError::CharsetTooSmall);
        }

        if self.min_length < 1 {
            return Err(SpecError::MinLengthZero);
        }
        if self.max_length > MAX_CODE_LENGTH {
            return Err(SpecError::MaxLengthTooLong);
        }
        if self.min_length > self.max_length {
            return Err(SpecError::LengthsCrossed {
                min: self.min_length,
                max: self.max_length,
            });
        }
        if self.group_size > self.max_length {
            return Err(SpecError::GroupTooLarge {
                max: self.max_length,
            });
        }
        if self.check == Check::Luhn && self.max_length < 2 {
            return Err(SpecError::CheckTooShort);
        }
        Ok(())
    }
}
