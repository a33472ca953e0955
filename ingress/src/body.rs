//! Reading a JSON request body: content type (415), size (413), time
//! (408), JSON (400).

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use serde::Deserialize;
use sluice_core::error::{ApiError, ErrorCode};

/// Checks the content type and reads at most `limit` bytes of the body
/// within `within`.
pub async fn read_json_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    within: std::time::Duration,
) -> Result<Bytes, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("expected `Content-Type: application/json`, got `{content_type}`"),
        ));
    }
    let too_large =
        || ApiError::new(ErrorCode::PayloadTooLarge, format!("request body is larger than the limit of {limit} bytes"));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let read = tokio::time::timeout(within, axum::body::to_bytes(body, limit)).await.map_err(|_| {
        ApiError::new(
            ErrorCode::RequestTimeout,
            format!("the request body did not arrive within {} ms", within.as_millis()),
        )
    })?;
    read.map_err(|e| {
        // `to_bytes` reports an exceeded limit as a `LengthLimitError` in its source chain.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            source = s.source();
        }
        ApiError::new(ErrorCode::InvalidRequest, "could not read the request body")
    })
}

/// Parses JSON into `T`, naming the position of a syntax error or the field
/// of a type error, the way OpenAI's API does.
pub fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let code = if e.is_data() { ErrorCode::InvalidRequest } else { ErrorCode::InvalidJson };
        let what = if e.is_data() { "invalid request" } else { "request body is not valid JSON" };
        ApiError::new(code, format!("{what}: {e}"))
    })
}
