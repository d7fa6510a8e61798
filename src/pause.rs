//! Incident controls: claims or redemptions paused, per SKU or for the whole gateway.
//!
//! # Where pauses live, and why
//!
//! An on-call engineer pulls this lever through one gateway's admin API, or with
//! `kamigate pause`, and every gateway sharing the ledger must obey it within a second, after
//! a restart too, and while Redis is down. So the ledger is the record
//! ([`Ledger::pauses`], with every pause and resume in its history), and each gateway answers
//! from an in-memory view ([`Pauses`]) refreshed every `pause_refresh_ms` and at once when a
//! change goes through it. A ledger that cannot be read leaves the last view in force, said
//! once in the log and on a gauge: lifting pauses exactly when the database is in trouble
//! would undo the operator's decision, and refusing everything would turn a database hiccup
//! into an outage.
//!
//! # What a pause refuses
//!
//! Only what would be new. A client retrying a request it already had answered before the
//! pause gets that first answer again, so nobody who paid loses their codes to an incident:
//!
//! - **claims**: a new order is `ERR_PAUSED` at the edge; an order that exists already is told
//!   apart by one O(1) read (as on the sold-out path) and goes to the engine, which can only
//!   replay it. A confirm of a hold still running takes the codes set aside before the
//!   pause; a late confirm (its hold lapsed) would claim fresh codes and is refused. Releases
//!   go through: they return stock.
//! - **redemptions**: the redemption script is told (`lua/redeem.lua`); it answers everything
//!   as usual (replays, used, unknown, expired) except that it makes no new redemption. So a
//!   pause tells a client nothing about a code that a normal answer would not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use serde_json::{json, Value};

use crate::error::{timestamp, Error};
use crate::ledger::view::ViewReads;
use crate::ledger::{Ledger, NewPause, PauseEventRecord, PauseRecord};
use crate::metrics as m;
use crate::sku::{check_id, check_reason, check_sku, MAX_ID_LEN, MAX_REASON_LEN};

/// Longest expected duration an operator may give, in milliseconds (a week).
pub const MAX_EXPECTED_DURATION_MS: u64 = 7 * 24 * 3600 * 1000;
/// Most history entries one listing returns.
pub const MAX_HISTORY: u32 = 1000;

/// What can be paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Claims,
    Redemptions,
}

impl Action {
    pub const ALL: [Action; 2] = [Action::Claims, Action::Redemptions];

    /// The API's and the ledger's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Claims => "claims",
            Action::Redemptions => "redemptions",
        }
    }

    fn index(self) -> usize {
        match self {
            Action::Claims => 0,
            Action::Redemptions => 1,
        }
    }

    /// The actions `claims`, `redemptions` or `all` name.
    pub fn parse_many(value: &str) -> Result<Vec<Action>, Error> {
        match value {
            "claims" => Ok(vec![Action::Claims]),
            "redemptions" => Ok(vec![Action::Redemptions]),
            "all" => Ok(Action::ALL.to_vec()),
            _ => Err(Error::BadRequest(
                "field `action` must be claims, redemptions or all".into(),
            )),
        }
    }

    fn parse(value: &str) -> Option<Action> {
        match value {
            "claims" => Some(Action::Claims),
            "redemptions" => Some(Action::Redemptions),
            _ => None,
        }
    }
}

/// What a pause covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Every SKU.
    Gateway,
    Sku(String),
}

impl Target {
    /// The ledger's spelling: the SKU, or `""` for the whole gateway (SKU names are never
    /// empty).
    pub fn ledger_key(&self) -> &str {
        match self {
            Target::Gateway => "",
            Target::Sku(sku) => sku,
        }
    }

    fn from_ledger(key: &str) -> Target {
        if key.is_empty() {
            Target::Gateway
        } else {
            Target::Sku(key.to_owned())
        }
    }

    /// The `scope` label and field: `gateway` or `sku`.
    pub fn scope(&self) -> &'static str {
        match self {
            Target::Gateway => "gateway",
            Target::Sku(_) => "sku",
        }
    }

    fn sku(&self) -> Option<&str> {
        match self {
            Target::Gateway => None,
            Target::Sku(sku) => Some(sku),
        }
    }
}

/// A pause in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    pub target: Target,
    pub action: Action,
    pub reason: String,
    /// Who paused it (the `by` the operator gave, or where it came from).
    pub by: String,
    pub since_ms: u64,
    /// When the operator expected to resume, if they said.
    pub expected_end_ms: Option<u64>,
}

impl Pause {
    /// A ledger record as a pause; `None` for an action this gateway does not know (written
    /// by a newer one), which it cannot enforce anyway.
    pub fn from_record(record: &PauseRecord) -> Option<Pause> {
        Some(Pause {
            target: Target::from_ledger(&record.sku),
            action: Action::parse(&record.action)?,
            reason: record.reason.clone(),
            by: record.paused_by.clone(),
            since_ms: record.paused_at_ms.max(0) as u64,
            expected_end_ms: record.expected_end_ms.map(|t| t.max(0) as u64),
        })
    }

    /// Whether the pause outlived the duration the operator expected.
    pub fn overdue(&self, now_ms: u64) -> bool {
        self.expected_end_ms.is_some_and(|end| now_ms > end)
    }

    /// The admin API's representation.
    pub fn to_json(&self, now_ms: u64) -> Value {
        json!({
            "scope": self.target.scope(),
            "sku": self.target.sku(),
            "action": self.action.as_str(),
            "reason": self.reason,
            "by": self.by,
            "since": timestamp(self.since_ms),
            "expected_end": self.expected_end_ms.map(timestamp),
            "overdue": self.overdue(now_ms),
        })
    }
}

/// A history entry as the admin API shows it.
pub fn event_json(event: &PauseEventRecord) -> Value {
    let target = Target::from_ledger(&event.sku);
    json!({
        "kind": event.kind,
        "scope": target.scope(),
        "sku": target.sku(),
        "action": event.action,
        "reason": event.reason,
        "by": event.actor,
        "at": timestamp(event.at_ms.max(0) as u64),
        "expected_end": event.expected_end_ms.map(|t| timestamp(t.max(0) as u64)),
    })
}

/// A pause an operator asks for, checked.
#[derive(Debug, Clone)]
pub struct PauseOrder {
    pub target: Target,
    pub actions: Vec<Action>,
    pub reason: String,
    pub by: String,
    pub expected_duration_ms: Option<u64>,
}

/// A resume an operator asks for, checked.
#[derive(Debug, Clone)]
pub struct ResumeOrder {
    pub target: Target,
    pub actions: Vec<Action>,
    pub reason: Option<String>,
    pub by: String,
}

/// Checks the parts of a pause or resume an operator typed: the SKU, the reason (required
/// for a pause), who they are and the expected duration.
pub fn check_order(
    target: &Target,
    reason: Option<&str>,
    by: &str,
    expected_duration_ms: Option<u64>,
) -> Result<(), Error> {
    if let Target::Sku(sku) = target {
        check_sku(sku)?;
    }
    if let Some(reason) = reason {
        if reason.len() > MAX_REASON_LEN {
            return Err(Error::BadRequest(format!(
                "field `reason` is longer than {MAX_REASON_LEN} bytes"
            )));
        }
        check_reason(reason)?;
    }
    check_id("by", by, MAX_ID_LEN)?;
    if let Some(ms) = expected_duration_ms {
        if !(1000..=MAX_EXPECTED_DURATION_MS).contains(&ms) {
            return Err(Error::BadRequest(format!(
                "the expected duration must be from 1 s to {} days",
                MAX_EXPECTED_DURATION_MS / 86_400_000
            )));
        }
    }
    Ok(())
}

/// Requires that a paused or resumed SKU exists in the ledger.
async fn require_sku(ledger: &dyn Ledger, target: &Target) -> Result<(), Error> {
    if let Target::Sku(sku) = target {
        if ledger.get_sku(sku).await?.is_none() {
            return Err(Error::NotFound(format!("SKU {sku}")));
        }
    }
    Ok(())
}

/// Puts `order` in force in the ledger (only the ledger: this works while the engine is
/// down). Returns each pause as now in force, and whether it was in force already.
pub async fn pause(
    ledger: &dyn Ledger,
    order: &PauseOrder,
    now_ms: u64,
) -> Result<Vec<(Pause, bool)>, Error> {
    check_order(
        &order.target,
        Some(&order.reason),
        &order.by,
        order.expected_duration_ms,
    )?;
    require_sku(ledger, &order.target).await?;
    let expected_end_ms = order.expected_duration_ms.map(|d| now_ms.saturating_add(d));
    let mut done = Vec::new();
    for &action in &order.actions {
        let before = ledger
            .pause(&NewPause {
                sku: order.target.ledger_key().to_owned(),
                action: action.as_str().to_owned(),
                reason: order.reason.clone(),
                actor: order.by.clone(),
                at_ms: now_ms as i64,
                expected_end_ms: expected_end_ms.map(|t| t as i64),
            })
            .await?;
        let since_ms = before
            .as_ref()
            .map_or(now_ms, |b| b.paused_at_ms.max(0) as u64);
        done.push((
            Pause {
                target: order.target.clone(),
                action,
                reason: order.reason.clone(),
                by: order.by.clone(),
                since_ms,
                expected_end_ms,
            },
            before.is_some(),
        ));
    }
    Ok(done)
}

/// Lifts the pauses `order` names in the ledger. Returns, per action, the pause lifted, or
/// `None` when it was not paused (nothing is recorded then).
pub async fn resume(
    ledger: &dyn Ledger,
    order: &ResumeOrder,
    now_ms: u64,
) -> Result<Vec<(Action, Option<Pause>)>, Error> {
    check_order(&order.target, order.reason.as_deref(), &order.by, None)?;
    require_sku(ledger, &order.target).await?;
    let mut done = Vec::new();
    for &action in &order.actions {
        let lifted = ledger
            .resume(
                order.target.ledger_key(),
                action.as_str(),
                order.reason.as_deref(),
                &order.by,
                now_ms as i64,
            )
            .await?;
        done.push((action, lifted.as_ref().and_then(Pause::from_record)));
    }
    Ok(done)
}

/// While an action is paused (`paused` is its refusal), an engine or ledger that cannot be
/// reached is answered with the pause: nothing new could be made either way, and the pause
/// is what the operator wants clients to see.
pub fn or_paused<T>(result: Result<T, Error>, paused: Option<Error>) -> Result<T, Error> {
    match (result, paused) {
        (Err(Error::Unavailable(_)), Some(paused)) => Err(paused),
        (result, _) => result,
    }
}

/// The pauses in force, by target.
#[derive(Debug, Clone, Default)]
struct View {
    gateway: [Option<Pause>; 2],
    skus: HashMap<String, [Option<Pause>; 2]>,
}

impl View {
    fn of(pauses: impl IntoIterator<Item = Pause>) -> View {
        let mut view = View::default();
        for pause in pauses {
            view.set(pause);
        }
        view
    }

    fn set(&mut self, pause: Pause) {
        let i = pause.action.index();
        match pause.target.clone() {
            Target::Gateway => self.gateway[i] = Some(pause),
            Target::Sku(sku) => self.skus.entry(sku).or_default()[i] = Some(pause),
        }
    }

    fn remove(&mut self, target: &Target, action: Action) {
        let i = action.index();
        match target {
            Target::Gateway => self.gateway[i] = None,
            Target::Sku(sku) => {
                if let Some(slots) = self.skus.get_mut(sku) {
                    slots[i] = None;
                    if slots.iter().all(Option::is_none) {
                        self.skus.remove(sku);
                    }
                }
            }
        }
    }

    /// The pause that refuses `action` on `sku`: the gateway-wide one first.
    fn get(&self, sku: &str, action: Action) -> Option<&Pause> {
        let i = action.index();
        self.gateway[i]
            .as_ref()
            .or_else(|| self.skus.get(sku).and_then(|slots| slots[i].as_ref()))
    }

    fn all(&self) -> impl Iterator<Item = &Pause> {
        self.gateway
            .iter()
            .chain(self.skus.values().flat_map(|slots| slots.iter()))
            .flatten()
    }

    fn is_empty(&self) -> bool {
        self.all().next().is_none()
    }
}

/// This gateway's view of the pauses in force, and what it answers a paused request with.
#[derive(Debug)]
pub struct Pauses {
    view: RwLock<View>,
    /// Whether anything is paused: the one atomic load an unpaused request pays.
    any: AtomicBool,
    /// Bumped by every change made through this gateway, under the view's write lock: a
    /// refresh that read the ledger before the change must not put the old state back.
    generation: AtomicU64,
    /// Reads of the ledger, and whether the last one failed.
    reads: ViewReads,
    /// The longest `Retry-After` a paused request is told.
    retry_after_ms: u64,
}

impl Pauses {
    /// Nothing paused yet; refused requests are told to retry after at most
    /// `retry_after_secs` (sooner when the pause is expected to end sooner).
    pub fn new(retry_after_secs: u64) -> Pauses {
        let pauses = Pauses {
            view: RwLock::new(View::default()),
            any: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            reads: ViewReads::new("pauses"),
            retry_after_ms: retry_after_secs.saturating_mul(1000).max(1000),
        };
        pauses.publish(&View::default());
        pauses
    }

    /// `Ok` unless `action` is paused for `sku` or the whole gateway; then the answer to
    /// give.
    pub fn check(&self, sku: &str, action: Action, now_ms: u64) -> Result<(), Error> {
        if !self.any.load(Ordering::Acquire) {
            return Ok(());
        }
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        match view.get(sku, action) {
            None => Ok(()),
            Some(pause) => Err(self.refusal(pause, now_ms)),
        }
    }

    /// `Ok` unless `action` is paused for the whole gateway.
    pub fn check_gateway(&self, action: Action, now_ms: u64) -> Result<(), Error> {
        if !self.any.load(Ordering::Acquire) {
            return Ok(());
        }
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        match &view.gateway[action.index()] {
            None => Ok(()),
            Some(pause) => Err(self.refusal(pause, now_ms)),
        }
    }

    fn refusal(&self, pause: &Pause, now_ms: u64) -> Error {
        let until_end = pause
            .expected_end_ms
            .filter(|&end| end > now_ms)
            .map_or(u64::MAX, |end| end - now_ms);
        Error::Paused {
            action: pause.action.as_str(),
            gateway_wide: pause.target == Target::Gateway,
            retry_after_ms: self.retry_after_ms.min(until_end).max(1),
        }
    }

    /// Every pause in force, gateway-wide ones first, then by SKU.
    pub fn current(&self) -> Vec<Pause> {
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<Pause> = view.all().cloned().collect();
        all.sort_by(|a, b| {
            (a.target.sku(), a.action.index()).cmp(&(b.target.sku(), b.action.index()))
        });
        all
    }

    /// Whether the last refresh failed: the view may be behind the ledger.
    pub fn stale(&self) -> bool {
        self.reads.stale()
    }

    /// Puts a pause made through this gateway in force here at once.
    pub fn applied(&self, pause: Pause) {
        self.change(|view| view.set(pause));
    }

    /// Lifts a pause here at once (resumed through this gateway).
    pub fn lifted(&self, target: &Target, action: Action) {
        self.change(|view| view.remove(target, action));
    }

    fn change(&self, edit: impl FnOnce(&mut View)) {
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        edit(&mut view);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.any.store(!view.is_empty(), Ordering::Release);
        self.publish(&view);
    }

    /// Reads the pauses in force from the ledger and makes them this gateway's view. When
    /// the ledger cannot be read the last view stays, and the first failure in a row is
    /// logged (and the next success). Returns whether the ledger was read.
    pub async fn refresh(&self, ledger: &dyn Ledger) -> bool {
        let generation = self.generation.load(Ordering::SeqCst);
        let Some(records) = self.reads.read(ledger.pauses()).await else {
            metrics::gauge!(m::PAUSES_STALE).set(1.0);
            self.publish(&self.view.read().unwrap_or_else(PoisonError::into_inner));
            return false;
        };
        metrics::gauge!(m::PAUSES_STALE).set(0.0);
        let fresh = View::of(records.iter().filter_map(Pause::from_record));
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        // A change made through this gateway while the ledger was being read is newer than
        // what was read; the next refresh reads it back.
        if self.generation.load(Ordering::SeqCst) == generation {
            self.any.store(!fresh.is_empty(), Ordering::Release);
            *view = fresh;
        }
        self.publish(&view);
        true
    }

    /// The gauges of the pauses in force: per scope and action, how many, the earliest
    /// expected end and the earliest start (0 when there is none). Every label set exists
    /// from the start, at 0.
    fn publish(&self, view: &View) {
        for scope in m::PAUSE_SCOPES {
            for action in Action::ALL {
                let matching = view
                    .all()
                    .filter(|p| p.action == action && p.target.scope() == scope);
                let (mut count, mut end, mut start) = (0u64, None::<u64>, None::<u64>);
                for p in matching {
                    count += 1;
                    if let Some(e) = p.expected_end_ms {
                        end = Some(end.map_or(e, |x| x.min(e)));
                    }
                    start = Some(start.map_or(p.since_ms, |x| x.min(p.since_ms)));
                }
                let seconds = |ms: Option<u64>| ms.map_or(0.0, |ms| ms as f64 / 1000.0);
                let labels = [("scope", scope), ("action", action.as_str())];
                metrics::gauge!(m::PAUSES, &labels).set(count as f64);
                metrics::gauge!(m::PAUSE_EXPECTED_END, &labels).set(seconds(end));
                metrics::gauge!(m::PAUSE_STARTED, &labels).set(seconds(start));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause(target: Target, action: Action, expected_end_ms: Option<u64>) -> Pause {
        Pause {
            target,
            action,
            reason: "incident 42".into(),
            by: "oncall".into(),
            since_ms: 1_000,
            expected_end_ms,
        }
    }

    #[test]
    fn the_gauges_label_every_scope_and_action_the_catalogue_registers() {
        let actions: Vec<_> = Action::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(actions, m::PAUSE_ACTIONS);
        let scopes = [Target::Gateway.scope(), Target::Sku("gift".into()).scope()];
        assert_eq!(scopes, m::PAUSE_SCOPES);
    }

    #[test]
    fn a_sku_pause_covers_its_action_on_its_sku_only() {
        let pauses = Pauses::new(30);
        assert!(pauses.check("gift", Action::Claims, 0).is_ok());
        pauses.applied(pause(Target::Sku("gift".into()), Action::Claims, None));
        let refused = pauses
            .check("gift", Action::Claims, 2_000)
            .expect_err("paused");
        assert!(matches!(
            refused,
            Error::Paused {
                action: "claims",
                gateway_wide: false,
                retry_after_ms: 30_000
            }
        ));
        assert!(pauses.check("gift", Action::Redemptions, 2_000).is_ok());
        assert!(pauses.check("other", Action::Claims, 2_000).is_ok());
        pauses.lifted(&Target::Sku("gift".into()), Action::Claims);
        assert!(pauses.check("gift", Action::Claims, 2_000).is_ok());
        assert!(pauses.current().is_empty());
    }

    #[test]
    fn a_gateway_pause_covers_every_sku_and_wins_over_a_sku_pause() {
        let pauses = Pauses::new(30);
        pauses.applied(pause(Target::Sku("gift".into()), Action::Redemptions, None));
        pauses.applied(pause(Target::Gateway, Action::Redemptions, None));
        for sku in ["gift", "other"] {
            let refused = pauses
                .check(sku, Action::Redemptions, 2_000)
                .expect_err("paused");
            assert!(matches!(
                refused,
                Error::Paused {
                    gateway_wide: true,
                    ..
                }
            ));
        }
        assert!(pauses.check_gateway(Action::Redemptions, 0).is_err());
        assert!(pauses.check_gateway(Action::Claims, 0).is_ok());
        let current = pauses.current();
        assert_eq!(current.len(), 2);
        assert_eq!(current[0].target, Target::Gateway, "gateway-wide first");
    }

    #[test]
    fn retry_after_is_the_shorter_of_the_cap_and_the_expected_end() {
        let pauses = Pauses::new(30);
        pauses.applied(pause(Target::Gateway, Action::Claims, Some(12_500)));
        let retry = |now| match pauses.check("s", Action::Claims, now) {
            Err(Error::Paused { retry_after_ms, .. }) => retry_after_ms,
            other => panic!("not paused: {other:?}"),
        };
        assert_eq!(retry(10_000), 2_500);
        assert_eq!(retry(0), 12_500);
        // Overdue: the expected end says nothing any more; the cap applies.
        assert_eq!(retry(20_000), 30_000);
    }

    #[test]
    fn actions_parse_one_or_all_and_refuse_anything_else() {
        assert_eq!(Action::parse_many("claims").expect("ok"), [Action::Claims]);
        assert_eq!(Action::parse_many("all").expect("ok"), Action::ALL);
        for bad in ["", "claim", "CLAIMS", "all ", "redeem"] {
            assert!(Action::parse_many(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn orders_are_checked_like_other_operator_input() {
        let sku = Target::Sku("gift".into());
        assert!(check_order(&sku, Some("supplier leak"), "oncall", Some(60_000)).is_ok());
        assert!(check_order(&Target::Gateway, None, "oncall", None).is_ok());
        let long = "x".repeat(MAX_REASON_LEN + 1);
        for (target, reason, by, expected) in [
            (&sku, Some("   "), "oncall", None),
            (&sku, Some("two\nlines"), "oncall", None),
            (&sku, Some("a|b"), "oncall", None),
            (&sku, Some(long.as_str()), "oncall", None),
            (&sku, Some("ok"), "on call", None),
            (&sku, Some("ok"), "", None),
            (&sku, Some("ok"), "oncall", Some(10)),
            (
                &sku,
                Some("ok"),
                "oncall",
                Some(MAX_EXPECTED_DURATION_MS + 1),
            ),
            (&Target::Sku("a:b".into()), Some("ok"), "oncall", None),
            (
                &Target::Sku("'; DROP TABLE".into()),
                Some("ok"),
                "oncall",
                None,
            ),
        ] {
            assert!(
                check_order(target, reason, by, expected).is_err(),
                "{target:?} {reason:?} {by:?} {expected:?}"
            );
        }
    }
}
