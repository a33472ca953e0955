//! One deployment's HTTP calls: a pooled client per base URL, timeouts from
//! `[upstream]`, the provider's request and answer shapes, and a
//! classification of failures into "the request's fault" (returned to the
//! client at once) and "retryable" (5xx, 408, 429, resets, timeouts).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use sluice_core::config::{ConfigError, DeploymentConfig, UpstreamConfig, ms};
use sluice_core::event::Usage;
use sluice_core::wire::envelope::Endpoint;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::upstream::providers::translate::TranslateError;
use crate::upstream::providers::{Provider, RateInfo, StreamRelay};

/// A call that ended without a usable answer.
#[derive(Debug)]
pub enum CallError {
    /// The upstream refused the request itself (4xx other than 408/429):
    /// retrying cannot help. `native` when the provider speaks the client's
    /// API, so its body can reach the client as it came.
    Rejected { status: u16, body: Bytes, native: bool },
    /// The request cannot be put to this provider (the client gets a 400).
    Unsupported(TranslateError),
    /// A failure that another attempt may not meet.
    Retryable { reason: &'static str, status: Option<u16>, retry_after: Option<Duration> },
    /// The request was sent and the call ran out of time (or its answer
    /// broke off) before the whole answer came: the provider may have done,
    /// and billed, the work. Repeated only within
    /// `upstream.max_unanswered_repeats`, never handed back to the queue.
    Unanswered { reason: &'static str },
    /// The job's deadline passed during the call.
    DeadlineExceeded,
    /// The answer was larger than `upstream.max_response_bytes` (not read further).
    TooLarge { limit: usize },
}

impl CallError {
    /// The failure says the deployment is unwell (counts toward its breaker).
    pub fn is_unhealthy(&self) -> bool {
        matches!(self, CallError::Retryable { status, .. } if *status != Some(429))
            || matches!(self, CallError::Unanswered { .. })
    }
}

/// An opened stream: the response, when the whole call must be over, and
/// the relay that turns its events into the client's API.
pub type Opened = (reqwest::Response, Instant, Box<dyn StreamRelay>);

#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
    /// The tokens the answer reports (all unknown when it reports none).
    pub usage: Usage,
    /// Whether the body is JSON (found by the same parse as `usage`).
    pub json: bool,
    /// The body's share of the worker's answer budget, until the answer is done with.
    pub held: Held,
}

/// A share of the worker's answer budget (`upstream.max_response_memory_bytes`),
/// in KiB; given back when dropped.
#[derive(Debug, Default)]
pub struct Held(Option<OwnedSemaphorePermit>);

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            metrics::gauge!(crate::metrics::ANSWER_MEMORY).decrement(p.num_permits() as f64 * 1024.0);
        }
    }
}

/// The worker's budget for the answers it holds at once, in KiB.
pub type AnswerBudget = Arc<Semaphore>;

pub fn answer_budget(settings: &UpstreamConfig) -> AnswerBudget {
    Arc::new(Semaphore::new(kib(settings.max_response_memory_bytes) as usize))
}

/// Answers up to this size are read without taking from the budget (a
/// worker's slots bound them): the budget is for the large ones.
const UNBUDGETED: usize = 1 << 20;

fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// Takes `bytes` from the budget, waiting for room (counted) when there is none.
async fn take(budget: &AnswerBudget, bytes: usize) -> Option<Held> {
    let n = kib(bytes);
    let permit = match budget.clone().try_acquire_many_owned(n) {
        Ok(p) => p,
        Err(_) => {
            metrics::counter!(crate::metrics::ANSWER_BUDGET_WAITS).increment(1);
            budget.clone().acquire_many_owned(n).await.ok()?
        }
    };
    metrics::gauge!(crate::metrics::ANSWER_MEMORY).increment(f64::from(n) * 1024.0);
    Some(Held(Some(permit)))
}

impl Held {
    /// Gives back what is held beyond `bytes`.
    fn keep(&mut self, bytes: usize) {
        if let Some(permit) = self.0.as_mut()
            && let Some(surplus) = permit.split(permit.num_permits().saturating_sub(kib(bytes) as usize))
        {
            metrics::gauge!(crate::metrics::ANSWER_MEMORY).decrement(surplus.num_permits() as f64 * 1024.0);
        }
    }
}

/// Bodies longer than this are parsed on a blocking thread, so that the
/// runtime's threads (and the job's in-progress acks) are not held up.
const PARSE_INLINE_BYTES: usize = 256 * 1024;

impl Answer {
    /// Reads the answer's usage and checks that it is JSON, in one parse.
    async fn new(status: u16, body: Bytes, held: Held) -> Self {
        #[derive(serde::Deserialize)]
        struct WithUsage {
            usage: Option<Usage>,
        }
        let parse = |body: &[u8]| serde_json::from_slice::<WithUsage>(body).ok().map(|w| w.usage.unwrap_or_default());
        let parsed = if body.len() <= PARSE_INLINE_BYTES {
            parse(&body)
        } else {
            let bytes = body.clone();
            tokio::task::spawn_blocking(move || parse(&bytes)).await.ok().flatten()
        };
        Self { status, json: parsed.is_some(), usage: parsed.unwrap_or_default(), body, held }
    }
}

/// One upstream of a pool.
pub struct Client {
    pub name: String,
    pub provider: Box<dyn Provider>,
    http: reqwest::Client,
    base_url: String,
    model: String,
    key: Option<HeaderValue>,
    request_timeout: Duration,
    header_timeout: Duration,
    max_response_bytes: usize,
    budget: AnswerBudget,
}

/// Builds the clients of a pool's deployments; one HTTP client per distinct
/// base URL is shared through `shared`. `env` resolves `api_key_env`.
pub fn build(
    key_prefix: &str,
    d: &DeploymentConfig,
    settings: &UpstreamConfig,
    shared: &mut HashMap<String, reqwest::Client>,
    budget: &AnswerBudget,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Client, ConfigError> {
    // reqwest is built without a bundled TLS backend; rustls uses ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let base_url = d.base_url.trim_end_matches('/').to_owned();
    reqwest::Url::parse(&base_url).map_err(|e| ConfigError::Key {
        key: format!("{key_prefix}.base_url"),
        message: format!("`{base_url}` is not a URL: {e}"),
    })?;
    let http = match shared.get(&base_url) {
        Some(c) => c.clone(),
        None => {
            let c = build_http(settings).map_err(|e| ConfigError::Key {
                key: format!("{key_prefix}.base_url"),
                message: format!("cannot build an HTTP client: {e}"),
            })?;
            shared.insert(base_url.clone(), c.clone());
            c
        }
    };
    let key = match (&d.api_key, &d.api_key_env, &d.api_key_file) {
        (Some(k), _, _) => Some(k.expose().to_owned()),
        (_, Some(var), _) => Some(env(var).ok_or_else(|| ConfigError::Key {
            key: format!("{key_prefix}.api_key_env"),
            message: format!("environment variable {var} is not set"),
        })?),
        (_, _, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Key {
                    key: format!("{key_prefix}.api_key_file"),
                    message: format!("cannot read {path}: {e}"),
                })?
                .trim()
                .to_owned(),
        ),
        _ => None,
    };
    let provider = crate::upstream::providers::of(d.provider);
    let key = match key {
        Some(k) => Some(provider.key_header(&k).ok_or_else(|| ConfigError::Key {
            key: format!("{key_prefix}.api_key"),
            message: "holds characters not allowed in a header".into(),
        })?),
        None => None,
    };
    Ok(Client {
        name: d.name.clone(),
        provider,
        http,
        base_url,
        model: d.model.clone().unwrap_or_default(),
        key,
        request_timeout: ms(settings.request_timeout_ms),
        header_timeout: ms(settings.response_header_timeout_ms),
        max_response_bytes: settings.max_response_bytes,
        budget: budget.clone(),
    })
}

fn build_http(s: &UpstreamConfig) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(ms(s.connect_timeout_ms))
        .pool_max_idle_per_host(s.pool_max_idle_per_host)
        .pool_idle_timeout(ms(s.pool_idle_timeout_ms))
        .tcp_keepalive(ms(s.tcp_keepalive_ms))
        .tcp_nodelay(true)
        .build()
}

impl Client {
    /// Sends a client request made in `api`'s shape, giving up at `deadline`
    /// or after the configured timeouts, whichever comes first. The answer
    /// comes back in `api`'s shape, with the response's rate-limit headers.
    pub async fn call(&self, api: Endpoint, body: Bytes, deadline: Instant) -> (Result<Answer, CallError>, RateInfo) {
        let (response, end, deadline) = match self.send(api, body, deadline, false).await {
            Ok(r) => r,
            Err(e) => return (Err(e), RateInfo::default()),
        };
        let rate = self.provider.limits(response.headers());
        let limit = self.max_response_bytes;
        let read = read_answer(response, end, deadline, rate.retry_after, self.native(api), limit, &self.budget);
        let answer = match read.await {
            Ok((status, body, held)) => Ok(Answer::new(status, self.provider.answer(api, body), held).await),
            Err(e) => Err(e),
        };
        (answer, rate)
    }

    /// Like [`Client::call`], but a 2xx answer is handed back unread, for its
    /// body to be streamed through the returned relay; `end` is when the
    /// whole call must be over.
    pub async fn call_streaming(
        &self,
        api: Endpoint,
        body: Bytes,
        deadline: Instant,
    ) -> (Result<Opened, CallError>, RateInfo) {
        let (response, end, deadline) = match self.send(api, body, deadline, true).await {
            Ok(r) => r,
            Err(e) => return (Err(e), RateInfo::default()),
        };
        let rate = self.provider.limits(response.headers());
        if response.status().is_success() {
            return (Ok((response, end, self.provider.stream(api))), rate);
        }
        // Not a stream: an error to classify like any other answer.
        let native = self.native(api);
        let limit = self.max_response_bytes;
        let result = read_answer(response, end, deadline, rate.retry_after, native, limit, &self.budget)
            .await
            .and_then(|(status, body, _)| Err(CallError::Rejected { status, body, native }));
        (result, rate)
    }

    /// Whether this deployment speaks `api` itself (no translation).
    fn native(&self, api: Endpoint) -> bool {
        use sluice_core::config::ProviderKind;
        match self.provider.kind() {
            ProviderKind::Openai => api != Endpoint::Messages,
            ProviderKind::Anthropic => api == Endpoint::Messages,
        }
    }

    /// Sends the request and waits for the response's headers. A stream's
    /// headers come at once, so a provider that has not sent them within
    /// `upstream.response_header_timeout_ms` is not answering; a non-streamed
    /// answer's headers come only once the whole answer is made (OpenAI,
    /// Anthropic, vLLM), so they wait for the call's own timeout.
    async fn send(
        &self,
        api: Endpoint,
        body: Bytes,
        deadline: Instant,
        streaming: bool,
    ) -> Result<(reqwest::Response, Instant, Instant), CallError> {
        let (path, body) = self.provider.request(api, &body, &self.model).map_err(CallError::Unsupported)?;
        let now = Instant::now();
        let by_deadline = deadline.saturating_duration_since(now);
        if by_deadline.is_zero() {
            return Err(CallError::DeadlineExceeded);
        }
        let total = self.request_timeout.min(by_deadline);
        let end = now + total;
        let timed_out = || {
            if end >= deadline { CallError::DeadlineExceeded } else { CallError::Unanswered { reason: "timeout" } }
        };
        let request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body);
        let request = self.provider.authorize(request, self.key.as_ref());
        let headers_by = if streaming { (now + self.header_timeout).min(end) } else { end };
        let response = match tokio::time::timeout_at(headers_by, request.send()).await {
            Err(_) if headers_by < end => return Err(retryable("header_timeout", None, None)),
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) if e.is_connect() => return Err(retryable("connect", None, None)),
            Ok(Err(e)) if e.is_timeout() => return Err(timed_out()),
            Ok(Err(_)) => return Err(retryable("transport", None, None)),
            Ok(Ok(r)) => r,
        };
        Ok((response, end, deadline))
    }
}

/// Reads an answer's body by `end` and classifies it by status.
async fn read_answer(
    response: reqwest::Response,
    end: Instant,
    deadline: Instant,
    retry_after: Option<Duration>,
    native: bool,
    limit: usize,
    budget: &AnswerBudget,
) -> Result<(u16, Bytes, Held), CallError> {
    let status = response.status().as_u16();
    // Past a success's headers the provider has done the work: running out
    // of time or a broken body leaves it unanswered, not merely failed.
    let success = (200..300).contains(&status);
    let timed_out = || {
        if end >= deadline {
            CallError::DeadlineExceeded
        } else if success {
            CallError::Unanswered { reason: "timeout" }
        } else {
            retryable("timeout", None, None)
        }
    };
    // Room for a declared large answer is waited for up to the job's
    // deadline, not the call's timeout: the provider has done (and billed)
    // the work, and running out of the call's time would call it again.
    let declared = response.content_length().map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let waiting = Instant::now();
    let held = match declared {
        Some(n) if n > UNBUDGETED && n <= limit => match tokio::time::timeout_at(deadline, take(budget, n)).await {
            Err(_) => return Err(CallError::DeadlineExceeded),
            Ok(None) => return Err(retryable("body", Some(status), None)),
            Ok(Some(held)) => held,
        },
        _ => Held::default(),
    };
    // The read's own time starts once it has room.
    let end = (end + waiting.elapsed()).min(deadline);
    let (body, held) = match tokio::time::timeout_at(end, read_body(response, limit, budget, held)).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(None)) if success => return Err(CallError::Unanswered { reason: "body" }),
        Ok(Err(None)) => return Err(retryable("body", Some(status), None)),
        Ok(Err(Some(too_large))) => return Err(too_large),
        Ok(Ok(b)) => b,
    };
    match status {
        200..=299 => Ok((status, body, held)),
        408 => Err(retryable("upstream_408", Some(status), retry_after)),
        429 => Err(retryable("upstream_429", Some(status), retry_after)),
        // Anthropic's "overloaded" status.
        529 => Err(retryable("upstream_5xx", Some(status), retry_after)),
        400..=499 => Err(CallError::Rejected { status, body, native }),
        _ => Err(retryable("upstream_5xx", Some(status), retry_after)),
    }
}

/// Reads a body of at most `limit` bytes: a larger one (by its
/// `Content-Length`, or as it arrives) is not read further. `held` is the
/// room already taken for a declared length; an undeclared body past
/// [`UNBUDGETED`] takes `limit` from `budget` as it gets there and keeps its
/// own size once read. `Err(None)`: the body broke off.
async fn read_body(
    mut response: reqwest::Response,
    limit: usize,
    budget: &AnswerBudget,
    mut held: Held,
) -> Result<(Bytes, Held), Option<CallError>> {
    let too_large = || Some(CallError::TooLarge { limit });
    let declared = response.content_length().map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = bytes::BytesMut::with_capacity(declared.map_or(8 * 1024, |n| n.min(1 << 20)));
    while let Some(chunk) = response.chunk().await.map_err(|_| None)? {
        if body.len() + chunk.len() > limit || declared.is_some_and(|n| body.len() + chunk.len() > n) {
            return Err(too_large());
        }
        if held.0.is_none() && body.len() + chunk.len() > UNBUDGETED {
            held = take(budget, limit).await.ok_or(None)?;
        }
        body.extend_from_slice(&chunk);
    }
    // An undeclared length took the whole limit: keep only what it needs.
    if declared.is_none() {
        held.keep(body.len());
    }
    Ok((body.freeze(), held))
}

fn retryable(reason: &'static str, status: Option<u16>, retry_after: Option<Duration>) -> CallError {
    CallError::Retryable { reason, status, retry_after }
}
