//! The HTTP edge: two hyper 1.x listeners, routing, auth, metrics and graceful shutdown.
//!
//! - The public listener serves `POST /v1/redeem` and the probes `/healthz` and `/readyz`
//!   (no token; load balancers probe the port they route to) and the merchant routes
//!   (a channel's bearer token; the merchant token is the default channel's).
//! - The admin listener serves the admin routes (admin bearer token) and, without a token,
//!   `/healthz`, `/readyz` and `/metrics`; it is meant to stay off the public network.
//!
//! Routes are matched with `matchit`; the matched pattern, never the raw path, labels the
//! metrics; path parameters and query values reach handlers percent-decoded ([`target`]).
//! Each route declares its methods: another method is `ERR_METHOD_NOT_ALLOWED` with an
//! `Allow` header. Each route also declares who may call it ([`Auth`]), and the router
//! checks that once, before the handler runs, so no handler checks a token itself.
//! Handlers live one file per group: [`public`], [`merchant`], [`admin`], [`pauses`],
//! [`channels`], [`statements`].
//! Connection caps, the header read timeout and head limits are in [`conn`].

pub mod admin;
pub mod body;
pub mod channels;
pub mod conn;
pub mod guard;
pub mod merchant;
pub mod pauses;
pub mod pools;
pub mod public;
pub mod starting;
pub mod statements;
pub mod target;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::AUTHORIZATION;
use http::{Method, Request};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::channel::{self, Channel, Channels};
use crate::config::{Config, Durability};
use crate::error::Error;
use crate::inventory::settings::SkuSettings;
use crate::inventory::{AnswerEntry, Emitted, Inventory};
use crate::ledger::journal::Kept;
use crate::ledger::writer::EventWriter;
use crate::ledger::Ledger;
use crate::metrics as m;
use crate::pause::Pauses;
use body::Reply;
use conn::{ConnectionCap, HeadLimits, LingeringStream};
use guard::Edge;
pub use target::Params;

/// Everything handlers share.
pub struct App {
    pub inventory: Inventory,
    /// The durable record: imports land here first, engine events end here.
    pub ledger: Arc<dyn Ledger>,
    /// Moves engine events into the ledger; answers wait on it with `durability = "ledger"`.
    pub writer: EventWriter,
    /// When state changes are answered, and how long they may wait for the ledger.
    pub durability: Durability,
    pub ledger_wait: std::time::Duration,
    /// How long a rebuild waits for other gateways' answers to reach the ledger.
    pub rebuild_grace: std::time::Duration,
    pub skus: SkuSettings,
    pub limits: Limits,
    pub edge: Edge,
    /// Claims and redemptions paused by an operator, as this gateway last read them.
    pub pauses: Pauses,
    /// The selling channels, as this gateway last read them; the merchant token is the
    /// default one.
    pub channels: Channels,
    admin_token: String,
    draining: AtomicBool,
    /// When `/readyz` last answered (ms since the epoch; 0: never): whether something
    /// watches readiness, and so needs the shutdown delay to notice the gateway leaving.
    readiness_probed_ms: AtomicU64,
    /// Set when the operator at a terminal interrupted the gateway: stop without the delay.
    hurry: AtomicBool,
}

/// Request and connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_import_bytes: u64,
    /// Request target and header limits, and the header read timeout.
    pub head: HeadLimits,
    /// Connections open at once on the public listener.
    pub max_connections: usize,
    /// Connections open at once on the admin listener.
    pub admin_max_connections: usize,
}

impl Limits {
    /// The limits `config` sets.
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            max_body_bytes: config.max_body_bytes,
            max_import_bytes: config.max_import_bytes,
            head: HeadLimits {
                max_uri_bytes: config.max_uri_bytes,
                max_header_bytes: config.max_header_bytes,
                max_headers: config.max_headers,
                header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
            },
            max_connections: config.max_connections,
            admin_max_connections: config.admin_max_connections,
        }
    }
}

impl App {
    /// An app over `inventory` with the given bearer tokens.
    pub fn new(
        inventory: Inventory,
        ledger: Arc<dyn Ledger>,
        writer: EventWriter,
        tokens: (String, String),
        limits: Limits,
        config: &Config,
    ) -> App {
        let (merchant_token, admin_token) = tokens;
        App {
            edge: Edge::new(
                config.limits.clone(),
                inventory.engine().clone(),
                inventory.clock(),
            ),
            skus: SkuSettings::with_ledger(ledger.clone()),
            pauses: Pauses::new(config.pause_retry_after_secs),
            channels: Channels::new(
                &merchant_token,
                channel::Defaults {
                    bucket: config.limits.merchant,
                    breaker: config.channel_breaker,
                },
            ),
            inventory,
            ledger,
            writer,
            durability: config.durability(),
            ledger_wait: std::time::Duration::from_millis(config.ledger_wait_ms),
            rebuild_grace: std::time::Duration::from_millis(config.rebuild_grace_ms),
            limits,
            admin_token,
            draining: AtomicBool::new(false),
            readiness_probed_ms: AtomicU64::new(0),
            hurry: AtomicBool::new(false),
        }
    }

    /// Makes the change behind an answer as durable as the configuration promises before
    /// it is answered. With `durability = "ledger"`, waits until the ledger committed its
    /// event; the change stands either way: on timeout the client is told to retry, and the
    /// retry replays it. With `durability = "engine"`, keeps the change in the journal
    /// until the ledger has it; a change of a generation the engine already lost is not
    /// answered as made (the client retries against the rebuilt engine). Earlier events
    /// the answer stands on ([`Emitted::before`]) are kept, or awaited, along with it.
    ///
    /// A replay (`emitted` is `None`) stands on a change an earlier call made, maybe
    /// through a gateway that died or stalled before it kept or awaited it: the stream
    /// tells what that change still needs ([`crate::inventory::Inventory::answer_entry`]),
    /// at the cost of one engine call. Nothing once the ledger has it.
    pub async fn durable(
        &self,
        sku: &str,
        event_id: Option<&str>,
        emitted: Option<&Emitted>,
    ) -> Result<(), Error> {
        let Some(event_id) = event_id.filter(|id| !id.is_empty()) else {
            return Ok(());
        };
        let replayed;
        let emitted = match emitted {
            Some(emitted) => emitted,
            None => match self.inventory.answer_entry(sku, event_id).await? {
                AnswerEntry::Settled => return Ok(()),
                AnswerEntry::Lost => return Err(lost()),
                AnswerEntry::Kept(entry) => {
                    replayed = entry;
                    &replayed
                }
            },
        };
        if self.durability == Durability::Engine {
            let journal = self.writer.journal();
            for event in emitted.before.iter().chain([emitted]) {
                match journal.keep(sku, &event.answer_id, &event.fields) {
                    Kept::Kept => {}
                    Kept::Lost => return Err(lost()),
                    Kept::Full => {
                        return Err(Error::Unavailable(
                            "the ledger is too far behind to keep more changes; retry".into(),
                        ))
                    }
                }
            }
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.ledger_wait;
        let before = emitted.before.iter().map(|e| e.answer_id.as_str());
        for id in before.chain([event_id]) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !self.writer.wait_committed(sku, id, left).await {
                return Err(Error::Unavailable(
                    "the ledger has not confirmed the change yet".into(),
                ));
            }
        }
        Ok(())
    }

    /// With `durability = "ledger"`, answers a request that changed nothing (the state it
    /// asked for was there already) only once `agrees`, a read of the ledger, finds that
    /// state there too, within `ledger_wait`: the state may stand on an earlier call's
    /// change whose answer timed out waiting for the ledger, the call the client now
    /// retries. Such a change left no event this call could wait on, hence the reads.
    /// Nothing to wait for in engine mode, where the engine's state is the answer.
    pub async fn ledger_agrees<F, Fut>(&self, agrees: F) -> Result<(), Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<bool, Error>>,
    {
        if self.durability != Durability::Ledger {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.ledger_wait;
        loop {
            if agrees().await? {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(
                    "the ledger has not confirmed the change yet".into(),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Whether shutdown has begun (readiness then answers 503).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Notes that `/readyz` answered: something watches readiness.
    pub(crate) fn readiness_probed(&self) {
        self.readiness_probed_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
    }

    /// Asks the coming shutdown to skip its delay (an operator stopped the gateway by hand).
    pub fn hurry(&self) {
        self.hurry.store(true, Ordering::Relaxed);
    }

    /// How long to keep serving with readiness at 503 once shutdown begins: the configured
    /// delay while load balancers may still route here (a readiness probe answered within
    /// [`PROBES_REMEMBERED`], or clients connected to the public listener), none when nothing
    /// would notice or the operator hurried.
    fn shutdown_delay(&self, configured: Duration, public_open: usize) -> Duration {
        let probed = self.readiness_probed_ms.load(Ordering::Relaxed);
        let watched = probed > 0
            && crate::clock::now_ms().saturating_sub(probed)
                < u64::try_from(PROBES_REMEMBERED.as_millis()).unwrap_or(u64::MAX);
        if self.hurry.load(Ordering::Relaxed) || !(watched || public_open > 0) {
            Duration::ZERO
        } else {
            configured
        }
    }

    fn authorize(&self, req: &Request<Incoming>, token: &str) -> Result<(), Error> {
        let sent = sent_token(req).ok_or(Error::Unauthorized)?;
        // Constant time, so response timing does not reveal how much of a guess was right.
        if bool::from(sent.ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err(Error::Unauthorized)
        }
    }

    /// Requires what a route's [`Auth`] declares, and says who called. Only the router
    /// calls this, once per request, before the handler runs. A merchant route's caller is
    /// the channel its token belongs to; the request then passes that channel's breaker and
    /// takes from its bucket. Requests with a wrong token are limited by the client's public
    /// bucket instead, so guessing tokens costs as much as any other public request.
    fn check_auth(&self, auth: Auth, req: &Request<Incoming>, ip: IpAddr) -> Result<Caller, Error> {
        match auth {
            Auth::None => Ok(Caller::Anyone),
            Auth::Merchant => {
                let channel = sent_token(req)
                    .ok_or(Error::Unauthorized)
                    .and_then(|token| self.channels.authenticate(token));
                let channel = match channel {
                    Ok(channel) => channel,
                    Err(e) => {
                        self.edge.public(ip)?;
                        return Err(e);
                    }
                };
                let probe = channel.admit(self.inventory.now_ms())?;
                Ok(Caller::Channel { channel, probe })
            }
            Auth::Admin => self
                .authorize(req, &self.admin_token)
                .map(|()| Caller::Admin),
        }
    }
}

/// Who made a request, as its route's [`Auth`] established.
#[derive(Debug, Clone)]
pub enum Caller {
    Anyone,
    Admin,
    /// A merchant route's caller; `probe` when the request is one of its half-open
    /// breaker's probes.
    Channel {
        channel: Arc<Channel>,
        probe: bool,
    },
}

/// A change the engine lost before the ledger had it: not answered as made; the client's
/// retry is answered by the rebuilt engine.
fn lost() -> Error {
    Error::Unavailable("the engine lost this change before the ledger had it; retry".into())
}

/// The bearer token a request carries.
fn sent_token(req: &Request<Incoming>) -> Option<&[u8]> {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()))
}

/// The token of a `Bearer` authorization. The scheme is matched case-insensitively and may
/// be followed by several spaces (RFC 9110 §11.1, §11.4); the token itself is case-sensitive.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(b"Bearer".len())?;
    if !scheme.eq_ignore_ascii_case(b"Bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(&rest[start..])
}

/// Which listener a connection came in on, or a route is served on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Public,
    Admin,
}

/// A readiness probe this recent means a load balancer may still route to the gateway.
pub const PROBES_REMEMBERED: Duration = Duration::from_secs(60);

/// How the edge winds down after the shutdown signal.
#[derive(Debug, Clone, Copy)]
pub struct Shutdown {
    /// Keep serving, with `/readyz` at 503, for this long.
    pub delay: Duration,
    /// Then stop accepting and give in-flight requests this long to finish.
    pub drain: Duration,
}

/// Serves both listeners until `signal` resolves; then readiness turns 503 while serving
/// goes on for `shutdown.delay`, the listeners close, and in-flight requests get up to
/// `shutdown.drain` to finish.
pub async fn serve(
    app: Arc<App>,
    public: TcpListener,
    admin: TcpListener,
    signal: impl Future<Output = ()>,
    shutdown: Shutdown,
) {
    let Shutdown { delay, drain } = shutdown;
    let public_routes = Arc::new(public_routes());
    let admin_routes = Arc::new(admin_routes());
    let limits = app.limits;
    conn::ensure_descriptors(limits.max_connections + limits.admin_max_connections);
    let http1 = Arc::new(limits.head.builder());
    let public_cap = ConnectionCap::new("public", limits.max_connections);
    let admin_cap = ConnectionCap::new("admin", limits.admin_max_connections);
    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_tx, stop_rx) = watch::channel(false);

    let accept = |listener: TcpListener, which: Listener| {
        let app = app.clone();
        let (routes, cap) = match which {
            Listener::Public => (public_routes.clone(), public_cap.clone()),
            Listener::Admin => (admin_routes.clone(), admin_cap.clone()),
        };
        let http1 = http1.clone();
        let mut stop = stop_rx.clone();
        let graceful = graceful.clone();
        async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = stop.changed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(conn) => conn,
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                // Past the cap the socket is closed at once: the client sees the connection end
                // and can retry, instead of waiting in a queue behind idle connections.
                let Some(slot) = cap.admit() else {
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let routes = routes.clone();
                let service = service_fn(move |req| {
                    let app = app.clone();
                    let routes = routes.clone();
                    async move { Ok::<_, Infallible>(handle(&app, &routes, which, req, peer).await) }
                });
                let stream = TokioIo::new(LingeringStream::new(stream));
                let conn = http1.serve_connection(stream, service);
                let conn = graceful.watcher().watch(conn);
                let cap = cap.clone();
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        if e.is_timeout() {
                            cap.timed_out();
                        }
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    drop(slot);
                });
            }
        }
    };

    let public_task = tokio::spawn(accept(public, Listener::Public));
    let admin_task = tokio::spawn(accept(admin, Listener::Admin));
    signal.await;
    app.draining.store(true, Ordering::Relaxed);
    let delay = app.shutdown_delay(delay, public_cap.open());
    tracing::info!(
        delay_ms = delay.as_millis() as u64,
        "shutting down: readiness is now 503"
    );
    tokio::time::sleep(delay).await;
    tracing::info!("closing listeners, draining in-flight requests");
    let _ = stop_tx.send(true);
    let _ = tokio::join!(public_task, admin_task);
    match Arc::try_unwrap(graceful) {
        Ok(graceful) => tokio::select! {
            _ = graceful.shutdown() => tracing::info!("all connections drained"),
            _ = tokio::time::sleep(drain) => {
                tracing::warn!("drain timeout: closing remaining connections");
            }
        },
        // The accept loops own the other handles and have returned, so this is not reached.
        Err(_) => tracing::warn!("connections could not be drained"),
    }
}

/// Every route, on either listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteId {
    Redeem,
    Claims,
    ClaimsBatch,
    Claim,
    ClaimConfirm,
    ClaimRelease,
    Sku,
    Batches,
    BatchActivate,
    Warm,
    KeyVoid,
    KeyEvents,
    Reconcile,
    Rekey,
    KeyRestore,
    FormatRetire,
    Pauses,
    Pause,
    Resume,
    SkuPause,
    SkuResume,
    Channels,
    Channel,
    ChannelTokens,
    ChannelTokenRevoke,
    ChannelEvents,
    Pools,
    Pool,
    PoolMove,
    ChannelStatement,
    ChannelReconcile,
    Healthz,
    Readyz,
    Metrics,
}

/// Who may call a route. The router checks it once, after the path and method matched a
/// route (and, on the public listener, after the in-flight cap) and before the handler runs:
/// a handler cannot forget it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// No token: the probes, and `POST /v1/redeem` (limited per client instead).
    None,
    /// The merchant bearer token, which also takes from that token's bucket.
    Merchant,
    /// The admin bearer token.
    Admin,
}

/// A route table entry: the pattern (the metrics label), what it is, its methods, and who
/// may call it.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub pattern: &'static str,
    pub id: RouteId,
    pub methods: &'static [Method],
    pub auth: Auth,
}

impl Route {
    /// The route's methods as an `Allow` header lists them.
    fn allow(&self) -> String {
        let names: Vec<&str> = self.methods.iter().map(Method::as_str).collect();
        names.join(", ")
    }
}

const GET: &[Method] = &[Method::GET];
const POST: &[Method] = &[Method::POST];
const GET_PUT: &[Method] = &[Method::GET, Method::PUT];
const PUT: &[Method] = &[Method::PUT];

/// A listener's route table.
pub type Routes = matchit::Router<Route>;

fn table(entries: &[Route]) -> Routes {
    let mut router = matchit::Router::new();
    for &route in entries {
        router
            .insert(route.pattern, route)
            .expect("route patterns are fixed and do not conflict");
    }
    router
}

const fn route(
    pattern: &'static str,
    id: RouteId,
    methods: &'static [Method],
    auth: Auth,
) -> Route {
    Route {
        pattern,
        id,
        methods,
        auth,
    }
}

/// The public listener's routes.
const PUBLIC_ROUTES: &[Route] = &[
    // A load balancer probes the port it routes to.
    route("/healthz", RouteId::Healthz, GET, Auth::None),
    route("/readyz", RouteId::Readyz, GET, Auth::None),
    route("/v1/redeem", RouteId::Redeem, POST, Auth::None),
    route("/v1/skus/{sku}", RouteId::Sku, GET, Auth::Merchant),
    route(
        "/v1/skus/{sku}/claims",
        RouteId::Claims,
        POST,
        Auth::Merchant,
    ),
    route(
        "/v1/skus/{sku}/claims/batch",
        RouteId::ClaimsBatch,
        POST,
        Auth::Merchant,
    ),
    route(
        "/v1/skus/{sku}/claims/{order_id}",
        RouteId::Claim,
        GET,
        Auth::Merchant,
    ),
    route(
        "/v1/skus/{sku}/claims/{order_id}/confirm",
        RouteId::ClaimConfirm,
        POST,
        Auth::Merchant,
    ),
    route(
        "/v1/skus/{sku}/claims/{order_id}/release",
        RouteId::ClaimRelease,
        POST,
        Auth::Merchant,
    ),
    // A channel's own books: its token reads its own statement only.
    route(
        "/v1/channels/{channel}/statement",
        RouteId::ChannelStatement,
        GET,
        Auth::Merchant,
    ),
    route(
        "/v1/channels/{channel}/reconcile",
        RouteId::ChannelReconcile,
        POST,
        Auth::Merchant,
    ),
];

/// The admin listener's routes.
const ADMIN_ROUTES: &[Route] = &[
    route("/healthz", RouteId::Healthz, GET, Auth::None),
    route("/readyz", RouteId::Readyz, GET, Auth::None),
    route("/metrics", RouteId::Metrics, GET, Auth::None),
    route("/v1/skus/{sku}", RouteId::Sku, GET_PUT, Auth::Admin),
    route(
        "/v1/skus/{sku}/batches",
        RouteId::Batches,
        POST,
        Auth::Admin,
    ),
    route(
        "/v1/skus/{sku}/batches/{batch_id}/activate",
        RouteId::BatchActivate,
        POST,
        Auth::Admin,
    ),
    route("/v1/skus/{sku}/warm", RouteId::Warm, POST, Auth::Admin),
    route(
        "/v1/skus/{sku}/formats/{version}/retire",
        RouteId::FormatRetire,
        POST,
        Auth::Admin,
    ),
    route(
        "/v1/keys/{key_id}/void",
        RouteId::KeyVoid,
        POST,
        Auth::Admin,
    ),
    route(
        "/v1/keys/{key_id}/events",
        RouteId::KeyEvents,
        GET,
        Auth::Admin,
    ),
    route("/v1/reconcile", RouteId::Reconcile, POST, Auth::Admin),
    route("/v1/rekey", RouteId::Rekey, POST, Auth::Admin),
    route(
        "/v1/keys/{key_id}/restore",
        RouteId::KeyRestore,
        POST,
        Auth::Admin,
    ),
    route("/v1/pauses", RouteId::Pauses, GET, Auth::Admin),
    route("/v1/pause", RouteId::Pause, POST, Auth::Admin),
    route("/v1/resume", RouteId::Resume, POST, Auth::Admin),
    route("/v1/skus/{sku}/pause", RouteId::SkuPause, POST, Auth::Admin),
    route(
        "/v1/skus/{sku}/resume",
        RouteId::SkuResume,
        POST,
        Auth::Admin,
    ),
    route("/v1/channels", RouteId::Channels, GET, Auth::Admin),
    route(
        "/v1/channels/{channel}",
        RouteId::Channel,
        GET_PUT,
        Auth::Admin,
    ),
    route(
        "/v1/channels/{channel}/tokens",
        RouteId::ChannelTokens,
        POST,
        Auth::Admin,
    ),
    route(
        "/v1/channels/{channel}/tokens/{token_id}/revoke",
        RouteId::ChannelTokenRevoke,
        POST,
        Auth::Admin,
    ),
    route(
        "/v1/channels/{channel}/events",
        RouteId::ChannelEvents,
        GET,
        Auth::Admin,
    ),
    route("/v1/skus/{sku}/pools", RouteId::Pools, GET, Auth::Admin),
    route(
        "/v1/skus/{sku}/pool-moves",
        RouteId::PoolMove,
        POST,
        Auth::Admin,
    ),
    route(
        "/v1/skus/{sku}/pools/{channel}",
        RouteId::Pool,
        PUT,
        Auth::Admin,
    ),
    route(
        "/v1/channels/{channel}/statement",
        RouteId::ChannelStatement,
        GET,
        Auth::Admin,
    ),
    route(
        "/v1/channels/{channel}/reconcile",
        RouteId::ChannelReconcile,
        POST,
        Auth::Admin,
    ),
];

fn public_routes() -> Routes {
    table(PUBLIC_ROUTES)
}

fn admin_routes() -> Routes {
    table(ADMIN_ROUTES)
}

/// Every route of both listeners, with the listener that serves it: what the router
/// matches, so tests can walk it (every admin route refuses a merchant token, and so on).
pub fn route_table() -> impl Iterator<Item = (Listener, &'static Route)> {
    let public = PUBLIC_ROUTES.iter().map(|r| (Listener::Public, r));
    let admin = ADMIN_ROUTES.iter().map(|r| (Listener::Admin, r));
    public.chain(admin)
}

/// Registers at 0, for every route, the answers the availability SLIs count as bad (`500`,
/// `503`), and for the public routes (the SLIs' own) the latency histograms of each
/// outcome: the SLIs and dashboards then read 0, not nothing, before the first failure.
pub fn register_metrics() {
    for &Route {
        pattern, methods, ..
    } in PUBLIC_ROUTES.iter().chain(ADMIN_ROUTES)
    {
        for method in methods {
            for (status, code) in [("500", "ERR_INTERNAL"), ("503", "ERR_UNAVAILABLE")] {
                metrics::counter!(m::HTTP_REQUESTS, "route" => pattern,
                    "method" => method_label(method), "status" => status, "code" => code)
                .increment(0);
            }
        }
    }
    for &Route { pattern, .. } in PUBLIC_ROUTES {
        for outcome in ["ok", "client_error", "server_error"] {
            let _ = metrics::histogram!(m::HTTP_DURATION, "route" => pattern, "outcome" => outcome);
        }
    }
}

async fn dispatch(
    app: &App,
    which: Listener,
    route: Route,
    params: Params,
    req: Request<Incoming>,
    ip: IpAddr,
) -> Result<Reply, Error> {
    use RouteId::*;
    let method = req.method().clone();
    // Everything else on the public listener reaches the engine: cap it before any work.
    // Probes are never shed: a load balancer would take an overloaded gateway for a dead one.
    let _slot = match (which, route.id) {
        (Listener::Public, Healthz | Readyz) | (Listener::Admin, _) => None,
        (Listener::Public, _) => Some(app.edge.admit()?),
    };
    let caller = app.check_auth(route.auth, &req, ip)?;
    if let Caller::Channel { channel, probe } = &caller {
        let result = merchant_route(app, channel, route.id, params, req).await;
        channel.observe(app.inventory.now_ms(), *probe, result.as_ref().map(|_| ()));
        return result;
    }
    match (which, route.id, method) {
        (Listener::Public, Redeem, Method::POST) => public::redeem(app, req, ip).await,
        (_, Healthz, Method::GET) => Ok(admin::healthz()),
        // Readiness pings the engine: on the public listener it spends the client's bucket,
        // so nobody turns probes into engine load (a load balancer probes far below it).
        (Listener::Public, Readyz, Method::GET) => {
            app.edge.public(ip)?;
            Ok(admin::readyz(app).await)
        }
        (Listener::Admin, Readyz, Method::GET) => Ok(admin::readyz(app).await),
        (Listener::Admin, Metrics, Method::GET) => Ok(admin::metrics()),
        (Listener::Admin, Sku, Method::PUT) => admin::put_sku(app, params, req).await,
        (Listener::Admin, Sku, Method::GET) => merchant::sku_view(app, params.get("sku")).await,
        (Listener::Admin, Batches, Method::POST) => admin::import(app, params, req).await,
        (Listener::Admin, BatchActivate, Method::POST) => admin::activate(app, params).await,
        (Listener::Admin, Warm, Method::POST) => admin::warm(app, params).await,
        (Listener::Admin, FormatRetire, Method::POST) => {
            admin::retire_format(app, params, req).await
        }
        (Listener::Admin, KeyEvents, Method::GET) => admin::key_events(app, params).await,
        (Listener::Admin, Reconcile, Method::POST) => admin::reconcile(app, req).await,
        (Listener::Admin, Rekey, Method::POST) => admin::rekey(app, req).await,
        (Listener::Admin, KeyVoid, Method::POST) => admin::void(app, params, req, true).await,
        (Listener::Admin, KeyRestore, Method::POST) => admin::void(app, params, req, false).await,
        (Listener::Admin, Pauses, Method::GET) => pauses::list(app, req).await,
        (Listener::Admin, Pause, Method::POST) => pauses::pause(app, None, req).await,
        (Listener::Admin, Resume, Method::POST) => pauses::resume(app, None, req).await,
        (Listener::Admin, SkuPause, Method::POST) => {
            pauses::pause(app, Some(params.get("sku")), req).await
        }
        (Listener::Admin, SkuResume, Method::POST) => {
            pauses::resume(app, Some(params.get("sku")), req).await
        }
        (Listener::Admin, Channels, Method::GET) => channels::list(app).await,
        (Listener::Admin, Channel, Method::GET) => channels::get(app, params).await,
        (Listener::Admin, Channel, Method::PUT) => channels::put(app, params, req).await,
        (Listener::Admin, ChannelTokens, Method::POST) => {
            channels::add_token(app, params, req).await
        }
        (Listener::Admin, ChannelTokenRevoke, Method::POST) => {
            channels::revoke_token(app, params, req).await
        }
        (Listener::Admin, ChannelEvents, Method::GET) => channels::history(app, params, req).await,
        (Listener::Admin, Pools, Method::GET) => pools::levels(app, params).await,
        (Listener::Admin, Pool, Method::PUT) => pools::set(app, params, req).await,
        (Listener::Admin, PoolMove, Method::POST) => pools::move_codes(app, params, req).await,
        (Listener::Admin, ChannelStatement, Method::GET) => {
            statements::statement(app, params.get("channel"), req).await
        }
        (Listener::Admin, ChannelReconcile, Method::POST) => {
            statements::reconcile(app, params.get("channel"), req).await
        }
        // `handle` answers methods the route table does not declare; reaching this means the
        // table declares a method no arm serves.
        (_, route, method) => Err(Error::Internal(format!(
            "the route table lets {method} through to {route:?}, which has no handler for it"
        ))),
    }
}

/// The routes a channel calls (every `Auth::Merchant` route of the public listener).
async fn merchant_route(
    app: &App,
    channel: &Channel,
    route: RouteId,
    params: Params,
    req: Request<Incoming>,
) -> Result<Reply, Error> {
    use RouteId::*;
    if let Some(sku) = params.try_get("sku") {
        channel.may_sell(sku)?;
    }
    // A channel reads its own books only; another channel's name is answered as unknown,
    // so a token cannot even learn which other channels exist.
    if let Some(name) = params.try_get("channel") {
        if name != channel.name {
            return Err(Error::NotFound(format!("channel {name}")));
        }
    }
    match (route, req.method().clone()) {
        (Sku, Method::GET) => merchant::sku_view(app, params.get("sku")).await,
        (Claims, Method::POST) => merchant::claim(app, channel, params, req).await,
        (ClaimsBatch, Method::POST) => merchant::claim_batch(app, channel, params, req).await,
        (Claim, Method::GET) => merchant::order(app, channel, params).await,
        (ClaimConfirm, Method::POST) => merchant::confirm(app, channel, params).await,
        (ClaimRelease, Method::POST) => merchant::release(app, channel, params).await,
        (ChannelStatement, Method::GET) => statements::statement(app, &channel.name, req).await,
        (ChannelReconcile, Method::POST) => statements::reconcile(app, &channel.name, req).await,
        (route, method) => Err(Error::Internal(format!(
            "the route table lets {method} through to {route:?}, which has no merchant handler"
        ))),
    }
}

async fn handle(
    app: &App,
    routes: &Routes,
    which: Listener,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Reply {
    let started = Instant::now();
    let method = req.method().clone();
    let (pattern, result) = if let Err(e) = app.limits.head.check(&req) {
        ("unmatched", Err(e))
    } else {
        match routes.at(req.uri().path()) {
            Ok(found) if !found.value.methods.contains(&method) => (
                found.value.pattern,
                Err(Error::MethodNotAllowed {
                    allow: found.value.allow(),
                }),
            ),
            Ok(found) => {
                let route = *found.value;
                let result = match Params::decode(&found.params) {
                    Ok(params) => {
                        let ip = app.edge.client_ip(peer, req.headers());
                        dispatch(app, which, route, params, req, ip).await
                    }
                    Err(e) => Err(e),
                };
                (route.pattern, result)
            }
            Err(_) => ("unmatched", Err(Error::NotFound("route".into()))),
        }
    };
    let (response, code) = match result {
        Ok(response) => (response, "OK"),
        Err(e) => {
            if let Error::Internal(details) = &e {
                tracing::error!(route = pattern, %method, details, "request failed");
            }
            (body::error(&e), e.code())
        }
    };
    let status = response.status();
    let outcome = if status.is_server_error() {
        "server_error"
    } else if status.is_client_error() {
        "client_error"
    } else {
        "ok"
    };
    metrics::counter!(m::HTTP_REQUESTS, "route" => pattern, "method" => method_label(&method),
        "status" => status.as_u16().to_string(), "code" => code)
    .increment(1);
    metrics::histogram!(m::HTTP_DURATION, "route" => pattern, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Methods as a bounded label set.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_is_not() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"BEARER ABC"), Some(&b"ABC"[..]));
        assert_eq!(bearer_token(b"bEaReR   abc"), Some(&b"abc"[..]));
        for refused in [
            &b"Bearer"[..],
            b"Bearer ",
            b"Bearerabc",
            b"Basic abc",
            b"Bear abc",
        ] {
            assert_eq!(bearer_token(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn only_the_probes_and_redeem_are_open() {
        let open: Vec<_> = route_table()
            .filter(|(_, r)| r.auth == Auth::None)
            .map(|(listener, r)| (listener, r.pattern))
            .collect();
        assert_eq!(
            open,
            [
                (Listener::Public, "/healthz"),
                (Listener::Public, "/readyz"),
                (Listener::Public, "/v1/redeem"),
                (Listener::Admin, "/healthz"),
                (Listener::Admin, "/readyz"),
                (Listener::Admin, "/metrics"),
            ]
        );
        for (listener, route) in route_table().filter(|(_, r)| r.auth != Auth::None) {
            let expected = match listener {
                Listener::Public => Auth::Merchant,
                Listener::Admin => Auth::Admin,
            };
            assert_eq!(route.auth, expected, "{listener:?} {}", route.pattern);
        }
    }

    #[test]
    fn the_allow_header_lists_a_routes_methods() {
        let admin = admin_routes();
        let sku = admin.at("/v1/skus/s").expect("matched");
        assert_eq!(sku.value.allow(), "GET, PUT");
        let public = public_routes();
        let redeem = public.at("/v1/redeem").expect("matched");
        assert_eq!(redeem.value.allow(), "POST");
    }

    #[test]
    fn batch_claims_have_their_own_route_beside_orders() {
        let public = public_routes();
        let at = |path: &str| public.at(path).map(|m| m.value.id).ok();
        assert_eq!(at("/v1/skus/s/claims/batch"), Some(RouteId::ClaimsBatch));
        assert_eq!(at("/v1/skus/s/claims/o-1"), Some(RouteId::Claim));
        assert_eq!(
            at("/v1/skus/s/claims/batch/confirm"),
            Some(RouteId::ClaimConfirm),
            "an order named batch can still be confirmed"
        );
    }
}
