//! Admission control: a tenant over its requests-per-minute, tokens-per-minute
//! or queued-jobs limit gets 429 with `Retry-After` before anything is
//! queued, so nothing accepted is ever dropped later for a limit.
//!
//! The counts live in NATS counter streams ([`sluice_core::counters`]), not in
//! this process, so a limit holds across every ingress replica. The checks of
//! one request run concurrently: one NATS round trip, paid only by tenants
//! that have limits. A rejected request takes its increments back, so it
//! does not count against the tenant.
//!
//! Rates use a sliding window over fixed minutes: the estimate is
//! `previous_minute × (1 − elapsed fraction) + this_minute`. It admits at most
//! the limit in any minute-long window (up to the approximation), with no
//! burst of twice the limit at a minute's edge.

use std::collections::HashMap;
use std::sync::Mutex;

use sluice_core::counters::{CounterError, Counters, Rate};
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::now_ms;
use sluice_core::tasks::Tasks;
use sluice_core::tenant::TenantPolicy;
use sluice_core::wire::subjects::{queued as queued_subject, tenant_rate as rate_subject};
use uuid::Uuid;

use crate::metrics as m;

const MINUTE_MS: u64 = 60_000;

pub struct Admission {
    counters: Counters,
    tasks: Tasks,
    /// The previous minute's total per tenant and rate, read once a minute.
    /// Held only for a map lookup, never across an await; touched only for
    /// tenants with rate limits.
    previous: Mutex<HashMap<(Rate, Uuid), (u64, i64)>>,
}

/// What a request was counted in, so a failed submit can take it back and
/// the worker can release it.
#[derive(Debug, Default)]
pub struct Admitted {
    pub queued_counted: bool,
    pub tpm_window: Option<u64>,
    applied: Vec<(String, i64)>,
}

/// One limit's verdict.
struct Check {
    /// The increment made (to take back on rejection).
    applied: (String, i64),
    over: Option<(ErrorCode, String, u64)>,
}

impl Admission {
    pub fn new(counters: Counters, tasks: Tasks) -> Self {
        Self { counters, tasks, previous: Mutex::new(HashMap::new()) }
    }

    /// Counts the request against the tenant's limits, or refuses it.
    pub async fn admit(&self, tenant: Uuid, policy: &TenantPolicy, est_tokens: u64) -> Result<Admitted, ApiError> {
        if !policy.has_admission_limits() {
            return Ok(Admitted::default());
        }
        let now = now_ms();
        let minute = now / MINUTE_MS;
        let elapsed = (now % MINUTE_MS) as f64 / MINUTE_MS as f64;
        let rpm = async {
            match policy.rpm {
                Some(limit) => Some(self.rate(Rate::Requests, tenant, minute, elapsed, 1, limit).await),
                None => None,
            }
        };
        let tpm = async {
            match policy.tpm {
                Some(limit) => Some(self.rate(Rate::Tokens, tenant, minute, elapsed, est_tokens.max(1), limit).await),
                None => None,
            }
        };
        let queued = async {
            match policy.max_queued {
                Some(cap) => Some(self.queued(tenant, cap).await),
                None => None,
            }
        };
        let (rpm, tpm, queued) = tokio::join!(rpm, tpm, queued);

        let mut admitted = Admitted { queued_counted: false, tpm_window: None, applied: Vec::new() };
        let mut refusal: Option<ApiError> = None;
        for (which, result) in [("rpm", rpm), ("tpm", tpm), ("queued", queued)] {
            match result {
                None => {}
                Some(Ok(check)) => {
                    admitted.applied.push(check.applied);
                    if let Some((code, message, retry)) = check.over {
                        refusal.get_or_insert_with(|| ApiError::new(code, message).retry_after(retry));
                    } else if which == "queued" {
                        admitted.queued_counted = true;
                    } else if which == "tpm" {
                        admitted.tpm_window = Some(minute);
                    }
                }
                Some(Err(error)) => {
                    metrics::counter!(m::ADMISSION_ERRORS).increment(1);
                    tracing::warn!(%error, %tenant, limit = which, "admission counter unavailable");
                    refusal.get_or_insert_with(|| {
                        ApiError::new(ErrorCode::QueueUnavailable, "admission control is unavailable; retry shortly")
                            .retry_after(1)
                    });
                }
            }
        }
        match refusal {
            None => Ok(admitted),
            Some(error) => {
                metrics::counter!(m::ADMISSION_REJECTED, "tenant" => policy.name.clone(), "reason" => error.code.as_str())
                    .increment(1);
                self.rollback(admitted);
                Err(error)
            }
        }
    }

    /// Takes a request's increments back (it was refused, or never queued).
    pub fn rollback(&self, admitted: Admitted) {
        if admitted.applied.is_empty() {
            return;
        }
        let counters = self.counters.clone();
        self.tasks.spawn(async move {
            for (subject, delta) in admitted.applied {
                if let Err(error) = counters.add(&subject, -delta).await {
                    metrics::counter!(m::ADMISSION_ERRORS).increment(1);
                    tracing::warn!(%error, subject, "could not take back an admission count");
                }
            }
        });
    }

    async fn queued(&self, tenant: Uuid, cap: u64) -> Result<Check, CounterError> {
        let subject = queued_subject(tenant);
        let total = self.counters.add(&subject, 1).await?;
        let over = (total > cap as i64).then(|| {
            (
                ErrorCode::TenantQueuedCap,
                format!("you have {cap} jobs queued or running, your limit; retry when some have finished"),
                2,
            )
        });
        Ok(Check { applied: (subject, 1), over })
    }

    async fn rate(
        &self,
        rate: Rate,
        tenant: Uuid,
        minute: u64,
        elapsed: f64,
        cost: u64,
        limit: u64,
    ) -> Result<Check, CounterError> {
        let subject = rate_subject(rate, tenant, minute);
        let add = self.counters.add(&subject, cost as i64);
        let previous = self.previous_total(rate, tenant, minute);
        let (current, previous) = tokio::try_join!(add, previous)?;
        let estimate = previous as f64 * (1.0 - elapsed) + current as f64;
        let over = (estimate > limit as f64).then(|| {
            let retry =
                retry_after(previous as f64, (current - cost as i64) as f64, cost as f64, limit as f64, elapsed);
            let (code, what) = match rate {
                Rate::Requests => (ErrorCode::TenantRequestRate, "requests"),
                Rate::Tokens => (ErrorCode::TenantTokenRate, "tokens"),
            };
            (code, format!("rate limit reached: {limit} {what} per minute; retry after {retry} s"), retry)
        });
        Ok(Check { applied: (subject, cost as i64), over })
    }

    async fn previous_total(&self, rate: Rate, tenant: Uuid, minute: u64) -> Result<i64, CounterError> {
        let cached = self.previous.lock().ok().and_then(|map| map.get(&(rate, tenant)).copied());
        if let Some((m, total)) = cached
            && m + 1 == minute
        {
            return Ok(total);
        }
        let (total, _) = self.counters.get(&rate_subject(rate, tenant, minute.saturating_sub(1))).await?;
        if let Ok(mut map) = self.previous.lock() {
            map.insert((rate, tenant), (minute.saturating_sub(1), total));
        }
        Ok(total)
    }
}

/// Seconds until a request of `cost` fits: later this minute, as the previous
/// minute's weight fades, or in the next minute. At least 1, at most 120.
fn retry_after(previous: f64, before: f64, cost: f64, limit: f64, elapsed: f64) -> u64 {
    let room = limit - before - cost;
    let secs = if room >= 0.0 && previous > 0.0 {
        60.0 * (1.0 - elapsed - room / previous)
    } else if cost > limit {
        60.0
    } else {
        // Next minute, this minute's total becomes the fading previous one.
        let needed = if before > 0.0 { (1.0 - (limit - cost) / before).max(0.0) } else { 0.0 };
        60.0 * (1.0 - elapsed) + 60.0 * needed
    };
    (secs.ceil() as u64).clamp(1, 120)
}

#[cfg(test)]
mod tests {
    use super::retry_after;

    #[test]
    fn retry_after_waits_for_the_window_to_slide() {
        // Limit 10, all 10 used this minute, 15 s in: the next minute starts
        // in 45 s, and then the 10 still weigh fully, fading by 1 per 6 s.
        assert_eq!(retry_after(0.0, 10.0, 1.0, 10.0, 0.25), 51);
        // 10 used in the previous minute, none now, 30 s in: 5 still weigh;
        // fits once they weigh 9, which they already do.
        assert_eq!(retry_after(10.0, 0.0, 1.0, 10.0, 0.5), 1);
        // A request larger than the whole limit waits a minute (and fails again).
        assert_eq!(retry_after(0.0, 0.0, 20.0, 10.0, 0.0), 60);
    }
}
