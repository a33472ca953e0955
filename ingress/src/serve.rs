//! The public listener's accept loop: HTTP/1.1 with a limit on open
//! connections (`ingress.max_connections`; one past it is closed as soon
//! as it is accepted, so a connection flood cannot exhaust memory or file
//! descriptors), a deadline for each request's headers
//! (`ingress.header_timeout_ms`, which also closes idle keep-alive
//! connections and slow-header clients), and graceful shutdown: on
//! `shutdown` the listener closes and each connection finishes the request
//! it is serving, then closes.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use sluice_core::tasks::Tasks;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown`, then waits for the open
/// connections to finish their requests (the caller bounds the wait).
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, tasks: Tasks, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, most likely: back off a little.
                tracing::warn!(%error, "accept failed");
                metrics::counter!(crate::metrics::CONNECTIONS_REFUSED, "reason" => "accept_error").increment(1);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(crate::metrics::CONNECTIONS_REFUSED, "reason" => "max_connections").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let open = metrics::gauge!(crate::metrics::CONNECTIONS);
        open.increment(1.0);
        tasks.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            open.decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
