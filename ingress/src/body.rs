//! Reading a JSON request body: content type (415), size (413), memory
//! held by all bodies at once (429), time (408), JSON (400).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;
use sluice_core::error::{ApiError, ErrorCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The memory request bodies may hold at once in one ingress
/// (`ingress.max_body_memory_bytes`): a body's bytes are taken from it before
/// they are read — all of them at once when the client declares its
/// `Content-Length`, chunk by chunk when it does not — and given back when
/// the handler drops its [`BodyPermit`]. A body that does not fit is refused
/// with 429 at once, before more of it is read: concurrent large bodies
/// cannot exhaust the ingress, and small requests keep being served.
#[derive(Clone)]
pub struct BodyBudget(Arc<Semaphore>);

/// Bytes of the budget held by one request body.
pub struct BodyPermit {
    _held: Option<OwnedSemaphorePermit>,
}

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))))
    }

    fn take(&self, held: &mut Option<OwnedSemaphorePermit>, bytes: usize) -> Result<(), ApiError> {
        let Ok(n) = u32::try_from(bytes) else { return Err(busy()) };
        let permit = self.0.clone().try_acquire_many_owned(n).map_err(|_| busy())?;
        match held {
            Some(p) => p.merge(permit),
            None => *held = Some(permit),
        }
        Ok(())
    }
}

fn busy() -> ApiError {
    metrics::counter!(crate::metrics::BODY_BUDGET_REFUSED).increment(1);
    ApiError::new(ErrorCode::Overloaded, "this gateway is reading too many request bodies at once; retry shortly")
        .retry_after(1)
}

/// Checks the content type and reads at most `limit` bytes of the body
/// within `within`, holding their bytes of `budget`.
pub async fn read_json_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    budget: &BodyBudget,
    within: std::time::Duration,
) -> Result<(Bytes, BodyPermit), ApiError> {
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
    let mut held = None;
    if let Some(n) = declared {
        budget.take(&mut held, n)?;
    }
    let read = async {
        let mut body = body;
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|_| ApiError::new(ErrorCode::InvalidRequest, "could not read the request body"))?;
            let Ok(chunk) = frame.into_data() else { continue };
            len += chunk.len();
            if len > limit {
                return Err(too_large());
            }
            // A body without a declared length takes its bytes as they come
            // (hyper holds a declared one to its length).
            if declared.is_none() {
                budget.take(&mut held, chunk.len())?;
            }
            chunks.push(chunk);
        }
        // Most bodies come in one frame: kept as it is, not copied.
        Ok(if chunks.len() == 1 { chunks.swap_remove(0) } else { Bytes::from(chunks.concat()) })
    };
    let bytes = tokio::time::timeout(within, read).await.map_err(|_| {
        ApiError::new(
            ErrorCode::RequestTimeout,
            format!("the request body did not arrive within {} ms", within.as_millis()),
        )
    })??;
    Ok((bytes, BodyPermit { _held: held }))
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
