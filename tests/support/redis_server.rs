//! Throwaway `redis-server` processes owned by a test.
//!
//! Each test starts its own server on a free port of 127.0.0.1 in a temporary directory, so
//! tests run in parallel, never touch a system Redis, and can kill and restart "their" Redis
//! to exercise failure handling. The server dies with the [`RedisServer`] value.
//!
//! Commands are sent with a tiny RESP client over a plain TCP connection ([`RedisServer::cmd`]):
//! no dependency on `redis-cli`, and independent of the engine under test.
//!
//! Benchmarks include this file on its own (`#[path]`, `benches/void.rs`), so it depends on
//! nothing else in `tests/support` and waits with loops of its own.
#![allow(dead_code)]

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long a server may take to answer `PING` after being spawned.
const START_DEADLINE: Duration = Duration::from_secs(15);
/// How many fresh ports to try when the chosen one turns out to be taken.
const PORT_ATTEMPTS: usize = 5;

/// A `redis-server` child process on `127.0.0.1:port`, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    extra_args: Vec<String>,
    /// Runs as a Sentinel with `sentinel.conf` of `dir`.
    sentinel: bool,
    child: Option<Child>,
}

/// A RESP2 reply, as read by [`RedisServer::cmd`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The reply as text (simple or bulk string).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Resp::Simple(s) => Some(s),
            Resp::Bulk(Some(b)) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The reply as an integer.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Resp::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl RedisServer {
    /// Starts a server with the default test configuration (no persistence).
    pub async fn start() -> RedisServer {
        RedisServer::start_with(&[]).await
    }

    /// Starts a server with extra configuration appended to the command line, e.g.
    /// `&["--appendonly", "yes", "--appendfsync", "always"]` (later arguments win).
    pub async fn start_with(args: &[&str]) -> RedisServer {
        RedisServer::launch(temp_dir(), args, false).await
    }

    /// Starts a Sentinel monitoring `master` under the name `service` (quorum 1), e.g. for
    /// `redis-sentinel://127.0.0.1:<port>/<service>` URLs.
    pub async fn start_sentinel(master: &RedisServer, service: &str) -> RedisServer {
        let dir = temp_dir();
        let conf = format!("sentinel monitor {service} 127.0.0.1 {} 1\n", master.port());
        fs::write(dir.path().join("sentinel.conf"), conf).expect("write sentinel.conf");
        RedisServer::launch(dir, &[], true).await
    }

    async fn launch(dir: TempDir, args: &[&str], sentinel: bool) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            dir,
            extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
            sentinel,
            child: None,
        };
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(e) => {
                    // Most likely the port was taken between choosing and binding it.
                    last_error = e;
                    server.kill9();
                    server.port = free_port();
                }
            }
        }
        panic!("redis-server did not start after {PORT_ATTEMPTS} attempts: {last_error}");
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory (RDB/AOF files, `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server with SIGKILL (no chance to persist anything) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error means it has exited already; wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Shuts the server down cleanly (`SHUTDOWN`, which persists if persistence is
    /// configured), falling back to SIGKILL if it does not exit within a few seconds.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The connection closes without a reply when SHUTDOWN succeeds.
        let _ = send_command(self.port, &["SHUTDOWN"]).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again on the same port, directory and arguments (after
    /// [`RedisServer::kill9`] or [`RedisServer::stop`]; kills a running one first) and waits
    /// until it answers `PING`, i.e. after it has loaded any persisted data.
    pub async fn restart(&mut self) {
        self.kill9();
        // The port was just released; another process could grab it in the meantime, which
        // shows up as a failed start: retry until the deadline.
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("redis-server did not restart on port {}: {e}", self.port)
                }
                Err(_) => {
                    self.kill9();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Sends `signal` (e.g. `"-STOP"`, `"-CONT"`) to the server process: a paused server
    /// keeps its connections open and answers nothing until it is continued, when it runs
    /// whatever its clients sent meanwhile.
    pub fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .map(|c| c.id().to_string())
            .expect("redis-server running");
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} redis-server");
    }

    /// Whether the server process is running (not killed or stopped).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends one command on a fresh connection and returns the reply, e.g.
    /// `server.cmd(&["SCRIPT", "FLUSH"])`.
    pub async fn cmd(&self, args: &[&str]) -> std::io::Result<Resp> {
        send_command(self.port, args).await
    }

    /// [`RedisServer::cmd`] for a server known by its port, e.g. from a spawned task.
    pub async fn cmd_on_port(port: u16, args: &[&str]) -> std::io::Result<Resp> {
        send_command(port, args).await
    }

    /// Like [`RedisServer::cmd`], panicking on I/O errors and error replies.
    pub async fn redis_cli(&self, args: &[&str]) -> Resp {
        match self.cmd(args).await {
            Ok(Resp::Error(e)) => panic!("{args:?} failed: {e}"),
            Ok(reply) => reply,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Spawns `redis-server` and polls `PING` until it answers, the process exits, or the
    /// deadline passes.
    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let dir = self.dir.path().to_str().ok_or("non-UTF-8 temp dir")?;
        let log = self.log_path();
        let log = log.to_str().ok_or("non-UTF-8 temp dir")?;
        let port = self.port.to_string();
        let conf = self.dir.path().join("sentinel.conf");
        let conf = conf.to_str().ok_or("non-UTF-8 temp dir")?;
        let mut args: Vec<&str> = Vec::new();
        if self.sentinel {
            args.extend([conf, "--sentinel"]);
        }
        args.extend([
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--dir",
            dir,
            "--daemonize",
            "no",
            "--logfile",
            log,
        ]);
        if !self.sentinel {
            args.extend(["--save", "", "--appendonly", "no"]);
        }
        args.extend(self.extra_args.iter().map(String::as_str));
        let child = Command::new("redis-server")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server (is it on PATH?): {e}"))?;
        self.child = Some(child);

        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(Resp::Simple(pong)) = send_command(self.port, &["PING"]).await {
                if pong == "PONG" {
                    return Ok(());
                }
            }
            let exited = self
                .child
                .as_mut()
                .map_or(Ok(None), |c| c.try_wait())
                .map_err(|e| e.to_string())?;
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "redis-server exited with {status}; log:\n{}",
                    fs::read_to_string(self.log_path()).unwrap_or_default()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server did not answer PING within {START_DEADLINE:?}; log:\n{}",
                    fs::read_to_string(self.log_path()).unwrap_or_default()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A Redis Cluster of primaries without replicas, each a [`RedisServer`], the slots split
/// evenly between them.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` cluster-enabled servers, assigns the 16,384 slots, introduces the nodes to
    /// each other and waits until every node reports `cluster_state:ok`.
    pub async fn start(n: usize) -> RedisCluster {
        assert!(n > 0, "a cluster needs nodes");
        let mut nodes = Vec::with_capacity(n);
        let mut buses = Vec::with_capacity(n);
        for _ in 0..n {
            // The cluster bus port, which would otherwise be port + 10,000.
            let bus = free_port().to_string();
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                &bus,
            ];
            nodes.push(RedisServer::start_with(&args).await);
            buses.push(bus);
        }
        let slots_per_node = 16_384 / n;
        for (i, node) in nodes.iter().enumerate() {
            let first = i * slots_per_node;
            let last = if i + 1 == n {
                16_383
            } else {
                first + slots_per_node - 1
            };
            let (first, last) = (first.to_string(), last.to_string());
            node.redis_cli(&["CLUSTER", "ADDSLOTSRANGE", &first, &last])
                .await;
        }
        for (node, bus) in nodes.iter().zip(&buses).skip(1) {
            let port = node.port().to_string();
            nodes[0]
                .redis_cli(&["CLUSTER", "MEET", "127.0.0.1", &port, bus])
                .await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            loop {
                let info = node.redis_cli(&["CLUSTER", "INFO"]).await;
                let info = info.as_str().unwrap_or_default();
                let known = format!("cluster_known_nodes:{n}\r\n");
                if info.contains("cluster_state:ok\r\n") && info.contains(&known) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster did not converge on port {}: {info}",
                    node.port()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        RedisCluster { nodes }
    }

    /// `redis-cluster://127.0.0.1:<port>,127.0.0.1:<port>,…` listing every node.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis-cluster://{}", hosts.join(","))
    }

    /// The nodes, e.g. to inspect each one's script cache.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }
}

/// A fresh temporary directory for one server.
fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("kamigate-redis-")
        .tempdir()
        .expect("create a temporary directory for redis-server")
}

/// A port that was free a moment ago (bound to port 0, then released).
fn free_port() -> u16 {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

/// Sends one command over a fresh connection and reads its reply.
async fn send_command(port: u16, args: &[&str]) -> std::io::Result<Resp> {
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let mut stream = BufReader::new(stream);
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    stream.get_mut().write_all(&request).await?;
    tokio::time::timeout(Duration::from_secs(30), read_reply(&mut stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "reply timed out"))?
}

fn read_reply(
    stream: &mut BufReader<TcpStream>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Resp>> + Send + '_>> {
    Box::pin(async move {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches("\r\n");
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad RESP reply");
        let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
        Ok(match kind {
            "+" => Resp::Simple(rest.to_owned()),
            "-" => Resp::Error(rest.to_owned()),
            ":" => Resp::Int(rest.parse().map_err(|_| bad())?),
            "$" => {
                let len: i64 = rest.parse().map_err(|_| bad())?;
                if len < 0 {
                    Resp::Bulk(None)
                } else {
                    let len = usize::try_from(len).map_err(|_| bad())?;
                    let mut buf = vec![0; len + 2];
                    stream.read_exact(&mut buf).await?;
                    buf.truncate(len);
                    Resp::Bulk(Some(buf))
                }
            }
            "*" => {
                let len: i64 = rest.parse().map_err(|_| bad())?;
                if len < 0 {
                    Resp::Array(None)
                } else {
                    let mut items = Vec::new();
                    for _ in 0..len {
                        items.push(read_reply(stream).await?);
                    }
                    Resp::Array(Some(items))
                }
            }
            _ => return Err(bad()),
        })
    })
}
