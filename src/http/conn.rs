//! Connection-level defences against hostile clients, before and around hyper's parser.
//!
//! - **A cap per listener** ([`ConnectionCap`]): each listener holds at most so many
//!   connections; past it a new connection is closed at once rather than queued. The admin
//!   listener has its own budget, so probes and scrapes are answered while the public one is
//!   flooded, and the process keeps file descriptors in hand ([`ensure_descriptors`]).
//! - **A header read timeout** (hyper's, driven by [`TokioTimer`]): a connection that does not
//!   deliver a request's line and headers in time — a slowloris sending a partial request and
//!   stalling or trickling, or an idle keep-alive connection — is closed.
//! - **Head limits** ([`HeadLimits`]): hyper's parser would answer an over-long request target
//!   or header block itself, with a bare status and no body. Its limits are set to at least
//!   twice ours, so a request moderately over ours reaches the service and gets
//!   `ERR_URI_TOO_LONG` (414) or `ERR_HEADERS_TOO_LARGE` (431) in the envelope; only one past
//!   those (or a request that is not HTTP at all) gets hyper's bare answer before the
//!   connection closes.
//! - **A lingering close** ([`LingeringStream`]): a request refused before its body was read
//!   (`413` on a declared length, or any answer a handler gives without reading the body)
//!   ends its connection. Hyper then closes the socket with the rest of the body unread,
//!   and the kernel answers data still arriving with a reset: the client, still sending,
//!   sees its send fail and never reads the answer waiting for it. So the gateway first
//!   half-closes (the client reads the answer, then the end of the stream) and reads and
//!   discards what still comes, until the client closes too or [`LINGER_MAX`] or
//!   [`LINGER_MAX_BYTES`] is reached — the lingering close of Apache and nginx.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::Request;
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::error::Error;
use crate::metrics as m;

/// What a request's head (target and headers) may be, and how long a client may take to
/// send it.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_uri_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
}

impl HeadLimits {
    /// Refuses a request whose target or headers exceed the limits, before routing.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), Error> {
        let uri = req.uri();
        let target = uri.path_and_query().map_or(0, |pq| pq.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len());
        if target > self.max_uri_bytes {
            return Err(Error::UriTooLong {
                limit_bytes: self.max_uri_bytes,
            });
        }
        let headers = req.headers();
        let bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        if headers.len() > self.max_headers || bytes > self.max_header_bytes {
            return Err(Error::HeadersTooLarge {
                limit_bytes: self.max_header_bytes,
                limit_headers: self.max_headers,
            });
        }
        Ok(())
    }

    /// The HTTP/1 connection settings: the header read timeout, and parser limits at twice
    /// ours, or more (see the module docs).
    pub fn builder(&self) -> http1::Builder {
        // Request line, `: ` and CRLF per header line, and the blank line, around the bytes
        // [`HeadLimits::check`] counts.
        let framing = 1024 + 4 * self.max_headers;
        let parse_buffer = 2 * (self.max_uri_bytes + self.max_header_bytes + framing);
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_headers(2 * self.max_headers)
            .max_buf_size(parse_buffer.max(MIN_PARSE_BUFFER_BYTES));
        builder
    }
}

/// Hyper refuses a smaller read buffer; body reads also use it, so it is never tiny.
const MIN_PARSE_BUFFER_BYTES: usize = 64 * 1024;

/// At most so many open connections on one listener.
#[derive(Clone)]
pub struct ConnectionCap {
    listener: &'static str,
    max: usize,
    slots: Arc<Semaphore>,
}

impl ConnectionCap {
    /// A cap of `max` connections for the listener named `listener` (a metric label).
    pub fn new(listener: &'static str, max: usize) -> ConnectionCap {
        ConnectionCap {
            listener,
            max,
            slots: Arc::new(Semaphore::new(max)),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
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

/// Longest a closing connection lingers, reading and discarding what its client still sends.
/// A client sending a refused body at any reasonable rate has sent it (and read its answer)
/// well within this; one that keeps the connection open longer is cut off.
pub const LINGER_MAX: Duration = Duration::from_secs(5);
/// Most bytes a closing connection discards: enough for any body a client sends before it
/// reads its answer, far less than the `max_import_bytes` an upload may have sent already.
pub const LINGER_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Read size while lingering.
const LINGER_READ_BYTES: usize = 16 * 1024;

/// A connection's socket whose shutdown is a lingering close (see the module docs): hyper
/// shuts the connection down through [`AsyncWrite::poll_shutdown`] once it is done with it.
pub struct LingeringStream {
    stream: TcpStream,
    linger: Option<Linger>,
}

/// The state of a lingering close under way.
struct Linger {
    deadline: Pin<Box<Sleep>>,
    discarded: u64,
}

impl LingeringStream {
    pub fn new(stream: TcpStream) -> LingeringStream {
        LingeringStream {
            stream,
            linger: None,
        }
    }
}

impl AsyncRead for LingeringStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LingeringStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let linger = match &mut this.linger {
            Some(linger) => linger,
            None => {
                // Everything answered is sent before the end of the stream.
                ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
                this.linger.insert(Linger {
                    deadline: Box::pin(tokio::time::sleep(LINGER_MAX)),
                    discarded: 0,
                })
            }
        };
        let mut buf = [0u8; LINGER_READ_BYTES];
        loop {
            if linger.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut buf);
            match ready!(Pin::new(&mut this.stream).poll_read(cx, &mut read)) {
                // The client closed (it has read the answer) or reset: nothing left to protect.
                Err(_) => return Poll::Ready(Ok(())),
                Ok(()) if read.filled().is_empty() => return Poll::Ready(Ok(())),
                Ok(()) => {
                    linger.discarded += read.filled().len() as u64;
                    if linger.discarded > LINGER_MAX_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
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

    fn limits() -> HeadLimits {
        HeadLimits {
            max_uri_bytes: 64,
            max_header_bytes: 100,
            max_headers: 3,
            header_read_timeout: Duration::from_secs(1),
        }
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("a valid request")
    }

    #[test]
    fn head_limits_count_target_header_bytes_and_lines() {
        let limits = limits();
        limits
            .check(&request("/v1/redeem?x=1", &[("host", "a")]))
            .expect("small");
        let long = format!("/v1/{}", "a".repeat(61));
        assert_eq!(
            limits.check(&request(&long, &[])).map_err(|e| e.code()),
            Err("ERR_URI_TOO_LONG")
        );
        let big = "v".repeat(97);
        assert_eq!(
            limits
                .check(&request("/", &[("abcd", &big)]))
                .map_err(|e| e.code()),
            Err("ERR_HEADERS_TOO_LARGE")
        );
        let many = [("a", "1"), ("b", "2"), ("c", "3"), ("a", "4")];
        assert_eq!(
            limits.check(&request("/", &many)).map_err(|e| e.code()),
            Err("ERR_HEADERS_TOO_LARGE")
        );
    }

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
