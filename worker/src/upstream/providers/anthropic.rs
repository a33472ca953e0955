//! Anthropic's Messages API: `x-api-key` and `anthropic-version` headers,
//! rate limits in `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`
//! (the reset an RFC 3339 time).

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use sluice_core::config::ProviderKind;
use sluice_core::wire::envelope::Endpoint;

use super::translate::{self, Event, MessagesToChat};
use super::{Passthrough, Provider, RateInfo, StreamRelay, header_u64, retry_after, rewrite_model};

/// The API version Sluice speaks to Anthropic.
pub const VERSION: &str = "2023-06-01";

pub struct Anthropic;

impl Provider for Anthropic {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    fn request(
        &self,
        api: Endpoint,
        body: &[u8],
        model: &str,
    ) -> Result<(&'static str, Bytes), translate::TranslateError> {
        match api {
            Endpoint::Messages => Ok(("/messages", rewrite_model(body, model).unwrap_or_default())),
            Endpoint::ChatCompletions => {
                Ok(("/messages", Bytes::from(translate::chat_to_messages_request(body, model)?)))
            }
            Endpoint::Embeddings => Err(translate::TranslateError::NoEmbeddings),
        }
    }

    fn key_header(&self, key: &str) -> Option<http::HeaderValue> {
        let mut v = http::HeaderValue::from_str(key).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    fn authorize(&self, request: reqwest::RequestBuilder, key: Option<&http::HeaderValue>) -> reqwest::RequestBuilder {
        let request = request.header("anthropic-version", VERSION);
        match key {
            Some(k) => request.header("x-api-key", k.clone()),
            None => request,
        }
    }

    fn answer(&self, api: Endpoint, body: Bytes) -> Bytes {
        match api {
            Endpoint::ChatCompletions => translate::messages_to_chat_answer(&body).map(Bytes::from).unwrap_or(body),
            _ => body,
        }
    }

    fn stream(&self, api: Endpoint) -> Box<dyn StreamRelay> {
        match api {
            Endpoint::ChatCompletions => Box::new(ToChat(MessagesToChat::default())),
            _ => Box::new(Passthrough),
        }
    }

    fn limits(&self, h: &HeaderMap) -> RateInfo {
        let reset = |name: &str| {
            let at = sluice_core::clock::rfc3339_ms(h.get(name)?.to_str().ok()?)?;
            Some(Duration::from_millis(at.saturating_sub(sluice_core::now_ms())).min(super::MAX_TOLD_WAIT))
        };
        RateInfo {
            limit_requests: header_u64(h, "anthropic-ratelimit-requests-limit"),
            remaining_requests: header_u64(h, "anthropic-ratelimit-requests-remaining"),
            reset_requests: reset("anthropic-ratelimit-requests-reset"),
            limit_tokens: header_u64(h, "anthropic-ratelimit-tokens-limit"),
            remaining_tokens: header_u64(h, "anthropic-ratelimit-tokens-remaining"),
            reset_tokens: reset("anthropic-ratelimit-tokens-reset"),
            retry_after: retry_after(h),
        }
    }
}

struct ToChat(MessagesToChat);

impl StreamRelay for ToChat {
    fn event(&mut self, name: Option<&str>, data: &str) -> Vec<Event> {
        self.0.event(name, data)
    }

    fn finish(&mut self) -> Vec<Event> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_headers_are_read() {
        let mut h = HeaderMap::new();
        h.insert("anthropic-ratelimit-requests-limit", "50".parse().unwrap());
        h.insert("anthropic-ratelimit-requests-remaining", "0".parse().unwrap());
        h.insert("anthropic-ratelimit-requests-reset", "2999-01-01T00:00:00Z".parse().unwrap());
        let r = Anthropic.limits(&h);
        assert_eq!((r.limit_requests, r.remaining_requests), (Some(50), Some(0)));
        assert_eq!(r.reset_requests, Some(crate::upstream::providers::MAX_TOLD_WAIT), "a far reset is cut to a day");
    }
}
