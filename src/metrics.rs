//! Every metric kamigate exports, with its description, in one place: the [`CATALOGUE`].
//!
//! The dashboards (`grafana/`) and alert rules (`prometheus/`) are checked against the
//! catalogue (`tests/observability.rs`): every metric they query is here, and every metric
//! here is on a dashboard or in an alert.
//!
//! Labels are bounded: routes are matched patterns (never raw paths), outcomes and error
//! codes are fixed sets, SKUs are names merchants created, capped at `metrics_max_skus`
//! label values ([`SkuLabels`]). No label ever holds a code, an order, a redeemer or a client
//! address.
//!
//! Label sets the dashboards and alerts query are registered at 0 when the gateway starts
//! ([`initialise`]), so `rate()` has a first sample to start from and `absent()` means the
//! gateway is gone, not that nothing happened yet.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{OnceLock, RwLock};

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// HTTP requests by `route`, `method`, `status` and `code` (`OK` or the `ERR_…` code).
pub const HTTP_REQUESTS: &str = "kamigate_http_requests_total";
/// HTTP request latency by `route` and `outcome` (`ok`, `client_error`, `server_error`).
pub const HTTP_DURATION: &str = "kamigate_http_request_duration_seconds";
/// Claims by `outcome`: `new`, `replay`, `held`, or the error code.
pub const CLAIMS: &str = "kamigate_claims_total";
/// Redemptions by `outcome` (`new`, `replay`, or the error code) and by the SKU
/// `format_version` the code matched under ([`VersionLabel`]).
pub const REDEMPTIONS: &str = "kamigate_redemptions_total";

/// The `format_version` label of [`REDEMPTIONS`]: `1` … `16`, `17+` beyond (a bounded label
/// set however many versions a SKU goes through), `none` when no code matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionLabel {
    None,
    Of(u32),
}

impl VersionLabel {
    pub fn as_str(self) -> &'static str {
        const LABELS: [&str; 16] = [
            "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
        ];
        match self {
            VersionLabel::None => "none",
            VersionLabel::Of(v) => v
                .checked_sub(1)
                .and_then(|i| LABELS.get(i as usize))
                .copied()
                .unwrap_or("17+"),
        }
    }
}
/// Engine script latency by `script` and `engine`.
pub const SCRIPT_DURATION: &str = "kamigate_engine_script_duration_seconds";
/// Engine script failures by `script` and `kind` (`unavailable`, `script`).
pub const SCRIPT_ERRORS: &str = "kamigate_engine_script_errors_total";
/// Import rows by `result`: `accepted`, `rejected`, `duplicate`.
pub const IMPORT_ROWS: &str = "kamigate_import_rows_total";
/// Holds lapsed by the sweep (holds lapsed inside claims are counted by the engine events).
pub const HOLDS_EXPIRED: &str = "kamigate_holds_expired_total";
/// Settled records taken out of the engine by the retention pass, by `record` (`order`,
/// `redemption`) ([`crate::inventory::retire`]).
pub const RETIRED: &str = "kamigate_retired_total";
/// Retired orders looked up in the ledger because they were retried, by `result`:
/// `restored`, or `unknown` (a fingerprint of another order: the call went on as new).
pub const ORDERS_RESTORED: &str = "kamigate_orders_restored_total";
/// Keys per `sku` and `state`, refreshed by the background sweep.
pub const INVENTORY_KEYS: &str = "kamigate_inventory_keys";
/// 1 while the engine answers, 0 while it does not.
pub const ENGINE_UP: &str = "kamigate_engine_up";
/// Keys per `sku` and `state` in the ledger, refreshed with the engine's.
pub const LEDGER_KEYS: &str = "kamigate_ledger_keys";
/// Keys per `sku` whose state differs between engine and ledger beyond the events in
/// flight ([`crate::inventory::drift`]).
pub const DRIFT: &str = "kamigate_drift_keys";
/// Events per `sku` written by the engine and not yet committed to the ledger.
pub const IN_FLIGHT_EVENTS: &str = "kamigate_events_in_flight";
/// Gauge: connections open per `listener` (`public`, `admin`).
pub const CONNECTIONS_OPEN: &str = "kamigate_connections_open";
/// Connections closed on accept per `listener` because the listener's cap was reached.
pub const CONNECTIONS_REFUSED: &str = "kamigate_connections_refused_total";
/// Connections closed per `listener` because a request's head did not arrive within the
/// header read timeout (slowloris, or an idle keep-alive connection).
pub const HEADER_TIMEOUTS: &str = "kamigate_header_read_timeouts_total";
/// Counter: limiter decisions by `rule` (`public`, `merchant`, `global`,
/// `failed_redemptions`, `user_claims`, `sold_out_cache`) and `decision` (`allow`, `deny`,
/// `shadow_deny`, and for the windows `fail_open`, `fail_closed`).
pub const LIMITER_DECISIONS: &str = "kamigate_limiter_decisions_total";
/// Gauge: requests currently admitted by the in-flight cap and not yet answered.
pub const IN_FLIGHT_REQUESTS: &str = "kamigate_in_flight_requests";
/// Counter: requests turned away with 503 because the in-flight cap was reached.
pub const SHED: &str = "kamigate_shed_total";
/// Stream entries committed to the ledger, by `source`: `new` (first delivery), `own` (this
/// writer's earlier batch whose commit failed), `claimed` (taken over from a dead consumer).
pub const EVENTS_COMMITTED: &str = "kamigate_ledger_events_committed_total";
/// Poison entries moved to a dead-letter stream, by `sku`.
pub const EVENTS_DEAD_LETTERED: &str = "kamigate_ledger_events_dead_lettered_total";
/// Latency of one group commit (`apply_events`), successful or not.
pub const LEDGER_WRITE_DURATION: &str = "kamigate_ledger_write_duration_seconds";
/// Failed group commits, by `kind`: `unavailable` (retried) or `rejected` (the ledger refused
/// the batch: retried too, but needs an operator).
pub const LEDGER_WRITE_FAILURES: &str = "kamigate_ledger_write_failures_total";
/// Events of a `sku` not yet committed: delivered and unacknowledged, plus never delivered.
pub const STREAM_BACKLOG: &str = "kamigate_stream_backlog_events";
/// Age of the oldest event of a `sku` not yet committed, 0 when there is none.
pub const STREAM_OLDEST_AGE: &str = "kamigate_stream_oldest_pending_age_seconds";
/// Gauge: pauses in force per `scope` (`gateway`, `sku`) and `action` (`claims`,
/// `redemptions`) ([`crate::pause`]).
pub const PAUSES: &str = "kamigate_pauses";
/// Gauge: per `scope` and `action`, the earliest end an operator expected of the pauses in
/// force, as a Unix timestamp in seconds; 0 when none has one. A pause that outlives it is
/// overdue.
pub const PAUSE_EXPECTED_END: &str = "kamigate_pause_expected_end_timestamp_seconds";
/// Gauge: per `scope` and `action`, when the oldest pause in force began, as a Unix
/// timestamp in seconds; 0 when none is.
pub const PAUSE_STARTED: &str = "kamigate_pause_started_timestamp_seconds";
/// Gauge: 1 while this gateway cannot read the pauses from the ledger (it enforces the ones
/// it read last), else 0.
pub const PAUSES_STALE: &str = "kamigate_pauses_stale";
/// Counter: stored codes that did not open, by `data_key` (the key id the text named,
/// `unknown` for one not in the keyring): tampered with, corrupted, moved from another key,
/// or sealed under a key this gateway lacks. Such a code is never handed out.
pub const DECRYPT_FAILURES: &str = "kamigate_decrypt_failures_total";
/// Claims by `channel` ([`crate::channel`], at most `MAX_CHANNELS` + 1 names) and
/// `outcome`, as [`CLAIMS`] counts them.
pub const CHANNEL_CLAIMS: &str = "kamigate_channel_claims_total";
/// Gauge: each channel's breaker by `channel`: 0 closed, 1 half-open, 2 open.
pub const CHANNEL_BREAKER_STATE: &str = "kamigate_channel_breaker_state";
/// Counter: breaker state changes by `channel` and `to` (`open`, `half_open`, `closed`).
pub const CHANNEL_BREAKER_CHANGES: &str = "kamigate_channel_breaker_changes_total";
/// Counter: requests shed by an open breaker, by `channel`.
pub const CHANNEL_SHED: &str = "kamigate_channel_shed_total";
/// Gauge: codes each stock pool of a SKU holds, by `sku` and `pool` (a channel, or
/// [`SHARED_POOL`] for the shared remainder).
pub const POOL_CODES: &str = "kamigate_pool_codes";
/// The `pool` label of a SKU's shared remainder (no channel name has parentheses).
pub const SHARED_POOL: &str = "(shared)";

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Exported as `<name>_bucket`, `<name>_sum` and `<name>_count`.
    Histogram,
}

/// One exported metric: its name, kind, labels and description.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn metric(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

/// Every metric kamigate exports.
pub const CATALOGUE: &[Metric] = &[
    metric(
        HTTP_REQUESTS,
        Kind::Counter,
        &["route", "method", "status", "code"],
        "HTTP requests by matched route, method, status and error code.",
    ),
    metric(
        HTTP_DURATION,
        Kind::Histogram,
        &["route", "outcome"],
        "HTTP request latency by matched route and outcome.",
    ),
    metric(CLAIMS, Kind::Counter, &["outcome"], "Claims by outcome."),
    metric(
        REDEMPTIONS,
        Kind::Counter,
        &["outcome", "format_version"],
        "Redemptions by outcome and by the SKU format version the code matched.",
    ),
    metric(
        SCRIPT_DURATION,
        Kind::Histogram,
        &["script", "engine"],
        "Latency of engine script calls by script and engine.",
    ),
    metric(
        SCRIPT_ERRORS,
        Kind::Counter,
        &["script", "kind"],
        "Engine script failures by script and kind.",
    ),
    metric(
        IMPORT_ROWS,
        Kind::Counter,
        &["result"],
        "Imported rows by result.",
    ),
    metric(
        HOLDS_EXPIRED,
        Kind::Counter,
        &[],
        "Holds lapsed by the background sweep.",
    ),
    metric(
        RETIRED,
        Kind::Counter,
        &["record"],
        "Settled orders and redemption marks retired from the engine after the retention.",
    ),
    metric(
        ORDERS_RESTORED,
        Kind::Counter,
        &["result"],
        "Retired orders retried and looked up in the ledger, by result.",
    ),
    metric(
        INVENTORY_KEYS,
        Kind::Gauge,
        &["sku", "state"],
        "Keys per SKU and state in the engine.",
    ),
    metric(
        ENGINE_UP,
        Kind::Gauge,
        &[],
        "1 while the engine answers, else 0.",
    ),
    metric(
        LEDGER_KEYS,
        Kind::Gauge,
        &["sku", "state"],
        "Keys per SKU and state in the ledger.",
    ),
    metric(
        DRIFT,
        Kind::Gauge,
        &["sku"],
        "Keys per SKU whose state differs between engine and ledger beyond the events in flight.",
    ),
    metric(
        IN_FLIGHT_EVENTS,
        Kind::Gauge,
        &["sku"],
        "Events per SKU written by the engine and not yet committed to the ledger.",
    ),
    metric(
        CONNECTIONS_OPEN,
        Kind::Gauge,
        &["listener"],
        "Connections open per listener.",
    ),
    metric(
        CONNECTIONS_REFUSED,
        Kind::Counter,
        &["listener"],
        "Connections closed on accept per listener because its connection cap was reached.",
    ),
    metric(
        HEADER_TIMEOUTS,
        Kind::Counter,
        &["listener"],
        "Connections closed per listener because a request head did not arrive within the header read timeout.",
    ),
    metric(
        LIMITER_DECISIONS,
        Kind::Counter,
        &["rule", "decision"],
        "Edge limiter decisions by rule and decision (allow, deny, shadow_deny, fail_open, fail_closed).",
    ),
    metric(
        IN_FLIGHT_REQUESTS,
        Kind::Gauge,
        &[],
        "Requests admitted by the in-flight cap and not yet finished.",
    ),
    metric(
        SHED,
        Kind::Counter,
        &[],
        "Requests answered 503 at once because the in-flight cap was reached (load shed).",
    ),
    metric(
        EVENTS_COMMITTED,
        Kind::Counter,
        &["source"],
        "Stream events committed to the ledger, by source (new, own retry, claimed from a dead consumer).",
    ),
    metric(
        EVENTS_DEAD_LETTERED,
        Kind::Counter,
        &["sku"],
        "Poison stream entries moved to the SKU's dead-letter stream.",
    ),
    metric(
        LEDGER_WRITE_DURATION,
        Kind::Histogram,
        &[],
        "Latency of one group commit of a SKU's stream events to the ledger, its wait for the ledger's turn included (batches of several SKUs that meet share one commit).",
    ),
    metric(
        LEDGER_WRITE_FAILURES,
        Kind::Counter,
        &["kind"],
        "Failed group commits to the ledger, by kind (unavailable, rejected).",
    ),
    metric(
        STREAM_BACKLOG,
        Kind::Gauge,
        &["sku"],
        "Events per SKU not yet committed to the ledger (pending plus undelivered).",
    ),
    metric(
        STREAM_OLDEST_AGE,
        Kind::Gauge,
        &["sku"],
        "Age of the oldest event per SKU not yet committed to the ledger.",
    ),
    metric(
        PAUSES,
        Kind::Gauge,
        &["scope", "action"],
        "Pauses in force per scope (gateway, sku) and action (claims, redemptions).",
    ),
    metric(
        PAUSE_EXPECTED_END,
        Kind::Gauge,
        &["scope", "action"],
        "Earliest expected end of the pauses in force per scope and action, as a Unix timestamp in seconds; 0 when none has one.",
    ),
    metric(
        PAUSE_STARTED,
        Kind::Gauge,
        &["scope", "action"],
        "Start of the oldest pause in force per scope and action, as a Unix timestamp in seconds; 0 when none is.",
    ),
    metric(
        PAUSES_STALE,
        Kind::Gauge,
        &[],
        "1 while this gateway cannot read the pauses from the ledger and enforces the ones it read last.",
    ),
    metric(
        DECRYPT_FAILURES,
        Kind::Counter,
        &["data_key"],
        "Stored codes that did not open (tampered with, moved from another key, or sealed under a missing key), by the data key named; none is handed out.",
    ),
    metric(
        CHANNEL_CLAIMS,
        Kind::Counter,
        &["channel", "outcome"],
        "Claims by selling channel and outcome (new, replay, held, or the error code).",
    ),
    metric(
        CHANNEL_BREAKER_STATE,
        Kind::Gauge,
        &["channel"],
        "Each channel's circuit breaker: 0 closed, 1 half-open (probing), 2 open (shedding).",
    ),
    metric(
        CHANNEL_BREAKER_CHANGES,
        Kind::Counter,
        &["channel", "to"],
        "Circuit breaker state changes by channel and the state entered.",
    ),
    metric(
        CHANNEL_SHED,
        Kind::Counter,
        &["channel"],
        "Requests answered 503 because their channel's breaker was open.",
    ),
    metric(
        POOL_CODES,
        Kind::Gauge,
        &["sku", "pool"],
        "Codes each stock pool of a SKU holds: a channel's reservation, or (shared) for the codes no pool reserves.",
    ),
];

/// Buckets of every `_seconds` histogram.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The latency objective of claims and redemptions (`prometheus/rules/slo.yml`): answered
/// within this many seconds. [`LATENCY_BUCKETS`] has a bucket exactly here, so the SLI is
/// a count of requests, not an interpolation.
pub const LATENCY_SLO_SECONDS: f64 = 0.25;

/// Outcomes of [`CLAIMS`] registered at start: the successes and every error a claim
/// (single or in a batch) can be answered with.
pub const CLAIM_OUTCOMES: &[&str] = &[
    "new",
    "replay",
    "held",
    "ERR_SOLD_OUT",
    "ERR_USER_LIMIT",
    "ERR_ORDER_CONFLICT",
    "ERR_HOLD_EXPIRED",
    "ERR_NOT_FOUND",
    "ERR_BAD_REQUEST",
    "ERR_RATE_LIMITED",
    "ERR_PAUSED",
    "ERR_UNAVAILABLE",
    "ERR_INTERNAL",
];

/// Outcomes of [`REDEMPTIONS`] registered at start (errors carry `format_version="none"`,
/// successes the version they matched, `1` for a SKU that never changed its format).
pub const REDEMPTION_OUTCOMES: &[&str] = &[
    "new",
    "replay",
    "ERR_CARD_INVALID",
    "ERR_CARD_MALFORMED",
    "ERR_CARD_USED",
    "ERR_CARD_EXPIRED",
    "ERR_LOCKED_OUT",
    "ERR_NOT_FOUND",
    "ERR_BAD_REQUEST",
    "ERR_PAUSED",
    "ERR_UNAVAILABLE",
    "ERR_INTERNAL",
];

/// The `scope` label of the pause gauges ([`PAUSES`] and the timestamps).
pub const PAUSE_SCOPES: [&str; 2] = ["gateway", "sku"];
/// The `action` label of the pause gauges.
pub const PAUSE_ACTIONS: [&str; 2] = ["claims", "redemptions"];

/// The `state` label of [`INVENTORY_KEYS`] and [`LEDGER_KEYS`].
pub const KEY_STATES: [&str; 5] = ["available", "held", "claimed", "redeemed", "void"];

/// The `sku` label value that stands for every SKU past the cap ([`SkuLabels`]). Not a valid
/// SKU name (parentheses are not allowed in one), so it never merges with a real SKU.
pub const OTHER_SKU: &str = "(other)";

/// Default of `metrics_max_skus`: SKUs with a label value of their own.
pub const DEFAULT_MAX_SKU_LABELS: usize = 500;

/// Which SKUs get an `sku` label value of their own.
///
/// A SKU is labelled by name when it is first seen while fewer than the cap are; every
/// later SKU is counted under [`OTHER_SKU`]: its gauges summed there (its oldest pending
/// event's age: the oldest of them), its dead letters counted there. Summing keeps every
/// alert whole (drift or dead letters in a SKU past the cap still fire, under `(other)`)
/// where dropping the SKUs would hide exactly the ones nobody expected. A SKU keeps its own
/// label for the life of the process, so series do not flip between names; which SKUs get
/// one is decided anew at each start, in name order of the SKUs the engine lists first.
#[derive(Debug)]
pub struct SkuLabels {
    max: AtomicUsize,
    named: RwLock<HashSet<String>>,
}

impl SkuLabels {
    fn new(max: usize) -> SkuLabels {
        SkuLabels {
            max: AtomicUsize::new(max),
            named: RwLock::new(HashSet::new()),
        }
    }

    /// Sets the cap; SKUs already labelled keep their label.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// The SKU's label value: its name, or [`OTHER_SKU`] past the cap.
    pub fn label(&self, sku: &str) -> String {
        if self.is_named(sku) {
            return sku.to_owned();
        }
        let mut named = self.named.write().unwrap_or_else(|e| e.into_inner());
        if named.contains(sku) || named.len() < self.max.load(Ordering::Relaxed) {
            named.insert(sku.to_owned());
            return sku.to_owned();
        }
        OTHER_SKU.to_owned()
    }

    /// Whether the SKU has a label value of its own (without giving it one).
    pub fn is_named(&self, sku: &str) -> bool {
        self.named
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(sku)
    }
}

/// The process's SKU labels: one per process, like the recorder whose series it bounds.
pub fn sku_labels() -> &'static SkuLabels {
    static LABELS: OnceLock<SkuLabels> = OnceLock::new();
    LABELS.get_or_init(|| SkuLabels::new(DEFAULT_MAX_SKU_LABELS))
}

/// The process-wide Prometheus recorder, installed on first use. One per process because
/// the `metrics` facade has one global recorder; gateways in the same process share it.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("bucket list is non-empty")
            .install_recorder()
            .expect("no other metrics recorder is installed in this process");
        describe();
        handle
    })
}

fn describe() {
    for m in CATALOGUE {
        match m.kind {
            Kind::Counter => describe_counter!(m.name, m.help),
            Kind::Gauge if m.name.ends_with("_seconds") => {
                describe_gauge!(m.name, Unit::Seconds, m.help)
            }
            Kind::Gauge => describe_gauge!(m.name, m.help),
            Kind::Histogram => describe_histogram!(m.name, Unit::Seconds, m.help),
        }
    }
}

/// Counts a stored code that did not open under `data_key` ([`DECRYPT_FAILURES`]).
pub fn decrypt_failure(data_key: &str) {
    metrics::counter!(DECRYPT_FAILURES, "data_key" => data_key.to_owned()).increment(1);
}

/// Registers [`DECRYPT_FAILURES`] at 0 for the keyring's data keys and `unknown`.
pub fn initialise_keys<'a>(data_keys: impl IntoIterator<Item = &'a str>) {
    for key in data_keys.into_iter().chain(["unknown"]) {
        metrics::counter!(DECRYPT_FAILURES, "data_key" => key.to_owned()).increment(0);
    }
}

/// Registers at 0 the label sets that do not depend on routes, rules or SKUs (those are
/// registered where they are known: the route tables, the edge, the gauge sweep).
/// `engine` is the engine's label (`redis` or `embedded`); `scripts` the script names.
pub fn initialise<'a>(engine: &'static str, scripts: impl IntoIterator<Item = &'a str>) {
    for outcome in CLAIM_OUTCOMES {
        metrics::counter!(CLAIMS, "outcome" => *outcome).increment(0);
    }
    for outcome in REDEMPTION_OUTCOMES {
        let version = match *outcome {
            "new" | "replay" => VersionLabel::Of(1),
            _ => VersionLabel::None,
        };
        metrics::counter!(REDEMPTIONS, "outcome" => *outcome, "format_version" => version.as_str())
            .increment(0);
    }
    for script in scripts {
        let script = script.to_owned();
        let _ =
            metrics::histogram!(SCRIPT_DURATION, "script" => script.clone(), "engine" => engine);
        for kind in ["unavailable", "script"] {
            metrics::counter!(SCRIPT_ERRORS, "script" => script.clone(), "kind" => kind)
                .increment(0);
        }
    }
    for result in ["accepted", "rejected", "duplicate"] {
        metrics::counter!(IMPORT_ROWS, "result" => result).increment(0);
    }
    metrics::counter!(HOLDS_EXPIRED).increment(0);
    for record in ["order", "redemption"] {
        metrics::counter!(RETIRED, "record" => record).increment(0);
    }
    for result in ["restored", "unknown"] {
        metrics::counter!(ORDERS_RESTORED, "result" => result).increment(0);
    }
    for listener in ["public", "admin"] {
        metrics::gauge!(CONNECTIONS_OPEN, "listener" => listener).increment(0.0);
        metrics::counter!(CONNECTIONS_REFUSED, "listener" => listener).increment(0);
        metrics::counter!(HEADER_TIMEOUTS, "listener" => listener).increment(0);
    }
    metrics::gauge!(IN_FLIGHT_REQUESTS).increment(0.0);
    metrics::counter!(SHED).increment(0);
    for source in ["new", "own", "claimed"] {
        metrics::counter!(EVENTS_COMMITTED, "source" => source).increment(0);
    }
    let _ = metrics::histogram!(LEDGER_WRITE_DURATION);
    for kind in ["unavailable", "rejected"] {
        metrics::counter!(LEDGER_WRITE_FAILURES, "kind" => kind).increment(0);
    }
    for scope in PAUSE_SCOPES {
        for action in PAUSE_ACTIONS {
            for name in [PAUSES, PAUSE_EXPECTED_END, PAUSE_STARTED] {
                metrics::gauge!(name, "scope" => scope, "action" => action).increment(0.0);
            }
        }
    }
    metrics::gauge!(PAUSES_STALE).increment(0.0);
}

/// Registers at 0 the series of a channel the dashboards and alerts query.
pub fn initialise_channel(channel: &str) {
    for outcome in CLAIM_OUTCOMES {
        metrics::counter!(CHANNEL_CLAIMS, "channel" => channel.to_owned(), "outcome" => *outcome)
            .increment(0);
    }
    metrics::gauge!(CHANNEL_BREAKER_STATE, "channel" => channel.to_owned()).increment(0.0);
    for to in ["open", "half_open", "closed"] {
        metrics::counter!(CHANNEL_BREAKER_CHANGES, "channel" => channel.to_owned(), "to" => to)
            .increment(0);
    }
    metrics::counter!(CHANNEL_SHED, "channel" => channel.to_owned()).increment(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latency_objective_is_a_bucket_boundary() {
        assert!(LATENCY_BUCKETS.contains(&LATENCY_SLO_SECONDS));
    }

    #[test]
    fn the_catalogue_names_each_metric_once() {
        let mut names = HashSet::new();
        for m in CATALOGUE {
            assert!(names.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("kamigate_"), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                m.name
            );
        }
    }

    #[test]
    fn no_label_names_a_client_a_card_an_order_or_a_person() {
        // `code` on the HTTP counter is the answer's error code (`ERR_…`), never a card's.
        let unbounded = [
            "ip", "client", "address", "card", "key_id", "order", "order_id", "redeemer", "user",
            "user_id", "batch_id", "token",
        ];
        for m in CATALOGUE {
            for label in m.labels {
                assert!(!unbounded.contains(label), "{}: label {label}", m.name);
            }
        }
    }

    #[test]
    fn skus_past_the_cap_share_one_label() {
        let labels = SkuLabels::new(2);
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("b"), "b");
        assert_eq!(labels.label("c"), OTHER_SKU);
        assert_eq!(labels.label("a"), "a", "a labelled SKU keeps its label");
        assert!(!labels.is_named("c"));
        labels.set_max(3);
        assert_eq!(labels.label("c"), "c");
        assert!(crate::sku::check_sku(OTHER_SKU).is_err());
    }
}
