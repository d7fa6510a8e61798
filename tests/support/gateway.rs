//! A gateway on port 0 driven by a real HTTP client.

use std::net::SocketAddr;
use std::time::Duration;

use kamigate::config::Config;
use kamigate::gateway::Gateway;
use kamigate::inventory::Inventory;
use reqwest::StatusCode;
use serde_json::Value;

use super::eventually::eventually;

pub const MERCHANT_TOKEN: &str = "merchant-token-for-tests-0001";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-00000001";

/// The data keys of test gateways (`KAMIGATE_DATA_KEY`): fixed, as the tokens are, so
/// gateways of one test that share Redis or a ledger read each other's sealed codes, as
/// gateways of one deployment must.
pub const DATA_KEY: &str =
    "index i1 0101010101010101010101010101010101010101010101010101010101010101; \
     data d1 0202020202020202020202020202020202020202020202020202020202020202";

/// A configuration for tests: ephemeral ports, fixed tokens, short shutdown delay, and no
/// lockouts of failed redemptions (tests of error answers fail on purpose; `tests/limits.rs`
/// turns lockouts on where it tests them).
pub fn config() -> Config {
    let mut limits = kamigate::limit::LimitsConfig::default();
    limits.failed_redemptions.max_failures = 0;
    Config {
        limits,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        merchant_token: Some(MERCHANT_TOKEN.into()),
        admin_token: Some(ADMIN_TOKEN.into()),
        data_key: Some(kamigate::secrets::keyfile::KeyText(DATA_KEY.into())),
        shutdown_delay_ms: 0,
        drain_timeout_secs: 5,
        hold_sweep_interval_ms: 50,
        ..Config::default()
    }
}

/// A port free on 127.0.0.1 right now (for processes that must be told their port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Gives a gateway its own temporary data dir unless the test chose one.
fn own_data_dir(config: &mut Config) -> Option<tempfile::TempDir> {
    // Also with PostgreSQL: the data dir holds the embedded engine's lock.
    if config.data_dir != Config::default().data_dir {
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    config.data_dir = dir.path().to_owned();
    Some(dir)
}

/// An HTTP client for the gateways of tests. A gateway closes a keep-alive connection left
/// idle for its header read timeout (10 s by default), and a client that sends on one at
/// that moment gets a reset, as with any server: so the client lets idle connections go
/// after 5 s, before the gateway would.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(std::time::Duration::from_secs(5))
        .build()
        .expect("an HTTP client")
}

/// A running gateway and a client for it.
pub struct TestGateway {
    pub gateway: Gateway,
    /// The data dir (SQLite ledger) when the test did not choose one.
    pub data: Option<tempfile::TempDir>,
    pub client: reqwest::Client,
    pub public: String,
    pub admin: String,
}

impl TestGateway {
    /// A gateway on the embedded engine.
    pub async fn embedded() -> TestGateway {
        TestGateway::start(config()).await
    }

    /// A gateway with its own engine from `config`.
    pub async fn start(mut config: Config) -> TestGateway {
        let data = own_data_dir(&mut config);
        let gateway = Gateway::start(config).await.expect("gateway starts");
        TestGateway::wrap(gateway, data)
    }

    /// A gateway over a given inventory (e.g. with a manual clock).
    pub async fn with_inventory(mut config: Config, inventory: Inventory) -> TestGateway {
        let data = own_data_dir(&mut config);
        let gateway = Gateway::start_with(config, inventory)
            .await
            .expect("gateway starts");
        TestGateway::wrap(gateway, data)
    }

    fn wrap(gateway: Gateway, data: Option<tempfile::TempDir>) -> TestGateway {
        TestGateway {
            data,
            public: format!("http://{}", gateway.public_addr),
            admin: format!("http://{}", gateway.admin_addr),
            client: client(),
            gateway,
        }
    }

    pub fn inventory(&self) -> &Inventory {
        &self.gateway.app.inventory
    }

    async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let res = req.send().await.expect("request is answered");
        let status = res.status();
        let bytes = res.bytes().await.expect("body is read");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, body)
    }

    /// `PUT /v1/skus/{sku}` with the admin token.
    pub async fn put_sku(&self, sku: &str, settings: Value) -> (StatusCode, Value) {
        Self::send(
            self.client
                .put(format!("{}/v1/skus/{sku}", self.admin))
                .bearer_auth(ADMIN_TOKEN)
                .json(&settings),
        )
        .await
    }

    /// Imports `body` (a code per line) into `sku`.
    pub async fn import(&self, sku: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        self.upload(sku, "", "text/plain", body).await
    }

    /// An upload to `POST /v1/skus/{sku}/batches?{query}` with `content_type`.
    pub async fn upload(
        &self,
        sku: &str,
        query: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        Self::send(
            self.client
                .post(format!("{}/v1/skus/{sku}/batches?{query}", self.admin))
                .bearer_auth(ADMIN_TOKEN)
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    /// Creates `sku` with default settings and imports `codes`.
    pub async fn stock(&self, sku: &str, codes: &[&str]) {
        let (status, _) = self.put_sku(sku, serde_json::json!({})).await;
        assert!(status.is_success(), "SKU created: {status}");
        let (status, report) = self.import(sku, codes.join("\n")).await;
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(report["accepted"], codes.len(), "{report}");
    }

    /// A merchant `POST` on the public listener.
    pub async fn merchant_post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        Self::send(
            self.client
                .post(format!("{}{path}", self.public))
                .bearer_auth(MERCHANT_TOKEN)
                .json(&body),
        )
        .await
    }

    /// A merchant `GET` on the public listener.
    pub async fn merchant_get(&self, path: &str) -> (StatusCode, Value) {
        Self::send(
            self.client
                .get(format!("{}{path}", self.public))
                .bearer_auth(MERCHANT_TOKEN),
        )
        .await
    }

    /// `POST /v1/skus/{sku}/claims`.
    pub async fn claim(&self, sku: &str, body: Value) -> (StatusCode, Value) {
        self.merchant_post(&format!("/v1/skus/{sku}/claims"), body)
            .await
    }

    /// `POST /v1/redeem`.
    pub async fn redeem(&self, body: Value) -> (StatusCode, Value) {
        Self::send(
            self.client
                .post(format!("{}/v1/redeem", self.public))
                .json(&body),
        )
        .await
    }

    /// An admin `POST`.
    pub async fn admin_post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        Self::send(
            self.client
                .post(format!("{}{path}", self.admin))
                .bearer_auth(ADMIN_TOKEN)
                .json(&body),
        )
        .await
    }

    /// `GET` on the admin listener, with the admin token.
    pub async fn admin_get(&self, path: &str) -> (StatusCode, Value) {
        Self::send(
            self.client
                .get(format!("{}{path}", self.admin))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await
    }

    /// An admin `PUT`.
    pub async fn admin_put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        Self::send(
            self.client
                .put(format!("{}{path}", self.admin))
                .bearer_auth(ADMIN_TOKEN)
                .json(&body),
        )
        .await
    }

    /// Engine counts of a SKU, through the API.
    pub async fn counts(&self, sku: &str) -> Value {
        let (status, body) = self.merchant_get(&format!("/v1/skus/{sku}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["engine"].clone()
    }

    /// The `/metrics` text of the admin listener.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .expect("answered")
            .text()
            .await
            .expect("text")
    }

    pub async fn stop(self) {
        self.gateway.stop().await;
    }
}

/// The value of the first sample of `name` carrying every one of `labels` (`key="value"`
/// fragments) in a Prometheus text exposition, if there is one.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
}

/// A key's audit trail from the admin API, and the kinds of its events in order.
pub async fn audit_trail(
    client: &reqwest::Client,
    admin: &str,
    key_id: &str,
) -> (Value, Vec<String>) {
    let trail: Value = client
        .get(format!("{admin}/v1/keys/{key_id}/events"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    let kinds = trail["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["kind"].as_str().map(str::to_owned))
        .collect();
    (trail, kinds)
}

/// The public and admin addresses (`http://host:port`) of a `kamigate serve` started on
/// port 0, read from its `log` (level info or finer) once it says it serves: the system
/// picks the ports at the bind, so no other process can take them between their choice and
/// the bind, as with [`free_port`]. `exited` is the child's `try_wait`. A failure shows how
/// the gateway ended, if it did, and its log.
pub async fn serving_addresses(
    log: &std::path::Path,
    mut exited: impl FnMut() -> std::io::Result<Option<std::process::ExitStatus>>,
    within: Duration,
) -> (String, String) {
    let field = |line: &str, name: &str| {
        let start = line.find(&format!(" {name}="))? + name.len() + 2;
        let addr = line[start..].split_whitespace().next()?;
        Some(format!("http://{addr}"))
    };
    let deadline = std::time::Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let serving = text.lines().find(|l| l.contains("kamigate is serving"));
        if let Some(addrs) = serving.and_then(|l| Some((field(l, "public")?, field(l, "admin")?))) {
            return addrs;
        }
        let exited = exited().expect("the gateway's status");
        if exited.is_some() || std::time::Instant::now() >= deadline {
            panic!(
                "the gateway is not serving (exited: {exited:?}, deadline {within:?}); its log:\n{text}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the gateway whose admin listener is `admin` (`http://host:port`) is ready.
pub async fn wait_ready(admin: &str, within: Duration) {
    let client = client();
    let ready = format!("{admin}/readyz");
    eventually(
        within,
        "the gateway to be ready",
        || async { client.get(&ready).send().await.map(|r| r.status()).ok() },
        |status| *status == Some(StatusCode::OK),
    )
    .await;
}

/// Starts the `kamigate serve` binary on a TOML `config`, with a clean environment and its
/// output discarded (appended to `<dir>/<config name>.log` at level info when
/// `KAMIGATE_TEST_LOGS=<dir>` is set, to see what a failing run's gateways did); killed when
/// dropped.
pub fn spawn_serve(config: &std::path::Path) -> tokio::process::Child {
    let kept = std::env::var_os("KAMIGATE_TEST_LOGS").and_then(|dir| {
        let name = config.file_stem()?.to_string_lossy().into_owned();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(std::path::Path::new(&dir).join(format!("{name}.log")))
            .ok()
    });
    let level = if kept.is_some() { "info" } else { "warn" };
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kamigate"))
        .args(["serve", "--config", config.to_str().expect("utf-8 path")])
        .env_clear()
        .env("RUST_LOG", level)
        .stdout(std::process::Stdio::null())
        .stderr(kept.map_or_else(std::process::Stdio::null, std::process::Stdio::from))
        .kill_on_drop(true)
        .spawn()
        .expect("gateway starts")
}
