//! The ledger: the durable record of every SKU, import batch and card key, and of every change
//! the engine made to them.
//!
//! # Why there is a ledger
//!
//! The engine (Redis or the embedded keyspace) is the hot, atomic working set: every claim and
//! redemption runs there, at flash-sale rates. It is not the record of truth: Redis may run
//! without persistence, fail over, or be flushed. The ledger is. Imports land here first and
//! are warmed into the engine from here ([`Ledger::keys_after`]); every change the engine makes
//! comes back as an event ([`Ledger::apply_events`]), so the ledger can rebuild the engine,
//! answer audits and measure drift.
//!
//! # What it promises
//!
//! - **Imports are all or nothing.** A batch's keys are invisible (to warm-up and counts) until
//!   it is activated, and an aborted batch leaves no keys behind. Re-sending a batch id is
//!   recognised ([`BatchStart::Existing`]), and a code already in the SKU is reported as a
//!   duplicate, never stored twice.
//! - **One upload fills a batch.** Each upload names itself with a token; while it is alive
//!   (see [`UPLOAD_LEASE_MS`], [`UPLOAD_OWNER_SILENT_MS`]) another upload of the same batch
//!   id is told so ([`BatchStart::InProgress`]) instead of being answered with counts it did
//!   not produce, and a presumed-dead upload taken over cannot write into its successor's
//!   batch. A presumed-dead upload's codes never count as the SKU's: the next upload of the
//!   SKU, under any batch id, clears them.
//! - **Events apply exactly once.** Stream delivery is at-least-once (a writer may crash between
//!   commit and acknowledgement); the ledger records each `event_id` in the same transaction as
//!   its effect, so a redelivered event changes nothing.
//! - **The same rules as the engine.** [`rules`] transcribes `lua/prelude.lua`; the ledger
//!   recomputes each key's state with it on every change, so engine and ledger counts agree.
//! - **Bounded memory.** Nothing loads a batch: activation and abort are single statements,
//!   warm-up pages by local id, counts are an indexed `GROUP BY`.
//! - **Retryable failures say so.** [`LedgerError::Unavailable`] (connection, I/O, lock
//!   timeouts, serialisation failures) may be retried; the others are not transient.
//!
//! # Layout
//!
//! - [`rules`]: the key state rules, pure, shared by both backends.
//! - `replay`: applying a batch of new events to the keys they name, in memory (pure).
//! - `sql`: the [`Ledger`] implementation, written once over sqlx for both backends (the schema
//!   is column-for-column identical; only locking and transaction start differ).
//! - `sqlite`, `postgres`: connecting, pool shape, pragmas and migrations of each backend.
//! - [`stream`]: turning an engine stream entry into a [`LedgerEvent`].
//!
//! Migrations live in `migrations/sqlite` and `migrations/postgres` and run on [`open`].

pub mod journal;
pub mod rules;
pub mod stream;
pub mod view;
pub mod writer;

mod postgres;
mod replay;
mod sql;
mod sqlite;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;

use crate::engine::stream_id::StreamId;

pub use rules::{apply_to_key, key_state, EventKind, KeyState, KeyStatus};

/// The durable record behind the engine. Implemented for SQLite and PostgreSQL; get one with
/// [`open`].
#[async_trait::async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Creates a SKU or updates its settings. Returns `true` when it was created.
    async fn put_sku(
        &self,
        sku: &str,
        config_json: &str,
        format_version: u32,
        now_ms: i64,
    ) -> Result<bool, LedgerError>;

    /// Replaces a SKU's settings only while they are still `old_json`, so a pass that
    /// rewrites stored settings in place (sealing a blacklist) never undoes a change made
    /// meanwhile. Returns whether it replaced them.
    async fn replace_sku_config(
        &self,
        sku: &str,
        old_json: &str,
        new_json: &str,
        now_ms: i64,
    ) -> Result<bool, LedgerError>;

    /// A SKU's record, or `None` if it was never created.
    async fn get_sku(&self, sku: &str) -> Result<Option<SkuRecord>, LedgerError>;

    /// Every SKU, sorted by name.
    async fn list_skus(&self) -> Result<Vec<String>, LedgerError>;

    /// Records the epoch marker written into the engine when the SKU was last warmed: an
    /// engine without the marker lost its data and must be warmed again.
    async fn set_epoch(&self, sku: &str, epoch: &str) -> Result<(), LedgerError>;

    /// Records that a rebuild of generation `gen` of `sku` reads the ledger from now on
    /// (call before its first read): events of any other generation committed afterwards
    /// mark the SKU in [`Ledger::rereads`]. A fence of a new generation clears that mark
    /// (the rebuild reads whatever set it); one of the generation fenced already changes
    /// nothing.
    async fn fence_rebuild(&self, sku: &str, gen: &str) -> Result<(), LedgerError>;

    /// SKUs whose engine generation may lack events the ledger has: a lost generation's,
    /// committed after the rebuild that replaced it read the ledger (see
    /// [`Ledger::fence_rebuild`]). Each is to be drained and rebuilt again.
    async fn rereads(&self) -> Result<Vec<String>, LedgerError>;

    /// Starts an import as upload `upload_id` (a token unique to this attempt, which every
    /// later call of the upload names).
    ///
    /// - A batch id never seen (or aborted) starts afresh: [`BatchStart::New`].
    /// - A batch another upload is still filling answers [`BatchStart::InProgress`], unless
    ///   that upload is presumed dead (it gave no sign of life for [`UPLOAD_LEASE_MS`], or
    ///   the gateway running it was not seen for [`UPLOAD_OWNER_SILENT_MS`]): its keys are
    ///   deleted and the batch starts afresh for this upload ([`BatchStart::New`]). The
    ///   presumed-dead upload, should it wake up, is refused with [`LedgerError::BatchBusy`]
    ///   on its next call.
    /// - Every other batch of the SKU whose upload is presumed dead is aborted, its keys
    ///   deleted: a merchant who never got the batch id of an upload cut off by a crash
    ///   uploads the file again under another, and its codes are not duplicates of keys
    ///   nobody can activate.
    /// - A finished batch answers [`BatchStart::Existing`] with its record, so a re-sent import
    ///   adds nothing twice.
    async fn begin_batch(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        now_ms: i64,
    ) -> Result<BatchStart, LedgerError>;

    /// Tells the ledger upload `upload_id` is alive and still filling the batch: renews its
    /// lease ([`UPLOAD_LEASE_MS`]). [`LedgerError::BatchBusy`] if another upload took over.
    async fn touch_batch(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        now_ms: i64,
    ) -> Result<(), LedgerError>;

    /// Inserts a chunk of validated codes into a batch that upload `upload_id` is filling, in
    /// one transaction, with multi-row `INSERT`s. Allocates per-SKU local ids from the SKU's
    /// counter, in row order. A digest the SKU already has (in any batch, or earlier in this
    /// chunk) is reported as [`InsertOutcome::Duplicate`] and not inserted. Returns one outcome
    /// per row, in order.
    ///
    /// Keep chunks to about ten thousand rows: larger ones are split into several statements
    /// but still one transaction, which holds the SKU's counter lock (and on SQLite the
    /// database's write lock) longer.
    ///
    /// Each row's code is stored as `seal` turns it, once its local id is known: the
    /// keyring binds a sealed code to its key id ([`crate::secrets`]).
    async fn insert_keys(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        rows: &[NewKey],
        seal: &dyn Seal,
    ) -> Result<Vec<InsertOutcome>, LedgerError>;

    /// Ends upload `upload_id`: records its counts and leaves the batch pending, or activates
    /// it. From then on the batch id answers [`BatchStart::Existing`].
    async fn finish_batch(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
        report: &BatchCounts,
        activate: bool,
        now_ms: i64,
    ) -> Result<(), LedgerError>;

    /// Makes a pending batch's keys visible to warm-up and counts (the batch's row alone
    /// changes, whatever the batch size). Activating an active batch changes nothing. A batch
    /// whose upload has not finished is [`LedgerError::BatchBusy`] (part of its file may be
    /// still to come); an aborted one is [`LedgerError::NotFound`], as a batch id never used.
    async fn activate_batch(
        &self,
        sku: &str,
        batch_id: &str,
        now_ms: i64,
    ) -> Result<BatchRecord, LedgerError>;

    /// Gives up upload `upload_id`: the batch is aborted and its keys deleted, so a failed
    /// import leaves nothing visible and the batch id can be used again. An active batch
    /// cannot be aborted (its keys may be in the engine: void them instead), nor a batch
    /// another upload took over ([`LedgerError::BatchBusy`]).
    async fn abort_batch(
        &self,
        sku: &str,
        batch_id: &str,
        upload_id: &str,
    ) -> Result<(), LedgerError>;

    /// A batch's record.
    async fn get_batch(
        &self,
        sku: &str,
        batch_id: &str,
    ) -> Result<Option<BatchRecord>, LedgerError>;

    /// Up to `limit` keys of the SKU's active batches with a local id above `after_local_id`,
    /// by local id: warm-up pages through a SKU with the last id of each page as the cursor.
    async fn keys_after(
        &self,
        sku: &str,
        after_local_id: i64,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, LedgerError>;

    /// Up to `limit` keys of the SKU in any batch state with a local id above
    /// `after_local_id`, by local id, as stored: what a rekey pass reads.
    async fn stored_codes_after(
        &self,
        sku: &str,
        after_local_id: i64,
        limit: u32,
    ) -> Result<Vec<StoredCode>, LedgerError>;

    /// Replaces the stored code and digest of keys of `sku`, in one transaction, each only
    /// while the key still stores the code it was read with (else another pass recoded it
    /// first). Returns how many changed.
    async fn recode_keys(&self, sku: &str, recodes: &[Recode]) -> Result<u64, LedgerError>;

    /// The check values of every key that sealed or keyed anything in this ledger:
    /// `(key id, kind, check value)`, kind `data` or `index` ([`crate::secrets`]).
    async fn key_checks(&self) -> Result<Vec<(String, String, String)>, LedgerError>;

    /// Records the check value of a key not recorded yet; one recorded first (by another
    /// gateway) stays. Returns whether this call recorded it.
    async fn add_key_check(
        &self,
        key_id: &str,
        kind: &str,
        check_value: &str,
        now_ms: i64,
    ) -> Result<bool, LedgerError>;

    /// Clears old versions of changed rows from the database's own files where the database
    /// can (after a migration sealed codes stored in clear): SQLite is rebuilt (`VACUUM`) and
    /// its WAL truncated; PostgreSQL's dead rows are left to `VACUUM FULL`, see the README.
    async fn purge_freed(&self) -> Result<(), LedgerError>;

    /// Whether some key, of any SKU, stores its code in clear (a ledger from before codes
    /// were sealed, not yet migrated).
    async fn has_unsealed_codes(&self) -> Result<bool, LedgerError>;

    /// Applies engine events idempotently, in one transaction and in the order given (pass
    /// them in stream order). An event whose `event_id` is already recorded changes nothing;
    /// returns how many were newly applied. Each applied event changes the keys it names by
    /// the engine's rules ([`apply_to_key`]); ids of keys the ledger does not have (an aborted
    /// batch) are skipped, and unknown kinds are recorded without effect.
    async fn apply_events(&self, events: &[LedgerEvent]) -> Result<u64, LedgerError>;

    /// [`Ledger::apply_events`], running `beside` while the transaction commits (an fsync,
    /// or a round trip): the event writer reads its next batch there, so that batch holds
    /// what came while the statements ran, and the read adds no time between commits.
    /// `beside` is dropped unrun when a statement fails before the commit; it must not touch
    /// the ledger. By default it runs alongside the whole call.
    async fn apply_events_beside<'a>(
        &'a self,
        events: &'a [LedgerEvent],
        beside: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    ) -> Result<u64, LedgerError> {
        let (applied, ()) = tokio::join!(self.apply_events(events), beside);
        applied
    }

    /// A key's audit trail, oldest first. Empty for an unknown or malformed key id.
    async fn key_events(&self, key_id: &str) -> Result<Vec<EventRecord>, LedgerError>;

    /// Events of `sku` that concern an order (hold, claim, confirm, release, expire) after
    /// the cursor `after_seq`, oldest first, with their sequence numbers: what a rebuilt
    /// engine needs to recognise retried orders again.
    async fn order_events_after(
        &self,
        sku: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, EventRecord)>, LedgerError>;

    /// Every event of order `order_id` of `sku`, oldest first, with their sequence numbers:
    /// what the engine needs to restore an order it retired (see `lua/retire.lua`). Empty
    /// when the ledger has no such order.
    async fn order_events(
        &self,
        sku: &str,
        order_id: &str,
    ) -> Result<Vec<(i64, EventRecord)>, LedgerError>;

    /// The largest stream entry id among the events of `sku` the ledger holds; `None` when it
    /// holds none. A SKU rebuilt into an engine appends its events above it (see
    /// `lua/sku.lua` 'put' and 'floor'): a new stream's ids come from the engine's clock,
    /// and a clock behind the one that made the ledger's events would reuse their ids (the
    /// ledger takes an event whose id it holds for a copy and drops it) or sort a later take
    /// of a key before an earlier one (see `rules::later_entry`).
    async fn last_entry(&self, sku: &str) -> Result<Option<StreamId>, LedgerError>;

    /// A key by its public id (`<sku>.<local id>`), in any batch state.
    async fn get_key(&self, key_id: &str) -> Result<Option<KeyRecord>, LedgerError>;

    /// Keys of the SKU's active batches by state (all zero for an unknown SKU).
    async fn counts(&self, sku: &str) -> Result<StateCounts, LedgerError>;

    /// Keys of the SKU's active batches by the format version they were imported under,
    /// then by state.
    async fn counts_by_version(
        &self,
        sku: &str,
    ) -> Result<std::collections::BTreeMap<i64, StateCounts>, LedgerError>;

    /// Checks the database answers (for `/readyz`).
    async fn ping(&self) -> Result<(), LedgerError>;

    /// Records that gateway `id` is alive at `now_ms`. A rebuild after Redis lost a SKU
    /// waits for every gateway seen alive lately to write what it answered into the ledger
    /// (src/gateway.rs).
    async fn gateway_seen(&self, id: &str, now_ms: i64) -> Result<(), LedgerError>;

    /// The gateways seen alive at or after `since_ms`.
    async fn gateways_seen_since(&self, since_ms: i64) -> Result<Vec<String>, LedgerError>;

    /// Forgets gateway `id` (it stopped, with nothing left to write) and every gateway not
    /// seen for an hour before `now_ms` (they died).
    async fn gateway_gone(&self, id: &str, now_ms: i64) -> Result<(), LedgerError>;

    /// Every pause in force (see [`crate::pause`]), gateway-wide ones first.
    async fn pauses(&self) -> Result<Vec<PauseRecord>, LedgerError>;

    /// Puts a pause in force and records it in the pause history, in one transaction. A pause
    /// already in force for the same target and action keeps its start and takes the new
    /// reason, actor and expected end. Returns the pause that was in force before, if any.
    async fn pause(&self, pause: &NewPause) -> Result<Option<PauseRecord>, LedgerError>;

    /// Lifts the pause of `action` on `sku` (`""`: the whole gateway) and records the resume
    /// in the history, in one transaction. Returns the pause lifted; `None` (and nothing
    /// recorded) when none was in force.
    async fn resume(
        &self,
        sku: &str,
        action: &str,
        reason: Option<&str>,
        actor: &str,
        at_ms: i64,
    ) -> Result<Option<PauseRecord>, LedgerError>;

    /// Pauses and resumes, newest first, at most `limit`: of one target (`Some("")`: the
    /// gateway-wide ones) or of all.
    async fn pause_history(
        &self,
        sku: Option<&str>,
        limit: u32,
    ) -> Result<Vec<PauseEventRecord>, LedgerError>;

    /// A SKU's stock pools as the applied events leave them: each channel's reservation
    /// (see `lua/prelude.lua`, "Stock pools"), those above 0, by channel.
    async fn pools(&self, sku: &str) -> Result<Vec<(String, i64)>, LedgerError>;

    /// Every channel (see [`crate::channel`]) with all its tokens, revoked ones included.
    async fn channels(&self) -> Result<Vec<ChannelRecord>, LedgerError>;

    /// Creates a channel or replaces its settings, and records the change, in one
    /// transaction. Returns `true` when it was created.
    async fn put_channel(
        &self,
        channel: &str,
        config_json: &str,
        actor: &str,
        at_ms: i64,
    ) -> Result<bool, LedgerError>;

    /// Adds a token to its channel and records it. Returns `false` (and records nothing)
    /// when the channel does not exist.
    async fn add_channel_token(
        &self,
        token: &ChannelTokenRecord,
        actor: &str,
    ) -> Result<bool, LedgerError>;

    /// Revokes a channel's token and records it. Returns the token as it stands afterwards
    /// (revoked, at its first revocation's time when it was revoked already); `None` when the
    /// channel has no such token.
    async fn revoke_channel_token(
        &self,
        channel: &str,
        token_id: &str,
        actor: &str,
        at_ms: i64,
    ) -> Result<Option<ChannelTokenRecord>, LedgerError>;

    /// A channel's changes, newest first, at most `limit`.
    async fn channel_history(
        &self,
        channel: &str,
        limit: u32,
    ) -> Result<Vec<ChannelEventRecord>, LedgerError>;

    /// Up to `limit` orders of `channel` created (held or claimed) at `from_ms` or later and
    /// before `to_ms`, by creation time, after `after` (the [`OrderRecord::cursor`] of the
    /// previous page's last order): a statement pages through a channel with it.
    async fn channel_orders(
        &self,
        channel: &str,
        from_ms: i64,
        to_ms: i64,
        after: Option<OrderCursor>,
        limit: u32,
    ) -> Result<Vec<OrderRecord>, LedgerError>;

    /// The orders the ledger knows by these names (as [`crate::channel::scoped`] makes
    /// them), of every SKU; names it does not know are left out.
    async fn find_orders(&self, order_keys: &[String]) -> Result<Vec<OrderRecord>, LedgerError>;
}

/// Opens the ledger, creating and migrating its database as needed.
///
/// - `None`: SQLite in `<data_dir>/ledger.sqlite3` (the directory and file are created).
/// - `sqlite://…` (or `sqlite:…`): that SQLite database, created if missing.
/// - `postgres://…` or `postgresql://…`: PostgreSQL.
///
/// Migrations run every time; those already applied are skipped, so reopening is cheap.
pub async fn open(url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn Ledger>, LedgerError> {
    match url {
        None => Ok(Arc::new(
            sqlite::open_file(&data_dir.join("ledger.sqlite3")).await?,
        )),
        Some(url) if url.starts_with("sqlite:") => Ok(Arc::new(sqlite::open_url(url).await?)),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(postgres::open(url).await?))
        }
        Some(url) => {
            // Only the scheme: the rest of a URL may hold a password.
            let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
            Err(LedgerError::Corrupt(format!(
                "unsupported database URL scheme {scheme:?}: use sqlite:// or postgres://"
            )))
        }
    }
}

/// What went wrong in the ledger. Messages never contain a secret code (digests may appear).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The database cannot be reached or is busy (connection, pool, I/O, lock timeout,
    /// serialisation failure). Transient: answer 503 and retry.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    /// The request contradicts the ledger's state (e.g. inserting into an active batch).
    #[error("ledger conflict: {0}")]
    Conflict(String),
    /// An upload is still filling the batch: this call came from another upload (this one
    /// was presumed dead and taken over) or asked to activate the batch before it was whole.
    #[error("{0}")]
    BatchBusy(String),
    /// A SKU, batch or key the request names does not exist.
    #[error("{0} not found in the ledger")]
    NotFound(String),
    /// The database answered something the ledger never writes, or a bad setting: a bug or
    /// a misconfiguration, not worth retrying.
    #[error("ledger corrupt or misconfigured: {0}")]
    Corrupt(String),
}

impl LedgerError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LedgerError::Unavailable(_))
    }
}

/// A SKU as the ledger knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkuRecord {
    pub sku: String,
    /// The settings as sent to `PUT /v1/skus/{sku}` ([`crate::sku::SkuConfig`] as JSON).
    pub config_json: String,
    /// Version of the code format; each key records the version it was imported under.
    pub format_version: u32,
    /// The marker last written into the engine when warmed, if ever.
    pub epoch: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// An import batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub sku: String,
    pub batch_id: String,
    /// `pending` (keys invisible), `active` (keys count and warm) or `aborted` (keys deleted).
    pub state: String,
    pub accepted: u64,
    pub rejected: u64,
    pub duplicate: u64,
    /// When the batch (or the latest upload filling it) started.
    pub created_at_ms: i64,
    pub activated_at_ms: Option<i64>,
    /// The upload filling the batch, while one is; `None` once it finished or was aborted.
    pub upload_id: Option<String>,
    /// When that upload last gave a sign of life (it began, or renewed its lease).
    pub touched_at_ms: Option<i64>,
}

/// How long an upload owns the batch it fills without a sign of life, in milliseconds. An
/// uploader renews its lease well within this ([`Ledger::touch_batch`]); one silent for this
/// long (its process died mid-upload, or its client stalled) is presumed dead, and the next
/// upload of the same batch id takes the batch over instead of waiting forever.
pub const UPLOAD_LEASE_MS: i64 = 5 * 60 * 1000;

/// How long the gateway running an upload may go unseen (it reports alive every half
/// second, [`Ledger::gateway_seen`]) before the upload is presumed dead with it, in
/// milliseconds: a gateway killed mid-upload frees its batch this long after, not after
/// [`UPLOAD_LEASE_MS`]. An upload made through a gateway names it ([`upload_token`]); one
/// made by `kamigate import` names none and is held by its lease alone.
pub const UPLOAD_OWNER_SILENT_MS: i64 = 10_000;

/// The token of a new upload: random, and naming the gateway running it (`gateway`, as it
/// reports itself alive), if any.
pub fn upload_token(gateway: Option<&str>) -> String {
    let random = format!("{:032x}", rand::random::<u128>());
    match gateway {
        Some(gateway) => format!("{gateway}/{random}"),
        None => random,
    }
}

/// The gateway an upload token names ([`upload_token`]).
pub fn upload_gateway(upload_id: &str) -> Option<&str> {
    upload_id.rsplit_once('/').map(|(gateway, _)| gateway)
}

/// What [`Ledger::begin_batch`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchStart {
    /// A fresh (or previously aborted, or abandoned) batch id: import into it.
    New,
    /// The batch id was imported before: here is its record.
    Existing(BatchRecord),
    /// Another upload is filling the batch right now: here is its record.
    InProgress(BatchRecord),
}

/// An import's outcome per row, recorded on the batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    pub accepted: u64,
    pub rejected: u64,
    pub duplicate: u64,
}

/// Turns a code into the text the ledger stores for key `local_id` of `sku`: the keyring
/// seals it ([`crate::secrets::Keyring`]).
pub trait Seal: Send + Sync {
    fn seal(&self, sku: &str, local_id: i64, code: &str) -> String;
}

impl Seal for crate::secrets::Keyring {
    fn seal(&self, sku: &str, local_id: i64, code: &str) -> String {
        crate::secrets::Keyring::seal(self, sku, &local_id.to_string(), code)
    }
}

/// A validated code to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// Line of the import file it came from (for reports; not stored).
    pub line: u64,
    /// Keyed digest of the canonical code ([`crate::secrets::Keyring::digest`]).
    pub digest: String,
    /// The canonical code, sealed by [`Ledger::insert_keys`] before it is stored.
    pub code: String,
    /// After this instant (ms since the epoch) it can no longer be redeemed.
    pub expires_at_ms: Option<i64>,
    pub max_issues: i64,
    pub max_uses: i64,
    /// The SKU's format version it was validated under.
    pub format_version: i64,
}

/// A key's code and digest as stored ([`Ledger::stored_codes_after`]).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredCode {
    pub local_id: i64,
    pub digest: String,
    /// Sealed, or in clear in a ledger not yet migrated: a secret either way.
    pub code: String,
}

impl std::fmt::Debug for StoredCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCode")
            .field("local_id", &self.local_id)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// A key's code sealed anew and its digest keyed anew ([`Ledger::recode_keys`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Recode {
    pub local_id: i64,
    /// The stored code it was read with: the update applies only while it is still there.
    pub old_code: String,
    pub code: String,
    pub digest: String,
}

impl std::fmt::Debug for Recode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recode")
            .field("local_id", &self.local_id)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// What inserting one row did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Stored under a fresh id.
    Inserted { key_id: String, local_id: i64 },
    /// The SKU already had this code under `key_id`; `same_batch` when that key belongs to the
    /// batch being imported (a re-sent chunk or a repeat within the file).
    Duplicate { key_id: String, same_batch: bool },
}

/// A card key as the ledger records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public id, `<sku>.<local_id>` ([`crate::sku::key_id`]).
    pub key_id: String,
    pub sku: String,
    pub local_id: i64,
    /// Keyed digest of the canonical code ([`crate::secrets::Keyring::digest`]); the
    /// unkeyed hex SHA-256 of [`crate::code::digest`] in a ledger not yet migrated.
    pub digest: String,
    /// The code as stored: sealed ([`crate::secrets`]), or the plain canonical code in a
    /// ledger not yet migrated. A secret either way: never log it.
    pub code: String,
    pub batch_id: String,
    pub format_version: i64,
    pub expires_at_ms: Option<i64>,
    pub max_issues: i64,
    pub max_uses: i64,
    pub held: i64,
    pub sold: i64,
    pub uses: i64,
    pub void: bool,
    /// `available`, `held`, `claimed`, `redeemed` or `void` ([`KeyState`]).
    pub state: String,
    /// The order that most recently held or claimed the key; earlier ones are in the audit
    /// trail.
    pub order_id: Option<String>,
    pub user_id: Option<String>,
    pub redeemer: Option<String>,
    pub redeemed_at_ms: Option<i64>,
    pub updated_at_ms: i64,
}

/// One engine event, ready for [`Ledger::apply_events`] (see [`stream`] to build one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEvent {
    /// Unique: `<sku>/<stream entry id>`.
    pub event_id: String,
    pub sku: String,
    /// The stream's `t` field: `hold`, `claim`, `confirm`, … ([`EventKind`]).
    pub kind: String,
    /// Engine time of the change.
    pub at_ms: i64,
    /// The SKU-local ids of the keys it changed.
    pub key_local_ids: Vec<i64>,
    pub order_id: Option<String>,
    pub user_id: Option<String>,
    pub redeemer: Option<String>,
    /// Why a key was voided or restored.
    pub reason: Option<String>,
    /// A confirm that claimed fresh keys after its hold lapsed.
    pub late: bool,
    /// Every raw field of the stream entry as a JSON object, kept for the audit.
    pub fields_json: String,
    /// The generation of the SKU in the engine whose stream held the event (`None`: not
    /// known). Committed after a rebuild of another generation read the ledger, the event
    /// marks the SKU to be rebuilt again (migrations/*/*_rebuild_fences.sql).
    pub gen: Option<String>,
}

/// A recorded event, as the audit trail shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub event_id: String,
    pub sku: String,
    pub kind: String,
    pub at_ms: i64,
    pub order_id: Option<String>,
    pub user_id: Option<String>,
    pub redeemer: Option<String>,
    pub reason: Option<String>,
    pub fields_json: String,
}

/// A pause in force: `action` (`claims` or `redemptions`) of `sku` (`""`: every SKU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseRecord {
    pub sku: String,
    pub action: String,
    pub reason: String,
    pub paused_by: String,
    /// When the pause began; a later pause of the same target and action keeps it.
    pub paused_at_ms: i64,
    /// When the operator expected to resume, if they said.
    pub expected_end_ms: Option<i64>,
}

/// A pause to put in force ([`Ledger::pause`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPause {
    /// The SKU, or `""` for the whole gateway.
    pub sku: String,
    /// `claims` or `redemptions`.
    pub action: String,
    pub reason: String,
    pub actor: String,
    pub at_ms: i64,
    pub expected_end_ms: Option<i64>,
}

/// One pause or resume in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseEventRecord {
    /// The order the ledger recorded it in.
    pub seq: i64,
    pub sku: String,
    pub action: String,
    /// `pause` or `resume`.
    pub kind: String,
    pub reason: Option<String>,
    pub actor: String,
    pub at_ms: i64,
    pub expected_end_ms: Option<i64>,
}

/// A channel as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRecord {
    pub channel: String,
    /// Its settings, as `PUT /v1/channels/{channel}` accepted them.
    pub config_json: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Its tokens, oldest first, revoked ones included.
    pub tokens: Vec<ChannelTokenRecord>,
}

/// A channel's bearer token, by digest (the token itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelTokenRecord {
    /// Its public name, for listing and revoking.
    pub token_id: String,
    pub channel: String,
    /// SHA-256 of the token, hex.
    pub digest: String,
    pub label: Option<String>,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

/// One change of a channel in its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelEventRecord {
    pub seq: i64,
    pub channel: String,
    /// `created`, `updated`, `token_added` or `token_revoked`.
    pub kind: String,
    /// What changed (settings, or the token's id and label), as JSON.
    pub detail_json: String,
    pub actor: String,
    pub at_ms: i64,
}

/// An order as its events in the ledger tell it ([`Ledger::channel_orders`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRecord {
    pub sku: String,
    /// The ledger's name of the order ([`crate::channel::scoped`]).
    pub order_key: String,
    /// The kind of its latest order event: `hold`, `claim`, `confirm`, `release` or
    /// `expire`.
    pub last_kind: String,
    /// The keys that latest event names (a late confirm names fresh ones), by local id.
    pub key_local_ids: Vec<i64>,
    /// How many of those keys were redeemed at least once. A reusable code counts as soon
    /// as anyone redeemed it: a redemption names the code, not the order.
    pub redeemed_keys: u64,
    /// When it was held or claimed (its first order event).
    pub created_at_ms: i64,
    /// When its latest order event happened.
    pub updated_at_ms: i64,
    /// Where a page ending with this order ends.
    pub cursor: OrderCursor,
}

/// A position in a channel's orders by creation: the creation event's time and sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderCursor {
    pub at_ms: i64,
    pub seq: i64,
}

/// Keys of a SKU's active batches by state; the same shape as the engine's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StateCounts {
    pub available: u64,
    pub held: u64,
    pub claimed: u64,
    pub redeemed: u64,
    pub void: u64,
}

impl StateCounts {
    /// The counter for `state`.
    pub fn slot(&mut self, state: KeyState) -> &mut u64 {
        match state {
            KeyState::Available => &mut self.available,
            KeyState::Held => &mut self.held,
            KeyState::Claimed => &mut self.claimed,
            KeyState::Redeemed => &mut self.redeemed,
            KeyState::Void => &mut self.void,
        }
    }

    /// All keys counted.
    pub fn total(&self) -> u64 {
        self.available + self.held + self.claimed + self.redeemed + self.void
    }
}

/// Classifies a database error. Only the database's own message is kept: it names
/// constraints and columns, never bound values, so no code can leak through it.
impl From<sqlx::Error> for LedgerError {
    fn from(e: sqlx::Error) -> LedgerError {
        use sqlx::Error as E;
        match e {
            E::Io(_)
            | E::Tls(_)
            | E::Protocol(_)
            | E::PoolTimedOut
            | E::PoolClosed
            | E::WorkerCrashed => LedgerError::Unavailable(e.to_string()),
            E::RowNotFound => LedgerError::NotFound("row".into()),
            E::Database(db) => {
                let message = db.message().to_owned();
                if transient(db.as_ref()) {
                    LedgerError::Unavailable(message)
                } else if matches!(
                    db.kind(),
                    sqlx::error::ErrorKind::UniqueViolation
                        | sqlx::error::ErrorKind::ForeignKeyViolation
                ) {
                    LedgerError::Conflict(message)
                } else {
                    LedgerError::Corrupt(message)
                }
            }
            other => LedgerError::Corrupt(other.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for LedgerError {
    fn from(e: sqlx::migrate::MigrateError) -> LedgerError {
        match e {
            sqlx::migrate::MigrateError::Execute(inner)
            | sqlx::migrate::MigrateError::ExecuteMigration(inner, _) => {
                match LedgerError::from(inner) {
                    LedgerError::Unavailable(m) => LedgerError::Unavailable(m),
                    other => LedgerError::Corrupt(format!("migration failed: {other}")),
                }
            }
            other => LedgerError::Corrupt(format!("migrations: {other}")),
        }
    }
}

/// Whether a database error is worth retrying: the server is going away, out of resources,
/// or the transaction lost a lock race.
fn transient(db: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        // SQLSTATE classes: 08 connection, 40 transaction rollback (serialisation failure,
        // deadlock), 53 insufficient resources, 57 operator intervention (shutdown,
        // cancel), 58 system error (I/O); and 25P03, a session ended idle in a transaction
        // (`idle_in_transaction_session_timeout`, see `postgres.rs`): its transaction rolled
        // back, and a new session can do it again.
        return pg.code() == "25P03"
            || ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| pg.code().starts_with(class));
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // Primary result codes: BUSY, LOCKED, IOERR, FULL, CANTOPEN.
        let primary = db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .map(|c| c & 0xff);
        return matches!(primary, Some(5 | 6 | 10 | 13 | 14));
    }
    false
}
