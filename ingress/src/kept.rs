//! Synchronous requests with an `Idempotency-Key`: the key names the job
//! (`crate::idempotency`, as on `POST /v1/jobs`), and the job's state is
//! written before its publish. The worker moves that
//! state on and stores the outcome before it answers (`Sluice-Kept`), so a
//! repeat of the request — a client whose connection broke, an SDK retrying
//! a 5xx — gets the first request's answer instead of a second provider call:
//! it waits, up to `ingress.sync_timeout_ms`, for the job's state to end and
//! answers from it (`idempotent-replayed: true`). A key reused for a
//! different body is a 409.

use std::time::Duration;

use async_nats::jetstream::kv;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::event::JobStatus;
use sluice_core::jobstate::{self, JobRecord};
use sluice_core::wire::envelope::Envelope;
use sluice_core::wire::reply::JobRef;

use crate::routes::jobs::{load, unavailable};
use crate::state::AppState;

/// How claiming the key went.
pub enum Claim {
    /// This request claimed it: its job is new.
    New,
    /// The key holds a job of the same request: answer from it.
    Replay(Box<JobRecord>),
}

/// Writes the job's state for `env` (queued, with the body's digest), or
/// finds the job the key already names.
pub async fn claim(state: &AppState, env: &Envelope, body: &[u8]) -> Result<Claim, ApiError> {
    let mut record = JobRecord::of_job(&JobRef::of(env));
    let digest = jobstate::hash_hex(body);
    record.request_hash = Some(digest.clone());
    record.claim = Some(jobstate::new_claim());
    let value = serde_json::to_vec(&record).map_err(|_| ApiError::new(ErrorCode::Internal, "cannot encode a job"))?;
    let key = jobstate::key(env.tenant, env.job_id);
    match crate::publish::job_state(state, &key, value.into()).await {
        Ok(()) => Ok(Claim::New),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            let (existing, _) = load(&state.job_state, env.tenant, &env.job_id.to_string()).await?;
            if existing.request_hash.as_deref() != Some(digest.as_str()) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    "this Idempotency-Key was used for a different request",
                )
                .param("Idempotency-Key"));
            }
            Ok(Claim::Replay(Box::new(existing)))
        }
        Err(e) => Err(unavailable(&e)),
    }
}

/// Waits until the job's state is terminal (or `wait` runs out: a 504
/// naming the job), and answers from it as the first request was answered.
pub async fn replay(state: &AppState, env: &Envelope, record: JobRecord, wait: Duration) -> Result<Response, ApiError> {
    let job = env.job_id.to_string();
    let record = if record.status.is_terminal() {
        record
    } else {
        let key = jobstate::key(env.tenant, env.job_id);
        let ended = async {
            let mut watch = state.job_state.watch_with_history(&key).await.map_err(|e| unavailable(&e))?;
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|e| unavailable(&e))?;
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                if let Ok(record) = serde_json::from_slice::<JobRecord>(&entry.value)
                    && record.status.is_terminal()
                {
                    return Ok(record);
                }
            }
            Err(ApiError::new(ErrorCode::Unavailable, "the job store stopped answering; retry shortly").retry_after(1))
        };
        match tokio::time::timeout(wait, ended).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(ApiError::new(
                    ErrorCode::Timeout,
                    format!(
                        "the request with this Idempotency-Key is still running: GET /v1/jobs/{job} for its answer"
                    ),
                )
                .job(job));
            }
        }
    };
    let mut response = answer_of(state, &record).await?;
    let h = response.headers_mut();
    h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    if let Ok(v) = HeaderValue::from_str(&job) {
        h.insert("x-sluice-job-id", v);
    }
    Ok(response)
}

/// The answer a terminal record stands for: the provider's body, or the
/// error the job ended with (in the route's dialect, rendered by the caller).
async fn answer_of(state: &AppState, record: &JobRecord) -> Result<Response, ApiError> {
    let job = record.id.to_string();
    match (record.status, &record.result, &record.result_ref, &record.error) {
        (JobStatus::Completed, Some(result), _, _) => {
            let mut response = (StatusCode::OK, result.get().to_owned()).into_response();
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(response)
        }
        (JobStatus::Completed, None, Some(stored), _) => {
            let chunks = state.bodies.stream(stored).await.map_err(|error| {
                tracing::warn!(%error, job_id = %record.id, "cannot read a stored job result");
                ApiError::new(ErrorCode::Internal, "the job's result is stored but cannot be read; retry shortly")
                    .retry_after(1)
            })?;
            let mut response = (StatusCode::OK, Body::from_stream(chunks)).into_response();
            let h = response.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(stored.size));
            Ok(response)
        }
        (_, _, _, Some(error)) => {
            let code = ErrorCode::parse(&error.code).unwrap_or(ErrorCode::UpstreamError);
            Err(ApiError::new(code, error.message.clone()).with_status(error.status).job(job))
        }
        (status, ..) => {
            Err(ApiError::new(ErrorCode::Conflict, format!("the job with this Idempotency-Key is {}", status.as_str()))
                .job(job))
        }
    }
}
