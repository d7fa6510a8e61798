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
//! Streams, consumer groups included, live in their own file (`keyspace_streams.rs`), a child
//! module sharing this one's helpers.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;

use bytes::Bytes;

use crate::clock::{Clock, SystemClock};

#[path = "keyspace_streams.rs"]
mod streams;

use streams::Stream;

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
const NO_ARGUMENTS: &str = "ERR Please specify at least one argument for this redis lib call";

type Result<T> = std::result::Result<T, String>;
type Handler = fn(&mut Keyspace, &[Bytes]) -> Result<Resp>;

/// One supported command: its name, Redis's arity (negative: at least that many arguments,
/// the name included) and what runs it.
struct Command {
    name: &'static str,
    arity: i32,
    run: Run,
}

/// What a command runs.
enum Run {
    Handler(Handler),
    /// A container command of Redis 7 (`XGROUP`, `XINFO`): its first argument names the
    /// subcommand to run, sorted by name (a unit test checks the order).
    Container(&'static [Subcommand]),
}

/// A subcommand of a container command. Its arity counts the command's and its own name.
struct Subcommand {
    name: &'static str,
    arity: i32,
    run: Handler,
}

const fn command(name: &'static str, arity: i32, run: Handler) -> Command {
    Command {
        name,
        arity,
        run: Run::Handler(run),
    }
}

const fn container(name: &'static str, arity: i32, subcommands: &'static [Subcommand]) -> Command {
    Command {
        name,
        arity,
        run: Run::Container(subcommands),
    }
}

const fn subcommand(name: &'static str, arity: i32, run: Handler) -> Subcommand {
    Subcommand { name, arity, run }
}

/// Every supported command, sorted by name for binary search (a unit test checks the order).
/// Exactly the commands and subcommands `lua/` calls: `tests/lua_commands.rs` checks both ways.
const COMMANDS: &[Command] = &[
    command("DEL", -2, Keyspace::del),
    command("EXISTS", -2, Keyspace::exists),
    command("HDEL", -3, Keyspace::hdel),
    command("HEXISTS", 3, Keyspace::hexists),
    command("HGET", 3, Keyspace::hget),
    command("HINCRBY", 4, Keyspace::hincrby),
    command("HMGET", -3, Keyspace::hmget),
    command("HSET", -4, Keyspace::hset),
    command("HSETNX", 4, Keyspace::hsetnx),
    command("LPOP", -2, Keyspace::lpop),
    command("LPUSH", -3, Keyspace::lpush),
    command("LREM", 4, Keyspace::lrem),
    command("PEXPIRE", -3, Keyspace::pexpire),
    command("RPUSH", -3, Keyspace::rpush),
    command("SADD", -3, Keyspace::sadd),
    command("SMEMBERS", 2, Keyspace::smembers),
    command("XACK", -4, Keyspace::xack),
    command("XADD", -5, Keyspace::xadd),
    command("XAUTOCLAIM", -6, Keyspace::xautoclaim),
    container(
        "XGROUP",
        -2,
        &[
            subcommand("CREATE", -5, Keyspace::xgroup_create),
            subcommand("DELCONSUMER", 5, Keyspace::xgroup_delconsumer),
        ],
    ),
    container(
        "XINFO",
        -2,
        &[
            subcommand("CONSUMERS", 4, Keyspace::xinfo_consumers),
            subcommand("GROUPS", 3, Keyspace::xinfo_groups),
        ],
    ),
    command("XLEN", 2, Keyspace::xlen),
    command("XPENDING", -3, Keyspace::xpending),
    command("XRANGE", -4, Keyspace::xrange),
    command("XREADGROUP", -7, Keyspace::xreadgroup),
    command("XTRIM", -4, Keyspace::xtrim),
    command("ZADD", -4, Keyspace::zadd),
    command("ZCARD", 2, Keyspace::zcard),
    command("ZRANGE", -4, Keyspace::zrange),
    command("ZRANGEBYSCORE", -4, Keyspace::zrangebyscore),
    command("ZREM", -3, Keyspace::zrem),
    command("ZREMRANGEBYSCORE", 4, Keyspace::zremrangebyscore),
];

/// Finds a command by name, ignoring ASCII case, without allocating.
fn lookup(name: &[u8]) -> Option<&'static Command> {
    let mut buf = [0u8; 24];
    let upper = buf.get_mut(..name.len())?;
    for (dst, src) in upper.iter_mut().zip(name) {
        *dst = src.to_ascii_uppercase();
    }
    let upper: &[u8] = upper;
    COMMANDS
        .binary_search_by(|c| c.name.as_bytes().cmp(upper))
        .ok()
        .map(|i| &COMMANDS[i])
}

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

/// A sorted-set score ordered totally (scores are never NaN), with `-0` folded into `0` so the
/// order agrees with Redis's numeric comparison.
#[derive(Debug, Clone, Copy)]
struct Score(f64);

impl Score {
    fn new(value: f64) -> Score {
        Score(if value == 0.0 { 0.0 } else { value })
    }
}

impl PartialEq for Score {
    fn eq(&self, other: &Score) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Score {}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Score) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Score {
    fn cmp(&self, other: &Score) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A sorted set: members by score, ties broken by member bytes, exactly Redis's order.
#[derive(Default)]
struct ZSet {
    scores: HashMap<Bytes, f64>,
    order: BTreeSet<(Score, Bytes)>,
}

impl ZSet {
    /// Sets `member`'s score; true when the member is new.
    fn insert(&mut self, member: &Bytes, score: f64) -> bool {
        match self.scores.insert(member.clone(), score) {
            Some(old) => {
                if Score::new(old) != Score::new(score) {
                    self.order.remove(&(Score::new(old), member.clone()));
                    self.order.insert((Score::new(score), member.clone()));
                }
                false
            }
            None => {
                self.order.insert((Score::new(score), member.clone()));
                true
            }
        }
    }

    fn remove(&mut self, member: &[u8]) -> bool {
        match self.scores.remove_entry(member) {
            Some((member, score)) => {
                self.order.remove(&(Score::new(score), member));
                true
            }
            None => false,
        }
    }

    /// Members within `range`, lowest score first.
    fn in_range(&self, range: ScoreRange) -> impl Iterator<Item = &(Score, Bytes)> {
        self.order
            .range((Score::new(range.min), Bytes::new())..)
            .skip_while(move |(s, _)| range.min_exclusive && s.0 <= range.min)
            .take_while(move |(s, _)| range.below_max(s.0))
    }
}

/// A `ZRANGEBYSCORE`-style interval: `-inf`, `+inf`, `(` for exclusive bounds.
#[derive(Clone, Copy)]
struct ScoreRange {
    min: f64,
    min_exclusive: bool,
    max: f64,
    max_exclusive: bool,
}

impl ScoreRange {
    fn parse(min: &[u8], max: &[u8]) -> Result<ScoreRange> {
        let bound = |arg: &[u8]| match arg.split_first() {
            Some((b'(', rest)) => parse_f64(rest).map(|v| (v, true)),
            _ => parse_f64(arg).map(|v| (v, false)),
        };
        match (bound(min), bound(max)) {
            (Some((min, min_exclusive)), Some((max, max_exclusive))) => Ok(ScoreRange {
                min,
                min_exclusive,
                max,
                max_exclusive,
            }),
            _ => Err(MIN_MAX_NOT_FLOAT.into()),
        }
    }

    fn below_max(&self, score: f64) -> bool {
        if self.max_exclusive {
            score < self.max
        } else {
            score <= self.max
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

    /// Whether `command` (any case) is implemented.
    pub fn supports(command: &str) -> bool {
        lookup(command.as_bytes()).is_some()
    }

    /// The implemented commands, upper case.
    pub fn commands() -> impl Iterator<Item = &'static str> {
        COMMANDS.iter().map(|c| c.name)
    }

    /// The implemented subcommands of container command `command` (any case), upper case;
    /// none for other commands.
    pub fn subcommands(command: &str) -> impl Iterator<Item = &'static str> {
        let subcommands: &[Subcommand] = match lookup(command.as_bytes()).map(|c| &c.run) {
            Some(Run::Container(subcommands)) => subcommands,
            _ => &[],
        };
        subcommands.iter().map(|s| s.name)
    }

    /// Runs one command, `args[0]` being its name, with Redis 7.0 semantics. `Err` holds the
    /// error reply's text, e.g. `ERR syntax error`.
    pub fn call(&mut self, args: &[Bytes]) -> Result<Resp> {
        let Some(name) = args.first() else {
            return Err(NO_ARGUMENTS.into());
        };
        let Some(command) = lookup(name) else {
            return Err(unknown_command(name, &args[1..]));
        };
        if !arity_fits(command.arity, args.len()) {
            return Err(arity_error(command.name));
        }
        let run = match command.run {
            Run::Handler(run) => run,
            Run::Container(subcommands) => {
                // The container's arity guarantees the subcommand's name.
                let sub = subcommands
                    .iter()
                    .find(|sub| is(&args[1], sub.name))
                    .ok_or_else(|| unknown_subcommand(command.name, &args[1]))?;
                if !arity_fits(sub.arity, args.len()) {
                    return Err(arity_error(&format!("{}|{}", command.name, sub.name)));
                }
                sub.run
            }
        };
        run(self, args)
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

    // ---- keys ------------------------------------------------------------------------------

    fn del(&mut self, a: &[Bytes]) -> Result<Resp> {
        let mut n = 0;
        for key in &a[1..] {
            self.expire_if_needed(key);
            if self.entries.remove(key.as_ref()).is_some() {
                n += 1;
            }
        }
        Ok(Resp::Int(n))
    }

    fn exists(&mut self, a: &[Bytes]) -> Result<Resp> {
        let mut n = 0;
        for key in &a[1..] {
            if self.read(key).is_some() {
                n += 1;
            }
        }
        Ok(Resp::Int(n))
    }

    /// `PEXPIRE key ms [NX|XX|GT|LT]`
    fn pexpire(&mut self, a: &[Bytes]) -> Result<Resp> {
        let ms = int_arg(&a[2])?;
        let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
        for opt in &a[3..] {
            if is(opt, "NX") {
                nx = true;
            } else if is(opt, "XX") {
                xx = true;
            } else if is(opt, "GT") {
                gt = true;
            } else if is(opt, "LT") {
                lt = true;
            } else {
                return Err(format!(
                    "ERR Unsupported option {}",
                    String::from_utf8_lossy(opt)
                ));
            }
        }
        if nx && (xx || gt || lt) {
            return Err(
                "ERR NX and XX, GT or LT options at the same time are not compatible".into(),
            );
        }
        if gt && lt {
            return Err("ERR GT and LT options at the same time are not compatible".into());
        }
        let now = self.now();
        let when = i64::try_from(now)
            .ok()
            .and_then(|now| now.checked_add(ms))
            .ok_or("ERR invalid expire time in 'pexpire' command")?;
        let key = &a[1];
        let Some(entry) = self.write(key) else {
            return Ok(Resp::Int(0));
        };
        let current = entry
            .expires_at
            .map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        let skip = match current {
            Some(current) => nx || (gt && when <= current) || (lt && when >= current),
            // No expiry counts as infinite: GT never beats it, LT always does.
            None => xx || gt,
        };
        if skip {
            return Ok(Resp::Int(0));
        }
        match u64::try_from(when) {
            Ok(when) if when > now => entry.expires_at = Some(when),
            // Already in the past: Redis deletes the key right away.
            _ => {
                self.entries.remove(key.as_ref());
            }
        }
        Ok(Resp::Int(1))
    }

    // ---- hashes ----------------------------------------------------------------------------

    fn hget(&mut self, a: &[Bytes]) -> Result<Resp> {
        Ok(bulk_or_nil(
            self.value::<Hash>(&a[1])?.and_then(|h| h.get(&a[2])),
        ))
    }

    /// `HSET key field value [field value …]`: the number of new fields.
    fn hset(&mut self, a: &[Bytes]) -> Result<Resp> {
        if !a.len().is_multiple_of(2) {
            return Err(arity_error("HSET"));
        }
        let hash = self.value_or_create::<Hash>(&a[1])?;
        let mut added = 0;
        for pair in a[2..].chunks_exact(2) {
            if hash.insert(pair[0].clone(), pair[1].clone()).is_none() {
                added += 1;
            }
        }
        Ok(Resp::Int(added))
    }

    fn hsetnx(&mut self, a: &[Bytes]) -> Result<Resp> {
        let hash = self.value_or_create::<Hash>(&a[1])?;
        if hash.contains_key(&a[2]) {
            return Ok(Resp::Int(0));
        }
        hash.insert(a[2].clone(), a[3].clone());
        Ok(Resp::Int(1))
    }

    fn hmget(&mut self, a: &[Bytes]) -> Result<Resp> {
        let hash = self.value::<Hash>(&a[1])?;
        Ok(Resp::Array(
            a[2..]
                .iter()
                .map(|field| bulk_or_nil(hash.and_then(|h| h.get(field))))
                .collect(),
        ))
    }

    fn hincrby(&mut self, a: &[Bytes]) -> Result<Resp> {
        let by = int_arg(&a[3])?;
        let hash = self.value_or_create::<Hash>(&a[1])?;
        let current = match hash.get(&a[2]) {
            Some(v) => parse_i64(v).ok_or(HASH_NOT_INTEGER)?,
            None => 0,
        };
        let new = current.checked_add(by).ok_or(OVERFLOW)?;
        hash.insert(a[2].clone(), int_bytes(new));
        Ok(Resp::Int(new))
    }

    fn hdel(&mut self, a: &[Bytes]) -> Result<Resp> {
        let Some(hash) = self.value_mut::<Hash>(&a[1])? else {
            return Ok(Resp::Int(0));
        };
        let removed = a[2..]
            .iter()
            .filter(|f| hash.remove(f.as_ref()).is_some())
            .count();
        self.drop_if_empty(&a[1]);
        Ok(Resp::Int(count(removed)))
    }

    fn hexists(&mut self, a: &[Bytes]) -> Result<Resp> {
        let found = self
            .value::<Hash>(&a[1])?
            .is_some_and(|h| h.contains_key(&a[2]));
        Ok(Resp::Int(i64::from(found)))
    }

    // ---- lists -----------------------------------------------------------------------------

    fn lpush(&mut self, a: &[Bytes]) -> Result<Resp> {
        let list = self.value_or_create::<List>(&a[1])?;
        for v in &a[2..] {
            list.push_front(v.clone());
        }
        Ok(Resp::Int(count(list.len())))
    }

    fn rpush(&mut self, a: &[Bytes]) -> Result<Resp> {
        let list = self.value_or_create::<List>(&a[1])?;
        list.extend(a[2..].iter().cloned());
        Ok(Resp::Int(count(list.len())))
    }

    /// `LPOP key [count]`, Redis 7: without a count a bulk or nil; with one an array, or a nil
    /// array when the key does not exist.
    fn lpop(&mut self, a: &[Bytes]) -> Result<Resp> {
        if a.len() > 3 {
            return Err(arity_error("LPOP"));
        }
        let wanted = match a.get(2) {
            Some(arg) => Some(
                parse_i64(arg)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or(NOT_POSITIVE)?,
            ),
            None => None,
        };
        let Some(list) = self.value_mut::<List>(&a[1])? else {
            return Ok(Resp::Nil);
        };
        let reply = match wanted {
            None => bulk_or_nil(list.pop_front().as_ref()),
            Some(n) => {
                let n = n.min(list.len());
                Resp::Array(list.drain(..n).map(Resp::Bulk).collect())
            }
        };
        self.drop_if_empty(&a[1]);
        Ok(reply)
    }

    /// `LREM key count element`: count > 0 from the head, < 0 from the tail, 0 all.
    fn lrem(&mut self, a: &[Bytes]) -> Result<Resp> {
        let limit = int_arg(&a[2])?;
        let Some(list) = self.value_mut::<List>(&a[1])? else {
            return Ok(Resp::Int(0));
        };
        let element = &a[3];
        let matches = list.iter().filter(|v| *v == element).count();
        let remove = match usize::try_from(limit.unsigned_abs()) {
            Ok(0) => matches,
            Ok(n) => n.min(matches),
            Err(_) => matches,
        };
        // From the tail: keep the first `matches - remove` matches, drop the rest.
        let mut keep = if limit < 0 { matches - remove } else { 0 };
        let mut left = remove;
        list.retain(|v| {
            if v != element || left == 0 {
                return true;
            }
            if keep > 0 {
                keep -= 1;
                return true;
            }
            left -= 1;
            false
        });
        self.drop_if_empty(&a[1]);
        Ok(Resp::Int(count(remove)))
    }

    // ---- sets ------------------------------------------------------------------------------

    fn sadd(&mut self, a: &[Bytes]) -> Result<Resp> {
        let set = self.value_or_create::<Set>(&a[1])?;
        let added = a[2..].iter().filter(|m| set.insert((*m).clone())).count();
        Ok(Resp::Int(count(added)))
    }

    fn smembers(&mut self, a: &[Bytes]) -> Result<Resp> {
        let items = self.value::<Set>(&a[1])?.map_or_else(Vec::new, |s| {
            s.iter().map(|m| Resp::Bulk(m.clone())).collect()
        });
        Ok(Resp::Array(items))
    }

    // ---- sorted sets -----------------------------------------------------------------------

    /// `ZADD key [NX|XX] [GT|LT] [CH] [INCR] score member [score member …]`
    fn zadd(&mut self, a: &[Bytes]) -> Result<Resp> {
        let (mut nx, mut xx, mut gt, mut lt, mut ch, mut incr) =
            (false, false, false, false, false, false);
        let mut i = 2;
        while let Some(opt) = a.get(i) {
            let flag = if is(opt, "NX") {
                &mut nx
            } else if is(opt, "XX") {
                &mut xx
            } else if is(opt, "GT") {
                &mut gt
            } else if is(opt, "LT") {
                &mut lt
            } else if is(opt, "CH") {
                &mut ch
            } else if is(opt, "INCR") {
                &mut incr
            } else {
                break;
            };
            *flag = true;
            i += 1;
        }
        let pairs = &a[i..];
        if pairs.is_empty() || !pairs.len().is_multiple_of(2) {
            return Err(SYNTAX.into());
        }
        if nx && xx {
            return Err("ERR XX and NX options at the same time are not compatible".into());
        }
        if (nx && (gt || lt)) || (gt && lt) {
            return Err("ERR GT, LT, and/or NX options at the same time are not compatible".into());
        }
        if incr && pairs.len() > 2 {
            return Err("ERR INCR option supports a single increment-element pair".into());
        }
        // Every score is checked before anything changes.
        let scores = pairs
            .chunks_exact(2)
            .map(|p| parse_f64(&p[0]).ok_or(NOT_FLOAT))
            .collect::<std::result::Result<Vec<f64>, _>>()?;

        let key = &a[1];
        if xx && self.value::<ZSet>(key)?.is_none() {
            return Ok(if incr { Resp::Nil } else { Resp::Int(0) });
        }
        let zset = self.value_or_create::<ZSet>(key)?;
        let (mut added, mut changed) = (0, 0);
        let mut incr_result = None;
        for (pair, &score) in pairs.chunks_exact(2).zip(&scores) {
            let member = &pair[1];
            match zset.scores.get(member).copied() {
                Some(current) => {
                    if nx {
                        continue;
                    }
                    let new = if incr { current + score } else { score };
                    if new.is_nan() {
                        return Err("ERR resulting score is not a number (NaN)".into());
                    }
                    if (lt && new >= current) || (gt && new <= current) {
                        continue;
                    }
                    if Score::new(new) != Score::new(current) {
                        zset.insert(member, new);
                        changed += 1;
                    }
                    incr_result = Some(new);
                }
                None => {
                    if xx {
                        continue;
                    }
                    zset.insert(member, score);
                    added += 1;
                    incr_result = Some(score);
                }
            }
        }
        if incr {
            return Ok(incr_result.map_or(Resp::Nil, |s| Resp::Bulk(format_score(s))));
        }
        Ok(Resp::Int(if ch { added + changed } else { added }))
    }

    fn zrem(&mut self, a: &[Bytes]) -> Result<Resp> {
        let Some(zset) = self.value_mut::<ZSet>(&a[1])? else {
            return Ok(Resp::Int(0));
        };
        let removed = a[2..].iter().filter(|m| zset.remove(m)).count();
        self.drop_if_empty(&a[1]);
        Ok(Resp::Int(count(removed)))
    }

    fn zcard(&mut self, a: &[Bytes]) -> Result<Resp> {
        Ok(Resp::Int(count(
            self.value::<ZSet>(&a[1])?.map_or(0, |z| z.scores.len()),
        )))
    }

    /// `ZRANGEBYSCORE key min max [WITHSCORES] [LIMIT offset count]`
    fn zrangebyscore(&mut self, a: &[Bytes]) -> Result<Resp> {
        self.zrange_generic(a, RangeKind::Score, false)
    }

    /// `ZRANGE key start stop [BYSCORE] [REV] [LIMIT offset count] [WITHSCORES]`
    fn zrange(&mut self, a: &[Bytes]) -> Result<Resp> {
        self.zrange_generic(a, RangeKind::Rank, true)
    }

    /// Redis's `zrangeGenericCommand`: options first, then the range, then the key.
    fn zrange_generic(&mut self, a: &[Bytes], default: RangeKind, zrange: bool) -> Result<Resp> {
        let mut kind = default;
        let mut rev = false;
        let mut with_scores = false;
        let mut offset = 0i64;
        let mut limit = -1i64;
        let mut j = 4;
        while let Some(opt) = a.get(j) {
            let left = a.len() - j - 1;
            if is(opt, "WITHSCORES") {
                with_scores = true;
            } else if is(opt, "LIMIT") && left >= 2 {
                offset = int_arg(&a[j + 1])?;
                limit = int_arg(&a[j + 2])?;
                j += 2;
            } else if zrange && is(opt, "REV") {
                rev = true;
            } else if zrange && is(opt, "BYSCORE") {
                kind = RangeKind::Score;
            } else if zrange && is(opt, "BYLEX") {
                return Err(
                    "ERR syntax error, BYLEX is not supported by the embedded engine".into(),
                );
            } else {
                return Err(SYNTAX.into());
            }
            j += 1;
        }
        if limit != -1 && kind == RangeKind::Rank {
            return Err(
                "ERR syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX"
                    .into(),
            );
        }
        let (lo, hi) = if rev && kind == RangeKind::Score {
            (&a[3], &a[2])
        } else {
            (&a[2], &a[3])
        };
        enum Parsed {
            Rank(i64, i64),
            Score(ScoreRange),
        }
        let parsed = match kind {
            RangeKind::Rank => Parsed::Rank(int_arg(lo)?, int_arg(hi)?),
            RangeKind::Score => Parsed::Score(ScoreRange::parse(lo, hi)?),
        };
        let Some(zset) = self.value::<ZSet>(&a[1])? else {
            return Ok(Resp::Array(Vec::new()));
        };
        let selected: Vec<&(Score, Bytes)> = match parsed {
            Parsed::Rank(start, stop) => match index_range(start, stop, zset.order.len()) {
                None => Vec::new(),
                Some((from, to)) if rev => zset
                    .order
                    .iter()
                    .rev()
                    .skip(from)
                    .take(to - from + 1)
                    .collect(),
                Some((from, to)) => zset.order.iter().skip(from).take(to - from + 1).collect(),
            },
            Parsed::Score(range) => {
                // A negative offset selects nothing, a negative count means "all".
                let Ok(offset) = usize::try_from(offset) else {
                    return Ok(Resp::Array(Vec::new()));
                };
                let limit = usize::try_from(limit).unwrap_or(usize::MAX);
                if rev {
                    let mut all: Vec<_> = zset.in_range(range).collect();
                    all.reverse();
                    all.into_iter().skip(offset).take(limit).collect()
                } else {
                    zset.in_range(range).skip(offset).take(limit).collect()
                }
            }
        };
        let mut out = Vec::with_capacity(selected.len() * if with_scores { 2 } else { 1 });
        for (score, member) in selected {
            out.push(Resp::Bulk(member.clone()));
            if with_scores {
                out.push(Resp::Bulk(format_score(score.0)));
            }
        }
        Ok(Resp::Array(out))
    }

    fn zremrangebyscore(&mut self, a: &[Bytes]) -> Result<Resp> {
        let range = ScoreRange::parse(&a[2], &a[3])?;
        let Some(zset) = self.value_mut::<ZSet>(&a[1])? else {
            return Ok(Resp::Int(0));
        };
        let doomed: Vec<Bytes> = zset.in_range(range).map(|(_, m)| m.clone()).collect();
        for member in &doomed {
            zset.remove(member);
        }
        self.drop_if_empty(&a[1]);
        Ok(Resp::Int(count(doomed.len())))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RangeKind {
    Rank,
    Score,
}

/// Redis's `ZRANGE` index normalisation: negative counts from the end; `None` when
/// the range is empty.
fn index_range(start: i64, stop: i64, len: usize) -> Option<(usize, usize)> {
    let len = i64::try_from(len).ok()?;
    let start = if start < 0 { start + len } else { start }.max(0);
    let stop = if stop < 0 { stop + len } else { stop };
    if start > stop || start >= len {
        return None;
    }
    let stop = stop.min(len - 1);
    Some((usize::try_from(start).ok()?, usize::try_from(stop).ok()?))
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

/// Whether `argc` arguments, the name included, fit Redis's `arity`: exactly that many, or
/// at least `-arity` when it is negative.
fn arity_fits(arity: i32, argc: usize) -> bool {
    let argc = i64::try_from(argc).unwrap_or(i64::MAX);
    let arity = i64::from(arity);
    if arity < 0 {
        argc >= -arity
    } else {
        argc == arity
    }
}

fn arity_error(command: &str) -> String {
    format!(
        "ERR wrong number of arguments for '{}' command",
        command.to_ascii_lowercase()
    )
}

/// Redis 7.0's text: `unknown command 'X', with args beginning with: 'a' 'b' `.
fn unknown_command(name: &[u8], args: &[Bytes]) -> String {
    let mut listed = String::new();
    for arg in args {
        if listed.len() >= 128 {
            break;
        }
        listed.push('\'');
        listed.extend(String::from_utf8_lossy(arg).chars().take(128));
        listed.push_str("' ");
    }
    let name: String = String::from_utf8_lossy(name).chars().take(128).collect();
    format!("ERR unknown command '{name}', with args beginning with: {listed}")
}

/// Redis 7's error for a subcommand a container command does not have.
fn unknown_subcommand(command: &str, sub: &[u8]) -> String {
    format!(
        "ERR unknown subcommand '{}'. Try {command} HELP.",
        text_128(sub)
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

/// Redis's `string2ll`: optional `-`, no `+`, no leading zeros, no spaces, within i64.
fn parse_i64(s: &[u8]) -> Option<i64> {
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
fn parse_f64(s: &[u8]) -> Option<f64> {
    let v: f64 = std::str::from_utf8(s).ok()?.parse().ok()?;
    (!v.is_nan()).then_some(v)
}

/// Formats a score like Redis 7.0's `addReplyDouble`: `inf`/`-inf`, otherwise C's `%.17g`
/// (`1`, `1.5`, `1e+20`, `0.10000000000000001`). Redis 7.2+ prints the shortest round-trip
/// form instead; the two agree on every integral score, which is all the scripts store.
fn format_score(v: f64) -> Bytes {
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

    fn sorted(r: Resp) -> Resp {
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

    /// What Redis's `PTTL` would answer: -2 without the key, -1 without an expiry.
    fn pttl(ks: &mut Keyspace, key: &str) -> i64 {
        let now = ks.now();
        match ks.read(key.as_bytes()).map(|e| e.expires_at) {
            None => -2,
            Some(None) => -1,
            Some(Some(at)) => i64::try_from(at.saturating_sub(now)).unwrap_or(i64::MAX),
        }
    }

    /// The hash at `key` as sorted `[field, value, …]`, like a sorted `HGETALL`.
    fn hash_items(ks: &mut Keyspace, key: &str) -> Resp {
        let hash = ks.value::<Hash>(key.as_bytes()).expect("a hash");
        let items = hash
            .into_iter()
            .flatten()
            .flat_map(|(f, v)| [Resp::Bulk(f.clone()), Resp::Bulk(v.clone())]);
        sorted(Resp::Array(items.collect()))
    }

    fn hlen(ks: &mut Keyspace, key: &str) -> usize {
        let hash = ks.value::<Hash>(key.as_bytes()).expect("a hash");
        hash.map_or(0, HashMap::len)
    }

    /// The list at `key`, head first, like `LRANGE key 0 -1`.
    fn list_items(ks: &mut Keyspace, key: &str) -> Resp {
        let list = ks.value::<List>(key.as_bytes()).expect("a list");
        Resp::Array(
            list.into_iter()
                .flatten()
                .cloned()
                .map(Resp::Bulk)
                .collect(),
        )
    }

    /// What Redis's `ZSCORE` would answer.
    fn zscore(ks: &mut Keyspace, key: &str, member: &str) -> Resp {
        let zset = ks.value::<ZSet>(key.as_bytes()).expect("a sorted set");
        let score = zset.and_then(|z| z.scores.get(member.as_bytes()).copied());
        score.map_or(Resp::Nil, |s| Resp::Bulk(format_score(s)))
    }

    #[test]
    fn command_table_is_sorted_and_complete() {
        assert!(COMMANDS.windows(2).all(|w| w[0].name < w[1].name));
        assert_eq!(COMMANDS.len(), 32);
        for command in COMMANDS {
            if let Run::Container(subcommands) = command.run {
                assert!(subcommands.windows(2).all(|w| w[0].name < w[1].name));
                assert!(
                    command.arity == -2,
                    "{}: a subcommand must follow",
                    command.name
                );
            }
        }
        for name in Keyspace::commands() {
            assert!(Keyspace::supports(name));
            assert!(Keyspace::supports(&name.to_ascii_lowercase()));
        }
        assert!(!Keyspace::supports("HINCRBYFLOAT"));
        assert!(!Keyspace::supports("EVAL"));
        assert!(!Keyspace::supports(""));
        assert!(!Keyspace::supports("ZREMRANGEBYSCOREXXXXXXXXXXXXXXXXXXX"));
        assert_eq!(
            Keyspace::subcommands("xgroup").collect::<Vec<_>>(),
            ["CREATE", "DELCONSUMER"]
        );
        assert_eq!(Keyspace::subcommands("HGET").count(), 0);
        assert_eq!(Keyspace::subcommands("NOSUCH").count(), 0);
    }

    #[test]
    fn unknown_commands_arity_and_empty_calls() {
        let (mut ks, _) = keyspace();
        assert_eq!(
            err(&mut ks, "hincrbyfloat h f 1"),
            "ERR unknown command 'hincrbyfloat', with args beginning with: 'h' 'f' '1' "
        );
        assert_eq!(
            err(&mut ks, "HGET h"),
            "ERR wrong number of arguments for 'hget' command"
        );
        assert_eq!(
            err(&mut ks, "zcard a b"),
            "ERR wrong number of arguments for 'zcard' command"
        );
        assert_eq!(
            err(&mut ks, "HSET h f v f2"),
            "ERR wrong number of arguments for 'hset' command"
        );
        assert_eq!(
            err(&mut ks, "LPOP l 1 2"),
            "ERR wrong number of arguments for 'lpop' command"
        );
        assert_eq!(ks.call(&[]), Err(NO_ARGUMENTS.to_string()));
        assert_eq!(ok(&mut ks, "hGeT missing f"), Resp::Nil);
    }

    #[test]
    fn del_and_exists_count_keys() {
        let (mut ks, _) = keyspace();
        ok(&mut ks, "HSET a f 1");
        ok(&mut ks, "HSET fresh f 5");
        ok(&mut ks, "RPUSH s hello");
        assert_eq!(ok(&mut ks, "EXISTS b"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "DEL a b fresh a"), Resp::Int(2));
        assert_eq!(ok(&mut ks, "EXISTS s s missing"), Resp::Int(2));
        assert_eq!(type_of(&mut ks, "s"), "list");
        assert_eq!(type_of(&mut ks, "missing"), "none");
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
            "LREM h 0 x",
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

    #[test]
    fn expiry_follows_the_injected_clock() {
        let (mut ks, now) = keyspace();
        ok(&mut ks, "HSET k f v");
        ok(&mut ks, "PEXPIRE k 100");
        assert_eq!(pttl(&mut ks, "k"), 100);
        now.fetch_add(100, AtomicOrdering::SeqCst);
        // Redis: a key expires once the time is past its deadline, not at it.
        assert_eq!(pttl(&mut ks, "k"), 0);
        assert_eq!(ok(&mut ks, "HGET k f"), bulk("v"));
        now.fetch_add(1, AtomicOrdering::SeqCst);
        assert_eq!(ok(&mut ks, "HGET k f"), Resp::Nil);
        assert_eq!(pttl(&mut ks, "k"), -2);

        ok(&mut ks, "HSET h f v");
        assert_eq!(pttl(&mut ks, "h"), -1);
        assert_eq!(ok(&mut ks, "PEXPIRE h 50"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "PEXPIRE h 80 NX"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "PEXPIRE h 40 GT"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "PEXPIRE h 60 GT"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "PEXPIRE h 70 LT"), Resp::Int(0));
        assert_eq!(pttl(&mut ks, "h"), 60);
        // Writing to a key keeps its TTL.
        ok(&mut ks, "HSET h g w");
        ok(&mut ks, "HINCRBY h n 1");
        assert_eq!(pttl(&mut ks, "h"), 60);

        now.fetch_add(61, AtomicOrdering::SeqCst);
        assert_eq!(ok(&mut ks, "HGET h f"), Resp::Nil);
        assert_eq!(ok(&mut ks, "EXISTS h"), Resp::Int(0));
        // An expired key of another type no longer causes WRONGTYPE.
        ok(&mut ks, "HSET t f v");
        ok(&mut ks, "PEXPIRE t 5");
        now.fetch_add(6, AtomicOrdering::SeqCst);
        assert_eq!(ok(&mut ks, "LPUSH t a"), Resp::Int(1));

        assert_eq!(ok(&mut ks, "PEXPIRE missing 10"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "PEXPIRE t 0"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "EXISTS t"), Resp::Int(0));
        ok(&mut ks, "HSET c f 1");
        assert_eq!(
            err(&mut ks, "PEXPIRE c 10 NX XX"),
            "ERR NX and XX, GT or LT options at the same time are not compatible"
        );
        assert_eq!(
            err(&mut ks, "PEXPIRE c 10 GT LT"),
            "ERR GT and LT options at the same time are not compatible"
        );
        assert_eq!(
            err(&mut ks, "PEXPIRE c 10 FOO"),
            "ERR Unsupported option FOO"
        );
        assert_eq!(
            err(&mut ks, "PEXPIRE c 9223372036854775807"),
            "ERR invalid expire time in 'pexpire' command"
        );
        assert_eq!(pttl(&mut ks, "c"), -1, "failed PEXPIREs changed nothing");
        assert_eq!(ok(&mut ks, "DEL c"), Resp::Int(1));
    }

    #[test]
    fn hashes() {
        let (mut ks, _) = keyspace();
        assert_eq!(ok(&mut ks, "HSET h a 1 b 2 a 3"), Resp::Int(2));
        assert_eq!(ok(&mut ks, "HGET h a"), bulk("3"));
        assert_eq!(ok(&mut ks, "HSET h a 4 c 5"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "HSETNX h a 9"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "HSETNX h d 9"), Resp::Int(1));
        assert_eq!(
            ok(&mut ks, "HMGET h a nope d"),
            Resp::Array(vec![bulk("4"), Resp::Nil, bulk("9")])
        );
        assert_eq!(
            ok(&mut ks, "HMGET missing a b"),
            Resp::Array(vec![Resp::Nil, Resp::Nil])
        );
        assert_eq!(ok(&mut ks, "HINCRBY h n -3"), Resp::Int(-3));
        assert_eq!(ok(&mut ks, "HINCRBY h n 10"), Resp::Int(7));
        ok(&mut ks, "HSET h text x");
        assert_eq!(err(&mut ks, "HINCRBY h text 1"), HASH_NOT_INTEGER);
        assert_eq!(err(&mut ks, "HINCRBY h n one"), NOT_INTEGER);
        ok(&mut ks, "HSET h max 9223372036854775807");
        assert_eq!(err(&mut ks, "HINCRBY h max 1"), OVERFLOW);
        assert_eq!(ok(&mut ks, "HEXISTS h a"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "HEXISTS h zz"), Resp::Int(0));
        assert_eq!(hlen(&mut ks, "h"), 7);
        assert_eq!(hlen(&mut ks, "missing"), 0);
        assert_eq!(ok(&mut ks, "HDEL h a b zz"), Resp::Int(2));
        assert_eq!(ok(&mut ks, "HDEL h c d n text max"), Resp::Int(5));
        assert_eq!(
            ok(&mut ks, "EXISTS h"),
            Resp::Int(0),
            "emptied hash is deleted"
        );
        assert_eq!(ok(&mut ks, "HDEL h a"), Resp::Int(0));
        ok(&mut ks, "HSET g f1 v1 f2 v2");
        assert_eq!(
            hash_items(&mut ks, "g"),
            sorted(bulks(&["f1", "v1", "f2", "v2"]))
        );
        assert_eq!(hash_items(&mut ks, "missing"), Resp::Array(vec![]));
        assert_eq!(type_of(&mut ks, "g"), "hash");
    }

    #[test]
    fn lists() {
        let (mut ks, _) = keyspace();
        assert_eq!(ok(&mut ks, "RPUSH l a b c"), Resp::Int(3));
        assert_eq!(ok(&mut ks, "LPUSH l y z"), Resp::Int(5));
        assert_eq!(list_items(&mut ks, "l"), bulks(&["z", "y", "a", "b", "c"]));
        assert_eq!(list_items(&mut ks, "missing"), bulks(&[]));
        assert_eq!(ok(&mut ks, "LPOP l"), bulk("z"));
        assert_eq!(ok(&mut ks, "LPOP l 2"), bulks(&["y", "a"]));
        assert_eq!(ok(&mut ks, "LPOP l 0"), bulks(&[]));
        assert_eq!(ok(&mut ks, "LPOP l 5"), bulks(&["b", "c"]));
        assert_eq!(
            ok(&mut ks, "EXISTS l"),
            Resp::Int(0),
            "emptied list is deleted"
        );
        // Redis 7: a count on a missing key is a nil array, no count a nil bulk.
        assert_eq!(ok(&mut ks, "LPOP l 3"), Resp::Nil);
        assert_eq!(ok(&mut ks, "LPOP l 0"), Resp::Nil);
        assert_eq!(ok(&mut ks, "LPOP l"), Resp::Nil);
        assert_eq!(err(&mut ks, "LPOP l -1"), NOT_POSITIVE);
        assert_eq!(err(&mut ks, "LPOP l x"), NOT_POSITIVE);

        ok(&mut ks, "RPUSH r x a x b x c x");
        assert_eq!(ok(&mut ks, "LREM r 2 x"), Resp::Int(2));
        assert_eq!(list_items(&mut ks, "r"), bulks(&["a", "b", "x", "c", "x"]));
        ok(&mut ks, "RPUSH r x");
        assert_eq!(ok(&mut ks, "LREM r -2 x"), Resp::Int(2));
        assert_eq!(list_items(&mut ks, "r"), bulks(&["a", "b", "x", "c"]));
        assert_eq!(ok(&mut ks, "LREM r 0 nope"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "LREM r -10 x"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "LREM missing 0 x"), Resp::Int(0));
        ok(&mut ks, "DEL r");
        ok(&mut ks, "RPUSH r x x");
        assert_eq!(ok(&mut ks, "LREM r 0 x"), Resp::Int(2));
        assert_eq!(type_of(&mut ks, "r"), "none");
        assert_eq!(err(&mut ks, "LREM r one x"), NOT_INTEGER);
    }

    #[test]
    fn sets() {
        let (mut ks, _) = keyspace();
        assert_eq!(ok(&mut ks, "SADD s a b a"), Resp::Int(2));
        assert_eq!(ok(&mut ks, "SADD s b c"), Resp::Int(1));
        assert_eq!(sorted(ok(&mut ks, "SMEMBERS s")), bulks(&["a", "b", "c"]));
        assert_eq!(ok(&mut ks, "SMEMBERS missing"), bulks(&[]));
        assert_eq!(type_of(&mut ks, "s"), "set");
    }

    #[test]
    fn sorted_sets_add_and_score() {
        let (mut ks, _) = keyspace();
        assert_eq!(ok(&mut ks, "ZADD z 1 a 2 b 2 c"), Resp::Int(3));
        assert_eq!(ok(&mut ks, "ZADD z 5 a 7 d"), Resp::Int(1));
        assert_eq!(zscore(&mut ks, "z", "a"), bulk("5"));
        assert_eq!(ok(&mut ks, "ZADD z NX 9 a 3 e"), Resp::Int(1));
        assert_eq!(zscore(&mut ks, "z", "a"), bulk("5"));
        assert_eq!(ok(&mut ks, "ZADD z XX 6 a 3 f"), Resp::Int(0));
        assert_eq!(zscore(&mut ks, "z", "a"), bulk("6"));
        assert_eq!(zscore(&mut ks, "z", "f"), Resp::Nil);
        assert_eq!(ok(&mut ks, "ZADD z GT CH 1 a 8 b"), Resp::Int(1));
        assert_eq!(zscore(&mut ks, "z", "a"), bulk("6"));
        assert_eq!(ok(&mut ks, "ZADD z LT CH 1 a 9 b"), Resp::Int(1));
        assert_eq!(zscore(&mut ks, "z", "a"), bulk("1"));
        assert_eq!(ok(&mut ks, "ZADD z INCR 0.5 a"), bulk("1.5"));
        assert_eq!(ok(&mut ks, "ZADD z NX INCR 1 a"), Resp::Nil);
        assert_eq!(ok(&mut ks, "ZADD z 1e20 big -inf low"), Resp::Int(2));
        assert_eq!(zscore(&mut ks, "z", "big"), bulk("1e+20"));
        assert_eq!(zscore(&mut ks, "z", "low"), bulk("-inf"));
        assert_eq!(ok(&mut ks, "ZADD z 0.1 tenth"), Resp::Int(1));
        assert_eq!(zscore(&mut ks, "z", "tenth"), bulk("0.10000000000000001"));
        assert_eq!(ok(&mut ks, "ZCARD z"), Resp::Int(8));
        assert_eq!(ok(&mut ks, "ZADD missing XX 1 a"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "EXISTS missing"), Resp::Int(0));
        assert_eq!(err(&mut ks, "ZADD z 1 a 2"), SYNTAX);
        assert_eq!(
            err(&mut ks, "ZADD z NX"),
            "ERR wrong number of arguments for 'zadd' command"
        );
        assert_eq!(
            err(&mut ks, "ZADD z NX XX 1 a"),
            "ERR XX and NX options at the same time are not compatible"
        );
        assert_eq!(
            err(&mut ks, "ZADD z GT LT 1 a"),
            "ERR GT, LT, and/or NX options at the same time are not compatible"
        );
        assert_eq!(
            err(&mut ks, "ZADD z INCR 1 a 2 b"),
            "ERR INCR option supports a single increment-element pair"
        );
        assert_eq!(err(&mut ks, "ZADD z 1 a nan b"), NOT_FLOAT);
        assert_eq!(err(&mut ks, "ZADD z one a"), NOT_FLOAT);
        assert_eq!(
            zscore(&mut ks, "z", "a"),
            bulk("1.5"),
            "failed ZADD changed nothing"
        );
        assert_eq!(ok(&mut ks, "ZREM z a b nope"), Resp::Int(2));
        assert_eq!(ok(&mut ks, "ZCARD z"), Resp::Int(6));
        assert_eq!(ok(&mut ks, "ZREM z c d e big low tenth"), Resp::Int(6));
        assert_eq!(ok(&mut ks, "ZREM z zz"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "ZCARD z"), Resp::Int(0));
        assert_eq!(
            ok(&mut ks, "EXISTS z"),
            Resp::Int(0),
            "emptied zset is deleted"
        );
    }

    #[test]
    fn sorted_set_ranges() {
        let (mut ks, _) = keyspace();
        ok(&mut ks, "ZADD z 1 a 2 b 2 c 3 d 4 e -1 neg");
        assert_eq!(
            ok(&mut ks, "ZRANGEBYSCORE z -inf +inf"),
            bulks(&["neg", "a", "b", "c", "d", "e"])
        );
        assert_eq!(ok(&mut ks, "ZRANGEBYSCORE z 2 3"), bulks(&["b", "c", "d"]));
        assert_eq!(ok(&mut ks, "ZRANGEBYSCORE z (2 3"), bulks(&["d"]));
        assert_eq!(ok(&mut ks, "ZRANGEBYSCORE z 2 (3"), bulks(&["b", "c"]));
        assert_eq!(ok(&mut ks, "ZRANGEBYSCORE z (1 (2"), bulks(&[]));
        assert_eq!(ok(&mut ks, "ZRANGEBYSCORE z 3 2"), bulks(&[]));
        assert_eq!(
            ok(&mut ks, "ZRANGEBYSCORE z -inf 2 LIMIT 1 2"),
            bulks(&["a", "b"])
        );
        assert_eq!(
            ok(&mut ks, "ZRANGEBYSCORE z -inf +inf LIMIT 4 -1"),
            bulks(&["d", "e"])
        );
        assert_eq!(
            ok(&mut ks, "ZRANGEBYSCORE z -inf +inf LIMIT -1 5"),
            bulks(&[])
        );
        assert_eq!(
            ok(&mut ks, "ZRANGEBYSCORE z -inf +inf LIMIT 0 0"),
            bulks(&[])
        );
        assert_eq!(
            ok(&mut ks, "ZRANGEBYSCORE z 1 2 WITHSCORES LIMIT 0 2"),
            bulks(&["a", "1", "b", "2"])
        );
        assert_eq!(ok(&mut ks, "ZRANGEBYSCORE missing -inf +inf"), bulks(&[]));
        assert_eq!(err(&mut ks, "ZRANGEBYSCORE z x 1"), MIN_MAX_NOT_FLOAT);
        assert_eq!(err(&mut ks, "ZRANGEBYSCORE z (x 1"), MIN_MAX_NOT_FLOAT);
        assert_eq!(err(&mut ks, "ZRANGEBYSCORE z 0 1 LIMIT 0"), SYNTAX);
        assert_eq!(err(&mut ks, "ZRANGEBYSCORE z 0 1 LIMIT a 1"), NOT_INTEGER);
        assert_eq!(err(&mut ks, "ZRANGEBYSCORE z 0 1 REV"), SYNTAX);

        assert_eq!(ok(&mut ks, "ZRANGE z 0 1"), bulks(&["neg", "a"]));
        assert_eq!(
            ok(&mut ks, "ZRANGE z -2 -1 WITHSCORES"),
            bulks(&["d", "3", "e", "4"])
        );
        assert_eq!(ok(&mut ks, "ZRANGE z 0 0 REV"), bulks(&["e"]));
        assert_eq!(ok(&mut ks, "ZRANGE z 5 100"), bulks(&["e"]));
        assert_eq!(ok(&mut ks, "ZRANGE z 6 100"), bulks(&[]));
        assert_eq!(ok(&mut ks, "ZRANGE z (3 +inf BYSCORE"), bulks(&["e"]));
        assert_eq!(
            ok(&mut ks, "ZRANGE z +inf 2 BYSCORE REV LIMIT 1 2"),
            bulks(&["d", "c"])
        );
        assert_eq!(
            err(&mut ks, "ZRANGE z 0 1 LIMIT 0 1"),
            "ERR syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX"
        );
        assert_eq!(err(&mut ks, "ZRANGE z a 1"), NOT_INTEGER);

        assert_eq!(ok(&mut ks, "ZREMRANGEBYSCORE z (1 2"), Resp::Int(2));
        assert_eq!(ok(&mut ks, "ZRANGE z 0 -1"), bulks(&["neg", "a", "d", "e"]));
        assert_eq!(ok(&mut ks, "ZREMRANGEBYSCORE z -inf +inf"), Resp::Int(4));
        assert_eq!(ok(&mut ks, "EXISTS z"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "ZREMRANGEBYSCORE z -inf +inf"), Resp::Int(0));
    }

    #[test]
    fn sorted_set_ties_break_by_member_bytes() {
        let (mut ks, _) = keyspace();
        ok(&mut ks, "ZADD z 5 b 5 a 5 ab 5 B 0 x -0 y");
        assert_eq!(
            ok(&mut ks, "ZRANGE z 0 -1"),
            bulks(&["x", "y", "B", "a", "ab", "b"])
        );
        // Changing a score moves the member.
        ok(&mut ks, "ZADD z 1 b");
        assert_eq!(ok(&mut ks, "ZRANGEBYSCORE z 1 1"), bulks(&["b"]));
        assert_eq!(ok(&mut ks, "ZRANGEBYSCORE z 0 0"), bulks(&["x", "y"]));
    }

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
