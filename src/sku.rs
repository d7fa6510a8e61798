//! SKU settings and the identifiers clients send.
//!
//! Identifiers (SKUs, order ids, user ids, redeemers) are restricted to a small, printable
//! charset: they become parts of Redis keys and of `|`-separated records in the scripts, and
//! appear in logs. Anything else is rejected at the edge with `ERR_BAD_REQUEST`.

use serde::{Deserialize, Serialize};

use crate::code::Format;
use crate::error::Error;

/// Settings of one SKU, as sent to `PUT /v1/skus/{sku}`. Every field is optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SkuConfig {
    /// Format rules its codes must follow (charset, length, grouping, check character).
    pub format: Format,
    /// Most codes one `user_id` may hold or own at once; 0 means no limit. When set, claims
    /// must name a `user_id`.
    pub per_user_limit: u64,
    /// Hold length used when a claim asks for a hold (`"hold": true`) without `hold_ms`.
    pub default_hold_ms: u64,
    /// Longest hold a claim may ask for.
    pub max_hold_ms: u64,
    /// Whether a confirm after the hold lapsed may claim fresh codes (`"late": true`).
    pub allow_late_confirm: bool,
    /// How many orders one code may be issued to (reusable codes: more than 1).
    pub max_issues: u64,
    /// How many times one code may be redeemed.
    pub max_uses: u64,
    /// Codes never to import (leaked, test or placeholder codes); rows holding one are
    /// rejected. Compared after normalisation, so any spelling of an entry matches.
    pub blacklist: Vec<String>,
}

impl Default for SkuConfig {
    fn default() -> SkuConfig {
        SkuConfig {
            format: Format::default(),
            per_user_limit: 0,
            default_hold_ms: 15 * 60 * 1000,
            max_hold_ms: 24 * 60 * 60 * 1000,
            allow_late_confirm: true,
            max_issues: 1,
            max_uses: 1,
            blacklist: Vec::new(),
        }
    }
}

impl SkuConfig {
    /// The blacklist in canonical form, for lookups during an import.
    pub fn blacklisted(&self) -> std::collections::HashSet<String> {
        self.blacklist
            .iter()
            .map(|code| self.format.normalise(code))
            .collect()
    }

    /// Checks the settings make sense together; the message suits a 400 answer.
    pub fn validate(&self) -> Result<(), Error> {
        self.format.validate_spec().map_err(Error::BadRequest)?;
        if self.max_issues == 0 || self.max_uses == 0 {
            return Err(Error::BadRequest(
                "max_issues and max_uses must be at least 1".into(),
            ));
        }
        if self.blacklist.len() > MAX_BLACKLIST {
            return Err(Error::BadRequest(format!(
                "blacklist has more than {MAX_BLACKLIST} entries"
            )));
        }
        if self.default_hold_ms == 0 || self.default_hold_ms > self.max_hold_ms {
            return Err(Error::BadRequest(
                "default_hold_ms must be between 1 and max_hold_ms".into(),
            ));
        }
        Ok(())
    }
}

/// Most blacklist entries a SKU may carry.
pub const MAX_BLACKLIST: usize = 10_000;

/// Longest SKU name.
pub const MAX_SKU_LEN: usize = 64;
/// Longest order id, user id or redeemer.
pub const MAX_ID_LEN: usize = 128;

/// Checks an identifier: 1..=`max` characters from `A-Z a-z 0-9 . _ : @ -`.
/// `what` names the field in the error message.
pub fn check_id(what: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::BadRequest(format!("{what} must not be empty")));
    }
    if value.len() > max {
        return Err(Error::BadRequest(format!(
            "{what} is longer than {max} characters"
        )));
    }
    if let Some(pos) = value
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || b"._:@-".contains(&b)))
    {
        return Err(Error::BadRequest(format!(
            "{what} has a character at position {} outside A-Z a-z 0-9 . _ : @ -",
            pos + 1
        )));
    }
    Ok(())
}

/// Checks a SKU name (as [`check_id`], at most [`MAX_SKU_LEN`], no `:`).
pub fn check_sku(sku: &str) -> Result<(), Error> {
    check_id("sku", sku, MAX_SKU_LEN)?;
    if sku.contains(':') {
        return Err(Error::BadRequest("sku must not contain ':'".into()));
    }
    Ok(())
}

/// A key's public id, `<sku>.<n>`: it names the SKU so admin routes need nothing else.
pub fn key_id(sku: &str, local: &str) -> String {
    format!("{sku}.{local}")
}

/// Splits a public key id into SKU and the SKU-local id.
pub fn parse_key_id(key_id: &str) -> Option<(&str, &str)> {
    let (sku, local) = key_id.rsplit_once('.')?;
    let numeric = !local.is_empty() && local.bytes().all(|b| b.is_ascii_digit());
    (numeric && check_sku(sku).is_ok()).then_some((sku, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_reject_separators_and_injection() {
        for bad in [
            "",
            "a|b",
            "a,b",
            "'; DROP TABLE",
            "a b",
            "ü",
            "{tag}",
            "a\0b",
        ] {
            assert!(check_id("order_id", bad, MAX_ID_LEN).is_err(), "{bad:?}");
        }
        assert!(check_id("order_id", "o-1:retry@shop.example", MAX_ID_LEN).is_ok());
        assert!(check_id("order_id", &"a".repeat(129), MAX_ID_LEN).is_err());
    }

    #[test]
    fn key_ids_round_trip_with_dotted_skus() {
        assert_eq!(
            parse_key_id(&key_id("gift.v2", "17")),
            Some(("gift.v2", "17"))
        );
        assert_eq!(parse_key_id("gift.x"), None);
        assert_eq!(parse_key_id("17"), None);
        assert_eq!(parse_key_id("a:b.1"), None);
    }

    #[test]
    fn defaults_are_valid() {
        SkuConfig::default().validate().expect("defaults validate");
    }
}
