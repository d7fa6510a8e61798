//! Hashes: `HGET`, `HGETALL`, `HSET`, `HSETNX`, `HMGET`, `HINCRBY`, `HDEL`, `HEXISTS`.

use bytes::Bytes;

use super::number::parse_i64;
use super::{
    arity_error, bulk_or_nil, count, int_arg, int_bytes, Hash, Keyspace, Resp, Result,
    HASH_NOT_INTEGER, OVERFLOW,
};

impl Keyspace {
    pub(super) fn hget(&mut self, a: &[Bytes]) -> Result<Resp> {
        Ok(bulk_or_nil(
            self.value::<Hash>(&a[1])?.and_then(|h| h.get(&a[2])),
        ))
    }

    /// `HGETALL key`: field, value, field, value, … (in no particular order, as in Redis).
    pub(super) fn hgetall(&mut self, a: &[Bytes]) -> Result<Resp> {
        let hash = self.value::<Hash>(&a[1])?;
        Ok(Resp::Array(
            hash.into_iter()
                .flat_map(|h| h.iter())
                .flat_map(|(f, v)| [Resp::Bulk(f.clone()), Resp::Bulk(v.clone())])
                .collect(),
        ))
    }

    /// `HSET key field value [field value …]`: the number of new fields.
    pub(super) fn hset(&mut self, a: &[Bytes]) -> Result<Resp> {
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

    pub(super) fn hsetnx(&mut self, a: &[Bytes]) -> Result<Resp> {
        let hash = self.value_or_create::<Hash>(&a[1])?;
        if hash.contains_key(&a[2]) {
            return Ok(Resp::Int(0));
        }
        hash.insert(a[2].clone(), a[3].clone());
        Ok(Resp::Int(1))
    }

    pub(super) fn hmget(&mut self, a: &[Bytes]) -> Result<Resp> {
        let hash = self.value::<Hash>(&a[1])?;
        Ok(Resp::Array(
            a[2..]
                .iter()
                .map(|field| bulk_or_nil(hash.and_then(|h| h.get(field))))
                .collect(),
        ))
    }

    pub(super) fn hincrby(&mut self, a: &[Bytes]) -> Result<Resp> {
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

    pub(super) fn hdel(&mut self, a: &[Bytes]) -> Result<Resp> {
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

    pub(super) fn hexists(&mut self, a: &[Bytes]) -> Result<Resp> {
        let found = self
            .value::<Hash>(&a[1])?
            .is_some_and(|h| h.contains_key(&a[2]));
        Ok(Resp::Int(i64::from(found)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::tests::{bulk, bulks, err, keyspace, ok, sorted, type_of};
    use super::super::NOT_INTEGER;
    use super::*;

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
        assert_eq!(
            sorted(ok(&mut ks, "HGETALL h")),
            sorted(Resp::Array(vec![
                bulk("a"),
                bulk("4"),
                bulk("b"),
                bulk("2"),
                bulk("c"),
                bulk("5"),
                bulk("d"),
                bulk("9"),
            ]))
        );
        assert_eq!(ok(&mut ks, "HGETALL missing"), Resp::Array(vec![]));
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
}
