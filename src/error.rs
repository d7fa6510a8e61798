//! The one error type of the API: its code, HTTP status and JSON envelope live here together,
//! so a client's view of a failure is decided in a single place.
//!
//! Messages never contain a secret code: they describe what was wrong and where, not what
//! was sent. Internal errors tell the client "something went wrong" and are logged once,
//! with their details, where they are turned into a response.

use http::StatusCode;
use serde_json::{json, Map, Value};

use crate::code::Malformed;
use crate::engine::EngineError;
use crate::ledger::writer::WriterError;
use crate::ledger::LedgerError;

/// Everything a request can fail with. Each variant is one documented `ERR_…` code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("{0} not found")]
    NotFound(String),
    /// The caller is known but may not do this (a channel selling a SKU not on its list).
    #[error("{0}")]
    Forbidden(String),
    #[error("method not allowed")]
    MethodNotAllowed {
        /// The route's methods, as the `Allow` header lists them (`"GET, PUT"`).
        allow: String,
    },
    #[error("request body is larger than {limit_bytes} bytes")]
    PayloadTooLarge { limit_bytes: u64 },
    #[error("request target is longer than {limit_bytes} bytes")]
    UriTooLong { limit_bytes: usize },
    #[error("request headers exceed {limit_bytes} bytes or {limit_headers} lines")]
    HeadersTooLarge {
        limit_bytes: usize,
        limit_headers: usize,
    },
    #[error("code is malformed")]
    CardMalformed(Malformed),
    #[error("no redeemable card with this code")]
    CardInvalid,
    #[error("card was already redeemed")]
    CardUsed {
        redeemed_at_ms: u64,
        masked_redeemer: String,
    },
    #[error("card has expired")]
    CardExpired { expires_at_ms: u64 },
    #[error("sold out")]
    SoldOut,
    #[error("per-user limit of {limit} codes reached")]
    UserLimit { current: u64, limit: u64 },
    #[error("{0}")]
    OrderConflict(String),
    #[error("the hold lapsed or was released")]
    HoldExpired,
    /// An upload is still filling the import batch: another upload of it, or its activation,
    /// has to wait until it finished.
    #[error("{0}")]
    BatchInProgress(String),
    /// A format version still has sold keys nobody redeemed.
    #[error("format version {version} has {unredeemed} sold keys not redeemed yet")]
    FormatInUse { version: u32, unredeemed: u64 },
    /// A stock pool does not hold what a move asked of it ([`crate::inventory::PoolChange`]).
    #[error("{message}")]
    PoolConflict { message: String, level: u64 },
    #[error("too many requests")]
    RateLimited { retry_after_ms: u64 },
    #[error("too many failed redemptions")]
    LockedOut { retry_after_ms: u64 },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// An operator paused this action for the SKU or the whole gateway ([`crate::pause`]).
    /// The operator's reason stays on the admin side: it is not the client's business.
    #[error("{action} are paused {}", if *gateway_wide { "on this gateway" } else { "for this SKU" })]
    Paused {
        /// `claims` or `redemptions`.
        action: &'static str,
        /// Whether the pause covers every SKU.
        gateway_wide: bool,
        retry_after_ms: u64,
    },
    /// The channel's circuit breaker is open ([`crate::channel::Breaker`]): too many of its
    /// recent requests failed the way a broken integration fails.
    #[error("channel {channel} is shed: too many of its recent requests failed")]
    ChannelShed {
        channel: String,
        retry_after_ms: u64,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "ERR_BAD_REQUEST",
            Error::Unauthorized => "ERR_UNAUTHORIZED",
            Error::NotFound(_) => "ERR_NOT_FOUND",
            Error::Forbidden(_) => "ERR_FORBIDDEN",
            Error::MethodNotAllowed { .. } => "ERR_METHOD_NOT_ALLOWED",
            Error::PayloadTooLarge { .. } => "ERR_PAYLOAD_TOO_LARGE",
            Error::UriTooLong { .. } => "ERR_URI_TOO_LONG",
            Error::HeadersTooLarge { .. } => "ERR_HEADERS_TOO_LARGE",
            Error::CardMalformed(_) => "ERR_CARD_MALFORMED",
            Error::CardInvalid => "ERR_CARD_INVALID",
            Error::CardUsed { .. } => "ERR_CARD_USED",
            Error::CardExpired { .. } => "ERR_CARD_EXPIRED",
            Error::SoldOut => "ERR_SOLD_OUT",
            Error::UserLimit { .. } => "ERR_USER_LIMIT",
            Error::OrderConflict(_) => "ERR_ORDER_CONFLICT",
            Error::HoldExpired => "ERR_HOLD_EXPIRED",
            Error::BatchInProgress(_) => "ERR_BATCH_IN_PROGRESS",
            Error::FormatInUse { .. } => "ERR_FORMAT_IN_USE",
            Error::PoolConflict { .. } => "ERR_POOL_CONFLICT",
            Error::RateLimited { .. } => "ERR_RATE_LIMITED",
            Error::LockedOut { .. } => "ERR_LOCKED_OUT",
            Error::Unavailable(_) => "ERR_UNAVAILABLE",
            Error::Paused { .. } => "ERR_PAUSED",
            Error::ChannelShed { .. } => "ERR_UNAVAILABLE",
            Error::Internal(_) => "ERR_INTERNAL",
        }
    }

    /// The HTTP status the code is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::NotFound(_) | Error::CardInvalid => StatusCode::NOT_FOUND,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            Error::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Error::CardMalformed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::CardExpired { .. } => StatusCode::GONE,
            Error::CardUsed { .. }
            | Error::SoldOut
            | Error::UserLimit { .. }
            | Error::OrderConflict(_)
            | Error::HoldExpired
            | Error::BatchInProgress(_)
            | Error::FormatInUse { .. }
            | Error::PoolConflict { .. } => StatusCode::CONFLICT,
            Error::RateLimited { .. } | Error::LockedOut { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) | Error::Paused { .. } | Error::ChannelShed { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds for a `Retry-After` header, for the errors that have one.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Error::RateLimited { retry_after_ms }
            | Error::LockedOut { retry_after_ms }
            | Error::Paused { retry_after_ms, .. }
            | Error::ChannelShed { retry_after_ms, .. } => {
                Some(retry_after_ms.div_ceil(1000).max(1))
            }
            Error::Unavailable(_) => Some(1),
            _ => None,
        }
    }

    /// The JSON envelope: `{"error":{"code","message","hint",…details}}`.
    pub fn envelope(&self) -> Value {
        let mut body = Map::new();
        body.insert("code".into(), self.code().into());
        let message = match self {
            // Details of internal failures stay in the logs.
            Error::Internal(_) => "something went wrong".to_string(),
            other => other.to_string(),
        };
        body.insert("message".into(), message.into());
        if let Some(hint) = self.hint() {
            body.insert("hint".into(), hint.into());
        }
        match self {
            Error::CardUsed {
                redeemed_at_ms,
                masked_redeemer,
            } => {
                body.insert("redeemed_at".into(), timestamp(*redeemed_at_ms).into());
                body.insert("redeemer".into(), masked_redeemer.clone().into());
            }
            Error::CardExpired { expires_at_ms } => {
                body.insert("expires_at".into(), timestamp(*expires_at_ms).into());
            }
            Error::UserLimit { current, limit } => {
                body.insert("current".into(), (*current).into());
                body.insert("limit".into(), (*limit).into());
            }
            Error::RateLimited { retry_after_ms } | Error::LockedOut { retry_after_ms } => {
                body.insert("retry_after_ms".into(), (*retry_after_ms).into());
            }
            Error::Paused {
                action,
                gateway_wide,
                retry_after_ms,
            } => {
                body.insert("paused".into(), (*action).into());
                let scope = if *gateway_wide { "gateway" } else { "sku" };
                body.insert("scope".into(), scope.into());
                body.insert("retry_after_ms".into(), (*retry_after_ms).into());
            }
            Error::ChannelShed {
                channel,
                retry_after_ms,
            } => {
                body.insert("channel".into(), channel.clone().into());
                body.insert("breaker".into(), "open".into());
                body.insert("retry_after_ms".into(), (*retry_after_ms).into());
            }
            Error::PayloadTooLarge { limit_bytes } => {
                body.insert("limit_bytes".into(), (*limit_bytes).into());
            }
            Error::PoolConflict { level, .. } => {
                body.insert("level".into(), (*level).into());
            }
            Error::UriTooLong { limit_bytes } => {
                body.insert("limit_bytes".into(), (*limit_bytes).into());
            }
            Error::HeadersTooLarge {
                limit_bytes,
                limit_headers,
            } => {
                body.insert("limit_bytes".into(), (*limit_bytes).into());
                body.insert("limit_headers".into(), (*limit_headers).into());
            }
            _ => {}
        }
        json!({ "error": body })
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            Error::CardMalformed(why) => why.to_string(),
            Error::Unauthorized => "send `Authorization: Bearer <token>`".into(),
            Error::MethodNotAllowed { allow } => format!("this route accepts {allow}"),
            Error::SoldOut => "no codes are left for this SKU".into(),
            Error::HoldExpired => "claim again with a new order_id".into(),
            Error::OrderConflict(_) => "retries must repeat the original request exactly".into(),
            Error::BatchInProgress(_) => {
                "retry once the running upload has finished: an upload retried then answers \
                 its counts (or imports afresh if it failed), an activation goes through"
                    .into()
            }
            Error::Unavailable(_) => "retry after the Retry-After interval".into(),
            Error::ChannelShed { .. } => {
                "the channel's bad requests, conflicts and unknown orders tripped its breaker; \
                 fix them, then a few requests pass as probes after the Retry-After interval"
                    .into()
            }
            Error::Forbidden(_) => {
                "an admin lists the SKUs a channel may sell with PUT /v1/channels/{channel}".into()
            }
            Error::Paused { action, .. } => {
                if *action == "claims" {
                    "retry after the Retry-After interval; orders claimed before the pause are \
                     answered as before"
                        .into()
                } else {
                    "retry after the Retry-After interval; redemptions made before the pause are \
                     answered as before"
                        .into()
                }
            }
            Error::FormatInUse { .. } => {
                "wait until they are redeemed, or send `\"force\": true` to void them too".into()
            }
            _ => return None,
        })
    }
}

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Error {
        match e {
            EngineError::Unavailable(why) => Error::Unavailable(why),
            script @ EngineError::Script { .. } => Error::Internal(script.to_string()),
        }
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds, the API's time format.
pub fn timestamp(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Masks an identifier for display to others: `user-42` → `us****42`.
pub fn mask(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 4 {
        return "*".repeat(chars.len().max(4));
    }
    let head: String = chars[..2].iter().collect();
    let tail: String = chars[chars.len() - 2..].iter().collect();
    format!("{head}****{tail}")
}

impl From<LedgerError> for Error {
    fn from(e: LedgerError) -> Error {
        match e {
            LedgerError::Unavailable(why) => Error::Unavailable(format!("ledger: {why}")),
            LedgerError::NotFound(what) => Error::NotFound(what),
            LedgerError::BatchBusy(why) => Error::BatchInProgress(why),
            other => Error::Internal(format!("ledger: {other}")),
        }
    }
}

impl From<WriterError> for Error {
    fn from(e: WriterError) -> Error {
        match e {
            WriterError::Engine(e) => e.into(),
            WriterError::Ledger(e) => e.into(),
            reply @ WriterError::Reply(_) => Error::Internal(reply.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_all_but_the_ends() {
        assert_eq!(mask("user-42"), "us****42");
        assert_eq!(mask("abc"), "****");
        assert_eq!(mask("abcde"), "ab****de");
    }

    #[test]
    fn internal_details_stay_out_of_the_envelope() {
        let e = Error::Internal("connection pool poisoned at 10.0.0.3".into());
        let body = e.envelope().to_string();
        assert!(!body.contains("10.0.0.3"));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn a_pause_is_a_503_with_its_own_code_and_retry_after() {
        let e = Error::Paused {
            action: "claims",
            gateway_wide: false,
            retry_after_ms: 30_000,
        };
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code(), "ERR_PAUSED");
        assert_eq!(e.retry_after_secs(), Some(30));
        let body = e.envelope();
        assert_eq!(body["error"]["paused"], "claims");
        assert_eq!(body["error"]["scope"], "sku");
        assert_eq!(body["error"]["message"], "claims are paused for this SKU");
    }

    #[test]
    fn throttles_carry_retry_after() {
        let e = Error::RateLimited {
            retry_after_ms: 1500,
        };
        assert_eq!(e.retry_after_secs(), Some(2));
        assert_eq!(e.envelope()["error"]["retry_after_ms"], 1500);
    }
}
