//! One error-code enum for everything a client can be told, mapped to an HTTP
//! status and a gRPC status, and one error value ([`ApiError`]) that stays
//! structured until the edge: the worker sends its parts on the wire (see
//! [`crate::wire::reply`]) and the ingress renders it once, in the dialect of
//! the route the client called ([`Dialect`]): OpenAI's envelope
//! `{"error":{"message","type","param","code"}}` or Anthropic's
//! `{"type":"error","error":{"type","message"}}`.

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
    /// A streamed answer broke off after events had gone out.
    StreamInterrupted,
    /// The upstream's answer was larger than `upstream.max_response_bytes`.
    UpstreamResponseTooLarge,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 22] = [
        Self::InvalidJson,
        Self::InvalidRequest,
        Self::InvalidApiKey,
        Self::ModelNotFound,
        Self::NotFound,
        Self::Conflict,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::Overloaded,
        Self::QueueFull,
        Self::UpstreamRateLimited,
        Self::TenantRequestRate,
        Self::TenantTokenRate,
        Self::TenantQueuedCap,
        Self::UpstreamError,
        Self::QueueUnavailable,
        Self::Unavailable,
        Self::Timeout,
        Self::RequestTimeout,
        Self::StreamInterrupted,
        Self::UpstreamResponseTooLarge,
        Self::Internal,
    ];

    /// Reads back [`ErrorCode::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The gRPC status code (the numbers of `google.rpc.Code`), for the scaler.
    pub fn grpc_code(self) -> i32 {
        const INVALID_ARGUMENT: i32 = 3;
        const DEADLINE_EXCEEDED: i32 = 4;
        const NOT_FOUND: i32 = 5;
        const FAILED_PRECONDITION: i32 = 9;
        const RESOURCE_EXHAUSTED: i32 = 8;
        const INTERNAL: i32 = 13;
        const UNAVAILABLE: i32 = 14;
        const UNAUTHENTICATED: i32 = 16;
        match self {
            Self::InvalidJson | Self::InvalidRequest | Self::PayloadTooLarge | Self::UnsupportedMediaType => {
                INVALID_ARGUMENT
            }
            Self::InvalidApiKey => UNAUTHENTICATED,
            Self::ModelNotFound | Self::NotFound => NOT_FOUND,
            Self::Conflict => FAILED_PRECONDITION,
            Self::Overloaded
            | Self::QueueFull
            | Self::UpstreamRateLimited
            | Self::TenantRequestRate
            | Self::TenantTokenRate
            | Self::TenantQueuedCap => RESOURCE_EXHAUSTED,
            Self::UpstreamError | Self::QueueUnavailable | Self::Unavailable | Self::StreamInterrupted => UNAVAILABLE,
            Self::Timeout | Self::RequestTimeout => DEADLINE_EXCEEDED,
            Self::Internal | Self::UpstreamResponseTooLarge => INTERNAL,
        }
    }

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
            Self::UpstreamError | Self::StreamInterrupted | Self::UpstreamResponseTooLarge => StatusCode::BAD_GATEWAY,
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
            Self::UpstreamError
            | Self::QueueUnavailable
            | Self::Unavailable
            | Self::Timeout
            | Self::StreamInterrupted
            | Self::UpstreamResponseTooLarge
            | Self::Internal => "server_error",
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
            Self::StreamInterrupted => "stream_interrupted",
            Self::UpstreamResponseTooLarge => "upstream_response_too_large",
            Self::Internal => "internal_error",
        }
    }
}

/// The error envelope a client expects: the one of the API its route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI's routes and Sluice's own (`/v1/jobs`, `/admin`).
    OpenAi,
    /// Anthropic's Messages API (`/v1/messages`).
    Anthropic,
}

/// An error as the client sees it, before it is rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    /// The HTTP status: the code's own, or the provider's for a request the
    /// provider refused.
    pub status: u16,
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
    pub retry_after_secs: Option<u64>,
    /// Set when the request became a job the client can look up later.
    pub job_id: Option<String>,
}

#[derive(Serialize)]
struct OpenAiEnvelope<'a> {
    error: OpenAiBody<'a>,
}

#[derive(Serialize)]
struct OpenAiBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_id: Option<&'a str>,
}

#[derive(Serialize)]
struct AnthropicEnvelope<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: AnthropicBody<'a>,
}

#[derive(Serialize)]
struct AnthropicBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_id: Option<&'a str>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            status: code.status().as_u16(),
            message: message.into(),
            param: None,
            retry_after_secs: None,
            job_id: None,
        }
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
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

    /// Answers with `status` instead of the code's own (a provider's refusal).
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Anthropic's `error.type`: by the code's kind, else by the status.
    fn anthropic_kind(&self) -> &'static str {
        match self.code.kind() {
            "server_error" => "api_error",
            "rate_limit_error" => "rate_limit_error",
            _ => match self.status {
                400 | 409 | 415 | 422 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                503 | 529 => "overloaded_error",
                _ => "api_error",
            },
        }
    }

    /// The error's body in `dialect`'s envelope, as JSON bytes.
    pub fn body(&self, dialect: Dialect) -> Vec<u8> {
        let job_id = self.job_id.as_deref();
        let json = match dialect {
            Dialect::OpenAi => serde_json::to_vec(&OpenAiEnvelope {
                error: OpenAiBody {
                    message: &self.message,
                    kind: self.code.kind(),
                    param: self.param.as_deref(),
                    code: self.code.as_str(),
                    job_id,
                },
            }),
            Dialect::Anthropic => serde_json::to_vec(&AnthropicEnvelope {
                kind: "error",
                error: AnthropicBody { kind: self.anthropic_kind(), message: &self.message, job_id },
            }),
        };
        json.unwrap_or_default()
    }

    /// The whole HTTP answer in `dialect`.
    pub fn render(&self, dialect: Dialect) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut response = (status, self.body(dialect)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // An error that names a job was given after the job was accepted: it
        // still runs, and a resubmit would run it twice. The official SDKs
        // retry a 5xx or a timeout unless told not to by this header.
        if self.job_id.is_some() {
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

/// OpenAI's envelope: Sluice's own APIs answer in it.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.render(Dialect::OpenAi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    #[test]
    fn body_is_openai_shaped() {
        let e = ApiError::new(ErrorCode::ModelNotFound, "model `x` does not exist").param("model");
        let v = json(&e.body(Dialect::OpenAi));
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["message"], "model `x` does not exist");
        assert_eq!(e.status, 404);
    }

    #[test]
    fn anthropic_types_follow_the_code_then_the_status() {
        let kind = |e: ApiError| json(&e.body(Dialect::Anthropic))["error"]["type"].as_str().map(str::to_owned);
        assert_eq!(kind(ApiError::new(ErrorCode::ModelNotFound, "x")).as_deref(), Some("not_found_error"));
        assert_eq!(kind(ApiError::new(ErrorCode::UpstreamError, "x")).as_deref(), Some("api_error"));
        assert_eq!(kind(ApiError::new(ErrorCode::QueueFull, "x")).as_deref(), Some("rate_limit_error"));
        assert_eq!(kind(ApiError::new(ErrorCode::InvalidApiKey, "x")).as_deref(), Some("authentication_error"));
        let refused = ApiError::new(ErrorCode::InvalidRequest, "too long").with_status(413);
        assert_eq!(kind(refused).as_deref(), Some("request_too_large"));
        let v = json(&ApiError::new(ErrorCode::Timeout, "late").job("j1").body(Dialect::Anthropic));
        assert_eq!((v["type"].as_str(), v["error"]["message"].as_str()), (Some("error"), Some("late")));
        assert_eq!(v["error"]["job_id"], "j1");
    }

    #[test]
    fn every_code_reads_back_and_has_a_grpc_status() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            assert!((1..=16).contains(&code.grpc_code()), "{code:?}");
        }
        assert_eq!(ErrorCode::parse("no_such_code"), None);
    }
}
