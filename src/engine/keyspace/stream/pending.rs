//! A group's pending entries: `XACK`, `XPENDING`, and `XAUTOCLAIM`, which hands entries a
//! consumer left pending too long to another.

use bytes::Bytes;

use super::group::Group;
use super::{entry_reply, interval_end, interval_start, no_group, parse_id, Stream, StreamId};
use crate::engine::keyspace::number::parse_i64;
use crate::engine::keyspace::{count, int_arg, is, Keyspace, Resp, Result, SYNTAX};

/// `XAUTOCLAIM`'s bound on `COUNT`: Redis's `LONG_MAX / max(sizeof(streamID), 10)`.
const MAX_AUTOCLAIM_COUNT: i64 = i64::MAX / 16;
/// `XAUTOCLAIM` examines at most `COUNT` times this many PEL entries per call.
const AUTOCLAIM_ATTEMPTS_FACTOR: u64 = 10;

/// A range query of `XPENDING`'s extended form.
struct PendingQuery<'a> {
    min_idle: i64,
    start: StreamId,
    end: StreamId,
    count: i64,
    consumer: Option<&'a Bytes>,
}

impl Keyspace {
    /// `XACK key group id …`: how many of the ids were pending. A missing key or group
    /// acknowledges nothing (no error); the ids are all checked before any is acknowledged.
    pub(in crate::engine::keyspace) fn xack(&mut self, a: &[Bytes]) -> Result<Resp> {
        let (key, group_name) = (&a[1], &a[2]);
        let has_group = self
            .value::<Stream>(key)?
            .is_some_and(|s| s.groups.contains_key(group_name));
        if !has_group {
            return Ok(Resp::Int(0));
        }
        let ids = a[3..]
            .iter()
            .map(|arg| parse_id(arg))
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
    pub(in crate::engine::keyspace) fn xpending(&mut self, a: &[Bytes]) -> Result<Resp> {
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
    pub(in crate::engine::keyspace) fn xautoclaim(&mut self, a: &[Bytes]) -> Result<Resp> {
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
                deleted.push(Resp::from(id));
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
                Resp::from(id)
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
            Resp::from(next_start.unwrap_or(StreamId::MIN)),
            Resp::Array(claimed),
            Resp::Array(deleted),
        ]))
    }
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
        Resp::from(*first),
        Resp::from(*last),
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
            Resp::from(id),
            Resp::Bulk(pending.consumer.clone()),
            Resp::Int(idle.max(0)),
            Resp::Int(i64::try_from(pending.deliveries).unwrap_or(i64::MAX)),
        ]));
    }
    Resp::Array(out)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering as AtomicOrdering;

    use super::super::tests::{array, consumers, delivered, entry, pending};
    use super::super::*;
    use super::*;
    use crate::engine::keyspace::tests::{bulk, bulks, err, keyspace, ok};
    use crate::engine::keyspace::NOT_INTEGER;

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
        assert_eq!(err(&mut ks, "XPENDING s g IDLE x - + 1"), NOT_INTEGER);
        assert_eq!(err(&mut ks, "XPENDING s g - + x"), NOT_INTEGER);
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
}
