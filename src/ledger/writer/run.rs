//! The writer's loop: the SKUs side by side, backoff while a store is down, the final drain on
//! stop, and reaping consumers of stopped gateways.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::backoff::{Trouble, FIRST_BACKOFF};
use super::pass::Cursor;
use super::{EventWriter, WriterError};

/// How often the SKU list is read again from the ledger.
const SKU_REFRESH: Duration = Duration::from_secs(5);
/// How long a stopping writer keeps committing what the streams still hold.
const DRAIN_ON_STOP: Duration = Duration::from_secs(10);
/// Batches drained from one SKU before the others get their turn.
const BATCHES_PER_VISIT: usize = 8;
/// How often consumers of stopped gateways are deleted from the group.
const REAP_EVERY: Duration = Duration::from_secs(300);
/// How long a consumer owning nothing must have been silent to be deleted (at least).
const REAP_IDLE: Duration = Duration::from_secs(3600);

/// The scope logged for outages of the ledger or the engine, which hold up every SKU.
const ALL_SKUS: &str = "all SKUs";

impl EventWriter {
    /// Drains every SKU of the ledger until `stop` turns true (or its sender is dropped).
    ///
    /// Each round visits the SKUs (the list is read again every few seconds) and
    /// drains each while its passes find entries, a bounded number of passes so one busy SKU
    /// cannot starve the others; when a round found nothing it sleeps
    /// [`WriterOptions::idle_poll_ms`](super::WriterOptions::idle_poll_ms), and when it found
    /// only partial batches no answer waits for ("Lingering" in the module docs)
    /// [`WriterOptions::linger_ms`](super::WriterOptions::linger_ms), or until an answer
    /// waits. While the ledger
    /// or the engine is unavailable it retries with exponential backoff up to
    /// [`WriterOptions::max_backoff_ms`](super::WriterOptions::max_backoff_ms), logging the
    /// outage once when it starts and once when it ends. A SKU whose batch the ledger rejects
    /// is retried with backoff on its own, without holding up the others.
    ///
    /// The SKUs of a round are visited concurrently, each by one pass at a time, and the
    /// batches of several SKUs that reach the ledger while it commits go in its next
    /// transaction together ("Commits that meet go together" in `sql/events.rs`). Drained
    /// one after the other, a sale of several SKUs paid a commit per SKU per round, each
    /// carrying only its SKU's events: with four SKUs on SQLite, durable claims ran at 0.6×
    /// the rate of one SKU's (BENCHMARKS.md). An idle round costs one script call per SKU.
    ///
    /// Stopping waits for the pass in progress (a commit is never cut in half, though that
    /// would be harmless); entries still pending are committed after a restart, by this or
    /// another gateway.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let opts = &self.inner.opts;
        let max_backoff = Duration::from_millis(opts.max_backoff_ms).max(FIRST_BACKOFF);
        let idle = Duration::from_millis(opts.idle_poll_ms);
        let linger = Duration::from_millis(opts.linger_ms).min(idle);
        let mut outage = Trouble::default();
        let mut troubled: HashMap<String, Trouble> = HashMap::new();
        let mut cursors: HashMap<String, Cursor> = HashMap::new();
        let mut skus: Vec<String> = Vec::new();
        let mut listed_at: Option<Instant> = None;
        let mut reaped_at = Instant::now();
        tracing::info!(
            group = %opts.group,
            consumer = %opts.consumer,
            batch = opts.batch,
            "event writer started"
        );
        loop {
            if *stop.borrow() {
                break;
            }
            let relist = self.inner.relist.swap(false, Ordering::Relaxed);
            if relist || listed_at.is_none_or(|t| t.elapsed() >= SKU_REFRESH) {
                match self.inner.ledger.list_skus().await {
                    Ok(list) => {
                        skus = list;
                        listed_at = Some(Instant::now());
                        troubled.retain(|sku, _| skus.contains(sku));
                        // A SKU gone from the ledger: what this writer holds of it stays
                        // pending in the group, and is read again if the SKU comes back.
                        cursors.retain(|sku, _| skus.contains(sku));
                    }
                    Err(e) => {
                        let delay = outage.fail(ALL_SKUS, &e, max_backoff);
                        if pause(&mut stop, delay).await {
                            break;
                        }
                        continue;
                    }
                }
            }

            let mut busy = false;
            let mut lingering = false;
            let mut failure: Option<WriterError> = None;
            // The SKUs due a visit, each with its cursor taken out for the visit.
            let mut due: Vec<(&String, Cursor)> = skus
                .iter()
                .filter(|sku| troubled.get(*sku).is_none_or(|t| t.due()))
                .map(|sku| (sku, cursors.remove(sku).unwrap_or_default()))
                .collect();
            let visits = due
                .iter_mut()
                .map(|(sku, cursor)| self.visit(sku, cursor, &stop));
            let visited = futures_util::future::join_all(visits).await;
            for ((sku, cursor), visit) in due.into_iter().zip(visited) {
                cursors.insert(sku.clone(), cursor);
                busy |= visit.busy;
                lingering |= visit.lingering;
                if visit.passed {
                    if let Some(mut t) = troubled.remove(sku) {
                        t.recover(sku);
                    }
                }
                match visit.error {
                    None => {}
                    Some(e) if e.is_outage() => failure = Some(e),
                    Some(e) => {
                        troubled
                            .entry(sku.clone())
                            .or_default()
                            .fail(sku, &e, max_backoff);
                    }
                }
            }
            if let Some(e) = failure {
                let delay = outage.fail(ALL_SKUS, &e, max_backoff);
                if pause(&mut stop, delay).await {
                    break;
                }
                continue;
            }
            outage.recover(ALL_SKUS);

            if reaped_at.elapsed() >= REAP_EVERY {
                reaped_at = Instant::now();
                self.reap(&skus).await;
            }
            if !busy {
                // A waiter wakes the writer at once: its answer waits for the next group
                // commit, not for the idle poll.
                let woken = self.inner.wake.notified();
                tokio::pin!(woken);
                if woken.as_mut().enable() {
                    // A waiter came during the round: its read carries the acknowledgements.
                    continue;
                }
                // Idle: acknowledge now what the next read would have, so other gateways
                // (and the backlog) see it settled without waiting for more events. A
                // lingering writer reads again in a moment, and that read carries them.
                if !lingering {
                    self.flush_all_acks(&mut cursors).await;
                }
                let sleep = if lingering { linger } else { idle };
                tokio::select! {
                    _ = &mut woken => {}
                    stopped = pause(&mut stop, sleep) => if stopped { break },
                }
            }
        }
        self.flush_all_acks(&mut cursors).await;
        // SKUs created since the last listing have events too.
        if let Ok(list) = self.inner.ledger.list_skus().await {
            skus = list;
        }
        self.drain_before_exit(&skus, &mut cursors).await;
        tracing::info!(consumer = %opts.consumer, "event writer stopped");
    }

    /// Up to [`BATCHES_PER_VISIT`] passes over `sku` while they find entries, until one fails
    /// or `stop` turns true.
    async fn visit(&self, sku: &str, cursor: &mut Cursor, stop: &watch::Receiver<bool>) -> Visit {
        let mut visit = Visit::default();
        for _ in 0..BATCHES_PER_VISIT {
            if *stop.borrow() {
                break;
            }
            match self.pass(sku, cursor, true).await {
                Ok(pass) => {
                    visit.passed = true;
                    // The read ahead is the next batch. Without one, a pass that committed
                    // something is followed by a read of what came meanwhile, if an answer
                    // waits for it or the batch was full; an empty pass means the SKU had
                    // nothing more.
                    if !cursor.has_ahead() {
                        if pass.read == 0 {
                            break;
                        }
                        if pass.read < self.inner.opts.batch as usize && !self.awaited(sku) {
                            visit.lingering = true;
                            break;
                        }
                    }
                    visit.busy = true;
                }
                Err(e) => {
                    visit.error = Some(e);
                    break;
                }
            }
        }
        visit
    }

    /// On stop, commits what the streams still hold, for a bounded time: the gateway stops
    /// the writer after its last request, and an embedded engine's streams end with the
    /// process, so what is not committed now would be lost. Each SKU's drain goes on from
    /// its cursor: a batch read ahead, or kept after a failed commit, is committed first.
    async fn drain_before_exit(&self, skus: &[String], cursors: &mut HashMap<String, Cursor>) {
        let deadline = Instant::now() + DRAIN_ON_STOP;
        for sku in skus {
            let mut cursor = cursors.remove(sku).unwrap_or_default();
            loop {
                if Instant::now() >= deadline {
                    tracing::warn!("stopping with events not yet committed to the ledger");
                    break;
                }
                match self.pass(sku, &mut cursor, false).await {
                    Ok(pass) if pass.read > 0 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(sku, error = %e, "final drain failed");
                        break;
                    }
                }
            }
            if let Err(e) = self.flush_acks(sku, &mut cursor).await {
                tracing::warn!(sku, error = %e, "final acknowledgement failed");
            }
            if Instant::now() >= deadline {
                return;
            }
        }
    }

    /// [`EventWriter::flush_acks`] for every SKU; failures leave them for the next read.
    async fn flush_all_acks(&self, cursors: &mut HashMap<String, Cursor>) {
        for (sku, cursor) in cursors.iter_mut() {
            if let Err(e) = self.flush_acks(sku, cursor).await {
                tracing::debug!(sku, error = %e, "acknowledgement deferred to the next read");
            }
        }
    }

    /// Deletes consumers of stopped gateways (owning nothing, silent for long) from the group.
    async fn reap(&self, skus: &[String]) {
        let opts = &self.inner.opts;
        let idle = REAP_IDLE
            .max(Duration::from_millis(opts.reclaim_idle_ms))
            .as_millis();
        for sku in skus {
            let args = vec!["reap".into(), opts.group.clone(), idle.to_string()];
            match self.eval(sku, args).await {
                Ok(reply) => {
                    if let Some(n) = reply.as_i64().filter(|n| *n > 0) {
                        tracing::debug!(
                            sku,
                            consumers = n,
                            "deleted consumers of stopped gateways"
                        );
                    }
                }
                Err(e) => {
                    // Housekeeping only: the next round tries again.
                    tracing::debug!(sku, error = %e, "could not delete stale consumers");
                    return;
                }
            }
        }
    }
}

/// What one visit of a SKU found.
#[derive(Default)]
struct Visit {
    /// A pass found a full batch or a read ahead: more may be waiting.
    busy: bool,
    /// A pass found a partial batch no answer waits for.
    lingering: bool,
    /// A pass succeeded.
    passed: bool,
    /// The failure that ended the visit.
    error: Option<WriterError>,
}

/// Sleeps `delay` unless `stop` fires first; returns whether it did (a dropped sender counts:
/// nobody can stop the writer any more, so it stops now).
async fn pause(stop: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.wait_for(|s| *s) => true,
        _ = tokio::time::sleep(delay) => false,
    }
}
