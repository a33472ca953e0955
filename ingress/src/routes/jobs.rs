//! Asynchronous jobs: `POST /v1/jobs`, `GET /v1/jobs/{id}`,
//! `POST /v1/jobs/{id}/cancel`, and `GET /v1/jobs` (the tenant's job
//! history from the ledger, newest first, paged by cursor).
//!
//! A submit writes the job's state to the key-value bucket (one JetStream
//! write, which also claims an `Idempotency-Key`), then publishes the job and
//! answers 202: from then on `GET` finds it. Every key holds the tenant, so
//! another tenant's job id is simply not found.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::kv;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::event::JobStatus;
use sluice_core::jobstate::{self, JobRecord, WebhookTarget};
use sluice_core::now_ms;
use sluice_core::webhook;
use sluice_core::wire::envelope::{Class, Endpoint, Envelope};
use uuid::Uuid;

use super::submit;
use crate::startup::AppState;

const MAX_METADATA_KEYS: usize = 16;
const MAX_METADATA_VALUE: usize = 512;
const MAX_IDEMPOTENCY_KEY: usize = 255;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobRequest {
    endpoint: String,
    body: Box<RawValue>,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    priority: Option<String>,
    /// Seconds the job may wait in the queue before it expires.
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    webhook: Option<WebhookRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookRequest {
    url: String,
    /// `whsec_…`; one is made (and shown once, in the 202) when absent.
    #[serde(default)]
    secret: Option<String>,
}

fn finish(route: &'static str, started: Instant, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(|error| {
        crate::metrics::rejected(error.code);
        error.into_response()
    });
    crate::metrics::answered(route, response.status().as_u16(), started.elapsed());
    response
}

pub async fn submit(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    finish("jobs_submit", started, handle_submit(&state, &headers, body).await)
}

pub async fn get(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let started = Instant::now();
    let result = async {
        let owner = state.keys.authenticate(&headers)?;
        let (record, _) = load(&state.job_state, owner.tenant_id, &id).await?;
        Ok(Json(record.public()).into_response())
    };
    finish("jobs_get", started, result.await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    limit: Option<i64>,
    /// Cursor: the id of the last job of the previous page.
    #[serde(default)]
    after: Option<Uuid>,
    #[serde(default)]
    status: Option<String>,
}

const STATUSES: &[&str] = &["queued", "in_progress", "completed", "failed", "cancelled", "expired"];

pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let owner = state.keys.authenticate(&headers)?;
        let Query(query) = query.map_err(|e| {
            ApiError::new(ErrorCode::InvalidRequest, format!("bad query ({e}); parameters: limit, after, status"))
        })?;
        let limit = query.limit.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "`limit` must be 1 to 100").param("limit"));
        }
        if let Some(s) = &query.status
            && !STATUSES.contains(&s.as_str())
        {
            return Err(ApiError::new(ErrorCode::InvalidRequest, format!("`status` must be one of {STATUSES:?}"))
                .param("status"));
        }
        let rows = history(&state.db, owner.tenant_id, query.after, query.status.as_deref(), limit + 1).await.map_err(
            |e| {
                tracing::warn!(error = %e, "job history query failed");
                ApiError::new(ErrorCode::Unavailable, "the job history is unavailable; retry shortly").retry_after(1)
            },
        )?;
        let has_more = rows.len() as i64 > limit;
        let data: Vec<_> = rows.into_iter().take(limit as usize).collect();
        let last = data.last().and_then(|j| j.get("id").cloned());
        Ok(Json(serde_json::json!({"object": "list", "data": data, "has_more": has_more, "last_id": last}))
            .into_response())
    };
    finish("jobs_list", started, result.await)
}

/// The tenant's jobs from the ledger, newest first, after the cursor job.
async fn history(
    db: &sqlx::PgPool,
    tenant: Uuid,
    after: Option<Uuid>,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<serde_json::Value>, sqlx::Error> {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT id, endpoint, pool, status, attempts,
                extract(epoch FROM submitted_at)::int8 AS created_at,
                extract(epoch FROM finished_at)::int8 AS finished_at,
                metadata::text AS metadata, error_code
         FROM jobs
         WHERE tenant_id = $1
           AND ($2::text IS NULL OR status = $2)
           AND ($3::uuid IS NULL OR (submitted_at, id) <
                (SELECT submitted_at, id FROM jobs WHERE id = $3 AND tenant_id = $1))
         ORDER BY submitted_at DESC, id DESC
         LIMIT $4",
    )
    .bind(tenant)
    .bind(status)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|r| {
            let metadata: Option<String> = r.try_get("metadata")?;
            Ok(serde_json::json!({
                "id": r.try_get::<Uuid, _>("id")?,
                "object": "job",
                "endpoint": r.try_get::<String, _>("endpoint")?,
                "model": r.try_get::<String, _>("pool")?,
                "status": r.try_get::<String, _>("status")?,
                "attempts": r.try_get::<i32, _>("attempts")?,
                "created_at": r.try_get::<i64, _>("created_at")?,
                "finished_at": r.try_get::<Option<i64>, _>("finished_at")?,
                "metadata": metadata.and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok()),
                "error_code": r.try_get::<Option<String>, _>("error_code")?,
            }))
        })
        .collect()
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

async fn handle_submit(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let owner = state.keys.authenticate(headers)?;
    let bytes =
        crate::body::read_json_body(headers, body, state.config.ingress.max_body_bytes, state.body_timeout()).await?;
    let request: JobRequest = crate::body::parse(&bytes)?;
    let Some(endpoint) = Endpoint::parse(&request.endpoint) else {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("unknown endpoint `{}`; supported: chat.completions, embeddings, messages", request.endpoint),
        )
        .param("endpoint"));
    };
    let inner = Bytes::copy_from_slice(request.body.get().as_bytes());
    let checked = submit::validate(state, endpoint, &inner)?;
    if checked.stream {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "a job cannot stream; use POST /v1/chat/completions for `stream: true`",
        )
        .param("stream"));
    }
    check_metadata(request.metadata.as_ref())?;
    let asked = match request.priority.as_deref() {
        None => Class::Normal,
        Some(p) => Class::parse(p).ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidRequest, "`priority` must be interactive, normal or batch")
                .param("priority")
        })?,
    };
    let jobs = &state.config.jobs;
    let expiry_ms = match request.expires_in {
        Some(0) => {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "`expires_in` must be positive").param("expires_in"));
        }
        Some(secs) if secs.saturating_mul(1000) > jobs.max_expiry_ms => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("`expires_in` may be at most {} seconds", jobs.max_expiry_ms / 1000),
            )
            .param("expires_in"));
        }
        Some(secs) => secs * 1000,
        None => jobs.default_expiry_ms,
    };

    let webhook = match request.webhook {
        Some(hook) => Some(check_webhook(state, hook).await?),
        None => None,
    };
    let idempotency_key = idempotency_key(headers)?;
    let job_id = match idempotency_key {
        Some(key) => jobstate::idempotent_job_id(owner.tenant_id, key),
        None => Uuid::now_v7(),
    };
    let submitted_ms = now_ms();
    let mut record = JobRecord::queued(job_id, endpoint.as_str(), &checked.model, submitted_ms, expiry_ms);
    record.metadata = request.metadata;
    record.priority = request.priority;
    record.webhook = webhook;
    record.request_hash = idempotency_key.map(|_| jobstate::hash_hex(&bytes));
    let key = jobstate::key(owner.tenant_id, job_id);
    let request_id = submit::request_id(headers, job_id);
    let policy = state.keys.policy(owner.tenant_id);
    let class = asked.capped_by(policy.tier);
    let mut env = Envelope {
        job_id,
        tenant: owner.tenant_id,
        pool: checked.model,
        endpoint,
        reply: None,
        deadline_ms: submitted_ms + expiry_ms,
        submitted_ms,
        request_id: request_id.clone(),
        traceparent: Some(submit::traceparent(headers, job_id)),
        est_tokens: checked.est_tokens,
        queued_counted: false,
        tpm_window: None,
        stream: false,
    };
    let subject = sluice_core::wire::subjects::job(checked.pool_token, class, owner.tenant_id);

    let admitted = state.admission.admit(owner.tenant_id, &policy, checked.est_tokens).await?;
    let created = create_state(state, &key, to_bytes(&record)?).await;
    // A replayed submit was counted when it was first accepted.
    let admitted = if created.is_ok() {
        env.queued_counted = admitted.queued_counted;
        env.tpm_window = admitted.tpm_window;
        Some(admitted)
    } else {
        state.admission.rollback(admitted);
        None
    };
    let (record, replayed) = match created {
        Ok(()) => (record, false),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists && idempotency_key.is_some() => {
            let (existing, _) = load(&state.job_state, owner.tenant_id, &job_id.to_string()).await?;
            if existing.request_hash != record.request_hash {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    "this Idempotency-Key was used for a different request",
                ));
            }
            (existing, true)
        }
        Err(e) => return Err(unavailable(&e)),
    };
    // A replayed submit publishes again while the job is still queued: its
    // first publish may have been lost with the crash that made the client
    // retry. The stream drops the copy as a duplicate inside its dedup
    // window, and a worker runs a job only from `queued`, so it runs once.
    if (!replayed || record.status == JobStatus::Queued)
        && let Err(error) = submit::publish(state, subject, &env, inner).await
    {
        if !replayed {
            // Nothing was queued: take the job back so it is not visible.
            let _ = state.job_state.purge(&key).await;
        }
        if let Some(admitted) = admitted {
            state.admission.rollback(admitted);
        }
        return Err(error);
    }
    let mut shown = record.public();
    // The webhook secret is shown once, on the submit that set it.
    if !replayed && let (Some(hook), Some(out)) = (&record.webhook, shown.get_mut("webhook")) {
        out["secret"] = serde_json::Value::String(hook.secret.clone());
    }
    let mut response = (StatusCode::ACCEPTED, Json(shown)).into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{job_id}")) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert("x-request-id", v);
    }
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The job's record and its revision, or 404 (also for another tenant's job).
async fn load(store: &kv::Store, tenant: Uuid, id: &str) -> Result<(JobRecord, u64), ApiError> {
    let not_found = || ApiError::new(ErrorCode::NotFound, format!("no job with id `{id}`"));
    let job: Uuid = id.parse().map_err(|_| not_found())?;
    let entry = store.entry(jobstate::key(tenant, job)).await.map_err(|e| unavailable(&e))?;
    let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
        return Err(not_found());
    };
    let record: JobRecord = serde_json::from_slice(&entry.value)
        .map_err(|_| ApiError::new(ErrorCode::Internal, "the job's stored state is unreadable"))?;
    Ok((record, entry.revision))
}

fn to_bytes(record: &JobRecord) -> Result<Bytes, ApiError> {
    serde_json::to_vec(record)
        .map(Bytes::from)
        .map_err(|_| ApiError::new(ErrorCode::Internal, "cannot encode the job's state"))
}

fn unavailable(error: &dyn std::fmt::Display) -> ApiError {
    tracing::warn!(%error, "job state store failed");
    ApiError::new(ErrorCode::QueueUnavailable, "the job store is unavailable; retry shortly").retry_after(1)
}

async fn check_webhook(state: &AppState, hook: WebhookRequest) -> Result<WebhookTarget, ApiError> {
    let bad = |message: String| ApiError::new(ErrorCode::InvalidRequest, message).param("webhook");
    if hook.url.len() > 2048 {
        return Err(bad("`webhook.url` is longer than 2048 characters".into()));
    }
    webhook::check_target(&hook.url, state.config.webhooks.policy()).await.map_err(|e| bad(e.to_string()))?;
    let secret = match hook.secret {
        Some(secret) => {
            webhook::check_secret(&secret).map_err(|e| bad(e.to_string()))?;
            secret
        }
        None => webhook::new_secret().map_err(|_| ApiError::new(ErrorCode::Internal, "cannot make a secret"))?,
    };
    Ok(WebhookTarget { url: hook.url, secret })
}

/// `POST /v1/jobs/{id}/webhook/redeliver`: sends the job's webhook again,
/// from a fresh retry schedule, with the same `webhook-id`.
pub async fn redeliver(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let started = Instant::now();
    let result = async {
        let owner = state.keys.authenticate(&headers)?;
        let not_found = || ApiError::new(ErrorCode::NotFound, format!("no webhook delivery for job `{id}`"));
        let job: Uuid = id.parse().map_err(|_| not_found())?;
        let unavailable = |e: sqlx::Error| {
            tracing::warn!(error = %e, "redeliver failed");
            ApiError::new(ErrorCode::Unavailable, "the webhook store is unavailable; retry shortly").retry_after(1)
        };
        // A delivery still being attempted is left alone: its own retries
        // carry on, and resetting it under an attempt in flight would lose
        // the reset.
        let statuses: Vec<String> = sqlx::query_scalar(
            "WITH reset AS (
                 UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now()
                 WHERE job_id = $1 AND tenant_id = $2 AND status <> 'pending' RETURNING id)
             SELECT CASE WHEN id IN (SELECT id FROM reset) THEN 'reset' ELSE status END
             FROM webhook_deliveries WHERE job_id = $1 AND tenant_id = $2",
        )
        .bind(job)
        .bind(owner.tenant_id)
        .fetch_all(&state.db)
        .await
        .map_err(unavailable)?;
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

fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY => Ok(Some(key)),
        _ => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("`Idempotency-Key` must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        )),
    }
}

fn check_metadata(metadata: Option<&serde_json::Map<String, serde_json::Value>>) -> Result<(), ApiError> {
    let Some(map) = metadata else { return Ok(()) };
    let bad = |message: String| Err(ApiError::new(ErrorCode::InvalidRequest, message).param("metadata"));
    if map.len() > MAX_METADATA_KEYS {
        return bad(format!("`metadata` may hold at most {MAX_METADATA_KEYS} keys"));
    }
    for (key, value) in map {
        match value.as_str() {
            Some(s) if s.len() <= MAX_METADATA_VALUE && key.len() <= 64 => {}
            _ => return bad(format!("`metadata.{key}` must be a string of at most {MAX_METADATA_VALUE} characters")),
        }
    }
    Ok(())
}

/// Creates the job's state (through the group commit: the write must find
/// no value for the key), repeating while the bucket's stream has no leader
/// (up to `ingress.publish_retry_ms`, as the job's publish does). A repeat
/// that finds the key exists found its own earlier write (the key holds this
/// request's new job id), unless the first attempt already did.
async fn create_state(state: &AppState, key: &str, value: bytes::Bytes) -> Result<(), kv::CreateError> {
    use async_nats::jetstream::context::PublishErrorKind;
    use sluice_core::group_commit::expect_revision;
    use sluice_core::wire::subjects::kv_key;
    let give_up = tokio::time::Instant::now() + std::time::Duration::from_millis(state.config.ingress.publish_retry_ms);
    let mut pause = std::time::Duration::from_millis(50);
    let mut repeated = false;
    let subject = kv_key(&state.job_state, key);
    loop {
        match state.state_commit.publish(subject.clone(), expect_revision(0), value.clone()).await {
            Ok(_) => return Ok(()),
            // The key has a value, or a tombstone (a submit taken back) that
            // the bucket's own create writes over.
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                return match state.job_state.create(key, value.clone()).await {
                    Err(e) if repeated && e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
                    other => other.map(|_| ()),
                };
            }
            // Anything else but a value too large may pass (no leader, a lost
            // or refused acknowledgement during an election).
            Err(e)
                if e.kind() != PublishErrorKind::MaxPayloadExceeded
                    && tokio::time::Instant::now() + pause < give_up =>
            {
                metrics::counter!(crate::metrics::PUBLISH_RETRIES, "reason" => "job_state").increment(1);
                tracing::info!(error = %e, "storing a job's state failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
                repeated = true;
            }
            Err(e) => return Err(kv::CreateError::with_source(kv::CreateErrorKind::Publish, e)),
        }
    }
}
