//! `POST /v1/jobs`: an asynchronous job.
//!
//! A submit writes the job's state to the key-value bucket (one JetStream
//! write, which also claims an `Idempotency-Key`), then publishes the job and
//! answers 202: from then on `GET /v1/jobs/{id}` finds it.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::kv;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::event::JobStatus;
use sluice_core::jobstate::{self, JobRecord};
use sluice_core::now_ms;
use sluice_core::wire::envelope::Envelope;
use uuid::Uuid;

use super::jobs::{finish, load, to_bytes, unavailable};
use crate::state::AppState;
use crate::{publish, validate};

pub async fn submit(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    finish("jobs_submit", started, handle_submit(&state, &headers, body).await)
}

async fn handle_submit(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let owner = state.keys.authenticate(headers)?;
    let limit = state.config.ingress.max_body_bytes;
    let (bytes, _body_permit) =
        crate::body::read_json_body(headers, body, limit, &state.body_budget, state.body_timeout()).await?;
    let job = validate::job(state, &bytes).await?;
    let checked = job.checked;
    let idempotency_key = validate::idempotency_key(headers)?;
    let job_id = match idempotency_key {
        Some(key) => crate::idempotency::job_for(state, owner.tenant_id, key, &jobstate::hash_hex(&bytes)).await?,
        None => Uuid::now_v7(),
    };
    let submitted_ms = now_ms();
    let mut record = JobRecord::queued(job_id, job.endpoint.as_str(), &checked.model, submitted_ms, job.expiry_ms);
    record.claim = Some(jobstate::new_claim());
    record.metadata = job.metadata;
    record.priority = job.priority;
    // The webhook's secret is kept sealed for its job; shown once, in clear, below.
    let shown_secret = job.webhook.as_ref().map(|h| h.secret.clone());
    record.webhook = match job.webhook {
        Some(mut hook) => {
            hook.secret = state.sealer.seal(&sluice_core::seal::job_place(job_id), &hook.secret).map_err(|error| {
                tracing::error!(%error, "cannot seal a webhook secret");
                ApiError::new(ErrorCode::Internal, "cannot store the webhook secret")
            })?;
            Some(hook)
        }
        None => None,
    };
    record.request_hash = idempotency_key.map(|_| jobstate::hash_hex(&bytes));
    let key = jobstate::key(owner.tenant_id, job_id);
    let request_id = validate::request_id(headers, job_id);
    let policy = state.keys.policy(owner.tenant_id);
    let class = job.class.capped_by(policy.tier);
    let mut env = Envelope {
        job_id,
        tenant: owner.tenant_id,
        pool: checked.model,
        endpoint: job.endpoint,
        reply: None,
        deadline_ms: submitted_ms + job.expiry_ms,
        submitted_ms,
        request_id: request_id.clone(),
        traceparent: Some(validate::traceparent(headers, job_id)),
        est_tokens: checked.est_tokens,
        queued_counted: false,
        tpm_window: None,
        stream: false,
        body_ref: None,
        wait_until_ms: None,
        kept: false,
        confirm: false,
    };
    let subject = sluice_core::wire::subjects::job(checked.pool_token, class, owner.tenant_id);

    let admitted = state.admission.admit(owner.tenant_id, &policy, checked.est_tokens).await?;
    let created = publish::job_state(state, &key, to_bytes(&record)?).await;
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
    let publish = async {
        let payload = publish::payload(state, &mut env, job.inner).await?;
        publish::job(state, subject, &env, payload).await
    };
    if (!replayed || record.status == JobStatus::Queued)
        && let Err(error) = publish.await
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
    if !replayed && let (Some(secret), Some(out)) = (shown_secret, shown.get_mut("webhook")) {
        out["secret"] = serde_json::Value::String(secret);
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
