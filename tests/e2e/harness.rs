//! Real servers for the end-to-end tests: a nats-server per test (dynamic
//! port, own store dir, killed on drop), a fresh Postgres database per test,
//! the mock provider, and Sluice's ingress and workers in this process.
//!
//! Set up by `scripts/test.sh`: `SLUICE_NATS_SERVER` (the nats-server binary)
//! and `SLUICE_TEST_PG` (an admin URL of a throwaway Postgres cluster).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_core::config::{Config, PoolConfig, ProviderKind};
use sluice_core::db;
use sluice_core::secret::Secret;
use sqlx::{Executor, PgPool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const MODEL: &str = "mock-model";
/// A pool whose deployment speaks Anthropic's Messages API (the mock's `/v1/messages`).
pub const ANTHROPIC_MODEL: &str = "mock-claude";
/// A pool whose upstream model name differs from the alias clients send.
pub const ALIASED_MODEL: &str = "team.chat-v1";

/// Waits until `check` returns `Some`, polling every 25 ms, for at most `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match poll_until(within, check).await {
        Some(v) => v,
        None => panic!("timed out after {within:?} waiting for {what}"),
    }
}

/// Waits until the deadline of `job` (a job record as the API returns it) has
/// passed; `expires_at` is in whole seconds, the deadline in milliseconds.
pub async fn wait_past_deadline(job: &serde_json::Value) {
    let deadline_ms = (job["expires_at"].as_u64().unwrap() + 1) * 1000;
    wait_for("the job's deadline to pass", Duration::from_secs(8), || async {
        (sluice_core::now_ms() > deadline_ms).then_some(())
    })
    .await;
}

/// Checks every 25 ms until `check` gives a value or `within` passes
/// (`None`), for a test that reports what it found rather than failing.
pub async fn poll_until<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An HTTP client for tests (reqwest is built without a bundled TLS backend).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("sluice-{tag}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A nats-server with JetStream on a dynamic port.
pub struct NatsServer {
    child: Option<Child>,
    pub url: String,
    /// How it was started, for [`NatsServer::restart`].
    command: Vec<std::ffi::OsString>,
    violations: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl NatsServer {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// A server whose `jetstream { … }` block also holds `jetstream` (for
    /// example its `limits`).
    pub async fn start_with(jetstream: &str) -> Self {
        Self::start_configured(jetstream, "", &[], &[]).await
    }

    /// A server with `jetstream` in its `jetstream { … }` block, `top` at
    /// the top level of its config, `files` (name, text) beside its config
    /// file (for `include`), and `env` in its environment.
    pub async fn start_configured(jetstream: &str, top: &str, files: &[(&str, &str)], env: &[(&str, &str)]) -> Self {
        let bin = std::env::var("SLUICE_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let dir = TempDir::new("nats");
        let config = dir.0.join("nats.conf");
        for (name, text) in files {
            std::fs::write(dir.0.join(name), text).unwrap();
        }
        let text = format!("jetstream {{\n  store_dir: {:?}\n  {jetstream}\n}}\n{top}\n", dir.0.join("js"));
        std::fs::write(&config, text).unwrap();
        let command: Vec<std::ffi::OsString> =
            [bin.as_str().into(), "-c".into(), config.into_os_string(), "-a".into(), "127.0.0.1".into()].into();
        let (child, port, violations) = Self::spawn(&command, "-1", env).await;
        Self { child: Some(child), url: format!("nats://127.0.0.1:{port}"), command, violations, _dir: dir }
    }

    /// Starts the server of `command` on `port`; returns it with the port it
    /// listens on and the permission violations it will log.
    async fn spawn(
        command: &[std::ffi::OsString],
        port: &str,
        env: &[(&str, &str)],
    ) -> (Child, String, Arc<Mutex<Vec<String>>>) {
        let bin = command[0].to_string_lossy().into_owned();
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .args(["-p", port])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (run the tests with scripts/test.sh): {e}"));
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let url = tokio::time::timeout(Duration::from_secs(15), async {
            let mut port = None;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    port = rest.trim().rsplit(':').next().map(str::to_owned);
                }
                if line.contains("Server is ready") {
                    break;
                }
            }
            port
        })
        .await
        .expect("nats-server did not get ready within 15 s")
        .expect("nats-server did not print its port");
        // Keep draining its log so that the pipe never fills, keeping the
        // permission violations it reports.
        let violations = Arc::new(Mutex::new(Vec::new()));
        let seen = violations.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Violation") {
                    seen.lock().unwrap().push(line);
                }
            }
        });
        (child, url, violations)
    }

    /// Starts the server again after [`NatsServer::kill`], on its port and
    /// with its store (the environment of its first start is not kept).
    pub async fn restart(&mut self) {
        let port = self.url.rsplit(':').next().unwrap().to_owned();
        let (child, _, violations) = Self::spawn(&self.command, &port, &[]).await;
        self.child = Some(child);
        self.violations = violations;
    }

    /// The permission violations the server has logged so far.
    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

/// A fresh database on the test cluster, migrated.
pub async fn fresh_database() -> (String, PgPool) {
    let admin_url =
        std::env::var("SLUICE_TEST_PG").expect("SLUICE_TEST_PG is not set: run the tests with scripts/test.sh");
    let admin = PgPool::connect(&admin_url).await.unwrap();
    let name = format!("t_{}", Uuid::new_v4().simple());
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.unwrap();
    admin.close().await;
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    let url = format!("{base}/{name}");
    let pool = PgPool::connect(&url).await.unwrap();
    db::migrate(&pool).await.unwrap();
    (url, pool)
}

/// The mock provider on a dynamic port.
pub struct Mock {
    pub base: String,
    http: reqwest::Client,
    _stop: tokio_util::sync::DropGuard,
}

impl Mock {
    pub async fn start(settings: sluice_mock_provider::Settings) -> Self {
        Self::start_at("127.0.0.1", settings).await
    }

    /// The mock listening on `host` (an address of this machine's).
    pub async fn start_at(host: &str, settings: sluice_mock_provider::Settings) -> Self {
        let listener = tokio::net::TcpListener::bind((host, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(sluice_mock_provider::run(listener, settings, stop.clone()));
        Self { base: format!("http://{addr}"), http: http_client(), _stop: stop.drop_guard() }
    }

    pub async fn faults(&self, faults: serde_json::Value) {
        let r = self.http.post(format!("{}/_mock/faults", self.base)).json(&faults).send().await.unwrap();
        assert!(r.status().is_success(), "mock refused faults: {}", r.status());
    }

    pub async fn stats(&self) -> serde_json::Value {
        self.http.get(format!("{}/_mock/stats", self.base)).send().await.unwrap().json().await.unwrap()
    }

    pub async fn requests(&self) -> u64 {
        self.stats().await["requests"].as_u64().unwrap()
    }
}

/// The keyring file that seals webhook secrets in every test
/// (`webhooks.secret_keys_file`): one key, drawn once per test run.
pub fn webhook_keys_file() -> &'static std::path::Path {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("webhook-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        let line = sluice_core::seal::Keyring::new_key_line("test").unwrap();
        std::fs::write(&file, format!("# drawn for this test run\n{line}\n")).unwrap();
        file
    })
}

/// A config for one test: its NATS, its database, the mock as upstream, and
/// timeouts short enough for tests.
pub fn test_config(nats_url: &str, db_url: &str, mock_base: &str) -> Config {
    let mut c = Config::default();
    c.nats.url = nats_url.to_owned();
    c.nats.request_timeout_ms = 2_000;
    c.nats.connect_timeout_ms = 2_000;
    c.database.url = Secret::new(db_url);
    c.ingress.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.ingress.sync_timeout_ms = 10_000;
    c.ingress.auth_refresh_ms = 100;
    // Stopped ingresses close at once here (`rolling` tests the drain).
    c.ingress.drain_ms = 0;
    c.worker.ack_wait_ms = 1_000;
    c.worker.retry_min_delay_ms = 50;
    c.worker.retry_max_delay_ms = 500;
    c.scheduler.discover_ms = 200;
    c.scheduler.tenants_refresh_ms = 100;
    c.scheduler.repair_ms = 300;
    c.worker.max_in_flight = 16;
    c.worker.shutdown_grace_ms = 5_000;
    c.webhooks.allow_loopback_targets = true;
    c.webhooks.poll_ms = 50;
    c.webhooks.retry_schedule_ms = vec![100, 100, 100];
    c.webhooks.secret_keys_file = Some(webhook_keys_file().to_owned());
    c.upstream.breaker_open_ms = 300;
    let pool = |name: &str, model: Option<&str>, provider: ProviderKind| {
        let mut p = PoolConfig::single(name, &format!("{mock_base}/v1"));
        p.model = model.map(str::to_owned);
        p.provider = provider;
        p.api_key = Some(Secret::new("sk-upstream-test"));
        p
    };
    c.pools = vec![
        pool(MODEL, None, ProviderKind::Openai),
        pool(ALIASED_MODEL, Some("mock-upstream-name"), ProviderKind::Openai),
        pool(ANTHROPIC_MODEL, None, ProviderKind::Anthropic),
    ];
    c.validate().unwrap();
    c
}

/// Adds a pool `name` whose deployment asks the mock for `model`, a model
/// name that may carry a mock profile (`mock@tokens=…,tps=…`, see
/// `mock-provider/src/profile.rs`).
pub fn add_profile_pool(c: &mut Config, name: &str, model: &str) {
    let mut p = c.pools[0].clone();
    p.name = name.to_owned();
    p.model = Some(model.to_owned());
    c.pools.push(p);
}

/// A worker on its own runtime and thread, so that a test can kill it the
/// way a crash would: every task stops and every socket closes at once.
pub struct WorkerHandle {
    stop: CancellationToken,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkerHandle {
    pub async fn start(config: Config) -> Self {
        // SLUICE_TEST_LOG=sluice_worker=debug shows the components' logs.
        if let Ok(filter) = std::env::var("SLUICE_TEST_LOG") {
            sluice_core::telemetry::init_logging(&sluice_core::config::LogConfig { filter, format: "text".into() });
        }
        let stop = CancellationToken::new();
        let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let token = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let worker = sluice_worker::Worker::build(config, |_| None).await.unwrap();
                let _ = ready_tx.send(());
                tokio::select! {
                    done = worker.run(None, token) => done.unwrap(),
                    _ = kill_rx => {}
                }
            });
            rt.shutdown_background();
        });
        ready_rx.await.expect("worker failed to start");
        Self { stop, kill: Some(kill_tx), thread: Some(thread) }
    }

    /// Dies at once: no ack, no nak, connections dropped.
    pub async fn kill(mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        self.join().await;
    }

    /// SIGTERM-like stop: stop fetching, finish running jobs, exit.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        self.join().await;
    }

    async fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join()).await.unwrap().unwrap();
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}

/// Everything a test needs, started: NATS, Postgres, mock, ingress, worker.
pub struct Stack {
    pub nats: NatsServer,
    pub db: PgPool,
    pub mock: Mock,
    pub config: Config,
    pub base: String,
    /// The ingress's ops listener (`/metrics`).
    pub ops: String,
    pub key: String,
    pub key_id: Uuid,
    pub http: reqwest::Client,
    pub worker: Option<WorkerHandle>,
    ingress_stop: CancellationToken,
    _ingress_guard: tokio_util::sync::DropGuard,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts everything; `adjust` may change the config first.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_on(NatsServer::start().await, adjust, |_, _| {}).await
    }

    /// Starts everything on `nats`; `adjust` may change the config first
    /// (the one kept in `Stack::config`), and `as_role` the ingress's and
    /// the worker's each.
    pub async fn start_on(
        nats: NatsServer,
        adjust: impl FnOnce(&mut Config),
        as_role: impl Fn(&mut Config, sluice_core::nats::Role),
    ) -> Self {
        use sluice_core::nats::Role;
        let (db_url, db) = fresh_database().await;
        let mock = Mock::start(sluice_mock_provider::Settings::default()).await;
        let mut config = test_config(&nats.url, &db_url, &mock.base);
        adjust(&mut config);
        let as_role = |role| {
            let mut c = config.clone();
            as_role(&mut c, role);
            c
        };
        let tenant = db::ensure_tenant(&db, "acme").await.unwrap();
        let key = db::create_key(&db, tenant).await.unwrap();
        let base = Self::start_ingress(as_role(Role::Ingress)).await;
        let worker = WorkerHandle::start(as_role(Role::Worker)).await;
        Self {
            nats,
            db,
            mock,
            config,
            base: base.0,
            ops: base.2,
            key: key.key.expose().to_owned(),
            key_id: key.id,
            http: http_client(),
            worker: Some(worker),
            ingress_stop: base.1.clone(),
            _ingress_guard: base.1.drop_guard(),
        }
    }

    /// Another ingress replica on the same NATS and Postgres; its base URL.
    pub async fn another_ingress(&self) -> (String, tokio_util::sync::DropGuard) {
        let (url, stop, _) = Self::start_ingress(self.config.clone()).await;
        (url, stop.drop_guard())
    }

    /// Stops the ingress the way SIGTERM does.
    pub fn stop_ingress(&self) {
        self.ingress_stop.cancel();
    }

    /// Starts an ingress; its base URL, its stop token and its ops URL.
    async fn start_ingress(config: Config) -> (String, CancellationToken, String) {
        let listener = tokio::net::TcpListener::bind(config.ingress.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops_addr = ops.local_addr().unwrap();
        let ingress = sluice_ingress::Ingress::build(config).await.unwrap();
        let stop = CancellationToken::new();
        let listeners = sluice_ingress::startup::Listeners { http: listener, admin: None, ops: Some(ops) };
        tokio::spawn(ingress.run(listeners, stop.clone()));
        (format!("http://{addr}"), stop, format!("http://{ops_addr}"))
    }

    /// The value of the ingress's metric line that starts with `series`
    /// (a name, or a name with its labels), 0 while it has none.
    pub async fn ingress_metric(&self, series: &str) -> f64 {
        let text = self.http.get(format!("{}/metrics", self.ops)).send().await.unwrap().text().await.unwrap();
        let line = text.lines().find(|l| l.starts_with(series));
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
    }

    /// The job an `Idempotency-Key` of `tenant` names, once its first use wrote it.
    pub async fn job_of_key(&self, tenant: Uuid, key: &str) -> Uuid {
        let nats = async_nats::connect(&self.nats.url).await.unwrap();
        let keys = async_nats::jetstream::new(nats).get_key_value(&self.config.jobs.idempotency_bucket).await.unwrap();
        let entry = sluice_ingress::idempotency::entry_key(tenant, key);
        wait_for(&format!("idempotency key {key}"), Duration::from_secs(10), || {
            let (keys, entry) = (keys.clone(), entry.clone());
            async move {
                let value = keys.get(&entry).await.unwrap()?;
                let named: serde_json::Value = serde_json::from_slice(&value).unwrap();
                named["job"].as_str().map(|j| j.parse::<Uuid>().unwrap())
            }
        })
        .await
    }

    pub fn chat_body(content: &str) -> serde_json::Value {
        serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
    }

    /// POSTs a chat completion with this stack's key.
    pub async fn chat(&self, body: &serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// The ledger row of a job once it has `status`, waiting for the ledger loop.
    pub async fn ledger_row(&self, job_id: Uuid, status: &'static str) -> LedgerRow {
        let db = self.db.clone();
        wait_for(&format!("ledger row {job_id} with status {status}"), Duration::from_secs(10), || {
            let db = db.clone();
            async move {
                let row: Option<LedgerRow> = sqlx::query_as::<_, (String, i32, Option<i32>, Option<i32>, Option<String>, Option<i32>)>(
                    "SELECT status, attempts, prompt_tokens, completion_tokens, error_code, upstream_status FROM jobs WHERE id = $1",
                )
                .bind(job_id)
                .fetch_optional(&db)
                .await
                .unwrap()
                .map(|(status, attempts, prompt, completion, error_code, upstream_status)| LedgerRow {
                    status,
                    attempts,
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    error_code,
                    upstream_status,
                });
                row.filter(|r| r.status == status)
            }
        })
        .await
    }

    /// A plain NATS subscriber on `jobs.>`: it sees every job the ingress
    /// publishes. Returns once the server holds the subscription (`flush`
    /// does not wait for the server; a round trip through a probe subject does).
    pub async fn watch_jobs(&self) -> async_nats::Subscriber {
        use futures::StreamExt;
        let nats = async_nats::connect(&self.nats.url).await.unwrap();
        let jobs = nats.subscribe(sluice_core::wire::subjects::JOBS).await.unwrap();
        let mut probe = nats.subscribe("sluice-test.probe").await.unwrap();
        nats.publish("sluice-test.probe", "".into()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), probe.next()).await.unwrap().unwrap();
        jobs
    }

    /// A key of another tenant, for isolation tests.
    pub async fn key_of(&self, tenant: &str) -> String {
        let id = db::ensure_tenant(&self.db, tenant).await.unwrap();
        let key = db::create_key(&self.db, id).await.unwrap().key.expose().to_owned();
        // The ingress reloads keys every 100 ms in tests.
        wait_for("the new key to be accepted", Duration::from_secs(5), || async {
            let r = self.http.get(format!("{}/v1/models", self.base)).bearer_auth(&key).send().await.unwrap();
            (r.status() == 200).then_some(())
        })
        .await;
        key
    }

    /// POSTs `/v1/jobs` with `key`, and an `Idempotency-Key` if given.
    pub async fn submit_job(
        &self,
        key: &str,
        body: &serde_json::Value,
        idempotency: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self.http.post(format!("{}/v1/jobs", self.base)).bearer_auth(key).json(body);
        if let Some(k) = idempotency {
            request = request.header("idempotency-key", k);
        }
        request.send().await.unwrap()
    }

    pub async fn get_job(&self, key: &str, id: &str) -> reqwest::Response {
        self.http.get(format!("{}/v1/jobs/{id}", self.base)).bearer_auth(key).send().await.unwrap()
    }

    /// Polls `GET /v1/jobs/{id}` until the job has `status`.
    pub async fn job_with_status(&self, id: &str, status: &str) -> serde_json::Value {
        wait_for(&format!("job {id} to be {status}"), Duration::from_secs(10), || async {
            let job: serde_json::Value = self.get_job(&self.key, id).await.json().await.unwrap();
            (job["status"] == status).then_some(job)
        })
        .await
    }

    pub fn job_body(content: &str) -> serde_json::Value {
        serde_json::json!({"endpoint": "chat.completions", "body": Self::chat_body(content)})
    }

    pub async fn ledger_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&self.db).await.unwrap()
    }
}

#[derive(Debug, Clone)]
pub struct LedgerRow {
    pub status: String,
    pub attempts: i32,
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub error_code: Option<String>,
    pub upstream_status: Option<i32>,
}

/// The job id the ingress names in `x-sluice-job-id` or in `error.job_id`.
pub fn job_id_of(headers: &reqwest::header::HeaderMap, body: &serde_json::Value) -> Uuid {
    headers
        .get("x-sluice-job-id")
        .and_then(|v| v.to_str().ok())
        .or_else(|| body["error"]["job_id"].as_str())
        .expect("response names no job id")
        .parse()
        .unwrap()
}

/// Path of a binary built by `cargo build` next to this test binary.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|p| p.parent()).unwrap();
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}
