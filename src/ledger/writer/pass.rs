//! One pass over one SKU: read a batch (or take the one read ahead), dead-letter poison,
//! commit the rest in one transaction, and leave the acknowledgement for the next read.

use std::time::{Duration, Instant};

use super::inflight::Held;
use super::reply::{decode, ReadReply, READ_HEAD};
use super::{EventWriter, WriterError, MAX_BATCH};
use crate::engine::keys::dead_letters_key;
use crate::engine::stream_id::StreamId;
use crate::engine::Reply;
use crate::ledger::LedgerError;
use crate::metrics as m;
use crate::metrics::{
    EVENTS_COMMITTED, EVENTS_DEAD_LETTERED, LEDGER_WRITE_DURATION, LEDGER_WRITE_FAILURES,
};

/// How often a writer reading ahead looks for entries of dead consumers: that scan walks
/// the pending list, which holds the batch being committed.
const RECLAIM_EVERY: Duration = Duration::from_secs(1);

/// Entries decoded between two yields to the runtime.
const DECODED_PER_TURN: usize = 32;

/// A SKU's pipeline between passes (see "Pipelined passes" in the writer's docs).
#[derive(Debug, Default)]
pub(super) struct Cursor {
    /// Ids of committed entries not yet acknowledged: the next read acknowledges them.
    unacked: Vec<String>,
    /// The SKU's generation those ids belong to (acknowledged only while it lasts).
    unacked_gen: String,
    /// A read taken while the last batch committed, to be committed next.
    ahead: Option<Reply>,
    /// A batch whose commit failed while the ledger was unavailable: the next pass commits
    /// it again before anything is read (see "Failed commits" in the writer's docs).
    failed: Option<Reply>,
    /// How many entries that batch held delivered and unacknowledged when `ahead` was read.
    ahead_beside: u64,
    /// When a read last looked for entries dead consumers left.
    reclaimed_at: Option<Instant>,
    /// Whether every entry this writer read of the SKU is committed (its id in `unacked`)
    /// or in `ahead`: then a read need not look for its own pending entries. False until a
    /// pass succeeds, and after any pass that failed or lost a read ahead.
    clean: bool,
}

impl Cursor {
    /// Whether the read ahead holds entries.
    pub(super) fn has_ahead(&self) -> bool {
        self.ahead.as_ref().is_some_and(holds_entries)
    }

    /// What this cursor holds read and not committed, between two passes.
    fn held(&self) -> Held {
        if self.failed.is_some() {
            Held::Failed
        } else if self.has_ahead() {
            Held::Ahead
        } else {
            Held::Nothing
        }
    }
}

/// Whether a read's reply holds entries (beyond its report).
fn holds_entries(reply: &Reply) -> bool {
    reply
        .as_array()
        .is_some_and(|items| items.len() > READ_HEAD)
}

/// What one pass over a SKU did.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Pass {
    /// Entries read (committed + dead-lettered, once the pass succeeded).
    pub(super) read: usize,
    pub(super) committed: usize,
    pub(super) dead: usize,
}

impl EventWriter {
    /// Sends the acknowledgements `cursor` carries (see [`Cursor::unacked`]). They are kept
    /// for the next read if the engine does not answer; acknowledging twice is harmless.
    pub(super) async fn flush_acks(
        &self,
        sku: &str,
        cursor: &mut Cursor,
    ) -> Result<(), WriterError> {
        while !cursor.unacked.is_empty() {
            let n = cursor.unacked.len().min(MAX_BATCH as usize);
            let mut args = Vec::with_capacity(2 + n);
            args.push("ack".to_owned());
            args.push(self.inner.opts.group.clone());
            args.push(cursor.unacked_gen.clone());
            args.extend(cursor.unacked[..n].iter().cloned());
            self.eval(sku, args).await?;
            cursor.unacked.drain(..n);
        }
        Ok(())
    }

    /// Reads a batch for this writer, acknowledging what `cursor` carries on the way. `own`
    /// includes this writer's own pending entries (first); entries of dead consumers are
    /// looked for with them, or else every [`RECLAIM_EVERY`].
    async fn read(&self, sku: &str, cursor: &mut Cursor, own: bool) -> Result<Reply, WriterError> {
        if cursor.unacked.len() > MAX_BATCH as usize {
            // Only after failed reads: keep one call's arguments bounded.
            self.flush_acks(sku, cursor).await?;
        }
        let opts = &self.inner.opts;
        let mut args = Vec::with_capacity(7 + cursor.unacked.len());
        args.extend([
            "read".to_owned(),
            opts.group.clone(),
            opts.consumer.clone(),
            opts.batch.to_string(),
            opts.reclaim_idle_ms.to_string(),
        ]);
        let reclaim = own
            || cursor
                .reclaimed_at
                .is_none_or(|t| t.elapsed() >= RECLAIM_EVERY);
        let sources = match (own, reclaim) {
            (true, _) => "ocn",
            (false, true) => "cn",
            (false, false) => "n",
        };
        args.push(sources.to_owned());
        if !cursor.unacked.is_empty() {
            args.push(cursor.unacked_gen.clone());
            args.extend(cursor.unacked.iter().cloned());
        }
        let reply = if sources == "n" {
            // The common read of a busy writer: the engine may serve it without Lua
            // copying the entries.
            self.inner
                .engine
                .read_new_entries(self.stream_keys(sku), args)
                .await?
        } else {
            self.eval(sku, args).await?
        };
        cursor.unacked.clear();
        if reclaim {
            cursor.reclaimed_at = Some(Instant::now());
        }
        Ok(reply)
    }

    /// One pass: commits the batch read ahead, or a batch read now. With `read_ahead`, the
    /// next batch is read while this one commits (see "Pipelined passes" in the writer's
    /// docs) and left in `cursor`; the acknowledgement of this batch is left in `cursor` for
    /// the next read either way. Marked, so a rebuild can wait for what it read
    /// ([`EventWriter::commit_what_was_read`]).
    pub(super) async fn pass(
        &self,
        sku: &str,
        cursor: &mut Cursor,
        read_ahead: bool,
    ) -> Result<Pass, WriterError> {
        let mark = self.inner.in_flight.begin(sku);
        let pass = self.unmarked_pass(sku, cursor, read_ahead).await;
        mark.end(cursor.held());
        pass
    }

    async fn unmarked_pass(
        &self,
        sku: &str,
        cursor: &mut Cursor,
        read_ahead: bool,
    ) -> Result<Pass, WriterError> {
        // Known clean, this writer has no pending entries of its own to read first (a busy
        // SKU's reads then stay reads of new entries only).
        let own = !std::mem::take(&mut cursor.clean);
        // A read ahead that found nothing is stale: whatever this pass is for (an answer that
        // woke the writer since) came after it, so it reads now. Taken as a batch, it made
        // the woken pass find nothing and the answer wait for the idle poll.
        let ahead = cursor.ahead.take().filter(holds_entries);
        // A batch whose commit failed goes first: it is older than anything read now.
        let retried = cursor.failed.take();
        let retry = retried.is_some();
        let (reply, from_ahead) = match (retried, ahead) {
            (Some(reply), _) => (reply, false),
            (None, Some(reply)) => (reply, true),
            (None, None) => (self.read(sku, cursor, own).await?, false),
        };
        let read = ReadReply::parse(&reply)?;
        // A read without this writer's own entries finds it holding as many delivered and
        // unacknowledged as it knows of: none, or the batch committing beside a read ahead.
        // More means a read whose reply never came back (a connection dropped after Redis
        // ran it, or a client that sent it again and got the next entries): the next read
        // takes them, instead of leaving them until they are reclaimed as a dead consumer's.
        let known = if from_ahead { cursor.ahead_beside } else { 0 };
        let stray = !retry && (from_ahead || !own) && read.owned > known;
        let batch = self.inner.opts.batch as usize;
        // A read of its own entries that filled the batch may have left more of them.
        let own_left = own && !from_ahead && read.own >= batch;
        // A read ahead leaves this writer's own pending entries out, so it must not run while
        // more of them wait than this batch holds (after a failed commit, or a read whose
        // answer was lost): they are older, and are committed first.
        // Nor beside a batch committed again: the failed pass may have delivered a read
        // ahead it dropped, and the next read takes this writer's own entries first.
        let read_ahead = read_ahead && !retry && (from_ahead || read.own < batch);
        // Only a full batch says more is waiting now; after a partial one the next batch is
        // read while the transaction commits, not before its statements (see "Pipelined
        // passes" in the writer's docs), and only if an answer waits for it: otherwise
        // what comes meanwhile waits for a larger commit ("Lingering" in the docs).
        let backlog = read.entries.len() >= batch;
        let read_ahead = read_ahead && (backlog || self.awaited(sku));
        if !retry {
            // A batch committed again says nothing of the stream now (it may be of a
            // generation the engine has lost since).
            self.observe(sku, &read);
        }
        if read.entries.is_empty() {
            cursor.clean = !stray;
            return Ok(Pass::default());
        }
        if stray {
            // The entries that reply lost are older than these, and a SKU's events must be
            // applied in stream order (a void committed after the restore that undid it
            // leaves the ledger's key void). Nothing is committed: these stay pending with
            // them, and the next read takes this writer's own entries, all of them, oldest
            // first.
            return Ok(Pass {
                read: read.entries.len(),
                committed: 0,
                dead: 0,
            });
        }

        // Decode; poison goes aside now, so it cannot hold up the entries behind it.
        let mut events = Vec::with_capacity(read.entries.len());
        let mut committed: Vec<(usize, StreamId, String)> = Vec::with_capacity(read.entries.len());
        let mut dead = 0;
        // Each event names its generation, so a commit after a rebuild of another read the
        // ledger is seen as late (`rebuild_fences`).
        let gen = (!read.gen.is_empty()).then(|| read.gen.to_owned());
        for (at, entry) in read.entries.iter().enumerate() {
            if at % DECODED_PER_TURN == DECODED_PER_TURN - 1 {
                // A large batch takes milliseconds to decode: the requests sharing this
                // worker must not wait for all of it.
                tokio::task::yield_now().await;
            }
            let (id_text, id, decoded) = decode(sku, entry)?;
            match decoded {
                Ok(mut event) => {
                    event.gen.clone_from(&gen);
                    events.push(event);
                    committed.push((at, id, id_text));
                }
                Err(reason) => {
                    // Moved aside already by the pass whose commit failed.
                    if !retry {
                        self.dead_letter(sku, &id_text, &reason).await?;
                    }
                    dead += 1;
                }
            }
        }
        if events.is_empty() {
            cursor.clean = !own_left;
            return Ok(Pass {
                read: read.entries.len(),
                committed: 0,
                dead,
            });
        }

        let started = Instant::now();
        // Committed: waiters may go at once, whatever happens to the read ahead beside the
        // commit (a read of a busy engine can take longer than the commit) and to the
        // acknowledgement.
        let settle = |result: Result<u64, LedgerError>| {
            metrics::histogram!(LEDGER_WRITE_DURATION).record(started.elapsed().as_secs_f64());
            if result.is_ok() {
                self.note_committed(sku, &read, &committed);
            }
            result
        };
        let (result, ahead) = if !read_ahead {
            (settle(self.inner.ledger.apply_events(&events).await), None)
        } else if backlog {
            tokio::join!(
                async { settle(self.inner.ledger.apply_events(&events).await) },
                async { Some(self.read(sku, cursor, false).await) }
            )
        } else {
            // The read starts once the statements ran, before `COMMIT`: `beside` only says
            // when. It is dropped unrun if a statement fails, and then nothing is read.
            let (go, statements_ran) = tokio::sync::oneshot::channel();
            let beside = Box::pin(async move {
                let _ = go.send(());
            });
            tokio::join!(
                async { settle(self.inner.ledger.apply_events_beside(&events, beside).await) },
                async {
                    statements_ran.await.ok()?;
                    Some(self.read(sku, cursor, false).await)
                }
            )
        };
        if let Err(e) = result {
            let kind = if e.is_retryable() {
                "unavailable"
            } else {
                "rejected"
            };
            metrics::counter!(LEDGER_WRITE_FAILURES, "kind" => kind).increment(1);
            // The read ahead is dropped: the next read takes it again. This batch is kept
            // and committed again first (see "Failed commits" in the writer's docs). One the
            // ledger rejects is not: it may never commit, and kept it would hold a rebuild
            // of the SKU back for good; it is read again while the stream has it.
            if e.is_retryable() {
                cursor.failed = Some(reply);
            }
            return Err(e.into());
        }

        for (source, n) in read.sources(committed.iter().map(|(at, _, _)| *at)) {
            if n > 0 {
                metrics::counter!(EVENTS_COMMITTED, "source" => source).increment(n);
            }
        }
        let pass = Pass {
            read: read.entries.len(),
            committed: committed.len(),
            dead,
        };
        if cursor.unacked_gen != read.gen {
            // Ids of a lost generation's stream: nothing to acknowledge there any more.
            cursor.unacked.clear();
            cursor.unacked_gen = read.gen.to_owned();
        }
        cursor
            .unacked
            .extend(committed.into_iter().map(|(_, _, text)| text));
        // A failed read ahead is no failure of this pass: the next pass reads again, its
        // own pending entries first (the failed read may have delivered some).
        cursor.clean = !retry && !own_left && !matches!(ahead, Some(Err(_)));
        cursor.ahead = ahead.and_then(Result::ok);
        cursor.ahead_beside = pass.committed as u64;
        Ok(pass)
    }

    /// Moves a poison entry to the dead-letter stream and acknowledges it, in one step.
    async fn dead_letter(&self, sku: &str, id: &str, reason: &str) -> Result<(), WriterError> {
        let args = vec![
            "dead".into(),
            self.inner.opts.group.clone(),
            id.to_owned(),
            reason.to_owned(),
        ];
        let moved = self.eval(sku, args).await?.as_i64() == Some(1);
        if moved {
            metrics::counter!(EVENTS_DEAD_LETTERED, "sku" => m::sku_labels().label(sku))
                .increment(1);
            tracing::warn!(
                sku,
                entry = id,
                reason,
                dead_letters = %dead_letters_key(sku),
                "poison stream entry moved to the dead-letter stream"
            );
        }
        Ok(())
    }
}
