//! Every metric kamigate exports, with its description, in one place.
//!
//! Labels are bounded: routes are matched patterns (never raw paths), outcomes and error
//! codes are fixed sets, SKUs are names merchants created. No label ever holds a code.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::limit;

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
// Limiter metrics are named next to the limiters: [`limit::DECISIONS`],
// [`limit::IN_FLIGHT`], [`limit::SHED`].

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

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
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by matched route, method, status and error code."
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request latency by matched route and outcome."
    );
    describe_counter!(CLAIMS, "Claims by outcome.");
    describe_counter!(
        REDEMPTIONS,
        "Redemptions by outcome and by the SKU format version the code matched."
    );
    describe_histogram!(
        SCRIPT_DURATION,
        Unit::Seconds,
        "Latency of engine script calls by script and engine."
    );
    describe_counter!(SCRIPT_ERRORS, "Engine script failures by script and kind.");
    describe_counter!(IMPORT_ROWS, "Imported rows by result.");
    describe_counter!(HOLDS_EXPIRED, "Holds lapsed by the background sweep.");
    describe_gauge!(INVENTORY_KEYS, "Keys per SKU and state in the engine.");
    describe_gauge!(ENGINE_UP, "1 while the engine answers, else 0.");
    describe_gauge!(LEDGER_KEYS, "Keys per SKU and state in the ledger.");
    describe_gauge!(
        DRIFT,
        "Keys per SKU whose state differs between engine and ledger beyond the events in flight."
    );
    describe_gauge!(
        IN_FLIGHT_EVENTS,
        "Events per SKU written by the engine and not yet committed to the ledger."
    );
    describe_gauge!(CONNECTIONS_OPEN, "Connections open per listener.");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed on accept per listener because its connection cap was reached."
    );
    describe_counter!(
        HEADER_TIMEOUTS,
        "Connections closed per listener because a request head did not arrive within the header read timeout."
    );
    crate::ledger::writer::describe();
    describe_counter!(limit::DECISIONS, limit::DECISIONS_HELP);
    describe_gauge!(limit::IN_FLIGHT, limit::IN_FLIGHT_HELP);
    describe_counter!(limit::SHED, limit::SHED_HELP);
}
