//! A deployment's circuit breaker: closed while calls succeed, open for a
//! cooldown after `upstream.breaker_failures` consecutive failures, then
//! half-open with one probe call; a failed probe doubles the cooldown (up to
//! sixteen times `upstream.breaker_open_ms`), a good one closes it.

use std::time::Duration;

use tokio::time::Instant;

/// How long a half-open deployment whose probe is out is left alone.
pub(super) const PROBE_PAUSE: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Breaker {
    Closed { failures: u32 },
    Open { until: Instant, cooldown: Duration },
    HalfOpen { probing: bool, cooldown: Duration },
}

impl Breaker {
    pub(super) fn gauge(&self) -> f64 {
        match self {
            Breaker::Closed { .. } => 0.0,
            Breaker::HalfOpen { .. } => 1.0,
            Breaker::Open { .. } => 2.0,
        }
    }

    /// When the breaker lets a call through next; `None` when it does now.
    /// An open breaker whose cooldown is over turns half-open.
    pub(super) fn ready_at(&mut self, now: Instant) -> Option<Instant> {
        match *self {
            Breaker::Open { until, cooldown } if until <= now => {
                *self = Breaker::HalfOpen { probing: false, cooldown };
                None
            }
            Breaker::Open { until, .. } => Some(until),
            Breaker::HalfOpen { probing: true, .. } => Some(now + PROBE_PAUSE),
            _ => None,
        }
    }

    /// The breaker after a call that was `unhealthy` (5xx, timeout,
    /// connection error) or not.
    pub(super) fn after(
        self,
        unhealthy: bool,
        now: Instant,
        failures_to_open: u32,
        open: Duration,
        name: &str,
    ) -> Breaker {
        match (self, unhealthy) {
            (Breaker::HalfOpen { cooldown, .. }, true) => {
                let cooldown = (cooldown * 2).min(open * 16);
                tracing::warn!(deployment = %name, cooldown_ms = cooldown.as_millis() as u64, "probe failed; breaker open again");
                Breaker::Open { until: now + cooldown, cooldown }
            }
            (Breaker::Closed { failures }, true) if failures + 1 >= failures_to_open => {
                tracing::warn!(deployment = %name, failures = failures + 1, "breaker open");
                Breaker::Open { until: now + open, cooldown: open }
            }
            (Breaker::Closed { failures }, true) => Breaker::Closed { failures: failures + 1 },
            (b @ Breaker::Open { .. }, true) => b,
            (Breaker::HalfOpen { .. }, false) => {
                tracing::info!(deployment = %name, "probe succeeded; breaker closed");
                Breaker::Closed { failures: 0 }
            }
            (_, false) => Breaker::Closed { failures: 0 },
        }
    }
}
