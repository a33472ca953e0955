//! `POST /v1/chat/completions`, answered synchronously through the queue:
//! authenticate, validate, publish the job to JetStream, wait for the
//! worker's answer on this ingress's reply inbox.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sluice_core::envelope::{self, Class, Endpoint, Envelope};
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::now_ms;
use uuid::Uuid;

use crate::startup::AppState;

const ROUTE: &str = "chat_completions";

/// The fields the ingress checks; the rest of the body is passed on as is.
#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow)]
    model: std::borrow::Cow<'a, str>,
    messages: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    stream: Option<bool>,
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let job_id = Uuid::now_v7();
    let request_id = request_id(&headers, job_id);
    let mut response = match handle(&state, &headers, body, job_id, &request_id).await {
        Ok(response) => response,
        Err(error) => {
            crate::metrics::rejected(error.code);
            if error.code.status().is_server_error() {
                tracing::warn!(%job_id, request_id, code = error.code.as_str(), message = %error.message, "chat completion failed");
            }
            error.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    crate::metrics::answered(ROUTE, response.status().as_u16(), started.elapsed());
    response
}

async fn handle(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    job_id: Uuid,
    request_id: &str,
) -> Result<Response, ApiError> {
    let owner = state.keys.authenticate(headers)?;
    let bytes = crate::body::read_json_body(headers, body, state.config.ingress.max_body_bytes).await?;
    let request: ChatRequest<'_> = crate::body::parse(&bytes)?;
    if request.messages.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`messages` must not be empty").param("messages"));
    }
    if request.stream == Some(true) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`stream: true` is not supported by this gateway yet")
            .param("stream"));
    }
    let Some(pool_token) = state.pool_tokens.get(request.model.as_ref()) else {
        return Err(ApiError::new(
            ErrorCode::ModelNotFound,
            format!("the model `{}` does not exist or you do not have access to it", request.model),
        )
        .param("model"));
    };
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        return Err(ApiError::new(ErrorCode::Overloaded, "this gateway has too many requests waiting; retry shortly")
            .retry_after(1));
    };
    if state.nats.connection_state() != async_nats::connection::State::Connected {
        return Err(
            ApiError::new(ErrorCode::QueueUnavailable, "the job queue is unreachable; retry shortly").retry_after(1)
        );
    }

    let timeout = Duration::from_millis(state.config.ingress.sync_timeout_ms);
    let deadline = tokio::time::Instant::now() + timeout;
    let submitted_ms = now_ms();
    let mut waiter = state.replies.register();
    let env = Envelope {
        job_id,
        tenant: owner.tenant_id,
        pool: request.model.into_owned(),
        endpoint: Endpoint::ChatCompletions,
        reply: Some(waiter.subject.clone()),
        deadline_ms: submitted_ms + timeout.as_millis() as u64,
        submitted_ms,
        request_id: request_id.to_owned(),
        traceparent: Some(traceparent(headers, job_id)),
    };
    let subject = envelope::job_subject(pool_token, Class::Sync, owner.tenant_id);
    let in_flight = metrics::gauge!(crate::metrics::IN_FLIGHT);
    in_flight.increment(1.0);
    let _gauge = scopeguard(move || in_flight.decrement(1.0));

    let publish_started = Instant::now();
    publish(state, subject, &env, bytes).await?;
    metrics::histogram!(crate::metrics::PUBLISH_SECONDS).record(publish_started.elapsed().as_secs_f64());

    let reply = match tokio::time::timeout_at(deadline, waiter.recv()).await {
        Ok(Some(reply)) => reply,
        Ok(None) => {
            return Err(ApiError::new(ErrorCode::Internal, "the reply router stopped").job(job_id.to_string()));
        }
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::Timeout,
                format!("no answer within {} ms; the job id is in `error.job_id`", timeout.as_millis()),
            )
            .job(job_id.to_string()));
        }
    };
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, reply.body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(secs) = reply.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Ok(v) = HeaderValue::from_str(&job_id.to_string()) {
        h.insert("x-sluice-job-id", v);
    }
    if !status.is_success() {
        crate::metrics::rejected(upstream_code(status));
    }
    Ok(response)
}

/// Publishes the job and waits for JetStream's acknowledgement.
async fn publish(state: &AppState, subject: String, env: &Envelope, body: bytes::Bytes) -> Result<(), ApiError> {
    let ack = state.js.publish_with_headers(subject, env.to_headers(), body).await.map_err(publish_error)?;
    ack.await.map(|_| ()).map_err(publish_error)
}

fn publish_error(e: async_nats::jetstream::context::PublishError) -> ApiError {
    use async_nats::jetstream::context::PublishErrorKind;
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => {
            ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large for the job queue")
        }
        PublishErrorKind::Other if e.to_string().contains("maximum messages") => {
            ApiError::new(ErrorCode::QueueFull, "the job queue is full; retry later").retry_after(5)
        }
        kind => {
            ApiError::new(ErrorCode::QueueUnavailable, format!("the job queue is unavailable ({kind}); retry shortly"))
                .retry_after(1)
        }
    }
}

fn upstream_code(status: StatusCode) -> ErrorCode {
    match status.as_u16() {
        429 => ErrorCode::UpstreamRateLimited,
        504 => ErrorCode::Timeout,
        400..=499 => ErrorCode::InvalidRequest,
        _ => ErrorCode::UpstreamError,
    }
}

/// The client's `x-request-id` when it is sane, else the job id.
fn request_id(headers: &HeaderMap, job_id: Uuid) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| job_id.to_string(), str::to_owned)
}

/// The client's W3C `traceparent` when well-formed, else a new trace rooted
/// at this request (trace id from the job id).
fn traceparent(headers: &HeaderMap, job_id: Uuid) -> String {
    let given = headers.get("traceparent").and_then(|v| v.to_str().ok());
    if let Some(tp) = given {
        let parts: Vec<&str> = tp.split('-').collect();
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.len() == 4 && hex(parts[0], 2) && hex(parts[1], 32) && hex(parts[2], 16) && hex(parts[3], 2) {
            return tp.to_owned();
        }
    }
    let id = job_id.simple().to_string();
    format!("00-{id}-{}-01", &id[16..])
}

/// Runs `f` when dropped, whichever way the handler returns.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
