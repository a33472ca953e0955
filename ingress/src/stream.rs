//! A streamed answer, forwarded to the client as server-sent events while
//! the worker's chunks arrive.
//!
//! Framing follows the client's API: OpenAI's streams are `data:` lines
//! ending with `data: [DONE]`; Anthropic's (`/v1/messages`) name every event
//! (`event: content_block_delta`) and end with `message_stop`, and report a
//! failure as an `error` event with Anthropic's error shape instead of
//! `[DONE]`.
//!
//! The chunks of one answer are numbered from 0 and carry their attempt.
//! The stream ends with `data: [DONE]` when the worker's final message says
//! it finished; with an error event (OpenAI's error envelope, code
//! `stream_interrupted`, then `[DONE]`) when a chunk is missing, when a
//! different attempt starts sending (the worker died mid-stream and the job
//! was run again: what the client already has cannot be taken back), when the
//! provider's stream broke off, when no chunk came for
//! `ingress.stream_chunk_gap_ms`, or when the client read so slowly that
//! `ingress.stream_buffer_chunks` chunks waited for it. While it waits, the
//! stream sends an SSE comment (`: keep-alive`) every
//! `ingress.stream_keepalive_ms`, so that proxies do not cut a long pause. An
//! open stream holds its place in `ingress.max_in_flight`. A client that
//! disconnects stops the forwarding; the worker finishes the call and the
//! ledger records it, but the answer is not stored.

use std::convert::Infallible;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sluice_core::error::{ApiError, Dialect, ErrorCode};
use sluice_core::wire::envelope::Endpoint;
use sluice_core::wire::reply::{Chunk, Outcome, Reply};
use uuid::Uuid;

use crate::replies::Waiter;

/// How a stream waits for its chunks.
struct Pace {
    /// Longest wait for the next chunk (`ingress.stream_chunk_gap_ms`).
    gap: Duration,
    /// How often a waiting stream sends a comment (`ingress.stream_keepalive_ms`).
    keepalive: Duration,
}

impl Pace {
    fn of(c: &sluice_core::config::IngressConfig) -> Self {
        Self {
            gap: Duration::from_millis(c.stream_chunk_gap_ms),
            keepalive: Duration::from_millis(c.stream_keepalive_ms),
        }
    }
}

struct Forward {
    waiter: Waiter,
    first: Option<Chunk>,
    next: u64,
    attempt: u32,
    done: bool,
    dialect: Dialect,
    pace: Pace,
    /// When the last chunk came.
    last: Instant,
    /// The stream's place in `ingress.max_in_flight`, and in the open-streams gauge.
    _held: (OwnedSemaphorePermit, Gauged),
}

/// Counts the stream as open while it lives.
struct Gauged(metrics::Gauge);

impl Gauged {
    fn open() -> Self {
        let gauge = metrics::gauge!(crate::metrics::STREAMS_OPEN);
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

fn event(name: Option<&str>, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 32);
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

impl Forward {
    /// The stream's end after a failure, in the client's dialect.
    fn failed(&self, error: &ApiError) -> Bytes {
        let body = error.body(self.dialect);
        match self.dialect {
            Dialect::Anthropic => event(Some("error"), &body),
            Dialect::OpenAi => {
                let mut out = event(None, &body).to_vec();
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
        }
    }

    fn interrupted(&self, why: &str) -> Bytes {
        self.failed(&ApiError::new(ErrorCode::StreamInterrupted, format!("stream interrupted: {why}")))
    }

    fn finished(&self) -> Bytes {
        match self.dialect {
            Dialect::Anthropic => Bytes::new(),
            Dialect::OpenAi => Bytes::from_static(b"data: [DONE]\n\n"),
        }
    }
}

/// Builds the response from the first chunk; the rest follow as they come.
pub fn response(
    first: Chunk,
    waiter: Waiter,
    job_id: Uuid,
    endpoint: Endpoint,
    state: &crate::state::AppState,
    permit: OwnedSemaphorePermit,
) -> Response {
    let pace = Pace::of(&state.config.ingress);
    let attempt = first.attempt;
    let state = Forward {
        waiter,
        first: Some(first),
        next: 0,
        attempt,
        done: false,
        dialect: endpoint.dialect(),
        pace,
        last: Instant::now(),
        _held: (permit, Gauged::open()),
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let reply = match s.first.take() {
            Some(c) => Reply::Chunk(c),
            None => {
                let left = s.pace.gap.saturating_sub(s.last.elapsed());
                match tokio::time::timeout(s.pace.keepalive.min(left), s.waiter.recv()).await {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        s.done = true;
                        let out = if s.waiter.overflowed() {
                            s.interrupted("the client read the stream too slowly")
                        } else {
                            s.interrupted("the gateway is stopping")
                        };
                        return Some((Ok::<_, Infallible>(out), s));
                    }
                    Err(_) if s.last.elapsed() >= s.pace.gap => {
                        s.done = true;
                        metrics::counter!(crate::metrics::STREAMS_INTERRUPTED, "reason" => "gap").increment(1);
                        let out = s.interrupted("no data from the provider for too long");
                        return Some((Ok(out), s));
                    }
                    Err(_) => return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), s)),
                }
            }
        };
        s.last = Instant::now();
        let chunk = match reply {
            Reply::Chunk(chunk) => chunk,
            Reply::Answer(answer) => {
                s.done = true;
                let out = match &answer.outcome {
                    Outcome::Body { status: 200..=299, .. } | Outcome::Stored { status: 200..=299, .. } => s.finished(),
                    Outcome::Body { .. } | Outcome::Stored { .. } => {
                        metrics::counter!(crate::metrics::STREAMS_INTERRUPTED, "reason" => "upstream").increment(1);
                        s.interrupted("the provider refused the request when it was run again")
                    }
                    Outcome::Error(error) => {
                        metrics::counter!(crate::metrics::STREAMS_INTERRUPTED, "reason" => "upstream").increment(1);
                        s.failed(error)
                    }
                };
                return Some((Ok(out), s));
            }
        };
        if chunk.attempt != s.attempt {
            s.done = true;
            metrics::counter!(crate::metrics::STREAMS_INTERRUPTED, "reason" => "restarted").increment(1);
            let out = s.interrupted("the worker serving it stopped and the request was run again");
            return Some((Ok(out), s));
        }
        if chunk.index != s.next {
            s.done = true;
            metrics::counter!(crate::metrics::STREAMS_INTERRUPTED, "reason" => "gap").increment(1);
            let out = s.interrupted("a chunk was lost");
            return Some((Ok(out), s));
        }
        s.next += 1;
        Some((Ok(event(chunk.event.as_deref(), &chunk.data)), s))
    });
    let mut response = (StatusCode::OK, Body::from_stream(stream)).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&job_id.to_string()) {
        h.insert("x-sluice-job-id", v);
    }
    response
}
