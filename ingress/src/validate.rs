//! Checking what a client sends before anything is queued: each endpoint's
//! body (its pool, its token estimate), a job submit's own fields (endpoint,
//! metadata, priority, expiry, webhook, `Idempotency-Key`), and the request's
//! identity (request id, trace context). Every refusal is a structured
//! [`ApiError`] naming the field.

use std::borrow::Cow;

use axum::http::HeaderMap;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::jobstate::WebhookTarget;
use sluice_core::webhook;
use sluice_core::wire::envelope::{Class, Endpoint};
use uuid::Uuid;

use crate::state::AppState;

/// The fields of a chat completion the ingress checks; the rest of the body
/// is passed on as is.
#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    messages: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<serde_json::Number>,
    #[serde(default)]
    max_completion_tokens: Option<serde_json::Number>,
}

/// What validation knows of a pool.
#[derive(Debug, Clone)]
pub struct PoolRoute {
    /// Its subject token.
    pub token: String,
    /// `pools.max_output_tokens`.
    pub max_output_tokens: u64,
}

/// What validation needs to know: the pools by name and the output
/// estimate of a request that sets no `max_tokens`.
pub struct Catalog<'s> {
    pub pools: &'s std::collections::HashMap<String, PoolRoute>,
    pub default_max_tokens: u64,
}

impl<'s> Catalog<'s> {
    pub fn of(state: &'s AppState) -> Self {
        Self { pools: &state.pools, default_max_tokens: state.config.scheduler.default_max_tokens }
    }
}

/// A checked chat completion request.
pub struct Checked<'s> {
    pub model: String,
    pub pool_token: &'s str,
    /// Prompt estimate plus requested output, for fairness and `tpm`.
    pub est_tokens: u64,
    /// `stream: true`: the answer goes back as server-sent events.
    pub stream: bool,
}

/// Checks a chat completion body: its pool, the pool's subject token, and
/// its token estimate.
pub fn validate_chat<'s>(c: &Catalog<'s>, bytes: &[u8]) -> Result<Checked<'s>, ApiError> {
    let request: ChatRequest<'_> = crate::body::parse(bytes)?;
    if request.messages.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`messages` must not be empty").param("messages"));
    }
    let pool = pool(c, &request.model)?;
    let (asked, param) = match request.max_completion_tokens {
        Some(n) => (Some(n), "max_completion_tokens"),
        None => (request.max_tokens, "max_tokens"),
    };
    let asked = asked.map(|n| output_tokens(pool, &n, param)).transpose()?;
    let pool_token = pool.token.as_str();
    let est_tokens = sluice_core::tenant::estimate_tokens(bytes.len(), asked, c.default_max_tokens);
    Ok(Checked { model: request.model.into_owned(), pool_token, est_tokens, stream: request.stream == Some(true) })
}

/// The fields of an embeddings request the ingress checks.
#[derive(Deserialize)]
struct EmbeddingsRequest<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    input: Input,
}

/// Whether `input` is a non-empty string or a non-empty array, found as it
/// is read: no JSON tree is built (a megabyte of `[0,0,…]` as values would
/// take tens of megabytes).
struct Input {
    non_empty: bool,
}

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Input;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Input, E> {
                Ok(Input { non_empty: !s.is_empty() })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<Input, A::Error> {
                let mut non_empty = false;
                while items.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    non_empty = true;
                }
                Ok(Input { non_empty })
            }
            // Anything else is read past and refused by the caller, naming `input`.
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Input, A::Error> {
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Input { non_empty: false })
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Input, E> {
                Ok(Input { non_empty: false })
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Input, E> {
                Ok(Input { non_empty: false })
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Input, E> {
                Ok(Input { non_empty: false })
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Input, E> {
                Ok(Input { non_empty: false })
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Input, E> {
                Ok(Input { non_empty: false })
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Checks an embeddings body: `input` is a non-empty string or a non-empty
/// array (of strings or of token arrays).
pub fn validate_embeddings<'s>(c: &Catalog<'s>, bytes: &[u8]) -> Result<Checked<'s>, ApiError> {
    let request: EmbeddingsRequest<'_> = crate::body::parse(bytes)?;
    if !request.input.non_empty {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "`input` must be a non-empty string or a non-empty array",
        )
        .param("input"));
    }
    let pool_token = pool(c, &request.model)?.token.as_str();
    // No output tokens: an embedding costs its input.
    let est_tokens = (bytes.len() as u64).div_ceil(4);
    Ok(Checked { model: request.model.into_owned(), pool_token, est_tokens, stream: false })
}

/// The fields of an Anthropic Messages request the ingress checks.
#[derive(Deserialize)]
struct MessagesRequest<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    messages: Vec<serde::de::IgnoredAny>,
    max_tokens: Option<serde_json::Number>,
    #[serde(default)]
    stream: Option<bool>,
}

/// Checks a Messages body: its pool, non-empty `messages`, and the
/// `max_tokens` Anthropic's API requires.
pub fn validate_messages<'s>(c: &Catalog<'s>, bytes: &[u8]) -> Result<Checked<'s>, ApiError> {
    let request: MessagesRequest<'_> = crate::body::parse(bytes)?;
    if request.messages.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`messages` must not be empty").param("messages"));
    }
    let pool = pool(c, &request.model)?;
    let max_tokens = match &request.max_tokens {
        Some(n) => output_tokens(pool, n, "max_tokens")?,
        None => 0,
    };
    if max_tokens == 0 {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`max_tokens` is required and must be at least 1")
            .param("max_tokens"));
    }
    let pool_token = pool.token.as_str();
    let est_tokens = sluice_core::tenant::estimate_tokens(bytes.len(), Some(max_tokens), c.default_max_tokens);
    Ok(Checked { model: request.model.into_owned(), pool_token, est_tokens, stream: request.stream == Some(true) })
}

/// Checks a request body for `endpoint`.
pub fn validate<'s>(state: &'s AppState, endpoint: Endpoint, bytes: &[u8]) -> Result<Checked<'s>, ApiError> {
    validate_with(&Catalog::of(state), endpoint, bytes)
}

pub fn validate_with<'s>(c: &Catalog<'s>, endpoint: Endpoint, bytes: &[u8]) -> Result<Checked<'s>, ApiError> {
    match endpoint {
        Endpoint::ChatCompletions => validate_chat(c, bytes),
        Endpoint::Embeddings => validate_embeddings(c, bytes),
        Endpoint::Messages => validate_messages(c, bytes),
    }
}

/// The output tokens a request asks for, if they are a whole number the
/// pool allows (at most `pools.max_output_tokens`).
fn output_tokens(pool: &PoolRoute, asked: &serde_json::Number, param: &'static str) -> Result<u64, ApiError> {
    match asked.as_u64() {
        Some(n) if n <= pool.max_output_tokens => Ok(n),
        _ => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "`{param}` must be a whole number of at most {} for this model, not {asked}",
                pool.max_output_tokens
            ),
        )
        .param(param)),
    }
}

fn pool<'s>(c: &Catalog<'s>, model: &str) -> Result<&'s PoolRoute, ApiError> {
    c.pools.get(model).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ModelNotFound,
            format!("the model `{model}` does not exist or you do not have access to it"),
        )
        .param("model")
    })
}

/// The client's `x-request-id` when it is sane, else the job id.
pub fn request_id(headers: &HeaderMap, job_id: Uuid) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| job_id.to_string(), str::to_owned)
}

/// The client's W3C `traceparent` when well-formed, else a new trace rooted
/// at this request (trace id from the job id).
pub fn traceparent(headers: &HeaderMap, job_id: Uuid) -> String {
    let given = headers.get("traceparent").and_then(|v| v.to_str().ok());
    if let Some(tp) = given {
        let parts: Vec<&str> = tp.split('-').collect();
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.len() == 4 && hex(parts[0], 2) && hex(parts[1], 32) && hex(parts[2], 16) && hex(parts[3], 2) {
            return tp.to_owned();
        }
    }
    let id = job_id.simple().to_string();
    format!("00-{id}-{}-01", &id[16..])
}

/// Runs `f` when dropped, whichever way the handler returns.
pub fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// A checked `POST /v1/jobs` body.
pub struct CheckedJob<'s> {
    pub endpoint: Endpoint,
    /// The endpoint's request, as the job's payload.
    pub inner: Bytes,
    pub checked: Checked<'s>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub priority: Option<String>,
    /// The class asked for (before the tenant's tier lowers it).
    pub class: Class,
    pub expiry_ms: u64,
    pub webhook: Option<WebhookTarget>,
}

/// Checks a job submit's body: the endpoint and its request, then the job's
/// own fields (the webhook target is resolved and checked here).
pub async fn job<'s>(state: &'s AppState, bytes: &[u8]) -> Result<CheckedJob<'s>, ApiError> {
    let request: JobRequest = crate::body::parse(bytes)?;
    let Some(endpoint) = Endpoint::parse(&request.endpoint) else {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("unknown endpoint `{}`; supported: chat.completions, embeddings, messages", request.endpoint),
        )
        .param("endpoint"));
    };
    let inner = Bytes::copy_from_slice(request.body.get().as_bytes());
    let checked = validate(state, endpoint, &inner)?;
    if checked.stream {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "a job cannot stream; use POST /v1/chat/completions for `stream: true`",
        )
        .param("stream"));
    }
    check_metadata(request.metadata.as_ref())?;
    let class = match request.priority.as_deref() {
        None => Class::Normal,
        Some(p) => Class::parse(p).ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidRequest, "`priority` must be interactive, normal or batch")
                .param("priority")
        })?,
    };
    let jobs = &state.config.jobs;
    let expiry_ms = match request.expires_in {
        Some(0) => {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "`expires_in` must be positive").param("expires_in"));
        }
        Some(secs) if secs.saturating_mul(1000) > jobs.max_expiry_ms => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("`expires_in` may be at most {} seconds", jobs.max_expiry_ms / 1000),
            )
            .param("expires_in"));
        }
        Some(secs) => secs * 1000,
        None => jobs.default_expiry_ms,
    };
    let webhook = match request.webhook {
        Some(hook) => Some(check_webhook(state, hook).await?),
        None => None,
    };
    Ok(CheckedJob {
        endpoint,
        inner,
        checked,
        metadata: request.metadata,
        priority: request.priority,
        class,
        expiry_ms,
        webhook,
    })
}

const MAX_METADATA_KEYS: usize = 16;
const MAX_METADATA_VALUE: usize = 512;
const MAX_IDEMPOTENCY_KEY: usize = 255;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobRequest {
    endpoint: String,
    body: Box<RawValue>,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    priority: Option<String>,
    /// Seconds the job may wait in the queue before it expires.
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    webhook: Option<WebhookRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookRequest {
    url: String,
    /// `whsec_…`; one is made (and shown once, in the 202) when absent.
    #[serde(default)]
    secret: Option<String>,
}

async fn check_webhook(state: &AppState, hook: WebhookRequest) -> Result<WebhookTarget, ApiError> {
    let bad = |message: String| ApiError::new(ErrorCode::InvalidRequest, message).param("webhook");
    if hook.url.len() > 2048 {
        return Err(bad("`webhook.url` is longer than 2048 characters".into()));
    }
    webhook::check_target(&hook.url, state.config.webhooks.policy()).await.map_err(|e| bad(e.to_string()))?;
    let secret = match hook.secret {
        Some(secret) => {
            webhook::check_secret(&secret).map_err(|e| bad(e.to_string()))?;
            secret
        }
        None => webhook::new_secret().map_err(|_| ApiError::new(ErrorCode::Internal, "cannot make a secret"))?,
    };
    Ok(WebhookTarget { url: hook.url, secret })
}

pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY => Ok(Some(key)),
        _ => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("`Idempotency-Key` must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        )),
    }
}

fn check_metadata(metadata: Option<&serde_json::Map<String, serde_json::Value>>) -> Result<(), ApiError> {
    let Some(map) = metadata else { return Ok(()) };
    let bad = |message: String| Err(ApiError::new(ErrorCode::InvalidRequest, message).param("metadata"));
    if map.len() > MAX_METADATA_KEYS {
        return bad(format!("`metadata` may hold at most {MAX_METADATA_KEYS} keys"));
    }
    for (key, value) in map {
        // Postgres stores no NUL character, in text or in jsonb.
        if key.contains('\0') || value.as_str().is_some_and(|s| s.contains('\0')) {
            return bad(format!("`metadata.{}` must not hold a NUL character (\\u0000)", key.escape_debug()));
        }
        match value.as_str() {
            Some(s) if s.len() <= MAX_METADATA_VALUE && key.len() <= 64 => {}
            _ => return bad(format!("`metadata.{key}` must be a string of at most {MAX_METADATA_VALUE} characters")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod properties {
    //! Whatever the body, validation answers a checked request or a 4xx
    //! error in OpenAI's envelope; it never panics.
    use proptest::prelude::*;

    use super::*;

    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(
                |f| serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, serde_json::Value::Number)
            ),
            "\\PC{0,20}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::from("mock")),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("model".to_owned()),
                        Just("messages".to_owned()),
                        Just("input".to_owned()),
                        Just("max_tokens".to_owned()),
                        Just("stream".to_owned()),
                        "[a-z_]{1,12}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn endpoint() -> impl Strategy<Value = Endpoint> {
        prop_oneof![Just(Endpoint::ChatCompletions), Just(Endpoint::Embeddings), Just(Endpoint::Messages)]
    }

    fn check(endpoint: Endpoint, bytes: &[u8]) -> Result<(), TestCaseError> {
        let route = PoolRoute { token: "mock".into(), max_output_tokens: 4096 };
        let pools: std::collections::HashMap<String, PoolRoute> = [("mock".to_owned(), route)].into();
        let catalog = Catalog { pools: &pools, default_max_tokens: 256 };
        match validate_with(&catalog, endpoint, bytes) {
            Ok(checked) => prop_assert_eq!(checked.model, "mock"),
            Err(e) => {
                prop_assert!(e.code.status().is_client_error(), "{:?}", e.code);
                let body: serde_json::Value =
                    serde_json::from_slice(&e.body(sluice_core::error::Dialect::OpenAi)).unwrap_or_default();
                prop_assert!(body["error"]["message"].is_string());
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn any_json_body_is_checked_or_refused_with_a_4xx(value in json(), endpoint in endpoint()) {
            check(endpoint, &serde_json::to_vec(&value).unwrap_or_default())?;
        }

        #[test]
        fn any_bytes_are_checked_or_refused_with_a_4xx(bytes in proptest::collection::vec(any::<u8>(), 0..300), endpoint in endpoint()) {
            check(endpoint, &bytes)?;
        }

        #[test]
        fn truncated_valid_bodies_are_refused_with_a_4xx(cut in 0usize..80, endpoint in endpoint()) {
            let body = br#"{"model":"mock","messages":[{"role":"user","content":"hi"}],"input":"x","max_tokens":5}"#;
            check(endpoint, &body[..cut.min(body.len())])?;
        }
    }
}
