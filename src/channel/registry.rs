//! Each gateway's view of the channels in the ledger: who a bearer token is, and each
//! channel's live limiter and breaker.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::breaker::{
    counts_as_failure, Admission, Breaker, BreakerRule, BreakerState, Transition,
};
use super::{scoped, ChannelConfig, DEFAULT};
use crate::error::Error;
use crate::ledger::view::ViewReads;
use crate::ledger::{ChannelRecord, Ledger};
use crate::limit::{BucketRule, GlobalBucket};
use crate::metrics as m;

/// SHA-256 of a bearer token: how the ledger and the view know it.
pub fn token_digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// A channel as this gateway serves it.
pub struct Channel {
    pub name: String,
    pub config: ChannelConfig,
    /// Its settings as the ledger holds them; a refresh keeps the channel (and its bucket
    /// and breaker state) while they are unchanged.
    config_json: String,
    bucket: GlobalBucket,
    /// `None` for the default channel unless its settings name a breaker: the merchant
    /// token behaves as it did before channels existed.
    breaker: Option<Breaker>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Channel {
    fn new(name: &str, config: ChannelConfig, config_json: String, defaults: &Defaults) -> Self {
        let rule = config.limits.unwrap_or(defaults.bucket);
        let breaker = match config.breaker {
            Some(rule) => Some(rule),
            None if name == DEFAULT => None,
            None => Some(defaults.breaker),
        };
        m::initialise_channel(name);
        Channel {
            name: name.to_owned(),
            config,
            config_json,
            // Every channel's bucket is a merchant bucket: the decisions keep the
            // `rule="merchant"` label they had before channels.
            bucket: GlobalBucket::new("merchant", rule, Default::default()),
            breaker: breaker.map(Breaker::new),
        }
    }

    /// Whether it is the channel of the configured merchant token.
    pub fn is_default(&self) -> bool {
        self.name == DEFAULT
    }

    /// The engine's name of this channel's order or user `id` (see [`super::scoped`]).
    pub fn scoped<'a>(&self, id: &'a str) -> std::borrow::Cow<'a, str> {
        scoped(&self.name, id)
    }

    /// Refuses a SKU the channel may not sell.
    pub fn may_sell(&self, sku: &str) -> Result<(), Error> {
        if self.config.sells(sku) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "channel {} may not sell SKU {sku}",
                self.name
            )))
        }
    }

    /// Admits one request: its breaker, then its bucket. Returns whether the request is
    /// a half-open breaker's probe (its outcome decides the breaker).
    pub fn admit(&self, now_ms: u64) -> Result<bool, Error> {
        let Some(breaker) = &self.breaker else {
            self.bucket.check().enforce()?;
            return Ok(false);
        };
        let (admission, transition) = breaker.admit(now_ms);
        self.note(transition, now_ms);
        let probe = match admission {
            Admission::Pass { probe } => probe,
            Admission::Shed { retry_after_ms } => {
                metrics::counter!(m::CHANNEL_SHED, "channel" => self.name.clone()).increment(1);
                return Err(Error::ChannelShed {
                    channel: self.name.clone(),
                    retry_after_ms,
                });
            }
        };
        if let Err(e) = self.bucket.check().enforce() {
            // Refused before it did anything: a probe not sent, so its slot goes back rather
            // than counting as a success.
            if probe {
                breaker.unsend_probe();
            }
            return Err(e);
        }
        Ok(probe)
    }

    /// Counts the outcome of a request the channel made.
    pub fn observe(&self, now_ms: u64, probe: bool, outcome: Result<(), &Error>) {
        let Some(breaker) = &self.breaker else {
            return;
        };
        let failed = outcome.is_err_and(counts_as_failure);
        let transition = breaker.record(now_ms, probe, failed);
        self.note(transition, now_ms);
    }

    /// Its breaker's state at `now_ms` (closed when it has none).
    pub fn breaker_state(&self, now_ms: u64) -> BreakerState {
        self.breaker
            .as_ref()
            .map_or(BreakerState::Closed, |b| b.state(now_ms))
    }

    fn note(&self, transition: Option<Transition>, now_ms: u64) {
        let Some(Transition { from, to }) = transition else {
            return;
        };
        let shadow = self.breaker.as_ref().is_some_and(|b| b.rule().shadow);
        tracing::warn!(
            channel = %self.name,
            from = from.as_str(),
            to = to.as_str(),
            shadow,
            "channel breaker changed state"
        );
        metrics::counter!(m::CHANNEL_BREAKER_CHANGES, "channel" => self.name.clone(),
            "to" => to.as_str())
        .increment(1);
        metrics::gauge!(m::CHANNEL_BREAKER_STATE, "channel" => self.name.clone())
            .set(self.breaker_state(now_ms).level());
    }
}

/// What a channel without its own settings gets.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// `limits.merchant`.
    pub bucket: BucketRule,
    /// `channel_breaker`.
    pub breaker: BreakerRule,
}

#[derive(Default)]
struct View {
    by_name: BTreeMap<String, Arc<Channel>>,
    by_digest: HashMap<[u8; 32], Arc<Channel>>,
    /// The ledger's records, for the admin API's listings.
    records: Vec<ChannelRecord>,
}

/// This gateway's view of the channels, refreshed from the ledger.
pub struct Channels {
    view: RwLock<Arc<View>>,
    merchant_digest: [u8; 32],
    defaults: Defaults,
    /// Tickets of refreshes: a refresh that read the ledger earlier than the last one
    /// stored must not put an older view back.
    next_ticket: AtomicU64,
    stored_ticket: AtomicU64,
    /// Whether the ledger was read at least once: until then a token the view does not
    /// know may be a channel's, and is told to retry rather than that it is wrong.
    loaded: AtomicBool,
    reads: ViewReads,
}

impl Channels {
    /// The default channel alone, for `merchant_token`, until the ledger is read.
    pub fn new(merchant_token: &str, defaults: Defaults) -> Channels {
        let channels = Channels {
            view: RwLock::new(Arc::new(View::default())),
            merchant_digest: token_digest(merchant_token.as_bytes()),
            defaults,
            next_ticket: AtomicU64::new(1),
            stored_ticket: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            reads: ViewReads::new("channels"),
        };
        let view = channels.build(&[], &View::default());
        *channels
            .view
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(view);
        channels
    }

    fn current(&self) -> Arc<View> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The channel a bearer token belongs to.
    pub fn authenticate(&self, token: &[u8]) -> Result<Arc<Channel>, Error> {
        let digest = token_digest(token);
        let view = self.current();
        // Constant time for the configured token, like every token comparison before
        // channels; the map is keyed by digests, whose prefixes tell a guesser nothing.
        if bool::from(digest.ct_eq(&self.merchant_digest)) {
            return view
                .by_name
                .get(DEFAULT)
                .cloned()
                .ok_or(Error::Unauthorized);
        }
        match view.by_digest.get(&digest) {
            Some(channel) => Ok(channel.clone()),
            None if !self.loaded.load(Ordering::Acquire) => Err(Error::Unavailable(
                "the channels are not read from the ledger yet".into(),
            )),
            None => Err(Error::Unauthorized),
        }
    }

    /// A channel by name, as this gateway serves it: `NotFound` only once the ledger was
    /// read (before, a channel made through another gateway may exist: retry).
    pub fn serving(&self, name: &str) -> Result<Arc<Channel>, Error> {
        match self.current().by_name.get(name) {
            Some(channel) => Ok(channel.clone()),
            None if !self.loaded.load(Ordering::Acquire) => Err(Error::Unavailable(
                "the channels are not read from the ledger yet".into(),
            )),
            None => Err(Error::NotFound(format!("channel {name}"))),
        }
    }

    /// Every channel the ledger holds, as last read.
    pub fn records(&self) -> Vec<ChannelRecord> {
        self.current().records.clone()
    }

    /// Names of the channels served, the default one included.
    pub fn names(&self) -> Vec<String> {
        self.current().by_name.keys().cloned().collect()
    }

    /// Whether the last refresh could not read the ledger.
    pub fn stale(&self) -> bool {
        self.reads.stale()
    }

    /// Reads the channels from the ledger and serves them. When the ledger cannot be read
    /// the last view stays (revoking tokens exactly when the database is in trouble would
    /// turn a hiccup into an outage), said once in the log. Returns whether it was read.
    pub async fn refresh(&self, ledger: &dyn Ledger) -> bool {
        let ticket = self.next_ticket.fetch_add(1, Ordering::SeqCst);
        let Some(records) = self.reads.read(ledger.channels()).await else {
            return false;
        };
        let mut slot = self.view.write().unwrap_or_else(PoisonError::into_inner);
        if ticket > self.stored_ticket.load(Ordering::SeqCst) {
            let view = self.build(&records, &slot);
            *slot = Arc::new(view);
            self.stored_ticket.store(ticket, Ordering::SeqCst);
        }
        self.loaded.store(true, Ordering::Release);
        drop(slot);
        self.publish();
        true
    }

    /// A view of `records`, keeping the channels of `before` whose settings are unchanged.
    fn build(&self, records: &[ChannelRecord], before: &View) -> View {
        let mut view = View {
            records: records.to_vec(),
            ..View::default()
        };
        let keep_or_make =
            |name: &str, config: ChannelConfig, json: &str| match before.by_name.get(name) {
                Some(kept) if kept.config_json == json => kept.clone(),
                _ => Arc::new(Channel::new(name, config, json.to_owned(), &self.defaults)),
            };
        for record in records {
            // Settings the ledger holds were checked when they were put; settings a newer
            // gateway wrote that this one cannot read leave the channel out rather than
            // serving it with rules it was not given.
            let config = match serde_json::from_str::<ChannelConfig>(&record.config_json) {
                Ok(config) => config,
                Err(error) => {
                    tracing::error!(channel = %record.channel, %error,
                        "channel settings in the ledger are unreadable: channel not served");
                    continue;
                }
            };
            let channel = keep_or_make(&record.channel, config, &record.config_json);
            for token in record.tokens.iter().filter(|t| t.revoked_at_ms.is_none()) {
                let mut digest = [0u8; 32];
                if hex::decode_to_slice(&token.digest, &mut digest).is_ok() {
                    view.by_digest.insert(digest, channel.clone());
                }
            }
            view.by_name.insert(record.channel.clone(), channel);
        }
        if !view.by_name.contains_key(DEFAULT) {
            let channel = keep_or_make(DEFAULT, ChannelConfig::default(), "");
            view.by_name.insert(DEFAULT.to_owned(), channel);
        }
        view
    }

    /// Breaker gauges of every channel served.
    fn publish(&self) {
        let now = crate::clock::now_ms();
        for (name, channel) in &self.current().by_name {
            metrics::gauge!(m::CHANNEL_BREAKER_STATE, "channel" => name.clone())
                .set(channel.breaker_state(now).level());
        }
    }
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels")
            .field("channels", &self.names())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_channel_is_denied_only_once_the_ledger_was_read() {
        let defaults = Defaults {
            bucket: BucketRule {
                per_second: 0,
                burst: 0,
                shadow: false,
            },
            breaker: BreakerRule::default(),
        };
        let channels = Channels::new("merchant", defaults);
        assert!(matches!(
            channels.serving("shop"),
            Err(Error::Unavailable(_))
        ));
        let dir = tempfile::tempdir().expect("temp dir");
        let ledger = crate::ledger::open(Some("sqlite::memory:"), dir.path())
            .await
            .expect("ledger");
        assert!(channels.refresh(ledger.as_ref()).await);
        assert!(matches!(channels.serving("shop"), Err(Error::NotFound(_))));
        assert!(channels.serving(crate::channel::DEFAULT).is_ok());
    }
}
