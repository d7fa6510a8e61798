//! Stream entry ids (`ms-seq`), shared by the embedded keyspace, whose streams issue them, and
//! the ledger writer, which compares them to know what is committed. One type, so both read
//! and order ids by the same rules: Redis's.

use std::fmt;

/// A stream entry id, `ms-seq`, ordered as Redis orders them: by milliseconds, then sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const MIN: StreamId = StreamId { ms: 0, seq: 0 };
    pub const MAX: StreamId = StreamId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    /// The smallest id above this one; `None` for [`StreamId::MAX`].
    pub fn next(self) -> Option<StreamId> {
        if self.seq < u64::MAX {
            Some(StreamId {
                ms: self.ms,
                seq: self.seq + 1,
            })
        } else if self.ms < u64::MAX {
            Some(StreamId {
                ms: self.ms + 1,
                seq: 0,
            })
        } else {
            None
        }
    }

    /// The largest id below this one; `None` for [`StreamId::MIN`].
    pub fn prev(self) -> Option<StreamId> {
        if self.seq > 0 {
            Some(StreamId {
                ms: self.ms,
                seq: self.seq - 1,
            })
        } else if self.ms > 0 {
            Some(StreamId {
                ms: self.ms - 1,
                seq: u64::MAX,
            })
        } else {
            None
        }
    }

    /// `ms-seq`, or `ms` alone (sequence 0).
    pub fn parse(text: &str) -> Option<StreamId> {
        StreamId::parse_bytes(text.as_bytes(), 0)
    }

    /// `ms-seq`, or `ms` alone with sequence `missing_seq`, as Redis's `streamParseID` reads
    /// them: decimal digits only, leading zeros allowed.
    pub fn parse_bytes(text: &[u8], missing_seq: u64) -> Option<StreamId> {
        let (ms, seq) = match text.iter().position(|&b| b == b'-') {
            Some(dash) => (
                parse_decimal(&text[..dash])?,
                parse_decimal(&text[dash + 1..])?,
            ),
            None => (parse_decimal(text)?, missing_seq),
        };
        Some(StreamId { ms, seq })
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One part of an id: unsigned decimal, leading zeros allowed, as `strtoull` reads it.
pub(crate) fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        if c.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(c - b'0'))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> StreamId {
        StreamId::parse(text).expect("an id")
    }

    #[test]
    fn ids_parse_and_print_as_redis_writes_them() {
        assert_eq!(
            id("1767225600000-3"),
            StreamId {
                ms: 1_767_225_600_000,
                seq: 3
            }
        );
        assert_eq!(id("007-01"), id("7-1"));
        assert_eq!(
            StreamId::parse_bytes(b"7", u64::MAX),
            Some(StreamId {
                ms: 7,
                seq: u64::MAX
            })
        );
        assert_eq!(
            id("18446744073709551615-18446744073709551615"),
            StreamId::MAX
        );
        assert_eq!(id("12-5").to_string(), "12-5");
        assert_eq!(
            StreamId::MAX.to_string(),
            "18446744073709551615-18446744073709551615"
        );
        for bad in [
            "",
            "x-1",
            "1-",
            "-1",
            "1-2-3",
            "+1",
            "1-+2",
            " 1",
            "18446744073709551616",
            "000000000000000000001",
        ] {
            assert!(StreamId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn entry_ids_compare_numerically() {
        assert!(id("9-5") < id("10-0"));
        assert!(id("10-2") < id("10-10"));
        assert_eq!(id("7"), id("7-0"));
        assert_eq!(id("10-0").prev(), Some(id("9-18446744073709551615")));
        assert_eq!(id("10-3").prev(), Some(id("10-2")));
        assert_eq!(id("0-0").prev(), None);
        for bad in ["", "x-1", "1-", "-1", "1-2-3"] {
            assert!(StreamId::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(id("9-18446744073709551615").next(), Some(id("10-0")));
        assert_eq!(id("10-2").next(), Some(id("10-3")));
        assert_eq!(StreamId::MAX.next(), None);
    }
}
