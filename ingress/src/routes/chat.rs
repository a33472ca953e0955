//! `POST /v1/chat/completions`, `POST /v1/embeddings` and `POST /v1/messages`, answered
//! synchronously through the queue: authenticate, validate, publish the job
//! to JetStream, wait for the worker's answer on this ingress's reply inbox.
//!
//! Anthropic's Messages API takes the same path (sync, streamed or as a
//! job), answered in Anthropic's shapes; a pool's deployments may speak
//! either API and the worker translates. Errors reach the handler
//! structured (from validation, admission or the worker's reply) and are
//! rendered once, in the route's dialect: OpenAI's envelope, or Anthropic's
//! `{"type":"error","error":{"type":"invalid_request_error","message":"…"}}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::now_ms;
use sluice_core::wire::envelope::{Class, Endpoint, Envelope};
use sluice_core::wire::reply::{Outcome, Reply};
use sluice_core::wire::subjects;
use uuid::Uuid;

use crate::state::AppState;
use crate::{publish, validate};

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    answer(state, headers, body, Endpoint::ChatCompletions, "chat_completions").await
}

pub async fn embeddings(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    answer(state, headers, body, Endpoint::Embeddings, "embeddings").await
}

pub async fn messages(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    answer(state, headers, body, Endpoint::Messages, "messages").await
}

async fn answer(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
    route: &'static str,
) -> Response {
    let started = Instant::now();
    let job_id = Uuid::now_v7();
    let request_id = validate::request_id(&headers, job_id);
    let mut response = match handle(&state, &headers, body, endpoint, job_id, &request_id).await {
        Ok(response) => response,
        Err(error) => {
            crate::metrics::rejected(error.code);
            if error.status >= 500 {
                tracing::warn!(%job_id, request_id, route, code = error.code.as_str(), message = %error.message, "request failed");
            }
            error.render(endpoint.dialect())
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    crate::metrics::answered(route, response.status().as_u16(), started.elapsed());
    response
}

async fn handle(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
    endpoint: Endpoint,
    job_id: Uuid,
    request_id: &str,
) -> Result<Response, ApiError> {
    let owner = state.keys.authenticate(headers)?;
    let idempotency_key = validate::idempotency_key(headers)?;
    let limit = state.config.ingress.max_body_bytes;
    let (bytes, body_permit) =
        crate::body::read_json_body(headers, body, limit, &state.body_budget, state.body_timeout()).await?;
    let checked = validate::validate(state, endpoint, &bytes)?;
    // A non-streamed request with an `Idempotency-Key` is kept: the key
    // names its job (a new one, or the first use's, answered again).
    let job_id = match idempotency_key {
        Some(key) if !checked.stream => {
            let digest = sluice_core::jobstate::hash_hex(&bytes);
            crate::idempotency::job_for(state, owner.tenant_id, key, &digest).await?
        }
        _ => job_id,
    };
    let Ok(permit) = state.in_flight.clone().try_acquire_owned() else {
        return Err(ApiError::new(ErrorCode::Overloaded, "this gateway has too many requests waiting; retry shortly")
            .retry_after(1));
    };
    if !nats_up(state).await {
        return Err(
            ApiError::new(ErrorCode::QueueUnavailable, "the job queue is unreachable; retry shortly").retry_after(1)
        );
    }

    let policy = state.keys.policy(owner.tenant_id);
    let admitted = state.admission.admit(owner.tenant_id, &policy, checked.est_tokens).await?;

    let timeout = Duration::from_millis(state.config.ingress.sync_timeout_ms);
    let deadline = tokio::time::Instant::now() + timeout;
    let submitted_ms = now_ms();
    let mut waiter = state.replies.register();
    let mut env = Envelope {
        job_id,
        tenant: owner.tenant_id,
        pool: checked.model,
        endpoint,
        reply: Some(waiter.subject.clone()),
        // Past the wait the job keeps running, for the client to fetch; a
        // job still queued after the jobs expiry never runs.
        deadline_ms: submitted_ms + state.config.jobs.default_expiry_ms,
        submitted_ms,
        request_id: request_id.to_owned(),
        traceparent: Some(validate::traceparent(headers, job_id)),
        est_tokens: checked.est_tokens,
        queued_counted: admitted.queued_counted,
        tpm_window: admitted.tpm_window,
        stream: checked.stream,
        body_ref: None,
        wait_until_ms: Some(submitted_ms + state.config.ingress.sync_timeout_ms),
        // A streamed answer goes out as it comes and is not kept.
        kept: idempotency_key.is_some() && !checked.stream,
        // The reply router confirms the answer once this request has it.
        confirm: !checked.stream,
    };
    let class = Class::Interactive.capped_by(policy.tier);
    let subject = subjects::job(checked.pool_token, class, owner.tenant_id);
    let in_flight = metrics::gauge!(crate::metrics::IN_FLIGHT);
    in_flight.increment(1.0);
    let _gauge = validate::scopeguard(move || in_flight.decrement(1.0));

    // An `Idempotency-Key` claims its job first; a repeat answers from it.
    if env.kept {
        let claimed = crate::kept::claim(state, &env, &bytes).await;
        let record = match claimed {
            Ok(crate::kept::Claim::New) => None,
            Ok(crate::kept::Claim::Replay(record)) => Some(record),
            Err(error) => {
                state.admission.rollback(admitted);
                return Err(error);
            }
        };
        if let Some(record) = record {
            // The first request was counted when it was accepted.
            state.admission.rollback(admitted);
            env.queued_counted = false;
            env.tpm_window = None;
            // Published again while queued: the first publish may have been
            // lost with the crash that made the client repeat. The stream
            // drops the copy as a duplicate, and a worker runs a job only
            // from `queued`.
            if record.status == sluice_core::event::JobStatus::Queued {
                let payload = publish::payload(state, &mut env, bytes).await?;
                publish::job(state, subject, &env, payload).await?;
            }
            drop(body_permit);
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
            return crate::kept::replay(state, &env, *record, wait).await;
        }
    }

    let publish_started = Instant::now();
    let published = match publish::payload(state, &mut env, bytes).await {
        Ok(payload) => publish::job(state, subject, &env, payload).await,
        Err(error) => Err(error),
    };
    if let Err(error) = published {
        state.admission.rollback(admitted);
        if env.kept {
            // Nothing was queued: take the key back.
            let _ = state.job_state.purge(sluice_core::jobstate::key(env.tenant, env.job_id)).await;
        }
        return Err(error);
    }
    metrics::histogram!(crate::metrics::PUBLISH_SECONDS).record(publish_started.elapsed().as_secs_f64());
    // The body is in the queue now; its memory is free for other requests.
    drop(body_permit);

    // From here the job exists; if this handler is dropped (the client went
    // away) before the answer, the job is recorded so its answer is kept.
    // A streamed answer goes out as it comes and is not kept for later.
    let mut on_drop = publish::DetachOnDrop((!env.stream).then(|| (state.clone(), env.clone())));
    let reply = match tokio::time::timeout_at(deadline, waiter.recv()).await {
        Ok(Some(reply)) => {
            on_drop.0 = None;
            reply
        }
        Ok(None) => {
            return Err(ApiError::new(ErrorCode::Internal, "the reply router stopped").job(job_id.to_string()));
        }
        Err(_) if env.stream => {
            return Err(ApiError::new(
                ErrorCode::Timeout,
                format!("the stream did not start within {} ms", timeout.as_millis()),
            )
            .job(job_id.to_string()));
        }
        Err(_) => {
            on_drop.0 = None;
            publish::detached(state, &env).await;
            return Err(ApiError::new(
                ErrorCode::Timeout,
                format!(
                    "no answer within {} ms; the request goes on as a job: GET /v1/jobs/{job_id}",
                    timeout.as_millis()
                ),
            )
            .job(job_id.to_string()));
        }
    };
    let answer = match reply {
        Reply::Chunk(c) => return Ok(crate::stream::response(c, waiter, job_id, endpoint, state, permit)),
        Reply::Answer(answer) => answer,
    };
    let mut response = match &answer.outcome {
        Outcome::Body { status, body } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            if !status.is_success() {
                crate::metrics::rejected(ErrorCode::InvalidRequest);
            }
            let mut response = (status, body.clone()).into_response();
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Outcome::Stored { status, body } => crate::stored::answer(state, &answer, *status, body).await?,
        Outcome::Error(error) => {
            crate::metrics::rejected(error.code);
            error.render(endpoint.dialect())
        }
    };
    let h = response.headers_mut();
    for (name, value) in &answer.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
            h.insert(name, value);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&job_id.to_string()) {
        h.insert("x-sluice-job-id", v);
    }
    Ok(response)
}

/// Whether the ingress's NATS connection is up; while it reconnects (its
/// node restarting, the client moving to another), waited for up to
/// `ingress.reconnect_wait_ms`, so that a rolling restart of NATS is a short
/// pause for the client rather than a 503.
async fn nats_up(state: &AppState) -> bool {
    let connected = || state.nats.connection_state() == async_nats::connection::State::Connected;
    if connected() {
        return true;
    }
    metrics::counter!(crate::metrics::PUBLISH_RETRIES, "reason" => "nats_reconnecting").increment(1);
    let until = tokio::time::Instant::now() + Duration::from_millis(state.config.ingress.reconnect_wait_ms);
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if connected() {
            return true;
        }
    }
    false
}
