//! `XINFO GROUPS` and `XINFO CONSUMERS`: what the gateway's stream metrics read.

use bytes::Bytes;

use super::{no_such_group_for_key, Stream};
use crate::engine::keyspace::{count, Keyspace, Resp, Result};

const NO_SUCH_KEY: &str = "ERR no such key";

impl Keyspace {
    /// `XINFO GROUPS key`: name, consumers, pending, last-delivered-id, entries-read and lag
    /// of each group, as flat RESP2 maps.
    pub(in crate::engine::keyspace) fn xinfo_groups(&mut self, a: &[Bytes]) -> Result<Resp> {
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
                    Resp::from(group.last_id),
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
    pub(in crate::engine::keyspace) fn xinfo_consumers(&mut self, a: &[Bytes]) -> Result<Resp> {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering as AtomicOrdering;

    use super::super::tests::{array, consumers, field, group_info};
    use super::*;
    use crate::engine::keyspace::tests::{bulk, err, keyspace, ok};

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
