//! Lists: `LPUSH`, `RPUSH`, `LPOP`, `LREM`.

use bytes::Bytes;

use super::number::parse_i64;
use super::{arity_error, bulk_or_nil, count, int_arg, Keyspace, List, Resp, Result, NOT_POSITIVE};

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

    /// `LREM key count element`: count > 0 from the head, < 0 from the tail, 0 all.
    pub(super) fn lrem(&mut self, a: &[Bytes]) -> Result<Resp> {
        let limit = int_arg(&a[2])?;
        let Some(list) = self.value_mut::<List>(&a[1])? else {
            return Ok(Resp::Int(0));
        };
        let element = &a[3];
        let matches = list.iter().filter(|v| *v == element).count();
        let remove = match usize::try_from(limit.unsigned_abs()) {
            Ok(0) => matches,
            Ok(n) => n.min(matches),
            Err(_) => matches,
        };
        // From the tail: keep the first `matches - remove` matches, drop the rest.
        let mut keep = if limit < 0 { matches - remove } else { 0 };
        let mut left = remove;
        list.retain(|v| {
            if v != element || left == 0 {
                return true;
            }
            if keep > 0 {
                keep -= 1;
                return true;
            }
            left -= 1;
            false
        });
        self.drop_if_empty(&a[1]);
        Ok(Resp::Int(count(remove)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{bulk, bulks, err, keyspace, ok, type_of};
    use super::super::NOT_INTEGER;
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

        ok(&mut ks, "RPUSH r x a x b x c x");
        assert_eq!(ok(&mut ks, "LREM r 2 x"), Resp::Int(2));
        assert_eq!(list_items(&mut ks, "r"), bulks(&["a", "b", "x", "c", "x"]));
        ok(&mut ks, "RPUSH r x");
        assert_eq!(ok(&mut ks, "LREM r -2 x"), Resp::Int(2));
        assert_eq!(list_items(&mut ks, "r"), bulks(&["a", "b", "x", "c"]));
        assert_eq!(ok(&mut ks, "LREM r 0 nope"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "LREM r -10 x"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "LREM missing 0 x"), Resp::Int(0));
        ok(&mut ks, "DEL r");
        ok(&mut ks, "RPUSH r x x");
        assert_eq!(ok(&mut ks, "LREM r 0 x"), Resp::Int(2));
        assert_eq!(type_of(&mut ks, "r"), "none");
        assert_eq!(err(&mut ks, "LREM r one x"), NOT_INTEGER);
    }
}
