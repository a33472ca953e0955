//! Sending bodies kept in the bodies bucket (too large for a NATS message,
//! [`sluice_core::bodies`]) to clients as they are read: a synchronous
//! answer, and a job's record with its stored result spliced in. Either way
//! the ingress holds one chunk at a time, not the body.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::jobstate::JobRecord;
use sluice_core::wire::reply::Answer;
use sluice_core::wire::stored::StoredBody;

use crate::state::AppState;

/// An answer too large for a message, sent on as it is read from the bodies
/// bucket (the ingress holds one chunk of it at a time). Once the whole body
/// went out it is deleted: a synchronous answer is read once, unless the
/// worker stored it as its job's result (`Sluice-Stored`). A successful
/// answer whose client left before the end is kept instead, as its job's
/// result, so the job id the response named (`x-sluice-job-id`) finds it.
pub async fn answer(
    state: &Arc<AppState>,
    answer: &Answer,
    status: u16,
    stored: &StoredBody,
) -> Result<Response, ApiError> {
    let chunks = state.bodies.stream(stored).await.map_err(|error| {
        tracing::warn!(%error, "cannot read a stored answer");
        ApiError::new(ErrorCode::Internal, "the answer was stored but cannot be read")
    })?;
    let keep = (200..300).contains(&status).then(|| Box::new(answer.clone()));
    let mut unsent =
        Unsent { state: state.clone(), name: stored.name.clone(), left: stored.size, keep, job_result: answer.stored };
    let body = Body::from_stream(futures::StreamExt::map(chunks, move |chunk| {
        if let Ok(c) = &chunk {
            unsent.sent(c.len());
        }
        chunk
    }));
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(stored.size));
    Ok(response)
}

/// A stored answer on its way out: `left` bytes not yet handed to the
/// connection. Dropped (the response done, or its client gone), it deletes
/// the body, or keeps a successful one whose client left as its job's result.
struct Unsent {
    state: Arc<AppState>,
    name: String,
    left: u64,
    keep: Option<Box<Answer>>,
    /// The worker stored the answer as its job's result: it stays.
    job_result: bool,
}

impl Unsent {
    // A method, so that the closure owns the whole guard, not a copy of
    // `left` (a closure captures the fields it names).
    fn sent(&mut self, bytes: usize) {
        self.left = self.left.saturating_sub(bytes as u64);
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if self.job_result {
            return;
        }
        let state = self.state.clone();
        match self.keep.take() {
            Some(answer) if self.left > 0 => {
                metrics::counter!(crate::metrics::STORED_ANSWERS_KEPT).increment(1);
                tracing::info!(job_id = %answer.job.job_id, left = self.left, "the client left mid-answer; keeping it as the job's result");
                self.state.tasks.spawn(crate::replies::store_orphan(state.job_state.clone(), answer, None));
            }
            _ => {
                let name = std::mem::take(&mut self.name);
                self.state.tasks.spawn(async move { state.bodies.delete(&name).await });
            }
        }
    }
}

/// The record with its result read from the bodies bucket as the response
/// goes out: the record's JSON, then `"result":` and the stored answer (JSON,
/// checked by the worker before it stored it), then the closing brace.
pub async fn job_with_result(state: &AppState, record: &JobRecord, stored: &StoredBody) -> Result<Response, ApiError> {
    let mut head = serde_json::to_vec(&record.public())
        .map_err(|_| ApiError::new(ErrorCode::Internal, "cannot encode the job's state"))?;
    if head.pop() != Some(b'}') {
        return Err(ApiError::new(ErrorCode::Internal, "cannot encode the job's state"));
    }
    head.extend_from_slice(b",\"result\":");
    let chunks = state.bodies.stream(stored).await.map_err(|error| {
        tracing::warn!(%error, job_id = %record.id, "cannot read a stored job result");
        ApiError::new(ErrorCode::Internal, "the job's result is stored but cannot be read; retry shortly")
            .retry_after(1)
    })?;
    let length = head.len() as u64 + stored.size + 1;
    let parts = futures::stream::once(async move { Ok(Bytes::from(head)) })
        .chain(chunks)
        .chain(futures::stream::once(async { Ok(Bytes::from_static(b"}")) }));
    let mut response = (StatusCode::OK, Body::from_stream(parts)).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok(response)
}
