//! A TCP proxy on loopback that can be frozen: while frozen, bytes it reads either way are
//! held, not lost, and go on once it thaws. One client's view of a server it cannot reach
//! for a while (a partition, a stalled route), without touching the server or other clients.
//! It can also be severed: its connections close, and new ones are closed as they come, the
//! view of a server that went away.

#![allow(dead_code)]
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    accepting: tokio::task::JoinHandle<()>,
}

struct State {
    frozen: watch::Sender<bool>,
    severed: watch::Sender<bool>,
    /// Bytes that freeze the proxy when a read either way holds them (see `freeze_on`).
    trigger: Mutex<Option<Vec<u8>>>,
}

impl Proxy {
    /// Forwards a free port of 127.0.0.1 to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(State {
            frozen: watch::channel(false).0,
            severed: watch::channel(false).0,
            trigger: Mutex::new(None),
        });
        let shared = state.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *shared.severed.borrow() {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, shared.clone()));
                tokio::spawn(pipe(server_read, client_write, shared.clone()));
            }
        });
        Proxy {
            addr,
            state,
            accepting,
        }
    }

    /// Holds every byte from now on, both ways, on every connection.
    pub fn freeze(&self) {
        self.state.frozen.send_replace(true);
    }

    /// Freezes the proxy once a read either way holds `marker`, before that read goes on:
    /// the sender has sent it, the receiver never sees it. A test stops a client at one
    /// exact step of a conversation this way, e.g. just after the server answered a query
    /// whose reply carries `marker`. The marker is looked for within one read, so it should
    /// be short.
    pub fn freeze_on(&self, marker: &[u8]) {
        *self.state.trigger.lock().expect("trigger") = Some(marker.to_vec());
    }

    /// Freezes the proxy at `marker` (see `freeze_on`) if a read holds it within `within`, or
    /// else at once; says whether the marker froze it.
    pub async fn freeze_at(&self, marker: &[u8], within: std::time::Duration) -> bool {
        self.freeze_on(marker);
        let deadline = tokio::time::Instant::now() + within;
        while !self.is_frozen() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let seen = self.is_frozen();
        self.freeze();
        seen
    }

    /// Whether the proxy is frozen now.
    pub fn is_frozen(&self) -> bool {
        *self.state.frozen.borrow()
    }

    /// Closes every connection, dropping what was held, and closes new ones as they come
    /// until `restore`.
    pub fn sever(&self) {
        self.state.severed.send_replace(true);
    }

    /// Ends `sever` and thaws: new connections go through again.
    pub fn restore(&self) {
        self.state.severed.send_replace(false);
        self.thaw();
    }

    /// Lets what was held, and what comes, through. A marker armed by `freeze_on` and not
    /// seen yet is dropped: it would freeze the proxy again at some later, unplanned moment.
    pub fn thaw(&self) {
        *self.state.trigger.lock().expect("trigger") = None;
        self.state.frozen.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Copies `from` to `to`, each chunk once the proxy is not frozen.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
) {
    let mut frozen = state.frozen.subscribe();
    let mut severed = state.severed.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = severed.wait_for(|s| *s) => return,
        };
        {
            let mut trigger = state.trigger.lock().expect("trigger");
            let hit = trigger
                .as_deref()
                .is_some_and(|m| buf[..n].windows(m.len()).any(|w| w == m));
            if hit {
                *trigger = None;
                state.frozen.send_replace(true);
            }
        }
        tokio::select! {
            thawed = frozen.wait_for(|f| !*f) => if thawed.is_err() { break },
            _ = severed.wait_for(|s| *s) => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
