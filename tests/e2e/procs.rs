//! Sluice as separate processes: the real `sluice-ingress`,
//! `sluice-worker` and `sluice-scaler` binaries, several of each, on one nats-server and one
//! fresh database, with the in-process mock provider as upstream. For the
//! tests whose point is that state is shared across replicas.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use sluice_core::db;
use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::harness::{Mock, NatsServer, TempDir, binary, fresh_database, http_client, wait_for};

pub struct Cluster {
    /// The nats-server this cluster started (none when it runs on a NATS
    /// cluster of the test's own), and the URL its processes connect to.
    _nats: Option<NatsServer>,
    nats_url: String,
    pub db: PgPool,
    mock: Mock,
    pub http: reqwest::Client,
    /// Base URLs of the running ingresses.
    pub ingresses: Vec<String>,
    /// Base URLs of their ops listeners (`/metrics`), in the same order.
    pub ingress_ops: Vec<String>,
    /// Base URLs of the running workers' ops servers (`/metrics`).
    pub workers: Vec<String>,
    /// Each running scaler: its gRPC address (`host:port`) and its ops base URL.
    pub scalers: Vec<(String, String)>,
    /// The child of each running ingress, worker and scaler, in their lists' order.
    ingress_children: Vec<usize>,
    worker_children: Vec<usize>,
    scaler_children: Vec<usize>,
    config: PathBuf,
    children: Vec<Child>,
    /// The binary of each child, in order.
    names: Vec<String>,
    /// When set, each process logs at debug level to its own file here.
    pub logs: Option<PathBuf>,
    _dir: TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Cluster {
    /// NATS, a database, the mock; `extra` is TOML appended to the config
    /// (whole sections, e.g. `[scheduler]`).
    pub async fn start(mock: sluice_mock_provider::Settings, worker_slots: usize, extra: &str) -> Self {
        let nats = NatsServer::start().await;
        let url = nats.url.clone();
        Self::start_on(Some(nats), &url, 1, mock, worker_slots, extra).await
    }

    /// The same on NATS at `nats_url` (a three-node cluster, say) with
    /// streams of `replicas` replicas.
    pub async fn start_on(
        nats: Option<NatsServer>,
        nats_url: &str,
        replicas: usize,
        mock: sluice_mock_provider::Settings,
        worker_slots: usize,
        extra: &str,
    ) -> Self {
        let (db_url, db) = fresh_database().await;
        let mock = Mock::start(mock).await;
        let dir = TempDir::new("cluster");
        let config = dir.0.join("sluice.toml");
        let toml = format!(
            r#"
[nats]
url = "{nats_url}"
replicas = {replicas}
request_timeout_ms = 2000
connect_timeout_ms = 2000

[database]
url = "{db_url}"

[ingress]
auth_refresh_ms = 100
sync_timeout_ms = 20000

[worker]
ack_wait_ms = 2000
max_in_flight = {worker_slots}
shutdown_grace_ms = 2000

[webhooks]
allow_loopback_targets = true
secret_keys_file = "{keys}"

[log]
filter = "warn"

[[pools]]
name = "{model}"
base_url = "{mock}/v1"
api_key = "sk-upstream-test"

{extra}
"#,
            model = crate::harness::MODEL,
            mock = mock.base,
            keys = crate::harness::webhook_keys_file().display(),
        );
        std::fs::write(&config, toml).unwrap();
        Self {
            _nats: nats,
            nats_url: nats_url.to_owned(),
            db,
            mock,
            http: http_client(),
            ingresses: Vec::new(),
            ingress_ops: Vec::new(),
            workers: Vec::new(),
            scalers: Vec::new(),
            ingress_children: Vec::new(),
            worker_children: Vec::new(),
            scaler_children: Vec::new(),
            config,
            children: Vec::new(),
            names: Vec::new(),
            logs: None,
            _dir: dir,
        }
    }

    fn spawn(&mut self, bin: &str, env: &[(&str, String)]) {
        let mut cmd = Command::new(binary(bin));
        cmd.arg("--config").arg(&self.config).kill_on_drop(true).stdin(Stdio::null());
        // SLUICE_TEST_LOG shows the processes' logs.
        match (&self.logs, std::env::var("SLUICE_TEST_LOG")) {
            (Some(dir), _) => {
                let file = dir.join(format!("{bin}-{}.log", self.children.len()));
                let out = std::fs::File::create(&file).unwrap();
                let err = out.try_clone().unwrap();
                cmd.env("SLUICE__LOG__FILTER", "debug").stdout(out).stderr(err)
            }
            (None, Ok(filter)) => {
                cmd.env("SLUICE__LOG__FILTER", filter).stdout(Stdio::inherit()).stderr(Stdio::inherit())
            }
            (None, Err(_)) => cmd.stdout(Stdio::null()).stderr(Stdio::null()),
        };
        // New tenants' settings reach the workers within 100 ms.
        cmd.env("SLUICE__SCHEDULER__TENANTS_REFRESH_MS", "100");
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.children.push(cmd.spawn().unwrap());
        self.names.push(bin.to_owned());
    }

    /// Starts one more ingress process; returns its base URL once it is ready.
    pub async fn start_ingress(&mut self) -> String {
        let (port, ops) = (free_port(), free_port());
        self.spawn(
            "sluice-ingress",
            &[
                ("SLUICE__INGRESS__LISTEN", format!("127.0.0.1:{port}")),
                ("SLUICE__INGRESS__OPS_LISTEN", format!("127.0.0.1:{ops}")),
            ],
        );
        let base = format!("http://127.0.0.1:{port}");
        self.ingress_children.push(self.children.len() - 1);
        self.wait_ready(&base).await;
        self.ingresses.push(base.clone());
        self.ingress_ops.push(format!("http://127.0.0.1:{ops}"));
        base
    }

    /// Starts one more worker process and waits until it is ready.
    pub async fn start_worker(&mut self) {
        let port = free_port();
        self.spawn("sluice-worker", &[("SLUICE__WORKER__OPS_LISTEN", format!("127.0.0.1:{port}"))]);
        let base = format!("http://127.0.0.1:{port}");
        self.worker_children.push(self.children.len() - 1);
        self.wait_ready(&base).await;
        self.workers.push(base);
    }

    /// Starts one more scaler (KEDA's gRPC service); its gRPC address and
    /// ops base URL once it is ready.
    pub async fn start_scaler(&mut self) -> (String, String) {
        let (grpc, ops) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
        self.spawn(
            "sluice-scaler",
            &[("SLUICE__SCALER__LISTEN", grpc.clone()), ("SLUICE__SCALER__OPS_LISTEN", ops.clone())],
        );
        let base = format!("http://{ops}");
        self.scaler_children.push(self.children.len() - 1);
        self.wait_ready(&base).await;
        self.scalers.push((grpc.clone(), base.clone()));
        (grpc, base)
    }

    /// Stops scaler `i` by SIGTERM and waits for it to exit; its exit status.
    pub async fn terminate_scaler(&mut self, i: usize) -> std::process::ExitStatus {
        self.scalers.remove(i);
        let child = self.scaler_children.remove(i);
        self.terminate(child).await
    }

    /// Stops ingress `i` as Kubernetes does (SIGTERM) and waits for it to
    /// exit; its exit status.
    pub async fn terminate_ingress(&mut self, i: usize) -> std::process::ExitStatus {
        self.ingresses.remove(i);
        self.ingress_ops.remove(i);
        let child = self.ingress_children.remove(i);
        self.terminate(child).await
    }

    /// Stops worker `i` by SIGTERM and waits for it to exit; its exit status.
    pub async fn terminate_worker(&mut self, i: usize) -> std::process::ExitStatus {
        self.workers.remove(i);
        let child = self.worker_children.remove(i);
        self.terminate(child).await
    }

    /// Sends worker `i` SIGTERM and returns at once: the worker's ops base
    /// URL and its process, for [`Cluster::exited`].
    pub fn signal_worker(&mut self, i: usize) -> (String, usize) {
        let base = self.workers.remove(i);
        let child = self.worker_children.remove(i);
        self.sigterm(child);
        (base, child)
    }

    /// Waits for a process signalled by [`Cluster::signal_worker`] to exit.
    pub async fn exited(&mut self, child: usize) -> std::process::ExitStatus {
        self.children[child].wait().await.unwrap()
    }

    async fn terminate(&mut self, child: usize) -> std::process::ExitStatus {
        self.sigterm(child);
        self.children[child].wait().await.unwrap()
    }

    fn sigterm(&self, child: usize) {
        let pid = self.children[child].id().expect("the process runs").to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    }

    /// Each running process: its binary and its pid.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.names.iter().zip(&self.children).filter_map(|(n, c)| Some((n.clone(), c.id()?))).collect()
    }

    pub async fn mock_stats(&self) -> serde_json::Value {
        self.mock.stats().await
    }

    pub async fn mock_faults(&self, faults: serde_json::Value) {
        self.mock.faults(faults).await;
    }

    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    /// The Prometheus text of a component's `/metrics`.
    pub async fn metrics(&self, base: &str) -> String {
        self.http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap()
    }

    async fn wait_ready(&self, base: &str) {
        let http = self.http.clone();
        let url = format!("{base}/readyz");
        wait_for(&format!("{url} to answer 200"), Duration::from_secs(20), || {
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(&url).send().await.ok().filter(|r| r.status() == 200).map(|_| ()) }
        })
        .await;
    }

    /// A tenant with these settings and a key that every running ingress accepts.
    pub async fn tenant(&self, name: &str, changes: db::TenantChanges) -> (Uuid, String) {
        let row = db::set_tenant(&self.db, name, &changes).await.unwrap();
        let key = db::create_key(&self.db, row.id).await.unwrap().key.expose().to_owned();
        for base in &self.ingresses {
            wait_for("the new key on every ingress", Duration::from_secs(5), || async {
                let r = self.http.get(format!("{base}/v1/models")).bearer_auth(&key).send().await.unwrap();
                (r.status() == 200).then_some(())
            })
            .await;
        }
        (row.id, key)
    }

    /// Submits an asynchronous job through ingress `i` (modulo their number).
    pub async fn submit(&self, i: usize, key: &str, body: &serde_json::Value) -> reqwest::Response {
        let base = &self.ingresses[i % self.ingresses.len()];
        self.http.post(format!("{base}/v1/jobs")).bearer_auth(key).json(body).send().await.unwrap()
    }

    /// A chat completion through ingress `i` (modulo their number).
    pub async fn chat(&self, i: usize, key: &str, body: &serde_json::Value) -> reqwest::Response {
        let base = &self.ingresses[i % self.ingresses.len()];
        self.http.post(format!("{base}/v1/chat/completions")).bearer_auth(key).json(body).send().await.unwrap()
    }

    /// Jobs in the ledger with `status`.
    pub async fn ledger_count(&self, status: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = $1")
            .bind(status)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }
}

/// Settings for `db::set_tenant`: everything kept but what is given.
pub fn settings(weight: Option<i32>, max_queued: Option<i64>, rpm: Option<i64>) -> db::TenantChanges {
    with_tpm(weight, max_queued, rpm, None)
}

/// Settings with only a running-jobs limit.
pub fn running_at_most(n: i64) -> db::TenantChanges {
    db::TenantChanges { max_in_flight: db::Setting::Value(n), ..settings(None, None, None) }
}

pub fn with_tpm(weight: Option<i32>, max_queued: Option<i64>, rpm: Option<i64>, tpm: Option<i64>) -> db::TenantChanges {
    use db::Setting;
    let set = |v: Option<i64>| v.map_or(Setting::Keep, Setting::Value);
    db::TenantChanges {
        weight: weight.map_or(Setting::Keep, Setting::Value),
        tier: Setting::Keep,
        max_queued: set(max_queued),
        max_in_flight: Setting::Keep,
        rpm: set(rpm),
        tpm: set(tpm),
    }
}
