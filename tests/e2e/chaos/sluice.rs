//! The chaos suite's Sluice: its processes (each on a [`Place`]: an address,
//! and the network namespace it runs in when the test builds a network of
//! its own), their shared configuration, and the webhook receiver.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};
use uuid::Uuid;

use super::cluster::free_port;
use crate::harness::{MODEL, TempDir, binary, http_client, wait_for};

/// Where a process runs: the address it listens on and, when it is not
/// this machine's own loopback, the network namespace holding that address.
#[derive(Debug, Clone)]
pub struct Place {
    pub host: String,
    pub netns: Option<String>,
    /// The NATS URL Sluice's processes here connect to (the configuration's
    /// when `None`); the client learns the other nodes from the one it reaches.
    pub nats: Option<String>,
}

impl Place {
    pub fn loopback() -> Self {
        Self { host: "127.0.0.1".into(), netns: None, nats: None }
    }

    /// A command that runs `program` at this place (`ip netns exec`, which
    /// execs it: the child's pid is the program's own).
    pub fn command(&self, program: &Path) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
        }
    }
}

/// Sluice's processes, with their roles, on the cluster and the database.
pub(super) struct Sluice {
    pub config: PathBuf,
    /// Each ingress: its base URL, its ops URL (`/metrics`), its process.
    pub ingresses: Vec<(String, String, Child)>,
    pub workers: Vec<Child>,
    pub _dir: TempDir,
}

impl Sluice {
    /// Writes the suite's configuration (`extra` appended) into a new
    /// directory; no process runs yet.
    pub fn configure(nats: &str, db_url: &str, mock: &str, extra: &str) -> Self {
        let dir = TempDir::new("chaos");
        let config = dir.0.join("sluice.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[nats]
url = "{nats}"
replicas = 3
# The production overlay's setting: every fault below meets batched commits.
group_commit = true
request_timeout_ms = 3000
connect_timeout_ms = 3000
[database]
url = "{db_url}"
[ingress]
auth_refresh_ms = 100
sync_timeout_ms = 20000
shutdown_grace_ms = 2000
[worker]
ack_wait_ms = 2000
max_attempts = 8
retry_min_delay_ms = 100
retry_max_delay_ms = 1000
shutdown_grace_ms = 2000
[upstream]
response_header_timeout_ms = 1000
breaker_open_ms = 500
[webhooks]
allow_loopback_targets = true
# The partition scenario's receiver is on a bridge's private address.
allow_private_targets = true
secret_keys_file = "{keys}"
poll_ms = 100
retry_schedule_ms = [200, 500, 1000, 2000, 4000]
[log]
filter = "warn"
[[pools]]
name = "{MODEL}"
base_url = "{mock}/v1"
api_key = "sk-upstream-test"
{extra}
"#,
                keys = crate::harness::webhook_keys_file().display(),
            ),
        )
        .unwrap();
        Self { config, ingresses: Vec::new(), workers: Vec::new(), _dir: dir }
    }

    fn spawn(&self, place: &Place, bin: &str, env: &[(&str, String)]) -> Child {
        let mut cmd = place.command(&binary(bin));
        cmd.arg("--config").arg(&self.config).kill_on_drop(true).stdin(Stdio::null());
        cmd.envs(env.iter().map(|(k, v)| (*k, v)));
        if let Some(url) = &place.nats {
            cmd.env("SLUICE__NATS__URL", url);
        }
        match std::env::var("SLUICE_TEST_LOG") {
            Ok(filter) => cmd.env("SLUICE__LOG__FILTER", filter).stdout(Stdio::inherit()).stderr(Stdio::inherit()),
            Err(_) => cmd.stdout(Stdio::null()).stderr(Stdio::null()),
        };
        cmd.spawn().unwrap()
    }

    async fn ready(url: &str) {
        let http = http_client();
        wait_for(&format!("{url} to be ready"), Duration::from_secs(30), || async {
            http.get(url).send().await.ok().filter(|r| r.status() == 200).map(|_| ())
        })
        .await;
    }

    pub async fn add_ingress(&mut self) {
        self.add_ingress_at(&Place::loopback()).await
    }

    pub async fn add_ingress_at(&mut self, place: &Place) {
        let (host, port, ops) = (&place.host, free_port(), free_port());
        let env = [
            ("SLUICE__INGRESS__LISTEN", format!("{host}:{port}")),
            ("SLUICE__INGRESS__OPS_LISTEN", format!("{host}:{ops}")),
        ];
        let child = self.spawn(place, "sluice-ingress", &env);
        let base = format!("http://{host}:{port}");
        Self::ready(&format!("{base}/readyz")).await;
        self.ingresses.push((base, format!("http://{host}:{ops}"), child));
    }

    pub async fn add_worker(&mut self) {
        self.add_worker_at(&Place::loopback()).await
    }

    pub async fn add_worker_at(&mut self, place: &Place) {
        let (host, port) = (&place.host, free_port());
        let child = self.spawn(place, "sluice-worker", &[("SLUICE__WORKER__OPS_LISTEN", format!("{host}:{port}"))]);
        Self::ready(&format!("http://{host}:{port}/readyz")).await;
        self.workers.push(child);
    }

    pub fn bases(&self) -> Vec<String> {
        self.ingresses.iter().map(|(b, _, _)| b.clone()).collect()
    }

    pub fn ops(&self) -> Vec<String> {
        self.ingresses.iter().map(|(_, o, _)| o.clone()).collect()
    }

    /// Waits until `key` is accepted by every ingress (100 ms refresh).
    pub async fn key_everywhere(&self, key: &str) {
        for base in self.bases() {
            let http = http_client();
            wait_for("the key on every ingress", Duration::from_secs(10), || async {
                let r = http.get(format!("{base}/v1/models")).bearer_auth(key).send().await.ok()?;
                (r.status() == 200).then_some(())
            })
            .await;
        }
    }
}

/// A webhook receiver on `host`: its URL, and the ids of the jobs whose
/// `job.completed` event it received.
pub(super) async fn hook_receiver(host: &str) -> (String, Arc<Mutex<HashSet<Uuid>>>) {
    let hooks: Arc<Mutex<HashSet<Uuid>>> = Arc::new(Mutex::new(HashSet::new()));
    let got = hooks.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let got = got.clone();
            async move {
                let event: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if event["type"] == "job.completed"
                    && let Some(id) = event["data"]["id"].as_str().and_then(|s| s.parse().ok())
                {
                    got.lock().unwrap().insert(id);
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind((host, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), hooks)
}
