//! Running the scaler: NATS, the snapshot and wake-up tasks, the gRPC
//! service and the ops endpoints, until shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::config::{Config, ScalerTls};
use sluice_core::nats::{self, NatsError};
use sluice_core::ops::{self, Readiness};
use sluice_core::tasks::Tasks;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::proto::external_scaler_server::ExternalScalerServer;
use crate::service::Scaler;
use crate::snapshot::{self, Backlog};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("jobs stream: {0}")]
    Stream(String),
    #[error(transparent)]
    Db(#[from] sluice_core::db::DbError),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("scaler.tls.{key}: cannot read {path}: {source}")]
    TlsFile { key: &'static str, path: String, source: std::io::Error },
}

/// A scaler connected to NATS, ready to serve.
pub struct Server {
    config: Arc<Config>,
    client: async_nats::Client,
    stream: async_nats::jetstream::stream::Stream,
    db: sqlx::PgPool,
    tls: Option<ServerTlsConfig>,
    tasks: Tasks,
}

/// Where the scaler serves: KEDA's gRPC protocol, and the ops endpoints
/// (`/healthz`, `/readyz`, `/metrics`) when given.
pub struct Listeners {
    pub grpc: TcpListener,
    pub ops: Option<TcpListener>,
}

impl Server {
    /// Reads the TLS files (if configured), connects NATS, declares the streams, and opens the Postgres pool
    /// lazily (only metadata that names a tenant needs it).
    pub async fn build(config: Config) -> Result<Self, ServeError> {
        describe();
        let tls = config.scaler.tls.as_ref().map(tls_config).transpose()?;
        let client = nats::connect(&config.nats, nats::Role::Scaler, "sluice-scaler").await?;
        let js = nats::jetstream(client.clone(), &config.nats);
        let stream = jobs_stream(&js, &config.nats.jobs_stream).await?;
        let db = sluice_core::db::connect_lazy(&config.database, 2)?;
        Ok(Self { config: Arc::new(config), client, stream, db, tls, tasks: Tasks::new() })
    }

    /// Serves until `shutdown`; then drains for `scaler.drain_ms` (`/readyz`
    /// says 503, every RPC is still answered, new connections too), ends
    /// the open `StreamIsActive` streams, stops the gRPC server gracefully
    /// (HTTP/2 GOAWAY: KEDA's client moves to another replica without
    /// failing a call; in-flight calls finish) and waits (bounded) for its
    /// tasks.
    pub async fn run(self, listeners: Listeners, shutdown: CancellationToken) -> Result<(), ServeError> {
        let Self { config, client, stream, db, tls, tasks } = self;
        let (tx, rx) = watch::channel(Arc::new(Backlog::default()));
        let (wakes, _) = broadcast::channel(1024);
        let pools: HashMap<String, String> = config.pools.iter().map(|p| (p.subject_token(), p.name.clone())).collect();
        let every = Duration::from_millis(config.scaler.refresh_ms);
        tasks.spawn(snapshot::refresh(stream, every, pools, tx, tasks.stopping()));
        tasks.spawn(snapshot::wake_ups(client.clone(), wakes.clone(), tasks.stopping()));
        let (stopping, closing) = (CancellationToken::new(), CancellationToken::new());
        {
            let (stopping, closing) = (stopping.clone(), closing.clone());
            let (drain, ended) = (Duration::from_millis(config.scaler.drain_ms), tasks.stopping());
            tasks.spawn(async move {
                // (a server that ended on its own has nothing to drain)
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = ended.cancelled() => return,
                }
                stopping.cancel();
                tracing::info!(drain_ms = drain.as_millis() as u64, "stopping: not ready; draining before gRPC closes");
                tokio::time::sleep(drain).await;
                closing.cancel();
            });
        }
        if let Some(listener) = listeners.ops {
            let app = ops::router(Readiness { nats: Some(client.clone()), db: None, stopping: Some(stopping) });
            let stop = closing.clone();
            tasks.spawn(async move {
                let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
            });
        }
        let scaler = Scaler::new(config, rx, wakes, db, tasks.clone(), closing.clone());
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let served = builder
            .add_service(ExternalScalerServer::new(scaler))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listeners.grpc),
                closing.cancelled_owned(),
            )
            .await;
        tasks.shutdown(nats::FINAL_FLUSH).await;
        served?;
        Ok(())
    }
}

/// How long the scaler waits at start for the jobs stream to exist.
const STREAM_WAIT: Duration = Duration::from_secs(120);

/// The jobs stream, read only: the ingress and the workers declare it, and
/// the scaler's NATS user may only read its info (a scaler that could
/// update the stream could, say, republish every job to a subject it reads).
/// Waits for it while it does not exist yet (a first deployment).
async fn jobs_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Result<async_nats::jetstream::stream::Stream, ServeError> {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::GetStreamErrorKind;
    let until = tokio::time::Instant::now() + STREAM_WAIT;
    loop {
        match js.get_stream(name).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(ref err) if err.error_code() == ErrorCode::STREAM_NOT_FOUND)
                    && tokio::time::Instant::now() < until =>
            {
                tracing::info!(error = %e, stream = name, "waiting for the jobs stream (declared by the ingress and the workers)");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(ServeError::Stream(e.to_string())),
        }
    }
}

/// Mutual TLS: the scaler's identity, and only clients whose certificate
/// the configured CA signed (KEDA's TriggerAuthentication presents one).
fn tls_config(tls: &ScalerTls) -> Result<ServerTlsConfig, ServeError> {
    let read = |key, path: &String| {
        std::fs::read(path).map_err(|source| ServeError::TlsFile { key, path: path.clone(), source })
    };
    let identity = Identity::from_pem(read("cert_file", &tls.cert_file)?, read("key_file", &tls.key_file)?);
    let clients = Certificate::from_pem(read("client_ca_file", &tls.client_ca_file)?);
    let config = ServerTlsConfig::new().identity(identity).client_ca_root(clients);
    // Unreadable PEM is a start-up error, not one of the first connection.
    tonic::transport::Server::builder().tls_config(config.clone())?;
    Ok(config)
}

fn describe() {
    metrics::describe_gauge!(snapshot::BACKLOG, "jobs queued or running per pool, as of the last snapshot");
    metrics::describe_gauge!(snapshot::SNAPSHOT_AGE, "age of the backlog snapshot KEDA's calls are answered from");
    metrics::describe_counter!(snapshot::REFRESH_FAILURES, "backlog reads from JetStream that failed");
    metrics::describe_counter!(crate::service::REQUESTS, "scaler RPCs by method and gRPC code");
}
