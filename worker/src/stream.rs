//! Streaming an answer through the queue: the worker reads the provider's
//! server-sent events and publishes each event's data, in order, to the
//! waiting ingress (core NATS, `Sluice-Chunk: <n>`, `Sluice-Attempts`), which
//! forwards them as they come. The job's final reply then carries
//! `Sluice-Stream-End`. A failure before the first event is an ordinary
//! failure (retried like any other); once events have gone out the stream
//! cannot be replayed, so a failure ends it with an error.

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use sluice_core::envelope::{Envelope, H_ATTEMPTS, H_CHUNK};
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::event::Usage;
use tokio::time::Instant;

use crate::job::JobContext;
use crate::upstream::{CallError, Upstream};

pub enum Relayed {
    /// Failed before anything was sent to the client.
    NotStarted(CallError),
    /// The stream went out; `error` if it broke off.
    Finished { usage: Usage, error: Option<ApiError> },
    /// The worker is stopping past its grace period; the job was handed back.
    HandedBack,
}

pub async fn relay(
    ctx: &JobContext,
    message: &jetstream::Message,
    env: &Envelope,
    upstream: &Upstream,
    attempt: u32,
    deadline: Instant,
) -> Relayed {
    let Some(reply) = env.reply.clone() else {
        return Relayed::NotStarted(CallError::Rejected { status: 400, body: Bytes::new() });
    };
    let every = ctx.ack_wait / 3;
    let mut progress = tokio::time::interval_at(Instant::now() + every, every);
    let opened = upstream.call_streaming(env.endpoint, message.payload.clone(), deadline);
    tokio::pin!(opened);
    let (mut response, end) = loop {
        tokio::select! {
            opened = &mut opened => match opened {
                Ok(r) => break r,
                Err(e) => return Relayed::NotStarted(e),
            },
            _ = progress.tick() => { let _ = message.ack_with(AckKind::Progress).await; }
            _ = ctx.hard_stop.cancelled() => {
                let _ = message.ack_with(AckKind::Nak(None)).await;
                return Relayed::HandedBack;
            }
        }
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut sent: u64 = 0;
    let mut usage = Usage::default();
    loop {
        let chunk = tokio::select! {
            c = tokio::time::timeout_at(end, response.chunk()) => c,
            _ = progress.tick() => { let _ = message.ack_with(AckKind::Progress).await; continue; }
            _ = ctx.hard_stop.cancelled() => {
                let error = ApiError::new(ErrorCode::Unavailable, "the worker serving this stream stopped");
                return Relayed::Finished { usage, error: Some(error) };
            }
        };
        let bytes = match chunk {
            Err(_) => {
                let error = ApiError::new(ErrorCode::Timeout, "the provider's stream did not finish in time");
                return Relayed::Finished { usage, error: Some(error) };
            }
            Ok(Err(_)) => {
                let error = ApiError::new(ErrorCode::UpstreamError, "the provider's stream broke off");
                return Relayed::Finished { usage, error: Some(error) };
            }
            Ok(Ok(None)) => return Relayed::Finished { usage, error: None },
            Ok(Ok(Some(bytes))) => bytes,
        };
        pending.extend(bytes.iter().filter(|b| **b != b'\r'));
        while let Some(at) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..at + 2).collect();
            for data in data_lines(&event) {
                if data == b"[DONE]" {
                    continue;
                }
                if let Some(u) = usage_in(data) {
                    usage = u;
                }
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(H_CHUNK, sent.to_string().as_str());
                headers.insert(H_ATTEMPTS, attempt.to_string().as_str());
                if let Err(error) =
                    ctx.nats.publish_with_headers(reply.clone(), headers, Bytes::copy_from_slice(data)).await
                {
                    tracing::warn!(%error, "could not publish a stream chunk");
                }
                sent += 1;
            }
        }
    }
}

/// The `data:` payloads of one server-sent event.
fn data_lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    event.split(|b| *b == b'\n').filter_map(|line| {
        let data = line.strip_prefix(b"data:")?;
        Some(data.strip_prefix(b" ").unwrap_or(data))
    })
}

fn usage_in(data: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct WithUsage {
        usage: Option<Usage>,
    }
    serde_json::from_slice::<WithUsage>(data).ok()?.usage
}

#[cfg(test)]
mod tests {
    use super::data_lines;

    #[test]
    fn data_lines_are_read_from_an_event() {
        let event = b"event: x\ndata: {\"a\":1}\ndata:[DONE]\n\n";
        let lines: Vec<&[u8]> = data_lines(event).collect();
        assert_eq!(lines, vec![&b"{\"a\":1}"[..], &b"[DONE]"[..]]);
    }
}
