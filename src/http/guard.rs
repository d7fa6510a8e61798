//! The edge's defences, in the order a request meets them: the in-flight cap, the global
//! bucket, the per-client or per-token bucket, then (redemptions) lockouts of clients and
//! redeemers that failed too often and (claims) the per-user claim rate.
//!
//! Every reject the edge can decide alone is decided here without a round trip: buckets are
//! in-process, and known lockouts and sold-out SKUs are remembered locally. Only the
//! cluster-wide windows (`lua/window.lua`) need the engine, and each rule says what to do
//! when it cannot be reached (fail open or closed).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;

use crate::clock::SharedClock;
use crate::engine::ScriptEngine;
use crate::error::Error;
use crate::limit::window::{Verdict, Windows};
use crate::limit::{
    client_ip, record, ClientKey, Decision, GlobalBucket, InFlight, InFlightGuard, KeyedBuckets,
    LimitsConfig, LockoutCache, SoldOutCache,
};
use crate::metrics::LIMITER_DECISIONS;

/// All per-instance limiter state, plus the handle to the cluster-wide windows.
pub struct Edge {
    config: LimitsConfig,
    public: KeyedBuckets<ClientKey>,
    global: GlobalBucket,
    in_flight: InFlight,
    /// SKUs an engine claim recently found sold out.
    pub sold_out: SoldOutCache,
    lockouts: LockoutCache,
    windows: Windows,
    clock: SharedClock,
}

const FAILED_REDEMPTIONS: &str = "failed_redemptions";
const USER_CLAIMS: &str = "user_claims";

impl Edge {
    /// Limiters configured by `config`; the windows live in `engine`.
    pub fn new(config: LimitsConfig, engine: Arc<dyn ScriptEngine>, clock: SharedClock) -> Edge {
        register_decisions(&config);
        Edge {
            public: KeyedBuckets::new("public", config.public, Default::default()),
            global: GlobalBucket::new("global", config.global, Default::default()),
            in_flight: InFlight::new(config.max_in_flight),
            sold_out: SoldOutCache::new(config.sold_out_cache_ms),
            lockouts: LockoutCache::new(config.lockout_cache_max_entries),
            windows: Windows::new(engine, clock.clone()),
            clock,
            config,
        }
    }

    /// The client's address: the peer, or what a trusted proxy says it forwarded for.
    pub fn client_ip(&self, peer: std::net::SocketAddr, headers: &HeaderMap) -> IpAddr {
        client_ip(
            peer,
            headers,
            &self.config.trusted_proxies,
            self.config.forwarded_header,
        )
    }

    /// Admits a request under the in-flight cap and the global bucket; the guard frees the
    /// slot when dropped.
    pub fn admit(&self) -> Result<InFlightGuard<'_>, Error> {
        let guard = self.in_flight.enter()?;
        self.global.check().enforce()?;
        Ok(guard)
    }

    /// The public bucket of a client.
    pub fn public(&self, ip: IpAddr) -> Result<(), Error> {
        self.public.check(&ClientKey::from(ip)).enforce()
    }

    /// Refuses a redemption from a locked-out client or for a locked-out redeemer.
    pub async fn redemption_allowed(&self, ip: IpAddr, redeemer: &str) -> Result<(), Error> {
        let rule = &self.config.failed_redemptions;
        if rule.max_failures == 0 {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let ip_text = client_subject(ip);
        let subjects = [subject("ip", &ip_text), subject("redeemer", redeemer)];
        for s in &subjects {
            if let Some(until) = self.lockouts.locked_until(s, now) {
                return self.lockout(until.saturating_sub(now), rule.shadow);
            }
        }
        let (by_ip, by_redeemer) = tokio::join!(
            self.windows.check("ip", &ip_text),
            self.windows.check("redeemer", redeemer)
        );
        for (s, verdict) in subjects.iter().zip([by_ip, by_redeemer]) {
            match verdict {
                Ok(Verdict::Allowed) => {}
                Ok(Verdict::Blocked { retry_after_ms }) => {
                    if !rule.shadow {
                        self.lockouts.lock(s, now + retry_after_ms, now);
                    }
                    return self.lockout(retry_after_ms, rule.shadow);
                }
                Err(e) => self.unreachable(FAILED_REDEMPTIONS, rule.fail_open, e)?,
            }
        }
        record(FAILED_REDEMPTIONS, Decision::Allow);
        Ok(())
    }

    /// Records a failed redemption (malformed, invalid or used code) against the client and
    /// the redeemer; the failure that reaches the limit locks them out.
    pub async fn redemption_failed(&self, ip: IpAddr, redeemer: &str) {
        let rule = &self.config.failed_redemptions;
        if rule.max_failures == 0 {
            return;
        }
        let ip_text = client_subject(ip);
        let (by_ip, by_redeemer) = tokio::join!(
            self.windows.fail("ip", &ip_text, rule),
            self.windows.fail("redeemer", redeemer, rule)
        );
        let now = self.clock.now_ms();
        let subjects = [subject("ip", &ip_text), subject("redeemer", redeemer)];
        for (s, verdict) in subjects.iter().zip([by_ip, by_redeemer]) {
            match verdict {
                Ok(Verdict::Blocked { retry_after_ms }) if !rule.shadow => {
                    self.lockouts.lock(s, now + retry_after_ms, now);
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "a failed redemption was not counted"),
            }
        }
    }

    /// The per-user claim rate.
    pub async fn claim_allowed(&self, user: &str) -> Result<(), Error> {
        let rule = &self.config.user_claims;
        if rule.max == 0 {
            return Ok(());
        }
        match self.windows.take("user", user, rule).await {
            Ok(Verdict::Allowed) => {
                record(USER_CLAIMS, Decision::Allow);
                Ok(())
            }
            Ok(Verdict::Blocked { retry_after_ms }) => {
                let retry_after = Duration::from_millis(retry_after_ms);
                let decision = if rule.shadow {
                    Decision::ShadowDeny { retry_after }
                } else {
                    Decision::Deny { retry_after }
                };
                record(USER_CLAIMS, decision);
                decision.enforce()
            }
            Err(e) => self.unreachable(USER_CLAIMS, rule.fail_open, e),
        }
    }

    /// Counts a sold-out answer given at the edge.
    pub fn sold_out_at_edge(&self) {
        metrics::counter!(LIMITER_DECISIONS, "rule" => "sold_out_cache", "decision" => "deny")
            .increment(1);
    }

    /// Drops idle buckets and expired cache entries.
    pub fn sweep(&self) {
        self.public.sweep();
        self.sold_out.sweep();
        self.lockouts.sweep(self.clock.now_ms());
    }

    /// How often [`Edge::sweep`] should run.
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.config.idle_sweep_interval_ms)
    }

    fn lockout(&self, retry_after_ms: u64, shadow: bool) -> Result<(), Error> {
        let retry_after = Duration::from_millis(retry_after_ms);
        if shadow {
            record(FAILED_REDEMPTIONS, Decision::ShadowDeny { retry_after });
            return Ok(());
        }
        record(FAILED_REDEMPTIONS, Decision::Deny { retry_after });
        Err(Error::LockedOut {
            retry_after_ms: retry_after_ms.max(1),
        })
    }

    fn unreachable(
        &self,
        rule: &'static str,
        fail_open: bool,
        e: crate::engine::EngineError,
    ) -> Result<(), Error> {
        let decision = if fail_open {
            "fail_open"
        } else {
            "fail_closed"
        };
        metrics::counter!(LIMITER_DECISIONS, "rule" => rule, "decision" => decision).increment(1);
        tracing::warn!(rule, decision, error = %e, "limiter window unreachable");
        if fail_open {
            Ok(())
        } else {
            Err(Error::from(e))
        }
    }
}

/// Registers at 0 every decision each enabled rule can take, so the dashboards and alerts
/// see each rule from the start (a rate of 0, not no data). Disabled rules stay absent.
fn register_decisions(config: &LimitsConfig) {
    const BUCKET: &[&str] = &["allow", "deny", "shadow_deny"];
    const WINDOW: &[&str] = &["allow", "deny", "shadow_deny", "fail_open", "fail_closed"];
    let rules: [(&str, bool, &[&str]); 6] = [
        ("public", config.public.is_enabled(), BUCKET),
        // Each channel's bucket (crate::channel), under the rule it had before channels.
        ("merchant", config.merchant.is_enabled(), BUCKET),
        ("global", config.global.is_enabled(), BUCKET),
        (
            FAILED_REDEMPTIONS,
            config.failed_redemptions.max_failures > 0,
            WINDOW,
        ),
        (USER_CLAIMS, config.user_claims.max > 0, WINDOW),
        ("sold_out_cache", true, &["deny"]),
    ];
    for (rule, enabled, decisions) in rules {
        if enabled {
            for decision in decisions {
                metrics::counter!(LIMITER_DECISIONS, "rule" => rule, "decision" => *decision)
                    .increment(0);
            }
        }
    }
}

fn subject(kind: &str, id: &str) -> String {
    format!("{kind}:{id}")
}

/// The client as the windows count it: an IPv4 address, or the /64 an IPv6 address lies in
/// (one subscriber usually holds a whole /64 and could otherwise rotate through it).
fn client_subject(ip: IpAddr) -> String {
    match ClientKey::from(ip) {
        ClientKey::V4(v4) => std::net::Ipv4Addr::from(v4).to_string(),
        ClientKey::V6Net(net) => format!("{net:016x}/64"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(client_subject(a), client_subject(b));
        assert_ne!(client_subject(a), client_subject(c));
        let v4: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(client_subject(v4), "192.0.2.7");
    }
}
