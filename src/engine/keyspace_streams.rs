//! Streams of the embedded keyspace: `XADD`, `XLEN`, `XRANGE`, `XTRIM`, and consumer groups:
//! `XGROUP CREATE|DELCONSUMER`, `XREADGROUP`, `XACK`, `XPENDING`, `XAUTOCLAIM`,
//! `XINFO GROUPS|CONSUMERS`.
//!
//! The ledger writer consumes each SKU's event stream through a consumer group from Lua
//! scripts, and those scripts must behave the same on Redis and here. So everything follows
//! Redis 7.0's `t_stream.c`, checked against a real 7.0 server by `tests/stream_parity.rs`:
//! the order in which arguments are validated (hence which error wins), the error texts, the
//! reply shapes, and the data rules:
//!
//! - A group's pending entries list (PEL) is independent of the entries: `XTRIM` never
//!   touches it, so a trimmed entry stays pending until it is acknowledged, and is reported
//!   as such: `[id, nil]` when re-read from a consumer's history, dropped from the PEL and
//!   listed as deleted by `XAUTOCLAIM`.
//! - Delivery times and consumers' "seen" times come from the keyspace's [`super::Clock`], so
//!   tests move time instead of sleeping.
//! - A consumer is created by the commands that deliver to it: `XREADGROUP` when it reads its
//!   history or gets something new, `XAUTOCLAIM` when it claims something; a `>` read that
//!   finds nothing new creates nothing.
//! - A group's `entries-read` and `lag` (`XINFO GROUPS`) are computed as Redis 7.0 does,
//!   from the stream's count of entries ever added, including the cases where Redis cannot
//!   tell (nil): metrics built on them read the same on both engines.
//!
//! Deliberate differences, none reachable from a correct script:
//!
//! - `XREADGROUP … BLOCK` is refused with the error Redis gives inside scripts (scripts cannot
//!   block), since this keyspace is only ever driven by scripts.
//! - `XAUTOCLAIM`'s absurdly large `COUNT` values (Redis fails to allocate a buffer for them)
//!   are accepted: nothing is preallocated here.
//! - Approximate trimming (`~`) trims exactly, up to its `LIMIT`; Redis trims whole radix-tree
//!   nodes, i.e. possibly less. Both are valid readings of "at least this much is kept".
//! - Only what the scripts call exists: no `XDEL`, `XCLAIM`, `XREAD`, `XREVRANGE`, `XSETID`,
//!   no other `XGROUP` or `XINFO` subcommands, and no `HELP`. Entries therefore only ever
//!   leave a stream from its start, and a group only ever moves forward.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::{
    arity_error, count, int_arg, is, parse_i64, text, text_128, Keyspace, Resp, Result, SYNTAX,
};

const INVALID_STREAM_ID: &str = "ERR Invalid stream ID specified as stream command argument";
const INVALID_START: &str = "ERR invalid start ID for the interval";
const INVALID_END: &str = "ERR invalid end ID for the interval";
const XGROUP_NEEDS_KEY: &str = "ERR The XGROUP subcommand requires the key to exist. Note that \
     for CREATE you may want to use the MKSTREAM option to create an empty stream automatically.";
const BUSYGROUP: &str = "BUSYGROUP Consumer Group name already exists";
const NO_SUCH_KEY: &str = "ERR no such key";
/// Redis 7.0 prints this text for `XREADGROUP` too.
const UNBALANCED: &str =
    "ERR Unbalanced XREAD list of streams: for each stream key an ID or '$' must be specified.";
const DOLLAR_IN_XREADGROUP: &str = "ERR The $ ID is meaningless in the context of XREADGROUP: \
     you want to read the history of this consumer by specifying a proper ID, or use the > ID \
     to get new messages. The $ ID would just return an empty result set.";
/// `XAUTOCLAIM`'s bound on `COUNT`: Redis's `LONG_MAX / max(sizeof(streamID), 10)`.
const MAX_AUTOCLAIM_COUNT: i64 = i64::MAX / 16;
/// `XAUTOCLAIM` examines at most `COUNT` times this many PEL entries per call.
const AUTOCLAIM_ATTEMPTS_FACTOR: u64 = 10;

/// A stream entry id, `ms-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct StreamId {
    ms: u64,
    seq: u64,
}

impl StreamId {
    const MIN: StreamId = StreamId { ms: 0, seq: 0 };
    const MAX: StreamId = StreamId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    fn next(self) -> Option<StreamId> {
        if self.seq < u64::MAX {
            Some(StreamId {
                ms: self.ms,
                seq: self.seq + 1,
            })
        } else if self.ms < u64::MAX {
            Some(StreamId {
                ms: self.ms + 1,
                seq: 0,
            })
        } else {
            None
        }
    }

    fn prev(self) -> Option<StreamId> {
        if self.seq > 0 {
            Some(StreamId {
                ms: self.ms,
                seq: self.seq - 1,
            })
        } else if self.ms > 0 {
            Some(StreamId {
                ms: self.ms - 1,
                seq: u64::MAX,
            })
        } else {
            None
        }
    }

    fn to_bytes(self) -> Bytes {
        Bytes::from(format!("{}-{}", self.ms, self.seq))
    }

    fn reply(self) -> Resp {
        Resp::Bulk(self.to_bytes())
    }

    /// Parses `ms-seq`, `ms` (seq = `missing_seq`) and, unless `strict`, `-` and `+`.
    fn parse(arg: &[u8], missing_seq: u64, strict: bool) -> Option<StreamId> {
        match arg {
            b"-" if !strict => return Some(StreamId::MIN),
            b"+" if !strict => return Some(StreamId::MAX),
            _ => {}
        }
        if arg.len() > 127 {
            return None;
        }
        let (ms, seq) = match arg.iter().position(|&b| b == b'-') {
            Some(dash) => (parse_u64(&arg[..dash])?, parse_u64(&arg[dash + 1..])?),
            None => (parse_u64(arg)?, missing_seq),
        };
        Some(StreamId { ms, seq })
    }

    /// [`StreamId::parse`], strict, with Redis's error.
    fn parse_strict(arg: &[u8]) -> Result<StreamId> {
        StreamId::parse(arg, 0, true).ok_or_else(|| INVALID_STREAM_ID.into())
    }
}

/// A stream: its entries, and its consumer groups.
#[derive(Default)]
pub(super) struct Stream {
    log: Log,
    /// By name, in byte order as Redis lists them.
    groups: BTreeMap<Bytes, Group>,
}

/// The entries of a stream and the counters Redis keeps about their history. Apart from
/// [`Stream::groups`] so a group can be changed while the entries are read.
#[derive(Default)]
struct Log {
    /// Flat field/value lists by id.
    entries: BTreeMap<StreamId, Vec<Bytes>>,
    /// The last id ever issued, which only grows, so ids stay strictly increasing even after
    /// trimming or when the clock goes back.
    last_id: StreamId,
    /// How many entries were ever added: it tells how many entries lie after a group's last
    /// delivered one (its lag) without counting them. Entries only ever leave from the start
    /// (trimming), which the length accounts for.
    entries_added: u64,
}

impl Log {
    fn first_id(&self) -> Option<StreamId> {
        self.entries.first_key_value().map(|(id, _)| *id)
    }

    fn added(&self) -> i64 {
        i64::try_from(self.entries_added).unwrap_or(i64::MAX)
    }

    /// Removes entries from the oldest by `strategy`, at most `limit` of them (0: no limit).
    fn trim(&mut self, strategy: Trim, limit: u64) -> i64 {
        let mut removed: u64 = 0;
        while limit == 0 || removed < limit {
            let len = u64::try_from(self.entries.len()).unwrap_or(u64::MAX);
            let Some(entry) = self.entries.first_entry() else {
                break;
            };
            let excess = match strategy {
                Trim::MaxLen(max) => len > max,
                Trim::MinId(min) => *entry.key() < min,
            };
            if !excess {
                break;
            }
            entry.remove();
            removed += 1;
        }
        i64::try_from(removed).unwrap_or(i64::MAX)
    }

    /// Redis's `streamEstimateDistanceFromFirstEverEntry`: how many entries were added up to
    /// and including `id`, when that can be known without counting; `None` otherwise.
    fn read_counter_at(&self, id: StreamId) -> Option<i64> {
        let added = self.added();
        if self.entries_added == 0 {
            return Some(0);
        }
        let Some(first) = self.first_id() else {
            // Empty: everything up to the last id was added and is gone.
            return (id <= self.last_id).then_some(added);
        };
        match id.cmp(&self.last_id) {
            std::cmp::Ordering::Equal => return Some(added),
            std::cmp::Ordering::Greater => return None,
            std::cmp::Ordering::Less => {}
        }
        // Between the first and the last entry Redis 7.0 does not count: unknown.
        let len = count(self.entries.len());
        match id.cmp(&first) {
            std::cmp::Ordering::Less => Some(added.saturating_sub(len)),
            std::cmp::Ordering::Equal => Some(added.saturating_sub(len) + 1),
            std::cmp::Ordering::Greater => None,
        }
    }

    /// Redis's `streamReplyWithCGLag`: entries not yet delivered to `group`, if knowable.
    fn lag(&self, group: &Group) -> Option<i64> {
        if self.entries_added == 0 {
            return Some(0);
        }
        let read = group
            .entries_read
            .or_else(|| self.read_counter_at(group.last_id));
        read.map(|read| self.added().saturating_sub(read))
    }
}

/// A consumer group.
struct Group {
    /// The last id delivered with `>`.
    last_id: StreamId,
    /// How many entries the group has read (Redis's logical read counter), `None` when it is
    /// unknown (Redis's -1).
    entries_read: Option<i64>,
    /// Delivered and not yet acknowledged entries, with their owner.
    pel: BTreeMap<StreamId, Pending>,
    /// By name, in byte order as Redis lists them.
    consumers: BTreeMap<Bytes, Consumer>,
}

/// One pending entry (Redis's NACK).
struct Pending {
    consumer: Bytes,
    /// When it was last delivered, in clock milliseconds; its idle time counts from here.
    delivered_at: i64,
    deliveries: u64,
}

/// One consumer of a group.
struct Consumer {
    /// When it last read or claimed something, for `XINFO CONSUMERS`' idle time.
    seen_at: i64,
    /// The ids of the group's PEL it owns.
    pending: BTreeSet<StreamId>,
}

impl Group {
    fn new(last_id: StreamId, entries_read: Option<i64>) -> Group {
        Group {
            last_id,
            entries_read,
            pel: BTreeMap::new(),
            consumers: BTreeMap::new(),
        }
    }

    /// Creates consumer `name` if missing, and marks it as seen now either way (Redis's
    /// lookup with refresh).
    fn touch_consumer(&mut self, name: &Bytes, now: i64) {
        match self.consumers.get_mut(name) {
            Some(consumer) => consumer.seen_at = now,
            None => {
                self.consumers.insert(
                    name.clone(),
                    Consumer {
                        seen_at: now,
                        pending: BTreeSet::new(),
                    },
                );
            }
        }
    }

    /// Makes `to` the owner of pending `id`, moving it out of its previous owner's list.
    fn transfer(&mut self, id: StreamId, to: &Bytes) {
        let Some(pending) = self.pel.get_mut(&id) else {
            return;
        };
        if pending.consumer != to {
            if let Some(old) = self.consumers.get_mut(&pending.consumer) {
                old.pending.remove(&id);
            }
            pending.consumer = to.clone();
        }
        if let Some(consumer) = self.consumers.get_mut(to) {
            consumer.pending.insert(id);
        }
    }

    /// Records the first delivery of `id` to `to`. Groups only move forward, so `id` is
    /// never pending yet.
    fn deliver(&mut self, id: StreamId, to: &Bytes, now: i64) {
        self.pel.insert(
            id,
            Pending {
                consumer: to.clone(),
                delivered_at: now,
                deliveries: 1,
            },
        );
        if let Some(consumer) = self.consumers.get_mut(to) {
            consumer.pending.insert(id);
        }
    }

    /// Removes `id` from the PEL and from its owner's list; false if it was not pending.
    fn ack(&mut self, id: StreamId) -> bool {
        let Some(pending) = self.pel.remove(&id) else {
            return false;
        };
        if let Some(consumer) = self.consumers.get_mut(&pending.consumer) {
            consumer.pending.remove(&id);
        }
        true
    }

    /// Moves the group past `id`, just delivered with `>`, keeping its read counter exact
    /// when it can be.
    fn advance(&mut self, log: &Log, id: StreamId) {
        if id <= self.last_id {
            return;
        }
        self.entries_read = match self.entries_read {
            Some(read) => Some(read.saturating_add(1)),
            None if log.entries_added > 0 => log.read_counter_at(id),
            None => None,
        };
        self.last_id = id;
    }
}

#[derive(Clone, Copy)]
enum Trim {
    MaxLen(u64),
    MinId(StreamId),
}

/// The id argument of `XADD`.
#[derive(Clone, Copy)]
enum NewId {
    /// `*`: from the clock.
    Auto,
    /// `ms-*`: the given ms, the next free sequence.
    AutoSeq(u64),
    /// `ms-seq` or `ms`.
    Explicit(StreamId),
}

/// The parsed options shared by `XADD` and `XTRIM`.
struct TrimArgs {
    trim: Option<Trim>,
    limit: u64,
    no_mkstream: bool,
    /// `XADD` only: the id and the index of the first field.
    id: Option<(NewId, usize)>,
}

/// Redis's `streamParseAddOrTrimArgsOrReply`, for `XADD` (`xadd`) and `XTRIM`.
fn parse_trim_args(a: &[Bytes], xadd: bool) -> Result<TrimArgs> {
    let mut args = TrimArgs {
        trim: None,
        limit: 0,
        no_mkstream: false,
        id: None,
    };
    let mut approx = false;
    let mut limit_given = false;
    let mut i = 2;
    while i < a.len() {
        let more = a.len() - 1 - i;
        let opt = &a[i];
        if xadd && opt.as_ref() == b"*" {
            args.id = Some((NewId::Auto, i + 1));
            break;
        } else if (is(opt, "MAXLEN") || is(opt, "MINID")) && more > 0 {
            if args.trim.is_some() {
                return Err("ERR syntax error, MAXLEN and MINID options at the same time are not compatible".into());
            }
            approx = false;
            if more >= 2 && a[i + 1].as_ref() == b"~" {
                approx = true;
                i += 1;
            } else if more >= 2 && a[i + 1].as_ref() == b"=" {
                i += 1;
            }
            let threshold = &a[i + 1];
            args.trim = Some(if is(opt, "MAXLEN") {
                let n = int_arg(threshold)?;
                Trim::MaxLen(u64::try_from(n).map_err(|_| "ERR The MAXLEN argument must be >= 0.")?)
            } else {
                Trim::MinId(StreamId::parse_strict(threshold)?)
            });
            i += 1;
        } else if is(opt, "LIMIT") && more > 0 {
            let n = int_arg(&a[i + 1])?;
            args.limit = u64::try_from(n).map_err(|_| "ERR The LIMIT argument must be >= 0.")?;
            limit_given = true;
            i += 1;
        } else if xadd && is(opt, "NOMKSTREAM") {
            args.no_mkstream = true;
        } else if xadd {
            args.id = Some((parse_new_id(opt)?, i + 1));
            break;
        } else {
            return Err(SYNTAX.into());
        }
        i += 1;
    }
    if args.limit > 0 && args.trim.is_none() {
        return Err(
            "ERR syntax error, LIMIT cannot be used without specifying a trimming strategy".into(),
        );
    }
    if !xadd && args.trim.is_none() {
        return Err("ERR syntax error, XTRIM must be called with a trimming strategy".into());
    }
    if limit_given && !approx {
        return Err("ERR syntax error, LIMIT cannot be used without the special ~ option".into());
    }
    if !limit_given && approx {
        // Redis bounds approximate trimming's work per call; so do we.
        args.limit = 10_000;
    }
    Ok(args)
}

/// A range query of `XPENDING`'s extended form.
struct PendingQuery<'a> {
    min_idle: i64,
    start: StreamId,
    end: StreamId,
    count: i64,
    consumer: Option<&'a Bytes>,
}

impl Keyspace {
    /// The clock as Redis's signed `mstime_t`, for delivery and idle times.
    fn now_signed(&self) -> i64 {
        i64::try_from(self.now()).unwrap_or(i64::MAX)
    }

    // ---- entries ---------------------------------------------------------------------------

    /// `XADD key [NOMKSTREAM] [MAXLEN|MINID [=|~] threshold [LIMIT n]] *|id field value …`
    pub(super) fn xadd(&mut self, a: &[Bytes]) -> Result<Resp> {
        let args = parse_trim_args(a, true)?;
        let (new_id, fields_at) = args.id.unwrap_or((NewId::Auto, a.len()));
        let fields = a.get(fields_at..).unwrap_or_default();
        if args.id.is_none() || fields.len() < 2 || fields.len() % 2 != 0 {
            return Err(arity_error("XADD"));
        }
        if let NewId::Explicit(StreamId::MIN) = new_id {
            return Err("ERR The ID specified in XADD must be greater than 0-0".into());
        }
        if args.no_mkstream && self.value::<Stream>(&a[1])?.is_none() {
            return Ok(Resp::Nil);
        }
        let now = self.now();
        let log = &mut self.value_or_create::<Stream>(&a[1])?.log;
        let last = log.last_id;
        if last == StreamId::MAX {
            return Err(
                "ERR The stream has exhausted the last possible ID, unable to add more items"
                    .into(),
            );
        }
        let too_small =
            || "ERR The ID specified in XADD is equal or smaller than the target stream top item";
        let id = match new_id {
            NewId::Auto if now > last.ms => StreamId { ms: now, seq: 0 },
            NewId::Auto => last.next().ok_or_else(too_small)?,
            NewId::AutoSeq(ms) if ms == last.ms => {
                last.next().filter(|n| n.ms == ms).ok_or_else(too_small)?
            }
            NewId::AutoSeq(ms) => StreamId { ms, seq: 0 },
            NewId::Explicit(id) => id,
        };
        if id <= last {
            return Err(too_small().into());
        }
        log.entries.insert(id, fields.to_vec());
        log.last_id = id;
        log.entries_added = log.entries_added.saturating_add(1);
        if let Some(trim) = args.trim {
            log.trim(trim, args.limit);
        }
        Ok(id.reply())
    }

    pub(super) fn xlen(&mut self, a: &[Bytes]) -> Result<Resp> {
        Ok(Resp::Int(count(
            self.value::<Stream>(&a[1])?
                .map_or(0, |s| s.log.entries.len()),
        )))
    }

    /// `XRANGE key start end [COUNT n]`; `-`, `+`, `ms`, `ms-seq`, `(` exclusive.
    pub(super) fn xrange(&mut self, a: &[Bytes]) -> Result<Resp> {
        let start = interval_start(&a[2])?;
        let end = interval_end(&a[3])?;
        let mut limit: Option<usize> = None;
        let mut j = 4;
        while let Some(opt) = a.get(j) {
            if is(opt, "COUNT") && j + 1 < a.len() {
                let n = int_arg(&a[j + 1])?;
                limit = Some(usize::try_from(n).unwrap_or(0));
                j += 2;
            } else {
                return Err(SYNTAX.into());
            }
        }
        let Some(stream) = self.value::<Stream>(&a[1])? else {
            return Ok(Resp::Array(Vec::new()));
        };
        if limit == Some(0) {
            // Redis answers COUNT 0 (or negative) with a nil array.
            return Ok(Resp::Nil);
        }
        if start > end {
            return Ok(Resp::Array(Vec::new()));
        }
        let entries = stream
            .log
            .entries
            .range(start..=end)
            .take(limit.unwrap_or(usize::MAX))
            .map(|(id, fields)| entry_reply(*id, fields))
            .collect();
        Ok(Resp::Array(entries))
    }

    /// `XTRIM key MAXLEN|MINID [=|~] threshold [LIMIT n]`. Pending entries stay in their
    /// groups' PELs.
    pub(super) fn xtrim(&mut self, a: &[Bytes]) -> Result<Resp> {
        let args = parse_trim_args(a, false)?;
        let Some(stream) = self.value_mut::<Stream>(&a[1])? else {
            return Ok(Resp::Int(0));
        };
        let removed = match args.trim {
            Some(trim) => stream.log.trim(trim, args.limit),
            None => 0,
        };
        Ok(Resp::Int(removed))
    }

    // ---- consumer groups -------------------------------------------------------------------

    /// `XGROUP CREATE key group id|$ [MKSTREAM] [ENTRIESREAD n]`.
    ///
    /// The checks run in Redis's order: options, key type, key existence, id, group.
    pub(super) fn xgroup_create(&mut self, a: &[Bytes]) -> Result<Resp> {
        let syntax = || subcommand_syntax_error(&a[0], &a[1]);
        let mut mkstream = false;
        let mut entries_read: Option<i64> = None;
        let mut i = 5;
        while let Some(opt) = a.get(i) {
            if is(opt, "MKSTREAM") {
                mkstream = true;
                i += 1;
            } else if is(opt, "ENTRIESREAD") && i + 1 < a.len() {
                let n = int_arg(&a[i + 1])?;
                if n < -1 {
                    return Err("ERR value for ENTRIESREAD must be positive or -1".into());
                }
                entries_read = (n >= 0).then_some(n);
                i += 2;
            } else {
                return Err(syntax());
            }
        }

        let (key, group_name) = (&a[2], &a[3]);
        // WRONGTYPE comes before anything else, MKSTREAM or not.
        let exists = self.value::<Stream>(key)?.is_some();
        if !mkstream && !exists {
            return Err(XGROUP_NEEDS_KEY.into());
        }
        if a.len() > 8 {
            return Err(syntax());
        }
        let id = if a[4].as_ref() == b"$" {
            self.value::<Stream>(key)?
                .map_or(StreamId::MIN, |s| s.log.last_id)
        } else {
            StreamId::parse_strict(&a[4])?
        };
        // Only now, when nothing can fail any more, may MKSTREAM create the key.
        let stream = self.value_or_create::<Stream>(key)?;
        if stream.groups.contains_key(group_name) {
            return Err(BUSYGROUP.into());
        }
        stream
            .groups
            .insert(group_name.clone(), Group::new(id, entries_read));
        Ok(Resp::Status("OK"))
    }

    /// `XGROUP DELCONSUMER key group consumer`: removes the consumer with its pending
    /// entries, and replies how many those were.
    pub(super) fn xgroup_delconsumer(&mut self, a: &[Bytes]) -> Result<Resp> {
        let group = self.existing_group(&a[2], &a[3])?;
        let Some(consumer) = group.consumers.remove(&a[4]) else {
            return Ok(Resp::Int(0));
        };
        for id in &consumer.pending {
            group.pel.remove(id);
        }
        Ok(Resp::Int(count(consumer.pending.len())))
    }

    /// The stream at `key`; `XGROUP`'s error when there is none.
    fn existing_stream(&mut self, key: &Bytes) -> Result<&mut Stream> {
        self.value_mut::<Stream>(key)?
            .ok_or_else(|| XGROUP_NEEDS_KEY.to_string())
    }

    /// Group `name` of the stream at `key`; `XGROUP`'s errors when either is missing.
    fn existing_group(&mut self, key: &Bytes, name: &Bytes) -> Result<&mut Group> {
        self.existing_stream(key)?
            .groups
            .get_mut(name)
            .ok_or_else(|| no_such_group_for_key(name, key))
    }

    /// `XREADGROUP GROUP group consumer [COUNT n] [NOACK] STREAMS key … id …`
    ///
    /// With `>`: entries after the group's last delivered id, which advance it and (without
    /// `NOACK`) become pending for the consumer; a stream with nothing new is left out of the
    /// reply, and nothing new anywhere is nil. With an id: the consumer's own pending entries
    /// after it, each delivered once more (a deleted one comes back as `[id, nil]`).
    pub(super) fn xreadgroup(&mut self, a: &[Bytes]) -> Result<Resp> {
        let mut count_arg: i64 = 0;
        let mut noack = false;
        let mut group_and_consumer: Option<(&Bytes, &Bytes)> = None;
        let mut streams_at = 0;
        let mut i = 1;
        while i < a.len() {
            let more = a.len() - 1 - i;
            let opt = &a[i];
            if is(opt, "BLOCK") && more > 0 {
                // Scripts cannot block; Redis refuses BLOCK in them with this error, and
                // this keyspace only ever runs scripts.
                return Err(format!(
                    "ERR {} command is not allowed with BLOCK option from scripts",
                    text(&a[0])
                ));
            } else if is(opt, "COUNT") && more > 0 {
                count_arg = int_arg(&a[i + 1])?.max(0);
                i += 1;
            } else if is(opt, "STREAMS") && more > 0 {
                streams_at = i + 1;
                if !(a.len() - streams_at).is_multiple_of(2) {
                    return Err(UNBALANCED.into());
                }
                break;
            } else if is(opt, "GROUP") && more >= 2 {
                group_and_consumer = Some((&a[i + 1], &a[i + 2]));
                i += 2;
            } else if is(opt, "NOACK") {
                noack = true;
            } else {
                return Err(SYNTAX.into());
            }
            i += 1;
        }
        if streams_at == 0 {
            return Err(SYNTAX.into());
        }
        let Some((group_name, consumer)) = group_and_consumer else {
            return Err("ERR Missing GROUP option for XREADGROUP".into());
        };
        let streams = (a.len() - streams_at) / 2;
        let keys = &a[streams_at..streams_at + streams];

        // Everything is checked, stream by stream, before anything is served.
        let mut positions: Vec<Option<StreamId>> = Vec::with_capacity(streams);
        for (key, id) in keys.iter().zip(&a[streams_at + streams..]) {
            let has_group = self
                .value::<Stream>(key)?
                .is_some_and(|s| s.groups.contains_key(group_name));
            if !has_group {
                return Err(format!(
                    "NOGROUP No such key '{}' or consumer group '{}' in XREADGROUP with GROUP \
                     option",
                    text(key),
                    text(group_name)
                ));
            }
            positions.push(match id.as_ref() {
                b"$" => return Err(DOLLAR_IN_XREADGROUP.into()),
                b">" => None,
                // Redis marks `>` with the largest id, so that id means `>` too.
                _ => Some(StreamId::parse_strict(id)?).filter(|id| *id != StreamId::MAX),
            });
        }

        let now = self.now_signed();
        let limit = match usize::try_from(count_arg) {
            Ok(0) | Err(_) => usize::MAX,
            Ok(n) => n,
        };
        let mut served = Vec::new();
        for (key, position) in keys.iter().zip(positions) {
            let Some(Stream { log, groups }) = self.value_mut::<Stream>(key)? else {
                continue;
            };
            let Some(group) = groups.get_mut(group_name) else {
                continue;
            };
            let entries = match position {
                Some(after) => {
                    group.touch_consumer(consumer, now);
                    read_history(log, group, consumer, after, limit, now)
                }
                None => {
                    let has_new = log
                        .entries
                        .last_key_value()
                        .is_some_and(|(newest, _)| *newest > group.last_id);
                    if !has_new {
                        continue;
                    }
                    group.touch_consumer(consumer, now);
                    read_new(log, group, consumer, limit, noack, now)
                }
            };
            served.push(Resp::Array(vec![
                Resp::Bulk(key.clone()),
                Resp::Array(entries),
            ]));
        }
        Ok(if served.is_empty() {
            Resp::Nil
        } else {
            Resp::Array(served)
        })
    }

    /// `XACK key group id …`: how many of the ids were pending. A missing key or group
    /// acknowledges nothing (no error); the ids are all checked before any is acknowledged.
    pub(super) fn xack(&mut self, a: &[Bytes]) -> Result<Resp> {
        let (key, group_name) = (&a[1], &a[2]);
        let has_group = self
            .value::<Stream>(key)?
            .is_some_and(|s| s.groups.contains_key(group_name));
        if !has_group {
            return Ok(Resp::Int(0));
        }
        let ids = a[3..]
            .iter()
            .map(|arg| StreamId::parse_strict(arg))
            .collect::<Result<Vec<_>>>()?;
        let group = self.existing_group(key, group_name)?;
        let acked = ids.into_iter().filter(|id| group.ack(*id)).count();
        Ok(Resp::Int(count(acked)))
    }

    /// `XPENDING key group`: `[count, min id, max id, [[consumer, count], …]]` (nils when
    /// nothing is pending; the per-consumer counts are bulk strings, as in Redis).
    ///
    /// `XPENDING key group [IDLE ms] start end count [consumer]`: `[[id, consumer, idle ms,
    /// deliveries], …]`.
    pub(super) fn xpending(&mut self, a: &[Bytes]) -> Result<Resp> {
        let argc = a.len();
        if argc != 3 && !(6..=9).contains(&argc) {
            return Err(SYNTAX.into());
        }
        // The range arguments are checked before the key, as in Redis.
        let query = if argc >= 6 {
            let mut at = 3;
            let mut min_idle = 0;
            if is(&a[3], "IDLE") {
                min_idle = int_arg(&a[4])?;
                if argc < 8 {
                    return Err(SYNTAX.into());
                }
                at += 2;
            }
            let count = int_arg(&a[at + 2])?.max(0);
            let start = interval_start(&a[at])?;
            let end = interval_end(&a[at + 1])?;
            Some(PendingQuery {
                min_idle,
                start,
                end,
                count,
                consumer: a.get(at + 3),
            })
        } else {
            None
        };

        let (key, group_name) = (&a[1], &a[2]);
        let now = self.now_signed();
        let group = self
            .value::<Stream>(key)?
            .and_then(|s| s.groups.get(group_name))
            .ok_or_else(|| no_group(key, group_name))?;
        Ok(match query {
            None => pending_summary(group),
            Some(query) => pending_range(group, &query, now),
        })
    }

    /// `XAUTOCLAIM key group consumer min-idle-time start [COUNT n] [JUSTID]`: scans the PEL
    /// from `start` and gives up to `n` (default 100) entries idle for at least
    /// `min-idle-time` to `consumer`. Replies `[next start id or 0-0, [[id, fields] …] or
    /// [id …], [deleted id …]]`: entries found deleted from the stream are dropped from the
    /// PEL, listed last, and count towards `n`.
    pub(super) fn xautoclaim(&mut self, a: &[Bytes]) -> Result<Resp> {
        let (key, group_name, consumer) = (&a[1], &a[2], &a[3]);
        let min_idle = parse_i64(&a[4])
            .ok_or("ERR Invalid min-idle-time argument for XAUTOCLAIM")?
            .max(0);
        let start = interval_start(&a[5])?;
        let mut limit: u64 = 100;
        let mut justid = false;
        let mut j = 6;
        while let Some(opt) = a.get(j) {
            if is(opt, "COUNT") && j + 1 < a.len() {
                limit = parse_i64(&a[j + 1])
                    .filter(|n| (1..=MAX_AUTOCLAIM_COUNT).contains(n))
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or("ERR COUNT must be > 0")?;
                j += 1;
            } else if is(opt, "JUSTID") {
                justid = true;
            } else {
                return Err(SYNTAX.into());
            }
            j += 1;
        }
        let now = self.now_signed();
        let Some(Stream { log, groups }) = self.value_mut::<Stream>(key)? else {
            return Err(no_group(key, group_name));
        };
        let group = groups
            .get_mut(group_name)
            .ok_or_else(|| no_group(key, group_name))?;

        // Redis's loop: each PEL entry looked at costs an attempt; claimed and deleted ones
        // also count towards the limit.
        let mut attempts = limit.saturating_mul(AUTOCLAIM_ATTEMPTS_FACTOR);
        let mut left = limit;
        let mut claimed = Vec::new();
        let mut deleted = Vec::new();
        let mut touched = false;
        // The next PEL position to look at; `None` once past the largest possible id.
        let mut cursor = Some(start);
        let mut exhausted = false;
        while attempts > 0 && left > 0 {
            attempts -= 1;
            let next = cursor.and_then(|from| group.pel.range(from..).next().map(|(id, _)| *id));
            let Some(id) = next else {
                exhausted = true;
                break;
            };
            cursor = id.next();
            let Some(fields) = log.entries.get(&id) else {
                group.ack(id);
                deleted.push(id.reply());
                left -= 1;
                continue;
            };
            let idle = group
                .pel
                .get(&id)
                .map_or(0, |p| now.saturating_sub(p.delivered_at));
            if min_idle > 0 && idle < min_idle {
                continue;
            }
            if !touched {
                group.touch_consumer(consumer, now);
                touched = true;
            }
            group.transfer(id, consumer);
            if let Some(pending) = group.pel.get_mut(&id) {
                pending.delivered_at = now;
                if !justid {
                    pending.deliveries = pending.deliveries.saturating_add(1);
                }
            }
            claimed.push(if justid {
                id.reply()
            } else {
                entry_reply(id, fields)
            });
            left -= 1;
        }
        let next_start = if exhausted {
            None
        } else {
            cursor.and_then(|from| group.pel.range(from..).next().map(|(id, _)| *id))
        };
        Ok(Resp::Array(vec![
            next_start.unwrap_or(StreamId::MIN).reply(),
            Resp::Array(claimed),
            Resp::Array(deleted),
        ]))
    }

    /// `XINFO GROUPS key`: name, consumers, pending, last-delivered-id, entries-read and lag
    /// of each group, as flat RESP2 maps.
    pub(super) fn xinfo_groups(&mut self, a: &[Bytes]) -> Result<Resp> {
        let stream = self.value::<Stream>(&a[2])?.ok_or(NO_SUCH_KEY)?;
        let optional = |n: Option<i64>| n.map_or(Resp::Nil, Resp::Int);
        let groups = stream
            .groups
            .iter()
            .map(|(name, group)| {
                Resp::Array(vec![
                    field("name"),
                    Resp::Bulk(name.clone()),
                    field("consumers"),
                    Resp::Int(count(group.consumers.len())),
                    field("pending"),
                    Resp::Int(count(group.pel.len())),
                    field("last-delivered-id"),
                    group.last_id.reply(),
                    field("entries-read"),
                    optional(group.entries_read),
                    field("lag"),
                    optional(stream.log.lag(group)),
                ])
            })
            .collect();
        Ok(Resp::Array(groups))
    }

    /// `XINFO CONSUMERS key group`: name, pending and idle time of each consumer, as flat
    /// RESP2 maps.
    pub(super) fn xinfo_consumers(&mut self, a: &[Bytes]) -> Result<Resp> {
        let now = self.now_signed();
        let key = &a[2];
        let stream = self.value::<Stream>(key)?.ok_or(NO_SUCH_KEY)?;
        let group = stream
            .groups
            .get(&a[3])
            .ok_or_else(|| no_such_group_for_key(&a[3], key))?;
        let consumers = group
            .consumers
            .iter()
            .map(|(name, consumer)| {
                Resp::Array(vec![
                    field("name"),
                    Resp::Bulk(name.clone()),
                    field("pending"),
                    Resp::Int(count(consumer.pending.len())),
                    field("idle"),
                    Resp::Int(now.saturating_sub(consumer.seen_at).max(0)),
                ])
            })
            .collect();
        Ok(Resp::Array(consumers))
    }
}

/// A field name of an `XINFO` map.
fn field(name: &'static str) -> Resp {
    Resp::Bulk(Bytes::from_static(name.as_bytes()))
}

/// `XREADGROUP … >`: the entries after the group's last delivered id, up to `limit`.
fn read_new(
    log: &Log,
    group: &mut Group,
    consumer: &Bytes,
    limit: usize,
    noack: bool,
    now: i64,
) -> Vec<Resp> {
    let Some(from) = group.last_id.next() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (id, fields) in log.entries.range(from..).take(limit) {
        group.advance(log, *id);
        if !noack {
            group.deliver(*id, consumer, now);
        }
        out.push(entry_reply(*id, fields));
    }
    out
}

/// `XREADGROUP … id`: the consumer's pending entries after `after`, up to `limit`, each
/// counted as delivered again; deleted ones as `[id, nil]`, not counted.
fn read_history(
    log: &Log,
    group: &mut Group,
    consumer: &Bytes,
    after: StreamId,
    limit: usize,
    now: i64,
) -> Vec<Resp> {
    let (Some(from), Some(owner)) = (after.next(), group.consumers.get(consumer)) else {
        return Vec::new();
    };
    let ids: Vec<StreamId> = owner.pending.range(from..).take(limit).copied().collect();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match log.entries.get(&id) {
            Some(fields) => {
                if let Some(pending) = group.pel.get_mut(&id) {
                    pending.delivered_at = now;
                    pending.deliveries = pending.deliveries.saturating_add(1);
                }
                out.push(entry_reply(id, fields));
            }
            None => out.push(Resp::Array(vec![id.reply(), Resp::Nil])),
        }
    }
    out
}

/// `XPENDING key group`.
fn pending_summary(group: &Group) -> Resp {
    let (Some((first, _)), Some((last, _))) =
        (group.pel.first_key_value(), group.pel.last_key_value())
    else {
        return Resp::Array(vec![Resp::Int(0), Resp::Nil, Resp::Nil, Resp::Nil]);
    };
    let consumers = group
        .consumers
        .iter()
        .filter(|(_, c)| !c.pending.is_empty())
        .map(|(name, c)| {
            Resp::Array(vec![
                Resp::Bulk(name.clone()),
                Resp::Bulk(Bytes::from(c.pending.len().to_string())),
            ])
        })
        .collect();
    Resp::Array(vec![
        Resp::Int(count(group.pel.len())),
        first.reply(),
        last.reply(),
        Resp::Array(consumers),
    ])
}

/// `XPENDING key group [IDLE ms] start end count [consumer]`.
fn pending_range(group: &Group, query: &PendingQuery<'_>, now: i64) -> Resp {
    let in_range: Box<dyn Iterator<Item = StreamId> + '_> = if query.start > query.end {
        Box::new(std::iter::empty())
    } else {
        match query.consumer {
            // An unknown consumer simply has nothing pending.
            Some(name) => match group.consumers.get(name) {
                Some(c) => Box::new(c.pending.range(query.start..=query.end).copied()),
                None => Box::new(std::iter::empty()),
            },
            None => Box::new(group.pel.range(query.start..=query.end).map(|(id, _)| *id)),
        }
    };
    let mut left = query.count;
    let mut out = Vec::new();
    for id in in_range {
        if left == 0 {
            break;
        }
        let Some(pending) = group.pel.get(&id) else {
            continue;
        };
        let idle = now.saturating_sub(pending.delivered_at);
        if query.min_idle != 0 && idle < query.min_idle {
            continue;
        }
        left -= 1;
        out.push(Resp::Array(vec![
            id.reply(),
            Resp::Bulk(pending.consumer.clone()),
            Resp::Int(idle.max(0)),
            Resp::Int(i64::try_from(pending.deliveries).unwrap_or(i64::MAX)),
        ]));
    }
    Resp::Array(out)
}

/// `[id, [field, value, …]]`.
fn entry_reply(id: StreamId, fields: &[Bytes]) -> Resp {
    Resp::Array(vec![
        id.reply(),
        Resp::Array(fields.iter().cloned().map(Resp::Bulk).collect()),
    ])
}

/// `*`, `ms-*`, `ms-seq` or `ms` (seq 0), Redis's strict id parsing for `XADD`.
fn parse_new_id(arg: &[u8]) -> Result<NewId> {
    if let Some(ms) = arg.strip_suffix(b"-*") {
        return parse_u64(ms)
            .map(NewId::AutoSeq)
            .ok_or_else(|| INVALID_STREAM_ID.into());
    }
    StreamId::parse_strict(arg).map(NewId::Explicit)
}

/// A range bound: the id and whether it is exclusive (`(` prefix); `-`/`+` unless exclusive.
fn parse_interval_id(arg: &[u8], missing_seq: u64) -> Result<(StreamId, bool)> {
    match arg.split_first() {
        Some((b'(', rest)) if !rest.is_empty() => StreamId::parse(rest, missing_seq, true)
            .map(|id| (id, true))
            .ok_or_else(|| INVALID_STREAM_ID.into()),
        _ => StreamId::parse(arg, missing_seq, false)
            .map(|id| (id, false))
            .ok_or_else(|| INVALID_STREAM_ID.into()),
    }
}

/// The first id of a range starting at `arg` (`ms` means `ms-0`).
fn interval_start(arg: &[u8]) -> Result<StreamId> {
    match parse_interval_id(arg, 0)? {
        (id, true) => id.next().ok_or_else(|| INVALID_START.into()),
        (id, false) => Ok(id),
    }
}

/// The last id of a range ending at `arg` (`ms` means the last id of that millisecond).
fn interval_end(arg: &[u8]) -> Result<StreamId> {
    match parse_interval_id(arg, u64::MAX)? {
        (id, true) => id.prev().ok_or_else(|| INVALID_END.into()),
        (id, false) => Ok(id),
    }
}

/// Unsigned decimal for stream ids (leading zeros allowed, as `strtoull` does).
fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        if c.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(c - b'0'))
        } else {
            None
        }
    })
}

/// `NOGROUP` of `XPENDING` and `XAUTOCLAIM`.
fn no_group(key: &[u8], group: &[u8]) -> String {
    format!(
        "NOGROUP No such key '{}' or consumer group '{}'",
        text(key),
        text(group)
    )
}

/// `NOGROUP` of `XGROUP` and `XINFO CONSUMERS`.
fn no_such_group_for_key(group: &[u8], key: &[u8]) -> String {
    format!(
        "NOGROUP No such consumer group '{}' for key name '{}'",
        text(group),
        text(key)
    )
}

/// Redis's `addReplySubcommandSyntaxError`: options a subcommand does not take, or too many.
fn subcommand_syntax_error(command: &[u8], sub: &[u8]) -> String {
    format!(
        "ERR unknown subcommand or wrong number of arguments for '{}'. Try {} HELP.",
        text_128(sub),
        text(command).to_ascii_uppercase()
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering as AtomicOrdering;

    use super::super::tests::{bulk, bulks, err, keyspace, ok, type_of};
    use super::super::WRONGTYPE;
    use super::*;

    fn entry(id: &str, fields: &[&str]) -> Resp {
        Resp::Array(vec![bulk(id), bulks(fields)])
    }

    fn array(items: Vec<Resp>) -> Resp {
        Resp::Array(items)
    }

    /// `XPENDING`'s extended reply for one entry.
    fn pending(id: &str, consumer: &str, idle: i64, deliveries: i64) -> Resp {
        array(vec![
            bulk(id),
            bulk(consumer),
            Resp::Int(idle),
            Resp::Int(deliveries),
        ])
    }

    /// The value of `name` in a flat RESP2 map.
    fn field<'a>(map: &'a Resp, name: &str) -> &'a Resp {
        let Resp::Array(items) = map else {
            panic!("not a map: {map:?}");
        };
        items
            .chunks_exact(2)
            .find(|kv| kv[0] == bulk(name))
            .map(|kv| &kv[1])
            .unwrap_or_else(|| panic!("no {name} in {map:?}"))
    }

    /// `XINFO GROUPS`' map of the only group.
    fn group_info(ks: &mut Keyspace, key: &str) -> Resp {
        match ok(ks, &format!("XINFO GROUPS {key}")) {
            Resp::Array(mut groups) if groups.len() == 1 => groups.remove(0),
            other => panic!("expected one group, got {other:?}"),
        }
    }

    #[test]
    fn stream_ids_strictly_increase() {
        let (mut ks, now) = keyspace();
        let t = now.load(AtomicOrdering::SeqCst);
        assert_eq!(ok(&mut ks, "XADD s * a 1"), bulk(&format!("{t}-0")));
        assert_eq!(ok(&mut ks, "XADD s * a 2"), bulk(&format!("{t}-1")));
        // The clock going back never produces a smaller id.
        now.store(t - 500, AtomicOrdering::SeqCst);
        assert_eq!(ok(&mut ks, "XADD s * a 3"), bulk(&format!("{t}-2")));
        now.store(t + 1, AtomicOrdering::SeqCst);
        assert_eq!(ok(&mut ks, "XADD s * a 4"), bulk(&format!("{}-0", t + 1)));
        assert_eq!(
            err(&mut ks, &format!("XADD s {t}-5 a 5")),
            "ERR The ID specified in XADD is equal or smaller than the target stream top item"
        );
        assert_eq!(
            ok(&mut ks, &format!("XADD s {}-* a 5", t + 1)),
            bulk(&format!("{}-1", t + 1))
        );
        assert_eq!(
            ok(&mut ks, &format!("XADD s {} a 6", t + 2)),
            bulk(&format!("{}-0", t + 2))
        );
        assert_eq!(
            ok(&mut ks, &format!("XADD s {}-7 a 7", t + 2)),
            bulk(&format!("{}-7", t + 2))
        );
        assert_eq!(ok(&mut ks, "XLEN s"), Resp::Int(7));
        // Trimming the newest entry does not let its id be reused.
        assert_eq!(ok(&mut ks, "XTRIM s MAXLEN 0"), Resp::Int(7));
        assert_eq!(ok(&mut ks, "XADD s * a 8"), bulk(&format!("{}-8", t + 2)));
        assert_eq!(
            err(&mut ks, "XADD fresh 0-0 a 1"),
            "ERR The ID specified in XADD must be greater than 0-0"
        );
        assert_eq!(ok(&mut ks, "XADD fresh 0-* a 1"), bulk("0-1"));
        assert_eq!(err(&mut ks, "XADD s 12x a 1"), INVALID_STREAM_ID);
        assert_eq!(
            err(&mut ks, "XADD s * a"),
            "ERR wrong number of arguments for 'xadd' command"
        );
        assert_eq!(
            err(&mut ks, "XADD s * a 1 b"),
            "ERR wrong number of arguments for 'xadd' command"
        );
        assert_eq!(ok(&mut ks, "XADD nope NOMKSTREAM * a 1"), Resp::Nil);
        assert_eq!(ok(&mut ks, "EXISTS nope"), Resp::Int(0));
        assert_eq!(type_of(&mut ks, "s"), "stream");
    }

    #[test]
    fn stream_range_and_trim() {
        let (mut ks, _) = keyspace();
        for i in 1..=5 {
            ok(&mut ks, &format!("XADD s {i}-0 n {i}"));
        }
        let entry =
            |i: u64| Resp::Array(vec![bulk(&format!("{i}-0")), bulks(&["n", &i.to_string()])]);
        assert_eq!(
            ok(&mut ks, "XRANGE s - +"),
            Resp::Array((1..=5).map(entry).collect())
        );
        assert_eq!(
            ok(&mut ks, "XRANGE s 2 3"),
            Resp::Array(vec![entry(2), entry(3)])
        );
        assert_eq!(
            ok(&mut ks, "XRANGE s (2-0 + COUNT 2"),
            Resp::Array(vec![entry(3), entry(4)])
        );
        assert_eq!(ok(&mut ks, "XRANGE s - (1-0"), Resp::Array(vec![]));
        assert_eq!(ok(&mut ks, "XRANGE s 4 2"), Resp::Array(vec![]));
        assert_eq!(ok(&mut ks, "XRANGE s - + COUNT 0"), Resp::Nil);
        assert_eq!(ok(&mut ks, "XRANGE missing - +"), Resp::Array(vec![]));
        assert_eq!(err(&mut ks, "XRANGE s - + COUNT"), SYNTAX);
        assert_eq!(err(&mut ks, "XRANGE s x +"), INVALID_STREAM_ID);
        assert_eq!(
            err(
                &mut ks,
                "XRANGE s (18446744073709551615-18446744073709551615 +"
            ),
            INVALID_START
        );
        assert_eq!(err(&mut ks, "XRANGE s - (0-0"), INVALID_END);

        assert_eq!(err(&mut ks, "XTRIM s MINID +"), INVALID_STREAM_ID);
        assert_eq!(ok(&mut ks, "XTRIM s MAXLEN 2"), Resp::Int(3));
        assert_eq!(
            ok(&mut ks, "XRANGE s - +"),
            Resp::Array(vec![entry(4), entry(5)])
        );
        assert_eq!(ok(&mut ks, "XTRIM s MINID = 5"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "XADD s MAXLEN ~ 1 5-* n 6"), bulk("5-1"));
        assert_eq!(ok(&mut ks, "XLEN s"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "XTRIM s MAXLEN 0"), Resp::Int(1));
        // Unlike other types, an emptied stream still exists, and keeps its last id.
        assert_eq!(ok(&mut ks, "EXISTS s"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "XADD s 5-* n 7"), bulk("5-2"));
        assert_eq!(ok(&mut ks, "XTRIM missing MAXLEN 0"), Resp::Int(0));
        assert_eq!(
            err(&mut ks, "XTRIM s MAXLEN 1 LIMIT 10"),
            "ERR syntax error, LIMIT cannot be used without the special ~ option"
        );
        assert_eq!(ok(&mut ks, "XTRIM s MAXLEN ~ 0 LIMIT 10"), Resp::Int(1));
        assert_eq!(
            err(&mut ks, "XTRIM s MAXLEN -1"),
            "ERR The MAXLEN argument must be >= 0."
        );
        assert_eq!(
            err(&mut ks, "XTRIM s MAXLEN 1 MINID 1"),
            "ERR syntax error, MAXLEN and MINID options at the same time are not compatible"
        );
        assert_eq!(
            err(&mut ks, "XTRIM s LIMIT 1"),
            "ERR syntax error, LIMIT cannot be used without specifying a trimming strategy"
        );
        assert_eq!(err(&mut ks, "XTRIM s FOO 1"), SYNTAX);
        ok(&mut ks, "XADD big * n 1");
        ok(&mut ks, "XADD big * n 2");
        ok(&mut ks, "XADD big * n 3");
        assert_eq!(
            ok(&mut ks, "XADD big MINID 1000000-2 * n 4"),
            bulk("1000000-3")
        );
        assert_eq!(ok(&mut ks, "XLEN big"), Resp::Int(2));
    }

    #[test]
    fn xgroup_create_and_delconsumer() {
        let (mut ks, _) = keyspace();
        assert_eq!(
            err(&mut ks, "XGROUP CREATE s g $"),
            XGROUP_NEEDS_KEY,
            "without MKSTREAM the key must exist"
        );
        assert_eq!(ok(&mut ks, "EXISTS s"), Resp::Int(0));
        assert_eq!(
            err(&mut ks, "XGROUP CREATE s g nope MKSTREAM"),
            INVALID_STREAM_ID
        );
        assert_eq!(
            ok(&mut ks, "EXISTS s"),
            Resp::Int(0),
            "a failed CREATE does not create the stream"
        );
        assert_eq!(
            ok(&mut ks, "XGROUP CREATE s g $ MKSTREAM"),
            Resp::Status("OK")
        );
        assert_eq!(type_of(&mut ks, "s"), "stream");
        assert_eq!(ok(&mut ks, "XLEN s"), Resp::Int(0));
        assert_eq!(err(&mut ks, "XGROUP CREATE s g 0"), BUSYGROUP);
        assert_eq!(err(&mut ks, "XGROUP CREATE s g 0 MKSTREAM"), BUSYGROUP);
        assert_eq!(err(&mut ks, "XGROUP CREATE s g2 -"), INVALID_STREAM_ID);
        assert_eq!(err(&mut ks, "XGROUP CREATE s g2 +"), INVALID_STREAM_ID);
        assert_eq!(
            err(&mut ks, "XGROUP CREATE s g2 0 ENTRIESREAD -2"),
            "ERR value for ENTRIESREAD must be positive or -1"
        );
        assert_eq!(
            err(&mut ks, "XGROUP CREATE s g2 0 ENTRIESREAD x"),
            super::super::NOT_INTEGER
        );
        assert_eq!(
            err(&mut ks, "XGROUP CREATE s g2 0 FOO"),
            "ERR unknown subcommand or wrong number of arguments for 'CREATE'. Try XGROUP HELP."
        );
        assert_eq!(
            err(
                &mut ks,
                "XGROUP CREATE s g2 0 MKSTREAM MKSTREAM ENTRIESREAD 1"
            ),
            "ERR unknown subcommand or wrong number of arguments for 'CREATE'. Try XGROUP HELP."
        );
        assert_eq!(
            err(&mut ks, "xgroup nope s g"),
            "ERR unknown subcommand 'nope'. Try XGROUP HELP."
        );
        // No script moves or destroys a group, so neither can be done here.
        assert_eq!(
            err(&mut ks, "xgroup setid s g 0"),
            "ERR unknown subcommand 'setid'. Try XGROUP HELP."
        );
        assert_eq!(
            err(&mut ks, "XGROUP DESTROY s g"),
            "ERR unknown subcommand 'DESTROY'. Try XGROUP HELP."
        );
        assert_eq!(
            err(&mut ks, "XGROUP"),
            "ERR wrong number of arguments for 'xgroup' command"
        );
        assert_eq!(
            err(&mut ks, "XGROUP CREATE s"),
            "ERR wrong number of arguments for 'xgroup|create' command"
        );
        assert_eq!(
            err(&mut ks, "XGROUP DELCONSUMER s g c x"),
            "ERR wrong number of arguments for 'xgroup|delconsumer' command"
        );
        assert_eq!(
            err(&mut ks, "XGROUP DELCONSUMER s nog c"),
            "NOGROUP No such consumer group 'nog' for key name 's'"
        );
        assert_eq!(
            err(&mut ks, "XGROUP DELCONSUMER missing g c"),
            XGROUP_NEEDS_KEY
        );
        ok(&mut ks, "HSET str f v");
        assert_eq!(err(&mut ks, "XGROUP CREATE str g $ MKSTREAM"), WRONGTYPE);

        assert_eq!(ok(&mut ks, "XGROUP DELCONSUMER s g nobody"), Resp::Int(0));
        ok(&mut ks, "XADD s 1-1 f 1");
        ok(&mut ks, "XADD s 1-2 f 2");
        ok(&mut ks, "XREADGROUP GROUP g c1 STREAMS s >");
        assert_eq!(ok(&mut ks, "XGROUP DELCONSUMER s g c1"), Resp::Int(2));
        assert_eq!(
            ok(&mut ks, "XPENDING s g"),
            array(vec![Resp::Int(0), Resp::Nil, Resp::Nil, Resp::Nil]),
            "a deleted consumer's pending entries leave the PEL"
        );
        assert_eq!(ok(&mut ks, "XINFO CONSUMERS s g"), array(vec![]));
        assert_eq!(ok(&mut ks, "XGROUP DELCONSUMER s g c1"), Resp::Int(0));

        // `$` is the last id; ENTRIESREAD sets the read counter.
        ok(&mut ks, "XADD t 1-1 f 1");
        ok(&mut ks, "XADD t 1-2 f 2");
        assert_eq!(
            ok(&mut ks, "XGROUP CREATE t g $ ENTRIESREAD 2"),
            Resp::Status("OK")
        );
        let info = group_info(&mut ks, "t");
        assert_eq!(field(&info, "last-delivered-id"), &bulk("1-2"));
        assert_eq!(field(&info, "entries-read"), &Resp::Int(2));
        assert_eq!(field(&info, "lag"), &Resp::Int(0));
    }

    #[test]
    fn xreadgroup_delivers_new_entries_and_rereads_history() {
        let (mut ks, now) = keyspace();
        ok(&mut ks, "XGROUP CREATE s g $ MKSTREAM");
        assert_eq!(
            ok(&mut ks, "XREADGROUP GROUP g c1 STREAMS s >"),
            Resp::Nil,
            "nothing new"
        );
        assert_eq!(
            ok(&mut ks, "XINFO CONSUMERS s g"),
            array(vec![]),
            "a read that serves nothing creates no consumer"
        );
        for i in 1..=3 {
            ok(&mut ks, &format!("XADD s 1-{i} f {i}"));
        }
        assert_eq!(
            ok(&mut ks, "XREADGROUP GROUP g c1 COUNT 2 STREAMS s >"),
            array(vec![array(vec![
                bulk("s"),
                array(vec![entry("1-1", &["f", "1"]), entry("1-2", &["f", "2"])]),
            ])])
        );
        now.fetch_add(40, AtomicOrdering::SeqCst);
        assert_eq!(
            ok(&mut ks, "XPENDING s g - + 10"),
            array(vec![
                pending("1-1", "c1", 40, 1),
                pending("1-2", "c1", 40, 1)
            ])
        );
        // Re-reading its history delivers again: idle back to 0, one more delivery.
        assert_eq!(
            ok(&mut ks, "XREADGROUP GROUP g c1 COUNT 1 STREAMS s 0"),
            array(vec![array(vec![
                bulk("s"),
                array(vec![entry("1-1", &["f", "1"])]),
            ])])
        );
        assert_eq!(
            ok(&mut ks, "XPENDING s g - + 10"),
            array(vec![
                pending("1-1", "c1", 0, 2),
                pending("1-2", "c1", 40, 1)
            ])
        );
        // Another consumer's history is its own: empty, but the stream is listed.
        assert_eq!(
            ok(&mut ks, "XREADGROUP GROUP g c2 STREAMS s 0"),
            array(vec![array(vec![bulk("s"), array(vec![])])])
        );
        // NOACK delivers without making the entry pending.
        assert_eq!(
            ok(&mut ks, "XREADGROUP GROUP g c2 NOACK STREAMS s >"),
            array(vec![array(vec![
                bulk("s"),
                array(vec![entry("1-3", &["f", "3"])]),
            ])])
        );
        assert_eq!(
            ok(&mut ks, "XPENDING s g"),
            array(vec![
                Resp::Int(2),
                bulk("1-1"),
                bulk("1-2"),
                array(vec![bulks(&["c1", "2"])]),
            ])
        );
        // The largest id is Redis's marker for `>`.
        ok(&mut ks, "XADD s 1-4 f 4");
        assert_eq!(
            ok(
                &mut ks,
                "XREADGROUP GROUP g c2 STREAMS s 18446744073709551615-18446744073709551615"
            ),
            array(vec![array(vec![
                bulk("s"),
                array(vec![entry("1-4", &["f", "4"])]),
            ])])
        );
        // A trimmed entry still pending comes back as [id, nil] and is not counted.
        ok(&mut ks, "XTRIM s MINID 1-2");
        assert_eq!(
            ok(&mut ks, "XREADGROUP GROUP g c1 STREAMS s 0-0"),
            array(vec![array(vec![
                bulk("s"),
                array(vec![
                    array(vec![bulk("1-1"), Resp::Nil]),
                    entry("1-2", &["f", "2"]),
                ]),
            ])])
        );
        assert_eq!(
            ok(&mut ks, "XPENDING s g - + 1 c1"),
            array(vec![pending("1-1", "c1", 0, 2)])
        );
    }

    #[test]
    fn xreadgroup_errors_and_multiple_streams() {
        let (mut ks, _) = keyspace();
        ok(&mut ks, "XADD a 1-1 f 1");
        ok(&mut ks, "XADD b 1-1 f 1");
        ok(&mut ks, "XGROUP CREATE a g 0");
        ok(&mut ks, "XGROUP CREATE b g $");
        ok(&mut ks, "HSET str f v");
        assert_eq!(
            err(&mut ks, "xreadgroup GROUP g c BLOCK 0 STREAMS a >"),
            "ERR xreadgroup command is not allowed with BLOCK option from scripts"
        );
        assert_eq!(
            err(&mut ks, "XREADGROUP GROUP g c STREAMS a > b"),
            UNBALANCED
        );
        assert_eq!(
            err(&mut ks, "XREADGROUP COUNT 1 NOACK STREAMS a >"),
            "ERR Missing GROUP option for XREADGROUP"
        );
        assert_eq!(err(&mut ks, "XREADGROUP GROUP g c FOO STREAMS a >"), SYNTAX);
        assert_eq!(err(&mut ks, "XREADGROUP GROUP g c COUNT 1 STREAMS"), SYNTAX);
        assert_eq!(
            err(&mut ks, "XREADGROUP GROUP g c COUNT x STREAMS a >"),
            super::super::NOT_INTEGER
        );
        assert_eq!(
            err(&mut ks, "XREADGROUP GROUP nog c STREAMS a >"),
            "NOGROUP No such key 'a' or consumer group 'nog' in XREADGROUP with GROUP option"
        );
        assert_eq!(
            err(&mut ks, "XREADGROUP GROUP g c STREAMS missing >"),
            "NOGROUP No such key 'missing' or consumer group 'g' in XREADGROUP with GROUP option"
        );
        assert_eq!(
            err(&mut ks, "XREADGROUP GROUP g c STREAMS str >"),
            WRONGTYPE
        );
        assert_eq!(
            err(&mut ks, "XREADGROUP GROUP g c STREAMS a $"),
            DOLLAR_IN_XREADGROUP
        );
        assert_eq!(
            err(&mut ks, "XREADGROUP GROUP g c STREAMS a -"),
            INVALID_STREAM_ID
        );
        // An error in a later stream means nothing was read from the earlier ones.
        assert_eq!(
            err(&mut ks, "XREADGROUP GROUP g c STREAMS a str > >"),
            WRONGTYPE
        );
        assert_eq!(
            ok(&mut ks, "XPENDING a g"),
            array(vec![Resp::Int(0), Resp::Nil, Resp::Nil, Resp::Nil])
        );
        // Only streams with something to serve are listed.
        assert_eq!(
            ok(&mut ks, "XREADGROUP GROUP g c STREAMS a b > >"),
            array(vec![array(vec![
                bulk("a"),
                array(vec![entry("1-1", &["f", "1"])]),
            ])])
        );
        ok(&mut ks, "XADD b 1-2 f 2");
        assert_eq!(
            ok(&mut ks, "XREADGROUP GROUP g c STREAMS a b 0 >"),
            array(vec![
                array(vec![bulk("a"), array(vec![entry("1-1", &["f", "1"])])]),
                array(vec![bulk("b"), array(vec![entry("1-2", &["f", "2"])])]),
            ])
        );
        assert_eq!(
            ok(&mut ks, "XREADGROUP GROUP g c STREAMS a b > >"),
            Resp::Nil
        );
    }

    /// `s` with entries `1-1`…`1-n` (`f` = i) and group `g` at 0, everything read by `c1`.
    fn delivered(ks: &mut Keyspace, n: u64) {
        for i in 1..=n {
            ok(ks, &format!("XADD s 1-{i} f {i}"));
        }
        ok(ks, "XGROUP CREATE s g 0");
        ok(ks, "XREADGROUP GROUP g c1 STREAMS s >");
    }

    fn consumers(ks: &mut Keyspace) -> Vec<(String, i64, i64)> {
        let Resp::Array(list) = ok(ks, "XINFO CONSUMERS s g") else {
            panic!("XINFO CONSUMERS is an array");
        };
        list.iter()
            .map(|c| {
                let Resp::Bulk(name) = field(c, "name") else {
                    panic!("name is a bulk");
                };
                let (Resp::Int(pending), Resp::Int(idle)) = (field(c, "pending"), field(c, "idle"))
                else {
                    panic!("pending and idle are integers");
                };
                (String::from_utf8_lossy(name).into_owned(), *pending, *idle)
            })
            .collect()
    }

    #[test]
    fn xack_and_xpending() {
        let (mut ks, now) = keyspace();
        delivered(&mut ks, 3);
        ok(&mut ks, "XADD s 1-4 f 4");
        now.fetch_add(100, AtomicOrdering::SeqCst);
        ok(&mut ks, "XREADGROUP GROUP g c2 STREAMS s >");
        now.fetch_add(10, AtomicOrdering::SeqCst);
        assert_eq!(
            ok(&mut ks, "XPENDING s g"),
            array(vec![
                Resp::Int(4),
                bulk("1-1"),
                bulk("1-4"),
                array(vec![bulks(&["c1", "3"]), bulks(&["c2", "1"])]),
            ])
        );
        assert_eq!(
            ok(&mut ks, "XPENDING s g IDLE 50 - + 10"),
            array(vec![
                pending("1-1", "c1", 110, 1),
                pending("1-2", "c1", 110, 1),
                pending("1-3", "c1", 110, 1),
            ])
        );
        assert_eq!(
            ok(&mut ks, "XPENDING s g IDLE 50 (1-1 1-2 10 c1"),
            array(vec![pending("1-2", "c1", 110, 1)])
        );
        assert_eq!(
            ok(&mut ks, "XPENDING s g 1-2 + 1"),
            array(vec![pending("1-2", "c1", 110, 1)])
        );
        assert_eq!(
            ok(&mut ks, "XPENDING s g - + 10 c2"),
            array(vec![pending("1-4", "c2", 10, 1)])
        );
        // Redis ignores what follows the consumer when IDLE is absent.
        assert_eq!(
            ok(&mut ks, "XPENDING s g - + 10 c2 extra args"),
            array(vec![pending("1-4", "c2", 10, 1)])
        );
        assert_eq!(ok(&mut ks, "XPENDING s g - + 10 nobody"), array(vec![]));
        assert_eq!(ok(&mut ks, "XPENDING s g - + -1"), array(vec![]));
        assert_eq!(ok(&mut ks, "XPENDING s g 1-3 1-2 10"), array(vec![]));
        // The clock going back never shows a negative idle time.
        now.fetch_sub(1000, AtomicOrdering::SeqCst);
        assert_eq!(
            ok(&mut ks, "XPENDING s g - + 1"),
            array(vec![pending("1-1", "c1", 0, 1)])
        );
        now.fetch_add(1000, AtomicOrdering::SeqCst);

        assert_eq!(ok(&mut ks, "XACK s g 1-1 1-1 9-9 1-4"), Resp::Int(2));
        assert_eq!(ok(&mut ks, "XACK s g 1-1"), Resp::Int(0));
        assert_eq!(
            ok(&mut ks, "XPENDING s g"),
            array(vec![
                Resp::Int(2),
                bulk("1-2"),
                bulk("1-3"),
                array(vec![bulks(&["c1", "2"])]),
            ]),
            "a consumer with nothing pending is left out"
        );
        assert_eq!(err(&mut ks, "XACK s g 1-2 nope"), INVALID_STREAM_ID);
        assert_eq!(
            ok(&mut ks, "XPENDING s g - + 10 c1").clone(),
            array(vec![
                pending("1-2", "c1", 110, 1),
                pending("1-3", "c1", 110, 1)
            ]),
            "a failed XACK acknowledges nothing"
        );
        // A missing key or group acknowledges nothing, without even parsing the ids.
        assert_eq!(ok(&mut ks, "XACK missing g nope"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "XACK s nog nope"), Resp::Int(0));

        assert_eq!(err(&mut ks, "XPENDING s g -"), SYNTAX);
        assert_eq!(err(&mut ks, "XPENDING s g - +"), SYNTAX);
        assert_eq!(err(&mut ks, "XPENDING s g IDLE 10 - +"), SYNTAX);
        assert_eq!(err(&mut ks, "XPENDING s g IDLE 10 - + 1 c x"), SYNTAX);
        assert_eq!(
            err(&mut ks, "XPENDING s g IDLE x - + 1"),
            super::super::NOT_INTEGER
        );
        assert_eq!(
            err(&mut ks, "XPENDING s g - + x"),
            super::super::NOT_INTEGER
        );
        assert_eq!(err(&mut ks, "XPENDING s g x + 1"), INVALID_STREAM_ID);
        assert_eq!(
            err(
                &mut ks,
                "XPENDING s g (18446744073709551615-18446744073709551615 + 1"
            ),
            INVALID_START
        );
        assert_eq!(err(&mut ks, "XPENDING s g - (0-0 1"), INVALID_END);
        // The range is checked before the key.
        assert_eq!(err(&mut ks, "XPENDING missing g x + 1"), INVALID_STREAM_ID);
        assert_eq!(
            err(&mut ks, "XPENDING missing g"),
            "NOGROUP No such key 'missing' or consumer group 'g'"
        );
        assert_eq!(
            err(&mut ks, "XPENDING s nog - + 1"),
            "NOGROUP No such key 's' or consumer group 'nog'"
        );
    }

    #[test]
    fn xautoclaim_claims_idle_entries_and_reports_deleted_ones() {
        let (mut ks, now) = keyspace();
        delivered(&mut ks, 5);
        ok(&mut ks, "XTRIM s MINID 1-2");
        // The cursor is the PEL entry after the last one looked at.
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c2 0 1-3 COUNT 1"),
            array(vec![
                bulk("1-4"),
                array(vec![entry("1-3", &["f", "3"])]),
                array(vec![]),
            ])
        );
        // Deleted entries leave the PEL, are listed last and count towards COUNT.
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c2 0 0 COUNT 2"),
            array(vec![
                bulk("1-3"),
                array(vec![entry("1-2", &["f", "2"])]),
                bulks(&["1-1"]),
            ])
        );
        assert_eq!(
            ok(&mut ks, "XPENDING s g - + 10"),
            array(vec![
                pending("1-2", "c2", 0, 2),
                pending("1-3", "c2", 0, 2),
                pending("1-4", "c1", 0, 1),
                pending("1-5", "c1", 0, 1),
            ])
        );
        // Too recent to claim, yet the deleted entry is still cleaned up; no consumer made.
        ok(&mut ks, "XTRIM s MINID 1-3");
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c3 1000 0"),
            array(vec![bulk("0-0"), array(vec![]), bulks(&["1-2"])])
        );
        assert_eq!(
            consumers(&mut ks),
            vec![("c1".into(), 2, 0), ("c2".into(), 1, 0)]
        );
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c2 -5 (1-4 JUSTID"),
            array(vec![bulk("0-0"), bulks(&["1-5"]), array(vec![])])
        );
        assert_eq!(
            ok(&mut ks, "XPENDING s g 1-5 1-5 1"),
            array(vec![pending("1-5", "c2", 0, 1)]),
            "JUSTID does not count a delivery"
        );

        // Idle thresholds follow the clock; claiming restarts the idle time.
        now.fetch_add(100, AtomicOrdering::SeqCst);
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c2 0 1-3 COUNT 1 JUSTID"),
            array(vec![bulk("1-4"), bulks(&["1-3"]), array(vec![])])
        );
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c4 100 - JUSTID"),
            array(vec![bulk("0-0"), bulks(&["1-4", "1-5"]), array(vec![])])
        );
        now.fetch_add(100, AtomicOrdering::SeqCst);
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c5 101 - JUSTID"),
            array(vec![bulk("0-0"), array(vec![]), array(vec![])])
        );
        now.fetch_add(1, AtomicOrdering::SeqCst);
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c5 101 - JUSTID"),
            array(vec![
                bulk("0-0"),
                bulks(&["1-3", "1-4", "1-5"]),
                array(vec![])
            ])
        );
        assert_eq!(
            consumers(&mut ks),
            vec![
                ("c1".into(), 0, 201),
                ("c2".into(), 0, 101),
                ("c4".into(), 0, 101),
                ("c5".into(), 3, 0),
            ]
        );

        assert_eq!(
            err(&mut ks, "XAUTOCLAIM s g c2 x 0"),
            "ERR Invalid min-idle-time argument for XAUTOCLAIM"
        );
        assert_eq!(err(&mut ks, "XAUTOCLAIM s g c2 0 x"), INVALID_STREAM_ID);
        assert_eq!(
            err(
                &mut ks,
                "XAUTOCLAIM s g c2 0 (18446744073709551615-18446744073709551615"
            ),
            INVALID_START
        );
        for count in ["0", "-1", "x", "576460752303423488"] {
            assert_eq!(
                err(&mut ks, &format!("XAUTOCLAIM s g c2 0 0 COUNT {count}")),
                "ERR COUNT must be > 0"
            );
        }
        assert_eq!(err(&mut ks, "XAUTOCLAIM s g c2 0 0 COUNT"), SYNTAX);
        assert_eq!(err(&mut ks, "XAUTOCLAIM s g c2 0 0 FOO"), SYNTAX);
        assert_eq!(
            err(&mut ks, "XAUTOCLAIM s nog c2 0 0"),
            "NOGROUP No such key 's' or consumer group 'nog'"
        );
        // Unlike XCLAIM, the arguments are checked before the group.
        assert_eq!(
            err(&mut ks, "XAUTOCLAIM missing g c2 0 x"),
            INVALID_STREAM_ID
        );
    }

    #[test]
    fn xautoclaim_looks_at_ten_entries_per_count() {
        let (mut ks, _) = keyspace();
        delivered(&mut ks, 25);
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c2 1000 0 COUNT 2 JUSTID"),
            array(vec![bulk("1-21"), array(vec![]), array(vec![])]),
            "20 attempts, nothing idle enough: resume at the 21st"
        );
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c2 1000 1-21 COUNT 2 JUSTID"),
            array(vec![bulk("0-0"), array(vec![]), array(vec![])])
        );
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c2 0 1-24 COUNT 2 JUSTID"),
            array(vec![bulk("0-0"), bulks(&["1-24", "1-25"]), array(vec![])]),
            "stopping on COUNT at the very end gives 0-0"
        );
    }

    #[test]
    fn trimmed_and_deleted_entries_stay_pending() {
        let (mut ks, _) = keyspace();
        delivered(&mut ks, 3);
        assert_eq!(ok(&mut ks, "XTRIM s MINID = 1-3"), Resp::Int(2));
        assert_eq!(
            ok(&mut ks, "XPENDING s g"),
            array(vec![
                Resp::Int(3),
                bulk("1-1"),
                bulk("1-3"),
                array(vec![bulks(&["c1", "3"])]),
            ])
        );
        assert_eq!(
            ok(&mut ks, "XREADGROUP GROUP g c1 STREAMS s 0"),
            array(vec![array(vec![
                bulk("s"),
                array(vec![
                    array(vec![bulk("1-1"), Resp::Nil]),
                    array(vec![bulk("1-2"), Resp::Nil]),
                    entry("1-3", &["f", "3"]),
                ]),
            ])])
        );
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c2 0 0"),
            array(vec![
                bulk("0-0"),
                array(vec![entry("1-3", &["f", "3"])]),
                bulks(&["1-1", "1-2"]),
            ])
        );
        assert_eq!(
            ok(&mut ks, "XPENDING s g - + 10"),
            array(vec![pending("1-3", "c2", 0, 3)])
        );
        // Deleting the key deletes its groups.
        ok(&mut ks, "DEL s");
        assert_eq!(
            err(&mut ks, "XREADGROUP GROUP g c1 STREAMS s >"),
            "NOGROUP No such key 's' or consumer group 'g' in XREADGROUP with GROUP option"
        );
        ok(&mut ks, "XADD s 1-1 f 1");
        assert_eq!(ok(&mut ks, "XINFO GROUPS s"), array(vec![]));
    }

    #[test]
    fn entries_read_and_lag_follow_redis_7_0() {
        let (mut ks, _) = keyspace();
        let lag = |ks: &mut Keyspace, key: &str| {
            let info = group_info(ks, key);
            (
                field(&info, "entries-read").clone(),
                field(&info, "lag").clone(),
            )
        };
        let fill = |ks: &mut Keyspace, key: &str, n: u64| {
            for i in 1..=n {
                ok(ks, &format!("XADD {key} 1-{i} f {i}"));
            }
        };
        let nil = Resp::Nil;
        fill(&mut ks, "s", 1);
        ok(&mut ks, "XGROUP CREATE s g $");
        assert_eq!(lag(&mut ks, "s"), (nil.clone(), Resp::Int(0)));
        fill(&mut ks, "a", 1);
        ok(&mut ks, "XGROUP CREATE a g 0");
        assert_eq!(lag(&mut ks, "a"), (nil.clone(), Resp::Int(1)));
        fill(&mut ks, "b", 1);
        ok(&mut ks, "XGROUP CREATE b g 9-9");
        assert_eq!(lag(&mut ks, "b"), (nil.clone(), nil.clone()), "a future id");
        fill(&mut ks, "c", 1);
        ok(&mut ks, "XGROUP CREATE c g 0 ENTRIESREAD 1000");
        assert_eq!(lag(&mut ks, "c"), (Resp::Int(1000), Resp::Int(-999)));
        ok(&mut ks, "DEL s a b c");

        fill(&mut ks, "s", 5);
        ok(&mut ks, "XGROUP CREATE s g 0 ENTRIESREAD 0");
        ok(&mut ks, "XREADGROUP GROUP g c COUNT 1 STREAMS s >");
        assert_eq!(lag(&mut ks, "s"), (Resp::Int(1), Resp::Int(4)));
        ok(&mut ks, "XREADGROUP GROUP g c COUNT 1 STREAMS s >");
        assert_eq!(lag(&mut ks, "s"), (Resp::Int(2), Resp::Int(3)));
        ok(&mut ks, "XREADGROUP GROUP g c STREAMS s >");
        assert_eq!(lag(&mut ks, "s"), (Resp::Int(5), Resp::Int(0)));
        ok(&mut ks, "DEL s");

        fill(&mut ks, "s", 5);
        ok(&mut ks, "XGROUP CREATE s g 0");
        ok(&mut ks, "XTRIM s MINID 1-3");
        assert_eq!(lag(&mut ks, "s"), (nil.clone(), Resp::Int(3)));
        fill(&mut ks, "t", 5);
        ok(&mut ks, "XTRIM t MINID 1-3");
        ok(&mut ks, "XGROUP CREATE t g 1-3");
        assert_eq!(lag(&mut ks, "t"), (nil.clone(), Resp::Int(2)));
        ok(&mut ks, "XREADGROUP GROUP g c COUNT 1 STREAMS t >");
        assert_eq!(
            lag(&mut ks, "t"),
            (nil.clone(), nil.clone()),
            "in the middle of the stream, nothing is known"
        );
        ok(&mut ks, "XREADGROUP GROUP g c COUNT 1 STREAMS t >");
        assert_eq!(
            lag(&mut ks, "t"),
            (Resp::Int(5), Resp::Int(0)),
            "the last entry's counter is known"
        );
        ok(&mut ks, "XTRIM t MAXLEN 0");
        assert_eq!(lag(&mut ks, "t"), (Resp::Int(5), Resp::Int(0)));

        // Groups of a stream trimmed empty.
        for key in ["u", "v"] {
            fill(&mut ks, key, 5);
            ok(&mut ks, &format!("XTRIM {key} MAXLEN 0"));
        }
        ok(&mut ks, "XGROUP CREATE u g 0");
        assert_eq!(lag(&mut ks, "u"), (nil.clone(), Resp::Int(0)));
        ok(&mut ks, "XGROUP CREATE v g 1-9");
        assert_eq!(lag(&mut ks, "v"), (nil.clone(), nil.clone()));
        ok(&mut ks, "XADD u 2-1 f 6");
        ok(&mut ks, "XREADGROUP GROUP g c STREAMS u >");
        assert_eq!(lag(&mut ks, "u"), (Resp::Int(6), Resp::Int(0)));

        ok(&mut ks, "XGROUP CREATE e g $ MKSTREAM");
        assert_eq!(
            ok(&mut ks, "XINFO GROUPS e"),
            array(vec![array(vec![
                bulk("name"),
                bulk("g"),
                bulk("consumers"),
                Resp::Int(0),
                bulk("pending"),
                Resp::Int(0),
                bulk("last-delivered-id"),
                bulk("0-0"),
                bulk("entries-read"),
                Resp::Nil,
                bulk("lag"),
                Resp::Int(0),
            ])])
        );
    }

    #[test]
    fn xinfo_consumers_idle_follows_the_clock() {
        let (mut ks, now) = keyspace();
        ok(&mut ks, "XGROUP CREATE s g $ MKSTREAM");
        // Reading an empty history creates the consumer.
        ok(&mut ks, "XREADGROUP GROUP g c1 STREAMS s 0");
        now.fetch_add(50, AtomicOrdering::SeqCst);
        assert_eq!(consumers(&mut ks), vec![("c1".into(), 0, 50)]);
        // Reading nothing new is not seen; reading history is, even an empty one.
        ok(&mut ks, "XREADGROUP GROUP g c1 STREAMS s >");
        ok(&mut ks, "XPENDING s g - + 10 c1");
        assert_eq!(consumers(&mut ks), vec![("c1".into(), 0, 50)]);
        ok(&mut ks, "XREADGROUP GROUP g c1 STREAMS s 0");
        assert_eq!(consumers(&mut ks), vec![("c1".into(), 0, 0)]);
        ok(&mut ks, "XADD s 1-1 f 1");
        now.fetch_add(20, AtomicOrdering::SeqCst);
        ok(&mut ks, "XREADGROUP GROUP g c0 STREAMS s >");
        now.fetch_add(5, AtomicOrdering::SeqCst);
        assert_eq!(
            consumers(&mut ks),
            vec![("c0".into(), 1, 5), ("c1".into(), 0, 25)],
            "listed by name"
        );
        // Claiming nothing is not seen.
        assert_eq!(
            ok(&mut ks, "XAUTOCLAIM s g c1 1000 0"),
            array(vec![bulk("0-0"), array(vec![]), array(vec![])])
        );
        assert_eq!(consumers(&mut ks)[1], ("c1".into(), 0, 25));

        assert_eq!(err(&mut ks, "XINFO GROUPS missing"), "ERR no such key");
        assert_eq!(err(&mut ks, "XINFO CONSUMERS missing g"), "ERR no such key");
        assert_eq!(
            err(&mut ks, "XINFO CONSUMERS s nog"),
            "NOGROUP No such consumer group 'nog' for key name 's'"
        );
        assert_eq!(
            err(&mut ks, "xinfo stream2 s"),
            "ERR unknown subcommand 'stream2'. Try XINFO HELP."
        );
        assert_eq!(
            err(&mut ks, "XINFO GROUPS s x"),
            "ERR wrong number of arguments for 'xinfo|groups' command"
        );
        assert_eq!(
            err(&mut ks, "XINFO"),
            "ERR wrong number of arguments for 'xinfo' command"
        );
    }
}
