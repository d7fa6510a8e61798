//! An in-memory keyspace implementing exactly the Redis commands the scripts of `lua/` call.
//!
//! The embedded engine runs the very same Lua scripts as Redis, so every `redis.call` must
//! behave as it does on Redis 7.0: the same replies (a missing key reads as `nil`, `LPOP key 2`
//! on a missing key is a nil array, scores come back as strings), the same argument parsing and
//! error texts (`ERR wrong number of arguments for 'hget' command`, `WRONGTYPE …`), and the same
//! data rules (an emptied hash, list, set or sorted set no longer exists; streams do). A script
//! that passes the conformance suite here then passes it on Redis, and the other way round.
//!
//! It is deliberately not a general Redis:
//!
//! - Only the commands listed by [`Keyspace::supports`] exist; anything else fails with Redis's
//!   unknown-command error. `tests/lua_commands.rs` checks that every command (and subcommand)
//!   named in `lua/` is supported, so a script cannot quietly come to depend on a command only
//!   Redis has, and that every one supported is named in `lua/`, so the emulation grows no
//!   wider than its callers.
//! - It is driven through `&mut self`: the engine owns it on one thread and runs one script at a
//!   time, which is what makes each script atomic, as in Redis. No locking is needed.
//! - Expiry is lazy: a key whose time has passed is removed when a command next touches it,
//!   judged by an injected [`Clock`] so tests can move time. There is no background sweep; the
//!   scripts keep time-based state in sorted sets rather than relying on key TTLs.
//! - Iteration order of hashes and sets is unspecified, as it is for large ones in Redis.
//!
//! # Layout
//!
//! This file holds what every command shares: the stored values, typed access with Redis's
//! WRONGTYPE rule, lazy expiry, and argument and error helpers. The rest, each file with its
//! unit tests:
//!
//! - `command.rs`: the command table and dispatch ([`Keyspace::call`])
//! - `keys.rs`: `DEL`, `EXISTS`, `PEXPIRE`
//! - `hash.rs`, `list.rs`, `set.rs`, `zset.rs`: hashes, lists, sets, sorted sets
//! - `stream/`: streams and their consumer groups
//! - `number.rs`: integers and doubles as Redis parses and prints them

mod command;
mod hash;
mod keys;
mod list;
mod number;
mod set;
mod stream;
mod zset;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;

use bytes::Bytes;

use crate::clock::{Clock, SystemClock};

pub(crate) use number::format_g17;
use number::parse_i64;
use stream::Stream;
use zset::ZSet;

/// A command's reply, shaped like RESP2 so the Lua glue converts it the way Redis does.
/// Error replies are the `Err` side of [`Keyspace::call`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// A nil bulk string or nil array (Lua sees `false`).
    Nil,
    Int(i64),
    Bulk(Bytes),
    /// A status reply such as `OK` (Lua sees `{ok = "OK"}`).
    Status(&'static str),
    Array(Vec<Resp>),
}

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
const NOT_FLOAT: &str = "ERR value is not a valid float";
const MIN_MAX_NOT_FLOAT: &str = "ERR min or max is not a float";
const SYNTAX: &str = "ERR syntax error";
const OVERFLOW: &str = "ERR increment or decrement would overflow";
const NOT_POSITIVE: &str = "ERR value is out of range, must be positive";
const HASH_NOT_INTEGER: &str = "ERR hash value is not an integer";

type Result<T> = std::result::Result<T, String>;
/// A stored value.
enum Data {
    Hash(Hash),
    List(List),
    Set(Set),
    ZSet(ZSet),
    Stream(Stream),
}

type Hash = HashMap<Bytes, Bytes>;
type List = VecDeque<Bytes>;
type Set = HashSet<Bytes>;

impl Data {
    /// Whether Redis would delete the key: emptied collections vanish, streams don't.
    fn is_empty_collection(&self) -> bool {
        match self {
            Data::Hash(h) => h.is_empty(),
            Data::List(l) => l.is_empty(),
            Data::Set(s) => s.is_empty(),
            Data::ZSet(z) => z.scores.is_empty(),
            Data::Stream(_) => false,
        }
    }
}

/// A type of value a key can hold, and how it sits in [`Data`]. Commands reach values through
/// [`Keyspace::value`] and its siblings, which answer WRONGTYPE for a key of another type.
trait Value: Default {
    fn of(data: &Data) -> Option<&Self>;
    fn of_mut(data: &mut Data) -> Option<&mut Self>;
    fn into_data(self) -> Data;
}

macro_rules! value_type {
    ($variant:ident, $ty:ty) => {
        impl Value for $ty {
            fn of(data: &Data) -> Option<&$ty> {
                match data {
                    Data::$variant(v) => Some(v),
                    _ => None,
                }
            }

            fn of_mut(data: &mut Data) -> Option<&mut $ty> {
                match data {
                    Data::$variant(v) => Some(v),
                    _ => None,
                }
            }

            fn into_data(self) -> Data {
                Data::$variant(self)
            }
        }
    };
}

value_type!(Hash, Hash);
value_type!(List, List);
value_type!(Set, Set);
value_type!(ZSet, ZSet);
value_type!(Stream, Stream);

struct Entry {
    data: Data,
    /// Absolute expiry in ms; the key is gone once the clock is past it.
    expires_at: Option<u64>,
}

impl Entry {
    fn new(data: Data) -> Entry {
        Entry {
            data,
            expires_at: None,
        }
    }
}

/// The in-memory keyspace. See the module documentation.
pub struct Keyspace {
    entries: HashMap<Bytes, Entry>,
    clock: Box<dyn Clock>,
}

impl fmt::Debug for Keyspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyspace")
            .field("keys", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl Default for Keyspace {
    fn default() -> Keyspace {
        Keyspace::new()
    }
}

impl Keyspace {
    /// An empty keyspace on the wall clock.
    pub fn new() -> Keyspace {
        Keyspace::with_clock(SystemClock)
    }

    /// An empty keyspace on `clock`, e.g. a test's movable clock.
    pub fn with_clock(clock: impl Clock) -> Keyspace {
        Keyspace {
            entries: HashMap::new(),
            clock: Box::new(clock),
        }
    }

    // ---- access ----------------------------------------------------------------------------

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Lazy expiry: drops `key` if its time has passed (Redis: expired once now > expiry).
    fn expire_if_needed(&mut self, key: &[u8]) {
        let Some(at) = self.entries.get(key).and_then(|e| e.expires_at) else {
            return;
        };
        if self.now() > at {
            self.entries.remove(key);
        }
    }

    fn read(&mut self, key: &[u8]) -> Option<&Entry> {
        self.expire_if_needed(key);
        self.entries.get(key)
    }

    fn write(&mut self, key: &[u8]) -> Option<&mut Entry> {
        self.expire_if_needed(key);
        self.entries.get_mut(key)
    }

    /// Deletes `key` if a command just emptied its collection, as Redis does.
    fn drop_if_empty(&mut self, key: &[u8]) {
        if self
            .entries
            .get(key)
            .is_some_and(|e| e.data.is_empty_collection())
        {
            self.entries.remove(key);
        }
    }

    /// The value at `key` if it exists and has type `T`; WRONGTYPE otherwise.
    fn value<T: Value>(&mut self, key: &[u8]) -> Result<Option<&T>> {
        match self.read(key) {
            None => Ok(None),
            Some(entry) => T::of(&entry.data).map(Some).ok_or_else(|| WRONGTYPE.into()),
        }
    }

    fn value_mut<T: Value>(&mut self, key: &[u8]) -> Result<Option<&mut T>> {
        match self.write(key) {
            None => Ok(None),
            Some(entry) => T::of_mut(&mut entry.data)
                .map(Some)
                .ok_or_else(|| WRONGTYPE.into()),
        }
    }

    /// The value at `key`, created empty if missing. Callers always add to it.
    fn value_or_create<T: Value>(&mut self, key: &Bytes) -> Result<&mut T> {
        self.expire_if_needed(key);
        let entry = self
            .entries
            .entry(key.clone())
            .or_insert_with(|| Entry::new(T::default().into_data()));
        T::of_mut(&mut entry.data).ok_or_else(|| WRONGTYPE.into())
    }
}

fn is(arg: &[u8], word: &str) -> bool {
    arg.eq_ignore_ascii_case(word.as_bytes())
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn bulk_or_nil(value: Option<&Bytes>) -> Resp {
    value.map_or(Resp::Nil, |v| Resp::Bulk(v.clone()))
}

fn int_bytes(n: i64) -> Bytes {
    Bytes::from(n.to_string())
}

fn int_arg(arg: &[u8]) -> Result<i64> {
    parse_i64(arg).ok_or_else(|| NOT_INTEGER.into())
}

fn arity_error(command: &str) -> String {
    format!(
        "ERR wrong number of arguments for '{}' command",
        command.to_ascii_lowercase()
    )
}

/// An argument quoted in an error message.
fn text(arg: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(arg)
}

/// At most 128 characters of `arg`, as Redis's `%.128s`.
fn text_128(arg: &[u8]) -> String {
    text(arg).chars().take(128).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
    use std::sync::Arc;

    use super::*;

    /// A keyspace whose clock the test moves.
    pub(super) fn keyspace() -> (Keyspace, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(1_000_000));
        let clock = Arc::clone(&now);
        (
            Keyspace::with_clock(move || clock.load(AtomicOrdering::SeqCst)),
            now,
        )
    }

    fn run(ks: &mut Keyspace, line: &str) -> Result<Resp> {
        let args: Vec<Bytes> = line
            .split_whitespace()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect();
        ks.call(&args)
    }

    pub(super) fn ok(ks: &mut Keyspace, line: &str) -> Resp {
        run(ks, line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    pub(super) fn err(ks: &mut Keyspace, line: &str) -> String {
        match run(ks, line) {
            Ok(r) => panic!("{line}: expected an error, got {r:?}"),
            Err(e) => e,
        }
    }

    pub(super) fn bulk(s: &str) -> Resp {
        Resp::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    pub(super) fn bulks(items: &[&str]) -> Resp {
        Resp::Array(items.iter().map(|s| bulk(s)).collect())
    }

    pub(super) fn sorted(r: Resp) -> Resp {
        match r {
            Resp::Array(mut items) => {
                items.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
                Resp::Array(items)
            }
            other => other,
        }
    }

    // State the scripts never read back, inspected through the keyspace itself rather than
    // through commands kept only for tests.

    /// What Redis's `TYPE` would answer.
    pub(super) fn type_of(ks: &mut Keyspace, key: &str) -> &'static str {
        match ks.read(key.as_bytes()).map(|e| &e.data) {
            None => "none",
            Some(Data::Hash(_)) => "hash",
            Some(Data::List(_)) => "list",
            Some(Data::Set(_)) => "set",
            Some(Data::ZSet(_)) => "zset",
            Some(Data::Stream(_)) => "stream",
        }
    }

    #[test]
    fn time_is_the_clock_in_seconds_and_microseconds() {
        let (mut ks, now) = keyspace();
        now.store(1_700_000_123_456, AtomicOrdering::SeqCst);
        assert_eq!(ok(&mut ks, "TIME"), bulks(&["1700000123", "456000"]));
        assert!(err(&mut ks, "TIME now").starts_with("ERR wrong number of arguments"));
    }

    #[test]
    fn wrongtype_everywhere() {
        let (mut ks, _) = keyspace();
        ok(&mut ks, "HSET h f v");
        ok(&mut ks, "RPUSH l v");
        for line in [
            "HGET l f",
            "HSET l f v",
            "HSETNX l f v",
            "HMGET l f",
            "HINCRBY l f 1",
            "HDEL l f",
            "HEXISTS l f",
            "LPUSH h x",
            "RPUSH h x",
            "LPOP h",
            "LPOP h 2",
            "SADD h x",
            "SMEMBERS h",
            "ZADD h 1 m",
            "ZCARD h",
            "ZREM h m",
            "ZRANGEBYSCORE h -inf +inf",
            "ZRANGE h 0 -1",
            "ZREMRANGEBYSCORE h -inf +inf",
            "XADD h * f v",
            "XRANGE h - +",
            "XLEN h",
            "XTRIM h MAXLEN 1",
            "XGROUP CREATE h g $ MKSTREAM",
            "XGROUP DELCONSUMER h g c",
            "XREADGROUP GROUP g c STREAMS h >",
            "XACK h g 1-1",
            "XPENDING h g",
            "XAUTOCLAIM h g c 0 0",
            "XINFO GROUPS h",
            "XINFO CONSUMERS h g",
        ] {
            assert_eq!(err(&mut ks, line), WRONGTYPE, "{line}");
        }
    }
}
