//! The Redis engine: the scripts of `lua/` run inside Redis (standalone, Sentinel or Cluster).
//!
//! # Why it is built this way
//!
//! - **One multiplexed connection.** A single fred [`Client`] pipelines every concurrent
//!   script call over one connection per node. Measured on the target hardware it beats a
//!   pool: the scripts are tiny, so throughput is bound by syscalls and round trips, which
//!   pipelining amortises. Do not put a pool behind this engine.
//! - **Functions, `FCALL`.** The shipped scripts are the functions of one library
//!   ([`LIBRARY`]), so Redis runs the prelude once when it loads the library instead of on
//!   every call (about 2 µs of Redis time a call, 8 % of a single claim; BENCHMARKS.md).
//! - **Reload on "Function not found".** Redis has no library after `FUNCTION FLUSH`, a
//!   restart without persistence, a failover to a replica that never had it, and on every
//!   Cluster node that has not seen it yet. A call answered "Function not found" ran nothing,
//!   so the engine loads the library on that call's node (the one owning its keys' slot) and
//!   sends the call again, once: no bookkeeping of which node has it. The load is
//!   `FUNCTION LOAD` without `REPLACE`, "already exists" counting as loaded: the library's
//!   name is a hash of its text, so a library of that name is this one, and after a flush a
//!   burst of concurrent calls compiles it once, not once per call.
//! - **EVALSHA, then EVAL on `NOSCRIPT`**, for scripts outside the library (tests' probes):
//!   `NOSCRIPT` means nothing ran, and `EVAL` with the source runs it and caches it again.
//! - **The event writer's reads of new entries beside the script.** A busy writer reads the
//!   entries it has not seen after each commit; `XREADGROUP` answers them straight from the
//!   stream, where `stream.lua` would copy each one into a Lua table and back. The read is one
//!   `MULTI` of the script (acknowledging and reporting only) and `XREADGROUP`
//!   ([`ScriptEngine::read_new_entries`]), so it stays one atomic step.
//! - **Those reads on a second connection.** On the scripts' connection a read queued behind
//!   the claims pipelined there, and a durable answer waits for the read of its event: on its
//!   own connection it waits at most for the script Redis is running (BENCHMARKS.md, "The
//!   writer's reads on a connection of their own").
//! - **Raw reply frames.** Replies are converted from the protocol frames rather than from
//!   fred's `Value`, because `Value` cannot tell a status reply (`{ok=…}`) from a bulk string,
//!   and error replies nested in arrays must not be lost. RESP2 is forced, so the conversion
//!   matches what Redis does to Lua values and what the embedded engine reproduces.
//! - **Fail fast, never hang.** Every call carries the command timeout and fred's per-command
//!   `fail_fast` flag: while the connection is down a call fails at once with
//!   [`EngineError::Unavailable`] instead of queueing until Redis returns, and a call whose
//!   connection drops mid-flight is not silently re-sent (a script may already have run; only
//!   the caller knows whether retrying is safe). Meanwhile the client reconnects in the
//!   background with capped exponential backoff, forever, so the gateway survives Redis
//!   restarts and failovers without being recreated.
//! - **A deadline on every call.** A call that timed out may still be on its way: held in a
//!   stalled connection, a proxy, a kernel buffer. Were it to run once it arrives, after its
//!   caller answered it as failed and the client went on (a void retried through another
//!   gateway, then restored), it would undo what came after it. So each call carries the
//!   latest moment it may start ([`RedisOptions::clock_skew_margin_ms`]), and the prelude's
//!   `begin` refuses a late one with `LATE`, which reads as [`EngineError::Unavailable`]:
//!   every call runs before its caller gives up on it, or never.
//! - **No secrets in errors.** Error messages carry Redis's error text and fred's transport
//!   error, never the keys or arguments of a call (they can hold secret codes).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fred::prelude::{
    Client, ClientLike, ClusterInterface, Config, EventInterface, HashesInterface, Options,
    ReconnectPolicy, TcpConfig, TransactionInterface, Value,
};
use fred::types::{Builder, ClusterHash, CustomCommand, Resp3Frame, RespVersion};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::{
    with_new_entries, EngineError, EngineKind, Reply, Script, ScriptEngine, LIBRARY, SCRIPTS,
};

/// Connection settings of [`RedisEngine`]. Start from [`RedisOptions::default`] and override
/// fields with struct update syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Bound on opening one connection: TCP connect plus the handshake (`AUTH`, `SELECT`,
    /// Cluster slot discovery, Sentinel master lookup). Applies to the first connection, per
    /// seed node, and to every reconnection attempt. Default 3,000 ms.
    pub connect_timeout_ms: u64,
    /// Bound on one call, from sending it to its reply. A call that exceeds it fails with
    /// [`EngineError::Unavailable`] (the script may still run). Also the default timeout of
    /// commands sent through [`RedisEngine::client`]. `0` is treated as 1 ms: timeouts cannot be
    /// disabled. Default 2,000 ms.
    pub command_timeout_ms: u64,
    /// First delay before reconnecting after a connection is lost; it doubles on each failed
    /// attempt up to [`RedisOptions::reconnect_max_delay_ms`]. Default 50 ms.
    pub reconnect_min_delay_ms: u32,
    /// Cap on the delay between reconnection attempts, which go on forever. It is also the
    /// longest the engine may stay unavailable after Redis is back. Default 2,000 ms.
    pub reconnect_max_delay_ms: u32,
    /// How far Redis's clock may be behind the gateway's. A script call carries a deadline,
    /// the moment it is sent plus [`RedisOptions::command_timeout_ms`] less this margin, and
    /// Redis refuses to run a script it starts after it (`begin` in `lua/prelude.lua`), so a
    /// call the gateway gave up on never takes effect later, when it may undo what came after
    /// it (a restore after a retried void). At most half the command timeout is taken. Default
    /// 250 ms.
    pub clock_skew_margin_ms: u64,
    /// A connection with a command outstanding for longer than this is considered dead (a
    /// silently dropped network path, a frozen server) and is closed and reconnected. Must
    /// exceed the slowest legitimate script. `0` disables the check. Default 10,000 ms.
    pub unresponsive_timeout_ms: u64,
}

impl Default for RedisOptions {
    fn default() -> RedisOptions {
        RedisOptions {
            connect_timeout_ms: 3_000,
            command_timeout_ms: 2_000,
            reconnect_min_delay_ms: 50,
            reconnect_max_delay_ms: 2_000,
            clock_skew_margin_ms: 250,
            unresponsive_timeout_ms: 10_000,
        }
    }
}

/// Runs the scripts in Redis through one multiplexed fred [`Client`].
///
/// Create it with [`RedisEngine::connect`]; it reconnects by itself for as long as it lives.
/// Dropping it does not close the connection (other holders of [`RedisEngine::client`] may
/// still use it): call [`RedisEngine::quit`] on shutdown.
pub struct RedisEngine {
    /// The shared client, for [`RedisEngine::client`] and connection management.
    client: Client,
    /// The same client with the per-call options (timeout, fail fast) applied.
    calls: fred::clients::WithOptions<Client>,
    /// A connection of the same configuration for the event writer's reads of new entries
    /// ([`ScriptEngine::read_new_entries`]).
    reads: Client,
    /// Throttles reconnections forced by `READONLY` replies after a Sentinel failover.
    last_forced_reconnect: std::sync::Mutex<Option<Instant>>,
    /// How long after it is sent a script may still start ([`RedisOptions::clock_skew_margin_ms`]).
    late_after: Duration,
}

impl fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisEngine")
            .field("client_id", &self.client.id())
            .field("state", &self.client.state())
            .finish_non_exhaustive()
    }
}

/// Error prefixes of replies that mean "Redis cannot serve this now", not "the script is
/// wrong": they map to [`EngineError::Unavailable`] so callers answer 503 and retry later.
const UNAVAILABLE_PREFIXES: &[&str] = &[
    // The prelude's: the call reached Redis after its deadline and ran nothing.
    "LATE",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "READONLY",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "NOREPLICAS",
    "OOM",
    "MISCONF",
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
];

/// Minimum time between two reconnections forced by `READONLY` replies.
const FORCED_RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

impl RedisEngine {
    /// Checks that `url` is one [`RedisEngine::connect`] accepts, without connecting: a
    /// malformed URL is a mistake to report, not an outage to wait out.
    pub fn check_url(url: &str) -> Result<(), EngineError> {
        let fred_url = to_fred_url(url).map_err(invalid_url)?;
        Config::from_url(&fred_url).map_err(|e| invalid_url(e.details()))?;
        Ok(())
    }

    /// Connects to Redis and waits for the first connection, failing with
    /// [`EngineError::Unavailable`] if it cannot be made within
    /// [`RedisOptions::connect_timeout_ms`] (per seed node). Once connected, lost connections
    /// are re-established in the background forever.
    ///
    /// Accepted URLs (user name and password optional, percent-encoded; no TLS in this build):
    ///
    /// - `redis://[[user]:password@]host[:port][/db]` — one server; port 6379, database 0 by
    ///   default.
    /// - `redis-cluster://[[user]:password@]host[:port][,host[:port]…]` — Redis Cluster, any
    ///   number of seed nodes (port 6379 by default). fred's form
    ///   `redis-cluster://host:port?node=host:port&node=…` is accepted too.
    /// - `redis-sentinel://[[user]:password@]host[:port][,host[:port]…]/service_name[/db]` —
    ///   the master named `service_name` as told by the listed Sentinels (port 26379 by
    ///   default); the credentials are the data nodes'. fred's form
    ///   `redis-sentinel://host:port[/db]?sentinelServiceName=name&node=host:port` is
    ///   accepted too.
    ///
    /// `valkey`, `valkey-cluster` and `valkey-sentinel` are synonyms. IPv6 literals
    /// (`[::1]:6379`) are accepted as the first host only. A malformed URL is reported as
    /// [`EngineError::Unavailable`] with a message that never repeats the URL (it may hold a
    /// password).
    pub async fn connect(url: &str, opts: RedisOptions) -> Result<RedisEngine, EngineError> {
        let fred_url = to_fred_url(url).map_err(invalid_url)?;
        let mut config = Config::from_url(&fred_url).map_err(|e| invalid_url(e.details()))?;
        // RESP2: the reply conversion below mirrors Redis's Lua-to-RESP2 rules.
        config.version = RespVersion::RESP2;
        // The first connection must succeed, so a wrong URL or a down server is reported at
        // start-up instead of hidden behind background retries.
        config.fail_fast = true;
        let seeds = u32::try_from(config.server.hosts().len()).unwrap_or(u32::MAX);

        let connect_timeout = Duration::from_millis(opts.connect_timeout_ms.max(1));
        let command_timeout = Duration::from_millis(opts.command_timeout_ms.max(1));
        let min_delay = opts.reconnect_min_delay_ms.max(1);
        let max_delay = opts.reconnect_max_delay_ms.max(min_delay);
        let unresponsive = (opts.unresponsive_timeout_ms > 0)
            .then(|| Duration::from_millis(opts.unresponsive_timeout_ms));

        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = connect_timeout;
                c.internal_command_timeout = connect_timeout;
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    ..TcpConfig::default()
                };
                c.unresponsive.max_timeout = unresponsive;
                if let Some(max) = unresponsive {
                    c.unresponsive.interval = (max / 4).max(Duration::from_millis(100));
                }
            })
            .with_performance_config(|p| p.default_command_timeout = command_timeout)
            // max_attempts 0: retry forever; base 2: the delay doubles up to the cap.
            .set_policy(ReconnectPolicy::new_exponential(0, min_delay, max_delay, 2))
            .build()
            .map_err(|e| EngineError::Unavailable(format!("cannot configure Redis client: {e}")))?;

        // fred bounds each seed node's attempt by connection_timeout; bound the whole start
        // as well (one more slot for the handshake after the TCP connect).
        let bound = connect_timeout.saturating_mul(seeds.saturating_add(1));
        init(&client, bound).await?;
        let reads = client.clone_new();
        if let Err(e) = init(&reads, bound).await {
            let _ = client.quit().await;
            return Err(e);
        }
        log_connection_changes(&client, "scripts");
        log_connection_changes(&reads, "writer reads");
        tracing::info!(
            clustered = client.is_clustered(),
            sentinel = client.uses_sentinels(),
            "connected to Redis"
        );

        let calls = client.with_options(&Options {
            timeout: Some(command_timeout),
            fail_fast: true,
            ..Options::default()
        });
        let margin = Duration::from_millis(opts.clock_skew_margin_ms).min(command_timeout / 2);
        Ok(RedisEngine {
            client,
            calls,
            reads,
            last_forced_reconnect: std::sync::Mutex::new(None),
            late_after: command_timeout - margin,
        })
    }

    /// The underlying fred client, for other Redis work of the gateway (streams read by the
    /// ledger writer, pub/sub, admin commands).
    ///
    /// It is the connection of every script call: commands inherit the
    /// [`RedisOptions::command_timeout_ms`] default timeout and fred's default of retrying a
    /// command when its connection drops (use `with_options` to change either). Never send
    /// blocking commands (`XREADGROUP … BLOCK`, `SUBSCRIBE`) on it — they would stall every
    /// script behind them; use `client().clone_new()` and `init()` on the copy, which opens a
    /// separate connection with the same configuration.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Closes the connection and stops reconnecting, for a graceful shutdown. Calls made
    /// afterwards fail with [`EngineError::Unavailable`].
    pub async fn quit(&self) {
        for client in [&self.client, &self.reads] {
            if let Err(e) = client.quit().await {
                tracing::debug!(error = %e, "error while closing a Redis connection");
            }
        }
    }

    /// Readies `scripts` on the server, to find a broken script at start-up rather than on
    /// its first call: the shipped ones by loading [`LIBRARY`] (on every Cluster primary),
    /// others by `SCRIPT LOAD`, checking Redis names each by the SHA-1 the engine will send
    /// (on Cluster on one node; the others learn it on its first `NOSCRIPT`).
    pub async fn preload<'a>(
        &self,
        scripts: impl IntoIterator<Item = &'a Script>,
    ) -> Result<(), EngineError> {
        let mut library_loaded = false;
        for script in scripts {
            if script.function().is_some() {
                if !library_loaded {
                    self.load_library_everywhere(script).await?;
                    library_loaded = true;
                }
                continue;
            }
            let frame = self
                .calls
                .custom_raw(
                    CustomCommand::new_static("SCRIPT", ClusterHash::Random, false),
                    vec![Value::from("LOAD"), Value::from(script.source())],
                )
                .await
                .map_err(|e| unavailable(&e))?;
            match to_reply(frame) {
                Ok(reply) if reply.as_str() == Some(script.sha1()) => {}
                Ok(_) => {
                    return Err(EngineError::Script {
                        script: script.name(),
                        message: "SCRIPT LOAD returned an unexpected SHA-1".to_owned(),
                    })
                }
                Err(message) => return Err(self.reply_error(script, message)),
            }
        }
        Ok(())
    }

    /// Loads [`LIBRARY`] on the node `FUNCTION LOAD` is routed to by `hash`; `on_behalf` names
    /// the script whose call needed it, for errors.
    async fn load_library(&self, hash: ClusterHash, on_behalf: &Script) -> Result<(), EngineError> {
        let frame = self
            .calls
            .custom_raw(
                CustomCommand::new_static("FUNCTION", hash, false),
                vec![Value::from("LOAD"), Value::from(LIBRARY.source())],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        match to_reply(frame) {
            Ok(_) => Ok(()),
            Err(message) if is_already_loaded(&message) => Ok(()),
            Err(message) => Err(self.reply_error(on_behalf, message)),
        }
    }

    /// Loads [`LIBRARY`] on the server, or on every primary of a Cluster.
    async fn load_library_everywhere(&self, on_behalf: &Script) -> Result<(), EngineError> {
        if !self.client.is_clustered() {
            return self.load_library(ClusterHash::Random, on_behalf).await;
        }
        let primaries = self
            .client
            .cached_cluster_state()
            .map_or_else(Vec::new, |state| state.unique_primary_nodes());
        for server in primaries {
            let node = self.client.with_options(&Options {
                cluster_node: Some(server),
                ..self.calls.options().clone()
            });
            let frame = node
                .custom_raw(
                    CustomCommand::new_static("FUNCTION", ClusterHash::Random, false),
                    vec![Value::from("LOAD"), Value::from(LIBRARY.source())],
                )
                .await
                .map_err(|e| unavailable(&e))?;
            match to_reply(frame) {
                Ok(_) => {}
                Err(message) if is_already_loaded(&message) => {}
                Err(message) => return Err(self.reply_error(on_behalf, message)),
            }
        }
        Ok(())
    }

    /// The deadline a call sent now carries, as its last argument: ms since the epoch by the
    /// gateway's clock, which Redis's `TIME` is compared with.
    fn deadline(&self) -> Value {
        let at = SystemTime::now() + self.late_after;
        let ms = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Value::from(ms.to_string())
    }

    async fn eval_script(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Reply, EngineError> {
        // Route by the first key's hash slot (all keys of a script share one hash tag).
        let hash = keys
            .first()
            .map(|k| ClusterHash::Custom(fred::util::redis_keyslot(k.as_bytes())))
            .unwrap_or(ClusterHash::Random);
        let numkeys = i64::try_from(keys.len()).unwrap_or(i64::MAX);
        let (command, name) = match script.function() {
            Some(function) => ("FCALL", function),
            None => ("EVALSHA", script.sha1()),
        };
        let mut argv = Vec::with_capacity(3 + keys.len() + args.len());
        argv.push(Value::from(name));
        argv.push(Value::Integer(numkeys));
        argv.extend(keys.into_iter().map(Value::from));
        argv.extend(args.into_iter().map(Value::from));
        argv.push(self.deadline());

        // Keeps the arguments for a second attempt (clones share the buffers). It keeps the
        // first attempt's deadline too: it must start before the caller can give up on it.
        let fallback = argv.clone();
        let frame = self
            .calls
            .custom_raw(
                CustomCommand::new_static(command, hash.clone(), false),
                argv,
            )
            .await
            .map_err(|e| unavailable(&e))?;

        // Either error means the call ran nothing, so it may be sent again; any other reply,
        // or a lost connection, may follow a run and is never re-sent here.
        let missing = error_text(&frame);
        let frame = if command == "FCALL" && missing.is_some_and(is_function_not_found) {
            tracing::debug!(
                script = script.name(),
                library = LIBRARY.name(),
                "function library not loaded in Redis, loading it"
            );
            self.load_library(hash.clone(), script).await?;
            self.calls
                .custom_raw(CustomCommand::new_static("FCALL", hash, false), fallback)
                .await
                .map_err(|e| unavailable(&e))?
        } else if missing.is_some_and(|m| m.starts_with("NOSCRIPT")) {
            tracing::debug!(
                script = script.name(),
                "script not cached in Redis, sending its source"
            );
            let mut argv = fallback;
            argv[0] = Value::from(script.source());
            self.calls
                .custom_raw(CustomCommand::new_static("EVAL", hash, false), argv)
                .await
                .map_err(|e| unavailable(&e))?
        } else {
            frame
        };
        to_reply(frame).map_err(|message| self.reply_error(script, message))
    }

    /// [`ScriptEngine::read_new_entries`] in one `MULTI`: `stream.lua` with no sources
    /// acknowledges and reports, then `XREADGROUP … >` reads the entries, and they join the
    /// script's reply as if it had read them (counted as `new`). Redis answers them
    /// straight from the stream; through Lua, each entry's ~20 fields became a table and
    /// then the reply again, about two thirds of a read's Redis time (BENCHMARKS.md).
    ///
    /// `EXEC` runs the `XREADGROUP` whatever the script answered, so a failed call may
    /// have delivered entries its caller never sees. They stay pending for this consumer,
    /// like those of a read whose answer was lost, and the writer's next read of its own
    /// entries takes them.
    async fn read_new_entries_beside(
        &self,
        keys: Vec<String>,
        mut args: Vec<String>,
    ) -> Result<Reply, EngineError> {
        let script = &SCRIPTS.stream;
        let (Some(function), Some(events)) = (script.function(), keys.first()) else {
            return self.eval_script(script, keys, args).await;
        };
        let [op, group, consumer, count, _, sources, ..] = args.as_slice() else {
            return self.eval_script(script, keys, args).await;
        };
        if op != "read" || sources != "n" {
            return self.eval_script(script, keys, args).await;
        }
        let read: Vec<Value> = [
            "GROUP", group, consumer, "COUNT", count, "STREAMS", events, ">",
        ]
        .into_iter()
        .map(Value::from)
        .collect();
        let hash = ClusterHash::Custom(fred::util::redis_keyslot(events.as_bytes()));
        args[5].clear();
        let mut fcall = Vec::with_capacity(3 + keys.len() + args.len());
        fcall.push(Value::from(function));
        fcall.push(Value::Integer(
            i64::try_from(keys.len()).unwrap_or(i64::MAX),
        ));
        fcall.extend(keys.into_iter().map(Value::from));
        fcall.extend(args.into_iter().map(Value::from));
        fcall.push(self.deadline());

        let transaction = self.reads.multi();
        let queue = transaction.with_options(self.calls.options());
        for (command, argv) in [("FCALL", fcall), ("XREADGROUP", read)] {
            queue
                .custom_raw(
                    CustomCommand::new_static(command, hash.clone(), false),
                    argv,
                )
                .await
                .map_err(|e| unavailable(&e))?;
        }
        let replies = match transaction.exec::<Value>(false).await {
            Ok(Value::Array(replies)) => replies,
            Ok(_) => return Err(self.reply_error(script, "EXEC answered no array".into())),
            Err(e) if is_reply(&e) => {
                let message = e.details().to_owned();
                if is_function_not_found(&message) {
                    // Loaded for the next read; this one is lost (see above).
                    self.load_library(hash, script).await?;
                    return Err(EngineError::Unavailable(
                        "Redis had no function library; loaded it".into(),
                    ));
                }
                return Err(self.reply_error(script, message));
            }
            Err(e) => return Err(unavailable(&e)),
        };
        let [head, fresh] = <[Value; 2]>::try_from(replies)
            .map_err(|_| self.reply_error(script, "EXEC answered other than two replies".into()))?;
        with_new_entries(value_to_reply(head), value_to_reply(fresh))
            .map_err(|message| self.reply_error(script, message))
    }

    /// Classifies an error reply: the server's availability problems are
    /// [`EngineError::Unavailable`], anything else is the script's fault.
    fn reply_error(&self, script: &Script, message: String) -> EngineError {
        let code = message.split_whitespace().next().unwrap_or("");
        if !UNAVAILABLE_PREFIXES.contains(&code) {
            return EngineError::Script {
                script: script.name(),
                message,
            };
        }
        if code == "READONLY" {
            self.reconnect_after_failover();
        }
        EngineError::Unavailable(format!("Redis refused script {}: {message}", script.name()))
    }

    /// After a Sentinel failover the old master answers writes with `READONLY` until it drops
    /// our connection, which it may never do; reconnecting asks the Sentinels for the new
    /// master. At most once per [`FORCED_RECONNECT_INTERVAL`].
    fn reconnect_after_failover(&self) {
        if !self.client.uses_sentinels() {
            return;
        }
        let now = Instant::now();
        {
            let Ok(mut last) = self.last_forced_reconnect.lock() else {
                return;
            };
            if last.is_some_and(|t| now.duration_since(t) < FORCED_RECONNECT_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        tracing::warn!("Redis master is read-only (failover?), reconnecting through Sentinel");
        for client in [self.client.clone(), self.reads.clone()] {
            tokio::spawn(async move {
                if let Err(e) = client.force_reconnection().await {
                    tracing::warn!(error = %e, "forced Redis reconnection failed");
                }
            });
        }
    }
}

impl ScriptEngine for RedisEngine {
    fn eval(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BoxFuture<'_, Result<Reply, EngineError>> {
        self.eval_script(script, keys, args).boxed()
    }

    fn read_new_entries(
        &self,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BoxFuture<'_, Result<Reply, EngineError>> {
        self.read_new_entries_beside(keys, args).boxed()
    }

    fn hexists(&self, key: String, field: String) -> BoxFuture<'_, Result<bool, EngineError>> {
        async move {
            self.calls
                .hexists::<bool, _, _>(key, field)
                .await
                .map_err(|e| unavailable(&e))
        }
        .boxed()
    }

    fn hget(
        &self,
        key: String,
        field: String,
    ) -> BoxFuture<'_, Result<Option<String>, EngineError>> {
        async move {
            self.calls
                .hget::<Option<String>, _, _>(key, field)
                .await
                .map_err(|e| unavailable(&e))
        }
        .boxed()
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        async move {
            self.calls
                .ping::<Value>(None)
                .await
                .map(|_| ())
                .map_err(|e| unavailable(&e))
        }
        .boxed()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Redis
    }
}

/// A transport-level failure (connection down, timeout, I/O): the call may or may not have run.
fn unavailable(e: &fred::error::Error) -> EngineError {
    EngineError::Unavailable(format!("Redis: {}", describe(e)))
}

/// A fred error as a sentence. fred keeps an I/O error only as its Debug form
/// (`Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }`), which
/// reads as a dump, not a reason: that becomes "connection refused".
fn describe(e: &fred::error::Error) -> String {
    if *e.kind() == fred::error::ErrorKind::IO {
        io_debug_in_words(e.details())
    } else {
        e.to_string()
    }
}

/// The words of an `std::io::Error`'s Debug form: its OS message, else its custom error,
/// else its kind spelled out ("TimedOut" → "timed out"); anything else as it is.
fn io_debug_in_words(debug: &str) -> String {
    let quoted = |field: &str| {
        let start = debug.find(field)? + field.len();
        let end = debug[start..].find('"')?;
        Some(debug[start..start + end].to_owned())
    };
    let kind = || {
        let start = match debug.find("kind: ") {
            Some(at) => at + "kind: ".len(),
            None => debug.starts_with("Kind(").then_some("Kind(".len())?,
        };
        let name: String = debug[start..]
            .chars()
            .take_while(char::is_ascii_alphabetic)
            .collect();
        (!name.is_empty()).then_some(name)
    };
    if let Some(message) = quoted("message: \"").or_else(|| quoted("error: \"")) {
        let mut chars = message.chars();
        return match chars.next() {
            Some(first) => first.to_lowercase().chain(chars).collect(),
            None => message,
        };
    }
    if let Some(name) = kind() {
        let mut words = String::new();
        for c in name.chars() {
            if c.is_ascii_uppercase() && !words.is_empty() {
                words.push(' ');
            }
            words.push(c.to_ascii_lowercase());
        }
        return words;
    }
    debug.to_owned()
}

fn invalid_url(reason: impl fmt::Display) -> EngineError {
    EngineError::Unavailable(format!("invalid Redis URL: {reason}"))
}

/// Logs each change of `connection`'s state once: lost (then reconnecting with backoff) and
/// re-established. Failed reconnection attempts in between are logged at debug level.
fn log_connection_changes(client: &Client, connection: &'static str) {
    let up = Arc::new(AtomicBool::new(true));
    let down = Arc::clone(&up);
    client.on_error(move |(error, server)| {
        let server = server.map_or_else(|| "-".to_owned(), |s| s.to_string());
        if down.swap(false, Ordering::AcqRel) {
            let error = describe(&error);
            tracing::warn!(%server, %error, connection, "lost the Redis connection, reconnecting");
        } else {
            tracing::debug!(%server, %error, connection, "Redis reconnection attempt failed");
        }
        std::future::ready(Ok(()))
    });
    client.on_reconnect(move |server| {
        if !up.swap(true, Ordering::AcqRel) {
            tracing::info!(%server, connection, "Redis connection re-established");
        }
        std::future::ready(Ok(()))
    });
    client.on_unresponsive(move |server| {
        tracing::warn!(%server, connection, "Redis connection unresponsive, closing it");
        std::future::ready(Ok(()))
    });
}

/// Makes `client`'s first connection within `bound`.
async fn init(client: &Client, bound: Duration) -> Result<(), EngineError> {
    let at = || {
        let hosts: Vec<String> = client
            .client_config()
            .server
            .hosts()
            .iter()
            .map(|s| format!("{}:{}", s.host, s.port))
            .collect();
        hosts.join(", ")
    };
    match tokio::time::timeout(bound, client.init()).await {
        Ok(Ok(_connection_task)) => Ok(()),
        Ok(Err(e)) => Err(EngineError::Unavailable(format!(
            "Redis at {} is unreachable: {}",
            at(),
            describe(&e)
        ))),
        // With fail_fast the connection task gives up on its own after its timeout.
        Err(_) => Err(EngineError::Unavailable(format!(
            "Redis at {} is unreachable: no connection within {} ms",
            at(),
            bound.as_millis()
        ))),
    }
}

/// Whether an error reply is `FCALL`'s for a function Redis does not have.
fn is_function_not_found(message: &str) -> bool {
    message.starts_with("ERR Function not found")
}

/// Whether fred's error is an error reply of the server (fred names its kind from the
/// reply's first word), not a failure to get one.
fn is_reply(e: &fred::error::Error) -> bool {
    use fred::error::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::Unknown | ErrorKind::InvalidArgument | ErrorKind::InvalidCommand
    ) && !e.details().is_empty()
}

/// A value of a transaction's reply (fred gives no frames there) converted like
/// [`to_reply`]; nested errors never reach here (they fail the whole `EXEC`).
fn value_to_reply(value: Value) -> Reply {
    match value {
        Value::Null => Reply::Nil,
        Value::Integer(i) => Reply::Int(i),
        Value::Double(d) => Reply::Int(d as i64),
        Value::Boolean(true) => Reply::Int(1),
        Value::Boolean(false) => Reply::Nil,
        Value::String(s) => Reply::Bulk(s.into_inner()),
        Value::Bytes(b) => Reply::Bulk(b),
        Value::Queued => Reply::Status("QUEUED".into()),
        Value::Array(items) => Reply::Array(items.into_iter().map(value_to_reply).collect()),
        Value::Map(map) => Reply::Array(
            map.inner()
                .into_iter()
                .flat_map(|(k, v)| [Reply::Bulk(k.into_bytes()), value_to_reply(v)])
                .collect(),
        ),
    }
}
/// Whether an error reply is `FUNCTION LOAD`'s for a library of that name already there.
fn is_already_loaded(message: &str) -> bool {
    message.starts_with("ERR Library") && message.ends_with("already exists")
}

/// The text of an error reply frame.
fn error_text(frame: &Resp3Frame) -> Option<&str> {
    match frame {
        Resp3Frame::SimpleError { data, .. } => Some(data),
        Resp3Frame::BlobError { data, .. } => std::str::from_utf8(data).ok(),
        _ => None,
    }
}

/// Converts a reply frame the way Redis converted the Lua value (see [`Reply`]); an error
/// reply, at the top or nested in an array, is returned as its text.
fn to_reply(frame: Resp3Frame) -> Result<Reply, String> {
    Ok(match frame {
        Resp3Frame::Null => Reply::Nil,
        Resp3Frame::Number { data, .. } => Reply::Int(data),
        Resp3Frame::BlobString { data, .. }
        | Resp3Frame::BigNumber { data, .. }
        | Resp3Frame::VerbatimString { data, .. }
        | Resp3Frame::ChunkedString(data) => Reply::Bulk(data),
        Resp3Frame::SimpleString { data, .. } => {
            Reply::Status(String::from_utf8_lossy(&data).into_owned())
        }
        Resp3Frame::SimpleError { data, .. } => return Err(data.to_string()),
        Resp3Frame::BlobError { data, .. } => {
            return Err(String::from_utf8_lossy(&data).into_owned())
        }
        // RESP3 only; kept consistent with the Lua conversion should RESP3 ever be enabled.
        Resp3Frame::Boolean { data, .. } => {
            if data {
                Reply::Int(1)
            } else {
                Reply::Nil
            }
        }
        // Saturating truncation toward zero, like Redis's Lua number conversion.
        Resp3Frame::Double { data, .. } => Reply::Int(data as i64),
        Resp3Frame::Array { data, .. } | Resp3Frame::Push { data, .. } => {
            Reply::Array(data.into_iter().map(to_reply).collect::<Result<_, _>>()?)
        }
        Resp3Frame::Set { data, .. } => {
            Reply::Array(data.into_iter().map(to_reply).collect::<Result<_, _>>()?)
        }
        Resp3Frame::Map { data, .. } => {
            let mut items = Vec::with_capacity(data.len() * 2);
            for (k, v) in data {
                items.push(to_reply(k)?);
                items.push(to_reply(v)?);
            }
            Reply::Array(items)
        }
        Resp3Frame::Hello { .. } => return Err("unexpected HELLO frame in a reply".to_owned()),
    })
}

/// Which topology a URL scheme names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    Standalone,
    Cluster,
    Sentinel,
}

/// Rewrites the URL forms documented on [`RedisEngine::connect`] into the syntax of fred's
/// `Config::from_url`: extra hosts become `node=` parameters and a Sentinel service name in the
/// path becomes `sentinelServiceName=`. Errors never quote the URL (it may hold a password).
fn to_fred_url(url: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("expected scheme://host, e.g. redis://127.0.0.1:6379")?;
    let scheme = scheme.to_ascii_lowercase();
    let topology = match scheme.as_str() {
        "redis" | "valkey" => Topology::Standalone,
        "redis-cluster" | "valkey-cluster" => Topology::Cluster,
        "redis-sentinel" | "valkey-sentinel" => Topology::Sentinel,
        s if s.starts_with("rediss") || s.starts_with("valkeys") => {
            return Err("TLS (rediss://) is not supported by this build".to_owned())
        }
        s if s.ends_with("+unix") => {
            return Err("Unix sockets are not supported; use redis://host:port".to_owned())
        }
        _ => {
            return Err(
                "unknown scheme; use redis://, redis-cluster:// or redis-sentinel://".to_owned(),
            )
        }
    };

    // Drop a fragment, then split authority / path / query.
    let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (path, query) = match tail.split_once('?') {
        Some((p, q)) => (p, q),
        None => (tail, ""),
    };
    let (userinfo, host_list) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let hosts: Vec<&str> = host_list.split(',').map(str::trim).collect();
    if hosts.iter().any(|h| h.is_empty()) {
        return Err("missing host".to_owned());
    }
    let default_port = if topology == Topology::Sentinel {
        26379
    } else {
        6379
    };

    let mut params: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    let has_param = |params: &[String], name: &str| {
        params
            .iter()
            .any(|p| p.split('=').next().is_some_and(|k| k == name))
    };

    match topology {
        Topology::Standalone if hosts.len() > 1 => {
            return Err(
                "redis:// takes one host; use redis-cluster:// or redis-sentinel:// for several"
                    .to_owned(),
            )
        }
        Topology::Standalone => {}
        Topology::Cluster => {
            if !path.trim_matches('/').is_empty() {
                return Err("Redis Cluster has no databases: remove the /db path".to_owned());
            }
        }
        Topology::Sentinel => {}
    }
    for host in &hosts[1..] {
        if host.starts_with('[') {
            return Err("IPv6 literals are only supported as the first host".to_owned());
        }
        if host.contains(':') {
            params.push(format!("node={host}"));
        } else {
            params.push(format!("node={host}:{default_port}"));
        }
    }

    let path = if topology == Topology::Sentinel && !has_param(&params, "sentinelServiceName") {
        let mut segments = path.split('/').filter(|s| !s.is_empty());
        let service = segments
            .next()
            .ok_or("missing Sentinel service name: redis-sentinel://host:port/service_name")?;
        let db = segments.next();
        if segments.next().is_some() {
            return Err("expected /service_name[/db] after the Sentinel hosts".to_owned());
        }
        // The path segment is percent-encoded already; escape what a query would read
        // differently.
        let service = service
            .replace('+', "%2B")
            .replace('&', "%26")
            .replace('=', "%3D");
        params.push(format!("sentinelServiceName={service}"));
        db.map(|d| format!("/{d}")).unwrap_or_default()
    } else {
        path.to_owned()
    };

    let mut out = format!("{scheme}://");
    if let Some(userinfo) = userinfo {
        out.push_str(userinfo);
        out.push('@');
    }
    out.push_str(hosts[0]);
    out.push_str(&path);
    if !params.is_empty() {
        out.push('?');
        out.push_str(&params.join("&"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::prelude::ServerConfig;

    #[test]
    fn io_errors_read_as_words_not_debug_dumps() {
        let refused = std::io::Error::from_raw_os_error(111);
        assert_eq!(
            io_debug_in_words(&format!("{refused:?}")),
            "connection refused"
        );
        let custom = std::io::Error::other("failed to lookup address information");
        assert_eq!(
            io_debug_in_words(&format!("{custom:?}")),
            "failed to lookup address information"
        );
        let simple = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert_eq!(io_debug_in_words(&format!("{simple:?}")), "timed out");
        assert_eq!(io_debug_in_words("something else"), "something else");
        let fred = fred::error::Error::from(std::io::Error::from_raw_os_error(111));
        assert_eq!(describe(&fred), "connection refused");
    }

    fn config(url: &str) -> Config {
        let fred_url = to_fred_url(url).expect("accepted URL");
        Config::from_url(&fred_url).expect("fred accepts the translation")
    }

    fn hosts(config: &Config) -> Vec<String> {
        let mut hosts: Vec<String> = config
            .server
            .hosts()
            .iter()
            .map(|s| s.to_string())
            .collect();
        hosts.sort();
        hosts
    }

    #[test]
    fn standalone_url_keeps_database_and_credentials() {
        let c = config("redis://user:s%40cret@db.example:6380/3");
        assert!(matches!(c.server, ServerConfig::Centralized { .. }));
        assert_eq!(hosts(&c), ["db.example:6380"]);
        assert_eq!(c.database, Some(3));
        assert_eq!(c.username.as_deref(), Some("user"));
        assert_eq!(c.password.as_deref(), Some("s@cret"));
        let c = config("redis://127.0.0.1");
        assert_eq!(hosts(&c), ["127.0.0.1:6379"]);
        assert_eq!(c.database, None);
    }

    #[test]
    fn cluster_url_takes_a_comma_separated_seed_list() {
        let c = config("redis-cluster://:pw@a:7000,b:7001,c");
        assert!(matches!(c.server, ServerConfig::Clustered { .. }));
        assert_eq!(hosts(&c), ["a:7000", "b:7001", "c:6379"]);
        assert_eq!(c.password.as_deref(), Some("pw"));
        let c = config("redis-cluster://a:7000?node=b:7001");
        assert_eq!(hosts(&c), ["a:7000", "b:7001"]);
    }

    #[test]
    fn sentinel_url_takes_service_name_in_path() {
        let c = config("redis-sentinel://s1:26379,s2,s3:26380/mymaster/2");
        match &c.server {
            ServerConfig::Sentinel { service_name, .. } => assert_eq!(service_name, "mymaster"),
            other => panic!("expected sentinel, got {other:?}"),
        }
        assert_eq!(hosts(&c), ["s1:26379", "s2:26379", "s3:26380"]);
        assert_eq!(c.database, Some(2));
        let c = config("redis-sentinel://s1/my+master");
        match &c.server {
            ServerConfig::Sentinel { service_name, .. } => assert_eq!(service_name, "my+master"),
            other => panic!("expected sentinel, got {other:?}"),
        }
        // fred's own form.
        let c = config("redis-sentinel://s1:26379/1?sentinelServiceName=svc&node=s2:26379");
        match &c.server {
            ServerConfig::Sentinel { service_name, .. } => assert_eq!(service_name, "svc"),
            other => panic!("expected sentinel, got {other:?}"),
        }
        assert_eq!(c.database, Some(1));
    }

    #[test]
    fn bad_urls_are_rejected_without_quoting_them() {
        for url in [
            "rediss://:hunter2@h:6379",
            "redis://:hunter2@a:1,b:2",
            "redis-sentinel://:hunter2@s1:26379",
            "redis-cluster://:hunter2@a:1/3",
            "http://:hunter2@h",
            "hunter2",
            "redis://:hunter2@",
        ] {
            let err = to_fred_url(url).expect_err(url);
            assert!(!err.contains("hunter2"), "{url}: {err}");
        }
    }

    #[test]
    fn replies_convert_like_lua_values() {
        let bulk = |s: &str| Resp3Frame::BlobString {
            data: bytes::Bytes::copy_from_slice(s.as_bytes()),
            attributes: None,
        };
        let frame = Resp3Frame::Array {
            data: vec![
                Resp3Frame::Number {
                    data: 7,
                    attributes: None,
                },
                bulk("x"),
                Resp3Frame::Null,
                Resp3Frame::SimpleString {
                    data: "OK".into(),
                    attributes: None,
                },
                Resp3Frame::Double {
                    data: -2.9,
                    attributes: None,
                },
                Resp3Frame::Boolean {
                    data: false,
                    attributes: None,
                },
            ],
            attributes: None,
        };
        assert_eq!(
            to_reply(frame),
            Ok(Reply::Array(vec![
                Reply::Int(7),
                Reply::from("x"),
                Reply::Nil,
                Reply::Status("OK".into()),
                Reply::Int(-2),
                Reply::Nil,
            ]))
        );
        let nested_error = Resp3Frame::Array {
            data: vec![Resp3Frame::SimpleError {
                data: "boom".into(),
                attributes: None,
            }],
            attributes: None,
        };
        assert_eq!(to_reply(nested_error), Err("boom".to_owned()));
    }
}
