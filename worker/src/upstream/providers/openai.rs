//! OpenAI's API and every compatible server (Azure OpenAI style gateways,
//! vLLM, Ollama, the mock provider): `Authorization: Bearer`, rate limits in
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use sluice_core::config::ProviderKind;
use sluice_core::wire::envelope::Endpoint;

use super::translate::{self, ChatToMessages, Event};
use super::{Passthrough, Provider, RateInfo, StreamRelay, header_u64, retry_after, rewrite_model};

pub struct OpenAi;

impl Provider for OpenAi {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Openai
    }

    fn request(
        &self,
        api: Endpoint,
        body: &[u8],
        model: &str,
    ) -> Result<(&'static str, Bytes), translate::TranslateError> {
        match api {
            Endpoint::ChatCompletions => Ok(("/chat/completions", rewrite_model(body, model).unwrap_or_default())),
            Endpoint::Embeddings => Ok(("/embeddings", rewrite_model(body, model).unwrap_or_default())),
            Endpoint::Messages => {
                Ok(("/chat/completions", Bytes::from(translate::messages_to_chat_request(body, model)?)))
            }
        }
    }

    fn key_header(&self, key: &str) -> Option<http::HeaderValue> {
        let mut v = http::HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    fn authorize(&self, request: reqwest::RequestBuilder, key: Option<&http::HeaderValue>) -> reqwest::RequestBuilder {
        match key {
            Some(k) => request.header(http::header::AUTHORIZATION, k.clone()),
            None => request,
        }
    }

    fn answer(&self, api: Endpoint, body: Bytes) -> Bytes {
        match api {
            Endpoint::Messages => translate::chat_to_messages_answer(&body).map(Bytes::from).unwrap_or(body),
            _ => body,
        }
    }

    fn stream(&self, api: Endpoint) -> Box<dyn StreamRelay> {
        match api {
            Endpoint::Messages => Box::new(ToMessages(ChatToMessages::default())),
            _ => Box::new(Passthrough),
        }
    }

    fn limits(&self, h: &HeaderMap) -> RateInfo {
        RateInfo {
            limit_requests: header_u64(h, "x-ratelimit-limit-requests"),
            remaining_requests: header_u64(h, "x-ratelimit-remaining-requests"),
            reset_requests: h.get("x-ratelimit-reset-requests").and_then(|v| parse_duration(v.to_str().ok()?)),
            limit_tokens: header_u64(h, "x-ratelimit-limit-tokens"),
            remaining_tokens: header_u64(h, "x-ratelimit-remaining-tokens"),
            reset_tokens: h.get("x-ratelimit-reset-tokens").and_then(|v| parse_duration(v.to_str().ok()?)),
            retry_after: retry_after(h),
        }
    }
}

struct ToMessages(ChatToMessages);

impl StreamRelay for ToMessages {
    fn event(&mut self, _name: Option<&str>, data: &str) -> Vec<Event> {
        if data == "[DONE]" { Vec::new() } else { self.0.event(data) }
    }

    fn finish(&mut self) -> Vec<Event> {
        self.0.finish()
    }
}

/// OpenAI's reset durations: `1s`, `6m0s`, `1h2m3.5s`, `20ms`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = 0.0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let number: f64 = rest[..end].parse().ok()?;
        rest = &rest[end..];
        let (unit, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else {
            match rest.chars().next()? {
                'h' => (3600.0, 1),
                'm' => (60.0, 1),
                's' => (1.0, 1),
                _ => return None,
            }
        };
        total += number * unit;
        rest = &rest[len..];
    }
    super::told_secs(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_durations_parse() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_duration("1h2m3.5s"), Some(Duration::from_secs_f64(3723.5)));
        assert_eq!(parse_duration("soon"), None);
    }

    #[test]
    fn rate_headers_are_read() {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-limit-requests", "1200".parse().unwrap());
        h.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        h.insert("x-ratelimit-reset-requests", "2.5s".parse().unwrap());
        h.insert("retry-after", "3".parse().unwrap());
        let r = OpenAi.limits(&h);
        assert_eq!((r.limit_requests, r.remaining_requests), (Some(1200), Some(0)));
        assert_eq!(r.reset_requests, Some(Duration::from_millis(2500)));
        assert_eq!(r.retry_after, Some(Duration::from_secs(3)));
    }
}
