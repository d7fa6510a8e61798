//! The inventory: claims, holds, redemptions and imports, in domain terms.
//!
//! [`Inventory`] builds each script's `KEYS` and `ARGV`, runs it on whichever
//! [`ScriptEngine`] is configured and turns the reply into a typed result or an [`Error`].
//! This is the only place that knows the scripts' reply shapes, so both engines share it.
//! Knows nothing of HTTP.

mod coalesce;
pub mod drift;
pub mod formats;
pub mod import;
pub mod reconcile;
pub mod rekey;
pub mod retire;
pub mod settings;
pub mod warm;

use std::sync::{Arc, RwLock};

use serde_json::{json, Value};

use crate::clock::{self, SharedClock};
use crate::code::Format;
use crate::engine::keys::{
    dead_letters_key, digest_shard, events_key, index_shard, index_shards, meta_key, orders_key,
    sku_keys, REGISTRY,
};
use crate::engine::measured::measured;
use crate::engine::stream_id::StreamId;
use crate::engine::{Reply, Script, ScriptEngine, SCRIPTS};
use crate::error::{mask, timestamp, Error};
use crate::secrets::Keyring;
use crate::sku::{key_id, parse_key_id, Candidate, SkuConfig};

/// A void or restore that changed a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// The key's state before a void, after a restore.
    pub state: String,
    /// Answer id of the change's event (see [`Order::event_id`]).
    pub event_id: Option<String>,
    /// The change's event (see [`Order::emitted`]).
    pub emitted: Option<Emitted>,
}

/// A SKU as the engine holds it.
#[derive(Debug, Clone)]
pub struct EngineSku {
    pub config: SkuConfig,
    /// This incarnation of the SKU in the engine: new each time it is (re)created.
    pub gen: String,
    /// Being rebuilt from the ledger: not serving clients yet.
    pub loading: bool,
    /// Drained for a rebuild ([`Inventory::drain`]): not serving clients until it is
    /// dropped and rebuilt.
    pub draining: bool,
    /// When the engine created it (ms): for a rebuild, when the rebuild began.
    pub created_at_ms: u64,
    /// While loading: the gateways that wrote what they answered into the ledger since the
    /// rebuild began ([`Inventory::ack_rebuild`]).
    pub acks: Vec<String>,
}

/// What recording a gateway's acknowledgement of a rebuild found
/// ([`Inventory::ack_rebuild`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Recorded: the rebuild reads the ledger only after it, so it reads what the gateway
    /// wrote before.
    Acked,
    /// The rebuild reads the ledger already: it stopped waiting for the gateway (presumed
    /// gone), and may lack what the gateway wrote since.
    Late,
    /// Not that rebuild any more: the SKU is gone, ready, or of another generation.
    Stale,
}

/// What a claim asks for.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub order_id: String,
    pub quantity: u64,
    pub user_id: Option<String>,
    /// `None`: a final claim. `Some(ms)`: a hold that lapses by itself after `ms`.
    pub hold_ms: Option<u64>,
    /// Which stock pool the claim draws from (see `lua/prelude.lua`, "Stock pools").
    pub pool: PoolDraw,
}

/// Where a claim's codes come from: its channel's pool first, then, if `share`, the shared
/// remainder (the codes no pool reserves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDraw {
    /// The claiming channel, whose pool is drawn from first.
    pub channel: String,
    /// Whether the shared remainder may cover what the pool cannot.
    pub share: bool,
}

impl Default for PoolDraw {
    /// The default channel, which may draw on the shared remainder: a claim as before pools.
    fn default() -> PoolDraw {
        PoolDraw {
            channel: crate::channel::DEFAULT.to_owned(),
            share: true,
        }
    }
}

impl PoolDraw {
    fn share_arg(&self) -> String {
        if self.share { "1" } else { "0" }.to_owned()
    }
}

/// A code issued to an order. The code itself is present only once the order is final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedKey {
    pub key_id: String,
    pub code: Option<String>,
}

/// An order's state as the engine knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub order_id: String,
    pub sku: String,
    /// `held`, `claimed`, `released` or `expired`.
    pub state: String,
    pub keys: Vec<IssuedKey>,
    pub hold_expires_at_ms: Option<u64>,
    pub late: bool,
    pub replayed: bool,
    /// Answer id (`<gen>:<stream id>`) of the last event that changed the order, for
    /// `durability = "ledger"`; `None` when the ledger already has it (a rebuilt order).
    pub event_id: Option<String>,
    /// The change this call made, if it made one (a replay made none).
    pub emitted: Option<Emitted>,
}

/// An event a script appended to its SKU's stream, as the script reported it: what the
/// answering gateway keeps until the ledger has it ([`crate::ledger::journal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// `<gen>:<stream id>`, as in [`Order::event_id`].
    pub answer_id: String,
    /// The stream entry's field/value pairs (`t`, `at`, then the kind's own fields).
    pub fields: Vec<(String, String)>,
    /// Earlier events of the same generation this answer stands on, oldest first, that the
    /// ledger may not have yet: a late confirm's fresh codes presume its hold lapsed, and a
    /// ledger given the confirm without the lapse would keep the hold's codes held. They
    /// are kept and awaited with the answer's own event.
    pub before: Vec<Emitted>,
}

/// What [`Inventory::answer_entry`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerEntry {
    /// The engine lost the generation the answer names, and the entry with it.
    Lost,
    /// The stream no longer has it: the ledger has it (or it was dead-lettered).
    Settled,
    /// Still in the stream: the ledger may not have it yet.
    Kept(Emitted),
}

impl Emitted {
    /// Reads the `EMITTED` element of a reply (see `lua/prelude.lua`): one event, or a list
    /// of events ending with the answer's own; `None` when empty. The generation is taken
    /// from the reply's answer id.
    fn from_reply(reply: Option<&Reply>, answer_id: Option<&str>) -> Option<Emitted> {
        let items = reply?.as_array()?;
        let gen = answer_id
            .and_then(|a| a.rsplit_once(':'))
            .map_or("", |(g, _)| g);
        if !matches!(items.first(), Some(Reply::Array(_))) {
            return Emitted::entry(items, gen);
        }
        let mut events = items
            .iter()
            .map(|e| Emitted::entry(e.as_array()?, gen))
            .collect::<Option<Vec<_>>>()?;
        let mut last = events.pop()?;
        last.before = events;
        Some(last)
    }

    /// One event: `{stream id, field, value, …}`.
    fn entry(items: &[Reply], gen: &str) -> Option<Emitted> {
        let (id, pairs) = items.split_first()?;
        let stream_id = id.as_str()?;
        let fields = pairs
            .chunks_exact(2)
            .map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned())))
            .collect::<Option<Vec<_>>>()?;
        Some(Emitted {
            answer_id: format!("{gen}:{stream_id}"),
            fields,
            before: Vec::new(),
        })
    }
}

impl Order {
    /// The order with its codes in the SKU's display form ([`Format::display`]): the engine
    /// keeps canonical codes, clients see each code as `kamigate gen` printed it, the same
    /// on every route that returns codes.
    pub fn displayed(mut self, format: &Format) -> Order {
        for key in &mut self.keys {
            if let Some(code) = &mut key.code {
                *code = format.display(code);
            }
        }
        self
    }

    /// The API representation.
    pub fn to_json(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .map(|k| match &k.code {
                Some(code) => json!({ "key_id": k.key_id, "code": code }),
                None => json!({ "key_id": k.key_id }),
            })
            .collect();
        json!({
            "order_id": self.order_id,
            "sku": self.sku,
            "state": self.state,
            "keys": keys,
            "hold_expires_at": self.hold_expires_at_ms.map(timestamp),
            "late": self.late,
            "replayed": self.replayed,
        })
    }
}

/// A successful redemption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redemption {
    pub sku: String,
    pub key_id: String,
    pub redeemed_at_ms: u64,
    pub replayed: bool,
    /// Answer id of the redemption's event (for `durability = "ledger"`).
    pub event_id: Option<String>,
    /// The change this call made (`None` for a replay).
    pub emitted: Option<Emitted>,
    /// The SKU format version the code matched under, when known.
    pub format_version: Option<u32>,
}

impl Redemption {
    /// The API representation.
    pub fn to_json(&self) -> Value {
        json!({
            "state": "redeemed",
            "sku": self.sku,
            "key_id": self.key_id,
            "redeemed_at": timestamp(self.redeemed_at_ms),
            "replayed": self.replayed,
        })
    }
}

/// Keys of a SKU by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub available: u64,
    pub held: u64,
    pub claimed: u64,
    pub redeemed: u64,
    pub void: u64,
}

/// A code to add to a SKU: already validated and in canonical form.
#[derive(Debug, Clone)]
pub struct NewCode {
    pub canonical: String,
    /// Milliseconds since the epoch after which it can no longer be redeemed.
    pub expires_at_ms: Option<u64>,
}

/// What adding one code did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    New(String),
    /// The SKU already had this code, under the given key id.
    Duplicate(String),
}

/// The typed face of the engine.
#[derive(Clone)]
pub struct Inventory {
    engine: Arc<dyn ScriptEngine>,
    clock: SharedClock,
    /// Told whenever a script finds a SKU missing or still loading, so the gateway checks
    /// the engine against the ledger at once instead of at its next periodic pass.
    lost: Arc<tokio::sync::Notify>,
    /// Concurrent claims, and concurrent redemptions, of one SKU, each kind gathered into
    /// one script call.
    lanes: Arc<coalesce::Lanes>,
    /// Seals codes before they reach the engine or the ledger, opens them to answer a
    /// claim, keys the code digests. Shared by every clone, so a rotation
    /// ([`Inventory::use_keyring`]) reaches them all.
    keyring: Arc<RwLock<Arc<Keyring>>>,
    /// Where the keyring came from: read again when a stored code names a data key the
    /// keyring lacks (another gateway or `kamigate rekey` sealed under a newer key).
    key_origin: Arc<std::sync::OnceLock<crate::secrets::keyfile::KeyOrigin>>,
    /// Where orders the engine retired are restored from when they are retried (see the
    /// `retire` module); without it such a retry is `ERR_UNAVAILABLE`.
    ledger: Arc<std::sync::OnceLock<Arc<dyn crate::ledger::Ledger>>>,
}

impl Inventory {
    /// An inventory over `engine`, on the wall clock.
    pub fn new(engine: Arc<dyn ScriptEngine>) -> Inventory {
        Inventory::with_clock(engine, clock::system())
    }

    /// An inventory whose notion of "now" is `clock`. Its script calls are measured, and so
    /// are those of whoever shares its [`Inventory::engine`].
    pub fn with_clock(engine: Arc<dyn ScriptEngine>, clock: SharedClock) -> Inventory {
        Inventory {
            engine: measured(engine),
            clock,
            lost: Arc::new(tokio::sync::Notify::new()),
            lanes: Arc::default(),
            // Fresh keys until the data dir's are installed: an inventory that outlives no
            // process (tests) needs no more; the gateway and the commands install theirs.
            keyring: Arc::new(RwLock::new(Arc::new(Keyring::generate()))),
            key_origin: Arc::default(),
            ledger: Arc::default(),
        }
    }

    /// Remembers where the keyring came from, so a newer data key is picked up by itself.
    pub fn set_key_origin(&self, origin: crate::secrets::keyfile::KeyOrigin) {
        let _ = self.key_origin.set(origin);
    }

    /// Reads the keyring again from its origin and uses it when it still opens what the
    /// current one seals (it holds the current data key) and keys digests alike (same index
    /// key). Returns whether a new keyring is in use.
    pub fn reload_keys(&self) -> Result<bool, crate::secrets::keyfile::KeyError> {
        let Some(origin) = self.key_origin.get() else {
            return Ok(false);
        };
        let fresh = origin.reload()?;
        let current = self.keyring();
        let compatible = fresh.index_id() == current.index_id()
            && fresh.data_ids().contains(&current.current_id());
        if !compatible || fresh.data_ids() == current.data_ids() {
            return Ok(false);
        }
        tracing::info!(
            data_keys = ?fresh.data_ids(),
            sealing = fresh.current_id(),
            "data keys read again"
        );
        crate::metrics::initialise_keys(fresh.data_ids());
        self.use_keyring(Arc::new(fresh));
        Ok(true)
    }

    /// The keyring to try again with after `stale` met a data key it lacks: the keyring's
    /// origin is read again, and the keyring in use after that is returned unless it is
    /// `stale` itself. Concurrent callers that met the new key together all get it, though
    /// only the first one's read finds anything new; `None` when nothing newer exists.
    pub fn keyring_newer_than(&self, stale: &Arc<Keyring>) -> Option<Arc<Keyring>> {
        if let Err(e) = self.reload_keys() {
            tracing::warn!(error = %e, "reading the data keys again failed");
        }
        let now = self.keyring();
        (!Arc::ptr_eq(&now, stale)).then_some(now)
    }

    /// Seals and digests with `keyring` from now on, in every clone of this inventory.
    pub fn use_keyring(&self, keyring: Arc<Keyring>) {
        *self.keyring.write().unwrap_or_else(|e| e.into_inner()) = keyring;
    }

    /// The keyring in use.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The keyed digest of a canonical code, as the SKU's index and the ledger hold it.
    pub fn digest(&self, canonical: &str) -> String {
        self.keyring().digest(canonical)
    }

    /// Resolves when a script found a SKU missing or loading since the last call.
    pub async fn lost_sku(&self) {
        self.lost.notified().await
    }

    /// The engine underneath.
    pub fn engine(&self) -> &Arc<dyn ScriptEngine> {
        &self.engine
    }

    /// The clock this inventory runs on.
    pub fn clock(&self) -> SharedClock {
        self.clock.clone()
    }

    /// Whether the engine has order `order_id` of `sku`, for the edge, which answers a new
    /// order without a claim (a SKU remembered sold out, a pause) but must let a retried one
    /// reach the engine, which answers it as the first time. One script call that knows
    /// whether the SKU is loaded: while the engine lacks it or rebuilds it, its orders may
    /// be missing, so this is `ERR_UNAVAILABLE`, never "no such order" (an order the engine
    /// lost is not a new order). A retired order is an order all the same: it is restored
    /// from the ledger here (see the `retire` module). A fingerprint of another order (the
    /// ledger has no such order) is no order.
    pub async fn knows_order(&self, sku: &str, order_id: &str) -> Result<bool, Error> {
        let args = vec![order_id.to_owned()];
        let reply = self
            .run_order(&SCRIPTS.known, sku, order_id, args, None)
            .await?;
        match tag(&reply) {
            "found" => Ok(true),
            "not_found" => Ok(false),
            "no_sku" | "loading" => Err(rebuilding(sku)),
            _ => Err(unexpected(SCRIPTS.known.name(), &Reply::Array(reply))),
        }
    }

    /// Whether `sku` has an order `order_id`, by plain reads rather than a script: its
    /// record, else the fingerprint a retired order left (see the `retire` module), restored
    /// from the ledger. Reads a SKU the engine lacks as having no orders: for the rebuild's
    /// own probes, never the edge's (see [`Inventory::knows_order`]).
    pub async fn order_exists(&self, sku: &str, order_id: &str) -> Result<bool, Error> {
        if self
            .engine
            .hexists(orders_key(sku), order_id.to_owned())
            .await?
        {
            return Ok(true);
        }
        if !self.may_be_retired(sku, order_id).await? {
            return Ok(false);
        }
        self.restore_retired(sku, order_id).await
    }

    /// Now, in milliseconds since the epoch.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Runs a script (measured by the engine, see [`measured`]).
    async fn eval(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Reply, Error> {
        Ok(self.engine.eval(script, keys, args).await?)
    }

    /// Runs a per-SKU script, for the other modules of the inventory.
    pub(crate) async fn run_sku(
        &self,
        script: &'static Script,
        sku: &str,
        args: Vec<String>,
    ) -> Result<Vec<Reply>, Error> {
        self.run(script, sku, args).await
    }

    /// Runs a per-SKU script whose reply is not an array.
    pub(crate) async fn eval_plain(
        &self,
        script: &'static Script,
        sku: &str,
        args: Vec<String>,
    ) -> Result<Reply, Error> {
        self.eval(script, sku_keys(sku), args).await
    }

    /// Where the stream entry behind answer `answer_id` (`<gen>:<stream id>`) of `sku`
    /// stands: a replayed answer stands on a change an earlier call made, which the ledger
    /// may not have yet (a late confirm's with the lapse it stands on, in
    /// [`Emitted::before`], while the stream has it). An answer id naming no generation was written before generations
    /// were: the ledger has its change (as `stream_entry` in `lua/prelude.lua` judges).
    pub async fn answer_entry(&self, sku: &str, answer_id: &str) -> Result<AnswerEntry, Error> {
        let Some((gen, stream_id)) = answer_id.rsplit_once(':') else {
            return Ok(AnswerEntry::Settled);
        };
        let keys = vec![events_key(sku), dead_letters_key(sku), meta_key(sku)];
        let args = vec![
            "entry".to_owned(),
            String::new(),
            gen.to_owned(),
            stream_id.to_owned(),
        ];
        let reply = self.eval(&SCRIPTS.stream, keys, args).await?;
        let items = reply.as_array().unwrap_or_default();
        match items.first().and_then(Reply::as_str) {
            Some("lost") => Ok(AnswerEntry::Lost),
            Some("settled") => Ok(AnswerEntry::Settled),
            Some("kept") => {
                // {id, field, value, …}, as a script reports an event.
                let event = |id: &Reply, fields: Option<&Reply>| {
                    let mut entry = vec![id.clone()];
                    let fields = fields.and_then(Reply::as_array).unwrap_or_default();
                    entry.extend(fields.iter().cloned());
                    Emitted::entry(&entry, gen).ok_or_else(|| {
                        Error::Internal(format!("stream entry {answer_id} of {sku}: unreadable"))
                    })
                };
                let mut kept = event(&Reply::from(stream_id), items.get(1))?;
                if let Some(lapse) = items.get(2) {
                    kept.before.push(event(lapse, items.get(3))?);
                }
                Ok(AnswerEntry::Kept(kept))
            }
            _ => Err(Error::Internal(format!(
                "stream.lua entry: unexpected reply {reply:?}"
            ))),
        }
    }

    /// Points the global index at `sku` for these canonical codes.
    pub(crate) async fn index_codes(&self, sku: &str, codes: &[&str]) -> Result<(), Error> {
        let keyring = self.keyring();
        let digests: Vec<String> = codes.iter().map(|c| index_digest(&keyring, c)).collect();
        self.index(sku, &digests).await
    }

    /// Runs a per-SKU script, whose replies are always arrays.
    async fn run(
        &self,
        script: &'static Script,
        sku: &str,
        args: Vec<String>,
    ) -> Result<Vec<Reply>, Error> {
        match self.eval(script, sku_keys(sku), args).await? {
            Reply::Array(items) => {
                // Reading a SKU's settings is how unknown SKUs are told apart: not a loss.
                if script.name() != "sku" && matches!(tag(&items), "no_sku" | "loading") {
                    self.lost.notify_one();
                }
                Ok(items)
            }
            other => Err(unexpected(script.name(), &other)),
        }
    }

    /// Creates or updates a SKU. Returns whether it was created.
    pub async fn put_sku(&self, sku: &str, config: &SkuConfig) -> Result<bool, Error> {
        Ok(self.put_sku_as(sku, config, false, None).await?.is_some())
    }

    /// Creates a SKU for a rebuild from the ledger: it answers `ERR_UNAVAILABLE` until
    /// [`Inventory::mark_ready`], so no client sees a partly loaded stock. Returns the new
    /// generation, or `None` when the engine had the SKU already (nothing about loading
    /// changed). Its events take stream ids from `floor` up, if given (see
    /// [`Inventory::raise_floor`]).
    pub async fn create_loading(
        &self,
        sku: &str,
        config: &SkuConfig,
        floor: Option<StreamId>,
    ) -> Result<Option<String>, Error> {
        self.put_sku_as(sku, config, true, floor).await
    }

    /// Makes the stream ids of generation `gen` of `sku` at least `floor`: the id above the
    /// largest the ledger holds of the SKU ([`Ledger::last_entry`]), for a stream the engine
    /// recreated (rebuilt, or replaced behind the gateway's back). Fails when the SKU was
    /// lost and recreated since.
    ///
    /// [`Ledger::last_entry`]: crate::ledger::Ledger::last_entry
    pub async fn raise_floor(&self, sku: &str, gen: &str, floor: StreamId) -> Result<(), Error> {
        let args = vec![
            "floor".into(),
            gen.into(),
            floor.to_string(),
            self.now_ms().to_string(),
        ];
        let reply = self.run(&SCRIPTS.sku, sku, args).await?;
        match tag(&reply) {
            "raised" | "above" => Ok(()),
            _ => Err(lost_again(sku)),
        }
    }

    /// Ends the rebuild of generation `gen`, marking the engine with `epoch`: the SKU serves
    /// clients again. Returns whether this call ended it (`false`: another rebuild of the
    /// same generation did). Fails when the SKU was lost and recreated since (the rebuild of
    /// the new generation ends that one).
    pub async fn mark_ready(&self, sku: &str, gen: &str, epoch: &str) -> Result<bool, Error> {
        let args = vec!["ready".into(), gen.into(), epoch.into()];
        let reply = self.run(&SCRIPTS.sku, sku, args).await?;
        match tag(&reply) {
            "ready" => Ok(true),
            "done" => Ok(false),
            _ => Err(lost_again(sku)),
        }
    }

    /// Records that `gateway` wrote into the ledger everything it answered before the engine
    /// lost `sku`, while generation `gen` is being rebuilt: the rebuild waits for every
    /// gateway alive.
    pub async fn ack_rebuild(&self, sku: &str, gen: &str, gateway: &str) -> Result<Ack, Error> {
        let args = vec!["ack".into(), gen.into(), gateway.into()];
        let reply = self.run(&SCRIPTS.sku, sku, args).await?;
        Ok(match tag(&reply) {
            "acked" => Ack::Acked,
            "late" => Ack::Late,
            _ => Ack::Stale,
        })
    }

    /// A rebuild of generation `gen` of `sku` starts reading the ledger: from now on an
    /// acknowledgement is [`Ack::Late`]. Fails when the SKU was lost and recreated since.
    pub async fn start_reading(&self, sku: &str, gen: &str) -> Result<(), Error> {
        let args = vec!["read".into(), gen.into()];
        let reply = self.run(&SCRIPTS.sku, sku, args).await?;
        match tag(&reply) {
            "reading" | "done" => Ok(()),
            _ => Err(lost_again(sku)),
        }
    }

    /// Answers of a lost generation of `sku` were just written into the ledger, and the
    /// generation the engine has now may lack them: it stops serving clients and changing
    /// (its scripts answer `ERR_UNAVAILABLE`), so that its stream can be committed before
    /// the SKU is dropped ([`Inventory::drop_drained`]) and rebuilt from the ledger.
    /// Returns the generation draining now (also when it was already); `None` when the SKU
    /// is gone, or is being rebuilt and has not read the ledger yet (that rebuild reads
    /// them). A rebuild that reads already is drained: what it read may lack them.
    pub async fn drain(&self, sku: &str) -> Result<Option<String>, Error> {
        let reply = self.run(&SCRIPTS.sku, sku, vec!["drain".into()]).await?;
        Ok(match tag(&reply) {
            "draining" => reply.get(1).and_then(Reply::as_str).map(str::to_owned),
            _ => None,
        })
    }

    /// Deletes every key of `sku` if generation `gen` is draining, as a loss of the
    /// engine's data would; the SKU is then rebuilt from the ledger like any lost one.
    /// Returns whether the SKU is gone (also when it was gone already).
    pub async fn drop_drained(&self, sku: &str, gen: &str) -> Result<bool, Error> {
        let args = vec!["drop".into(), gen.into()];
        let reply = self.run(&SCRIPTS.sku, sku, args).await?;
        Ok(matches!(tag(&reply), "dropped" | "no_sku"))
    }

    /// Creates or updates a SKU; returns the generation it was created with, or `None` when
    /// it existed.
    async fn put_sku_as(
        &self,
        sku: &str,
        config: &SkuConfig,
        loading: bool,
        floor: Option<StreamId>,
    ) -> Result<Option<String>, Error> {
        let gen = hex::encode(rand::random::<[u8; 8]>());
        let json = serde_json::to_string(config)
            .map_err(|e| Error::Internal(format!("encoding SKU settings: {e}")))?;
        let args = vec![
            "put".into(),
            json,
            config.per_user_limit.to_string(),
            if config.allow_late_confirm { "1" } else { "0" }.into(),
            config.max_issues.to_string(),
            config.max_uses.to_string(),
            self.now_ms().to_string(),
            // A fresh generation each time the SKU is created in an engine (see emit).
            gen.clone(),
            if loading { "1" } else { "0" }.into(),
            floor.map(|id| id.to_string()).unwrap_or_default(),
        ];
        // Registered first: the hold sweep and retention find SKUs through the registry,
        // and a SKU created but left unregistered (the engine failing between the two
        // calls) would keep its lapsed holds until the next full sync registered it. A
        // SKU registered but then not created is one the ledger has (settings go there
        // first): the sweep finding it missing asks for the sync that creates it.
        self.register_skus(&[sku.to_owned()]).await?;
        let reply = self.run(&SCRIPTS.sku, sku, args).await?;
        Ok((tag(&reply) == "created").then_some(gen))
    }

    /// Adds SKUs to the engine's registry, which [`Inventory::list_skus`] reads; SKUs
    /// registered already stay as they are.
    pub async fn register_skus(&self, skus: &[String]) -> Result<(), Error> {
        if skus.is_empty() {
            return Ok(());
        }
        let mut args = Vec::with_capacity(1 + skus.len());
        args.push("register".to_owned());
        args.extend(skus.iter().cloned());
        self.eval(&SCRIPTS.index, vec![REGISTRY.into()], args)
            .await?;
        Ok(())
    }

    /// A SKU's settings, or `None` if it does not exist.
    pub async fn get_sku(&self, sku: &str) -> Result<Option<SkuConfig>, Error> {
        Ok(self.sku_state(sku).await?.map(|s| s.config))
    }

    /// A SKU as the engine holds it, or `None` if the engine lacks it.
    pub async fn sku_state(&self, sku: &str) -> Result<Option<EngineSku>, Error> {
        let reply = self.run(&SCRIPTS.sku, sku, vec!["get".into()]).await?;
        let text = |i: usize| reply.get(i).and_then(Reply::as_str).unwrap_or("");
        match tag(&reply) {
            "no_sku" => Ok(None),
            json => Ok(Some(EngineSku {
                config: serde_json::from_str(json)
                    .map_err(|e| Error::Internal(format!("stored settings of SKU {sku}: {e}")))?,
                gen: text(1).to_owned(),
                loading: text(2) == "1",
                draining: text(2) == "2",
                created_at_ms: text(3).parse().unwrap_or(0),
                acks: text(4)
                    .split(',')
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })),
        }
    }

    /// The epoch marker the engine holds for `sku` (`""` if none), or `None` if the engine
    /// lacks the SKU.
    pub async fn epoch(&self, sku: &str) -> Result<Option<String>, Error> {
        let reply = self.run(&SCRIPTS.sku, sku, vec!["epoch".into()]).await?;
        Ok(match tag(&reply) {
            "no_sku" => None,
            epoch => Some(epoch.to_owned()),
        })
    }

    /// Writes the epoch marker of `sku` into the engine.
    pub async fn mark_epoch(&self, sku: &str, epoch: &str) -> Result<(), Error> {
        self.run(&SCRIPTS.sku, sku, vec!["mark".into(), epoch.into()])
            .await
            .map(|_| ())
    }

    /// Every SKU ever created.
    pub async fn list_skus(&self) -> Result<Vec<String>, Error> {
        let reply = self
            .eval(&SCRIPTS.index, vec![REGISTRY.into()], vec!["list".into()])
            .await?;
        let mut skus: Vec<String> = reply
            .as_array()
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect();
        skus.sort();
        Ok(skus)
    }

    /// Adds codes to a SKU's inventory (one script call: keep `codes` to a few hundred) and
    /// to the global index. Codes the SKU already has are reported, not added again.
    ///
    /// Ids are taken from the SKU's sequence first, since a sealed code is bound to its key
    /// id: a code found to be a duplicate leaves its id unused.
    pub async fn add_codes(&self, sku: &str, codes: &[NewCode]) -> Result<Vec<Added>, Error> {
        if codes.is_empty() {
            return Ok(Vec::new());
        }
        let reply = self
            .run(
                &SCRIPTS.sku,
                sku,
                vec!["reserve".into(), codes.len().to_string()],
            )
            .await?;
        let last = match (tag(&reply), reply.get(1).and_then(Reply::as_i64)) {
            ("reserved", Some(last)) => last,
            ("no_sku", _) => return Err(Error::NotFound(format!("SKU {sku}"))),
            _ => return Err(unexpected("sku", &Reply::Array(reply))),
        };
        let first = last + 1 - codes.len() as i64;
        let keyring = self.keyring();
        let mut args = Vec::with_capacity(1 + codes.len() * 4);
        args.push(self.now_ms().to_string());
        for (id, code) in (first..).zip(codes) {
            let id = id.to_string();
            let sealed = keyring.seal(sku, &id, &code.canonical);
            args.extend([
                id,
                keyring.digest(&code.canonical),
                sealed,
                code.expires_at_ms.unwrap_or(0).to_string(),
            ]);
        }
        let reply = self.run(&SCRIPTS.add, sku, args).await?;
        if tag(&reply) == "no_sku" {
            return Err(Error::NotFound(format!("SKU {sku}")));
        }
        if reply.len() != codes.len() {
            return Err(Error::Internal(format!(
                "add.lua answered {} entries for {} codes",
                reply.len(),
                codes.len()
            )));
        }
        let added = reply
            .iter()
            .map(|r| match r.as_str().unwrap_or_default() {
                dup if dup.starts_with('=') => Added::Duplicate(key_id(sku, &dup[1..])),
                new => Added::New(key_id(sku, new)),
            })
            .collect();
        let folded: Vec<String> = codes
            .iter()
            .map(|c| index_digest(&keyring, &c.canonical))
            .collect();
        self.index(sku, &folded).await?;
        Ok(added)
    }

    /// Points the global index at `sku` for these digests. Idempotent; run again for
    /// duplicates too, so a retried import repairs an index write that failed before.
    async fn index(&self, sku: &str, digests: &[String]) -> Result<(), Error> {
        self.index_op("set", sku, digests).await
    }

    /// Removes global index entries `digests` while they still point at `sku` (a rekey
    /// moving the index to keyed digests).
    pub(crate) async fn unindex(&self, sku: &str, digests: &[String]) -> Result<(), Error> {
        self.index_op("del", sku, digests).await
    }

    /// Runs `index.lua`'s `op` for `digests` of `sku`, one call per index shard.
    async fn index_op(&self, op: &str, sku: &str, digests: &[String]) -> Result<(), Error> {
        let mut shards: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for d in digests {
            let args = shards
                .entry(index_shard(d))
                .or_insert_with(|| vec![op.to_owned()]);
            args.push(d.clone());
            args.push(sku.to_owned());
        }
        // The shards are independent keys (on a cluster, other nodes): one round trip for
        // all of them instead of one after the other.
        futures_util::future::try_join_all(
            shards
                .into_iter()
                .map(|(shard, args)| self.eval(&SCRIPTS.index, vec![shard], args)),
        )
        .await?;
        Ok(())
    }

    /// Which SKU holds `raw` (as sent by a client), through the global index.
    /// `ERR_UNAVAILABLE` while the index shard is not known to be complete (the engine lost
    /// it and the gateway is rebuilding it): "no such code" would be a guess.
    pub async fn locate(&self, raw: &str) -> Result<Option<String>, Error> {
        let digest = index_digest(&self.keyring(), raw);
        let digest = digest.as_str();
        let reply = self
            .eval(
                &SCRIPTS.index,
                vec![index_shard(digest)],
                vec!["get".into(), digest.into()],
            )
            .await?;
        let item = |i: usize| reply.item(i).and_then(Reply::as_str);
        if item(1) != Some("1") {
            return Err(Error::Unavailable(
                "the code index is being restored from the ledger; retry shortly".into(),
            ));
        }
        Ok(item(0).filter(|s| !s.is_empty()).map(str::to_owned))
    }

    /// Whether every shard of the global index is known to be complete.
    pub async fn index_ready(&self) -> Result<bool, Error> {
        for shard in index_shards() {
            let reply = self
                .eval(&SCRIPTS.index, vec![shard], vec!["ready?".into()])
                .await?;
            if reply.as_i64() != Some(1) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Where every shard of the global index stands before a sync pass indexes anything:
    /// complete, or in a rebuild named by a token the shard keeps until it loses its data.
    /// A shard not complete gets a fresh token unless a rebuild already named it (two
    /// gateways rebuilding the index at once share one).
    pub async fn watch_index(&self) -> Result<IndexWatch, Error> {
        let candidate = hex::encode(rand::random::<[u8; 8]>());
        let mut rebuilding = Vec::new();
        for shard in index_shards() {
            let reply = self
                .eval(
                    &SCRIPTS.index,
                    vec![shard.clone()],
                    vec!["since".into(), candidate.clone()],
                )
                .await?;
            let item = |i: usize| reply.item(i).and_then(Reply::as_str);
            if item(0) != Some("1") {
                let token = item(1).ok_or_else(|| {
                    Error::Internal(format!("index.lua since: unexpected reply {reply:?}"))
                })?;
                rebuilding.push((shard, token.to_owned()));
            }
        }
        Ok(IndexWatch { rebuilding })
    }

    /// Marks complete the shards `watch` found in a rebuild: call only once every SKU's codes
    /// are indexed (again) since. A shard that lost its data meanwhile is not marked (what
    /// was indexed before the loss went with it). Returns whether every shard is complete.
    pub async fn mark_index_ready(&self, watch: &IndexWatch) -> Result<bool, Error> {
        let mut all = true;
        for (shard, token) in &watch.rebuilding {
            let reply = self
                .eval(
                    &SCRIPTS.index,
                    vec![shard.clone()],
                    vec!["ready".into(), token.clone()],
                )
                .await?;
            all &= reply.as_i64() == Some(1);
        }
        Ok(all)
    }

    /// Claims codes for an order, or replays the answer to an earlier identical claim.
    pub async fn claim(&self, sku: &str, req: &ClaimRequest) -> Result<Order, Error> {
        self.claim_checked(sku, req).await.0
    }

    /// Like [`Inventory::claim`], and tells whether an `ERR_SOLD_OUT` meant that nothing at
    /// all was left (`true`), as opposed to fewer codes than the claim asked for: only the
    /// former may be remembered as "sold out" for every order.
    ///
    /// Concurrent claims of one SKU go to the engine together (see the `coalesce` module).
    pub async fn claim_checked(
        &self,
        sku: &str,
        req: &ClaimRequest,
    ) -> (Result<Order, Error>, bool) {
        self.coalesced(sku, req).await
    }

    /// One claim in one `claim.lua` call.
    async fn claim_alone(&self, sku: &str, req: &ClaimRequest) -> (Result<Order, Error>, bool) {
        let now = self.now_ms().to_string();
        let args = vec![
            req.order_id.clone(),
            req.quantity.to_string(),
            req.user_id.clone().unwrap_or_default(),
            req.hold_ms.unwrap_or(0).to_string(),
            now.clone(),
            req.pool.channel.clone(),
            req.pool.share_arg(),
        ];
        let mut fresh = args.clone();
        fresh.push("1".into());
        let reply = match self
            .run_order(&SCRIPTS.claim, sku, &req.order_id, args, Some(fresh))
            .await
        {
            Ok(reply) => reply,
            Err(e) => return (Err(e), false),
        };
        let exhausted =
            tag(&reply) == "sold_out" && reply.get(1).and_then(Reply::as_i64) == Some(0);
        let sent = ClaimEvent::of(req, &now);
        (
            self.order_result(sku, &req.order_id, &reply, Some(&sent)),
            exhausted,
        )
    }

    /// Claims for several orders of one SKU in one script call: each answer (and whether its
    /// `ERR_SOLD_OUT` meant nothing at all was left) in the order of `requests`, exactly as
    /// [`Inventory::claim_checked`] would give it for that order alone.
    pub async fn claim_batch(
        &self,
        sku: &str,
        requests: &[ClaimRequest],
    ) -> Result<Vec<(Result<Order, Error>, bool)>, Error> {
        let mut args = Vec::with_capacity(1 + requests.len() * 6);
        let now = self.now_ms().to_string();
        args.push(now.clone());
        for req in requests {
            args.extend([
                req.order_id.clone(),
                req.quantity.to_string(),
                req.user_id.clone().unwrap_or_default(),
                req.hold_ms.unwrap_or(0).to_string(),
                req.pool.channel.clone(),
                req.pool.share_arg(),
            ]);
        }
        let reply = self.run(&SCRIPTS.claims_batch, sku, args).await?;
        if matches!(tag(&reply), "no_sku" | "loading") {
            return Err(rebuilding(sku));
        }
        if reply.len() != requests.len() {
            return Err(unexpected("claims_batch", &Reply::Array(reply)));
        }
        let mut answers = Vec::with_capacity(requests.len());
        for (req, one) in requests.iter().zip(&reply) {
            let one = one.as_array().unwrap_or_default();
            if tag(one) == "moved" {
                // Retired: restored from the ledger and asked again on its own.
                answers.push(self.claim_alone(sku, req).await);
                continue;
            }
            let exhausted = tag(one) == "sold_out" && one.get(1).and_then(Reply::as_i64) == Some(0);
            let sent = ClaimEvent::of(req, &now);
            answers.push((
                self.order_result(sku, &req.order_id, one, Some(&sent)),
                exhausted,
            ));
        }
        Ok(answers)
    }

    /// Turns a hold into a final claim (payment arrived). A late confirm draws fresh codes
    /// as its channel's claims do: `share` says whether the shared remainder may cover what
    /// the channel's pool cannot.
    pub async fn confirm(&self, sku: &str, order_id: &str, share: bool) -> Result<Order, Error> {
        let share = if share { "1" } else { "0" };
        let args = vec![
            order_id.to_owned(),
            self.now_ms().to_string(),
            share.to_owned(),
        ];
        let reply = self
            .run_order(&SCRIPTS.confirm, sku, order_id, args, None)
            .await?;
        self.order_result(sku, order_id, &reply, None)
    }

    /// Cancels a hold: its codes go back to inventory.
    pub async fn release(&self, sku: &str, order_id: &str) -> Result<Order, Error> {
        let args = vec![order_id.to_owned(), self.now_ms().to_string()];
        let reply = self
            .run_order(&SCRIPTS.release, sku, order_id, args, None)
            .await?;
        self.order_result(sku, order_id, &reply, None)
    }

    /// A SKU's stock pools: the codes available, the shared remainder, and each channel's
    /// reservation.
    pub async fn pools(&self, sku: &str) -> Result<PoolLevels, Error> {
        let reply = self.run(&SCRIPTS.pool, sku, vec!["levels".into()]).await?;
        match tag(&reply) {
            "levels" => {}
            "no_sku" | "loading" => return Err(rebuilding(sku)),
            _ => return Err(unexpected("pool", &Reply::Array(reply))),
        }
        let n = |r: &Reply| r.as_i64().unwrap_or(0).max(0) as u64;
        Ok(PoolLevels {
            available: reply.get(1).map_or(0, n),
            shared: reply.get(2).map_or(0, n),
            pools: reply
                .get(3..)
                .unwrap_or_default()
                .chunks_exact(2)
                .map(|p| (p[0].as_str().unwrap_or("").to_owned(), n(&p[1])))
                .filter(|(_, level)| *level > 0)
                .collect(),
        })
    }

    /// Sets `channel`'s pool of `sku` to `count` codes, taking the difference from the
    /// shared remainder or giving it back; audited as `by` for `reason`.
    pub async fn set_pool(
        &self,
        sku: &str,
        channel: &str,
        count: u64,
        by: &str,
        reason: &str,
    ) -> Result<PoolChange, Error> {
        let args = vec![
            "set".into(),
            channel.to_owned(),
            count.to_string(),
            self.now_ms().to_string(),
            by.to_owned(),
            reason.to_owned(),
        ];
        let reply = self.run(&SCRIPTS.pool, sku, args).await?;
        pool_change(sku, "", &reply)
    }

    /// Moves `count` codes of `sku` from one pool to another (`None`: the shared
    /// remainder), only if `from` holds `expected` codes when it says so.
    #[allow(clippy::too_many_arguments)]
    pub async fn move_pool(
        &self,
        sku: &str,
        from: Option<&str>,
        to: Option<&str>,
        count: u64,
        by: &str,
        reason: &str,
        expected: Option<u64>,
    ) -> Result<PoolChange, Error> {
        let from = from.unwrap_or("");
        let args = vec![
            "move".into(),
            from.to_owned(),
            to.unwrap_or("").to_owned(),
            count.to_string(),
            self.now_ms().to_string(),
            by.to_owned(),
            reason.to_owned(),
            expected.map(|n| n.to_string()).unwrap_or_default(),
        ];
        let reply = self.run(&SCRIPTS.pool, sku, args).await?;
        pool_change(sku, from, &reply)
    }

    /// An order's current state.
    pub async fn order(&self, sku: &str, order_id: &str) -> Result<Order, Error> {
        let args = vec![order_id.to_owned(), self.now_ms().to_string()];
        let reply = self
            .run_order(&SCRIPTS.order, sku, order_id, args, None)
            .await?;
        let mut order = self.order_result(sku, order_id, &reply, None)?;
        order.replayed = false;
        Ok(order)
    }

    /// Redeems the code with canonical form `canonical` in `sku` for `redeemer`.
    pub async fn redeem(
        &self,
        sku: &str,
        canonical: &str,
        redeemer: &str,
    ) -> Result<Redemption, Error> {
        let only = Candidate {
            version: 0,
            canonical: canonical.to_owned(),
        };
        self.redeem_any(sku, std::slice::from_ref(&only), redeemer, None)
            .await
    }

    /// Redeems, for `redeemer`, the code whose canonical form under one of the SKU's format
    /// versions is among `candidates` (see [`SkuConfig::candidates`]): one script call,
    /// whichever version the code belongs to.
    ///
    /// With `paused`, redemptions are paused: every answer is as usual except that a
    /// redemption that would be new is not made and answered with `paused` instead.
    pub async fn redeem_any(
        &self,
        sku: &str,
        candidates: &[Candidate],
        redeemer: &str,
        paused: Option<&Error>,
    ) -> Result<Redemption, Error> {
        let request = coalesce::RedeemRequest {
            candidates: candidates.to_vec(),
            redeemer: redeemer.to_owned(),
            paused: paused.cloned(),
        };
        // Concurrent redemptions of one SKU go to the engine together (see `coalesce`).
        self.coalesced(sku, &request).await
    }

    /// One redemption in one `redeem.lua` call.
    async fn redeem_alone(
        &self,
        sku: &str,
        req: &coalesce::RedeemRequest,
    ) -> Result<Redemption, Error> {
        let now = self.now_ms().to_string();
        let mut args = Vec::with_capacity(3 + req.candidates.len());
        args.push(req.redeemer.clone());
        args.push(now.clone());
        args.push(if req.paused.is_some() { "1" } else { "0" }.to_owned());
        let keyring = self.keyring();
        args.extend(req.candidates.iter().map(|c| keyring.digest(&c.canonical)));
        let reply = self.run(&SCRIPTS.redeem, sku, args).await?;
        redemption_result(sku, req, &now, &reply)
    }

    /// Several redemptions of one SKU in one `redeems_batch.lua` call: each answer in the
    /// order of `requests`, exactly as [`Inventory::redeem_any`] would give it for that
    /// redemption alone after the ones before it.
    async fn redeem_batch(
        &self,
        sku: &str,
        requests: &[coalesce::RedeemRequest],
    ) -> Result<Vec<Result<Redemption, Error>>, Error> {
        let now = self.now_ms().to_string();
        let keyring = self.keyring();
        let mut args = Vec::with_capacity(1 + requests.len() * 4);
        args.push(now.clone());
        for req in requests {
            args.push(req.redeemer.clone());
            args.push(if req.paused.is_some() { "1" } else { "0" }.to_owned());
            args.push(req.candidates.len().to_string());
            args.extend(req.candidates.iter().map(|c| keyring.digest(&c.canonical)));
        }
        let reply = self.run(&SCRIPTS.redeems_batch, sku, args).await?;
        if matches!(tag(&reply), "no_sku" | "loading") {
            return Err(rebuilding(sku));
        }
        if reply.len() != requests.len() {
            return Err(unexpected("redeems_batch", &Reply::Array(reply)));
        }
        Ok(requests
            .iter()
            .zip(&reply)
            .map(|(req, one)| redemption_result(sku, req, &now, one.as_array().unwrap_or_default()))
            .collect())
    }

    /// The engine work of redeeming a code the global index does not know: the redemption
    /// script, run against a SKU that cannot exist (its name holds `:`), where the digest
    /// finds nothing, as it finds no sold key for an unsold code. A code the index knows
    /// costs that same script call, so the time an answer takes does not tell a prober
    /// which codes exist; concurrent ones are coalesced as redemptions are. The decoy SKU is
    /// chosen by the code's index shard, so on Redis Cluster these calls spread over slots
    /// like the index lookups do.
    pub async fn redeem_unknown(&self, raw: &str, redeemer: &str) -> Result<(), Error> {
        let digest = index_digest(&self.keyring(), raw);
        let decoy = format!(":unknown{}", digest_shard(&digest));
        let request = coalesce::DecoyRequest {
            redeemer: redeemer.to_owned(),
            digest,
        };
        self.coalesced(&decoy, &request).await
    }

    /// The decoy calls of `requests` against `decoy`: `redeem.lua` for one, else
    /// `redeems_batch.lua`, as a redemption of a real SKU would be.
    async fn decoys(&self, decoy: &str, requests: &[coalesce::DecoyRequest]) -> Result<(), Error> {
        let now = self.now_ms().to_string();
        let (script, args) = match requests {
            [only] => (
                &SCRIPTS.redeem,
                vec![only.redeemer.clone(), now, "0".into(), only.digest.clone()],
            ),
            _ => {
                let mut args = Vec::with_capacity(1 + requests.len() * 4);
                args.push(now);
                for req in requests {
                    args.extend([req.redeemer.clone(), "0".into(), "1".into()]);
                    args.push(req.digest.clone());
                }
                (&SCRIPTS.redeems_batch, args)
            }
        };
        // Not `run`: the decoy is missing on purpose, which is no sign of a lost SKU.
        let reply = self.eval(script, sku_keys(decoy), args).await?;
        let items = reply.as_array().unwrap_or_default();
        match tag(items) {
            "no_sku" | "invalid" => Ok(()),
            _ => Err(unexpected(script.name(), &reply)),
        }
    }

    /// Keys of a SKU by state.
    pub async fn counts(&self, sku: &str) -> Result<Counts, Error> {
        let reply = self.run(&SCRIPTS.counts, sku, vec![]).await?;
        if matches!(tag(&reply), "no_sku" | "loading") {
            return Err(rebuilding(sku));
        }
        let n = |i: usize| reply.get(i).and_then(Reply::as_i64).unwrap_or(0).max(0) as u64;
        Ok(Counts {
            available: n(0),
            held: n(1),
            claimed: n(2),
            redeemed: n(3),
            void: n(4),
        })
    }

    /// Lapses up to `limit` due holds. Returns how many lapsed and whether more are due.
    pub async fn expire_due(&self, sku: &str, limit: u64) -> Result<(u64, bool), Error> {
        let args = vec![self.now_ms().to_string(), limit.to_string()];
        let reply = self.run(&SCRIPTS.expire, sku, args).await?;
        let n = |i: usize| reply.get(i).and_then(Reply::as_i64).unwrap_or(0).max(0) as u64;
        Ok((n(0), n(1) > 0))
    }

    /// Voids a key. Returns its state before, or `None` if it was already void.
    pub async fn void(&self, key_id: &str, reason: &str) -> Result<Option<String>, Error> {
        Ok(self.void_change(key_id, reason).await?.map(|c| c.state))
    }

    /// Undoes a void. Returns its state after, or `None` if it was not void.
    pub async fn restore(&self, key_id: &str, reason: &str) -> Result<Option<String>, Error> {
        Ok(self.restore_change(key_id, reason).await?.map(|c| c.state))
    }

    /// Voids a key: the change (with the key's state before), or `None` if it was void.
    pub async fn void_change(
        &self,
        key_id: &str,
        reason: &str,
    ) -> Result<Option<KeyChange>, Error> {
        self.key_change(&SCRIPTS.void, key_id, reason).await
    }

    /// Undoes a void: the change (with the key's state after), or `None` if it was not void.
    pub async fn restore_change(
        &self,
        key_id: &str,
        reason: &str,
    ) -> Result<Option<KeyChange>, Error> {
        self.key_change(&SCRIPTS.restore, key_id, reason).await
    }

    /// Turns an order reply into an [`Order`] whose codes are opened, ready to answer: the
    /// one place the engine's sealed codes are revealed. A code that does not open fails
    /// the whole answer (nothing is handed out), counted and logged by its key id.
    fn order_result(
        &self,
        sku: &str,
        order_id: &str,
        reply: &[Reply],
        claim: Option<&ClaimEvent>,
    ) -> Result<Order, Error> {
        let mut order = order_result(sku, order_id, reply, claim)?;
        if order.keys.iter().all(|k| k.code.is_none()) {
            return Ok(order);
        }
        let mut keyring = self.keyring();
        for key in &mut order.keys {
            let Some(stored) = key.code.as_deref() else {
                continue;
            };
            let local = parse_key_id(&key.key_id).map_or("", |(_, local)| local);
            let mut opened = keyring.open(sku, local, stored);
            if let Err(crate::secrets::OpenError::UnknownKey(_)) = opened {
                // Sealed under a key added since this keyring was read: read it again once.
                if let Some(newer) = self.keyring_newer_than(&keyring) {
                    keyring = newer;
                    opened = keyring.open(sku, local, stored);
                }
            }
            match opened {
                Ok(code) => key.code = Some(code),
                Err(e) => return Err(open_failed(&keyring, &key.key_id, &e)),
            }
        }
        Ok(order)
    }

    async fn key_change(
        &self,
        script: &'static Script,
        key: &str,
        reason: &str,
    ) -> Result<Option<KeyChange>, Error> {
        let not_found = || Error::NotFound(format!("key {key}"));
        let (sku, local) = parse_key_id(key).ok_or_else(not_found)?;
        let args = vec![
            local.to_owned(),
            reason.to_owned(),
            self.now_ms().to_string(),
        ];
        let reply = self.run(script, sku, args).await?;
        match tag(&reply) {
            "new" => {
                let text = |i: usize| reply.get(i).and_then(Reply::as_str).unwrap_or("");
                let event_id = Some(text(3)).filter(|s| !s.is_empty()).map(str::to_owned);
                Ok(Some(KeyChange {
                    state: text(1).to_owned(),
                    emitted: Emitted::from_reply(reply.get(2), event_id.as_deref()),
                    event_id,
                }))
            }
            "replay" => Ok(None),
            "not_found" => Err(not_found()),
            "no_sku" | "loading" => Err(rebuilding(sku)),
            _ => Err(unexpected(script.name(), &Reply::Array(reply.clone()))),
        }
    }
}

/// The global index's shards as a sync pass found them ([`Inventory::watch_index`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexWatch {
    /// The shards not complete, each with the token of its rebuild.
    rebuilding: Vec<(String, String)>,
}

impl IndexWatch {
    /// Whether every shard was complete.
    pub fn ready(&self) -> bool {
        self.rebuilding.is_empty()
    }
}

/// The global index's digest: of the code folded so that any SKU format's canonical form
/// and any way a client may type it agree (upper case, no spaces or dashes, look-alikes
/// O→0, I/L→1). Folding may merge distinct codes; the SKU's own index then decides.
fn index_digest(keyring: &Keyring, code: &str) -> String {
    keyring.digest(&fold(code))
}

/// A code folded for the global index (see [`index_digest`]).
fn fold(code: &str) -> String {
    code.chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            other => other,
        })
        .collect()
}

/// Counts and logs a stored code that did not open, and gives the answer for it: an
/// internal error, never the text that did not open. Names the key and the data key, never
/// the code.
pub fn open_failed(keyring: &Keyring, key_id: &str, e: &crate::secrets::OpenError) -> Error {
    count_open_failure(keyring, e);
    tracing::error!(
        key_id,
        data_key = e.key_id(),
        "a stored code {e}; it is not handed out"
    );
    Error::Internal(format!(
        "the stored code of key {key_id} {e}; it was not handed out"
    ))
}

/// Counts a sealed text that did not open, by the data key it names.
pub(crate) fn count_open_failure(keyring: &Keyring, e: &crate::secrets::OpenError) {
    // A label only for the keyring's own ids: a tampered text could name any id at all.
    let data_key = if keyring.data_ids().contains(&e.key_id()) {
        e.key_id()
    } else {
        "unknown"
    };
    crate::metrics::decrypt_failure(data_key);
}

/// Validates and canonicalises a code under a SKU's format.
pub fn canonical(format: &Format, raw: &str) -> Result<String, Error> {
    format.validate(raw).map_err(Error::CardMalformed)
}

/// A redemption's answer from its `redeem.lua` reply (or its part of a `redeems_batch.lua`
/// reply), for `req` sent at `now`.
fn redemption_result(
    sku: &str,
    req: &coalesce::RedeemRequest,
    now: &str,
    reply: &[Reply],
) -> Result<Redemption, Error> {
    let field = |i: usize| reply.get(i).and_then(Reply::as_i64).unwrap_or(0) as u64;
    let unknown = || unexpected("redeem", &Reply::Array(reply.to_vec()));
    match tag(reply) {
        t @ ("new" | "replay") => {
            let event_id = reply
                .get(3)
                .and_then(Reply::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
            let matched = field(5) as usize;
            let local = reply.get(1).and_then(Reply::as_str).unwrap_or("");
            let emitted = match short_event(reply.get(4)) {
                // The redemption's event in short: rebuilt from what was sent.
                Some((stream_id, uses)) => {
                    let answer_id = event_id.as_deref().ok_or_else(unknown)?;
                    let sent = RedeemEvent {
                        key: local,
                        redeemer: &req.redeemer,
                        now,
                    };
                    Some(sent.entry(answer_id, stream_id, uses))
                }
                None => Emitted::from_reply(reply.get(4), event_id.as_deref()),
            };
            Ok(Redemption {
                sku: sku.to_owned(),
                key_id: key_id(sku, local),
                redeemed_at_ms: field(2),
                replayed: t == "replay",
                emitted,
                event_id,
                format_version: matched
                    .checked_sub(1)
                    .and_then(|i| req.candidates.get(i))
                    .map(|c| c.version),
            })
        }
        "no_sku" | "loading" => Err(rebuilding(sku)),
        "paused" => Err(req.paused.clone().ok_or_else(unknown)?),
        "invalid" => Err(Error::CardInvalid),
        "used" => Err(Error::CardUsed {
            redeemed_at_ms: field(1),
            masked_redeemer: mask(reply.get(2).and_then(Reply::as_str).unwrap_or("")),
        }),
        "expired" => Err(Error::CardExpired {
            expires_at_ms: field(1),
        }),
        _ => Err(unknown()),
    }
}

fn tag(reply: &[Reply]) -> &str {
    reply.first().and_then(Reply::as_str).unwrap_or("")
}

fn unexpected(script: &str, reply: &Reply) -> Error {
    // Replies carry codes: log only their shape.
    let shape = match reply {
        Reply::Array(items) => format!("array of {}", items.len()),
        Reply::Nil => "nil".into(),
        Reply::Int(_) => "integer".into(),
        Reply::Bulk(_) => "string".into(),
        Reply::Status(_) => "status".into(),
    };
    Error::Internal(format!("{script}.lua gave an unexpected reply ({shape})"))
}

/// A SKU's stock pools ([`Inventory::pools`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLevels {
    /// Codes available to be issued.
    pub available: u64,
    /// Those no pool reserves.
    pub shared: u64,
    /// Each channel's reservation (only those above 0), by channel.
    pub pools: std::collections::BTreeMap<String, u64>,
}

/// What a pool change did ([`Inventory::set_pool`], [`Inventory::move_pool`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolChange {
    /// The level of the pool codes came from (for a set: the shared remainder), after.
    pub from_level: u64,
    /// The level of the pool codes went to (for a set: the channel's), after.
    pub to_level: u64,
    /// Codes moved (for a set: into the channel's pool; negative when it shrank).
    pub moved: i64,
    /// Answer id of its event, for `durability = "ledger"`. When nothing changed, that of
    /// the SKU's last change of a pool while the engine's stream has it (the level found may
    /// stand on it), else `None`.
    pub event_id: Option<String>,
    pub emitted: Option<Emitted>,
}

fn pool_change(sku: &str, from: &str, reply: &[Reply]) -> Result<PoolChange, Error> {
    let n = |i: usize| reply.get(i).and_then(Reply::as_i64).unwrap_or(0);
    let name = if from.is_empty() {
        "the shared remainder".to_owned()
    } else {
        format!("the pool of {from}")
    };
    match tag(reply) {
        "done" => {}
        "short" => {
            return Err(Error::PoolConflict {
                message: format!("{name} holds {} codes, fewer than asked", n(1)),
                level: n(1).max(0) as u64,
            })
        }
        "changed" => {
            return Err(Error::PoolConflict {
                message: format!("{name} holds {} codes, not the count expected", n(1)),
                level: n(1).max(0) as u64,
            })
        }
        "no_sku" | "loading" => return Err(rebuilding(sku)),
        _ => return Err(unexpected("pool", &Reply::Array(reply.to_vec()))),
    }
    let event_id = reply
        .get(4)
        .and_then(Reply::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    Ok(PoolChange {
        from_level: n(1).max(0) as u64,
        to_level: n(2).max(0) as u64,
        moved: n(3),
        emitted: Emitted::from_reply(reply.get(5), event_id.as_deref()),
        event_id,
    })
}

/// What a claim sent `claim.lua` or `claims_batch.lua`: a new claim's reply reports its
/// event in short, `{stream id, pooled}` (see `EMITTED` in `lua/prelude.lua`), and the entry
/// is rebuilt from this, the reply's state, expiry and key ids. The script wrote the
/// strings into the stream as received and the numbers as `%d` of the number, which is the
/// decimal text the gateway sent, so the rebuilt entry is the stream's, byte for byte.
struct ClaimEvent<'a> {
    order: &'a str,
    user: &'a str,
    qty: u64,
    hold_ms: u64,
    now: &'a str,
    pool: &'a str,
}

impl<'a> ClaimEvent<'a> {
    /// `req` as `claim_alone` and `claim_batch` send it, at `now` (the text sent).
    fn of(req: &'a ClaimRequest, now: &'a str) -> ClaimEvent<'a> {
        ClaimEvent {
            order: &req.order_id,
            user: req.user_id.as_deref().unwrap_or(""),
            qty: req.quantity,
            hold_ms: req.hold_ms.unwrap_or(0),
            now,
            pool: &req.pool.channel,
        }
    }

    /// The entry `append` wrote in `claim_order` (lua/prelude.lua), fields in its order.
    fn entry(&self, answer_id: &str, stream_id: &str, pooled: &str, reply: &[Reply]) -> Emitted {
        let state = reply.get(1).and_then(Reply::as_str);
        let kind = if state == Some("held") {
            "hold"
        } else {
            "claim"
        };
        let expires_at = reply.get(2).and_then(Reply::as_i64).unwrap_or(0);
        let ids = reply
            .get(6..)
            .unwrap_or_default()
            .iter()
            .step_by(2)
            .map(|id| id.as_str().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(",");
        let gen = answer_id.rsplit_once(':').map_or("", |(g, _)| g);
        let field = |name: &str, value: &str| (name.to_owned(), value.to_owned());
        Emitted {
            answer_id: format!("{gen}:{stream_id}"),
            fields: vec![
                field("t", kind),
                field("at", self.now),
                field("order", self.order),
                field("user", self.user),
                ("ids".to_owned(), ids),
                ("expires_at".to_owned(), expires_at.to_string()),
                ("hold_ms".to_owned(), self.hold_ms.to_string()),
                ("qty".to_owned(), self.qty.to_string()),
                field("pool", self.pool),
                field("pooled", pooled),
            ],
            before: Vec::new(),
        }
    }
}

/// What a redemption sent `redeem.lua`: a new redemption's reply reports its event in
/// short, `{stream id, uses}`, rebuilt from this and the reply's key id as [`ClaimEvent`]
/// rebuilds a claim's.
struct RedeemEvent<'a> {
    /// The key's id within its SKU, as the reply names it.
    key: &'a str,
    redeemer: &'a str,
    now: &'a str,
}

impl RedeemEvent<'_> {
    /// The entry `redeem.lua` appended, fields in its order.
    fn entry(&self, answer_id: &str, stream_id: &str, uses: &str) -> Emitted {
        let gen = answer_id.rsplit_once(':').map_or("", |(g, _)| g);
        let field = |name: &str, value: &str| (name.to_owned(), value.to_owned());
        Emitted {
            answer_id: format!("{gen}:{stream_id}"),
            fields: vec![
                field("t", "redeem"),
                field("at", self.now),
                field("ids", self.key),
                field("redeemer", self.redeemer),
                field("uses", uses),
            ],
            before: Vec::new(),
        }
    }
}

/// An event reported in short: `{stream id, one value}`, two strings (a full entry has at
/// least five elements; a list of events holds lists).
fn short_event(event: Option<&Reply>) -> Option<(&str, &str)> {
    match event?.as_array()? {
        [stream_id, value] => stream_id.as_str().zip(value.as_str()),
        _ => None,
    }
}

/// Turns the order reply of claim/confirm/release/order into an [`Order`] or an error.
/// `claim`: what a claim sent, to rebuild a new claim's event from (see [`ClaimEvent`]).
fn order_result(
    sku: &str,
    order_id: &str,
    reply: &[Reply],
    claim: Option<&ClaimEvent>,
) -> Result<Order, Error> {
    // Clients know their orders by the id they sent, not by the channel-scoped one.
    let order_id = crate::channel::order_name(order_id);
    let replayed = match tag(reply) {
        "new" => false,
        "replay" | "found" => true,
        "sold_out" => return Err(Error::SoldOut),
        "conflict" => {
            return Err(Error::OrderConflict(format!(
                "order {order_id} exists with other parameters or can no longer change this way"
            )))
        }
        "user_limit" => {
            let n = |i: usize| reply.get(i).and_then(Reply::as_i64).unwrap_or(0).max(0) as u64;
            return Err(Error::UserLimit {
                current: n(1),
                limit: n(2),
            });
        }
        "not_found" => return Err(Error::NotFound(format!("order {order_id}"))),
        // The SKU's settings were found before the call (handlers check them first), so the
        // engine lost it since, or is rebuilding it: never judge stock from that.
        "no_sku" | "loading" => return Err(rebuilding(sku)),
        "hold_expired" => return Err(Error::HoldExpired),
        _ => return Err(unexpected("order", &Reply::Array(reply.to_vec()))),
    };
    let text = |i: usize| reply.get(i).and_then(Reply::as_str).unwrap_or("");
    let expires = reply.get(2).and_then(Reply::as_i64).unwrap_or(0);
    let state = text(1).to_owned();
    let event_id = reply
        .get(4)
        .and_then(Reply::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    // A new claim's event in short (a late confirm's two events are lists): rebuilt from
    // what the claim sent.
    let emitted = match short_event(reply.get(5)) {
        Some((stream_id, pooled)) => {
            let (Some(claim), Some(answer_id)) = (claim, event_id.as_deref()) else {
                return Err(unexpected("order", &Reply::Array(reply.to_vec())));
            };
            Some(claim.entry(answer_id, stream_id, pooled, reply))
        }
        None => Emitted::from_reply(reply.get(5), event_id.as_deref()),
    };
    let keys = reply
        .get(6..)
        .unwrap_or_default()
        .chunks(2)
        .map(|pair| {
            let code = pair.get(1).and_then(Reply::as_str).unwrap_or("");
            IssuedKey {
                key_id: key_id(sku, pair[0].as_str().unwrap_or("")),
                code: (!code.is_empty()).then(|| code.to_owned()),
            }
        })
        .collect();
    Ok(Order {
        order_id: order_id.to_owned(),
        sku: sku.to_owned(),
        hold_expires_at_ms: (state == "held" && expires > 0).then_some(expires as u64),
        state,
        keys,
        late: reply.get(3).and_then(Reply::as_i64) == Some(1),
        replayed,
        event_id,
        emitted,
    })
}

/// The answer while the engine lacks a SKU the gateway knows, or is rebuilding it from the
/// ledger: retry shortly. Never `ERR_NOT_FOUND` or `ERR_SOLD_OUT`, which buyers would take
/// for the end of the sale.
pub fn rebuilding(sku: &str) -> Error {
    Error::Unavailable(format!(
        "SKU {sku} is being restored from the ledger; retry shortly"
    ))
}

/// A rebuild step found its SKU lost and recreated since the rebuild began: the rebuild of
/// the new generation takes over.
pub fn lost_again(sku: &str) -> Error {
    Error::Unavailable(format!(
        "SKU {sku} was lost again while it was being restored; the newer restore goes on"
    ))
}
