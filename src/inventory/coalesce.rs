//! Natural batching of concurrent claims of one SKU into one script call.
//!
//! A flash sale sends many claims for the same SKU at once, and every script call costs an
//! engine round trip, a script start and the hold sweep. So while a claim of a SKU is in the
//! engine, the claims that arrive for that SKU queue up here; when the call returns, the
//! queue goes as one `claims_batch.lua` call, and so on. At low load nothing waits: a claim
//! that finds its SKU idle runs at once, alone. Under load the batch grows with the queue,
//! so the engine sees fewer, larger calls instead of more, smaller ones.
//!
//! Each claim keeps its own answer, idempotency and errors: `claims_batch.lua` claims each
//! order exactly as `claim.lua` would alone (the conformance suite runs both). Coalescing
//! never decides anything: two calls of one SKU running at once (a lane dropped while idle,
//! [`MAX_CALLS_PER_SKU`]) are as correct as one, because each script call is atomic.
//!
//! A queued claim is sent by a spawned task, not by its caller, so a client that hangs up
//! does not stall the claims queued behind it; its claim may still be made, as it could be
//! once its script was sent. Orders are idempotent, so its retry gets the answer.

use dashmap::DashMap;
use tokio::sync::oneshot;

use super::{ClaimRequest, Inventory, Order};
use crate::error::Error;

/// Script calls of one SKU in the engine at once. Two keep the engine busy while the
/// gateway reads one call's replies and gathers the next batch.
pub const MAX_CALLS_PER_SKU: usize = 2;

/// Most orders in one coalesced call.
pub const MAX_ORDERS_PER_CALL: usize = 256;

/// Most codes one coalesced call asks for: bounds how long one script holds the engine.
pub const MAX_CODES_PER_CALL: u64 = 1024;

/// One claim's answer, and whether its `ERR_SOLD_OUT` meant that nothing was left.
pub type Answer = (Result<Order, Error>, bool);

struct Waiting {
    request: ClaimRequest,
    reply: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct Lane {
    /// Script calls of this SKU in flight.
    calls: usize,
    queue: Vec<Waiting>,
}

/// The claims of each SKU waiting for the call in flight to return.
#[derive(Default)]
pub struct Coalescer {
    /// SKU → its lane; a lane exists only while a call of that SKU is in flight, so the map
    /// is bounded by the SKUs being claimed, not by every SKU ever named.
    lanes: DashMap<Box<str>, Lane>,
}

enum Turn {
    /// Run the claim now.
    Run,
    /// A call is in flight: the answer comes from the call that takes the queue.
    Wait(oneshot::Receiver<Answer>),
}

impl Coalescer {
    /// Enters a claim: run it now when the SKU has a free call slot, else queue it.
    fn enter(&self, sku: &str, request: &ClaimRequest) -> Turn {
        let mut lane = self.lanes.entry(sku.into()).or_default();
        if lane.calls < MAX_CALLS_PER_SKU {
            lane.calls += 1;
            return Turn::Run;
        }
        let (reply, answer) = oneshot::channel();
        lane.queue.push(Waiting {
            request: request.clone(),
            reply,
        });
        Turn::Wait(answer)
    }

    /// A call of `sku` returned: the next batch its slot carries, or `None` when the queue
    /// is empty (the slot is freed, and the lane dropped with the last one).
    fn next(&self, sku: &str) -> Option<Vec<Waiting>> {
        let mut lane = self.lanes.get_mut(sku)?;
        if lane.queue.is_empty() {
            lane.calls = lane.calls.saturating_sub(1);
            let idle = lane.calls == 0;
            drop(lane);
            if idle {
                self.lanes
                    .remove_if(sku, |_, l| l.calls == 0 && l.queue.is_empty());
            }
            return None;
        }
        let mut codes = 0;
        let take = lane
            .queue
            .iter()
            .take(MAX_ORDERS_PER_CALL)
            .take_while(|w| {
                codes += w.request.quantity;
                codes <= MAX_CODES_PER_CALL
            })
            .count()
            .max(1);
        Some(lane.queue.drain(..take).collect())
    }
}

/// Frees a claim's call slot when the claim is done or its caller gone, handing the queue
/// that gathered meanwhile to a task of its own.
struct Slot<'a> {
    inventory: &'a Inventory,
    sku: &'a str,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let Some(batch) = self.inventory.coalescer.next(self.sku) else {
            return;
        };
        // Outside a runtime (it is being torn down) the batch is dropped: its callers are
        // answered `ERR_UNAVAILABLE`, and nothing of theirs was sent.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let inventory = self.inventory.clone();
            let sku = self.sku.to_owned();
            runtime.spawn(async move { inventory.drive(sku, batch).await });
        }
    }
}

impl Inventory {
    /// Claims through the SKU's lane: at once when the SKU has a free call slot, else with
    /// the next batch.
    pub(super) async fn claim_coalesced(&self, sku: &str, req: &ClaimRequest) -> Answer {
        match self.coalescer.enter(sku, req) {
            Turn::Run => {
                let _slot = Slot {
                    inventory: self,
                    sku,
                };
                self.claim_alone(sku, req).await
            }
            Turn::Wait(answer) => answer.await.unwrap_or_else(|_| {
                // The task carrying the batch ended without answering (the runtime is
                // shutting down): nothing is known of this claim.
                (
                    Err(Error::Unavailable(
                        "the claim was not answered; retry".into(),
                    )),
                    false,
                )
            }),
        }
    }

    /// Carries a SKU's call slot through batch after batch until its queue is empty.
    async fn drive(&self, sku: String, mut batch: Vec<Waiting>) {
        loop {
            let requests: Vec<ClaimRequest> = batch.iter().map(|w| w.request.clone()).collect();
            let answers = if let [only] = requests.as_slice() {
                vec![self.claim_alone(&sku, only).await]
            } else {
                match self.claim_batch(&sku, &requests).await {
                    Ok(answers) => answers,
                    Err(e) => requests.iter().map(|_| (Err(e.clone()), false)).collect(),
                }
            };
            for (waiting, answer) in batch.into_iter().zip(answers) {
                // A caller that hung up no longer wants its answer.
                let _ = waiting.reply.send(answer);
            }
            match self.coalescer.next(&sku) {
                Some(next) => batch = next,
                None => return,
            }
        }
    }
}
