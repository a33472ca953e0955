//! `/healthz` (the process runs), `/readyz` (its dependencies answer) and
//! `/metrics` (Prometheus), served by every component.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::PgPool;

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub nats: Option<async_nats::Client>,
    pub db: Option<PgPool>,
    /// Cancelled once the process is stopping: `/readyz` answers 503 from
    /// then on, before any listener closes.
    pub stopping: Option<tokio_util::sync::CancellationToken>,
}

impl Readiness {
    /// `Ok` when every dependency answers, else the first one that does not.
    pub async fn check(&self) -> Result<(), &'static str> {
        if self.stopping.as_ref().is_some_and(|s| s.is_cancelled()) {
            return Err("stopping");
        }
        if let Some(client) = &self.nats
            && client.connection_state() != async_nats::connection::State::Connected
        {
            return Err("nats unreachable");
        }
        if let Some(db) = &self.db {
            let ping = crate::db::ping(db);
            match tokio::time::timeout(Duration::from_secs(2), ping).await {
                Ok(Ok(_)) => {}
                _ => return Err("postgres unreachable"),
            }
        }
        Ok(())
    }
}

/// `/healthz`, `/readyz` and `/metrics`: an ops listener's routes.
pub fn router(readiness: Readiness) -> Router {
    let handle = crate::telemetry::metrics();
    health(readiness).route("/metrics", get(move || std::future::ready(handle.render())))
}

/// `/healthz` and `/readyz` only, for a public listener (load balancers
/// probe them; `/metrics` names tenants and stays on the ops listener).
pub fn health(readiness: Readiness) -> Router {
    Router::new().route("/healthz", get(|| async { "ok" })).route("/readyz", get(readyz)).with_state(readiness)
}

async fn readyz(State(readiness): State<Readiness>) -> impl IntoResponse {
    match readiness.check().await {
        Ok(()) => (StatusCode::OK, "ready"),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}
