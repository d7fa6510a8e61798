//! Selling channels: the doors a SKU's codes sell through (the merchant's own shop, a
//! reseller, a marketplace), each with its own bearer tokens, token bucket, SKU list and
//! circuit breaker, so one channel's broken integration or runaway retry loop stays its own
//! problem.
//!
//! # Who is which channel
//!
//! Every merchant request is made by exactly one channel: the one whose token it carries.
//! The configured merchant token (`KAMIGATE_MERCHANT_TOKEN`, or the generated one) is the
//! channel [`DEFAULT`], so a gateway without channels behaves as before. Channels and their
//! tokens live in the ledger ([`crate::ledger::Ledger::channels`]); each gateway
//! authenticates from an in-memory view ([`Channels`]) re-read every `channel_refresh_ms`,
//! and at once after a change made through it. Tokens are kept as SHA-256 digests: a token
//! is shown once, when it is made, and a ledger dump authenticates nobody.
//!
//! # Orders are namespaced per channel
//!
//! The same `order_id` from two channels is two orders. Identifiers sent by clients never
//! contain `/` ([`crate::sku::check_id`]), so the engine and the ledger know a channel's
//! order as `<channel>/<order_id>` ([`Channel::scoped`]), and its users as
//! `<channel>/<user_id>` (per-user limits count per channel: two resellers' `u-1` are two
//! people). The default channel's orders keep their bare ids, as before channels existed.
//! Answers always show the id the client sent ([`order_name`]).

mod breaker;
mod registry;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

pub use breaker::{Breaker, BreakerRule, BreakerState};
pub use registry::{token_digest, Channel, Channels, Defaults};

use crate::error::Error;
use crate::limit::BucketRule;
use crate::sku::check_sku;

/// The channel of the configured merchant token.
pub const DEFAULT: &str = "default";
/// Longest channel name.
pub const MAX_CHANNEL_LEN: usize = 32;
/// Most channels a ledger may hold: channel names are a metric label, so their number stays
/// bounded.
pub const MAX_CHANNELS: usize = 64;
/// Most SKUs one channel's list may name.
pub const MAX_CHANNEL_SKUS: usize = 1000;
/// Most live tokens one channel may have at once (rotation needs two).
pub const MAX_LIVE_TOKENS: usize = 8;
/// Longest token label.
pub const MAX_LABEL_LEN: usize = 100;
/// Separates a channel's name from an order or user id inside the engine and the ledger.
const SCOPE: char = '/';

/// A channel's settings, as sent to `PUT /v1/channels/{channel}`. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelConfig {
    /// The SKUs the channel may sell; `None`: every SKU.
    pub skus: Option<Vec<String>>,
    /// The channel's token bucket, shared by all its tokens; `None`: the gateway's
    /// `limits.merchant` rule.
    pub limits: Option<BucketRule>,
    /// When its requests are shed because too many of them failed; `None`: the gateway's
    /// `channel_breaker` settings, except for the default channel, which has no breaker
    /// unless its settings name one (the merchant token behaves as before channels).
    pub breaker: Option<BreakerRule>,
    /// Free text for operators.
    pub description: Option<String>,
    /// Whether its claims take only from its own stock pool of each SKU, never from the
    /// shared remainder (codes no pool reserves).
    pub own_pool_only: bool,
}

impl ChannelConfig {
    /// Checks the settings an admin sent.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(skus) = &self.skus {
            if skus.len() > MAX_CHANNEL_SKUS {
                return Err(Error::BadRequest(format!(
                    "field `skus` lists more than {MAX_CHANNEL_SKUS} SKUs"
                )));
            }
            for sku in skus {
                check_sku(sku)?;
            }
        }
        if let Some(limits) = &self.limits {
            limits
                .validate("limits")
                .map_err(|e| Error::BadRequest(e.to_string()))?;
        }
        if let Some(breaker) = &self.breaker {
            breaker.validate()?;
        }
        if let Some(description) = &self.description {
            if description.len() > 500 || description.contains(char::is_control) {
                return Err(Error::BadRequest(
                    "field `description` must be one line of at most 500 bytes".into(),
                ));
            }
        }
        Ok(())
    }

    /// Whether the channel may sell `sku`.
    pub fn sells(&self, sku: &str) -> bool {
        self.skus
            .as_ref()
            .is_none_or(|skus| skus.iter().any(|s| s == sku))
    }
}

/// Checks a channel name: 1..=[`MAX_CHANNEL_LEN`] characters from `a-z 0-9 . _ -`. Lower
/// case only, so two channels never differ by case alone in a statement or a dashboard.
pub fn check_channel(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > MAX_CHANNEL_LEN {
        return Err(Error::BadRequest(format!(
            "a channel name has 1 to {MAX_CHANNEL_LEN} characters"
        )));
    }
    if let Some(pos) = name
        .bytes()
        .position(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)))
    {
        return Err(Error::BadRequest(format!(
            "the channel name has a character at position {} outside a-z 0-9 . _ -",
            pos + 1
        )));
    }
    Ok(())
}

/// The engine's and ledger's name of `channel`'s order or user `id`: the id itself for the
/// default channel, `<channel>/<id>` for the others.
pub fn scoped<'a>(channel: &str, id: &'a str) -> Cow<'a, str> {
    if channel == DEFAULT {
        Cow::Borrowed(id)
    } else {
        Cow::Owned(format!("{channel}{SCOPE}{id}"))
    }
}

/// The id a client sent, from the engine's or ledger's name of an order ([`scoped`]).
pub fn order_name(key: &str) -> &str {
    key.split_once(SCOPE).map_or(key, |(_, id)| id)
}

/// The channel an order belongs to, from its engine or ledger name ([`scoped`]).
pub fn order_channel(key: &str) -> &str {
    key.split_once(SCOPE)
        .map_or(DEFAULT, |(channel, _)| channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_of_two_channels_never_share_a_name() {
        assert_eq!(scoped(DEFAULT, "o-1"), "o-1");
        assert_eq!(scoped("shop-b", "o-1"), "shop-b/o-1");
        assert_ne!(scoped("a", "b.c"), scoped("a.b", "c"));
        for key in ["o-1", "shop-b/o-1"] {
            assert_eq!(order_name(key), "o-1");
        }
        assert_eq!(order_channel("o-1"), DEFAULT);
        assert_eq!(order_channel("shop-b/o-1"), "shop-b");
    }

    #[test]
    fn channel_names_are_short_lower_case_words() {
        for good in ["default", "shop", "market-1", "a.b_c"] {
            assert!(check_channel(good).is_ok(), "{good}");
        }
        for bad in ["", "Shop", "a/b", "a b", "é", &"x".repeat(33)] {
            assert!(check_channel(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_sku_list_restricts_what_a_channel_sells() {
        let all = ChannelConfig::default();
        assert!(all.sells("anything"));
        let some = ChannelConfig {
            skus: Some(vec!["a".into()]),
            ..ChannelConfig::default()
        };
        assert!(some.sells("a"));
        assert!(!some.sells("b"));
    }

    #[test]
    fn settings_are_checked() {
        let bad_sku = ChannelConfig {
            skus: Some(vec!["a:b".into()]),
            ..ChannelConfig::default()
        };
        assert!(bad_sku.validate().is_err());
        let unknown: Result<ChannelConfig, _> = serde_json::from_str(r#"{"pool": 3}"#);
        assert!(unknown.is_err());
    }
}
