//! A rolling restart under steady load, as Kubernetes does one: every
//! ingress and every worker stopped by SIGTERM in turn, each replaced and
//! ready before the next is stopped, twice around; and every NATS node. The clients sit behind a
//! load balancer that follows each ingress's `/readyz` (probed every 20 ms,
//! as a Service's endpoints follow readiness) and reuse their keep-alive
//! connections. They must see no error at all: an ingress told to stop
//! answers 503 on `/readyz` first and keeps serving for `ingress.drain_ms`
//! with `Connection: close` on every answer, so nothing is sent to a
//! closed listener or over a connection it cuts; a worker told to stop
//! finishes its calls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{MODEL, poll_until, wait_for};
use crate::procs::{Cluster, settings};

/// One request of the load: when it was sent, how long it took, and what
/// went wrong (nothing for a 2xx).
struct Sent {
    took: Duration,
    error: Option<String>,
    job: Option<String>,
}

/// A load balancer that follows each ingress's `/readyz` (probed every
/// 20 ms, as a Service's endpoints follow readiness), and clients behind it
/// sending a request every 10 ms, synchronous chat and asynchronous jobs in
/// turn, over one pool of keep-alive connections.
struct Balanced {
    known: Arc<Mutex<Vec<String>>>,
    rotation: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    prober: tokio::task::JoinHandle<()>,
    load: tokio::task::JoinHandle<Vec<Sent>>,
}

impl Balanced {
    async fn start(cluster: &Cluster, key: &str) -> Self {
        let known = Arc::new(Mutex::new(cluster.ingresses.clone()));
        let rotation = Arc::new(Mutex::new(cluster.ingresses.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let prober = {
            let (known, rotation, stop) = (known.clone(), rotation.clone(), stop.clone());
            let http = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(20));
                while !stop.load(Ordering::Relaxed) {
                    every.tick().await;
                    let bases = known.lock().unwrap().clone();
                    let mut ready = Vec::new();
                    for base in bases {
                        let up = http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200);
                        if up {
                            ready.push(base);
                        }
                    }
                    *rotation.lock().unwrap() = ready;
                }
            })
        };
        let load = {
            let (rotation, stop, key) = (rotation.clone(), stop.clone(), key.to_owned());
            let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
            tokio::spawn(async move {
                let mut tasks = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let base = {
                        let r = rotation.lock().unwrap();
                        (!r.is_empty()).then(|| r[i % r.len()].clone())
                    };
                    let (http, key, sync) = (http.clone(), key.clone(), i.is_multiple_of(2));
                    i += 1;
                    tasks.push(tokio::spawn(send(http, base, key, sync, i)));
                }
                let mut sent = Vec::new();
                for t in tasks {
                    sent.push(t.await.unwrap());
                }
                sent
            })
        };
        let balanced = Self { known, rotation, stop, prober, load };
        wait_for("the load to be under way", Duration::from_secs(10), || async {
            (cluster.mock_stats().await["requests"].as_u64().unwrap_or(0) > 50).then_some(())
        })
        .await;
        balanced
    }

    fn forget(&self, base: &str) {
        self.known.lock().unwrap().retain(|b| b != base);
    }

    async fn add(&self, base: String) {
        self.known.lock().unwrap().push(base.clone());
        wait_for("the new ingress in rotation", Duration::from_secs(10), || async {
            self.rotation.lock().unwrap().contains(&base).then_some(())
        })
        .await;
    }

    /// Stops the load; what each request came to.
    async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.load.await.unwrap();
        self.prober.await.unwrap();
        sent
    }
}

async fn send(http: reqwest::Client, base: Option<String>, key: String, sync: bool, i: usize) -> Sent {
    let started = Instant::now();
    let Some(base) = base else {
        return Sent { took: Duration::ZERO, error: Some("no ingress ready".into()), job: None };
    };
    let chat = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": format!("r{i}")}]});
    let request = if sync {
        http.post(format!("{base}/v1/chat/completions")).json(&chat)
    } else {
        http.post(format!("{base}/v1/jobs")).json(&serde_json::json!({"endpoint": "chat.completions", "body": chat}))
    };
    match request.bearer_auth(&key).send().await {
        Ok(r) if r.status().is_success() => {
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            let job = (!sync).then(|| body["id"].as_str().map(str::to_owned)).flatten();
            Sent { took: started.elapsed(), error: None, job }
        }
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            // A 504 names the job the request goes on as.
            let job = (status == 504)
                .then(|| serde_json::from_str::<serde_json::Value>(&text).ok())
                .flatten()
                .and_then(|b| b["error"]["job_id"].as_str().map(str::to_owned));
            Sent { took: started.elapsed(), error: Some(format!("{base}: status {status}: {text}")), job }
        }
        Err(e) => Sent { took: started.elapsed(), error: Some(format!("{base}: {e}")), job: None },
    }
}

/// Prints what the clients saw and checks it: no error (or, when NATS
/// nodes were restarted, none but 503s and 504s naming their job), every
/// accepted job — and every job a 504 named — completed, and (with NATS
/// up throughout) none delivered more than twice: a stopping worker hands
/// back the jobs it has not started, one more delivery each, but must not
/// bounce them back and forth, each bounce spending one of
/// `worker.max_attempts`.
async fn audit(cluster: &Cluster, key: &str, sent: &[Sent], restarts: &str, nats_restarted: bool) {
    let errors: Vec<&String> = sent.iter().filter_map(|s| s.error.as_ref()).collect();
    let slowest = sent.iter().map(|s| s.took).max().unwrap_or_default();
    let base = cluster.ingresses[0].clone();
    let jobs: Vec<&String> = sent.iter().filter_map(|s| s.job.as_ref()).collect();
    let (mut unfinished, mut redelivered, mut most_attempts) = (0, 0, 0);
    for id in &jobs {
        let url = format!("{base}/v1/jobs/{id}");
        let done = poll_until(Duration::from_secs(30), || async {
            let job: serde_json::Value =
                cluster.http.get(&url).bearer_auth(key).send().await.ok()?.json().await.ok()?;
            (job["status"] == "completed").then(|| job["attempts"].as_u64().unwrap_or(0))
        })
        .await;
        unfinished += usize::from(done.is_none());
        let attempts = done.unwrap_or(0);
        redelivered += usize::from(attempts > 1);
        most_attempts = most_attempts.max(attempts);
    }
    println!(
        "rolling restart: restarts={restarts} requests={} client_errors={} slowest_ms={} jobs={} jobs_not_completed={unfinished} jobs_delivered_again={redelivered} most_attempts={most_attempts}",
        sent.len(),
        errors.len(),
        slowest.as_millis(),
        jobs.len()
    );
    if nats_restarted {
        let other: Vec<&Sent> = sent
            .iter()
            .filter(|s| s.error.as_ref().is_some_and(|e| !e.contains("status 503 ") && s.job.is_none()))
            .collect();
        let other: Vec<&String> = other.iter().filter_map(|s| s.error.as_ref()).collect();
        assert!(other.is_empty(), "clients saw errors other than 503s and 504s naming their job: {other:?}");
    } else {
        assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    }
    assert_eq!(unfinished, 0, "every accepted job completes");
    // (a NATS node's restart may lose acknowledgements: their jobs come
    // back once more each, which is what at-least-once delivery means)
    if !nats_restarted {
        assert!(most_attempts <= 2, "a job was delivered {most_attempts} times: stopping workers bounced it");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_ingress_and_worker_under_load_leaves_clients_no_error() {
    let mock = sluice_mock_provider::Settings { latency_ms: 100, ..Default::default() };
    let mut cluster = Cluster::start(mock, 16, "").await;
    for _ in 0..2 {
        cluster.start_ingress().await;
        cluster.start_worker().await;
    }
    let (_, key) = cluster.tenant("rolling", settings(None, None, None)).await;
    let balanced = Balanced::start(&cluster, &key).await;

    for _ in 0..2 {
        for _ in 0..2 {
            let old = cluster.ingresses[0].clone();
            let status = cluster.terminate_ingress(0).await;
            assert!(status.success(), "the ingress exits cleanly on SIGTERM: {status}");
            balanced.forget(&old);
            let new = cluster.start_ingress().await;
            balanced.add(new).await;
        }
        for _ in 0..2 {
            let status = cluster.terminate_worker(0).await;
            assert!(status.success(), "the worker exits cleanly on SIGTERM: {status}");
            cluster.start_worker().await;
        }
    }
    let sent = balanced.finish().await;
    audit(&cluster, &key, &sent, "8 (4 ingress, 4 worker)", false).await;
}

/// The same load on a three-node NATS cluster (every stream at three
/// replicas), each node stopped in turn as deploy/'s StatefulSet stops it
/// (lame-duck mode, then exit), restarted, and caught up before the next.
/// The target is no client error at all; what is asserted is less: no
/// error but a refusal (503, nothing accepted) or a 504 whose named job
/// completes. Runs under the full suite's load have seen one of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_nats_node_under_load_keeps_every_accepted_request() {
    use crate::chaos::cluster::NatsCluster;
    let mut nats = NatsCluster::start().await;
    let mock = sluice_mock_provider::Settings { latency_ms: 100, ..Default::default() };
    let mut cluster = Cluster::start_on(None, &nats.url(), 3, mock, 16, "").await;
    for _ in 0..2 {
        cluster.start_ingress().await;
        cluster.start_worker().await;
    }
    let (_, key) = cluster.tenant("rolling", settings(None, None, None)).await;
    let balanced = Balanced::start(&cluster, &key).await;
    for name in nats.names() {
        nats.lame_duck_stop(&name).await;
        nats.restart(&name);
        for stream in ["JOBS", "KV_JOB_STATE"] {
            nats.caught_up(stream).await;
        }
    }
    let sent = balanced.finish().await;
    audit(&cluster, &key, &sent, "3 (NATS nodes)", true).await;
}

/// A worker told to stop keeps its running jobs, and a job that reaches it
/// meanwhile (through a pull it had open on an idle queue) goes back to the
/// queue once, not round and round: each delivery counts against
/// `worker.max_attempts`, and a job bounced past it failed without a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_hands_a_job_back_once() {
    let mut cluster = Cluster::start(Default::default(), 16, "").await;
    cluster.start_ingress().await;
    cluster.start_worker().await;
    let (tenant, key) = cluster.tenant("stopping", settings(None, None, None)).await;
    let job = serde_json::json!({"endpoint": "chat.completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}});

    // A job that holds the worker's drain open for a second, on a queue that
    // has just seen a job: the idle worker holds a pull open on it.
    cluster.mock_faults(serde_json::json!({"hang_next": 1, "hang_ms": 1000})).await;
    assert_eq!(cluster.submit(0, &key, &job).await.status(), 202);
    wait_for("the call to hang", Duration::from_secs(10), || async {
        (cluster.mock_stats().await["hangs"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    let (ops, child) = cluster.signal_worker(0);
    wait_for("the worker to say it is stopping", Duration::from_secs(5), || async {
        let r = cluster.http.get(format!("{ops}/readyz")).send().await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = cluster.submit(0, &key, &job).await;
        assert_eq!(r.status(), 202);
        ids.push(r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    assert!(cluster.exited(child).await.success(), "the worker exits cleanly once its call is done");

    cluster.start_worker().await;
    let base = cluster.ingresses[0].clone();
    for id in &ids {
        let url = format!("{base}/v1/jobs/{id}");
        let job: serde_json::Value = wait_for("the job to finish", Duration::from_secs(20), || async {
            let job: serde_json::Value =
                cluster.http.get(&url).bearer_auth(&key).send().await.ok()?.json().await.ok()?;
            matches!(job["status"].as_str(), Some("completed" | "failed")).then_some(job)
        })
        .await;
        assert_eq!(job["status"], "completed", "{job}");
        // `attempts` counts runs; how often the message was handed out is
        // in the stored state, which clients do not see.
        let js = async_nats::jetstream::new(async_nats::connect(cluster.nats_url()).await.unwrap());
        let kv = js.get_key_value("JOB_STATE").await.unwrap();
        let key = sluice_core::jobstate::key(tenant, id.parse().unwrap());
        let state: sluice_core::jobstate::JobRecord =
            serde_json::from_slice(&kv.get(&key).await.unwrap().unwrap()).unwrap();
        assert!(state.deliveries <= Some(2), "delivered {:?} times: {job}", state.deliveries);
    }
}

/// A Kubernetes Service in front of the scalers, as kube-proxy is one: each
/// new TCP connection goes to a replica whose `/readyz` said 200 at the last
/// probe, round robin; a connection lasts as long as both sides keep it.
/// Probed every 500 ms: a Service's endpoints follow a pod's end within
/// about that on a small cluster (kube-proxy's rules lag the pod's deletion).
struct Service {
    addr: String,
    /// Every replica: its gRPC address and its ops base URL.
    known: Arc<Mutex<Vec<(String, String)>>>,
    ready: Arc<Mutex<Vec<String>>>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Service {
    async fn start(replicas: Vec<(String, String)>) -> Self {
        let known = Arc::new(Mutex::new(replicas.clone()));
        let ready = Arc::new(Mutex::new(replicas.into_iter().map(|(grpc, _)| grpc).collect::<Vec<_>>()));
        let prober = {
            let (known, ready) = (known.clone(), ready.clone());
            let http = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(500));
                loop {
                    every.tick().await;
                    let replicas = known.lock().unwrap().clone();
                    let mut up = Vec::new();
                    for (grpc, ops) in replicas {
                        if http.get(format!("{ops}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
                            up.push(grpc);
                        }
                    }
                    *ready.lock().unwrap() = up;
                }
            })
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let forward = {
            let ready = ready.clone();
            tokio::spawn(async move {
                let mut next = 0usize;
                while let Ok((mut client, _)) = listener.accept().await {
                    let to = {
                        let r = ready.lock().unwrap();
                        next += 1;
                        (!r.is_empty()).then(|| r[next % r.len()].clone())
                    };
                    // No ready replica, or one that refuses: the connection
                    // is dropped, as a Service without endpoints rejects it.
                    let Some(to) = to else { continue };
                    tokio::spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(&to).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            })
        };
        Self { addr, known, ready, _tasks: vec![prober, forward] }
    }

    fn forget(&self, grpc: &str) {
        self.known.lock().unwrap().retain(|(g, _)| g != grpc);
    }

    async fn add(&self, replica: (String, String)) {
        let grpc = replica.0.clone();
        self.known.lock().unwrap().push(replica);
        wait_for("the new scaler among the Service's endpoints", Duration::from_secs(10), || async {
            self.ready.lock().unwrap().contains(&grpc).then_some(())
        })
        .await;
    }
}

/// Two scalers behind a Service, each stopped by SIGTERM in turn and
/// replaced, twice around, while a KEDA-like client (gRPC's C core:
/// `tests/sdk/keda_client.py`) calls `GetMetrics` every 20 ms and holds a
/// `StreamIsActive` stream open. No call may fail: a stopping scaler says
/// 503 on `/readyz` and keeps answering for `scaler.drain_ms`, then ends
/// its streams (`UNAVAILABLE`: the client opens them again elsewhere) and
/// says GOAWAY (the client's next calls go over a new connection, to a
/// ready replica). Its streams must not hold its exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_scaler_fails_no_call_of_keda() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut cluster = Cluster::start(Default::default(), 16, "").await;
    // The ingress declares the jobs stream the scalers read.
    cluster.start_ingress().await;
    for _ in 0..2 {
        cluster.start_scaler().await;
    }
    let service = Service::start(cluster.scalers.clone()).await;
    let python = std::env::var("SLUICE_TEST_PYTHON").expect("SLUICE_TEST_PYTHON is not set: run scripts/test.sh");
    let mut keda = tokio::process::Command::new(python)
        .arg(format!("{}/sdk/keda_client.py", env!("CARGO_MANIFEST_DIR")))
        .args([&service.addr, MODEL])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(keda.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
    assert!(
        matches!(&first, Ok(Ok(Some(l))) if l == "keda ready"),
        "the client's first call must be answered: {first:?}"
    );

    let mut slowest_stop = Duration::ZERO;
    for _ in 0..2 {
        for _ in 0..2 {
            let old = cluster.scalers[0].0.clone();
            let began = Instant::now();
            let stopped = tokio::time::timeout(Duration::from_secs(20), cluster.terminate_scaler(0)).await;
            let status = stopped.expect("a scaler exits within 20 s of SIGTERM, its open streams ended");
            assert!(status.success(), "the scaler exits cleanly on SIGTERM: {status}");
            slowest_stop = slowest_stop.max(began.elapsed());
            service.forget(&old);
            let new = cluster.start_scaler().await;
            service.add(new).await;
            // KEDA is served again (25 more calls answered) before the next.
            let before = answered(&cluster).await;
            wait_for("KEDA's calls answered by the running scalers", Duration::from_secs(20), || async {
                (answered(&cluster).await >= before + 25.0).then_some(())
            })
            .await;
        }
    }
    drop(keda.stdin.take());
    let mut out = Vec::new();
    while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
        out.push(line);
    }
    assert!(keda.wait().await.unwrap().success(), "{out:?}");
    let figures = out.iter().find(|l| l.starts_with("keda calls=")).expect("the client's figures");
    let value = |name: &str| -> u64 {
        figures.split(' ').find_map(|f| f.strip_prefix(&format!("{name}="))?.parse().ok()).unwrap()
    };
    println!("rolling restart: restarts=4 (scalers) {figures} slowest_stop_ms={}", slowest_stop.as_millis());
    // The first few of the client's lines: a failing run can print thousands.
    let head: Vec<String> = out.iter().take(10).map(|l| l.chars().take(300).collect()).collect();
    assert_eq!(value("errors"), 0, "KEDA's calls failed: {head:?}");
    assert!(value("calls") > 100, "{figures}");
    // The stream's replica was stopped at least once: it was opened again.
    assert!(value("stream_opens") >= 2, "{figures}");
}

/// `GetMetrics` calls the running scalers have answered.
async fn answered(cluster: &Cluster) -> f64 {
    let mut sum = 0.0;
    for (_, ops) in &cluster.scalers {
        let text = cluster.metrics(ops).await;
        sum += text
            .lines()
            .filter(|l| l.starts_with("sluice_scaler_requests_total{") && l.contains("rpc=\"GetMetrics\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    sum
}
