//! One error-code enum for everything a client can be told, mapped to an HTTP
//! status and to OpenAI's error envelope `{"error":{"message","type","param","code"}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidJson,
    InvalidRequest,
    InvalidApiKey,
    ModelNotFound,
    NotFound,
    /// The request conflicts with the resource's state (409).
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    /// This ingress has too many requests waiting.
    Overloaded,
    /// The jobs queue is at its configured bound.
    QueueFull,
    /// The upstream provider kept answering 429.
    UpstreamRateLimited,
    /// The tenant is over its requests-per-minute limit.
    TenantRequestRate,
    /// The tenant is over its tokens-per-minute limit.
    TenantTokenRate,
    /// The tenant has as many jobs queued as it may.
    TenantQueuedCap,
    /// The upstream provider failed (5xx, reset) after every retry.
    UpstreamError,
    /// NATS (the queue) cannot be reached.
    QueueUnavailable,
    /// Postgres or another dependency is not ready.
    Unavailable,
    Timeout,
    /// The client did not send its request body in time (408).
    RequestTimeout,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidJson | Self::InvalidRequest => StatusCode::BAD_REQUEST,
            Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound | Self::NotFound => StatusCode::NOT_FOUND,
            Self::Conflict => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Overloaded
            | Self::QueueFull
            | Self::UpstreamRateLimited
            | Self::TenantRequestRate
            | Self::TenantTokenRate
            | Self::TenantQueuedCap => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamError => StatusCode::BAD_GATEWAY,
            Self::QueueUnavailable | Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(self) -> &'static str {
        match self {
            Self::InvalidJson
            | Self::InvalidRequest
            | Self::ModelNotFound
            | Self::NotFound
            | Self::Conflict
            | Self::PayloadTooLarge
            | Self::UnsupportedMediaType
            | Self::RequestTimeout => "invalid_request_error",
            Self::InvalidApiKey => "authentication_error",
            Self::Overloaded
            | Self::QueueFull
            | Self::UpstreamRateLimited
            | Self::TenantRequestRate
            | Self::TenantTokenRate
            | Self::TenantQueuedCap => "rate_limit_error",
            Self::UpstreamError | Self::QueueUnavailable | Self::Unavailable | Self::Timeout | Self::Internal => {
                "server_error"
            }
        }
    }

    /// OpenAI's `error.code`, also the `reason` label of failure metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidApiKey => "invalid_api_key",
            Self::ModelNotFound => "model_not_found",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Overloaded => "gateway_overloaded",
            Self::QueueFull => "queue_full",
            Self::UpstreamRateLimited => "upstream_rate_limited",
            Self::TenantRequestRate => "rate_limit_requests",
            Self::TenantTokenRate => "rate_limit_tokens",
            Self::TenantQueuedCap => "queued_jobs_limit",
            Self::UpstreamError => "upstream_error",
            Self::QueueUnavailable => "queue_unavailable",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::RequestTimeout => "request_timeout",
            Self::Internal => "internal_error",
        }
    }
}

/// An error as the client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub retry_after_secs: Option<u64>,
    /// Set when the request became a job the client can look up later.
    pub job_id: Option<String>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'static str>,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_id: Option<&'a str>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), param: None, retry_after_secs: None, job_id: None }
    }

    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn job(mut self, job_id: impl Into<String>) -> Self {
        self.job_id = Some(job_id.into());
        self
    }

    /// The OpenAI error envelope as JSON bytes.
    pub fn body(&self) -> Vec<u8> {
        let envelope = Envelope {
            error: Body {
                message: &self.message,
                kind: self.code.kind(),
                param: self.param,
                code: self.code.as_str(),
                job_id: self.job_id.as_deref(),
            },
        };
        serde_json::to_vec(&envelope).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.code.status(), self.body()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let e = ApiError::new(ErrorCode::ModelNotFound, "model `x` does not exist").param("model");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap_or_default();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["message"], "model `x` does not exist");
        assert_eq!(e.code.status(), StatusCode::NOT_FOUND);
    }
}
