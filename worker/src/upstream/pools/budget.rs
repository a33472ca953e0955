//! A deployment's rate budgets, shared by every worker through NATS
//! counters (see the module above for how windows pace the minute), and a
//! pool's retry budget.

use std::time::Duration;

use sluice_core::counters::Counters;
use sluice_core::wire::subjects::{self, Rate};
use tokio::time::Instant;

use super::Deployment;
use crate::exec::counts::CountSink;
use crate::metrics as m;

/// Window of the shared tokens-per-minute count.
pub(super) const TPM_WINDOW_MS: u64 = 6_000;
/// A budget that cannot be counted (NATS unreachable) is not risked for this long.
const COUNT_FAILED_PAUSE: Duration = Duration::from_secs(1);

/// The NATS side of the budgets.
pub struct Shared {
    pub counters: Counters,
    pub counts: CountSink,
}

/// A window of a shared budget: its counter subject, its limit, its end.
pub(super) struct Window {
    pub(super) subject: String,
    pub(super) limit: i64,
    pub(super) ends: Instant,
}

/// The current window of a budget of `per_minute` (already less headroom)
/// counted in windows of `window_ms`. A window's limit is its share of the
/// minute, the fractions carried over so that the windows of a minute add
/// up to the budget (19.5 per window alternates 19 and 20).
pub(super) fn window(kind: Rate, token: &str, per_minute: f64, window_ms: u64) -> Window {
    let now = sluice_core::now_ms();
    let index = now / window_ms;
    let per_window = per_minute * window_ms as f64 / 60_000.0;
    let limit = ((per_window * (index + 1) as f64).floor() - (per_window * index as f64).floor()) as i64;
    let ends = Instant::now() + Duration::from_millis((index + 1) * window_ms - now);
    Window { subject: subjects::deployment_rate(kind, token, index), limit, ends }
}

/// The lower of the configured limit and the one the provider reported
/// (0: no limit configured).
pub(super) fn effective(configured: u64, learned: Option<u64>) -> u64 {
    match (configured, learned) {
        (0, Some(l)) => l,
        (c, Some(l)) => c.min(l),
        (c, None) => c,
    }
}

impl Deployment {
    /// Windows of a second, or of one call when the limit is below one a second.
    pub(super) fn rpm_window(&self, rpm: u64) -> Window {
        let window_ms = 60_000u64.div_ceil(rpm.max(1)).max(1_000);
        window(Rate::Requests, &self.token, rpm as f64 * (1.0 - self.headroom), window_ms)
    }

    /// Adds `n` calls to the current request window; returns how many fit.
    pub(super) async fn reserve_requests(&self, s: &Shared, rpm: u64, n: usize) -> usize {
        let w = self.rpm_window(rpm);
        match s.counters.add(&w.subject, n as i64).await {
            Ok(total) => {
                let over = (total - w.limit).clamp(0, n as i64);
                if over > 0 {
                    s.counts.add(w.subject.clone(), -over);
                    self.block(w.ends);
                }
                if total >= w.limit {
                    self.block(w.ends);
                }
                metrics::gauge!(m::BUDGET_REMAINING, "pool" => self.pool.clone(), "deployment" => self.client.name.clone(), "kind" => "requests")
                    .set((w.limit - total.min(w.limit)) as f64);
                n - over as usize
            }
            Err(error) => {
                metrics::counter!(m::COUNTER_FAILURES).increment(1);
                tracing::warn!(%error, deployment = %self.client.name, "cannot count the deployment's budget; pausing it");
                self.block(Instant::now() + COUNT_FAILED_PAUSE);
                0
            }
        }
    }

    /// Counts a fetched job's estimated tokens in the shared window; a window
    /// over its share blocks the deployment until the next one. Returns the
    /// window's subject, to correct by the real usage.
    pub async fn charge_tokens(&self, shared: &Shared, estimate: u64) -> Option<String> {
        let tpm = self.tpm(&self.health());
        if tpm == 0 {
            return None;
        }
        let w = window(Rate::Tokens, &self.token, tpm as f64 * (1.0 - self.headroom), TPM_WINDOW_MS);
        match shared.counters.add(&w.subject, sluice_core::counters::delta(estimate)).await {
            Ok(total) => {
                if total >= w.limit {
                    self.block(w.ends);
                }
                metrics::gauge!(m::BUDGET_REMAINING, "pool" => self.pool.clone(), "deployment" => self.client.name.clone(), "kind" => "tokens")
                    .set((w.limit - total.min(w.limit)) as f64);
                Some(w.subject)
            }
            Err(error) => {
                metrics::counter!(m::COUNTER_FAILURES).increment(1);
                tracing::warn!(%error, deployment = %self.client.name, "cannot count the deployment's tokens");
                None
            }
        }
    }
}

/// Retries allowed as a share of first attempts (`upstream.retry_budget_ratio`),
/// with a floor of `upstream.retry_budget_min` that is also the burst.
pub(super) struct RetryBudget {
    tokens: f64,
    cap: f64,
    ratio: f64,
}

impl RetryBudget {
    pub(super) fn new(min: u32, ratio: f64) -> Self {
        let min = f64::from(min.max(1));
        Self { tokens: min, cap: min, ratio }
    }

    pub(super) fn first_attempt(&mut self) {
        self.tokens = (self.tokens + self.ratio).min(self.cap);
    }

    /// Spends one retry; `false` when none is left.
    pub(super) fn try_retry(&mut self) -> bool {
        // (a float sum of ratios may fall a hair short of a whole retry)
        let allowed = self.tokens >= 1.0 - 1e-9;
        if allowed {
            self.tokens = (self.tokens - 1.0).max(0.0);
        }
        allowed
    }
}
