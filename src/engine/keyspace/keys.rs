//! Commands on keys of any type, `DEL`, `EXISTS`, `PEXPIRE`, and on none: `TIME`.

use bytes::Bytes;

use super::{int_arg, is, Keyspace, Resp, Result};

impl Keyspace {
    pub(super) fn del(&mut self, a: &[Bytes]) -> Result<Resp> {
        let mut n = 0;
        for key in &a[1..] {
            self.expire_if_needed(key);
            if self.entries.remove(key.as_ref()).is_some() {
                n += 1;
            }
        }
        Ok(Resp::Int(n))
    }

    pub(super) fn exists(&mut self, a: &[Bytes]) -> Result<Resp> {
        let mut n = 0;
        for key in &a[1..] {
            if self.read(key).is_some() {
                n += 1;
            }
        }
        Ok(Resp::Int(n))
    }

    /// `TIME`: the keyspace's clock as seconds and microseconds, as Redis answers it (the
    /// clock counts milliseconds, so the microseconds are whole thousands).
    pub(super) fn time(&mut self, _: &[Bytes]) -> Result<Resp> {
        let now = self.now();
        let part = |n: u64| Resp::Bulk(Bytes::from(n.to_string()));
        Ok(Resp::Array(vec![part(now / 1000), part(now % 1000 * 1000)]))
    }

    /// `PEXPIRE key ms [NX|XX|GT|LT]`
    pub(super) fn pexpire(&mut self, a: &[Bytes]) -> Result<Resp> {
        let ms = int_arg(&a[2])?;
        let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
        for opt in &a[3..] {
            if is(opt, "NX") {
                nx = true;
            } else if is(opt, "XX") {
                xx = true;
            } else if is(opt, "GT") {
                gt = true;
            } else if is(opt, "LT") {
                lt = true;
            } else {
                return Err(format!(
                    "ERR Unsupported option {}",
                    String::from_utf8_lossy(opt)
                ));
            }
        }
        if nx && (xx || gt || lt) {
            return Err(
                "ERR NX and XX, GT or LT options at the same time are not compatible".into(),
            );
        }
        if gt && lt {
            return Err("ERR GT and LT options at the same time are not compatible".into());
        }
        let now = self.now();
        let when = i64::try_from(now)
            .ok()
            .and_then(|now| now.checked_add(ms))
            .ok_or("ERR invalid expire time in 'pexpire' command")?;
        let key = &a[1];
        let Some(entry) = self.write(key) else {
            return Ok(Resp::Int(0));
        };
        let current = entry
            .expires_at
            .map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        let skip = match current {
            Some(current) => nx || (gt && when <= current) || (lt && when >= current),
            // No expiry counts as infinite: GT never beats it, LT always does.
            None => xx || gt,
        };
        if skip {
            return Ok(Resp::Int(0));
        }
        match u64::try_from(when) {
            Ok(when) if when > now => entry.expires_at = Some(when),
            // Already in the past: Redis deletes the key right away.
            _ => {
                self.entries.remove(key.as_ref());
            }
        }
        Ok(Resp::Int(1))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering as AtomicOrdering;

    use super::super::tests::{bulk, err, keyspace, ok, type_of};
    use super::*;

    /// What Redis's `PTTL` would answer: -2 without the key, -1 without an expiry.
    fn pttl(ks: &mut Keyspace, key: &str) -> i64 {
        let now = ks.now();
        match ks.read(key.as_bytes()).map(|e| e.expires_at) {
            None => -2,
            Some(None) => -1,
            Some(Some(at)) => i64::try_from(at.saturating_sub(now)).unwrap_or(i64::MAX),
        }
    }

    #[test]
    fn del_and_exists_count_keys() {
        let (mut ks, _) = keyspace();
        ok(&mut ks, "HSET a f 1");
        ok(&mut ks, "HSET fresh f 5");
        ok(&mut ks, "RPUSH s hello");
        assert_eq!(ok(&mut ks, "EXISTS b"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "DEL a b fresh a"), Resp::Int(2));
        assert_eq!(ok(&mut ks, "EXISTS s s missing"), Resp::Int(2));
        assert_eq!(type_of(&mut ks, "s"), "list");
        assert_eq!(type_of(&mut ks, "missing"), "none");
    }

    #[test]
    fn expiry_follows_the_injected_clock() {
        let (mut ks, now) = keyspace();
        ok(&mut ks, "HSET k f v");
        ok(&mut ks, "PEXPIRE k 100");
        assert_eq!(pttl(&mut ks, "k"), 100);
        now.fetch_add(100, AtomicOrdering::SeqCst);
        // Redis: a key expires once the time is past its deadline, not at it.
        assert_eq!(pttl(&mut ks, "k"), 0);
        assert_eq!(ok(&mut ks, "HGET k f"), bulk("v"));
        now.fetch_add(1, AtomicOrdering::SeqCst);
        assert_eq!(ok(&mut ks, "HGET k f"), Resp::Nil);
        assert_eq!(pttl(&mut ks, "k"), -2);

        ok(&mut ks, "HSET h f v");
        assert_eq!(pttl(&mut ks, "h"), -1);
        assert_eq!(ok(&mut ks, "PEXPIRE h 50"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "PEXPIRE h 80 NX"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "PEXPIRE h 40 GT"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "PEXPIRE h 60 GT"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "PEXPIRE h 70 LT"), Resp::Int(0));
        assert_eq!(pttl(&mut ks, "h"), 60);
        // Writing to a key keeps its TTL.
        ok(&mut ks, "HSET h g w");
        ok(&mut ks, "HINCRBY h n 1");
        assert_eq!(pttl(&mut ks, "h"), 60);

        now.fetch_add(61, AtomicOrdering::SeqCst);
        assert_eq!(ok(&mut ks, "HGET h f"), Resp::Nil);
        assert_eq!(ok(&mut ks, "EXISTS h"), Resp::Int(0));
        // An expired key of another type no longer causes WRONGTYPE.
        ok(&mut ks, "HSET t f v");
        ok(&mut ks, "PEXPIRE t 5");
        now.fetch_add(6, AtomicOrdering::SeqCst);
        assert_eq!(ok(&mut ks, "LPUSH t a"), Resp::Int(1));

        assert_eq!(ok(&mut ks, "PEXPIRE missing 10"), Resp::Int(0));
        assert_eq!(ok(&mut ks, "PEXPIRE t 0"), Resp::Int(1));
        assert_eq!(ok(&mut ks, "EXISTS t"), Resp::Int(0));
        ok(&mut ks, "HSET c f 1");
        assert_eq!(
            err(&mut ks, "PEXPIRE c 10 NX XX"),
            "ERR NX and XX, GT or LT options at the same time are not compatible"
        );
        assert_eq!(
            err(&mut ks, "PEXPIRE c 10 GT LT"),
            "ERR GT and LT options at the same time are not compatible"
        );
        assert_eq!(
            err(&mut ks, "PEXPIRE c 10 FOO"),
            "ERR Unsupported option FOO"
        );
        assert_eq!(
            err(&mut ks, "PEXPIRE c 9223372036854775807"),
            "ERR invalid expire time in 'pexpire' command"
        );
        assert_eq!(pttl(&mut ks, "c"), -1, "failed PEXPIREs changed nothing");
        assert_eq!(ok(&mut ks, "DEL c"), Resp::Int(1));
    }
}
