//! Natural batching of concurrent requests of one SKU into one script call.
//!
//! A flash sale sends many claims for the same SKU at once, and its buyers then redeem many
//! of its codes at once; every script call costs an engine round trip and a script start
//! (and a claim's, the hold sweep). So while a call of a SKU is in the engine, the requests
//! of the same kind that arrive for that SKU queue up here; when the call returns, the queue
//! goes as one batch call (`claims_batch.lua`, `redeems_batch.lua`), and so on. At low load
//! nothing waits: a request that finds its SKU idle runs at once, alone. Under load the
//! batch grows with the queue, so the engine sees fewer, larger calls instead of more,
//! smaller ones.
//!
//! Each request keeps its own answer, idempotency and errors: a batch script treats each
//! request exactly as the single script would alone, after the ones before it (the
//! conformance suite runs both). Coalescing never decides anything: two calls of one SKU
//! running at once (a lane dropped while idle, [`MAX_CALLS_PER_SKU`]) are as correct as
//! one, because each script call is atomic.
//!
//! A queued request is sent by a spawned task, not by its caller, so a client that hangs up
//! does not stall the requests queued behind it; its request may still be carried out, as
//! it could be once its script was sent. Orders and redemptions are idempotent, so its retry
//! gets the answer.

use std::future::Future;
use std::marker::PhantomData;

use dashmap::DashMap;
use tokio::sync::oneshot;

use super::{ClaimRequest, Inventory, Order, Redemption};
use crate::error::Error;
use crate::sku::Candidate;

/// Script calls of one SKU and kind in the engine at once. Two keep the engine busy while
/// the gateway reads one call's replies and gathers the next batch.
pub const MAX_CALLS_PER_SKU: usize = 2;

/// Most requests in one coalesced call.
pub const MAX_ORDERS_PER_CALL: usize = 256;

/// Most codes one coalesced call asks for (claims) or looks up (redemptions): bounds how long
/// one script holds the engine.
pub const MAX_CODES_PER_CALL: u64 = 1024;

/// One claim's answer, and whether its `ERR_SOLD_OUT` meant that nothing was left.
pub type Answer = (Result<Order, Error>, bool);

/// A kind of request that concurrent requests of one SKU can share a script call for.
pub(super) trait Coalesced: Clone + Send + Sync + Sized + 'static {
    type Answer: Send + 'static;

    /// What this request takes of a call's [`MAX_CODES_PER_CALL`].
    fn codes(&self) -> u64;

    /// The lanes of this kind in `inventory`.
    fn lanes(inventory: &Inventory) -> &Coalescer<Self>;

    /// The answer of a request whose call ended without answering it (the runtime is
    /// shutting down): nothing is known of it.
    fn unanswered() -> Self::Answer;

    /// Runs `requests` of `sku` in one script call (a single one as the kind's own script):
    /// an answer each, in order.
    fn run<'a>(
        inventory: &'a Inventory,
        sku: &'a str,
        requests: &'a [Self],
    ) -> impl Future<Output = Vec<Self::Answer>> + Send + 'a;
}

struct Waiting<Q: Coalesced> {
    request: Q,
    reply: oneshot::Sender<Q::Answer>,
}

struct Lane<Q: Coalesced> {
    /// Script calls of this SKU in flight.
    calls: usize,
    queue: Vec<Waiting<Q>>,
}

impl<Q: Coalesced> Default for Lane<Q> {
    fn default() -> Self {
        Lane {
            calls: 0,
            queue: Vec::new(),
        }
    }
}

/// The requests of one kind, per SKU, waiting for the call in flight to return.
pub struct Coalescer<Q: Coalesced> {
    /// SKU → its lane; a lane exists only while a call of that SKU is in flight, so the map
    /// is bounded by the SKUs being asked for, not by every SKU ever named.
    lanes: DashMap<Box<str>, Lane<Q>>,
}

impl<Q: Coalesced> Default for Coalescer<Q> {
    fn default() -> Self {
        Coalescer {
            lanes: DashMap::new(),
        }
    }
}

enum Turn<A> {
    /// Run the request now.
    Run,
    /// A call is in flight: the answer comes from the call that takes the queue.
    Wait(oneshot::Receiver<A>),
}

impl<Q: Coalesced> Coalescer<Q> {
    /// Enters a request: run it now when the SKU has a free call slot, else queue it.
    fn enter(&self, sku: &str, request: &Q) -> Turn<Q::Answer> {
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
    fn next(&self, sku: &str) -> Option<Vec<Waiting<Q>>> {
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
                codes += w.request.codes();
                codes <= MAX_CODES_PER_CALL
            })
            .count()
            .max(1);
        Some(lane.queue.drain(..take).collect())
    }
}

/// Frees a request's call slot when the request is done or its caller gone, handing the
/// queue that gathered meanwhile to a task of its own.
struct Slot<'a, Q: Coalesced> {
    inventory: &'a Inventory,
    sku: &'a str,
    kind: PhantomData<Q>,
}

impl<Q: Coalesced> Drop for Slot<'_, Q> {
    fn drop(&mut self) {
        let Some(batch) = Q::lanes(self.inventory).next(self.sku) else {
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
    /// Runs `request` through the SKU's lane of its kind: at once when the SKU has a free
    /// call slot, else with the next batch.
    pub(super) async fn coalesced<Q: Coalesced>(&self, sku: &str, request: &Q) -> Q::Answer {
        match Q::lanes(self).enter(sku, request) {
            Turn::Run => {
                let _slot = Slot::<Q> {
                    inventory: self,
                    sku,
                    kind: PhantomData,
                };
                let mut answers = Q::run(self, sku, std::slice::from_ref(request)).await;
                answers.pop().unwrap_or_else(Q::unanswered)
            }
            Turn::Wait(answer) => answer.await.unwrap_or_else(|_| Q::unanswered()),
        }
    }

    /// Carries a SKU's call slot through batch after batch until its queue is empty.
    async fn drive<Q: Coalesced>(&self, sku: String, mut batch: Vec<Waiting<Q>>) {
        loop {
            let (requests, replies): (Vec<Q>, Vec<_>) =
                batch.into_iter().map(|w| (w.request, w.reply)).unzip();
            let answers = Q::run(self, &sku, &requests).await;
            for (reply, answer) in replies.into_iter().zip(answers) {
                // A caller that hung up no longer wants its answer.
                let _ = reply.send(answer);
            }
            match Q::lanes(self).next(&sku) {
                Some(next) => batch = next,
                None => return,
            }
        }
    }
}

/// The answer to a `what` whose call ended without answering it: nothing is known of it.
fn not_answered(what: &str) -> Error {
    Error::Unavailable(format!("the {what} was not answered; retry"))
}

impl Coalesced for ClaimRequest {
    type Answer = Answer;

    fn codes(&self) -> u64 {
        self.quantity
    }

    fn lanes(inventory: &Inventory) -> &Coalescer<Self> {
        &inventory.lanes.claims
    }

    fn unanswered() -> Answer {
        (Err(not_answered("claim")), false)
    }

    async fn run(inventory: &Inventory, sku: &str, requests: &[Self]) -> Vec<Answer> {
        if let [only] = requests {
            return vec![inventory.claim_alone(sku, only).await];
        }
        match inventory.claim_batch(sku, requests).await {
            Ok(answers) => answers,
            Err(e) => requests.iter().map(|_| (Err(e.clone()), false)).collect(),
        }
    }
}

/// A redemption of a SKU's code, as [`Inventory::redeem_any`] asks for it.
#[derive(Clone)]
pub(super) struct RedeemRequest {
    pub candidates: Vec<Candidate>,
    pub redeemer: String,
    /// Set while redemptions are paused: the answer to a redemption that would be new.
    pub paused: Option<Error>,
}

impl Coalesced for RedeemRequest {
    type Answer = Result<Redemption, Error>;

    fn codes(&self) -> u64 {
        self.candidates.len().max(1) as u64
    }

    fn lanes(inventory: &Inventory) -> &Coalescer<Self> {
        &inventory.lanes.redemptions
    }

    fn unanswered() -> Self::Answer {
        Err(not_answered("redemption"))
    }

    async fn run(inventory: &Inventory, sku: &str, requests: &[Self]) -> Vec<Self::Answer> {
        if let [only] = requests {
            return vec![inventory.redeem_alone(sku, only).await];
        }
        match inventory.redeem_batch(sku, requests).await {
            Ok(answers) => answers,
            Err(e) => requests.iter().map(|_| Err(e.clone())).collect(),
        }
    }
}

/// The decoy call of a code the global index does not know ([`Inventory::redeem_unknown`]),
/// coalesced per decoy SKU as redemptions are per SKU, so it keeps costing what a
/// redemption's call costs.
#[derive(Clone)]
pub(super) struct DecoyRequest {
    pub redeemer: String,
    pub digest: String,
}

impl Coalesced for DecoyRequest {
    type Answer = Result<(), Error>;

    fn codes(&self) -> u64 {
        1
    }

    fn lanes(inventory: &Inventory) -> &Coalescer<Self> {
        &inventory.lanes.decoys
    }

    fn unanswered() -> Self::Answer {
        Err(not_answered("redemption"))
    }

    async fn run(inventory: &Inventory, decoy: &str, requests: &[Self]) -> Vec<Self::Answer> {
        let answer = inventory.decoys(decoy, requests).await;
        requests.iter().map(|_| answer.clone()).collect()
    }
}

/// The lanes of each kind of coalesced request.
#[derive(Default)]
pub(super) struct Lanes {
    pub claims: Coalescer<ClaimRequest>,
    pub redemptions: Coalescer<RedeemRequest>,
    pub decoys: Coalescer<DecoyRequest>,
}
