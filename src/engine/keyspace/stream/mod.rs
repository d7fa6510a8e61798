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
//! - Delivery times and consumers' "seen" times come from the keyspace's [`crate::clock::Clock`], so
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
//!
//! This file holds a stream's data and what its commands share; the commands live in
//! `entries.rs` (`XADD`, `XLEN`, `XRANGE`, `XTRIM`), `group.rs` (groups, consumers and
//! `XGROUP`), `read.rs` (`XREADGROUP`), `pending.rs` (`XACK`, `XPENDING`, `XAUTOCLAIM`) and
//! `info.rs` (`XINFO`).

mod entries;
mod group;
mod info;
mod pending;
mod read;

use std::collections::BTreeMap;

use bytes::Bytes;

use super::{count, text, text_128, Keyspace, Resp, Result};
use crate::engine::stream_id::StreamId;
use group::Group;

const INVALID_STREAM_ID: &str = "ERR Invalid stream ID specified as stream command argument";
const INVALID_START: &str = "ERR invalid start ID for the interval";
const INVALID_END: &str = "ERR invalid end ID for the interval";

impl From<StreamId> for Resp {
    /// An id in a reply: a bulk string, `ms-seq`.
    fn from(id: StreamId) -> Resp {
        Resp::Bulk(Bytes::from(id.to_string()))
    }
}

/// An id argument, `ms-seq` or `ms`; Redis's error for anything else.
fn parse_id(arg: &[u8]) -> Result<StreamId> {
    StreamId::parse_bytes(arg, 0).ok_or_else(|| INVALID_STREAM_ID.into())
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

impl Keyspace {
    /// The clock as Redis's signed `mstime_t`, for delivery and idle times.
    fn now_signed(&self) -> i64 {
        i64::try_from(self.now()).unwrap_or(i64::MAX)
    }
}

/// `[id, [field, value, …]]`.
fn entry_reply(id: StreamId, fields: &[Bytes]) -> Resp {
    Resp::Array(vec![
        Resp::from(id),
        Resp::Array(fields.iter().cloned().map(Resp::Bulk).collect()),
    ])
}

/// A range bound: the id and whether it is exclusive (`(` prefix); `-`/`+` unless exclusive.
fn parse_interval_id(arg: &[u8], missing_seq: u64) -> Result<(StreamId, bool)> {
    let (id, exclusive) = match arg {
        b"-" => (Some(StreamId::MIN), false),
        b"+" => (Some(StreamId::MAX), false),
        [b'(', rest @ ..] if !rest.is_empty() => (StreamId::parse_bytes(rest, missing_seq), true),
        _ => (StreamId::parse_bytes(arg, missing_seq), false),
    };
    id.map(|id| (id, exclusive))
        .ok_or_else(|| INVALID_STREAM_ID.into())
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
pub(super) mod tests {
    use super::*;
    use crate::engine::keyspace::tests::{bulk, bulks, ok};

    pub(super) fn entry(id: &str, fields: &[&str]) -> Resp {
        Resp::Array(vec![bulk(id), bulks(fields)])
    }

    pub(super) fn array(items: Vec<Resp>) -> Resp {
        Resp::Array(items)
    }

    /// `XPENDING`'s extended reply for one entry.
    pub(super) fn pending(id: &str, consumer: &str, idle: i64, deliveries: i64) -> Resp {
        array(vec![
            bulk(id),
            bulk(consumer),
            Resp::Int(idle),
            Resp::Int(deliveries),
        ])
    }

    /// The value of `name` in a flat RESP2 map.
    pub(super) fn field<'a>(map: &'a Resp, name: &str) -> &'a Resp {
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
    pub(super) fn group_info(ks: &mut Keyspace, key: &str) -> Resp {
        match ok(ks, &format!("XINFO GROUPS {key}")) {
            Resp::Array(mut groups) if groups.len() == 1 => groups.remove(0),
            other => panic!("expected one group, got {other:?}"),
        }
    }

    /// `s` with entries `1-1`…`1-n` (`f` = i) and group `g` at 0, everything read by `c1`.
    pub(super) fn delivered(ks: &mut Keyspace, n: u64) {
        for i in 1..=n {
            ok(ks, &format!("XADD s 1-{i} f {i}"));
        }
        ok(ks, "XGROUP CREATE s g 0");
        ok(ks, "XREADGROUP GROUP g c1 STREAMS s >");
    }

    pub(super) fn consumers(ks: &mut Keyspace) -> Vec<(String, i64, i64)> {
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
}
