//! What every submit path shares: validating an endpoint's body, publishing
//! a job to JetStream, request ids and trace context.

use std::borrow::Cow;

use axum::http::HeaderMap;
use serde::Deserialize;
use sluice_core::envelope::{Endpoint, Envelope};
use sluice_core::error::{ApiError, ErrorCode};
use uuid::Uuid;

use crate::startup::AppState;

/// The fields of a chat completion the ingress checks; the rest of the body
/// is passed on as is.
#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    messages: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

/// A checked chat completion request.
pub struct Checked<'s> {
    pub model: String,
    pub pool_token: &'s str,
    /// Prompt estimate plus requested output, for fairness and `tpm`.
    pub est_tokens: u64,
    /// `stream: true`: the answer goes back as server-sent events.
    pub stream: bool,
}

/// Checks a chat completion body: its pool, the pool's subject token, and
/// its token estimate.
pub fn validate_chat<'s>(state: &'s AppState, bytes: &[u8]) -> Result<Checked<'s>, ApiError> {
    let request: ChatRequest<'_> = crate::body::parse(bytes)?;
    if request.messages.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`messages` must not be empty").param("messages"));
    }
    let pool_token = pool_token(state, &request.model)?;
    let est_tokens = sluice_core::tenant::estimate_tokens(
        bytes.len(),
        request.max_completion_tokens.or(request.max_tokens),
        state.config.scheduler.default_max_tokens,
    );
    Ok(Checked { model: request.model.into_owned(), pool_token, est_tokens, stream: request.stream == Some(true) })
}

/// The fields of an embeddings request the ingress checks.
#[derive(Deserialize)]
struct EmbeddingsRequest<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    input: serde_json::Value,
}

/// Checks an embeddings body: `input` is a non-empty string or a non-empty
/// array (of strings or of token arrays).
pub fn validate_embeddings<'s>(state: &'s AppState, bytes: &[u8]) -> Result<Checked<'s>, ApiError> {
    let request: EmbeddingsRequest<'_> = crate::body::parse(bytes)?;
    let ok = match &request.input {
        serde_json::Value::String(s) => !s.is_empty(),
        serde_json::Value::Array(items) => !items.is_empty(),
        _ => false,
    };
    if !ok {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "`input` must be a non-empty string or a non-empty array",
        )
        .param("input"));
    }
    let pool_token = pool_token(state, &request.model)?;
    // No output tokens: an embedding costs its input.
    let est_tokens = (bytes.len() as u64).div_ceil(4);
    Ok(Checked { model: request.model.into_owned(), pool_token, est_tokens, stream: false })
}

/// The fields of an Anthropic Messages request the ingress checks.
#[derive(Deserialize)]
struct MessagesRequest<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    messages: Vec<serde::de::IgnoredAny>,
    max_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
}

/// Checks a Messages body: its pool, non-empty `messages`, and the
/// `max_tokens` Anthropic's API requires.
pub fn validate_messages<'s>(state: &'s AppState, bytes: &[u8]) -> Result<Checked<'s>, ApiError> {
    let request: MessagesRequest<'_> = crate::body::parse(bytes)?;
    if request.messages.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`messages` must not be empty").param("messages"));
    }
    let Some(max_tokens) = request.max_tokens.filter(|n| *n > 0) else {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`max_tokens` is required and must be at least 1")
            .param("max_tokens"));
    };
    let pool_token = pool_token(state, &request.model)?;
    let est_tokens =
        sluice_core::tenant::estimate_tokens(bytes.len(), Some(max_tokens), state.config.scheduler.default_max_tokens);
    Ok(Checked { model: request.model.into_owned(), pool_token, est_tokens, stream: request.stream == Some(true) })
}

/// Checks a request body for `endpoint`.
pub fn validate<'s>(state: &'s AppState, endpoint: Endpoint, bytes: &[u8]) -> Result<Checked<'s>, ApiError> {
    match endpoint {
        Endpoint::ChatCompletions => validate_chat(state, bytes),
        Endpoint::Embeddings => validate_embeddings(state, bytes),
        Endpoint::Messages => validate_messages(state, bytes),
    }
}

fn pool_token<'s>(state: &'s AppState, model: &str) -> Result<&'s str, ApiError> {
    state.pool_tokens.get(model).map(String::as_str).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ModelNotFound,
            format!("the model `{model}` does not exist or you do not have access to it"),
        )
        .param("model")
    })
}

/// Publishes the job and waits for JetStream's acknowledgement, then wakes
/// the workers for its queue. `dedup` sets `Nats-Msg-Id` to the job id, for
/// submits that may be repeated.
pub async fn publish(
    state: &AppState,
    subject: String,
    env: &Envelope,
    body: bytes::Bytes,
    dedup: bool,
) -> Result<(), ApiError> {
    let mut headers = env.to_headers();
    if dedup {
        headers.insert(sluice_core::envelope::H_MSG_ID, env.job_id.to_string().as_str());
    }
    let wake = sluice_core::envelope::wake_subject(&subject);
    let ack = state.js.publish_with_headers(subject, headers, body).await.map_err(publish_error)?;
    ack.await.map_err(publish_error)?;
    // A hint only: workers also list the queues every `scheduler.discover_ms`.
    if let Err(error) = state.nats.publish(wake, bytes::Bytes::new()).await {
        tracing::debug!(%error, "could not wake the workers");
    }
    Ok(())
}

pub fn publish_error(e: async_nats::jetstream::context::PublishError) -> ApiError {
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

/// The client's `x-request-id` when it is sane, else the job id.
pub fn request_id(headers: &HeaderMap, job_id: Uuid) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| job_id.to_string(), str::to_owned)
}

/// The client's W3C `traceparent` when well-formed, else a new trace rooted
/// at this request (trace id from the job id).
pub fn traceparent(headers: &HeaderMap, job_id: Uuid) -> String {
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
pub fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
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
