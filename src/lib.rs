//! kamigate: a high-throughput redemption gateway for card keys (gift cards, top-up codes,
//! license keys).
//!
//! # Two paths
//!
//! - **Requests**: [`http`] (the edge: routing, auth) → [`limit`] (buckets, shedding,
//!   windows) → [`inventory`] (domain terms, claim coalescing) → [`engine`] (a script call)
//!   → `lua/*.lua` (the only code that changes inventory state, one atomic step per call).
//! - **Events**: each script appends its change to the SKU's stream → the event writer
//!   ([`ledger::writer`]) reads it through a consumer group → the [`ledger`] commits it →
//!   [`inventory::drift`] (ledger against engine counts) and [`inventory::warm`] (the engine
//!   rebuilt from the ledger) close the loop.
//!
//! # Layout
//!
//! - [`clock`]: the one notion of "now", injected so tests move time by hand.
//! - [`config`]: configuration from defaults, a TOML file and `KAMIGATE_*` variables.
//! - [`error`]: the API's error type, its HTTP status and JSON envelope.
//! - [`code`]: code formats: normalise, validate, check character, generate, display form
//!   (pure); `code/spec.rs` says which format specs are usable.
//! - [`sku`]: SKU settings and identifier rules.
//! - [`datadir`]: one gateway per data dir (an OS lock).
//! - [`tokens`]: bearer tokens generated when none are configured, kept in the data dir.
//! - [`private_file`]: files only their owner reads (tokens, data keys), created once.
//! - [`secrets`]: codes at rest: the keyring that seals them and the keyed index digest.
//! - [`engine`]: the [`engine::ScriptEngine`] seam; Redis (fred) and embedded (mlua)
//!   engines run the same `lua/` scripts, the only code that changes inventory state.
//! - [`inventory`]: claims, holds, redemptions and imports in domain terms over an engine;
//!   `inventory::retire`: settled orders leave the engine, their retries restored from the
//!   ledger.
//! - [`ledger`]: the durable record (SQLite or PostgreSQL) of imports and every change.
//! - [`limit`]: token buckets, load shedding, sliding windows and local reject caches.
//! - [`channel`]: selling channels: each its own tokens, bucket, SKU list and circuit
//!   breaker; orders namespaced per channel.
//! - [`pause`]: incident controls: claims or redemptions paused per SKU or gateway-wide,
//!   recorded in the ledger, enforced from each gateway's view of it.
//! - [`http`]: the hyper edge: routing, auth, handlers, graceful shutdown.
//! - [`commands`]: the operator commands: `import`, `warm`, `reconcile`, `rekey`, `pause`,
//!   `resume`.
//! - [`gateway`]: wiring a [`config::Config`] into a running gateway with background work.
//! - [`metrics`]: every exported metric and its description.

pub mod channel;
pub mod clock;
pub mod code;
pub mod commands;
pub mod config;
pub mod datadir;
pub mod engine;
pub mod error;
pub mod gateway;
pub mod http;
pub mod inventory;
pub mod ledger;
pub mod limit;
pub mod metrics;
pub mod pause;
pub mod private_file;
pub mod secrets;
pub mod sku;
pub mod tokens;
