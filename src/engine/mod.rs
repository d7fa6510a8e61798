//! The engine: where inventory state lives and changes.
//!
//! Every state change is one Lua script from `lua/` run atomically. Two engines run the very
//! same files behind [`ScriptEngine`] ([`script`] assembles them with the prelude):
//!
//! - [`redis::RedisEngine`] runs them in Redis as the functions of one library ([`LIBRARY`],
//!   `FCALL`, reloading when Redis lost it), standalone, Sentinel or Cluster. Production and
//!   scale.
//! - [`embedded::EmbeddedEngine`] runs them in-process with mlua (Lua 5.1, Redis's dialect)
//!   against [`keyspace::Keyspace`], an in-memory keyspace implementing exactly the
//!   `redis.call` commands the scripts use, one script at a time like Redis. Zero setup.
//!
//! Every key a script is given is named in [`keys`], in the order `lua/prelude.lua` lists.
//! Every script call is measured by [`measured::Measured`], wrapped around either engine.
//!
//! The engines only move [`Reply`] values; [`crate::inventory`] gives them domain meaning, so
//! the reply parsing is shared and one conformance suite covers both.
//!
//! [`stream_id::StreamId`] is the id of an event stream's entries, as the keyspace issues them
//! and the ledger writer compares them.

pub mod embedded;
pub mod keys;
pub mod keyspace;
pub mod measured;
pub mod redis;
pub mod script;
pub mod stream_id;

use std::any::Any;
use std::fmt;

use bytes::Bytes;
use futures_util::future::BoxFuture;

pub use script::{Library, Script, Scripts, LIBRARY, SCRIPTS};

/// A script's reply, converted the way Redis converts Lua values (`false`/`nil` → [`Reply::Nil`],
/// numbers truncated to integers, `{ok=…}` → [`Reply::Status`], tables → arrays up to the
/// first `nil`). `{err=…}` and runtime errors become [`EngineError::Script`] instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Nil,
    Int(i64),
    Bulk(Bytes),
    Status(String),
    Array(Vec<Reply>),
}

impl Reply {
    /// The reply as text, if it is a bulk string (or status) holding UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Reply::Bulk(b) => std::str::from_utf8(b).ok(),
            Reply::Status(s) => Some(s),
            _ => None,
        }
    }

    /// The reply as an integer: integer replies, and bulk strings holding a decimal integer
    /// (scripts return numbers inside arrays as strings to keep them exact).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Reply::Int(i) => Some(*i),
            Reply::Bulk(_) => self.as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// The elements of an array reply.
    pub fn as_array(&self) -> Option<&[Reply]> {
        match self {
            Reply::Array(items) => Some(items),
            _ => None,
        }
    }

    /// Element `i` of an array reply.
    pub fn item(&self, i: usize) -> Option<&Reply> {
        self.as_array()?.get(i)
    }
}

impl From<&str> for Reply {
    fn from(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }
}

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine cannot be reached or did not answer in time; the call may or may not have
    /// run (Redis), so callers retry only idempotent operations.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The script raised an error or returned one: a bug, never a client's fault.
    #[error("script {script} failed: {message}")]
    Script {
        script: &'static str,
        message: String,
    },
}

/// Runs the scripts of `lua/` atomically. The only seam between the domain and a store.
///
/// `Any`, so [`measured::measured`] can tell an engine it already wrapped.
pub trait ScriptEngine: Any + Send + Sync + 'static {
    /// Runs `script` with `KEYS` = `keys` and `ARGV` = `args`, atomically with respect to every
    /// other script on the same keys.
    ///
    /// The engine appends the call's deadline to `args` (`begin` in `lua/prelude.lua` takes it
    /// off again): a call either runs while its caller waits for it, or never.
    fn eval(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BoxFuture<'_, Result<Reply, EngineError>>;

    /// Whether hash `key` has `field`: a plain read, for edge checks that must stay cheaper
    /// than a script call (e.g. telling a retried order from a new one at sell-out).
    fn hexists(&self, key: String, field: String) -> BoxFuture<'_, Result<bool, EngineError>> {
        Box::pin(async move {
            let reply = self.eval(&SCRIPTS.exists, vec![key], vec![field]).await?;
            Ok(reply.as_i64() == Some(1))
        })
    }

    /// The value of `field` in hash `key` (`None` when absent), as text: a plain read, for
    /// edge checks like [`ScriptEngine::hexists`] (e.g. an order's retired fingerprint).
    fn hget(
        &self,
        key: String,
        field: String,
    ) -> BoxFuture<'_, Result<Option<String>, EngineError>> {
        Box::pin(async move {
            let args = vec![field, "get".into()];
            let reply = self.eval(&SCRIPTS.exists, vec![key], args).await?;
            Ok(reply.as_str().map(str::to_owned))
        })
    }

    /// The event writer's read of entries never delivered: `lua/stream.lua` `read` with
    /// `KEYS` = `keys` and `ARGV` = `args`, whose sources (`ARGV[6]`) are `n` only, with its
    /// reply. An engine may leave the entries to a plain `XREADGROUP … >` run in one
    /// transaction right after the script (given no sources), which then only acknowledges
    /// and reports: Lua need not copy every entry into a table and back into the reply.
    fn read_new_entries(
        &self,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BoxFuture<'_, Result<Reply, EngineError>> {
        self.eval(&SCRIPTS.stream, keys, args)
    }

    /// Answers when the engine can serve scripts (readiness).
    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>>;

    /// `"redis"` or `"embedded"`, for logs, metrics and `/readyz`.
    fn kind(&self) -> EngineKind;
}

/// A read of new entries as [`ScriptEngine::read_new_entries`] answers it, from the two parts
/// an engine may run it in: `head`, `stream.lua`'s reply to the read with no sources (the
/// acknowledgements and the report, no entries), and `fresh`, the reply of the
/// `XREADGROUP … >` run right after it. The entries join the head as if the script had read
/// them, counted as `new`. Errs with what did not have the expected shape.
pub(crate) fn with_new_entries(head: Reply, fresh: Reply) -> Result<Reply, String> {
    let Reply::Array(mut reply) = head else {
        return Err("read answered no array".into());
    };
    let entries = stream_entries(fresh).ok_or("XREADGROUP answered no stream")?;
    // An entry deleted by hand comes back without fields: never committable, as the
    // script's own reads skip it.
    let before = reply.len();
    reply.extend(entries.into_iter().filter(|e| {
        e.as_array()
            .is_some_and(|e| matches!(e.get(1), Some(Reply::Array(_))))
    }));
    let new = i64::try_from(reply.len() - before).unwrap_or(i64::MAX);
    match reply.get_mut(6) {
        Some(slot @ Reply::Int(0)) => *slot = Reply::Int(new),
        _ => return Err("read answered no head".into()),
    }
    Ok(Reply::Array(reply))
}

/// The entries of an `XREADGROUP` reply naming one stream: `[[name, entries]]` in RESP2,
/// `[name, entries]` once a RESP3 map is flattened; nil when nothing was new.
fn stream_entries(reply: Reply) -> Option<Vec<Reply>> {
    let Reply::Array(items) = reply else {
        return matches!(reply, Reply::Nil).then(Vec::new);
    };
    let pair = match <[Reply; 1]>::try_from(items) {
        Ok([Reply::Array(pair)]) => pair,
        Ok(_) => return None,
        Err(items) => items,
    };
    match <[Reply; 2]>::try_from(pair) {
        Ok([_, Reply::Array(entries)]) => Some(entries),
        _ => None,
    }
}

/// Which engine is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Redis,
    Embedded,
}

impl EngineKind {
    /// `"redis"` or `"embedded"`: a metric label that costs no allocation.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Redis => "redis",
            EngineKind::Embedded => "embedded",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
