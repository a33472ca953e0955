//! The OpenAI-compatible upstream of each pool: one pooled HTTP client per
//! base URL, timeouts from `[upstream]`, and a classification of failures
//! into "the request's fault" (returned to the client at once) and
//! "retryable" (5xx, 408, 429, resets, timeouts).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use sluice_core::config::{ConfigError, PoolConfig, UpstreamConfig, ms};
use sluice_core::envelope::Endpoint;
use tokio::time::Instant;

/// A call that ended without a usable answer.
#[derive(Debug)]
pub enum CallError {
    /// The upstream refused the request itself (4xx other than 408/429):
    /// retrying cannot help, the client gets this answer as is.
    Rejected { status: u16, body: Bytes },
    /// A failure that another attempt may not meet.
    Retryable { reason: &'static str, status: Option<u16>, retry_after: Option<Duration> },
    /// The job's deadline passed during the call.
    DeadlineExceeded,
}

#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

pub struct Upstream {
    client: reqwest::Client,
    /// `{base_url}/chat/completions`, parsed once.
    chat_url: reqwest::Url,
    embeddings_url: reqwest::Url,
    /// Upstream model name when it differs from the pool name.
    rewrite_model: Option<String>,
    authorization: Option<HeaderValue>,
    request_timeout: Duration,
    header_timeout: Duration,
}

/// The upstreams of every configured pool.
pub struct Upstreams {
    by_pool: HashMap<String, Upstream>,
}

impl Upstreams {
    /// Builds one client per distinct base URL. `env` resolves `api_key_env`
    /// (a missing variable is a config error naming the key).
    pub fn new(
        pools: &[PoolConfig],
        settings: &UpstreamConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        // reqwest is built without a bundled TLS backend; rustls uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut clients: HashMap<String, reqwest::Client> = HashMap::new();
        let mut by_pool = HashMap::new();
        for (i, pool) in pools.iter().enumerate() {
            let base_url = pool.base_url.trim_end_matches('/').to_owned();
            let client = match clients.get(&base_url) {
                Some(c) => c.clone(),
                None => {
                    let c = build_client(settings).map_err(|e| ConfigError::Key {
                        key: format!("pools[{i}].base_url"),
                        message: format!("cannot build an HTTP client: {e}"),
                    })?;
                    clients.insert(base_url.clone(), c.clone());
                    c
                }
            };
            let key = match (&pool.api_key, &pool.api_key_env) {
                (Some(k), _) => Some(k.expose().to_owned()),
                (None, Some(var)) => Some(env(var).ok_or_else(|| ConfigError::Key {
                    key: format!("pools[{i}].api_key_env"),
                    message: format!("environment variable {var} is not set"),
                })?),
                (None, None) => None,
            };
            let authorization = match key {
                Some(k) => {
                    let mut v = HeaderValue::from_str(&format!("Bearer {k}")).map_err(|_| ConfigError::Key {
                        key: format!("pools[{i}].api_key"),
                        message: "holds characters not allowed in a header".into(),
                    })?;
                    v.set_sensitive(true);
                    Some(v)
                }
                None => None,
            };
            let rewrite_model = (pool.upstream_model() != pool.name).then(|| pool.upstream_model().to_owned());
            let url_of = |endpoint: Endpoint| {
                let url = format!("{base_url}{}", endpoint.upstream_path());
                reqwest::Url::parse(&url).map_err(|e| ConfigError::Key {
                    key: format!("pools[{i}].base_url"),
                    message: format!("`{url}` is not a URL: {e}"),
                })
            };
            let chat_url = url_of(Endpoint::ChatCompletions)?;
            let embeddings_url = url_of(Endpoint::Embeddings)?;
            by_pool.insert(
                pool.name.clone(),
                Upstream {
                    client,
                    chat_url,
                    embeddings_url,
                    rewrite_model,
                    authorization,
                    request_timeout: ms(settings.request_timeout_ms),
                    header_timeout: ms(settings.response_header_timeout_ms),
                },
            );
        }
        Ok(Self { by_pool })
    }

    pub fn get(&self, pool: &str) -> Option<&Upstream> {
        self.by_pool.get(pool)
    }
}

fn build_client(s: &UpstreamConfig) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(ms(s.connect_timeout_ms))
        .pool_max_idle_per_host(s.pool_max_idle_per_host)
        .pool_idle_timeout(ms(s.pool_idle_timeout_ms))
        .tcp_keepalive(ms(s.tcp_keepalive_ms))
        .tcp_nodelay(true)
        .build()
}

impl Upstream {
    fn url(&self, endpoint: Endpoint) -> &reqwest::Url {
        match endpoint {
            Endpoint::ChatCompletions => &self.chat_url,
            Endpoint::Embeddings => &self.embeddings_url,
        }
    }

    /// Sends `body` to the endpoint, giving up at `deadline` or after the
    /// configured timeouts, whichever comes first.
    pub async fn call(&self, endpoint: Endpoint, body: Bytes, deadline: Instant) -> Result<Answer, CallError> {
        let (response, end, deadline) = self.send(endpoint, body, deadline).await?;
        read_answer(response, end, deadline).await
    }

    /// Like [`Upstream::call`], but a 2xx answer is handed back unread, for
    /// its body to be streamed; `end` is when the whole call must be over.
    pub async fn call_streaming(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        deadline: Instant,
    ) -> Result<(reqwest::Response, Instant), CallError> {
        let (response, end, deadline) = self.send(endpoint, body, deadline).await?;
        if response.status().is_success() {
            return Ok((response, end));
        }
        // Not a stream: an error to classify like any other answer.
        read_answer(response, end, deadline)
            .await
            .and_then(|a| Err(CallError::Rejected { status: a.status, body: a.body }))
    }

    async fn send(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        deadline: Instant,
    ) -> Result<(reqwest::Response, Instant, Instant), CallError> {
        let body = match &self.rewrite_model {
            Some(model) => rewrite_model(&body, model).unwrap_or(body),
            None => body,
        };
        let now = Instant::now();
        let by_deadline = deadline.saturating_duration_since(now);
        if by_deadline.is_zero() {
            return Err(CallError::DeadlineExceeded);
        }
        let total = self.request_timeout.min(by_deadline);
        let end = now + total;
        let timed_out = || {
            if end >= deadline { CallError::DeadlineExceeded } else { retryable("timeout", None, None) }
        };
        let mut request = self
            .client
            .post(self.url(endpoint).clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(auth) = &self.authorization {
            request = request.header(http::header::AUTHORIZATION, auth.clone());
        }
        let headers_by = (now + self.header_timeout).min(end);
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
async fn read_answer(response: reqwest::Response, end: Instant, deadline: Instant) -> Result<Answer, CallError> {
    let timed_out = || {
        if end >= deadline { CallError::DeadlineExceeded } else { retryable("timeout", None, None) }
    };
    {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match tokio::time::timeout_at(end, response.bytes()).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(_)) => return Err(retryable("body", Some(status), None)),
            Ok(Ok(b)) => b,
        };
        match status {
            200..=299 => Ok(Answer { status, body }),
            408 => Err(retryable("upstream_408", Some(status), retry_after)),
            429 => Err(retryable("upstream_429", Some(status), retry_after)),
            400..=499 => Err(CallError::Rejected { status, body }),
            _ => Err(retryable("upstream_5xx", Some(status), retry_after)),
        }
    }
}

fn retryable(reason: &'static str, status: Option<u16>, retry_after: Option<Duration>) -> CallError {
    CallError::Retryable { reason, status, retry_after }
}

/// Replaces `model` in a JSON object body; `None` if the body is not one.
fn rewrite_model(body: &[u8], model: &str) -> Option<Bytes> {
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    object.insert("model".into(), serde_json::Value::String(model.to_owned()));
    serde_json::to_vec(&object).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::rewrite_model;

    #[test]
    fn model_is_rewritten_and_other_fields_kept() {
        let out = rewrite_model(br#"{"model":"alias","messages":[],"temperature":0.2}"#, "gpt-4o-mini");
        let v: serde_json::Value = out.and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        assert_eq!(v["model"], "gpt-4o-mini");
        assert_eq!(v["temperature"], 0.2);
        assert!(rewrite_model(b"[1]", "m").is_none());
    }
}
