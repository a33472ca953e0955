//! Anthropic's Messages API, `POST /v1/messages`: a message quoting the last
//! user turn, or its stream of named events (`message_start`,
//! `content_block_start`, one `content_block_delta` per word, `ping`,
//! `content_block_stop`, `message_delta` with the usage, `message_stop`).
//! Requests must carry `x-api-key` and `anthropic-version`, as Anthropic's do.

use crate::profile::Profile;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::handlers::{InFlight, MockState, before_answer, parse, text_of};
use crate::limiter::Style;

/// Anthropic's error envelope.
pub fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, Json(json!({"type": "error", "error": {"type": kind, "message": message}}))).into_response()
}

pub async fn messages(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let _in_flight = InFlight::enter(&state.stats);
    state.stats.messages.fetch_add(1, Relaxed);
    if !headers.contains_key("x-api-key") {
        return error(StatusCode::UNAUTHORIZED, "authentication_error", "x-api-key header is required");
    }
    if !headers.contains_key("anthropic-version") {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "anthropic-version header is required");
    }
    let gate = before_answer(&state, &body).await;
    if let Some(r) = gate.fault_response(Style::Anthropic) {
        return r;
    }
    let mut r = answer(&state, &body).await;
    gate.headers(&mut r, Style::Anthropic);
    r
}

/// A message, shaped by the model name's profile as chat completions are
/// (`crate::profile`: `tokens`, `token_bytes`, `tps`, `first_ms`, pauses).
async fn answer(state: &MockState, body: &Bytes) -> Response {
    let request = match parse(body) {
        Ok(v) => v,
        Err(_) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", "the body is not JSON"),
    };
    let model = request.get("model").and_then(Value::as_str).unwrap_or("mock").to_owned();
    let Some(messages) = request.get("messages").and_then(Value::as_array).filter(|m| !m.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "messages: field required");
    };
    let Some(max_tokens) = request.get("max_tokens").and_then(Value::as_u64) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "max_tokens: field required");
    };
    let system = request.get("system").map(text_of).unwrap_or_default();
    let prompt_chars: usize =
        system.len() + messages.iter().map(|m| m.get("content").map_or(0, |c| text_of(c).len())).sum::<usize>();
    let input_tokens = (prompt_chars as u64).div_ceil(4).max(1);
    let last = messages.last().and_then(|m| m.get("content")).map(text_of).unwrap_or_default();
    let quoted: String = last.chars().take(200).collect();
    let profile = Profile::of(&model);
    let output_tokens =
        profile.tokens.unwrap_or_else(|| u64::from(state.completion_tokens.load(Relaxed))).min(max_tokens);
    let n = state.stats.ok.load(Relaxed);
    let id = format!("msg_mock_{n}");
    let mut content = format!("mock reply to: {quoted}");
    if profile.tokens.is_some() {
        content.push_str(&format!(" {}", profile.token()).repeat(output_tokens as usize));
    }
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        let delay = Duration::from_millis(state.stream_delay_ms.load(Relaxed));
        return stream(&id, &model, &content, input_tokens, output_tokens, delay, profile);
    }
    // Nothing is sent before the whole message is made.
    let making = profile.generation_time(output_tokens);
    if !making.is_zero() {
        tokio::time::sleep(making).await;
    }
    Json(json!({
        "id": id, "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": content}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}
    }))
    .into_response()
}

fn stream(
    id: &str,
    model: &str,
    content: &str,
    input: u64,
    output: u64,
    delay: Duration,
    profile: Profile,
) -> Response {
    let mut events: Vec<(&str, Value)> = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": id, "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
    ];
    let words: Vec<&str> = content.split(' ').collect();
    for (i, word) in words.iter().enumerate() {
        let text = if i + 1 < words.len() { format!("{word} ") } else { (*word).to_owned() };
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": text}}),
        ));
    }
    events.push(("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    events.push((
        "message_delta",
        json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": output}}),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    let frames: Vec<String> = events.iter().map(|(name, data)| format!("event: {name}\ndata: {data}\n\n")).collect();
    use futures::StreamExt;
    // The text deltas (events 3 to 3 + words) come at the profile's pace.
    let tokens = words.len();
    let body = futures::stream::iter(frames.into_iter().enumerate()).then(move |(i, frame)| {
        let profile = profile.clone();
        async move {
            let mut wait = if i > 0 { delay } else { Duration::ZERO };
            if (3..3 + tokens).contains(&i) {
                wait += profile.before_token(i as u64 - 3);
            }
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            Ok::<_, std::convert::Infallible>(Bytes::from(frame))
        }
    });
    ([(axum::http::header::CONTENT_TYPE, "text/event-stream")], axum::body::Body::from_stream(body)).into_response()
}
