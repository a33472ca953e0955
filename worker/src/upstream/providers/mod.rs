//! Provider clients behind one trait: how a client's request becomes the
//! provider's request (path, body, authentication), how the provider's
//! answer and stream come back in the client's API, and what its rate-limit
//! headers say. One file per provider; translation between the OpenAI and
//! Anthropic APIs lives in [`translate`].

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use sluice_core::config::ProviderKind;
use sluice_core::wire::envelope::Endpoint;

pub mod anthropic;
pub mod openai;
pub mod translate;

pub use translate::Event;

/// What a provider's response headers say about its rate limits.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RateInfo {
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_tokens: Option<Duration>,
    pub retry_after: Option<Duration>,
}

/// Turns a provider's server-sent events into events of the client's API.
pub trait StreamRelay: Send {
    /// One upstream event (its `event:` name if any, and its data).
    fn event(&mut self, name: Option<&str>, data: &str) -> Vec<Event>;
    /// Events to send once the upstream stream ended.
    fn finish(&mut self) -> Vec<Event>;
}

/// A provider's API.
pub trait Provider: Send + Sync {
    fn kind(&self) -> ProviderKind;
    /// The upstream path (under the base URL) and body for a client request
    /// made in `api`'s shape, sent to the upstream `model`. An `Err` is a
    /// request this provider cannot take (the client gets a 400 with it).
    fn request(
        &self,
        api: Endpoint,
        body: &[u8],
        model: &str,
    ) -> Result<(&'static str, Bytes), translate::TranslateError>;
    /// Adds the provider's authentication and version headers.
    fn authorize(&self, request: reqwest::RequestBuilder, key: Option<&http::HeaderValue>) -> reqwest::RequestBuilder;
    /// The header value that carries `key` (built once, marked sensitive).
    fn key_header(&self, key: &str) -> Option<http::HeaderValue>;
    /// A 2xx answer in the client's API.
    fn answer(&self, api: Endpoint, body: Bytes) -> Bytes;
    /// A relay for a streamed answer to a client speaking `api`.
    fn stream(&self, api: Endpoint) -> Box<dyn StreamRelay>;
    /// The rate-limit headers of a response.
    fn limits(&self, headers: &HeaderMap) -> RateInfo;
}

/// The provider of a deployment.
pub fn of(kind: ProviderKind) -> Box<dyn Provider> {
    match kind {
        ProviderKind::Openai => Box::new(openai::OpenAi),
        ProviderKind::Anthropic => Box::new(anthropic::Anthropic),
    }
}

/// Passes events through unchanged (client and provider speak one API).
pub struct Passthrough;

impl StreamRelay for Passthrough {
    fn event(&mut self, name: Option<&str>, data: &str) -> Vec<Event> {
        if data == "[DONE]" {
            return Vec::new();
        }
        vec![Event { name: name.map(str::to_owned), data: data.to_owned() }]
    }

    fn finish(&mut self) -> Vec<Event> {
        Vec::new()
    }
}

/// Replaces `model` in a JSON object body; `None` if the body is not one.
pub fn rewrite_model(body: &[u8], model: &str) -> Option<Bytes> {
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    if object.get("model").and_then(|m| m.as_str()) == Some(model) {
        return Some(Bytes::copy_from_slice(body));
    }
    object.insert("model".into(), serde_json::Value::String(model.to_owned()));
    serde_json::to_vec(&object).ok().map(Bytes::from)
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// The longest wait a provider's header is believed for (`Retry-After`, a
/// reset time): a day, the longest window providers limit (requests per
/// day); longer values are cut to it, so a wrong or hostile header cannot
/// block a deployment for longer nor overflow a deadline.
pub const MAX_TOLD_WAIT: Duration = Duration::from_secs(86_400);

/// A wait of `secs` seconds as a provider tells it, cut to [`MAX_TOLD_WAIT`];
/// `None` when it is not a number of seconds.
pub fn told_secs(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(MAX_TOLD_WAIT.as_secs_f64())))
}

/// `Retry-After` in seconds (the HTTP-date form is not used by providers).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim();
    told_secs(v.parse::<f64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::{MAX_TOLD_WAIT, rewrite_model};
    use std::time::Duration;

    #[test]
    fn a_providers_huge_wait_is_cut_and_never_panics() {
        let mut h = http::HeaderMap::new();
        for v in ["1e300", "18446744073709551616", "99999999999999999999999"] {
            h.insert(http::header::RETRY_AFTER, v.parse().unwrap());
            assert_eq!(super::retry_after(&h), Some(MAX_TOLD_WAIT), "{v}");
        }
        for v in ["-1", "NaN", "inf", "soon"] {
            h.insert(http::header::RETRY_AFTER, v.parse().unwrap());
            assert_eq!(super::retry_after(&h), None, "{v}");
        }
        h.insert(http::header::RETRY_AFTER, "2.5".parse().unwrap());
        assert_eq!(super::retry_after(&h), Some(Duration::from_millis(2500)));
        assert_eq!(super::openai::parse_duration("99999999999999999999h"), Some(MAX_TOLD_WAIT));
        // The deadline it feeds cannot overflow.
        assert!(tokio::time::Instant::now().checked_add(MAX_TOLD_WAIT).is_some());
    }

    #[test]
    fn model_is_rewritten_and_other_fields_kept() {
        let out = rewrite_model(br#"{"model":"alias","messages":[],"temperature":0.2}"#, "gpt-4o-mini");
        let v: serde_json::Value = out.and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        assert_eq!(v["model"], "gpt-4o-mini");
        assert_eq!(v["temperature"], 0.2);
        assert!(rewrite_model(b"[1]", "m").is_none());
    }
}
