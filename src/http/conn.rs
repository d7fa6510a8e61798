//! Connection-level defences against hostile clients, before and around hyper's parser.
//!
//! - **A cap per listener** ([`ConnectionCap`]): each listener holds at most so many
//!   connections; past it a new connection is closed at once rather than queued. The admin
//!   listener has its own budget, so probes and scrapes are answered while the public one is
//!   flooded, and the process keeps file descriptors in hand ([`ensure_descriptors`]).
//! - **A header read timeout** (hyper's, driven by [`TokioTimer`]): a connection that does not
//!   deliver a request's line and headers in time — a slowloris sending a partial request and
//!   stalling or trickling, or an idle keep-alive connection — is closed.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics as m;

/// How long a client may take to send a request's head.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub header_read_timeout: Duration,
}

impl HeadLimits {
    /// The HTTP/1 connection settings: hyper's header read timeout, on tokio's timer.
    pub fn builder(&self) -> http1::Builder {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout);
        builder
    }
}

/// At most so many open connections on one listener.
#[derive(Clone)]
pub struct ConnectionCap {
    listener: &'static str,
    slots: Arc<Semaphore>,
}

impl ConnectionCap {
    /// A cap of `max` connections for the listener named `listener` (a metric label).
    pub fn new(listener: &'static str, max: usize) -> ConnectionCap {
        ConnectionCap {
            listener,
            slots: Arc::new(Semaphore::new(max)),
        }
    }

    /// A slot for a just-accepted connection, held until the connection ends; `None` when
    /// the listener is full and the connection is to be closed at once. Waiting for a slot
    /// instead would only hold the socket longer: the client is better off retrying.
    pub fn admit(&self) -> Option<ConnectionSlot> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                metrics::gauge!(m::CONNECTIONS_OPEN, "listener" => self.listener).increment(1.0);
                Some(ConnectionSlot {
                    listener: self.listener,
                    _permit: permit,
                })
            }
            Err(_) => {
                metrics::counter!(m::CONNECTIONS_REFUSED, "listener" => self.listener).increment(1);
                None
            }
        }
    }

    /// Counts a connection hyper closed because its request head did not arrive in time.
    pub fn timed_out(&self) {
        metrics::counter!(m::HEADER_TIMEOUTS, "listener" => self.listener).increment(1);
    }
}

/// One open connection's place under its listener's cap.
pub struct ConnectionSlot {
    listener: &'static str,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        metrics::gauge!(m::CONNECTIONS_OPEN, "listener" => self.listener).decrement(1.0);
    }
}

/// Descriptors kept aside beyond the connection caps: ledger and Redis connections, data
/// files, the listeners themselves.
const RESERVED_DESCRIPTORS: u64 = 256;

/// Makes sure the process may open a descriptor for every connection the caps allow plus a
/// reserve: otherwise a flood runs the process out of descriptors before the public cap
/// bites, and the admin listener cannot accept either. Raises the soft limit as far as
/// needed (never above the hard limit) and warns when that is not enough.
pub fn ensure_descriptors(connections: usize) {
    let needed = connections as u64 + RESERVED_DESCRIPTORS;
    match raise_descriptor_limit(needed) {
        Ok(limit) if limit >= needed => {}
        Ok(limit) => tracing::warn!(
            limit,
            needed,
            "the open-file limit is below max_connections + admin_max_connections + \
             {RESERVED_DESCRIPTORS}: a connection flood can starve the admin listener; raise \
             `ulimit -n` or lower the caps"
        ),
        Err(e) => tracing::warn!(error = %e, "the open-file limit could not be read"),
    }
}

/// The soft open-file limit after raising it towards `needed`.
#[cfg(unix)]
// `rlim_t` is `u64` on Linux but not on every Unix.
#[allow(clippy::unnecessary_cast)]
fn raise_descriptor_limit(needed: u64) -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let current = limit.rlim_cur as u64;
    let hard = limit.rlim_max as u64;
    if current >= needed || current >= hard {
        return Ok(current);
    }
    let raised = libc::rlimit {
        rlim_cur: needed.min(hard) as libc::rlim_t,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        // Some systems cap the soft limit below the hard one (macOS: OPEN_MAX); keep going
        // with what there is.
        return Ok(current);
    }
    Ok(raised.rlim_cur as u64)
}

#[cfg(not(unix))]
fn raise_descriptor_limit(_needed: u64) -> std::io::Result<u64> {
    Ok(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_listener_refuses_until_a_connection_ends() {
        let cap = ConnectionCap::new("test", 2);
        let first = cap.admit().expect("room");
        let _second = cap.admit().expect("room");
        assert!(cap.admit().is_none(), "full");
        drop(first);
        assert!(cap.admit().is_some(), "a slot came back");
    }
}
