//! Asynchronous jobs, one at a time: `GET /v1/jobs/{id}`,
//! `POST /v1/jobs/{id}/cancel` and `POST /v1/jobs/{id}/webhook/redeliver`.
//! Submits are in [`super::job_submit`], the list in [`super::job_list`].
//!
//! Every key of the state bucket holds the tenant, so another tenant's job
//! id is simply not found.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::kv;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sluice_core::db;
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::event::JobStatus;
use sluice_core::jobstate::{self, JobRecord};
use sluice_core::now_ms;
use uuid::Uuid;

use crate::state::AppState;

pub(super) fn finish(route: &'static str, started: Instant, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(|error| {
        crate::metrics::rejected(error.code);
        error.into_response()
    });
    crate::metrics::answered(route, response.status().as_u16(), started.elapsed());
    response
}

pub async fn get(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let started = Instant::now();
    let result = async {
        let owner = state.keys.authenticate(&headers)?;
        let (record, _) = load(&state.job_state, owner.tenant_id, &id).await?;
        match &record.result_ref {
            None => Ok(Json(record.public()).into_response()),
            Some(stored) => crate::stored::job_with_result(&state, &record, stored).await,
        }
    };
    finish("jobs_get", started, result.await)
}

pub async fn cancel(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let started = Instant::now();
    let result = async {
        let owner = state.keys.authenticate(&headers)?;
        // A worker may take the job between our read and our write: the
        // write is conditional on the revision read, and a lost race is
        // read again.
        for _ in 0..3 {
            let (mut record, revision) = load(&state.job_state, owner.tenant_id, &id).await?;
            match record.status {
                JobStatus::Queued => {}
                JobStatus::InProgress => {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        "the job is already running and cannot be cancelled",
                    ));
                }
                done => {
                    return Err(ApiError::new(ErrorCode::Conflict, format!("the job is already {}", done.as_str())));
                }
            }
            record.status = JobStatus::Cancelled;
            record.finished_at = Some(now_ms() / 1000);
            let key = jobstate::key(owner.tenant_id, record.id);
            match state.job_state.update(&key, to_bytes(&record)?, revision).await {
                Ok(_) => return Ok(Json(record.public()).into_response()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable(&e)),
            }
        }
        Err(ApiError::new(ErrorCode::Conflict, "the job changed while cancelling; retry"))
    };
    finish("jobs_cancel", started, result.await)
}

/// The job's record and its revision, or 404 (also for another tenant's job).
pub(crate) async fn load(store: &kv::Store, tenant: Uuid, id: &str) -> Result<(JobRecord, u64), ApiError> {
    let not_found = || ApiError::new(ErrorCode::NotFound, format!("no job with id `{id}`"));
    let job: Uuid = id.parse().map_err(|_| not_found())?;
    // (asked of the stream's leader when a replica has no value: a job just
    // accepted is never a 404 because a replica lagged)
    let found =
        sluice_core::nats::kv_last_write(store, &jobstate::key(tenant, job)).await.map_err(|e| unavailable(&e))?;
    let Some((revision, Some(value))) = found else {
        return Err(not_found());
    };
    let record: JobRecord = serde_json::from_slice(&value)
        .map_err(|_| ApiError::new(ErrorCode::Internal, "the job's stored state is unreadable"))?;
    Ok((record, revision))
}

pub(super) fn to_bytes(record: &JobRecord) -> Result<Bytes, ApiError> {
    serde_json::to_vec(record)
        .map(Bytes::from)
        .map_err(|_| ApiError::new(ErrorCode::Internal, "cannot encode the job's state"))
}

pub(crate) fn unavailable(error: &dyn std::fmt::Display) -> ApiError {
    tracing::warn!(%error, "job state store failed");
    ApiError::new(ErrorCode::QueueUnavailable, "the job store is unavailable; retry shortly").retry_after(1)
}

/// `POST /v1/jobs/{id}/webhook/redeliver`: sends the job's webhook again,
/// from a fresh retry schedule, with the same `webhook-id`.
pub async fn redeliver(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let started = Instant::now();
    let result = async {
        let owner = state.keys.authenticate(&headers)?;
        let not_found = || ApiError::new(ErrorCode::NotFound, format!("no webhook delivery for job `{id}`"));
        let job: Uuid = id.parse().map_err(|_| not_found())?;
        // A delivery still being attempted is left alone: its own retries
        // carry on, and resetting it under an attempt in flight would lose
        // the reset.
        let statuses = db::redeliver_webhook(&state.db, job, owner.tenant_id).await.map_err(|e| {
            tracing::warn!(error = %e, "redeliver failed");
            ApiError::new(ErrorCode::Unavailable, "the webhook store is unavailable; retry shortly").retry_after(1)
        })?;
        if statuses.is_empty() {
            return Err(not_found());
        }
        if !statuses.iter().any(|s| s == "reset") {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "the webhook is still being delivered; retries are scheduled",
            ));
        }
        Ok((StatusCode::ACCEPTED, Json(serde_json::json!({"id": job, "redelivery": "scheduled"}))).into_response())
    };
    finish("jobs_redeliver", started, result.await)
}
