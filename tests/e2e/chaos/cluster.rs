//! The chaos suite's infrastructure: a three-node NATS cluster whose nodes
//! can be killed and restarted, and a Postgres instance of the suite's own.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Child;
use uuid::Uuid;

use super::sluice::Place;
use crate::harness::{TempDir, poll_until, wait_for};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One node of the cluster: its name, where it runs, its client and
/// cluster ports, its store, and its process while it runs.
struct Node {
    name: String,
    place: Place,
    port: u16,
    cport: u16,
    store: PathBuf,
    child: Option<Child>,
}

/// Three nats-server processes in one JetStream cluster.
pub struct NatsCluster {
    bin: String,
    nodes: Vec<Node>,
    _dir: TempDir,
}

impl NatsCluster {
    /// Three nodes on this machine's loopback.
    pub async fn start() -> Self {
        Self::start_at(&[Place::loopback(), Place::loopback(), Place::loopback()]).await
    }

    /// One node at each place (`n0`, `n1`, … in their order).
    pub async fn start_at(places: &[Place]) -> Self {
        let dir = TempDir::new("nats-cluster");
        let nodes = places
            .iter()
            .enumerate()
            .map(|(i, place)| Node {
                name: format!("n{i}"),
                place: place.clone(),
                port: free_port(),
                cport: free_port(),
                store: dir.0.join(format!("n{i}")),
                child: None,
            })
            .collect();
        let bin = std::env::var("SLUICE_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let mut c = Self { bin, nodes, _dir: dir };
        for i in 0..places.len() {
            c.spawn(i);
        }
        let url = c.url();
        wait_for("the NATS cluster to offer JetStream at three replicas", Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                let servers = sluice_core::nats::server_addrs(&url).ok()?;
                let client = async_nats::connect(servers).await.ok()?;
                let js = async_nats::jetstream::new(client);
                let cfg = async_nats::jetstream::stream::Config {
                    name: "PROBE".into(),
                    subjects: vec!["probe".into()],
                    num_replicas: 3,
                    ..Default::default()
                };
                js.get_or_create_stream(cfg).await.ok().map(|_| ())
            }
        })
        .await;
        c
    }

    fn spawn(&mut self, i: usize) {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("nats://{}:{}", n.place.host, n.cport))
            .collect();
        let node = &self.nodes[i];
        // deploy/'s lame-duck period (30 s, nats-server's least): a node
        // stopped by `lame_duck_stop` moves its clients off over 30 s; the
        // grace before it starts is cut to 0.5 s (10 s by default).
        let conf = self._dir.0.join("lame-duck.conf");
        if !conf.exists() {
            std::fs::write(&conf, "lame_duck_duration: 30s\nlame_duck_grace_period: 500ms\n").unwrap();
        }
        let host = &node.place.host;
        let child = node
            .place
            .command(std::path::Path::new(&self.bin))
            .arg("-c")
            .arg(&conf)
            .args(["-js", "-a", host, "-p", &node.port.to_string(), "-n", &node.name, "--cluster_name", "sluice"])
            .arg("-sd")
            .arg(&node.store)
            .args(["--cluster", &format!("nats://{host}:{}", node.cport), "--routes", &routes.join(",")])
            .args(Self::log_args(&format!("{}-{}", node.name, node.port)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.nodes[i].child = Some(child);
    }

    /// With `SLUICE_TEST_NATS_LOGS=<dir>`, each node writes its log there
    /// (`<dir>/<node>-<client port>.log`, appended across restarts): what to
    /// read when a chaos run fails.
    fn log_args(name: &str) -> Vec<String> {
        match std::env::var("SLUICE_TEST_NATS_LOGS") {
            Ok(dir) => vec!["-l".into(), format!("{dir}/{name}.log")],
            Err(_) => Vec::new(),
        }
    }

    /// The URL of one node alone (a client of it sees what that node sees).
    pub fn node_url(&self, name: &str) -> String {
        let n = self.nodes.iter().find(|n| n.name == name).unwrap();
        format!("nats://{}:{}", n.place.host, n.port)
    }

    pub fn url(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://{}:{}", n.place.host, n.port)).collect::<Vec<_>>().join(",")
    }

    pub async fn kill(&mut self, name: &str) {
        let node = self.nodes.iter_mut().find(|n| n.name == name).unwrap();
        if let Some(mut child) = node.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Stops a node as the StatefulSet in deploy/ does: lame-duck mode
    /// first (its `preStop` hook; the node hands its leaderships on and
    /// moves its clients to the others), then it exits by itself.
    pub async fn lame_duck_stop(&mut self, name: &str) {
        let node = self.nodes.iter_mut().find(|n| n.name == name).unwrap();
        if let Some(mut child) = node.child.take() {
            let pid = child.id().expect("the node runs").to_string();
            assert!(std::process::Command::new("kill").args(["-USR2", &pid]).status().unwrap().success());
            let status = child.wait().await.unwrap();
            assert!(status.success(), "{name} leaves lame-duck mode by exiting cleanly: {status}");
        }
    }

    pub fn restart(&mut self, name: &str) {
        let i = self.nodes.iter().position(|n| n.name == name).unwrap();
        self.spawn(i);
    }

    /// The nodes' names.
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Moves the stream's leadership to `name` (a step-down with that node
    /// preferred) and waits until it leads, its replicas all current.
    pub async fn make_leader(&self, stream: &str, name: &str) {
        let client = async_nats::connect(sluice_core::nats::server_addrs(&self.url()).unwrap()).await.unwrap();
        wait_for(&format!("{name} to lead {stream}"), Duration::from_secs(60), || {
            let client = client.clone();
            async move {
                if self.leader_of(stream).await.as_deref() == Some(name) {
                    return Some(());
                }
                let body = serde_json::json!({"placement": {"preferred": name}}).to_string();
                let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}");
                let _ = client.request(subject, body.into()).await;
                None
            }
        })
        .await;
    }

    /// Waits until every replica of the stream is current with its leader
    /// (none offline, none lagging): what each then holds is what it keeps.
    pub async fn caught_up(&self, stream: &str) {
        self.caught_up_within(stream, Duration::from_secs(60)).await;
    }

    /// [`Self::caught_up`] within `within`; fails with what the replicas
    /// last said.
    pub async fn caught_up_within(&self, stream: &str, within: Duration) {
        let client = async_nats::connect(sluice_core::nats::server_addrs(&self.url()).unwrap()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let last = std::sync::Mutex::new(None);
        let current = poll_until(within, || {
            let (js, last) = (js.clone(), &last);
            async move {
                let info = js.get_stream(stream).await.ok()?.info().await.ok()?.clone();
                let cluster = info.cluster?;
                *last.lock().unwrap() = Some(format!("{cluster:?}"));
                cluster.leader.as_ref()?;
                (cluster.replicas.len() == 2
                    && cluster.replicas.iter().all(|r| r.current && !r.offline && r.lag.unwrap_or(0) == 0))
                .then_some(())
            }
        })
        .await;
        assert!(
            current.is_some(),
            "not every replica of {stream} current within {within:?}; last seen: {:?}",
            last.lock().unwrap()
        );
    }

    /// The streams (key-value buckets and object stores among them) whose
    /// leader is the node `name`.
    pub async fn streams_led_by(&self, name: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let client = async_nats::connect(sluice_core::nats::server_addrs(&self.url()).unwrap()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let streams: Vec<String> = js.stream_names().try_collect().await.unwrap();
        let mut led = Vec::new();
        for stream in streams {
            if self.leader_of(&stream).await.as_deref() == Some(name) {
                led.push(stream);
            }
        }
        led.sort();
        led
    }

    /// One line per consumer of `stream`: its leader and what it holds
    /// (pending, awaiting acknowledgement, redelivered), as seen through
    /// every node; printed when an audit finds jobs stuck.
    pub async fn consumers_report(&self, stream: &str) -> Vec<String> {
        use futures::StreamExt;
        let Ok(client) = async_nats::connect(sluice_core::nats::server_addrs(&self.url()).unwrap()).await else {
            return vec![format!("{stream}: no connection")];
        };
        let js = async_nats::jetstream::new(client);
        let Ok(s) = js.get_stream(stream).await else { return vec![format!("{stream}: no stream info")] };
        let mut lines = Vec::new();
        let mut infos = s.consumers();
        while let Some(info) = infos.next().await {
            match info {
                Ok(c) => lines.push(format!(
                    "{stream}/{} leader={:?} pending={} ack_pending={} redelivered={} waiting={}",
                    c.name,
                    c.cluster.as_ref().and_then(|c| c.leader.clone()),
                    c.num_pending,
                    c.num_ack_pending,
                    c.num_redelivered,
                    c.num_waiting
                )),
                Err(e) => lines.push(format!("{stream}: {e}")),
            }
        }
        lines
    }

    /// Every revision of `key` in the key-value bucket `bucket`, as the
    /// cluster has it now: sequence, operation, and the job state's status
    /// and attempts. Printed for jobs whose state a worker found missing.
    pub async fn key_history(&self, bucket: &str, key: &str) -> Vec<String> {
        use futures::StreamExt;
        let Ok(client) = async_nats::connect(sluice_core::nats::server_addrs(&self.url()).unwrap()).await else {
            return vec!["no connection".into()];
        };
        let Ok(kv) = async_nats::jetstream::new(client).get_key_value(bucket).await else {
            return vec![format!("no bucket {bucket}")];
        };
        let Ok(mut entries) = kv.history(key).await else { return vec!["no history".into()] };
        let mut lines = Vec::new();
        while let Ok(Some(Ok(entry))) = tokio::time::timeout(Duration::from_secs(2), entries.next()).await {
            let state: serde_json::Value = serde_json::from_slice(&entry.value).unwrap_or_default();
            lines.push(format!(
                "rev={} op={:?} status={} attempts={} message_seq={} at={}",
                entry.revision,
                entry.operation,
                state["status"],
                state["attempts"],
                state["message_seq"],
                entry.created
            ));
        }
        if lines.is_empty() {
            lines.push("no revisions".into());
        }
        lines
    }

    /// The stream's leader node, when it has one.
    pub async fn leader_of(&self, stream: &str) -> Option<String> {
        Self::leader_at(&self.url(), stream).await
    }

    /// The stream's leader as the node `name` sees it (on the side of a
    /// partition that node is on).
    pub async fn leader_seen_by(&self, name: &str, stream: &str) -> Option<String> {
        Self::leader_at(&self.node_url(name), stream).await
    }

    async fn leader_at(url: &str, stream: &str) -> Option<String> {
        let client = async_nats::connect(sluice_core::nats::server_addrs(url).ok()?).await.ok()?;
        let js = async_nats::jetstream::new(client);
        let mut s = js.get_stream(stream).await.ok()?;
        s.info().await.ok()?.cluster.as_ref().and_then(|c| c.leader.clone())
    }
}

/// A Postgres instance of this test's own, started by scripts/pg-instance.sh.
pub struct Postgres {
    dir: PathBuf,
    port: u16,
    script: PathBuf,
}

impl Postgres {
    /// Runs pg-instance.sh; its output (on start, the data directory).
    pub fn run(&self, cmd: &str) -> String {
        let out = std::process::Command::new("bash")
            .arg(&self.script)
            .arg(cmd)
            .arg(&self.dir)
            .arg(self.port.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "pg-instance.sh {cmd}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The instance, a pool on its `chaos` database, that database's URL over
    /// TCP on loopback, and its URL over the Unix socket (which reaches it
    /// from any network namespace of this machine).
    pub async fn start() -> (Self, sqlx::PgPool, String, String) {
        let script = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pg-instance.sh"));
        let pg = Self {
            dir: std::env::temp_dir().join(format!("sluice-chaos-pg-{}", Uuid::new_v4().simple())),
            port: free_port(),
            script,
        };
        let data = pg.run("start");
        let admin = format!("postgres://sluice@127.0.0.1:{}/postgres", pg.port);
        let admin_pool = sqlx::PgPool::connect(&admin).await.unwrap();
        sqlx::query("CREATE DATABASE chaos").execute(&admin_pool).await.unwrap();
        let url = format!("postgres://sluice@127.0.0.1:{}/chaos", pg.port);
        let db = sluice_core::db::connect(&sluice_core::config::DatabaseConfig {
            url: sluice_core::secret::Secret::new(url.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
        sluice_core::db::migrate(&db).await.unwrap();
        let socket = format!("postgres://sluice@localhost/chaos?host={data}/sock&port={}", pg.port);
        (pg, db, url, socket)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.run("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
