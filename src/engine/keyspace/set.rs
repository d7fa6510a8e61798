//! Sets: `SADD`, `SMEMBERS`.

use bytes::Bytes;

use super::{count, Keyspace, Resp, Result, Set};

impl Keyspace {
    pub(super) fn sadd(&mut self, a: &[Bytes]) -> Result<Resp> {
        let set = self.value_or_create::<Set>(&a[1])?;
        let added = a[2..].iter().filter(|m| set.insert((*m).clone())).count();
        Ok(Resp::Int(count(added)))
    }

    pub(super) fn smembers(&mut self, a: &[Bytes]) -> Result<Resp> {
        let items = self.value::<Set>(&a[1])?.map_or_else(Vec::new, |s| {
            s.iter().map(|m| Resp::Bulk(m.clone())).collect()
        });
        Ok(Resp::Array(items))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{bulks, keyspace, ok, sorted, type_of};
    use super::*;

    #[test]
    fn sets() {
        let (mut ks, _) = keyspace();
        assert_eq!(ok(&mut ks, "SADD s a b a"), Resp::Int(2));
        assert_eq!(ok(&mut ks, "SADD s b c"), Resp::Int(1));
        assert_eq!(sorted(ok(&mut ks, "SMEMBERS s")), bulks(&["a", "b", "c"]));
        assert_eq!(ok(&mut ks, "SMEMBERS missing"), bulks(&[]));
        assert_eq!(type_of(&mut ks, "s"), "set");
    }
}
