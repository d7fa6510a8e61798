//! Consumer groups, their consumers and pending entries, and `XGROUP CREATE|DELCONSUMER`.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::{no_such_group_for_key, parse_id, subcommand_syntax_error, Log, Stream, StreamId};
use crate::engine::keyspace::{count, int_arg, is, Keyspace, Resp, Result};

const XGROUP_NEEDS_KEY: &str = "ERR The XGROUP subcommand requires the key to exist. Note that \
     for CREATE you may want to use the MKSTREAM option to create an empty stream automatically.";
const BUSYGROUP: &str = "BUSYGROUP Consumer Group name already exists";

/// A consumer group.
pub(super) struct Group {
    /// The last id delivered with `>`.
    pub(super) last_id: StreamId,
    /// How many entries the group has read (Redis's logical read counter), `None` when it is
    /// unknown (Redis's -1).
    pub(super) entries_read: Option<i64>,
    /// Delivered and not yet acknowledged entries, with their owner.
    pub(super) pel: BTreeMap<StreamId, Pending>,
    /// By name, in byte order as Redis lists them.
    pub(super) consumers: BTreeMap<Bytes, Consumer>,
}

/// One pending entry (Redis's NACK).
pub(super) struct Pending {
    pub(super) consumer: Bytes,
    /// When it was last delivered, in clock milliseconds; its idle time counts from here.
    pub(super) delivered_at: i64,
    pub(super) deliveries: u64,
}

/// One consumer of a group.
pub(super) struct Consumer {
    /// When it last read or claimed something, for `XINFO CONSUMERS`' idle time.
    pub(super) seen_at: i64,
    /// The ids of the group's PEL it owns.
    pub(super) pending: BTreeSet<StreamId>,
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
    pub(super) fn touch_consumer(&mut self, name: &Bytes, now: i64) {
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
    pub(super) fn transfer(&mut self, id: StreamId, to: &Bytes) {
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
    pub(super) fn deliver(&mut self, id: StreamId, to: &Bytes, now: i64) {
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
    pub(super) fn ack(&mut self, id: StreamId) -> bool {
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
    pub(super) fn advance(&mut self, log: &Log, id: StreamId) {
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

impl Keyspace {
    /// `XGROUP CREATE key group id|$ [MKSTREAM] [ENTRIESREAD n]`.
    ///
    /// The checks run in Redis's order: options, key type, key existence, id, group.
    pub(in crate::engine::keyspace) fn xgroup_create(&mut self, a: &[Bytes]) -> Result<Resp> {
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
            parse_id(&a[4])?
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
    pub(in crate::engine::keyspace) fn xgroup_delconsumer(&mut self, a: &[Bytes]) -> Result<Resp> {
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
    pub(super) fn existing_group(&mut self, key: &Bytes, name: &Bytes) -> Result<&mut Group> {
        self.existing_stream(key)?
            .groups
            .get_mut(name)
            .ok_or_else(|| no_such_group_for_key(name, key))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{array, field, group_info};
    use super::super::*;
    use super::*;
    use crate::engine::keyspace::tests::{bulk, err, keyspace, ok, type_of};
    use crate::engine::keyspace::{NOT_INTEGER, WRONGTYPE};

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
            NOT_INTEGER
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
}
