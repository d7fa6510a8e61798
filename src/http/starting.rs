//! The listeners while the gateway waits for its engine or ledger at start.
//!
//! A gateway whose Redis or PostgreSQL is not up yet still binds its listeners, so an
//! orchestrator sees a live process that is not ready, and an operator sees why:
//! `/healthz` answers 200, `/readyz` 503 with the reason, `/metrics` the exposition, and
//! every other request the `503 ERR_UNAVAILABLE` envelope with `Retry-After`. The public
//! listener says only what is awaited ("waiting for Redis"); the admin listener also why
//! (address and error), which is the operator's, not the internet's, business. Connections
//! are not kept alive, so a client's next request reaches the full edge once it serves.

use std::convert::Infallible;
use std::future::Future;

use http::header::{CONNECTION, RETRY_AFTER};
use http::{HeaderValue, Method, Request, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::body::{self, Reply};
use super::conn::HeadLimits;
use super::Listener;
use crate::error::Error;

/// What a starting gateway waits for.
#[derive(Debug, Clone, Default)]
pub struct Waiting {
    /// What is awaited, for anyone: e.g. "waiting for Redis".
    pub summary: String,
    /// Why, for the operator: e.g. "Redis at 127.0.0.1:6379 is unreachable: connection
    /// refused; next attempt in 2 s".
    pub detail: String,
}

/// Serves `public` and `admin` as described above until `work` finishes, and returns its
/// output. `waiting` is read at each request. Connections still open when `work` finishes
/// are left to end by themselves: each serves one request, and a client slow to send it
/// meets the header read timeout.
pub async fn serve_while<F: Future>(
    public: &TcpListener,
    admin: &TcpListener,
    head: HeadLimits,
    waiting: watch::Receiver<Waiting>,
    work: F,
) -> F::Output {
    let mut builder = head.builder();
    builder.keep_alive(false);
    let mut connections = JoinSet::new();
    tokio::pin!(work);
    loop {
        let (accepted, which) = tokio::select! {
            output = &mut work => {
                connections.detach_all();
                return output;
            }
            accepted = public.accept() => (accepted, Listener::Public),
            accepted = admin.accept() => (accepted, Listener::Admin),
            // Reap finished connections, so the set stays as large as what is open.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok((stream, _peer)) = accepted else {
            // Out of descriptors and the like: nothing to answer, and the next accept may work.
            tokio::task::yield_now().await;
            continue;
        };
        let waiting = waiting.clone();
        let service = service_fn(move |req| {
            let reply = answer(which, &req, &waiting.borrow());
            async move { Ok::<_, Infallible>(reply) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// The answer to one request while starting.
fn answer(which: Listener, req: &Request<Incoming>, waiting: &Waiting) -> Reply {
    let get = req.method() == Method::GET;
    let reason = match which {
        Listener::Public => &waiting.summary,
        Listener::Admin => &waiting.detail,
    };
    let mut reply = match (which, req.uri().path()) {
        (_, "/healthz") if get => super::admin::healthz(),
        (_, "/readyz") if get => {
            let mut reply = body::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "status": "starting", "reason": reason }),
            );
            reply
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(1u32));
            reply
        }
        (Listener::Admin, "/metrics") if get => super::admin::metrics(),
        _ => body::error(&Error::Unavailable(format!(
            "kamigate is starting: {reason}"
        ))),
    };
    reply
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    reply
}
