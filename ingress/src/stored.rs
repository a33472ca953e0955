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
use sluice_core::wire::stored::StoredBody;

use crate::state::AppState;

/// An answer too large for a message, sent on as it is read from the bodies
/// bucket (the ingress holds one chunk of it at a time) and deleted once the
/// response is done with it, sent or not: a synchronous answer is read once.
pub async fn answer(state: &Arc<AppState>, status: u16, stored: &StoredBody) -> Result<Response, ApiError> {
    let chunks = state.bodies.stream(stored).await.map_err(|error| {
        tracing::warn!(%error, "cannot read a stored answer");
        ApiError::new(ErrorCode::Internal, "the answer was stored but cannot be read")
    })?;
    let cleanup = DeleteWhenDropped(state.clone(), stored.name.clone());
    let body = Body::from_stream(futures::StreamExt::map(chunks, move |chunk| {
        let _ = &cleanup;
        chunk
    }));
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(stored.size));
    Ok(response)
}

struct DeleteWhenDropped(Arc<AppState>, String);

impl Drop for DeleteWhenDropped {
    fn drop(&mut self) {
        let (state, name) = (self.0.clone(), std::mem::take(&mut self.1));
        self.0.tasks.spawn(async move { state.bodies.delete(&name).await });
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
