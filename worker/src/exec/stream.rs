//! Streaming an answer through the queue: the worker reads the provider's
//! server-sent events, turns them into the client's API when the two differ
//! (see [`crate::upstream::providers`]), and publishes each event's data, in order, to
//! the waiting ingress as chunks ([`sluice_core::wire::reply::Chunk`], core
//! NATS), which forwards them as they come. The job's final answer then
//! ends the stream. A
//! failure before the stream opened is an ordinary failure (failed over or
//! retried like any other); once events have gone out the stream cannot be
//! replayed, so a failure ends it with an error.

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::event::Usage;
use sluice_core::wire::envelope::Envelope;
use sluice_core::wire::reply::{Chunk, Reply};
use tokio::time::Instant;

use crate::exec::job::JobContext;
use crate::upstream::providers::Event;

/// A relayed stream: the usage it reported, and `error` if it broke off.
pub struct Relayed {
    pub usage: Usage,
    pub error: Option<ApiError>,
}

/// Relays an opened stream to the ingress waiting on `env.reply`, until the
/// provider ends it, `end` passes, or the worker must stop.
pub async fn relay(
    ctx: &JobContext,
    message: &jetstream::Message,
    env: &Envelope,
    opened: crate::upstream::client::Opened,
    attempt: u32,
) -> Relayed {
    let (mut response, end, mut translate) = opened;
    let reply = env.reply.clone().unwrap_or_default();
    let every = ctx.ack_wait / 3;
    let mut progress = tokio::time::interval_at(Instant::now() + every, every);
    let mut pending: Vec<u8> = Vec::new();
    let mut sent: u64 = 0;
    let mut usage = Usage::default();
    let publish = |events: Vec<Event>, sent: &mut u64, usage: &mut Usage| {
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            if let Some(u) = usage_in(e.data.as_bytes()) {
                merge(usage, u);
            }
            let chunk = Chunk { index: *sent, attempt, event: e.name, data: Bytes::from(e.data) };
            let (headers, payload) = Reply::Chunk(chunk).encode();
            *sent += 1;
            out.push(ctx.nats.publish_with_headers(reply.clone(), headers, payload));
        }
        out
    };
    loop {
        let chunk = tokio::select! {
            c = tokio::time::timeout_at(end, response.chunk()) => c,
            _ = progress.tick() => { let _ = message.ack_with(AckKind::Progress).await; continue; }
            _ = ctx.hard_stop.cancelled() => {
                let error = ApiError::new(ErrorCode::Unavailable, "the worker serving this stream stopped");
                return Relayed { usage, error: Some(error) };
            }
        };
        let bytes = match chunk {
            Err(_) => {
                let error = ApiError::new(ErrorCode::Timeout, "the provider's stream did not finish in time");
                return Relayed { usage, error: Some(error) };
            }
            Ok(Err(_)) => {
                let error = ApiError::new(ErrorCode::UpstreamError, "the provider's stream broke off");
                return Relayed { usage, error: Some(error) };
            }
            Ok(Ok(None)) => {
                for p in publish(translate.finish(), &mut sent, &mut usage) {
                    if let Err(error) = p.await {
                        tracing::warn!(%error, "could not publish a stream chunk");
                    }
                }
                return Relayed { usage, error: None };
            }
            Ok(Ok(Some(bytes))) => bytes,
        };
        pending.extend(bytes.iter().filter(|b| **b != b'\r'));
        while let Some(at) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..at + 2).collect();
            let (name, data) = parse_event(&event);
            let Some(data) = data else { continue };
            for p in publish(translate.event(name.as_deref(), &data), &mut sent, &mut usage) {
                if let Err(error) = p.await {
                    tracing::warn!(%error, "could not publish a stream chunk");
                }
            }
        }
    }
}

/// The `event:` name and the joined `data:` lines of one server-sent event.
fn parse_event(event: &[u8]) -> (Option<String>, Option<String>) {
    let text = String::from_utf8_lossy(event);
    let mut name = None;
    let mut data: Option<String> = None;
    for line in text.split('\n') {
        if let Some(v) = line.strip_prefix("event:") {
            name = Some(v.trim_start().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            let v = v.strip_prefix(' ').unwrap_or(v);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(v);
                }
                None => data = Some(v.to_owned()),
            }
        }
    }
    (name, data)
}

/// Usage in an OpenAI chunk (`usage.total_tokens`) or an Anthropic event
/// (`message.usage` on `message_start`, `usage` on `message_delta`).
fn usage_in(data: &[u8]) -> Option<Usage> {
    let v: serde_json::Value = serde_json::from_slice(data).ok()?;
    let u = v.get("usage").or_else(|| v.pointer("/message/usage"))?;
    if u.get("total_tokens").is_some() {
        return serde_json::from_value(u.clone()).ok();
    }
    let count = |k: &str| u.get(k).and_then(serde_json::Value::as_i64).and_then(|n| i32::try_from(n).ok());
    let (input, output) = (count("input_tokens"), count("output_tokens"));
    Some(Usage { prompt_tokens: input, completion_tokens: output, total_tokens: None })
}

/// Keeps what each usage report adds (Anthropic reports input and output
/// tokens in different events).
fn merge(into: &mut Usage, u: Usage) {
    into.prompt_tokens = u.prompt_tokens.or(into.prompt_tokens);
    into.completion_tokens = u.completion_tokens.or(into.completion_tokens);
    into.total_tokens =
        u.total_tokens.or_else(|| Some(into.prompt_tokens.unwrap_or(0) + into.completion_tokens.unwrap_or(0)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_with_their_names() {
        let (name, data) = parse_event(b"event: message_start\ndata: {\"a\":1}\n\n");
        assert_eq!((name.as_deref(), data.as_deref()), (Some("message_start"), Some("{\"a\":1}")));
        let (name, data) = parse_event(b": keep-alive\n\n");
        assert_eq!((name, data), (None, None));
    }

    #[test]
    fn usage_is_summed_over_anthropic_events() {
        let mut usage = Usage::default();
        merge(
            &mut usage,
            usage_in(br#"{"type":"message_start","message":{"usage":{"input_tokens":5,"output_tokens":1}}}"#).unwrap(),
        );
        merge(&mut usage, usage_in(br#"{"type":"message_delta","usage":{"output_tokens":7}}"#).unwrap());
        assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), (Some(5), Some(7), Some(12)));
    }
}
