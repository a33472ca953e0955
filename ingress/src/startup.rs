//! Building the ingress from its config and serving it until shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use sluice_core::config::{Config, ms};
use sluice_core::group_commit::GroupCommit;
use sluice_core::ops::{self, Readiness};
use sluice_core::tasks::Tasks;
use sluice_core::{db, nats};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::KeyCache;
use crate::replies::Replies;
use crate::state::AppState;
use crate::validate::PoolRoute;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("cannot subscribe to the reply inbox: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Keys(#[from] sluice_core::seal::SealError),
}

/// A built ingress, ready to serve on any listener.
pub struct Ingress {
    state: Arc<AppState>,
    db: PgPool,
    tasks: Tasks,
    /// Cancelled when the drain begins (`ingress.drain_ms`).
    draining: CancellationToken,
}

/// Where the ingress serves: the public API, and the admin API (served
/// only when `admin.token` is set; never on the public listener).
pub struct Listeners {
    pub http: TcpListener,
    pub admin: Option<TcpListener>,
    /// `/metrics`, `/healthz`, `/readyz` (`ingress.ops_listen`).
    pub ops: Option<TcpListener>,
}

impl Listeners {
    /// The public API only.
    pub fn http(http: TcpListener) -> Self {
        Self { http, admin: None, ops: None }
    }
}

impl Ingress {
    /// Connects NATS and Postgres, declares the streams, loads the key cache
    /// and subscribes to the reply inbox.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        crate::metrics::describe();
        let ingress_id = Uuid::now_v7().simple().to_string();
        let sealer = config.webhooks.keyring()?;
        let client = nats::connect(&config.nats, nats::Role::Ingress, &format!("sluice-ingress-{ingress_id}")).await?;
        let js = nats::jetstream(client.clone(), &config.nats);
        nats::ensure_streams(&js, &config.nats).await?;
        let job_state = nats::state_bucket(&js, &config.nats, &config.jobs).await?;
        let idempotency = nats::idempotency_bucket(&js, &config.nats, &config.jobs).await?;
        let counters = sluice_core::counters::Counters::open(&js, &config.nats).await?;
        let db = db::connect(&config.database).await?;
        let tasks = Tasks::new();
        let (every, stale) = (ms(config.ingress.auth_refresh_ms), ms(config.ingress.auth_max_staleness_ms));
        let keys = KeyCache::start(db.clone(), config.tenants.clone(), every, stale, &tasks).await?;
        let c = &config.ingress;
        let buffer = crate::replies::Buffer { chunks: c.stream_buffer_chunks, bytes: c.stream_buffer_bytes };
        let replies = Replies::start(&client, &ingress_id, job_state.clone(), buffer, &tasks).await?;
        let pools = config
            .pools
            .iter()
            .map(|p| {
                let route = PoolRoute { token: p.subject_token(), max_output_tokens: p.max_output_tokens };
                (p.name.clone(), route)
            })
            .collect();
        let max_payload = client.server_info().max_payload;
        let bodies = sluice_core::bodies::Bodies::open(&js, max_payload, &config.nats, &config.jobs).await?;
        let group = config.nats.group_commit;
        let jobs_commit = GroupCommit::new(&tasks, group, client.clone(), js.clone(), &config.nats.jobs_stream);
        let state_commit = GroupCommit::new(&tasks, group, client.clone(), js.clone(), &job_state.stream_name);
        let state = AppState {
            jobs_commit,
            state_commit,
            in_flight: Arc::new(Semaphore::new(config.ingress.max_in_flight)),
            body_budget: crate::body::BodyBudget::new(config.ingress.max_body_memory_bytes),
            config,
            nats: client,
            js,
            job_state,
            idempotency,
            bodies,
            db: db.clone(),
            keys,
            admission: crate::admission::Admission::new(counters, tasks.clone()),
            replies,
            tasks: tasks.clone(),
            pools,
            sealer,
        };
        Ok(Self { state: Arc::new(state), db, tasks, draining: CancellationToken::new() })
    }

    /// The admin API's router, when `admin.token` is set.
    fn admin_router(&self) -> Option<Router> {
        crate::admin_api::router(&self.state.config, self.db.clone())
    }

    fn readiness(&self) -> Readiness {
        Readiness {
            nats: Some(self.state.nats.clone()),
            db: Some(self.db.clone()),
            stopping: Some(self.draining.clone()),
        }
    }

    /// The public API, with `/healthz` and `/readyz` for load balancers
    /// (`/metrics` is on the ops listener only: its labels name tenants).
    pub fn router(&self) -> Router {
        let draining = self.draining.clone();
        // While draining, every answer asks the client to close its
        // connection: none is left idle for the listener's close to cut.
        let close = axum::middleware::map_response(move |mut response: axum::response::Response| {
            let draining = draining.is_cancelled();
            async move {
                if draining {
                    let close = axum::http::HeaderValue::from_static("close");
                    response.headers_mut().insert(axum::http::header::CONNECTION, close);
                }
                response
            }
        });
        crate::routes::router(self.state.clone()).merge(ops::health(self.readiness())).layer(close)
    }

    /// Serves `router` on a listener of its own (the admin API, the ops
    /// endpoints) until `shutdown`.
    fn serve_beside(&self, listener: TcpListener, router: Router, what: &'static str, shutdown: &CancellationToken) {
        tracing::info!(addr = ?listener.local_addr().ok(), "{what} listening");
        let stop = shutdown.clone();
        self.tasks.spawn(async move {
            if let Err(error) = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await {
                tracing::warn!(%error, "{what} stopped");
            }
        });
    }

    /// Serves until `shutdown` fires; then drains for `ingress.drain_ms`
    /// (`/readyz` says 503, answers say `Connection: close`, requests are
    /// still served), closes the listeners, lets in-flight requests finish
    /// for `ingress.shutdown_grace_ms` before giving up, stops the
    /// background loops and waits (bounded) for the work they left.
    pub async fn run(self, listeners: Listeners, shutdown: CancellationToken) -> Result<(), StartError> {
        let grace = Duration::from_millis(self.state.config.ingress.shutdown_grace_ms);
        let drain = Duration::from_millis(self.state.config.ingress.drain_ms);
        // The listeners close after the drain, not at the signal.
        let close = CancellationToken::new();
        {
            let (shutdown, draining, close) = (shutdown.clone(), self.draining.clone(), close.clone());
            self.tasks.spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = close.cancelled() => return,
                }
                draining.cancel();
                tracing::info!(
                    drain_ms = drain.as_millis() as u64,
                    "stopping: not ready; draining before the listeners close"
                );
                // (a server that ended on its own ends the drain too)
                tokio::select! {
                    _ = tokio::time::sleep(drain) => {}
                    _ = close.cancelled() => {}
                }
                close.cancel();
            });
        }
        if let (Some(admin), Some(router)) = (listeners.admin, self.admin_router()) {
            self.serve_beside(admin, router, "admin API", &close);
        }
        if let Some(ops_listener) = listeners.ops {
            self.serve_beside(ops_listener, ops::router(self.readiness()), "ops endpoints", &close);
        }
        let listener = listeners.http;
        let app = self.router();
        let stop = close.clone();
        let c = &self.state.config.ingress;
        let limits = crate::serve::Limits {
            max_connections: c.max_connections,
            header_timeout: Duration::from_millis(c.header_timeout_ms),
            write_timeout: Duration::from_millis(c.write_timeout_ms),
        };
        let tasks = self.tasks.clone();
        let server = self.tasks.spawn(async move {
            crate::serve::serve(listener, app, limits, tasks, stop).await;
            Ok::<(), std::io::Error>(())
        });
        tokio::pin!(server);
        let result = tokio::select! {
            done = &mut server => done,
            _ = close.cancelled() => {
                tracing::info!(grace_ms = grace.as_millis() as u64, "draining in-flight requests");
                match tokio::time::timeout(grace, &mut server).await {
                    Ok(done) => done,
                    Err(_) => {
                        tracing::warn!("grace period ran out with requests still in flight; exiting");
                        server.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        close.cancel();
        // What requests left behind (a timed-out request recorded as a job,
        // an orphan answer stored, a count taken back) finishes here.
        self.tasks.shutdown(nats::FINAL_FLUSH).await;
        nats::final_flush(&self.state.nats).await;
        match result {
            Ok(served) => served.map_err(StartError::Io),
            Err(join) => Err(StartError::Io(std::io::Error::other(join))),
        }
    }
}
