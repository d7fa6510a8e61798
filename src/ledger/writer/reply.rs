//! What `lua/stream.lua` answers: a `read` reply's head and entries, and a stream entry's
//! fields turned into a [`LedgerEvent`] or the reason it is poison.

use crate::engine::stream_id::StreamId;
use crate::engine::Reply;
use crate::ledger::stream::event_from_entry;
use crate::ledger::{LedgerError, LedgerEvent};

use super::WriterError;

/// Values before the entries in a `read` reply of `lua/stream.lua` (pending … owned).
pub(super) const READ_HEAD: usize = 9;

/// A parsed `read` reply of `lua/stream.lua`.
pub(super) struct ReadReply<'a> {
    pub(super) pending: u64,
    pub(super) lag: u64,
    /// The oldest unsettled entry before the read, if any.
    pub(super) floor: Option<StreamId>,
    pub(super) last_delivered: StreamId,
    pub(super) own: usize,
    pub(super) claimed: usize,
    /// The SKU's generation in the engine (`""` without one).
    pub(super) gen: &'a str,
    /// For a read without this writer's own entries: how many it had delivered and not
    /// acknowledged before the read.
    pub(super) owned: u64,
    pub(super) entries: &'a [Reply],
}

impl<'a> ReadReply<'a> {
    pub(super) fn parse(reply: &'a Reply) -> Result<ReadReply<'a>, WriterError> {
        let bad = || WriterError::Reply(format!("read: {}", shape(reply)));
        let items = reply.as_array().ok_or_else(bad)?;
        let (head, entries) = items.split_at_checked(READ_HEAD).ok_or_else(bad)?;
        let n = |i: usize| {
            head[i]
                .as_i64()
                .and_then(|v| u64::try_from(v).ok())
                .ok_or_else(bad)
        };
        let floor = match head[2].as_str().ok_or_else(bad)? {
            "" => None,
            id => Some(StreamId::parse(id).ok_or_else(bad)?),
        };
        let last_delivered = head[3].as_str().and_then(StreamId::parse).ok_or_else(bad)?;
        let (own, claimed, new) = (n(4)? as usize, n(5)? as usize, n(6)? as usize);
        if own + claimed + new != entries.len() {
            return Err(bad());
        }
        Ok(ReadReply {
            pending: n(0)?,
            lag: n(1)?,
            floor,
            last_delivered,
            own,
            claimed,
            gen: head[7].as_str().ok_or_else(bad)?,
            owned: n(8)?,
            entries,
        })
    }

    /// How many of the entries at positions `at` came from each source.
    pub(super) fn sources(&self, at: impl Iterator<Item = usize>) -> [(&'static str, u64); 3] {
        let mut counts = [("own", 0), ("claimed", 0), ("new", 0)];
        for i in at {
            let slot = if i < self.own {
                0
            } else if i < self.own + self.claimed {
                1
            } else {
                2
            };
            counts[slot].1 += 1;
        }
        counts
    }
}

/// Splits a stream entry (`{id, {field, value, …}}`) into its id and its event, or the reason
/// it is poison. Only a reply without an id is an error: that is not an entry at all.
#[allow(clippy::type_complexity)]
pub(super) fn decode(
    sku: &str,
    entry: &Reply,
) -> Result<(String, StreamId, Result<LedgerEvent, String>), WriterError> {
    let bad = || WriterError::Reply(format!("entry: {}", shape(entry)));
    let parts = entry.as_array().ok_or_else(bad)?;
    let id_text = parts.first().and_then(Reply::as_str).ok_or_else(bad)?;
    let id = StreamId::parse(id_text).ok_or_else(bad)?;
    let event = fields(parts.get(1)).and_then(|fields| {
        event_from_entry(sku, id_text, &fields).map_err(|e| match e {
            LedgerError::Corrupt(reason) => reason,
            other => other.to_string(),
        })
    });
    Ok((id_text.to_owned(), id, event))
}

/// An entry's field/value pairs, or why they cannot be an event.
fn fields(reply: Option<&Reply>) -> Result<Vec<(String, String)>, String> {
    let items = reply
        .and_then(Reply::as_array)
        .ok_or("fields are not an array")?;
    if items.len() % 2 != 0 {
        return Err("odd number of fields".into());
    }
    items
        .chunks(2)
        .map(|pair| {
            let text = |r: &Reply| {
                r.as_str()
                    // The ledger stores text; PostgreSQL refuses NUL in it.
                    .filter(|s| !s.contains('\0'))
                    .map(str::to_owned)
                    .ok_or_else(|| "a field is not UTF-8 text".to_owned())
            };
            Ok((text(&pair[0])?, text(&pair[1])?))
        })
        .collect()
}

/// A reply's outline, for errors: replies may carry anything, so never their content.
pub(super) fn shape(reply: &Reply) -> String {
    match reply {
        Reply::Array(items) => format!("array of {}", items.len()),
        Reply::Nil => "nil".into(),
        Reply::Int(_) => "integer".into(),
        Reply::Bulk(_) => "string".into(),
        Reply::Status(_) => "status".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_fields_are_reasons_not_errors() {
        let entry = |fields: Vec<Reply>| Reply::Array(vec!["5-0".into(), Reply::Array(fields)]);
        let (_, _, event) = decode("s", &entry(vec!["bogus".into(), "1".into()])).expect("entry");
        assert!(event.is_err());
        let (_, _, event) = decode("s", &entry(vec!["t".into()])).expect("entry");
        assert_eq!(event.err().as_deref(), Some("odd number of fields"));
        let nul = Reply::Bulk(bytes::Bytes::from_static(b"a\0b"));
        let (_, _, event) = decode(
            "s",
            &entry(vec!["t".into(), "claim".into(), "order".into(), nul]),
        )
        .expect("entry");
        assert!(event.is_err());
        let (text, _, event) = decode(
            "s",
            &entry(vec!["t".into(), "sku".into(), "at".into(), "5".into()]),
        )
        .expect("entry");
        assert_eq!(text, "5-0");
        assert_eq!(event.expect("an event").event_id, "s/5-0");
        assert!(decode("s", &Reply::Int(1)).is_err(), "no id: not an entry");
    }
}
