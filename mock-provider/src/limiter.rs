//! The mock's requests-per-minute limit, as a provider enforces it: at most
//! `rpm` admitted requests in any 60-second window (a sliding log of admitted
//! requests), refused ones not counted. Every answer carries the state in
//! the provider's headers: OpenAI's `x-ratelimit-{limit,remaining,reset}-requests`
//! or Anthropic's `anthropic-ratelimit-requests-{limit,remaining,reset}`, and
//! a 429 carries `Retry-After`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Limiter {
    admitted: Mutex<VecDeque<Instant>>,
}

/// What the limiter decided for one request.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Until the oldest admitted request leaves the window (a slot frees).
    pub reset: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Style {
    OpenAi,
    Anthropic,
}

impl Limiter {
    pub fn check(&self, rpm: u64) -> Verdict {
        let now = Instant::now();
        let mut log = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        while log.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
            log.pop_front();
        }
        let allowed = (log.len() as u64) < rpm;
        if allowed {
            log.push_back(now);
        }
        let reset = log.front().map_or(Duration::ZERO, |t| (*t + WINDOW).saturating_duration_since(now));
        Verdict { allowed, limit: rpm, remaining: rpm.saturating_sub(log.len() as u64), reset }
    }
}

impl Verdict {
    /// Adds the rate-limit headers in the provider's style.
    pub fn headers(&self, h: &mut HeaderMap, style: Style) {
        let mut set = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        };
        match style {
            Style::OpenAi => {
                set("x-ratelimit-limit-requests", self.limit.to_string());
                set("x-ratelimit-remaining-requests", self.remaining.to_string());
                set("x-ratelimit-reset-requests", format!("{:.3}s", self.reset.as_secs_f64()));
            }
            Style::Anthropic => {
                set("anthropic-ratelimit-requests-limit", self.limit.to_string());
                set("anthropic-ratelimit-requests-remaining", self.remaining.to_string());
                let at = std::time::SystemTime::now() + self.reset;
                let ms = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
                set("anthropic-ratelimit-requests-reset", rfc3339(ms));
            }
        }
        if !self.allowed {
            set("retry-after", self.reset.as_secs_f64().ceil().max(1.0).to_string());
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
        assert!((0..5).all(|_| l.check(5).allowed));
        let v = l.check(5);
        assert!(!v.allowed);
        assert_eq!(v.remaining, 0);
        assert!(v.reset > Duration::from_secs(59));
        assert_eq!(rfc3339(1_795_330_801_500), "2026-11-22T07:00:01.500Z");
    }
}
