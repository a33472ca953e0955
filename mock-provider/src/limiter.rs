//! The mock's rate limits, as a provider enforces them: at most `rpm`
//! admitted requests and `tpm` admitted tokens in any 60-second window (a
//! sliding log of admitted requests), refused ones not counted. A request's
//! tokens are counted when it arrives, as providers do: its body's length / 4
//! plus its `max_tokens`. Every answer carries the state in the provider's
//! headers: OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
//! or Anthropic's `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`,
//! and a 429 carries `Retry-After`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Limiter {
    /// When each admitted request arrived, and its tokens.
    admitted: Mutex<Log>,
}

#[derive(Default)]
struct Log {
    entries: VecDeque<(Instant, u64)>,
    tokens: u64,
}

/// One limit's state after a request.
#[derive(Debug, Clone, Copy)]
pub struct Remaining {
    pub limit: u64,
    pub remaining: u64,
    /// Until the oldest admitted request leaves the window (capacity frees).
    pub reset: Duration,
}

/// What the limiter decided for one request.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub allowed: bool,
    pub requests: Option<Remaining>,
    pub tokens: Option<Remaining>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Style {
    OpenAi,
    Anthropic,
}

impl Limiter {
    /// Admits or refuses a request of `tokens` under `rpm` and `tpm` (0 = no limit).
    pub fn check(&self, rpm: u64, tpm: u64, tokens: u64) -> Verdict {
        let now = Instant::now();
        let mut log = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((t, n)) = log.entries.front().copied() {
            if now.duration_since(t) < WINDOW {
                break;
            }
            log.entries.pop_front();
            log.tokens -= n;
        }
        let requests_ok = rpm == 0 || (log.entries.len() as u64) < rpm;
        let tokens_ok = tpm == 0 || log.tokens + tokens <= tpm;
        let allowed = requests_ok && tokens_ok;
        if allowed {
            log.entries.push_back((now, tokens));
            log.tokens += tokens;
        }
        let reset = log.entries.front().map_or(Duration::ZERO, |(t, _)| (*t + WINDOW).saturating_duration_since(now));
        let remaining = |limit: u64, used: u64| {
            (limit > 0).then(|| Remaining { limit, remaining: limit.saturating_sub(used), reset })
        };
        Verdict { allowed, requests: remaining(rpm, log.entries.len() as u64), tokens: remaining(tpm, log.tokens) }
    }
}

impl Verdict {
    /// Adds the rate-limit headers in the provider's style.
    pub fn headers(&self, h: &mut HeaderMap, style: Style) {
        let mut set = |name: String, value: String| {
            if let (Ok(n), Ok(v)) = (axum::http::HeaderName::try_from(name), HeaderValue::from_str(&value)) {
                h.insert(n, v);
            }
        };
        for (kind, state) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some(r) = state else { continue };
            match style {
                Style::OpenAi => {
                    set(format!("x-ratelimit-limit-{kind}"), r.limit.to_string());
                    set(format!("x-ratelimit-remaining-{kind}"), r.remaining.to_string());
                    set(format!("x-ratelimit-reset-{kind}"), format!("{:.3}s", r.reset.as_secs_f64()));
                }
                Style::Anthropic => {
                    set(format!("anthropic-ratelimit-{kind}-limit"), r.limit.to_string());
                    set(format!("anthropic-ratelimit-{kind}-remaining"), r.remaining.to_string());
                    let at = std::time::SystemTime::now() + r.reset;
                    let ms = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
                    set(format!("anthropic-ratelimit-{kind}-reset"), rfc3339(ms));
                }
            }
        }
        if !self.allowed {
            let wait = [self.requests, self.tokens].into_iter().flatten().map(|r| r.reset).max().unwrap_or_default();
            set("retry-after".into(), wait.as_secs_f64().ceil().max(1.0).to_string());
        }
    }
}

/// `2026-11-22T07:00:01.500Z` from milliseconds since the epoch.
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_admits_rpm_then_refuses() {
        let l = Limiter::default();
        assert!((0..5).all(|_| l.check(5, 0, 10).allowed));
        let v = l.check(5, 0, 10);
        assert!(!v.allowed);
        let r = v.requests.unwrap();
        assert_eq!(r.remaining, 0);
        assert!(r.reset > Duration::from_secs(59));
        assert!(v.tokens.is_none());
        assert_eq!(rfc3339(1_795_330_801_500), "2026-11-22T07:00:01.500Z");
    }

    #[test]
    fn tokens_are_limited_too() {
        let l = Limiter::default();
        assert!(l.check(0, 100, 60).allowed);
        let refused = l.check(0, 100, 60);
        assert!(!refused.allowed);
        assert_eq!(refused.tokens.unwrap().remaining, 40);
        assert!(l.check(0, 100, 40).allowed);
    }
}
