//! The four RPCs of `externalscaler.ExternalScaler`, answered from the
//! backlog snapshot.
//!
//! - `IsActive`: the selection's metric is above `activationBacklog`.
//! - `StreamIsActive`: the same, pushed: the current value at once, `true`
//!   the moment a job is submitted to an idle pool (the submit's wake-up,
//!   before any snapshot shows it), and every change after a snapshot.
//! - `GetMetricSpec`: the metric's name and the target backlog per replica.
//! - `GetMetrics`: the backlog (queued plus running jobs), capped and raised
//!   as the selection says; both the int64 and the float fields are filled.
//!
//! A snapshot older than `scaler.stale_ms` fails every RPC with
//! `UNAVAILABLE`; metadata that does not parse fails with `INVALID_ARGUMENT`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use sluice_core::clock::Civil;
use sluice_core::config::Config;
use sluice_core::db::DbError;
use sluice_core::error::{ApiError, ErrorCode};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use crate::proto::external_scaler_server::ExternalScaler;
use crate::proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec, MetricValue,
    ScaledObjectRef,
};
use crate::selection::{Selection, TenantRef};
use crate::snapshot::Backlog;

pub const REQUESTS: &str = "sluice_scaler_requests_total";

pub struct Scaler {
    config: Arc<Config>,
    backlog: watch::Receiver<Arc<Backlog>>,
    wakes: broadcast::Sender<(String, Uuid)>,
    stale: Duration,
    db: sqlx::PgPool,
    tenant_ids: Mutex<HashMap<String, Uuid>>,
    /// The `StreamIsActive` pushers.
    tasks: sluice_core::tasks::Tasks,
    /// Cancelled when the scaler's drain ends: every open stream then ends
    /// with `UNAVAILABLE`, so that KEDA opens it again on another replica
    /// (and the gRPC server's graceful shutdown is not held by it).
    closing: CancellationToken,
}

impl Scaler {
    /// `db` resolves tenant names (connected lazily, only for metadata that
    /// names a tenant).
    pub fn new(
        config: Arc<Config>,
        backlog: watch::Receiver<Arc<Backlog>>,
        wakes: broadcast::Sender<(String, Uuid)>,
        db: sqlx::PgPool,
        tasks: sluice_core::tasks::Tasks,
        closing: CancellationToken,
    ) -> Self {
        let stale = Duration::from_millis(config.scaler.stale_ms);
        Self { config, backlog, wakes, stale, db, tenant_ids: Mutex::new(HashMap::new()), tasks, closing }
    }

    fn selection(&self, r: Option<&ScaledObjectRef>) -> Result<Selection, ApiError> {
        let r = r.ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, "scaledObjectRef is required"))?;
        Selection::parse(&r.scaler_metadata, &self.config)
            .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.to_string()))
    }

    async fn tenant_id(&self, tenant: &Option<TenantRef>) -> Result<Option<Uuid>, ApiError> {
        match tenant {
            None => Ok(None),
            Some(TenantRef::Id(id)) => Ok(Some(*id)),
            Some(TenantRef::Name(name)) => {
                if let Some(id) = self.tenant_ids.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
                    return Ok(Some(*id));
                }
                let id = match sluice_core::db::tenant_id(&self.db, name).await {
                    Ok(id) => id,
                    Err(DbError::NoTenant(_)) => {
                        return Err(ApiError::new(ErrorCode::NotFound, format!("no tenant `{name}`")));
                    }
                    Err(e) => {
                        let message = format!("cannot resolve tenant `{name}`: {e}");
                        return Err(ApiError::new(ErrorCode::Unavailable, message));
                    }
                };
                self.tenant_ids.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), id);
                Ok(Some(id))
            }
        }
    }

    /// The selection's metric from the current snapshot.
    fn measure(&self, s: &Selection, tenant: Option<Uuid>) -> Result<f64, ApiError> {
        let backlog = self.backlog.borrow().clone();
        measure(&backlog, self.stale, s, tenant)
    }
}

fn measure(backlog: &Backlog, stale: Duration, s: &Selection, tenant: Option<Uuid>) -> Result<f64, ApiError> {
    match backlog.taken {
        Some(at) if at.elapsed() <= stale => Ok(s.metric(backlog.of(&s.pool_token, tenant), &Civil::now())),
        Some(at) => Err(ApiError::new(
            ErrorCode::Unavailable,
            format!("the backlog could not be read from NATS for {} ms", at.elapsed().as_millis()),
        )),
        None => Err(ApiError::new(ErrorCode::Unavailable, "the backlog has not been read from NATS yet")),
    }
}

/// The gRPC status of an error: its code's (see [`ErrorCode::grpc_code`]).
fn grpc(error: ApiError) -> Status {
    Status::new(Code::from_i32(error.code.grpc_code()), error.message)
}

fn counted<T>(rpc: &'static str, result: Result<T, ApiError>) -> Result<T, Status> {
    let result = result.map_err(grpc);
    let code = match &result {
        Ok(_) => "ok".to_owned(),
        Err(s) => format!("{:?}", s.code()).to_ascii_lowercase(),
    };
    metrics::counter!(REQUESTS, "rpc" => rpc, "code" => code).increment(1);
    if let Err(s) = &result {
        tracing::info!(rpc, code = ?s.code(), message = s.message(), "scaler request failed");
    }
    result
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(&self, request: Request<ScaledObjectRef>) -> Result<Response<IsActiveResponse>, Status> {
        let result = async {
            let s = self.selection(Some(request.get_ref()))?;
            let tenant = self.tenant_id(&s.tenant).await?;
            Ok(Response::new(IsActiveResponse { result: self.measure(&s, tenant)? > s.activation }))
        }
        .await;
        counted("IsActive", result)
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let result = async {
            let s = self.selection(Some(request.get_ref()))?;
            let tenant = self.tenant_id(&s.tenant).await?;
            let first = self.measure(&s, tenant)? > s.activation;
            let (tx, rx) = mpsc::channel(4);
            let _ = tx.send(Ok(IsActiveResponse { result: first })).await;
            self.tasks.spawn(push_active(
                s,
                tenant,
                first,
                self.backlog.clone(),
                self.wakes.subscribe(),
                self.stale,
                tx,
            ));
            // Once the scaler closes, the stream ends with `UNAVAILABLE`
            // (its pusher then sees the client gone).
            let closing = self.closing.clone();
            let stream = futures::stream::unfold(Some(rx), move |rx| {
                let closing = closing.clone();
                async move {
                    let mut rx = rx?;
                    tokio::select! {
                        item = rx.recv() => item.map(|item| (item, Some(rx))),
                        _ = closing.cancelled() => {
                            Some((Err(Status::unavailable("the scaler is stopping; open the stream again")), None))
                        }
                    }
                }
            });
            Ok(Response::new(Box::pin(stream) as ActiveStream))
        }
        .await;
        counted("StreamIsActive", result)
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let result = self.selection(Some(request.get_ref())).map(|s| {
            Response::new(GetMetricSpecResponse {
                metric_specs: vec![MetricSpec {
                    metric_name: s.metric_name,
                    target_size: s.target.round() as i64,
                    target_size_float: s.target,
                }],
            })
        });
        counted("GetMetricSpec", result)
    }

    async fn get_metrics(&self, request: Request<GetMetricsRequest>) -> Result<Response<GetMetricsResponse>, Status> {
        let result = async {
            let r = request.get_ref();
            let s = self.selection(r.scaled_object_ref.as_ref())?;
            let tenant = self.tenant_id(&s.tenant).await?;
            let value = self.measure(&s, tenant)?;
            let metric_name = if r.metric_name.is_empty() { s.metric_name.clone() } else { r.metric_name.clone() };
            Ok(Response::new(GetMetricsResponse {
                metric_values: vec![MetricValue {
                    metric_name,
                    metric_value: value.round() as i64,
                    metric_value_float: value,
                }],
            }))
        }
        .await;
        counted("GetMetrics", result)
    }
}

/// Pushes the selection's activity: `true` on a wake-up for its pool (and
/// tenant), and any change seen in a new snapshot or as schedules open and
/// close. Ends with `UNAVAILABLE` once the snapshot is stale, and when the
/// client goes away (or the scaler closes the stream).
async fn push_active(
    s: Selection,
    tenant: Option<Uuid>,
    mut last: bool,
    mut backlog: watch::Receiver<Arc<Backlog>>,
    mut wakes: broadcast::Receiver<(String, Uuid)>,
    stale: Duration,
    tx: mpsc::Sender<Result<IsActiveResponse, Status>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let now = tokio::select! {
            _ = tx.closed() => return,
            woke = wakes.recv() => match woke {
                Ok((pool, t)) if pool == s.pool_token && tenant.is_none_or(|want| want == t) => Ok(true),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            changed = backlog.changed() => match changed {
                Ok(()) => { let b = backlog.borrow_and_update().clone(); measure(&b, stale, &s, tenant).map(|v| v > s.activation) }
                Err(_) => return,
            },
            _ = tick.tick() => { let b = backlog.borrow().clone(); measure(&b, stale, &s, tenant).map(|v| v > s.activation) }
        };
        match now {
            Ok(active) if active != last => {
                last = active;
                if tx.send(Ok(IsActiveResponse { result: active })).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(error) => {
                let _ = tx.send(Err(grpc(error))).await;
                return;
            }
        }
    }
}
