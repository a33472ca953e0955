//! Anthropic's Messages API, `POST /v1/messages`: the same path through the
//! queue as chat completions (sync, streamed or as a job), answered in
//! Anthropic's shapes. A pool's deployments may speak either API; the worker
//! translates. Errors take Anthropic's envelope:
//! `{"type":"error","error":{"type":"invalid_request_error","message":"…"}}`.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

/// Largest error body rewritten into Anthropic's shape.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Anthropic's error type for an HTTP status.
fn kind_of(status: u16) -> &'static str {
    match status {
        400 | 409 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// The Anthropic error type and message of an OpenAI-shaped error body (or
/// of an Anthropic one, passed through from an Anthropic deployment).
pub fn error_parts(body: &[u8]) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let message = v.pointer("/error/message").and_then(|m| m.as_str()).unwrap_or("the request failed").to_owned();
    let kind = match v.get("type").and_then(|t| t.as_str()) {
        // Already Anthropic's shape.
        Some("error") => v.pointer("/error/type").and_then(|t| t.as_str()).unwrap_or("api_error").to_owned(),
        _ => match v.pointer("/error/type").and_then(|t| t.as_str()) {
            Some("server_error") => "api_error".to_owned(),
            Some("rate_limit_error" | "rate_limit_exceeded") => "rate_limit_error".to_owned(),
            _ => String::new(),
        },
    };
    (kind, message)
}

/// Rewrites an error response into Anthropic's envelope, keeping its status
/// and headers.
pub async fn anthropic_error(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_ERROR_BODY).await.unwrap_or_default();
    let (kind, message) = error_parts(&bytes);
    let kind = if kind.is_empty() { kind_of(parts.status.as_u16()).to_owned() } else { kind };
    let out = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(Bytes::from(out.to_string()))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_errors_take_anthropic_types() {
        let e = sluice_core::error::ApiError::new(sluice_core::error::ErrorCode::ModelNotFound, "no such model");
        let (kind, message) = error_parts(&e.body());
        assert_eq!((kind.as_str(), message.as_str()), ("", "no such model"));
        assert_eq!(kind_of(404), "not_found_error");
        let native = br#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#;
        assert_eq!(error_parts(native), ("overloaded_error".to_owned(), "busy".to_owned()));
    }
}
