//! Lists: `LPUSH`, `RPUSH`, `LPOP`.

use bytes::Bytes;

use super::number::parse_i64;
use super::{arity_error, bulk_or_nil, count, Keyspace, List, Resp, Result, NOT_POSITIVE};

impl Keyspace {
    pub(super) fn lpush(&mut self, a: &[Bytes]) -> Result<Resp> {
        let list = self.value_or_create::<List>(&a[1])?;
        for v in &a[2..] {
            list.push_front(v.clone());
        }
        Ok(Resp::Int(count(list.len())))
    }

    pub(super) fn rpush(&mut self, a: &[Bytes]) -> Result<Resp> {
        let list = self.value_or_create::<List>(&a[1])?;
        list.extend(a[2..].iter().cloned());
        Ok(Resp::Int(count(list.len())))
    }

    /// `LPOP key [count]`, Redis 7: without a count a bulk or nil; with one an array, or a nil
    /// array when the key does not exist.
    pub(super) fn lpop(&mut self, a: &[Bytes]) -> Result<Resp> {
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
}

#[cfg(test)]
mod tests {
    use super::super::tests::{bulk, bulks, err, keyspace, ok};
    use super::*;

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
    }
}
