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
//! provider's stream broke off, or when no chunk came for [`CHUNK_GAP`]. A
//! client that disconnects stops the forwarding; the worker finishes the call
//! and the ledger records it, but the answer is not stored.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sluice_core::envelope::Endpoint;
use uuid::Uuid;

use crate::replies::{Reply, Waiter};

/// Longest wait for the next chunk.
pub const CHUNK_GAP: Duration = Duration::from_secs(60);

struct Forward {
    waiter: Waiter,
    first: Option<Reply>,
    next: u64,
    attempt: Option<u64>,
    done: bool,
    anthropic: bool,
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
    /// The stream's end after a failure whose OpenAI-shaped error is `error`.
    fn failed(&self, error: &[u8]) -> Bytes {
        if self.anthropic {
            let (kind, message) = super::messages::error_parts(error);
            let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
            return event(Some("error"), body.to_string().as_bytes());
        }
        let mut out = event(None, error).to_vec();
        out.extend_from_slice(b"data: [DONE]\n\n");
        Bytes::from(out)
    }

    fn interrupted(&self, why: &str) -> Bytes {
        let error = serde_json::json!({"error": {"message": format!("stream interrupted: {why}"),
            "type": "server_error", "param": null, "code": "stream_interrupted"}});
        self.failed(error.to_string().as_bytes())
    }

    fn finished(&self) -> Bytes {
        if self.anthropic { Bytes::new() } else { Bytes::from_static(b"data: [DONE]\n\n") }
    }
}

/// Builds the response from the first chunk; the rest follow as they come.
pub fn response(first: Reply, waiter: Waiter, job_id: Uuid, endpoint: Endpoint) -> Response {
    let attempt = first.attempt;
    let anthropic = endpoint == Endpoint::Messages;
    let state = Forward { waiter, first: Some(first), next: 0, attempt, done: false, anthropic };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let reply = match s.first.take() {
            Some(r) => r,
            None => match tokio::time::timeout(CHUNK_GAP, s.waiter.recv()).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    s.done = true;
                    let out = s.interrupted("the gateway is stopping");
                    return Some((Ok::<_, Infallible>(out), s));
                }
                Err(_) => {
                    s.done = true;
                    metrics::counter!(crate::metrics::STREAMS_INTERRUPTED, "reason" => "gap").increment(1);
                    let out = s.interrupted("no data from the provider for too long");
                    return Some((Ok(out), s));
                }
            },
        };
        if reply.end {
            s.done = true;
            if (200..300).contains(&reply.status) {
                let out = s.finished();
                return Some((Ok(out), s));
            }
            metrics::counter!(crate::metrics::STREAMS_INTERRUPTED, "reason" => "upstream").increment(1);
            let out = s.failed(&reply.body);
            return Some((Ok(out), s));
        }
        if reply.attempt != s.attempt {
            s.done = true;
            metrics::counter!(crate::metrics::STREAMS_INTERRUPTED, "reason" => "restarted").increment(1);
            let out = s.interrupted("the worker serving it stopped and the request was run again");
            return Some((Ok(out), s));
        }
        if reply.chunk != Some(s.next) {
            s.done = true;
            metrics::counter!(crate::metrics::STREAMS_INTERRUPTED, "reason" => "gap").increment(1);
            let out = s.interrupted("a chunk was lost");
            return Some((Ok(out), s));
        }
        s.next += 1;
        Some((Ok(event(reply.event.as_deref(), &reply.body)), s))
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
