//! SKU settings and the identifiers clients send.
//!
//! Identifiers (SKUs, order ids, user ids, redeemers) are restricted to a small, printable
//! charset: they become parts of Redis keys and of `|`-separated records in the scripts, and
//! appear in logs. Anything else is rejected at the edge with `ERR_BAD_REQUEST`.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::code::{Format, Malformed};
use crate::error::Error;
use crate::secrets::{Keyring, OpenError};

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
    /// rejected. Compared after normalisation, so any spelling of an entry matches. Sent in
    /// clear, stored sealed ([`Blacklist`]).
    pub blacklist: Blacklist,
    /// The version number of `format`, counted per SKU from 1: each change of the format
    /// makes a new one, and every key records the version it was imported under. Kept by
    /// the gateway ([`SkuConfig::succeed`]), never sent by clients.
    pub format_version: u32,
    /// When `format` became the SKU's format (ms since the epoch; kept by the gateway).
    pub format_since_ms: u64,
    /// The SKU's earlier formats, oldest first (kept by the gateway): codes sold under them
    /// stay redeemable under the rules they were sold with.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub earlier_formats: Vec<FormatVersion>,
}

/// One of a SKU's earlier formats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatVersion {
    pub version: u32,
    pub format: Format,
    /// When it became the SKU's format (ms since the epoch).
    pub since_ms: u64,
    /// Set once an admin retired it: its keys were voided, its codes answer like unknown
    /// ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired: Option<Retirement>,
}

/// Why and when a format version was retired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retirement {
    pub at_ms: u64,
    pub reason: String,
    /// Retired although sold keys of it were not redeemed yet (they were voided).
    pub forced: bool,
}

/// A code in canonical form under one of a SKU's format versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub version: u32,
    pub canonical: String,
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
            blacklist: Blacklist::default(),
            format_version: 1,
            format_since_ms: 0,
            earlier_formats: Vec::new(),
        }
    }
}

impl SkuConfig {
    /// Carries the format history over from `before`, the SKU's stored settings, into these
    /// new settings (as a client sent them): a changed format becomes a new version and the
    /// old one is kept; any other change keeps the version. `now_ms` dates a new version.
    pub fn succeed(&mut self, before: Option<&SkuConfig>, now_ms: u64) {
        let Some(before) = before else {
            self.format_version = 1;
            self.format_since_ms = now_ms;
            self.earlier_formats = Vec::new();
            return;
        };
        self.earlier_formats = before.earlier_formats.clone();
        if self.format == before.format {
            self.format_version = before.format_version;
            self.format_since_ms = before.format_since_ms;
            return;
        }
        self.earlier_formats.push(FormatVersion {
            version: before.format_version,
            format: before.format.clone(),
            since_ms: before.format_since_ms,
            retired: None,
        });
        self.format_version = before.format_version + 1;
        self.format_since_ms = now_ms;
    }

    /// Every format version, the current one first, then the earlier ones newest first,
    /// retired ones included (their keys are void, so their codes answer like unknown ones,
    /// never as malformed).
    pub fn versions(&self) -> impl Iterator<Item = (u32, &Format)> {
        std::iter::once((self.format_version, &self.format)).chain(
            self.earlier_formats
                .iter()
                .rev()
                .map(|v| (v.version, &v.format)),
        )
    }

    /// The canonical forms of a code a client sent, one per format version it passes
    /// (distinct forms only, the newest version first), or why it is malformed under the
    /// current format when it passes none.
    pub fn candidates(&self, raw: &str) -> Result<Vec<Candidate>, Malformed> {
        let mut out: Vec<Candidate> = Vec::new();
        let mut newest = None;
        for (version, format) in self.versions() {
            match format.validate(raw) {
                Ok(canonical) => {
                    if !out.iter().any(|c| c.canonical == canonical) {
                        out.push(Candidate { version, canonical });
                    }
                }
                Err(e) => {
                    newest.get_or_insert(e);
                }
            }
        }
        match (out.is_empty(), newest) {
            (true, Some(e)) => Err(e),
            _ => Ok(out),
        }
    }

    /// The earlier format `version`, if the SKU had one.
    pub fn earlier_format_mut(&mut self, version: u32) -> Option<&mut FormatVersion> {
        self.earlier_formats
            .iter_mut()
            .find(|v| v.version == version)
    }

    /// The keyed digests of the blacklist's codes in canonical form under the current
    /// format, which import rows are compared with (as duplicates are, by digest).
    pub fn blacklist_digests(
        &self,
        keyring: &Keyring,
        sku: &str,
    ) -> Result<HashSet<String>, OpenError> {
        Ok(self
            .blacklist
            .codes(keyring, sku)?
            .iter()
            .map(|code| keyring.digest(&self.format.normalise(code)))
            .collect())
    }

    /// The settings as answers show them: the blacklist only as its number of entries, so
    /// no answer gives a blacklisted code away.
    pub fn shown(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("settings are plain data");
        value["blacklist"] = serde_json::json!({ "entries": self.blacklist.len() });
        value
    }

    /// Checks the settings make sense together; the message suits a 400 answer.
    pub fn validate(&self) -> Result<(), Error> {
        self.format
            .validate_spec()
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        if self.format_version == 0 {
            return Err(Error::BadRequest("format_version starts at 1".into()));
        }
        if self.max_issues == 0 || self.max_uses == 0 {
            return Err(Error::BadRequest(
                "max_issues and max_uses must be at least 1".into(),
            ));
        }
        if self.blacklist.len() as usize > MAX_BLACKLIST {
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

/// What a blacklist is sealed for, in place of a key's local id in the associated data
/// ([`Keyring::seal`]): not a number, so neither a key's sealed code nor a blacklist opens
/// as the other, and the SKU in the associated data keeps one SKU's list off another's.
const BLACKLIST_SEAL_ID: &str = "blacklist";

/// A SKU's blacklist. A blacklisted code may be a leaked code of another SKU that still
/// sells, or a real code held back, so the list is stored sealed like codes are: in the
/// ledger's settings, the engine's copy of them and every dump of either.
///
/// Sealed as one text under the data key, not stored as keyed digests: a digest cannot be
/// keyed anew, so `rekey --index` could not carry digests over to a new index key, and a
/// blacklist kept only so would stop matching. Imports open the list and digest its codes
/// under the current index key when they begin (10 000 entries take milliseconds); a data
/// key rekey seals it anew ([`crate::inventory::rekey`]), and a re-index needs nothing.
/// One text for the whole list keeps the settings the engine reads every few seconds small,
/// and shows a dump no more than the number of entries.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Blacklist {
    /// Codes in clear: as `PUT /v1/skus/{sku}` sends them, and as settings stored before
    /// blacklists were sealed hold them (sealed on start, see
    /// [`crate::inventory::rekey::seal_blacklists`]). Stored so only when empty.
    Clear(Vec<String>),
    /// The codes, sealed together.
    Sealed(SealedBlacklist),
}

/// A blacklist as stored: `sealed` is the JSON list of its codes, sealed for the SKU.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedBlacklist {
    /// Number of codes, answered instead of them.
    pub entries: u64,
    /// `e1.<data key id>.…` ([`crate::secrets`]).
    pub sealed: String,
}

impl Default for Blacklist {
    fn default() -> Blacklist {
        Blacklist::Clear(Vec::new())
    }
}

/// Shows the number of entries only: settings may be logged, codes may not.
impl std::fmt::Debug for Blacklist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let form = match self {
            Blacklist::Clear(_) => "clear",
            Blacklist::Sealed(_) => "sealed",
        };
        write!(f, "Blacklist({} entries, {form})", self.len())
    }
}

impl Blacklist {
    /// Number of codes.
    pub fn len(&self) -> u64 {
        match self {
            Blacklist::Clear(codes) => codes.len() as u64,
            Blacklist::Sealed(sealed) => sealed.entries,
        }
    }

    /// Whether it holds no code.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it holds codes in clear (what storing must never keep).
    pub fn in_clear(&self) -> bool {
        matches!(self, Blacklist::Clear(codes) if !codes.is_empty())
    }

    /// The sealed text, when it is sealed.
    pub fn sealed_text(&self) -> Option<&str> {
        match self {
            Blacklist::Clear(_) => None,
            Blacklist::Sealed(sealed) => Some(&sealed.sealed),
        }
    }

    /// The codes, opened for `sku` when sealed.
    pub fn codes(&self, keyring: &Keyring, sku: &str) -> Result<Vec<String>, OpenError> {
        match self {
            Blacklist::Clear(codes) => Ok(codes.clone()),
            Blacklist::Sealed(sealed) => {
                let text = keyring.open(sku, BLACKLIST_SEAL_ID, &sealed.sealed)?;
                // Only this module seals it, from a list of strings.
                serde_json::from_str(&text).map_err(|_| {
                    let id = crate::secrets::sealed_parts(&sealed.sealed).map_or("", |(id, _)| id);
                    OpenError::Tampered(id.to_owned())
                })
            }
        }
    }

    /// The list sealed for `sku` under the current data key (an empty list stays as it is:
    /// nothing to hide).
    pub fn sealed(codes: &[String], keyring: &Keyring, sku: &str) -> Blacklist {
        if codes.is_empty() {
            return Blacklist::default();
        }
        let text = serde_json::to_string(codes).expect("a list of strings");
        Blacklist::Sealed(SealedBlacklist {
            entries: codes.len() as u64,
            sealed: keyring.seal(sku, BLACKLIST_SEAL_ID, &text),
        })
    }
}

/// Longest SKU name.
pub const MAX_SKU_LEN: usize = 64;
/// Longest order id, user id or redeemer.
pub const MAX_ID_LEN: usize = 128;

/// Checks an identifier: 1..=`max` characters from `A-Z a-z 0-9 . _ : @ -`.
/// `what` names the field in the error message.
pub fn check_id(what: &str, value: &str, max: usize) -> Result<(), Error> {
    check_chars(what, value, max, b"._:@-", "A-Z a-z 0-9 . _ : @ -")
}

/// Checks that `value` has 1..=`max` characters, each an ASCII letter or digit or one of
/// `extra`; the message lists the allowed characters as `listed`.
fn check_chars(
    what: &str,
    value: &str,
    max: usize,
    extra: &[u8],
    listed: &str,
) -> Result<(), Error> {
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
        .position(|b| !(b.is_ascii_alphanumeric() || extra.contains(&b)))
    {
        return Err(Error::BadRequest(format!(
            "{what} has a character at position {} outside {listed}",
            pos + 1
        )));
    }
    Ok(())
}

/// Longest free-text reason (a void, a restore, a retired format, a pause), in bytes.
pub const MAX_REASON_LEN: usize = 500;

/// Checks a free-text reason an operator gives: one line of text, not blank, no control
/// characters, and no `|` (the engine's field separator). Its length is checked where it is
/// read ([`MAX_REASON_LEN`]).
pub fn check_reason(reason: &str) -> Result<(), Error> {
    if reason.trim().is_empty() || reason.contains(|c: char| c == '|' || c.is_control()) {
        return Err(Error::BadRequest(
            "field `reason` must be one line of text".into(),
        ));
    }
    Ok(())
}

/// Checks a SKU name: 1..=[`MAX_SKU_LEN`] characters from `A-Z a-z 0-9 . _ @ -`. Unlike
/// other identifiers no `:`: a SKU names its Redis keys (`kg:{<sku>}:avail`), whose parts
/// `:` separates.
pub fn check_sku(sku: &str) -> Result<(), Error> {
    check_chars("sku", sku, MAX_SKU_LEN, b"._@-", "A-Z a-z 0-9 . _ @ -")?;
    if crate::engine::keys::is_reserved_sku(sku) {
        return Err(Error::BadRequest(format!(
            "sku {sku} is reserved (ix0 to ixf name kamigate's code index)"
        )));
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
    fn the_index_shards_names_are_not_skus() {
        for reserved in ["ix0", "ix9", "ixa", "ixf"] {
            let message = check_sku(reserved).expect_err(reserved).to_string();
            assert!(message.contains("reserved"), "{message}");
        }
        for fine in ["ix", "ix10", "IX0", "ixg", "six0"] {
            assert!(check_sku(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn the_sku_rule_lists_what_it_allows() {
        for bad in ["a:b", "a b", "", "{tag}"] {
            let message = check_sku(bad).expect_err(bad).to_string();
            assert!(!message.contains(':'), "{bad:?}: {message}");
        }
        let message = check_sku("a:b").expect_err("colon").to_string();
        assert_eq!(
            message,
            "sku has a character at position 2 outside A-Z a-z 0-9 . _ @ -"
        );
        check_sku("gift-50.v2_eu@shop").expect("every listed character is allowed");
        assert!(check_sku(&"a".repeat(65)).is_err());
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

    fn ring(data: u8) -> Keyring {
        Keyring::new(&[("d1", [data; 32])], ("i1", [9; 32])).expect("valid")
    }

    #[test]
    fn a_sealed_blacklist_opens_for_its_sku_only_and_shows_a_count() {
        let codes = vec!["LEAK-0001".to_owned(), "leak-0002".to_owned()];
        let keyring = ring(1);
        let list = Blacklist::sealed(&codes, &keyring, "gift");
        let text = list.sealed_text().expect("sealed").to_owned();
        assert!(text.starts_with("e1.d1.") && !text.to_uppercase().contains("LEAK"));
        assert_eq!(list.codes(&keyring, "gift").expect("opens"), codes);
        assert!(list.codes(&keyring, "other").is_err(), "bound to its SKU");
        assert!(list.codes(&ring(2), "gift").is_err(), "bound to its key");
        // Not a key's code either: a key's local id is a number.
        assert!(keyring.open("gift", "1", &text).is_err());
        assert_eq!(format!("{list:?}"), "Blacklist(2 entries, sealed)");
        let config = SkuConfig {
            blacklist: list,
            ..SkuConfig::default()
        };
        let stored = serde_json::to_string(&config).expect("json");
        assert!(!stored.to_uppercase().contains("LEAK"), "{stored}");
        let back: SkuConfig = serde_json::from_str(&stored).expect("reads back");
        assert_eq!(back, config);
        assert_eq!(
            config.shown()["blacklist"],
            serde_json::json!({"entries": 2})
        );
        let digests = config.blacklist_digests(&keyring, "gift").expect("opens");
        assert!(digests.contains(&keyring.digest("LEAK0002")), "normalised");
        assert!(!Blacklist::sealed(&[], &keyring, "gift").in_clear());
    }

    #[test]
    fn settings_stored_before_sealing_read_as_a_clear_list() {
        let old: SkuConfig =
            serde_json::from_str(r#"{"blacklist":["TEST-0000"]}"#).expect("old settings");
        assert!(old.blacklist.in_clear());
        assert_eq!(old.blacklist.len(), 1);
        assert!(!SkuConfig::default().blacklist.in_clear());
    }

    #[test]
    fn defaults_are_valid() {
        SkuConfig::default().validate().expect("defaults validate");
    }

    #[test]
    fn only_a_changed_format_makes_a_new_version() {
        let first = {
            let mut c = SkuConfig::default();
            c.succeed(None, 10);
            c
        };
        assert_eq!((first.format_version, first.format_since_ms), (1, 10));
        let mut limits = first.clone();
        limits.per_user_limit = 3;
        limits.succeed(Some(&first), 20);
        assert_eq!(limits.format_version, 1, "other settings keep the version");
        assert!(limits.earlier_formats.is_empty());
        let mut stricter = limits.clone();
        stricter.format = Format::crockford32(16, 4, true);
        stricter.succeed(Some(&limits), 30);
        assert_eq!((stricter.format_version, stricter.format_since_ms), (2, 30));
        assert_eq!(stricter.earlier_formats.len(), 1);
        assert_eq!(stricter.earlier_formats[0].version, 1);
        assert_eq!(stricter.earlier_formats[0].format, Format::default());
        assert_eq!(stricter.earlier_formats[0].since_ms, 10);
        let versions: Vec<u32> = stricter.versions().map(|(v, _)| v).collect();
        assert_eq!(versions, [2, 1]);
    }

    #[test]
    fn a_code_is_malformed_only_when_it_fails_every_version_and_the_newest_gives_the_hint() {
        let mut old = SkuConfig::default();
        old.succeed(None, 1);
        let mut new = old.clone();
        new.format = Format::crockford32(16, 4, true);
        new.succeed(Some(&old), 2);
        let c = new
            .candidates("OLD-CODE-0001")
            .expect("valid under version 1");
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].version, c[0].canonical.as_str()), (1, "OLDCODE0001"));
        let generated = new.format.generate(&mut rand::rng());
        let c = new.candidates(&generated).expect("valid under version 2");
        assert_eq!(c[0].version, 2, "the newest version first");
        assert_eq!(
            c.len(),
            1,
            "the same canonical form under version 1 is looked up once"
        );
        let err = new.candidates("BAD CODE !").expect_err("fails both");
        assert!(matches!(
            err,
            Malformed::TooShort { .. } | Malformed::BadCharacter { .. }
        ));
        let strict = SkuConfig {
            format: Format {
                check: crate::code::Check::None,
                ..Format::crockford32(8, 0, false)
            },
            ..SkuConfig::default()
        };
        assert!(strict.candidates("!!").is_err());
    }
}
