//! A stream's entries: `XADD`, `XLEN`, `XRANGE`, `XTRIM`.

use bytes::Bytes;

use super::{
    entry_reply, interval_end, interval_start, parse_id, Log, Stream, StreamId, INVALID_STREAM_ID,
};
use crate::engine::keyspace::{arity_error, count, int_arg, is, Keyspace, Resp, Result, SYNTAX};
use crate::engine::stream_id::parse_decimal;

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
                Trim::MinId(parse_id(threshold)?)
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

impl Log {
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
}

impl Keyspace {
    /// `XADD key [NOMKSTREAM] [MAXLEN|MINID [=|~] threshold [LIMIT n]] *|id field value …`
    pub(in crate::engine::keyspace) fn xadd(&mut self, a: &[Bytes]) -> Result<Resp> {
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
        Ok(Resp::from(id))
    }

    pub(in crate::engine::keyspace) fn xlen(&mut self, a: &[Bytes]) -> Result<Resp> {
        Ok(Resp::Int(count(
            self.value::<Stream>(&a[1])?
                .map_or(0, |s| s.log.entries.len()),
        )))
    }

    /// `XRANGE key start end [COUNT n]`; `-`, `+`, `ms`, `ms-seq`, `(` exclusive.
    pub(in crate::engine::keyspace) fn xrange(&mut self, a: &[Bytes]) -> Result<Resp> {
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
    pub(in crate::engine::keyspace) fn xtrim(&mut self, a: &[Bytes]) -> Result<Resp> {
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
}

/// `*`, `ms-*`, `ms-seq` or `ms` (seq 0), Redis's strict id parsing for `XADD`.
fn parse_new_id(arg: &[u8]) -> Result<NewId> {
    if let Some(ms) = arg.strip_suffix(b"-*") {
        return parse_decimal(ms)
            .map(NewId::AutoSeq)
            .ok_or_else(|| INVALID_STREAM_ID.into());
    }
    parse_id(arg).map(NewId::Explicit)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering as AtomicOrdering;

    use super::super::{INVALID_END, INVALID_START};
    use super::*;
    use crate::engine::keyspace::tests::{bulk, bulks, err, keyspace, ok, type_of};

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
}
