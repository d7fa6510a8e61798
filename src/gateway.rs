//! Assembling a running gateway from a [`Config`]: engine, tokens, listeners, the HTTP edge
//! and background work. `main` only parses the command line and waits for a signal; tests
//! call [`Gateway::start`] with port 0 and drive the result.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::datadir::{self, DataDirLock, LockError};
use crate::engine::embedded::EmbeddedEngine;
use crate::engine::redis::{RedisEngine, RedisOptions};
use crate::engine::{EngineError, EngineKind, ScriptEngine, SCRIPTS};
use crate::http::starting::Waiting;
use crate::http::{self, App, Limits};
use crate::inventory::drift::Drift;
use crate::inventory::rekey;
use crate::inventory::warm::{
    begin_restore, check_epoch, finish_restore, rebuild_acknowledged, warm_sku, Acknowledged,
    Rebuild, ALIVE_EVERY,
};
use crate::inventory::{Ack, Inventory};
use crate::ledger::writer::{EventWriter, WriterOptions};
use crate::ledger::{self, Ledger, LedgerError};
use crate::metrics as m;
use crate::secrets::keyfile::{self, KeyError, KeyOrigin, KeySource, KEY_VAR};
use crate::tokens::{self, KeptTokens, TokenError};
use dashmap::DashMap;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    DataDir(#[from] LockError),
    #[error("{0}")]
    Tokens(#[from] TokenError),
    #[error("{0}")]
    Keys(#[from] KeysError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Why the data keys could not be used. Names key ids and files, never a key or a code.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{0}")]
    Source(#[from] KeyError),
    #[error("these data keys do not fit the ledger: {subject} {why}. {hint}")]
    Mismatch {
        subject: String,
        why: String,
        hint: String,
    },
    #[error("migrating the ledger's codes to sealed ones: {0}")]
    Migration(#[source] crate::error::Error),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
}

/// Reads the data keys (`KAMIGATE_DATA_KEY` or the data dir's key file, generated on the
/// first start), checks that they open the ledger's codes, and installs them in
/// `inventory`. With `migrate`, a ledger from before codes were sealed is migrated, in
/// place ([`rekey`]): resumable, so an interrupted start finishes it on the next.
pub async fn open_keys(
    config: &Config,
    ledger: &dyn Ledger,
    inventory: &Inventory,
    migrate: bool,
) -> Result<KeySource, KeysError> {
    let env = config.data_key.as_ref().map(|k| k.0.as_str());
    let (keyring, source) = keyfile::resolve(env, &config.data_dir)?;
    if let KeySource::File { path, fresh: true } = &source {
        tracing::warn!(
            file = %path.display(),
            "generated the data keys that seal every code; keep a copy of the file apart \
             from the ledger's backups: without it no stored code can be read"
        );
    }
    if let Some(rekey::Misfit { subject, why }) = rekey::check_keys(ledger, &keyring).await? {
        let hint = match &source {
            KeySource::File { path, fresh: true } => format!(
                "{} was generated just now: the keys that sealed this ledger are elsewhere \
                 (set {KEY_VAR} or restore the file)",
                path.display()
            ),
            KeySource::File { path, .. } => format!(
                "{} holds data keys {:?}; restore the file that sealed the ledger",
                path.display(),
                keyring.data_ids()
            ),
            KeySource::Env => format!(
                "{KEY_VAR} holds data keys {:?}; set it to the keys that sealed the ledger",
                keyring.data_ids()
            ),
        };
        return Err(KeysError::Mismatch { subject, why, hint });
    }
    m::initialise_keys(keyring.data_ids());
    inventory.use_keyring(Arc::new(keyring));
    inventory.set_key_origin(KeyOrigin {
        source: source.clone(),
        env: config.data_key.clone(),
    });
    if migrate && ledger.has_unsealed_codes().await? {
        tracing::warn!("the ledger stores codes in clear: sealing them now, in place");
        let report = rekey::rekey(ledger, inventory, None, false)
            .await
            .map_err(KeysError::Migration)?;
        ledger.purge_freed().await?;
        tracing::info!(
            skus = report.skus,
            migrated = report.migrated,
            failed = report.failed,
            "the ledger's codes are sealed"
        );
    }
    if migrate {
        let sealed = rekey::seal_blacklists(ledger, inventory)
            .await
            .map_err(KeysError::Migration)?;
        if sealed > 0 {
            ledger.purge_freed().await?;
            tracing::warn!(skus = sealed, "sealed SKU blacklists stored in clear");
        }
    }
    Ok(source)
}

/// Opens the configured engine: Redis when a URL is set, else the embedded one.
pub async fn open_engine(config: &Config) -> Result<Arc<dyn ScriptEngine>, EngineError> {
    Ok(match &config.redis_url {
        Some(url) => Arc::new(RedisEngine::connect(url, RedisOptions::default()).await?),
        None => Arc::new(EmbeddedEngine::start()?),
    })
}

/// The first wait between attempts to reach a dependency at start; it doubles up to
/// [`START_RETRY_MAX`].
const START_RETRY_MIN: Duration = Duration::from_millis(250);
const START_RETRY_MAX: Duration = Duration::from_secs(5);

/// Opens the engine (unless given) and the ledger. While Redis or PostgreSQL cannot be
/// reached it says so in `waiting` (what `/readyz` answers meanwhile) and in the log, and
/// tries again with backoff, for as long as it takes: dependencies often start after the
/// gateway. A mistake (a malformed URL, a refused password, an unusable data dir) ends the
/// start instead.
async fn open_dependencies(
    config: &Config,
    inventory: Option<Inventory>,
    waiting: &watch::Sender<Waiting>,
) -> Result<(Inventory, Arc<dyn Ledger>), StartError> {
    let wait = |summary: &str, why: String, delay: &mut Duration| {
        let detail = format!("{why}; next attempt in {} ms", delay.as_millis());
        tracing::warn!("{detail}");
        waiting.send_replace(Waiting {
            summary: summary.to_owned(),
            detail,
        });
        let now = *delay;
        *delay = (*delay * 2).min(START_RETRY_MAX);
        tokio::time::sleep(now)
    };
    let inventory = match inventory {
        Some(inventory) => inventory,
        None => {
            if let Some(url) = &config.redis_url {
                RedisEngine::check_url(url)?;
            }
            let mut delay = START_RETRY_MIN;
            loop {
                match open_engine(config).await {
                    Ok(engine) => break Inventory::new(engine),
                    Err(EngineError::Unavailable(why)) => {
                        wait("waiting for Redis", why, &mut delay).await
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    };
    let mut delay = START_RETRY_MIN;
    let ledger = loop {
        match ledger::open(config.database_url.as_deref(), &config.data_dir).await {
            Ok(ledger) => break ledger,
            Err(LedgerError::Unavailable(why)) => {
                wait("waiting for the ledger database", why, &mut delay).await
            }
            Err(e) => return Err(e.into()),
        }
    };
    Ok((inventory, ledger))
}

/// A running gateway.
pub struct Gateway {
    pub app: Arc<App>,
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub merchant_token: String,
    pub admin_token: String,
    /// Where generated tokens are kept, when a token was not configured (see
    /// [`crate::tokens`]).
    pub tokens_file: Option<KeptTokens>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Held until the gateway stopped.
    _lock: Option<DataDirLock>,
}

impl Gateway {
    /// Binds both listeners, opens the engine and the ledger (waiting for them while they
    /// cannot be reached: see the README, "Starting before Redis or PostgreSQL") and starts
    /// serving. Returns once the gateway serves.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        Gateway::launch(config, None).await
    }

    /// Starts serving over an already opened inventory (tests inject clocks this way); the
    /// ledger is opened from `config`, and the engine is given every SKU it lacks.
    pub async fn start_with(config: Config, inventory: Inventory) -> Result<Gateway, StartError> {
        Gateway::launch(config, Some(inventory)).await
    }

    async fn launch(config: Config, inventory: Option<Inventory>) -> Result<Gateway, StartError> {
        let kind = match (&inventory, &config.redis_url) {
            (Some(inventory), _) => inventory.engine().kind(),
            (None, Some(_)) => EngineKind::Redis,
            (None, None) => EngineKind::Embedded,
        };
        // The recorder first: the start itself (the rebuild below, the limiters' handles)
        // records metrics, and label sets registered now read 0 from the first scrape.
        m::handle();
        m::sku_labels().set_max(config.metrics_max_skus);
        m::initialise(kind.as_str(), SCRIPTS.all().into_iter().map(|s| s.name()));
        http::register_metrics();
        // The embedded engine is this process: a second one on the same data dir would be a
        // second inventory of the same codes.
        let lock = match kind {
            EngineKind::Embedded => Some(datadir::lock(&config.data_dir)?),
            EngineKind::Redis => None,
        };
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let public = bind(config.listen).await?;
        let admin = bind(config.admin_listen).await?;
        let public_addr = public.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
            addr: config.admin_listen,
            source,
        })?;
        let tokens = tokens::resolve(
            config.merchant_token.as_deref(),
            config.admin_token.as_deref(),
            &config.data_dir,
        )?;
        let (merchant_token, admin_token) = (tokens.merchant, tokens.admin);
        let limits = Limits::from_config(&config);
        let (waiting, waited) = watch::channel(Waiting {
            summary: "starting".into(),
            detail: "opening the engine and the ledger".into(),
        });
        let (inventory, ledger) = http::starting::serve_while(
            &public,
            &admin,
            limits.head,
            waited,
            open_dependencies(&config, inventory, &waiting),
        )
        .await?;
        open_keys(&config, ledger.as_ref(), &inventory, true).await?;
        inventory.restore_retired_from(ledger.clone());
        let cursors = Arc::new(WarmCursors::new());
        let writer = EventWriter::new(
            inventory.engine().clone(),
            ledger.clone(),
            WriterOptions {
                reclaim_idle_ms: config.event_reclaim_idle_ms,
                journal_max_events: config.journal_max_events,
                ..WriterOptions::default()
            },
        );
        let mut sync = Sync {
            id: writer.options().consumer.clone(),
            grace: match inventory.engine().kind() {
                // Nobody else shares an embedded engine: nobody else has answers to write.
                EngineKind::Embedded => Duration::ZERO,
                EngineKind::Redis => Duration::from_millis(config.rebuild_grace_ms),
            },
            cursors,
            draining: false,
            unread: HashSet::new(),
        };
        // Known alive before it answers anything: from now on a rebuild waits for it.
        if let Err(e) = ledger
            .gateway_seen(&sync.id, inventory.now_ms() as i64)
            .await
        {
            tracing::warn!(error = %e, "reporting this gateway alive to the ledger failed");
        }
        let alive_as = sync.id.clone();
        let known = sync.run(ledger.as_ref(), &inventory, &writer).await;
        let app = Arc::new(App::new(
            inventory,
            ledger,
            writer.clone(),
            (merchant_token.clone(), admin_token.clone()),
            limits,
            &config,
        ));
        app.skus.know(&known);
        // Pauses in force are enforced from the first request on, also after a restart.
        app.pauses.refresh(app.ledger.as_ref()).await;
        // Channel tokens authenticate from the first request on (until the ledger is read,
        // a token the gateway does not know is told to retry, not that it is wrong).
        app.channels.refresh(app.ledger.as_ref()).await;

        let (stop, stopped) = watch::channel(false);
        let sweep = tokio::spawn(sweep_holds(
            app.clone(),
            Duration::from_millis(config.hold_sweep_interval_ms),
            stopped.clone(),
        ));
        let syncing = tokio::spawn(keep_in_sync(app.clone(), sync, stopped.clone()));
        let limiter_sweep = tokio::spawn(sweep_limiters(app.clone(), stopped.clone()));
        let retiring = tokio::spawn(retire_settled(
            app.clone(),
            Duration::from_secs(config.order_retention_secs),
            stopped.clone(),
        ));
        let pauses = tokio::spawn(keep_pauses(
            app.clone(),
            Duration::from_millis(config.pause_refresh_ms),
            stopped.clone(),
        ));
        let channels = tokio::spawn(keep_channels(
            app.clone(),
            Duration::from_millis(config.channel_refresh_ms),
            stopped.clone(),
        ));
        // The writer stops last, after in-flight requests finished, so their events reach
        // the ledger before the process exits.
        let (stop_writer, writer_stopped) = watch::channel(false);
        // Reported alive for as long as it may have answers to write: until its writer stops.
        let alive = tokio::spawn(report_alive(
            app.clone(),
            alive_as.clone(),
            writer_stopped.clone(),
        ));
        let writing = tokio::spawn(writer.run(writer_stopped));
        let shutdown = http::Shutdown {
            delay: Duration::from_millis(config.shutdown_delay_ms),
            drain: Duration::from_secs(config.drain_timeout_secs),
        };
        let serve_app = app.clone();
        let gone_app = app.clone();
        let task = tokio::spawn(async move {
            let mut stopped = stopped;
            let signal = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            http::serve(serve_app, public, admin, signal, shutdown).await;
            let _ = tokio::join!(sweep, limiter_sweep, syncing, pauses, channels, retiring);
            let _ = stop_writer.send(true);
            let _ = writing.await;
            let _ = alive.await;
            // Its writer committed what it could: no rebuild needs to wait for it any more.
            let now = gone_app.inventory.now_ms() as i64;
            if let Err(e) = gone_app.ledger.gateway_gone(&alive_as, now).await {
                tracing::warn!(error = %e, "removing this gateway from the ledger's list failed");
            }
        });
        Ok(Gateway {
            app,
            public_addr,
            admin_addr,
            merchant_token,
            admin_token,
            tokens_file: tokens.kept,
            stop,
            task,
            _lock: lock,
        })
    }

    /// Runs until `signal` resolves, then shuts down gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.stop().await;
    }

    /// Stops accepting, turns readiness to 503, drains in-flight requests, stops background
    /// work, and returns when all of it has finished.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "gateway task failed");
        }
    }
}

/// How far each SKU's ledger keys are known to be in the engine, by local id.
pub type WarmCursors = DashMap<String, i64>;

/// How often the engine is checked for a loss of its data (one cheap probe: the global
/// index's completeness marks, which go with the data): a loss is noticed within this
/// interval, and at once when a request runs into it.
const LOSS_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often the engine is brought up to the ledger in full (new batches, epoch markers,
/// SKUs lost one by one).
const SYNC_EVERY: Duration = Duration::from_secs(5);

/// How long one pass waits for a drained SKU's events to be committed before it leaves the
/// SKU to the next pass.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// How long one pass waits for other gateways to write what they answered into the ledger
/// before it leaves a rebuild to the next pass (which waits again).
const ACK_WAIT: Duration = Duration::from_secs(5);

/// Keeping the engine up to the ledger.
struct Sync {
    /// This gateway, as it reports itself alive to the ledger (its writer's consumer name).
    id: String,
    /// A gateway that has not reported alive for this long is presumed gone: a rebuild no
    /// longer waits for it (zero: nobody else shares the engine).
    grace: Duration,
    cursors: Arc<WarmCursors>,
    /// The last pass left a SKU draining, or to drain (see [`Sync::rebuild_again`]), or a
    /// rebuild waiting for this gateway's writer: the next one comes soon, not after
    /// [`SYNC_EVERY`].
    draining: bool,
    /// SKUs for which this gateway wrote answers of a lost generation into the ledger that
    /// the generation the engine has may lack, until it is known that whatever rebuilds the
    /// SKU reads the ledger after them: the engine had no SKU, or a rebuild not reading yet
    /// ([`Inventory::drain`]), or the rebuild recorded the acknowledgement that followed
    /// them ([`Ack::Acked`]); or else that generation is drained.
    unread: HashSet<String>,
}

impl Sync {
    /// Brings the engine up to the ledger. Idempotent; failures are logged and the next
    /// pass tries again. Returns the ledger's SKUs. In phases, so that one grace period
    /// covers every SKU lost at once:
    ///
    /// 1. every answered change this gateway journaled for a generation the engine no
    ///    longer has is written into the ledger (before anything is rebuilt from it); if
    ///    the SKU was rebuilt without them already, or its rebuild reads the ledger already,
    ///    it is rebuilt again ([`Sync::rebuild_again`]);
    /// 2. every SKU the engine lacks is recreated *loading* (unservable), and this gateway
    ///    records in it that the ledger has what it answered (if the rebuild reads the
    ///    ledger already, having presumed this gateway gone, and this gateway has just
    ///    written answers, the next pass rebuilds it again);
    /// 3. once every gateway alive has recorded that too ([`Sync::acknowledged`]), each
    ///    loading SKU gets its keys and orders and serves again;
    /// 4. the other SKUs get keys of batches activated elsewhere, and their epoch checked,
    ///    and every SKU the engine serves is in its registry (which the hold sweep and
    ///    retention go by: a registry that lost a SKU, e.g. a Redis Cluster shard failing
    ///    over to a replica that missed the write, would leave its holds unlapsed);
    /// 5. once every SKU's codes are indexed, the global index is marked complete (unless
    ///    the engine lost index entries since the pass began: then the next pass indexes
    ///    again).
    async fn run(
        &mut self,
        ledger: &dyn Ledger,
        inventory: &Inventory,
        writer: &EventWriter,
    ) -> Vec<String> {
        let skus = match ledger.list_skus().await {
            Ok(skus) => skus,
            Err(e) => {
                tracing::warn!(error = %e, "listing the ledger's SKUs failed");
                return Vec::new();
            }
        };
        // Before anything is indexed: a loss from here on is seen when marking (step 5).
        let index = match inventory.watch_index().await {
            Ok(index) => index,
            Err(e) => {
                tracing::warn!(error = %e, "checking the code index failed");
                return skus;
            }
        };
        // SKUs whose generation may lack a lost one's events a writer committed after the
        // rebuild read the ledger (the fence in `Ledger::fence_rebuild`): drained, as below.
        let rereads: HashSet<String> = match ledger.rereads().await {
            Ok(skus) => skus.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing the SKUs to rebuild again failed");
                HashSet::new()
            }
        };
        let mut complete = true;
        let mut failed = |sku: &str, what: &str, e: &dyn std::fmt::Display| {
            complete = false;
            tracing::warn!(sku, error = %e, "{what}");
        };

        // 1 and 2.
        let mut loading: Vec<(&String, Rebuild)> = Vec::new();
        let mut serving: Vec<&String> = Vec::new();
        let mut draining = false;
        let mut writer_wait = ACK_WAIT;
        for sku in &skus {
            let state = match inventory.sku_state(sku).await {
                Ok(state) => state,
                Err(e) => {
                    failed(sku, "reading a SKU from the engine failed", &e);
                    continue;
                }
            };
            // Every generation's but the one the engine has now, loading or not: one that
            // became ready since it was read may have answers of this gateway already.
            let present = state.as_ref().map(|s| s.gen.as_str());
            if let Err(e) = self.write_lost(writer, sku, present).await {
                // The rebuild waits: the ledger must have what was answered first.
                failed(sku, "writing answered changes the engine lost failed", &e);
                continue;
            }
            let drained = if self.unread.contains(sku) || rereads.contains(sku) {
                // The generation the engine has now may have read the ledger before they
                // were in it: then it is drained. Otherwise (no SKU, or a rebuild that has
                // not read yet) whatever rebuilds the SKU reads the ledger after them (and
                // its fence clears the mark).
                match inventory.drain(sku).await {
                    Ok(drained) => {
                        self.unread.remove(sku);
                        if drained.is_some() {
                            tracing::warn!(
                                sku,
                                "changes of a lost generation reached the ledger after the \
                                 SKU's rebuild read it: rebuilding it again"
                            );
                        }
                        drained
                    }
                    Err(e) => {
                        draining = true;
                        failed(sku, "draining a SKU to rebuild it failed", &e);
                        continue;
                    }
                }
            } else {
                state.filter(|s| s.draining).map(|s| s.gen)
            };
            if let Some(gen) = drained {
                match self.rebuild_again(inventory, writer, sku, &gen).await {
                    Ok(true) => {}
                    Ok(false) => {
                        draining = true;
                        continue;
                    }
                    Err(e) => {
                        draining = true;
                        failed(sku, "draining a SKU to rebuild it failed", &e);
                        continue;
                    }
                }
            }
            let rebuild = match begin_restore(ledger, inventory, sku).await {
                Ok(Some(rebuild)) => rebuild,
                Ok(None) => {
                    serving.push(sku);
                    continue;
                }
                Err(e) => {
                    failed(sku, "recreating a lost SKU failed", &e);
                    continue;
                }
            };
            // Answers of a generation lost since the state was read: in the ledger before
            // this gateway tells the rebuild it has them.
            if let Err(e) = self.write_lost(writer, sku, Some(&rebuild.gen)).await {
                failed(sku, "writing answered changes the engine lost failed", &e);
                continue;
            }
            // And what this gateway's writer read of the lost stream: a change whose answer
            // waited for the ledger and was cut off is in nobody's journal, and committed
            // after the rebuild read the ledger it would be in the ledger alone.
            if !writer.commit_what_was_read(sku, writer_wait).await {
                // A writer stuck on one SKU's commit holds up every SKU: the others of
                // this pass do not wait for it again.
                writer_wait = Duration::ZERO;
                draining = true;
                failed(
                    sku,
                    "committing what the writer read of a lost stream",
                    &"still under way",
                );
                continue;
            }
            match inventory.ack_rebuild(sku, &rebuild.gen, &self.id).await {
                Ok(Ack::Acked) => {
                    self.unread.remove(sku);
                }
                // The rebuild stopped waiting for this gateway (presumed gone), or even
                // ended, and may lack what it wrote: the next pass, soon, drains it and
                // rebuilds again.
                Ok(Ack::Late | Ack::Stale) if self.unread.contains(sku) => {
                    draining = true;
                    continue;
                }
                Ok(Ack::Late | Ack::Stale) => {}
                Err(e) => {
                    failed(sku, "recording this gateway's answers written failed", &e);
                    continue;
                }
            }
            loading.push((sku, rebuild));
        }

        // 3.
        let mut served: Vec<String> = serving.iter().map(|sku| (*sku).clone()).collect();
        let loading = self.acknowledged(ledger, inventory, loading).await;
        for (sku, rebuild) in loading {
            match finish_restore(ledger, inventory, sku, &rebuild.gen).await {
                Ok(report) => {
                    self.cursors.insert(sku.clone(), report.last_local_id);
                    served.push(sku.clone());
                }
                Err(e) => failed(sku, "rebuilding a lost SKU failed", &e),
            }
        }

        // 4.
        for sku in serving {
            let after = if index.ready() {
                self.cursors.get(sku).map(|c| *c).unwrap_or(0)
            } else {
                // The index lost its data: every key is indexed again, not only new ones.
                0
            };
            match warm_sku(ledger, inventory, sku, after, |_| {}).await {
                Ok(report) => {
                    if report.loaded > 0 {
                        tracing::info!(sku, loaded = report.loaded, "loaded new ledger keys");
                    }
                    self.cursors.insert(sku.clone(), report.last_local_id);
                }
                Err(e) => {
                    failed(sku, "loading new ledger keys failed", &e);
                    continue;
                }
            }
            if let Ok(backlog) = writer.backlog(sku).await {
                if let Err(e) = check_epoch(ledger, inventory, sku, backlog.in_flight()).await {
                    tracing::warn!(sku, error = %e, "checking the epoch marker failed");
                }
            }
        }

        if let Err(e) = inventory.register_skus(&served).await {
            tracing::warn!(error = %e, "registering the engine's SKUs failed");
        }

        self.draining = draining;

        // 5.
        if !index.ready() && complete {
            match inventory.mark_index_ready(&index).await {
                Ok(true) => tracing::info!(skus = skus.len(), "code index complete"),
                Ok(false) => tracing::warn!(
                    "the engine lost index entries while they were rebuilt: indexing again"
                ),
                Err(e) => tracing::warn!(error = %e, "marking the code index complete failed"),
            }
        }
        skus
    }

    /// Waits until every gateway alive (reported within `grace`) has recorded in each
    /// rebuild that the ledger has what it answered ([`Inventory::ack_rebuild`]), for up to
    /// [`ACK_WAIT`]; returns the rebuilds that may finish (the others wait in the next
    /// pass). A gateway that is slow to notice the loss, or cannot reach the ledger, is
    /// waited for as long as it reports alive; one that stops reporting (killed, paused,
    /// cut off) for `grace` is presumed gone, and if it comes back with answers of the lost
    /// generation, the SKU is rebuilt again ([`Sync::rebuild_again`]).
    async fn acknowledged<'a>(
        &self,
        ledger: &dyn Ledger,
        inventory: &Inventory,
        mut waiting: Vec<(&'a String, Rebuild)>,
    ) -> Vec<(&'a String, Rebuild)> {
        if self.grace.is_zero() {
            return waiting;
        }
        let deadline = Instant::now() + ACK_WAIT;
        let mut ready = Vec::new();
        loop {
            let mut still = Vec::new();
            for (sku, rebuild) in waiting {
                match rebuild_acknowledged(ledger, inventory, sku, &rebuild, self.grace).await {
                    Ok(Acknowledged::Yes | Acknowledged::Over) => ready.push((sku, rebuild)),
                    Ok(Acknowledged::Waiting(missing)) => {
                        if Instant::now() >= deadline {
                            tracing::info!(
                                sku = sku.as_str(),
                                ?missing,
                                "the rebuild waits for gateways to write what they answered"
                            );
                        }
                        still.push((sku, rebuild));
                    }
                    Err(e) => {
                        tracing::warn!(sku = sku.as_str(), error = %e, "checking a rebuild's gateways failed");
                        still.push((sku, rebuild));
                    }
                }
            }
            waiting = still;
            if waiting.is_empty() || Instant::now() >= deadline {
                return ready;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes into the ledger what this gateway answered of every generation of `sku` but
    /// `present` and kept in its journal; if any of it is new to the ledger, `sku` is
    /// [`Sync::unread`] until a rebuild that reads the ledger afterwards is sure.
    async fn write_lost(
        &mut self,
        writer: &EventWriter,
        sku: &str,
        present: Option<&str>,
    ) -> Result<(), crate::ledger::LedgerError> {
        if writer.flush_lost(sku, present).await? > 0 {
            self.unread.insert(sku.to_owned());
        }
        Ok(())
    }

    /// Rebuilds `sku` again once its generation `gen` is draining ([`Inventory::drain`]):
    /// answers of a generation the engine lost reached the ledger only after `gen` was
    /// rebuilt from it (or began reading it), because this gateway was paused, or could not
    /// reach the ledger, for longer than the rebuild's grace. The engine may then offer
    /// codes the ledger records as sold, and lack orders that were answered. So every event
    /// `gen` made is committed by the gateways' writers, and then it is dropped, to be
    /// rebuilt from the ledger (which has both) like any SKU the engine lost. Any gateway
    /// that finds the SKU draining carries this on, so it ends even if this one dies.
    ///
    /// Returns `true` once the generation is gone (the caller rebuilds it), `false` while its
    /// events are still being committed (the next pass tries again).
    async fn rebuild_again(
        &self,
        inventory: &Inventory,
        writer: &EventWriter,
        sku: &str,
        gen: &str,
    ) -> Result<bool, crate::error::Error> {
        // No script changes a draining generation, so its backlog only shrinks.
        let deadline = Instant::now() + DRAIN_WAIT;
        while writer.backlog(sku).await?.in_flight() > 0 {
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !inventory.drop_drained(sku, gen).await? {
            return Ok(true);
        }
        // What this gateway still kept of the dropped generation is committed; writing it
        // again changes nothing, but it must not be answered as made any more.
        writer.flush_lost(sku, None).await?;
        Ok(true)
    }
}

/// Reports this gateway alive to the ledger every [`ALIVE_EVERY`] until `stopped`: a
/// rebuild after Redis lost a SKU waits for every gateway alive to write what it answered
/// (see [`Sync::acknowledged`]).
async fn report_alive(app: Arc<App>, id: String, mut stopped: watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(ALIVE_EVERY) => {}
        }
        let now = app.inventory.now_ms() as i64;
        match app.ledger.gateway_seen(&id, now).await {
            Ok(()) => failing = false,
            // Said once per outage: the ledger's own trouble is reported elsewhere.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "reporting this gateway alive to the ledger failed");
            }
            Err(_) => {}
        }
    }
}

/// Keeps the engine up to the ledger: in full every [`SYNC_EVERY`], and at once when the
/// engine lost its data (checked every [`LOSS_CHECK_EVERY`]) or a request found a SKU
/// missing or loading.
async fn keep_in_sync(app: Arc<App>, mut sync: Sync, mut stopped: watch::Receiver<bool>) {
    let mut synced_at = Instant::now();
    loop {
        let told = tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(LOSS_CHECK_EVERY) => false,
            _ = app.inventory.lost_sku() => true,
        };
        // Not ready: the marks went with the engine's data (or are not set yet).
        let lost = told || sync.draining || !app.inventory.index_ready().await.unwrap_or(true);
        if !lost && synced_at.elapsed() < SYNC_EVERY {
            continue;
        }
        let known = sync
            .run(app.ledger.as_ref(), &app.inventory, &app.writer)
            .await;
        app.skus.know(&known);
        synced_at = Instant::now();
    }
}

/// Lapses due holds of every SKU on a fixed interval, and refreshes the inventory and
/// engine-up gauges. Claims and confirms lapse due holds themselves too; this sweep makes
/// returned stock visible in counts and to other readers within an interval.
async fn sweep_holds(app: Arc<App>, every: Duration, mut stopped: watch::Receiver<bool>) {
    let inventory = &app.inventory;
    const BATCH: u64 = 500;
    const GAUGES_EVERY: Duration = Duration::from_secs(5);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut skus: Vec<String> = Vec::new();
    let mut listed_at: Option<Instant> = None;
    let mut gauges_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = ticker.tick() => {}
        }
        if listed_at.is_none_or(|t| t.elapsed() >= GAUGES_EVERY) {
            match inventory.list_skus().await {
                Ok(mut list) => {
                    // Name order: which SKUs get a metric label of their own is then the
                    // same at every start (see `metrics::SkuLabels`).
                    list.sort_unstable();
                    skus = list;
                    listed_at = Some(Instant::now());
                    metrics::gauge!(m::ENGINE_UP).set(1.0);
                }
                Err(e) => {
                    metrics::gauge!(m::ENGINE_UP).set(0.0);
                    tracing::warn!(error = %e, "hold sweep: listing SKUs failed");
                    continue;
                }
            }
        }
        for sku in &skus {
            // Bounded per tick so one SKU with a backlog cannot starve the others.
            for _ in 0..10 {
                match inventory.expire_due(sku, BATCH).await {
                    Ok((lapsed, more)) => {
                        metrics::counter!(m::HOLDS_EXPIRED).increment(lapsed);
                        if lapsed > 0 {
                            app.edge.sold_out.invalidate(sku);
                        }
                        if !more {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(sku, error = %e, "hold sweep failed");
                        break;
                    }
                }
            }
        }
        if gauges_at.is_none_or(|t| t.elapsed() >= GAUGES_EVERY) {
            gauges_at = Some(Instant::now());
            let mut other = SkuGauges::default();
            let mut others = 0;
            for sku in &skus {
                let gauges = SkuGauges::read(&app, sku).await;
                let label = m::sku_labels().label(sku);
                if label == m::OTHER_SKU {
                    other.add(&gauges);
                    others += 1;
                } else {
                    gauges.publish(label);
                }
            }
            if others > 0 {
                other.publish(m::OTHER_SKU.to_owned());
            }
        }
    }
}

/// How often settled records are retired (see [`retire_settled`]).
const RETIRE_EVERY: Duration = Duration::from_secs(1);

/// Retires every SKU's settled orders and redemption marks older than `retention` (zero:
/// none, the records are kept for good) whose events the ledger has, as far as this
/// gateway's writer knows ([`crate::inventory::retire`]).
async fn retire_settled(app: Arc<App>, retention: Duration, mut stopped: watch::Receiver<bool>) {
    /// Entries per script call: a call stays short however much is due.
    const BATCH: u64 = 500;
    /// Calls per SKU per pass, so one SKU with a backlog cannot starve the others.
    const CALLS: usize = 10;
    const LIST_EVERY: Duration = Duration::from_secs(5);
    let keep = retention.is_zero();
    let mut ticker = tokio::time::interval(RETIRE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut skus: Vec<String> = Vec::new();
    let mut listed_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = ticker.tick() => {}
        }
        if listed_at.is_none_or(|t| t.elapsed() >= LIST_EVERY) {
            match app.inventory.list_skus().await {
                Ok(list) => {
                    skus = list;
                    listed_at = Some(Instant::now());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention: listing SKUs failed");
                    continue;
                }
            }
        }
        let cutoff = app
            .inventory
            .now_ms()
            .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        for sku in &skus {
            // Nothing is known committed before the writer read the SKU: nothing retires.
            let through = match app.writer.committed_through(sku) {
                Some(through) => through,
                None if keep => String::new(),
                None => continue,
            };
            for _ in 0..CALLS {
                match app
                    .inventory
                    .retire(sku, cutoff, &through, BATCH, keep)
                    .await
                {
                    Ok(retired) => {
                        metrics::counter!(m::RETIRED, "record" => "order")
                            .increment(retired.orders);
                        metrics::counter!(m::RETIRED, "record" => "redemption")
                            .increment(retired.marks);
                        if !retired.more {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(sku, error = %e, "retention pass failed");
                        break;
                    }
                }
            }
        }
    }
}

/// Drops idle limiter state (buckets of clients gone quiet, expired cache entries) so memory
/// follows the active clients, not every client ever seen.
async fn sweep_limiters(app: Arc<App>, mut stopped: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(app.edge.sweep_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = ticker.tick() => app.edge.sweep(),
        }
    }
}

/// Reads the pauses in force from the ledger every `every`, so a pause made through another
/// gateway or `kamigate pause` is enforced here within that interval.
async fn keep_pauses(app: Arc<App>, every: Duration, mut stopped: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = ticker.tick() => {}
        }
        app.pauses.refresh(app.ledger.as_ref()).await;
    }
}

/// Reads the channels and their tokens from the ledger every `every`, so a channel or token
/// made or revoked through another gateway is served here within that interval.
async fn keep_channels(app: Arc<App>, every: Duration, mut stopped: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = ticker.tick() => {}
        }
        app.channels.refresh(app.ledger.as_ref()).await;
    }
}

/// One SKU's gauges: engine and ledger counts, what its stream still owes the ledger, and
/// drift. What can be known is published even while the other store is down: during a
/// ledger outage the growing number of events in flight is exactly what on-call needs to
/// see. Past the SKU label cap, SKUs are added up into one `(other)` set (the oldest
/// pending age: the oldest of them).
#[derive(Debug, Default)]
struct SkuGauges {
    engine: Option<[u64; 5]>,
    ledger: Option<[u64; 5]>,
    /// Events in flight, and the age of the oldest, in milliseconds.
    backlog: Option<(u64, u64)>,
    drift: Option<u64>,
    /// Codes each stock pool holds, by channel, and the shared remainder under
    /// [`m::SHARED_POOL`]; every channel this gateway serves is listed (0 when it has none).
    pools: Option<std::collections::BTreeMap<String, u64>>,
}

impl SkuGauges {
    async fn read(app: &App, sku: &str) -> SkuGauges {
        let (engine, ledger, backlog, pools) = tokio::join!(
            app.inventory.counts(sku),
            app.ledger.counts(sku),
            app.writer.backlog(sku),
            app.inventory.pools(sku)
        );
        let pools = pools.ok().map(|levels| {
            let mut all: std::collections::BTreeMap<String, u64> =
                app.channels.names().into_iter().map(|c| (c, 0)).collect();
            all.extend(levels.pools);
            all.insert(m::SHARED_POOL.to_owned(), levels.shared);
            all
        });
        let drift = match (&engine, &ledger, &backlog) {
            (Ok(engine), Ok(ledger), Ok(backlog)) => {
                Some(Drift::between(engine, ledger, backlog.in_flight(), backlog.keys).keys)
            }
            _ => None,
        };
        SkuGauges {
            engine: engine
                .as_ref()
                .ok()
                .map(|c| [c.available, c.held, c.claimed, c.redeemed, c.void]),
            ledger: ledger
                .as_ref()
                .ok()
                .map(|c| [c.available, c.held, c.claimed, c.redeemed, c.void]),
            backlog: backlog
                .ok()
                .map(|b| (b.in_flight(), b.oldest_pending_age_ms)),
            drift,
            pools,
        }
    }

    /// Adds another SKU's gauges into these (an unknown value of either stays unknown
    /// only if neither knows it).
    fn add(&mut self, other: &SkuGauges) {
        fn sum(a: &mut Option<[u64; 5]>, b: Option<[u64; 5]>) {
            if let Some(b) = b {
                let a = a.get_or_insert([0; 5]);
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
            }
        }
        sum(&mut self.engine, other.engine);
        sum(&mut self.ledger, other.ledger);
        if let Some((n, age)) = other.backlog {
            let b = self.backlog.get_or_insert((0, 0));
            b.0 += n;
            b.1 = b.1.max(age);
        }
        if let Some(d) = other.drift {
            *self.drift.get_or_insert(0) += d;
        }
        if let Some(pools) = &other.pools {
            let mine = self.pools.get_or_insert_with(Default::default);
            for (pool, n) in pools {
                *mine.entry(pool.clone()).or_default() += n;
            }
        }
    }

    fn publish(&self, sku: String) {
        if let Some(engine) = self.engine {
            for (state, n) in m::KEY_STATES.iter().zip(engine) {
                metrics::gauge!(m::INVENTORY_KEYS, "sku" => sku.clone(), "state" => *state)
                    .set(n as f64);
            }
        }
        if let Some(ledger) = self.ledger {
            for (state, n) in m::KEY_STATES.iter().zip(ledger) {
                metrics::gauge!(m::LEDGER_KEYS, "sku" => sku.clone(), "state" => *state)
                    .set(n as f64);
            }
        }
        if let Some((in_flight, age_ms)) = self.backlog {
            metrics::gauge!(m::IN_FLIGHT_EVENTS, "sku" => sku.clone()).set(in_flight as f64);
            metrics::gauge!(m::STREAM_BACKLOG, "sku" => sku.clone()).set(in_flight as f64);
            metrics::gauge!(m::STREAM_OLDEST_AGE, "sku" => sku.clone()).set(age_ms as f64 / 1000.0);
        }
        if let Some(drift) = self.drift {
            metrics::gauge!(m::DRIFT, "sku" => sku.clone()).set(drift as f64);
        }
        for (pool, n) in self.pools.iter().flatten() {
            metrics::gauge!(m::POOL_CODES, "sku" => sku.clone(), "pool" => pool.clone())
                .set(*n as f64);
        }
        // Registered at 0 so the dead-letter alert's `increase()` sees the first one.
        metrics::counter!(m::EVENTS_DEAD_LETTERED, "sku" => sku).increment(0);
    }
}
