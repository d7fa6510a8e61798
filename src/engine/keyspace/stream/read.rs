//! `XREADGROUP`: delivers a stream's new entries to a group's consumers, recording them as
//! pending until acknowledged, and re-reads a consumer's own pending entries.

use bytes::Bytes;

use super::group::Group;
use super::{entry_reply, parse_id, text, Log, Stream, StreamId};
use crate::engine::keyspace::{int_arg, is, Keyspace, Resp, Result, SYNTAX};

/// Redis 7.0 prints this text for `XREADGROUP` too.
const UNBALANCED: &str =
    "ERR Unbalanced XREAD list of streams: for each stream key an ID or '$' must be specified.";
const DOLLAR_IN_XREADGROUP: &str = "ERR The $ ID is meaningless in the context of XREADGROUP: \
     you want to read the history of this consumer by specifying a proper ID, or use the > ID \
     to get new messages. The $ ID would just return an empty result set.";

impl Keyspace {
    /// `XREADGROUP GROUP group consumer [COUNT n] [NOACK] STREAMS key … id …`
    ///
    /// With `>`: entries after the group's last delivered id, which advance it and (without
    /// `NOACK`) become pending for the consumer; a stream with nothing new is left out of the
    /// reply, and nothing new anywhere is nil. With an id: the consumer's own pending entries
    /// after it, each delivered once more (a deleted one comes back as `[id, nil]`).
    pub(in crate::engine::keyspace) fn xreadgroup(&mut self, a: &[Bytes]) -> Result<Resp> {
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
                _ => Some(parse_id(id)?).filter(|id| *id != StreamId::MAX),
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
            None => out.push(Resp::Array(vec![Resp::from(id), Resp::Nil])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering as AtomicOrdering;

    use super::super::tests::{array, entry, pending};
    use super::super::INVALID_STREAM_ID;
    use super::*;
    use crate::engine::keyspace::tests::{bulk, bulks, err, keyspace, ok};
    use crate::engine::keyspace::{NOT_INTEGER, WRONGTYPE};

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
            NOT_INTEGER
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
}
