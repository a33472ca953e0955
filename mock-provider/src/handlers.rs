//! The mock's routes. State is atomics only: no lock on the request path
//! (except the rate limiter's log, when a limit is set, and the injected
//! `Retry-After`, read only for an injected failure).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::limiter::{Style, Verdict};
use crate::profile::Profile;
use crate::settings::{Faults, Settings};

pub struct MockState {
    latency_ms: AtomicU64,
    pub(crate) completion_tokens: AtomicU32,
    embedding_dim: AtomicU64,
    rpm: AtomicU64,
    tpm: AtomicU64,
    error_rate_bits: AtomicU64,
    hang_rate_bits: AtomicU64,
    fail_next: AtomicU64,
    hang_next: AtomicU64,
    error_status: AtomicU64,
    hang_ms: AtomicU64,
    pub(crate) stream_delay_ms: AtomicU64,
    retry_after: std::sync::Mutex<Option<String>>,
    limiter: crate::limiter::Limiter,
    rng: AtomicU64,
    pub(crate) stats: Stats,
}

#[derive(Default)]
pub(crate) struct Stats {
    requests: AtomicU64,
    pub(crate) ok: AtomicU64,
    errors: AtomicU64,
    rate_limited: AtomicU64,
    /// Anthropic Messages requests.
    pub(crate) messages: AtomicU64,
    hangs: AtomicU64,
    /// Chat completions being answered now, and the most at once so far.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
}

/// Counts a chat completion as in flight while it lives.
pub(crate) struct InFlight<'a>(&'a Stats);

impl<'a> InFlight<'a> {
    pub(crate) fn enter(stats: &'a Stats) -> Self {
        let now = stats.in_flight.fetch_add(1, Relaxed) + 1;
        stats.peak_in_flight.fetch_max(now, Relaxed);
        Self(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl MockState {
    pub fn new(settings: Settings) -> Self {
        let state = Self {
            latency_ms: AtomicU64::new(0),
            completion_tokens: AtomicU32::new(0),
            embedding_dim: AtomicU64::new(0),
            rpm: AtomicU64::new(0),
            tpm: AtomicU64::new(0),
            error_rate_bits: AtomicU64::new(0),
            hang_rate_bits: AtomicU64::new(0),
            fail_next: AtomicU64::new(0),
            hang_next: AtomicU64::new(0),
            error_status: AtomicU64::new(500),
            hang_ms: AtomicU64::new(600_000),
            stream_delay_ms: AtomicU64::new(0),
            retry_after: std::sync::Mutex::new(None),
            limiter: crate::limiter::Limiter::default(),
            rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
            stats: Stats::default(),
        };
        state.apply(&settings);
        state
    }

    fn apply(&self, s: &Settings) {
        self.latency_ms.store(s.latency_ms, Relaxed);
        self.completion_tokens.store(s.completion_tokens, Relaxed);
        self.embedding_dim.store(s.embedding_dim as u64, Relaxed);
        self.apply_faults(&s.faults);
    }

    fn apply_faults(&self, f: &Faults) {
        self.rpm.store(f.rpm, Relaxed);
        self.tpm.store(f.tpm, Relaxed);
        self.error_rate_bits.store(f.error_rate.to_bits(), Relaxed);
        self.hang_rate_bits.store(f.hang_rate.to_bits(), Relaxed);
        self.fail_next.store(f.fail_next, Relaxed);
        self.hang_next.store(f.hang_next, Relaxed);
        self.error_status.store(if f.error_status == 0 { 500 } else { u64::from(f.error_status) }, Relaxed);
        self.hang_ms.store(if f.hang_ms == 0 { 600_000 } else { f.hang_ms }, Relaxed);
        self.stream_delay_ms.store(f.stream_delay_ms, Relaxed);
        *self.retry_after.lock().unwrap_or_else(|p| p.into_inner()) = f.retry_after.clone();
    }

    /// A uniform number in [0, 1) from a shared xorshift state.
    fn random(&self) -> f64 {
        let mut x = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed);
        x ^= x >> 30;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 27;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn take_one(counter: &AtomicU64) -> bool {
        counter.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)).is_ok()
    }
}

/// Largest request body the mock reads.
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

pub fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/messages", post(crate::anthropic::messages))
        .route("/v1/models", get(models))
        .route("/_mock/faults", post(set_faults))
        .route("/_mock/stats", get(stats))
        .route("/healthz", get(|| async { "ok" }))
        // Providers take long contexts and images: OpenAI up to tens of MB.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(state)
}

pub(crate) enum Fault {
    None,
    Error(StatusCode),
    RateLimited,
}

/// What happens to a request before it is answered: its fault (if any) and
/// the rate limiter's state for the answer's headers.
pub(crate) struct Gate {
    pub fault: Fault,
    pub rate: Option<Verdict>,
    /// `Retry-After` of an injected failure.
    pub retry_after: Option<String>,
}

/// A request's tokens as the limiter counts them on arrival: its body's
/// length / 4 plus the output it may ask for (`max_tokens`, else the mock's
/// `completion_tokens`).
fn request_tokens(state: &MockState, body: &Bytes) -> u64 {
    #[derive(serde::Deserialize)]
    struct Max {
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
    }
    let max = serde_json::from_slice::<Max>(body).ok().and_then(|m| m.max_completion_tokens.or(m.max_tokens));
    (body.len() as u64).div_ceil(4) + max.unwrap_or_else(|| u64::from(state.completion_tokens.load(Relaxed)))
}

/// Counts the request, applies the rate limit and latency, and decides
/// which fault (if any) it meets.
pub(crate) async fn before_answer(state: &MockState, body: &Bytes) -> Gate {
    state.stats.requests.fetch_add(1, Relaxed);
    let (rpm, tpm) = (state.rpm.load(Relaxed), state.tpm.load(Relaxed));
    let rate = (rpm > 0 || tpm > 0).then(|| state.limiter.check(rpm, tpm, request_tokens(state, body)));
    if rate.is_some_and(|v| !v.allowed) {
        state.stats.rate_limited.fetch_add(1, Relaxed);
        return Gate { fault: Fault::RateLimited, rate, retry_after: None };
    }
    let hang =
        MockState::take_one(&state.hang_next) || state.random() < f64::from_bits(state.hang_rate_bits.load(Relaxed));
    if hang {
        state.stats.hangs.fetch_add(1, Relaxed);
        tokio::time::sleep(Duration::from_millis(state.hang_ms.load(Relaxed))).await;
    }
    let latency = state.latency_ms.load(Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let fail =
        MockState::take_one(&state.fail_next) || state.random() < f64::from_bits(state.error_rate_bits.load(Relaxed));
    if fail {
        state.stats.errors.fetch_add(1, Relaxed);
        let status =
            StatusCode::from_u16(state.error_status.load(Relaxed) as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = state.retry_after.lock().unwrap_or_else(|p| p.into_inner()).clone();
        return Gate { fault: Fault::Error(status), rate, retry_after };
    }
    state.stats.ok.fetch_add(1, Relaxed);
    Gate { fault: Fault::None, rate, retry_after: None }
}

impl Gate {
    /// The error answer of a faulted request, in the provider's style.
    pub(crate) fn fault_response(&self, style: Style) -> Option<Response> {
        let mut r = match (&self.fault, style) {
            (Fault::None, _) => return None,
            (Fault::Error(status), Style::OpenAi) => error(*status, "server_error", "injected failure"),
            (Fault::Error(status), Style::Anthropic) => {
                crate::anthropic::error(*status, "api_error", "injected failure")
            }
            (Fault::RateLimited, Style::OpenAi) => {
                error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", "rate limit reached for requests")
            }
            (Fault::RateLimited, Style::Anthropic) => {
                crate::anthropic::error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "rate limit reached")
            }
        };
        self.headers(&mut r, style);
        if let Some(v) = self.retry_after.as_deref().and_then(|v| axum::http::HeaderValue::from_str(v).ok()) {
            r.headers_mut().insert("retry-after", v);
        }
        Some(r)
    }

    /// Adds the rate-limit headers to an answer.
    pub(crate) fn headers(&self, r: &mut Response, style: Style) {
        if let Some(v) = &self.rate {
            v.headers(r.headers_mut(), style);
        }
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    (status, Json(json!({"error": {"message": message, "type": kind, "param": null, "code": code}}))).into_response()
}

pub(crate) fn parse(body: &Bytes) -> Result<Value, Box<Response>> {
    serde_json::from_slice::<Value>(body)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, "invalid_json", &format!("invalid JSON: {e}"))))
}

pub(crate) fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p.get("text")?.as_str()).collect::<Vec<_>>().join(" "),
        _ => String::new(),
    }
}

async fn chat(State(state): State<Arc<MockState>>, _headers: HeaderMap, body: Bytes) -> Response {
    let _in_flight = InFlight::enter(&state.stats);
    let gate = before_answer(&state, &body).await;
    if let Some(r) = gate.fault_response(Style::OpenAi) {
        return r;
    }
    let mut r = chat_answer(&state, body).await;
    gate.headers(&mut r, Style::OpenAi);
    r
}

async fn chat_answer(state: &MockState, body: Bytes) -> Response {
    let request = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let model = request.get("model").and_then(Value::as_str).unwrap_or("mock");
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "`messages` is required");
    };
    let prompt_chars: usize = messages.iter().map(|m| m.get("content").map_or(0, |c| text_of(c).len())).sum();
    let prompt_tokens = (prompt_chars as u64).div_ceil(4).max(1);
    let last = messages.last().and_then(|m| m.get("content")).map(text_of).unwrap_or_default();
    let quoted: String = last.chars().take(200).collect();
    let profile = Profile::of(model);
    let mut completion_tokens = profile.tokens.unwrap_or_else(|| u64::from(state.completion_tokens.load(Relaxed)));
    if let Some(max) = request.get("max_tokens").or(request.get("max_completion_tokens")).and_then(Value::as_u64) {
        completion_tokens = completion_tokens.min(max);
    }
    let n = state.stats.ok.load(Relaxed);
    let mut content = format!("mock reply to: {quoted}");
    if profile.tokens.is_some() {
        content.push_str(&format!(" {}", profile.token()).repeat(completion_tokens as usize));
    }
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens
    });
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        let with_usage = request.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
        let delay = Duration::from_millis(state.stream_delay_ms.load(Relaxed));
        let id = format!("chatcmpl-mock-{n}");
        return stream_answer(&id, model, &content, with_usage.then_some(usage), delay, profile);
    }
    // Like a real provider, nothing is sent before the whole answer is made.
    // (Not a zero sleep: that still waits for the timer's next tick, 1 ms.)
    let making = profile.generation_time(completion_tokens);
    if !making.is_zero() {
        tokio::time::sleep(making).await;
    }
    if let Some(bytes) = profile.bytes {
        return large_answer(&format!("chatcmpl-mock-{n}"), model, bytes, &usage);
    }
    Json(json!({
        "id": format!("chatcmpl-mock-{n}"),
        "object": "chat.completion",
        "created": 1_700_000_000u64,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
            "logprobs": null
        }],
        "usage": usage
    }))
    .into_response()
}

/// A chat completion as OpenAI streams it: server-sent events of
/// `chat.completion.chunk` objects (the role, then one per word, then the
/// finish reason, then the usage if asked for), ending with `data: [DONE]`.
/// Each event is made as it is sent (a stream of a million tokens holds one
/// in memory), after `delay` and the profile's pace.
fn stream_answer(
    id: &str,
    model: &str,
    content: &str,
    usage: Option<Value>,
    delay: Duration,
    profile: Profile,
) -> Response {
    let (id, model) = (id.to_owned(), model.to_owned());
    let chunk = move |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000u64, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let words: Vec<String> = content.split(' ').map(str::to_owned).collect();
    let tokens = words.len();
    let first = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
    let mut last = vec![chunk(json!({}), json!("stop"))];
    if let Some(usage) = usage {
        let mut with_usage = chunk(json!({}), Value::Null);
        with_usage["choices"] = json!([]);
        with_usage["usage"] = usage;
        last.push(with_usage);
    }
    let frame = move |i: usize| -> Option<String> {
        match i {
            0 => Some(format!("data: {first}\n\n")),
            i if i <= tokens => {
                let word = &words[i - 1];
                let text = if i < tokens { format!("{word} ") } else { word.clone() };
                Some(format!("data: {}\n\n", chunk(json!({"content": text}), Value::Null)))
            }
            i if i <= tokens + last.len() => Some(format!("data: {}\n\n", last[i - tokens - 1])),
            i if i == tokens + last.len() + 1 => Some("data: [DONE]\n\n".to_owned()),
            _ => None,
        }
    };
    let body = futures::stream::unfold((0usize, frame, profile), move |(i, frame, profile)| async move {
        let out = frame(i)?;
        let mut wait = if i > 0 { delay } else { Duration::ZERO };
        if (1..=tokens).contains(&i) {
            wait += profile.before_token(i as u64 - 1);
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(out)), (i + 1, frame, profile)))
    });
    ([(axum::http::header::CONTENT_TYPE, "text/event-stream")], axum::body::Body::from_stream(body)).into_response()
}

/// A chat completion whose content is `bytes` bytes long, sent with its
/// `Content-Length` piece by piece as it is produced (never whole in memory).
fn large_answer(id: &str, model: &str, bytes: u64, usage: &Value) -> Response {
    const PIECE: u64 = 64 * 1024;
    let head = format!(
        "{{\"id\":{},\"object\":\"chat.completion\",\"created\":1700000000,\"model\":{},\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"",
        json!(id),
        json!(model)
    );
    let tail = format!("\"}},\"finish_reason\":\"stop\",\"logprobs\":null}}],\"usage\":{usage}}}");
    let length = head.len() as u64 + bytes + tail.len() as u64;
    let filler = Bytes::from(vec![b'x'; PIECE as usize]);
    let pieces = (0..bytes.div_ceil(PIECE)).map(move |i| filler.slice(..(bytes - i * PIECE).min(PIECE) as usize));
    let body = futures::stream::iter(
        std::iter::once(Bytes::from(head))
            .chain(pieces)
            .chain(std::iter::once(Bytes::from(tail)))
            .map(Ok::<_, std::convert::Infallible>),
    );
    let mut r = axum::body::Body::from_stream(body).into_response();
    let h = r.headers_mut();
    h.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
    h.insert(axum::http::header::CONTENT_LENGTH, axum::http::HeaderValue::from(length));
    r
}

/// OpenAI's embeddings: one vector per input, as long as the model's (1,536
/// for `text-embedding-3-small` and `text-embedding-ada-002`, 3,072 for
/// `text-embedding-3-large`, `embedding_dim` for any other model) or as the
/// request's `dimensions` asks (at most 3,072). Every number has ten
/// decimals, as a real provider's do, so answers have real sizes: 2,048
/// inputs of 1,536 dimensions are about 43 MB. The body is written straight
/// into one buffer (no JSON tree of millions of numbers).
async fn embeddings(State(state): State<Arc<MockState>>, body: Bytes) -> Response {
    let gate = before_answer(&state, &body).await;
    if let Some(r) = gate.fault_response(Style::OpenAi) {
        return r;
    }
    let request = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let model = request.get("model").and_then(Value::as_str).unwrap_or("mock-embedding").to_owned();
    let inputs: Vec<&str> = match request.get("input") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items.iter().map(|v| v.as_str().unwrap_or_default()).collect(),
        _ => {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "`input` is required");
        }
    };
    let dim = match request.get("dimensions").map(Value::as_u64) {
        None => match model.as_str() {
            "text-embedding-3-large" => MAX_DIMENSIONS,
            "text-embedding-3-small" | "text-embedding-ada-002" => 1536,
            _ => state.embedding_dim.load(Relaxed) as usize,
        },
        Some(Some(n @ 1..=3072)) => n as usize,
        Some(_) => return error(StatusCode::BAD_REQUEST, "invalid_request", "`dimensions` must be 1 to 3072"),
    };
    let mut out = Vec::with_capacity(64 + inputs.len() * (dim * 13 + 48));
    out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    let mut tokens = 0u64;
    for (i, text) in inputs.iter().enumerate() {
        tokens += (text.len() as u64).div_ceil(4).max(1);
        let seed = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("{{\"object\":\"embedding\",\"index\":{i},\"embedding\":[").as_bytes());
        let mut x = seed | 1;
        for d in 0..dim {
            // xorshift: a number in (-1, 1) with ten decimals.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = x % 10_000_000_000;
            let sign = if x & (1 << 40) == 0 { "" } else { "-" };
            if d > 0 {
                out.push(b',');
            }
            out.extend_from_slice(format!("{sign}0.{n:010}").as_bytes());
        }
        out.extend_from_slice(b"]}");
    }
    let tail = json!({"prompt_tokens": tokens, "total_tokens": tokens});
    out.extend_from_slice(format!("],\"model\":{},\"usage\":{tail}}}", json!(model)).as_bytes());
    ([(axum::http::header::CONTENT_TYPE, "application/json")], out).into_response()
}

/// The longest vectors a model gives (`text-embedding-3-large`).
const MAX_DIMENSIONS: usize = 3072;

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "sluice-mock"}]}),
    )
}

async fn set_faults(State(state): State<Arc<MockState>>, body: Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => {
            state.apply_faults(&f);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, "invalid_faults", &e.to_string()),
    }
}

async fn stats(State(state): State<Arc<MockState>>) -> Json<Value> {
    let s = &state.stats;
    Json(json!({
        "requests": s.requests.load(Relaxed),
        "ok": s.ok.load(Relaxed),
        "errors": s.errors.load(Relaxed),
        "rate_limited": s.rate_limited.load(Relaxed),
        "messages": s.messages.load(Relaxed),
        "hangs": s.hangs.load(Relaxed),
        "peak_in_flight": s.peak_in_flight.load(Relaxed),
    }))
}
