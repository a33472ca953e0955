//! The KEDA external scaler, called the way KEDA calls it: a gRPC client
//! generated from KEDA's own message layout, against a real nats-server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sluice_scaler::proto::external_scaler_client::ExternalScalerClient;
use sluice_scaler::proto::{GetMetricsRequest, ScaledObjectRef};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::harness::{MODEL, Stack, wait_for};

fn object(pairs: &[(&str, &str)]) -> ScaledObjectRef {
    let mut scaler_metadata: HashMap<String, String> =
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    scaler_metadata.entry("pool".into()).or_insert_with(|| MODEL.to_owned());
    ScaledObjectRef { name: "sluice-worker".into(), namespace: "sluice".into(), scaler_metadata }
}

fn metrics_of(pairs: &[(&str, &str)]) -> GetMetricsRequest {
    GetMetricsRequest { scaled_object_ref: Some(object(pairs)), metric_name: String::new() }
}

#[tokio::test]
async fn the_keda_scaler_reports_the_real_backlog_pushes_activity_and_fails_without_nats() {
    let mut stack = Stack::start_with(|c| {
        // Snapshots every 3 s: a push within a second of a submit comes
        // from the submit's wake-up, not from a snapshot.
        c.scaler.refresh_ms = 3_000;
        c.scaler.stale_ms = 7_000;
        c.pools[0].rpm = 120;
    })
    .await;
    // Without a worker, submitted jobs stay in the queue.
    stack.worker.take().unwrap().kill().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let server = sluice_scaler::server::Server::build(stack.config.clone()).await.unwrap();
    tokio::spawn(server.run(sluice_scaler::server::Listeners { grpc: listener, ops: None }, stop));
    let mut client = wait_for("the scaler to listen", Duration::from_secs(10), || async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).ok()?.connect().await.ok()?;
        Some(ExternalScalerClient::new(channel))
    })
    .await;

    // An empty pool is inactive (once the first snapshot is taken).
    let active = wait_for("the first snapshot", Duration::from_secs(10), || {
        let mut c = client.clone();
        async move { c.is_active(object(&[])).await.ok().map(|r| r.into_inner().result) }
    })
    .await;
    assert!(!active);

    // The stream says so at once, then pushes `true` within a second of a submit.
    let mut stream = client.stream_is_active(object(&[])).await.unwrap().into_inner();
    assert!(!stream.message().await.unwrap().unwrap().result);
    let submitted = Instant::now();
    assert_eq!(stack.submit_job(&stack.key, &Stack::job_body("wake"), None).await.status(), 202);
    let pushed = tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
    let pushed = pushed.expect("no push within a second of the submit").unwrap().unwrap();
    assert!(pushed.result);
    assert!(submitted.elapsed() < Duration::from_secs(1));

    // The backlog: 4 jobs of this tenant and 2 of another.
    for i in 0..3 {
        assert_eq!(stack.submit_job(&stack.key, &Stack::job_body(&format!("a{i}")), None).await.status(), 202);
    }
    let other = stack.key_of("other-tenant").await;
    for i in 0..2 {
        assert_eq!(stack.submit_job(&other, &Stack::job_body(&format!("b{i}")), None).await.status(), 202);
    }
    let value = wait_for("the pool's backlog of 6", Duration::from_secs(10), || {
        let mut c = client.clone();
        async move {
            let v = c.get_metrics(metrics_of(&[])).await.ok()?.into_inner().metric_values.pop()?;
            (v.metric_value == 6).then_some(v)
        }
    })
    .await;
    assert_eq!(value.metric_value_float, 6.0);
    assert_eq!(value.metric_name, "sluice-backlog-mock-model");
    assert!(client.is_active(object(&[])).await.unwrap().into_inner().result);
    let by_name = client.get_metrics(metrics_of(&[("tenant", "other-tenant")])).await.unwrap().into_inner();
    assert_eq!(by_name.metric_values[0].metric_value, 2);
    let other_id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM tenants WHERE name = 'other-tenant'").fetch_one(&stack.db).await.unwrap();
    let by_id = client.get_metrics(metrics_of(&[("tenant", &other_id.to_string())])).await.unwrap().into_inner();
    assert_eq!(by_id.metric_values[0].metric_value_float, 2.0);
    let unknown = client.get_metrics(metrics_of(&[("tenant", "nobody")])).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // The target comes from the metadata.
    let spec = client.get_metric_spec(object(&[("targetBacklogPerReplica", "4")])).await.unwrap().into_inner();
    assert_eq!((spec.metric_specs[0].target_size, spec.metric_specs[0].target_size_float), (4, 4.0));
    let bad = client.get_metric_spec(object(&[("targetBacklogPerReplica", "-1")])).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // Capacity-aware: 120 rpm at 60 calls per replica-minute keeps 2
    // replicas busy; at a target of 1 job each the metric stops at 2.
    let capped = [("capacityAware", "true"), ("callsPerMinutePerReplica", "60"), ("targetBacklogPerReplica", "1")];
    let capped = client.get_metrics(metrics_of(&capped)).await.unwrap().into_inner();
    assert_eq!(capped.metric_values[0].metric_value, 2);
    // A schedule open now raises the metric to its floor.
    let floor = client.get_metrics(metrics_of(&[("minBacklogSchedule", "* * * * *=50")])).await.unwrap().into_inner();
    assert_eq!(floor.metric_values[0].metric_value, 50);

    // NATS gone: an error (KEDA's fallback applies), never a made-up value.
    stack.nats.kill().await;
    let status = wait_for("the scaler to report NATS unreachable", Duration::from_secs(15), || {
        let mut c = client.clone();
        async move { c.get_metrics(metrics_of(&[])).await.err() }
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(client.is_active(object(&[])).await.unwrap_err().code(), Code::Unavailable);
}

/// A CA and the certificates it signs, as PEM files in `dir`.
struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: std::path::PathBuf,
}

impl Pki {
    fn new(dir: &std::path::Path, name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.crt")), ca.pem()).unwrap();
        Self { ca, dir: dir.to_owned() }
    }

    /// A leaf certificate for `dns` (a server name, or a client's), written
    /// as `<file>.crt` and `<file>.key`; returns (certificate, key) PEM.
    fn issue(&self, file: &str, dns: &str) -> (String, String) {
        let params = rcgen::CertificateParams::new(vec![dns.to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(self.dir.join(format!("{file}.crt")), cert.pem()).unwrap();
        std::fs::write(self.dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

#[tokio::test]
async fn the_scaler_over_mutual_tls_answers_only_clients_whose_certificate_its_ca_signed() {
    let dir = crate::harness::TempDir::new("scaler-tls");
    let ours = Pki::new(&dir.0, "sluice");
    let strangers = Pki::new(&dir.0, "stranger");
    ours.issue("scaler", "localhost");
    let keda = ours.issue("keda", "keda-operator");
    let stranger = strangers.issue("stranger", "keda-operator");
    let path = |f: &str| dir.0.join(f).to_string_lossy().into_owned();
    let stack = Stack::start_with(|c| {
        c.scaler.tls = Some(sluice_core::config::ScalerTls {
            cert_file: path("scaler.crt"),
            key_file: path("scaler.key"),
            client_ca_file: path("sluice-ca.crt"),
        });
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let server = sluice_scaler::server::Server::build(stack.config.clone()).await.unwrap();
    tokio::spawn(server.run(sluice_scaler::server::Listeners { grpc: listener, ops: None }, stop));

    let ca = tonic::transport::Certificate::from_pem(std::fs::read(path("sluice-ca.crt")).unwrap());
    let tls = |identity: Option<&(String, String)>| {
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(ca.clone()).domain_name("localhost");
        match identity {
            Some((cert, key)) => tls.identity(tonic::transport::Identity::from_pem(cert, key)),
            None => tls,
        }
    };
    // Each client asks for a metric spec (answered without a snapshot).
    let ask = |scheme: &'static str, tls: Option<tonic::transport::ClientTlsConfig>| async move {
        let mut endpoint = tonic::transport::Channel::from_shared(format!("{scheme}://{addr}")).unwrap();
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).unwrap();
        }
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        let mut client = ExternalScalerClient::new(channel);
        client.get_metric_spec(object(&[])).await.map(|r| r.into_inner()).map_err(|e| e.to_string())
    };

    // KEDA, with the client certificate the CA signed, is answered.
    let spec = wait_for("the scaler to answer over mutual TLS", Duration::from_secs(10), || async {
        ask("https", Some(tls(Some(&keda)))).await.ok()
    })
    .await;
    assert_eq!(spec.metric_specs[0].metric_name, "sluice-backlog-mock-model");
    // Without a client certificate, with one from another CA, or in plain
    // text: no answer.
    let refused = [
        ("no client certificate", ask("https", Some(tls(None))).await),
        ("another CA's certificate", ask("https", Some(tls(Some(&stranger)))).await),
        ("plain text", ask("http", None).await),
    ];
    for (what, result) in refused {
        assert!(result.is_err(), "{what}: answered {result:?}");
    }
    // And KEDA is still answered after them.
    assert!(ask("https", Some(tls(Some(&keda)))).await.is_ok());
}
