//! Anthropic's Messages API: `x-api-key` and `anthropic-version` headers,
//! rate limits in `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`
//! (the reset an RFC 3339 time).

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use sluice_core::config::ProviderKind;
use sluice_core::envelope::Endpoint;

use super::translate::{self, Event, MessagesToChat};
use super::{Passthrough, Provider, RateInfo, StreamRelay, header_u64, retry_after, rewrite_model};

/// The API version Sluice speaks to Anthropic.
pub const VERSION: &str = "2023-06-01";

pub struct Anthropic;

impl Provider for Anthropic {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    fn request(&self, api: Endpoint, body: &[u8], model: &str) -> Result<(&'static str, Bytes), String> {
        match api {
            Endpoint::Messages => Ok(("/messages", rewrite_model(body, model).unwrap_or_default())),
            Endpoint::ChatCompletions => {
                Ok(("/messages", Bytes::from(translate::chat_to_messages_request(body, model)?)))
            }
            Endpoint::Embeddings => Err("this pool's provider (Anthropic) has no embeddings endpoint".into()),
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
            let at = rfc3339_ms(h.get(name)?.to_str().ok()?)?;
            Some(Duration::from_millis(at.saturating_sub(sluice_core::now_ms())))
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

/// Milliseconds since the Unix epoch of an RFC 3339 UTC time such as
/// `2026-11-22T07:00:01Z` or `2026-11-22T07:00:01.5Z` (offsets other than
/// `Z` are refused: Anthropic sends UTC).
pub fn rfc3339_ms(s: &str) -> Option<u64> {
    let s = s.trim().strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (hh, mm): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let secs: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = (days * 86_400 + hh * 3600 + mm * 60) * 1000 + (secs * 1000.0) as i64;
    u64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_times_parse() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(rfc3339_ms("2026-11-22T07:00:01.5Z"), Some(1_795_330_801_500));
        assert_eq!(rfc3339_ms("2026-11-22T07:00:01+01:00"), None);
    }
}
