//! Configuration: defaults, then an optional TOML file, then `KAMIGATE_*` environment
//! variables, which win. Units are in the field names.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::limit::LimitsConfig;

/// Everything `kamigate serve` needs. Every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Public and merchant API (`KAMIGATE_LISTEN`): `ip:port` or `host:port`, a host name
    /// resolved once at start ([`resolve_listen`]).
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Admin API, `/metrics`, `/healthz`, `/readyz` (`KAMIGATE_ADMIN_LISTEN`), as `listen`.
    #[serde(deserialize_with = "listen_address")]
    pub admin_listen: SocketAddr,
    /// `redis://…`, `redis-cluster://…` or `redis-sentinel://…`; unset runs the embedded
    /// engine (`KAMIGATE_REDIS_URL`).
    pub redis_url: Option<String>,
    /// `sqlite://…` or `postgres://…` (`KAMIGATE_DATABASE_URL`); used by the ledger.
    pub database_url: Option<String>,
    /// Embedded state and the SQLite ledger (`KAMIGATE_DATA_DIR`).
    pub data_dir: PathBuf,
    /// Admin bearer token (`KAMIGATE_ADMIN_TOKEN`); when unset, one generated on the first
    /// start and kept in the data dir ([`crate::tokens`]).
    pub admin_token: Option<String>,
    /// Merchant bearer token (`KAMIGATE_MERCHANT_TOKEN`); when unset, as `admin_token`.
    pub merchant_token: Option<String>,
    /// The data and index keys (`KAMIGATE_DATA_KEY` only, never the TOML file, which is
    /// easily shared); when unset, `<data dir>/data.key`, generated on the first start
    /// ([`crate::secrets::keyfile`]). Its `Debug` shows nothing of it.
    #[serde(skip)]
    pub data_key: Option<crate::secrets::keyfile::KeyText>,
    /// Largest JSON request body.
    pub max_body_bytes: u64,
    /// Largest import upload (streamed, never held in memory).
    pub max_import_bytes: u64,
    /// How long a client has to send a request's line and headers, in milliseconds, counted
    /// from the connection's start or its previous answer; past it the connection is closed.
    /// It cuts slowloris connections that send a partial request and stall or trickle, and
    /// it also bounds how long an idle keep-alive connection stays open (hyper runs one timer
    /// for both), so keep it above the idle timeout of a load balancer in front.
    pub header_read_timeout_ms: u64,
    /// Connections the public listener holds open at once; past it new connections are
    /// closed at once instead of queueing, so a flood of idle or half-sent connections
    /// cannot exhaust the process's file descriptors.
    pub max_connections: usize,
    /// Connections the admin listener holds open at once: its own budget, so probes and
    /// scrapes are answered while the public listener is flooded.
    pub admin_max_connections: usize,
    /// Longest request target (path and query) answered; longer is `ERR_URI_TOO_LONG` (414).
    pub max_uri_bytes: usize,
    /// Largest request header block (names and values together); larger is
    /// `ERR_HEADERS_TOO_LARGE` (431).
    pub max_header_bytes: usize,
    /// Most request header lines; more is `ERR_HEADERS_TOO_LARGE` (431).
    pub max_headers: usize,
    /// After SIGTERM, how long the gateway keeps serving while `/readyz` answers 503, so load
    /// balancers stop sending traffic before connections close.
    pub shutdown_delay_ms: u64,
    /// Seconds in-flight requests may run after the listeners close before they are cut off.
    pub drain_timeout_secs: u64,
    /// How often lapsed holds are swept back into inventory, in milliseconds. Claims and
    /// confirms also lapse due holds themselves, so stock is never missed between sweeps.
    pub hold_sweep_interval_ms: u64,
    /// How long a settled order (claimed, released or expired) and a redemption's mark stay
    /// in the engine once the ledger has their events, in seconds
    /// (`KAMIGATE_ORDER_RETENTION_SECS`); then they retire, leaving a fingerprint, and a
    /// retry is answered from the ledger ([`crate::inventory::retire`]). 0 keeps them for good.
    pub order_retention_secs: u64,
    /// Logs as JSON lines instead of text (`KAMIGATE_LOG_JSON=1`).
    pub log_json: bool,
    /// Rate limits, load shedding and abuse protection (`[limits]`).
    pub limits: LimitsConfig,
    /// When a claim, confirm, release or redemption is answered (`KAMIGATE_DURABILITY`).
    /// Unset: `ledger` on the embedded engine (the ledger is its persistence: nothing
    /// answered may be lost with the process), `engine` on Redis. See
    /// [`Config::durability`].
    pub durability: Option<Durability>,
    /// With `durability = "ledger"`, how long an answer waits for the ledger's commit before
    /// it is `ERR_UNAVAILABLE` (the change stands; a retry replays it).
    pub ledger_wait_ms: u64,
    /// Events another gateway left unacknowledged this long are taken over by this one's
    /// writer: that gateway is presumed dead.
    pub event_reclaim_idle_ms: u64,
    /// When Redis lost a SKU's data, its rebuild waits until every gateway alive has written
    /// the changes it answered into the ledger; a gateway that has not reported alive to the
    /// ledger (every 500 ms) for this long is presumed gone and not waited for. Well above
    /// the reporting interval and the ledger's worst write latency.
    pub rebuild_grace_ms: u64,
    /// With `durability = "engine"`, most answered changes a gateway keeps in memory until
    /// the ledger has them; beyond, changes are answered `ERR_UNAVAILABLE` (the ledger is
    /// far behind).
    pub journal_max_events: usize,
    /// SKUs that get an `sku` label of their own on the metrics
    /// (`KAMIGATE_METRICS_MAX_SKUS`); past it SKUs are summed under `sku="(other)"`, so the
    /// number of series stays bounded however many SKUs merchants create.
    pub metrics_max_skus: usize,
    /// How often the pauses in force are read from the ledger, in milliseconds: a pause made
    /// through another gateway (or `kamigate pause`) is enforced here within this interval.
    /// A pause made through this gateway is enforced here at once.
    pub pause_refresh_ms: u64,
    /// The longest `Retry-After` a paused request is told, in seconds; sooner when the pause
    /// is expected to end sooner.
    pub pause_retry_after_secs: u64,
    /// How often the channels and their tokens are read from the ledger, in milliseconds: a
    /// channel or token made or revoked through another gateway takes effect here within
    /// this interval; one changed through this gateway, at once.
    pub channel_refresh_ms: u64,
    /// The circuit breaker of a channel whose settings name none ([`crate::channel`]).
    pub channel_breaker: crate::channel::BreakerRule,
}

/// Default `order_retention_secs`: a week, far longer than clients retry an order.
pub const DEFAULT_ORDER_RETENTION_SECS: u64 = 7 * 24 * 3600;
/// Shortest `order_retention_secs` other than 0: a retry within it never costs a ledger read.
const MIN_ORDER_RETENTION_SECS: u64 = 60;
/// Longest `order_retention_secs`: ten years.
const MAX_ORDER_RETENTION_SECS: u64 = 10 * 365 * 24 * 3600;

/// Longest `pause_refresh_ms`: pauses must reach every gateway within a second.
const MAX_PAUSE_REFRESH_MS: u64 = 500;

/// Smallest `max_uri_bytes` and `max_header_bytes`: room for every route and ordinary headers.
const MIN_HEAD_LIMIT: usize = 1024;
/// Largest `max_uri_bytes`: twice it must stay under hyper's fixed 64 KiB request target limit.
const MAX_URI_BYTES: usize = 32 * 1024;
/// Largest `max_header_bytes`.
const MAX_HEADER_BYTES: usize = 1024 * 1024;
/// Fewest `max_headers`: a proxied client sends a dozen or so.
const MIN_HEADERS: usize = 16;
/// Most `max_headers`: hyper allocates twice this many header slots per parse.
const MAX_HEADERS: usize = 1000;

/// When a state change is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// As soon as the engine's script ran: the change is in the engine (and, with Redis,
    /// as durable as its AOF settings make it) and in the answering gateway's journal until
    /// the ledger has it; the ledger follows within moments.
    Engine,
    /// Once the ledger committed the change's event (group commit): nothing answered can
    /// be lost with the engine.
    Ledger,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: ([127, 0, 0, 1], 8080).into(),
            admin_listen: ([127, 0, 0, 1], 8081).into(),
            redis_url: None,
            database_url: None,
            data_dir: PathBuf::from("./kamigate-data"),
            admin_token: None,
            merchant_token: None,
            data_key: None,
            max_body_bytes: 64 * 1024,
            max_import_bytes: 1024 * 1024 * 1024,
            header_read_timeout_ms: 10_000,
            max_connections: 4096,
            admin_max_connections: 256,
            max_uri_bytes: 8 * 1024,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            shutdown_delay_ms: 2000,
            drain_timeout_secs: 30,
            hold_sweep_interval_ms: 500,
            order_retention_secs: DEFAULT_ORDER_RETENTION_SECS,
            log_json: false,
            limits: LimitsConfig::default(),
            durability: None,
            ledger_wait_ms: 5000,
            event_reclaim_idle_ms: 30_000,
            rebuild_grace_ms: 5000,
            journal_max_events: 1_000_000,
            metrics_max_skus: crate::metrics::DEFAULT_MAX_SKU_LABELS,
            pause_refresh_ms: 500,
            pause_retry_after_secs: 30,
            channel_refresh_ms: 1000,
            channel_breaker: crate::channel::BreakerRule::default(),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{name}: {why}")]
    Env { name: &'static str, why: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Defaults, overlaid by `file` if given, overlaid by the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                // Refused before parsing: a parse error would quote the line, key and all.
                if text
                    .parse::<toml::Table>()
                    .is_ok_and(|t| t.contains_key("data_key"))
                {
                    return Err(ConfigError::Invalid(format!(
                        "{}: data_key is never read from a file (files are shared and \
                         committed); set KAMIGATE_DATA_KEY, or leave it unset to use \
                         <data dir>/data.key",
                        path.display()
                    )));
                }
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.into(),
                    source,
                })?
            }
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Overlays `KAMIGATE_*` variables read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn addr(name: &'static str, v: String) -> Result<SocketAddr, ConfigError> {
            resolve_listen(&v).map_err(|why| ConfigError::Env { name, why })
        }
        let set = |v: Option<String>| v.filter(|v| !v.is_empty());
        if let Some(v) = set(get("KAMIGATE_LISTEN")) {
            self.listen = addr("KAMIGATE_LISTEN", v)?;
        }
        if let Some(v) = set(get("KAMIGATE_ADMIN_LISTEN")) {
            self.admin_listen = addr("KAMIGATE_ADMIN_LISTEN", v)?;
        }
        if let Some(v) = set(get("KAMIGATE_REDIS_URL")) {
            self.redis_url = Some(v);
        }
        if let Some(v) = set(get("KAMIGATE_DATABASE_URL")) {
            self.database_url = Some(v);
        }
        if let Some(v) = set(get("KAMIGATE_DATA_DIR")) {
            self.data_dir = v.into();
        }
        if let Some(v) = set(get("KAMIGATE_ADMIN_TOKEN")) {
            self.admin_token = Some(v);
        }
        if let Some(v) = set(get("KAMIGATE_MERCHANT_TOKEN")) {
            self.merchant_token = Some(v);
        }
        if let Some(v) = set(get(crate::secrets::keyfile::KEY_VAR)) {
            self.data_key = Some(crate::secrets::keyfile::KeyText(v));
        }
        if let Some(v) = set(get("KAMIGATE_DURABILITY")) {
            self.durability = match v.as_str() {
                "engine" => Some(Durability::Engine),
                "ledger" => Some(Durability::Ledger),
                _ => {
                    return Err(ConfigError::Env {
                        name: "KAMIGATE_DURABILITY",
                        why: "must be engine or ledger".into(),
                    })
                }
            };
        }
        if let Some(v) = set(get("KAMIGATE_METRICS_MAX_SKUS")) {
            self.metrics_max_skus = v.parse().map_err(|e| ConfigError::Env {
                name: "KAMIGATE_METRICS_MAX_SKUS",
                why: format!("not a count: {e}"),
            })?;
        }
        if let Some(v) = set(get("KAMIGATE_ORDER_RETENTION_SECS")) {
            self.order_retention_secs = v.parse().map_err(|e| ConfigError::Env {
                name: "KAMIGATE_ORDER_RETENTION_SECS",
                why: format!("not a number of seconds: {e}"),
            })?;
        }
        if let Some(v) = set(get("KAMIGATE_LOG_JSON")) {
            self.log_json = matches!(v.as_str(), "1" | "true" | "yes");
        }
        Ok(())
    }

    /// When changes are answered: as configured, else `ledger` on the embedded engine and
    /// `engine` on Redis.
    pub fn durability(&self) -> Durability {
        self.durability.unwrap_or(match self.redis_url {
            Some(_) => Durability::Engine,
            None => Durability::Ledger,
        })
    }

    /// Rejects settings that cannot work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |why: &str| Err(ConfigError::Invalid(why.into()));
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return invalid("listen and admin_listen must differ");
        }
        for (name, token) in [
            ("admin_token", &self.admin_token),
            ("merchant_token", &self.merchant_token),
        ] {
            if token.as_ref().is_some_and(|t| t.len() < 16) {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be at least 16 characters"
                )));
            }
        }
        if self.admin_token.is_some() && self.admin_token == self.merchant_token {
            return invalid("admin_token and merchant_token must differ");
        }
        if self.max_body_bytes == 0 || self.max_import_bytes == 0 {
            return invalid("body limits must be positive");
        }
        if self.header_read_timeout_ms == 0 {
            return invalid("header_read_timeout_ms must be positive");
        }
        if self.max_connections == 0 || self.admin_max_connections == 0 {
            return invalid("max_connections and admin_max_connections must be positive");
        }
        // Hyper's own parser limits are at least twice these (see `http::conn`), and hyper never
        // reads a request target over 64 KiB.
        if !(MIN_HEAD_LIMIT..=MAX_URI_BYTES).contains(&self.max_uri_bytes) {
            return Err(ConfigError::Invalid(format!(
                "max_uri_bytes must be from {MIN_HEAD_LIMIT} to {MAX_URI_BYTES}"
            )));
        }
        if !(MIN_HEAD_LIMIT..=MAX_HEADER_BYTES).contains(&self.max_header_bytes) {
            return Err(ConfigError::Invalid(format!(
                "max_header_bytes must be from {MIN_HEAD_LIMIT} to {MAX_HEADER_BYTES}"
            )));
        }
        if !(MIN_HEADERS..=MAX_HEADERS).contains(&self.max_headers) {
            return Err(ConfigError::Invalid(format!(
                "max_headers must be from {MIN_HEADERS} to {MAX_HEADERS}"
            )));
        }
        if self.hold_sweep_interval_ms == 0 {
            return invalid("hold_sweep_interval_ms must be positive");
        }
        if self.order_retention_secs != 0
            && !(MIN_ORDER_RETENTION_SECS..=MAX_ORDER_RETENTION_SECS)
                .contains(&self.order_retention_secs)
        {
            return Err(ConfigError::Invalid(format!(
                "order_retention_secs must be 0 (keep for good) or from \
                 {MIN_ORDER_RETENTION_SECS} to {MAX_ORDER_RETENTION_SECS}"
            )));
        }
        if self.journal_max_events == 0 {
            return invalid("journal_max_events must be positive");
        }
        if !(10..=MAX_PAUSE_REFRESH_MS).contains(&self.pause_refresh_ms) {
            return Err(ConfigError::Invalid(format!(
                "pause_refresh_ms must be from 10 to {MAX_PAUSE_REFRESH_MS}"
            )));
        }
        if !(1..=3600).contains(&self.pause_retry_after_secs) {
            return invalid("pause_retry_after_secs must be from 1 to 3600");
        }
        if !(10..=60_000).contains(&self.channel_refresh_ms) {
            return invalid("channel_refresh_ms must be from 10 to 60000");
        }
        self.channel_breaker
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("channel_{e}")))?;
        self.limits.validate().map_err(ConfigError::Invalid)?;
        if let Some(url) = &self.redis_url {
            let known = ["redis://", "redis-cluster://", "redis-sentinel://"];
            if !known.iter().any(|s| url.starts_with(s)) {
                return invalid(
                    "redis_url must start with redis://, redis-cluster:// or redis-sentinel://",
                );
            }
        }
        Ok(())
    }
}

/// The address to bind for `value`: `ip:port` as it is, or `host:port` with the host name
/// looked up now (`localhost:8080`). Of a name's addresses an IPv4 one is taken when there
/// is one: `localhost` often lists `::1` first, and IPv6 is off in many containers.
pub fn resolve_listen(value: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(format!(
            "{value:?} is not host:port (127.0.0.1:8080, localhost:8080)"
        ));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!(
            "{value:?} is not host:port (127.0.0.1:8080, localhost:8080)"
        ));
    }
    let addrs: Vec<SocketAddr> = value
        .to_socket_addrs()
        .map_err(|e| format!("host name {host:?} does not resolve: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("host name {host:?} resolves to no address"))
}

/// Deserializes a listen address through [`resolve_listen`].
fn listen_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let value = String::deserialize(d)?;
    resolve_listen(&value).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_key_is_read_from_the_environment_only_and_never_shown() {
        let hex = "c0ffee".repeat(10);
        let mut config = Config::default();
        config
            .apply_env(|name| (name == "KAMIGATE_DATA_KEY").then(|| format!("data d1 {hex}")))
            .expect("applied");
        let shown = config
            .data_key
            .as_ref()
            .map(|k| k.0.clone())
            .unwrap_or_default();
        assert!(shown.contains(&hex));
        assert!(!format!("{config:?}").contains(&hex[..12]));
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("kamigate.toml");
        std::fs::write(&file, format!("data_key = \"data d1 {hex}\"\n")).expect("written");
        let err = Config::load(Some(&file)).expect_err("not a file setting");
        assert!(err.to_string().contains("KAMIGATE_DATA_KEY"), "{err}");
        assert!(!err.to_string().contains(&hex[..12]), "{err}");
    }

    #[test]
    fn environment_overrides_file_and_defaults() {
        let mut config: Config = toml::from_str("listen = \"127.0.0.1:9000\"\n").expect("toml");
        config
            .apply_env(|name| match name {
                "KAMIGATE_LISTEN" => Some("127.0.0.1:9100".into()),
                "KAMIGATE_REDIS_URL" => Some("redis://127.0.0.1:7000".into()),
                _ => None,
            })
            .expect("env applies");
        assert_eq!(config.listen.port(), 9100);
        assert_eq!(config.admin_listen.port(), 8081);
        assert_eq!(config.redis_url.as_deref(), Some("redis://127.0.0.1:7000"));
        config.validate().expect("valid");
    }

    #[test]
    fn readme_configuration_examples_parse_and_validate() {
        let readme = include_str!("../README.md");
        let mut blocks = 0;
        for block in readme.split("```toml").skip(1) {
            let text = block.split("```").next().expect("closed block");
            let config: Config = toml::from_str(text).expect("README example parses");
            config.validate().expect("README example validates");
            blocks += 1;
        }
        assert!(blocks > 0, "the README shows a configuration example");
    }

    #[test]
    fn channel_settings_are_checked_at_start() {
        for bad in [
            "channel_refresh_ms = 0\n",
            "[channel_breaker]\nerror_ratio = 1.5\n",
            "[channel_breaker]\nprobes = 0\n",
        ] {
            let config: Config = toml::from_str(bad).expect("parses");
            let err = config.validate().expect_err(bad);
            assert!(err.to_string().contains("channel_"), "{bad}: {err}");
        }
        let config: Config =
            toml::from_str("[channel_breaker]\nmin_requests = 5\n").expect("parses");
        assert_eq!(config.channel_breaker.min_requests, 5);
        assert_eq!(
            config.channel_breaker.open_ms, 5000,
            "the rest keeps its defaults"
        );
        config.validate().expect("valid");
    }

    #[test]
    fn listen_addresses_may_name_a_host() {
        let config: Config =
            toml::from_str("listen = \"localhost:9000\"\nadmin_listen = \"127.0.0.1:9001\"\n")
                .expect("a host name is accepted");
        assert!(config.listen.ip().is_loopback(), "{:?}", config.listen);
        assert_eq!(config.listen.port(), 9000);
        let mut config = Config::default();
        config
            .apply_env(|name| (name == "KAMIGATE_ADMIN_LISTEN").then(|| "localhost:0".into()))
            .expect("env applies");
        assert!(config.admin_listen.ip().is_loopback());
        assert_eq!(
            resolve_listen("[::1]:80"),
            Ok("[::1]:80".parse().expect("v6"))
        );

        let err = config
            .apply_env(|name| (name == "KAMIGATE_LISTEN").then(|| "no-such-host.invalid:80".into()))
            .expect_err("does not resolve");
        let message = err.to_string();
        assert!(message.contains("KAMIGATE_LISTEN"), "{message}");
        assert!(message.contains("does not resolve"), "{message}");
        let err = toml::from_str::<Config>("listen = \"no-such-host.invalid:80\"\n")
            .expect_err("does not resolve");
        assert!(err.to_string().contains("does not resolve"), "{err}");
        for bad in ["localhost", "localhost:http", ":80", "localhost:70000"] {
            assert!(resolve_listen(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let mut config = Config::default();
        let err = config
            .apply_env(|name| (name == "KAMIGATE_LISTEN").then(|| "nope".into()))
            .expect_err("not an address");
        assert!(err.to_string().contains("KAMIGATE_LISTEN"));
        let short = Config {
            admin_token: Some("short".into()),
            ..Config::default()
        };
        assert!(short.validate().is_err());
        assert!(toml::from_str::<Config>("no_such_field = 1").is_err());
    }

    #[test]
    fn connection_and_head_limits_are_checked() {
        let defaults = Config::default();
        defaults.validate().expect("defaults are valid");
        let broken = [
            Config {
                header_read_timeout_ms: 0,
                ..Config::default()
            },
            Config {
                max_connections: 0,
                ..Config::default()
            },
            Config {
                admin_max_connections: 0,
                ..Config::default()
            },
            Config {
                max_uri_bytes: 64 * 1024,
                ..Config::default()
            },
            Config {
                max_header_bytes: 10,
                ..Config::default()
            },
            Config {
                max_headers: 5000,
                ..Config::default()
            },
            Config {
                pause_refresh_ms: 0,
                ..Config::default()
            },
            Config {
                pause_refresh_ms: 5000,
                ..Config::default()
            },
            Config {
                pause_retry_after_secs: 0,
                ..Config::default()
            },
        ];
        for config in broken {
            assert!(config.validate().is_err(), "{config:?}");
        }
    }

    #[test]
    fn order_retention_is_off_or_at_least_a_minute() {
        assert_eq!(Config::default().order_retention_secs, 7 * 24 * 3600);
        let mut config = Config::default();
        config
            .apply_env(|name| (name == "KAMIGATE_ORDER_RETENTION_SECS").then(|| "0".into()))
            .expect("env applies");
        assert_eq!(config.order_retention_secs, 0);
        config.validate().expect("0 keeps records for good");
        for secs in [1, 59, 11 * 365 * 24 * 3600] {
            let config = Config {
                order_retention_secs: secs,
                ..Config::default()
            };
            let err = config.validate().expect_err("out of range");
            assert!(err.to_string().contains("order_retention_secs"), "{err}");
        }
        let err = Config::default()
            .apply_env(|name| (name == "KAMIGATE_ORDER_RETENTION_SECS").then(|| "a week".into()))
            .expect_err("not a number");
        assert!(
            err.to_string().contains("KAMIGATE_ORDER_RETENTION_SECS"),
            "{err}"
        );
    }
}
