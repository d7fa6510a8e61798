//! Sorted sets: `ZADD`, `ZREM`, `ZCARD`, `ZRANGE`, `ZRANGEBYSCORE`, `ZREMRANGEBYSCORE`.
//!
//! Members are ordered by score, ties broken by member bytes, exactly as Redis orders them;
//! scores print as Redis 7.0 prints them ([`format_score`]).

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;

use super::number::{format_score, parse_f64};
use super::{count, int_arg, is, Keyspace, Resp, Result, MIN_MAX_NOT_FLOAT, NOT_FLOAT, SYNTAX};

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
pub(super) struct ZSet {
    pub(super) scores: HashMap<Bytes, f64>,
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

impl Keyspace {
    /// `ZADD key [NX|XX] [GT|LT] [CH] [INCR] score member [score member …]`
    pub(super) fn zadd(&mut self, a: &[Bytes]) -> Result<Resp> {
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

    pub(super) fn zrem(&mut self, a: &[Bytes]) -> Result<Resp> {
        let Some(zset) = self.value_mut::<ZSet>(&a[1])? else {
            return Ok(Resp::Int(0));
        };
        let removed = a[2..].iter().filter(|m| zset.remove(m)).count();
        self.drop_if_empty(&a[1]);
        Ok(Resp::Int(count(removed)))
    }

    pub(super) fn zcard(&mut self, a: &[Bytes]) -> Result<Resp> {
        Ok(Resp::Int(count(
            self.value::<ZSet>(&a[1])?.map_or(0, |z| z.scores.len()),
        )))
    }

    /// `ZRANGEBYSCORE key min max [WITHSCORES] [LIMIT offset count]`
    pub(super) fn zrangebyscore(&mut self, a: &[Bytes]) -> Result<Resp> {
        self.zrange_generic(a, RangeKind::Score, false)
    }

    /// `ZRANGE key start stop [BYSCORE] [REV] [LIMIT offset count] [WITHSCORES]`
    pub(super) fn zrange(&mut self, a: &[Bytes]) -> Result<Resp> {
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

    pub(super) fn zremrangebyscore(&mut self, a: &[Bytes]) -> Result<Resp> {
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

#[cfg(test)]
mod tests {
    use super::super::tests::{bulk, bulks, err, keyspace, ok};
    use super::super::NOT_INTEGER;
    use super::*;

    /// What Redis's `ZSCORE` would answer.
    fn zscore(ks: &mut Keyspace, key: &str, member: &str) -> Resp {
        let zset = ks.value::<ZSet>(key.as_bytes()).expect("a sorted set");
        let score = zset.and_then(|z| z.scores.get(member.as_bytes()).copied());
        score.map_or(Resp::Nil, |s| Resp::Bulk(format_score(s)))
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
}
