//! Pools and their deployments as the worker sees them: which deployment
//! takes the next call (by weight, among those healthy and within budget),
//! each deployment's circuit breaker, its rate budget shared with every
//! other worker through NATS counters, and each pool's retry budget.
//! The weighted choice is in `choice.rs`.
//!
//! **Budgets** (`budget.rs`). A deployment's `rpm` is spent in windows of at least a
//! second (`60 / rpm` seconds when that is longer), each allowing its share
//! of the minute, counted in `sluice.rate.dep.rpm.<deployment>.<window>` on
//! the rates stream: a worker adds the calls it is about to make and gets
//! the window's total back, so all workers share one budget and the pace is
//! even instead of a burst at the top of each minute. The fetch loop
//! reserves a call before it fetches a job, so a pool whose budget is spent
//! is simply not fetched until its next window: its jobs stay in the queue,
//! other pools' jobs keep flowing. `tpm` is counted the same way in windows
//! of six seconds, charged with the job's estimate once it is fetched (its
//! size is not known before) and corrected by the real usage; a window over
//! its share stops the pool until the next one. The provider's own headers
//! (`x-ratelimit-*`, `anthropic-ratelimit-*`, `Retry-After`) lower the limit
//! when the provider's is lower, and a provider that says "none left" or
//! answers 429 fills the current window for every worker and blocks the
//! deployment here until its reset.
//!
//! **Breaker** (`breaker.rs`). After `upstream.breaker_failures` consecutive failures
//! (5xx, timeouts, connection errors) a deployment is left out for
//! `upstream.breaker_open_ms`; then one probe call is let through
//! (half-open): success closes the breaker, failure opens it again for twice
//! as long (up to 16 times). A breaker is per worker process.

mod breaker;
mod budget;
mod choice;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_core::config::{ConfigError, PoolConfig, UpstreamConfig, ms};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics as m;
use crate::upstream::client::{self, CallError, Client};
use crate::upstream::providers::RateInfo;
use breaker::Breaker;

/// Longest a provider's `Retry-After` or rate-limit reset pauses one of its
/// deployments: a provider that means longer (a daily quota) is probed once
/// per pause, one call, instead of the pool being shut for a day on one
/// header.
pub const MAX_PAUSE: Duration = Duration::from_secs(60);

pub use budget::Shared;
use budget::{RetryBudget, Window, effective};

/// How long a deployment at its concurrency limit is left alone.
const BUSY_PAUSE: Duration = Duration::from_millis(20);

struct Health {
    breaker: Breaker,
    /// Out of budget (or told so by the provider) until then.
    blocked_until: Option<Instant>,
    /// Limits the provider's headers reported, when lower than configured.
    learned_rpm: Option<u64>,
    learned_tpm: Option<u64>,
}

pub struct Deployment {
    pub client: Client,
    pub pool: String,
    token: String,
    weight: u32,
    rpm: u64,
    tpm: u64,
    concurrency: Option<Arc<Semaphore>>,
    health: Mutex<Health>,
    breaker_failures: u32,
    breaker_open: Duration,
    /// Share of the budget left unused (`upstream.budget_headroom`).
    headroom: f64,
}

impl Deployment {
    fn label(&self) -> [(&'static str, String); 2] {
        [("pool", self.pool.clone()), ("deployment", self.client.name.clone())]
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rpm(&self, h: &Health) -> u64 {
        effective(self.rpm, h.learned_rpm)
    }

    fn tpm(&self, h: &Health) -> u64 {
        effective(self.tpm, h.learned_tpm)
    }

    /// When this deployment can next take a call; `None` when it can now.
    fn ready_at(&self, now: Instant) -> Option<Instant> {
        let mut h = self.health();
        let blocked = h.blocked_until.filter(|t| *t > now);
        let breaker = h.breaker.ready_at(now);
        let busy = self.concurrency.as_ref().filter(|s| s.available_permits() == 0).map(|_| now + BUSY_PAUSE);
        [blocked, breaker, busy].into_iter().flatten().max()
    }

    fn block(&self, until: Instant) {
        let mut h = self.health();
        h.blocked_until = Some(h.blocked_until.map_or(until, |t| t.max(until)));
    }

    /// Takes up to `want` calls: a half-open breaker lets one probe through,
    /// the concurrency limit and the shared request budget cap the rest.
    async fn take(self: &Arc<Self>, want: usize, shared: Option<&Shared>) -> Vec<Lease> {
        let now = Instant::now();
        if want == 0 || self.ready_at(now).is_some() {
            return Vec::new();
        }
        let (mut n, probe, rpm) = {
            let mut h = self.health();
            let rpm = self.rpm(&h);
            match &mut h.breaker {
                Breaker::HalfOpen { probing, .. } => {
                    *probing = true;
                    (1, true, rpm)
                }
                _ => (want, false, rpm),
            }
        };
        let mut permits = Vec::new();
        if let Some(sem) = &self.concurrency {
            while permits.len() < n {
                match sem.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            n = permits.len();
        }
        if rpm > 0 && n > 0 {
            n = match shared {
                Some(s) => self.reserve_requests(s, rpm, n).await,
                None => n,
            };
        }
        if probe
            && n == 0
            && let Breaker::HalfOpen { probing, .. } = &mut self.health().breaker
        {
            *probing = false;
        }
        let mut permits = permits.into_iter();
        (0..n).map(|_| Lease { deployment: self.clone(), _permit: permits.next(), tpm_window: None }).collect()
    }

    /// Learns from a call's outcome and its rate-limit headers.
    pub fn record(&self, outcome: &Result<(), &CallError>, rate: &RateInfo, took: Duration, shared: Option<&Shared>) {
        let now = Instant::now();
        let [(_, pool), (_, name)] = self.label();
        let kind = match outcome {
            Ok(()) => "ok",
            Err(CallError::Rejected { .. } | CallError::Unsupported(_)) => "rejected",
            Err(CallError::Retryable { status: Some(429), .. }) => "rate_limited",
            Err(CallError::DeadlineExceeded) => "deadline",
            Err(CallError::Unanswered { .. }) => "unanswered",
            Err(_) => "error",
        };
        metrics::counter!(m::UPSTREAM_REQUESTS, "pool" => pool.clone(), "deployment" => name.clone(), "outcome" => kind)
            .increment(1);
        metrics::histogram!(m::UPSTREAM_SECONDS, "pool" => pool.clone(), "deployment" => name.clone())
            .record(took.as_secs_f64());
        let mut fill: Vec<Window> = Vec::new();
        let breaker = {
            let mut h = self.health();
            if let Some(l) = rate.limit_requests.filter(|l| *l > 0 && (self.rpm == 0 || *l < self.rpm)) {
                h.learned_rpm = Some(l);
            }
            if let Some(l) = rate.limit_tokens.filter(|l| *l > 0 && (self.tpm == 0 || *l < self.tpm)) {
                h.learned_tpm = Some(l);
            }
            let mut until: Option<Instant> = None;
            // A provider's word pauses the deployment for every tenant: at
            // most MAX_PAUSE at a time, then one call probes it again.
            let pause = |wait: Option<Duration>| Some(now + wait.unwrap_or(Duration::from_secs(1)).min(MAX_PAUSE));
            if let Err(CallError::Retryable { status: Some(429), retry_after, .. }) = outcome {
                until = pause(retry_after.or(rate.retry_after).or(rate.reset_requests));
            }
            if rate.remaining_requests == Some(0) {
                until = until.max(pause(rate.reset_requests));
            }
            if rate.remaining_tokens == Some(0) {
                until = until.max(pause(rate.reset_tokens));
            }
            if let Some(until) = until {
                h.blocked_until = Some(h.blocked_until.map_or(until, |t| t.max(until)));
                let rpm = self.rpm(&h);
                if rpm > 0 {
                    fill.push(self.rpm_window(rpm));
                }
            }
            if let Some(r) = rate.remaining_requests {
                metrics::gauge!(m::BUDGET_REMAINING, "pool" => pool.clone(), "deployment" => name.clone(), "kind" => "provider_requests")
                    .set(r as f64);
            }
            let unhealthy = matches!(outcome, Err(e) if e.is_unhealthy());
            h.breaker = h.breaker.after(unhealthy, now, self.breaker_failures, self.breaker_open, &name);
            h.breaker
        };
        metrics::gauge!(m::BREAKER_STATE, "pool" => pool, "deployment" => name).set(breaker.gauge());
        // The provider says there is nothing left: every worker's next
        // reservation in this window is refused.
        if let Some(s) = shared {
            for w in fill {
                s.counts.add(w.subject, w.limit);
            }
        }
    }
}

/// A call reserved on a deployment: its budget is counted, its concurrency
/// slot held until the lease is dropped.
pub struct Lease {
    pub deployment: Arc<Deployment>,
    _permit: Option<OwnedSemaphorePermit>,
    /// The tokens-per-minute window charged with the job's estimate.
    pub tpm_window: Option<String>,
}

impl Lease {
    /// Gives an unused reservation back to the shared budget.
    pub fn release(self, shared: Option<&Shared>) {
        let d = &self.deployment;
        let rpm = d.rpm(&d.health());
        if let (Some(s), true) = (shared, rpm > 0) {
            s.counts.add(d.rpm_window(rpm).subject, -1);
        }
        if let Breaker::HalfOpen { probing, .. } = &mut d.health().breaker {
            *probing = false;
        }
    }
}

pub struct Pool {
    pub name: String,
    deployments: Vec<Arc<Deployment>>,
    retry: Mutex<RetryBudget>,
}

impl Pool {
    /// A deployment has a shared budget (reserving costs a NATS round trip).
    pub fn budgeted(&self) -> bool {
        self.deployments.iter().any(|d| {
            let h = d.health();
            d.rpm(&h) > 0 || d.tpm(&h) > 0
        })
    }

    /// When a deployment of the pool can next take a call; `None` when one can now.
    pub fn ready_at(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut earliest: Option<Instant> = None;
        for d in &self.deployments {
            match d.ready_at(now) {
                None => return None,
                Some(t) => earliest = Some(earliest.map_or(t, |e| e.min(t))),
            }
        }
        earliest
    }

    /// Reserves up to `want` calls, spread over the ready deployments by
    /// weight, skipping those named in `exclude` (already tried).
    pub async fn reserve(&self, want: usize, exclude: &[String], shared: Option<&Shared>) -> Vec<Lease> {
        let now = Instant::now();
        let ready: Vec<&Arc<Deployment>> = self
            .deployments
            .iter()
            .filter(|d| !exclude.contains(&d.client.name) && d.ready_at(now).is_none())
            .collect();
        if ready.is_empty() {
            return Vec::new();
        }
        let weights: Vec<u64> = ready.iter().map(|d| u64::from(d.weight)).collect();
        let asked = choice::spread(&weights, want);
        let mut leases = Vec::with_capacity(want);
        let mut short = 0;
        let mut full = Vec::new();
        for (d, n) in ready.iter().zip(&asked) {
            let got = d.take(*n, shared).await;
            short += n - got.len();
            if got.len() == *n {
                full.push(*d);
            }
            leases.extend(got);
        }
        // What a deployment could not take goes to those that took all theirs.
        for d in full {
            if short == 0 {
                break;
            }
            let got = d.take(short, shared).await;
            short -= got.len();
            leases.extend(got);
        }
        leases
    }

    /// Counts a first attempt toward the retry budget.
    pub fn first_attempt(&self) {
        self.retry.lock().unwrap_or_else(|p| p.into_inner()).first_attempt();
    }

    /// Spends one retry from the budget; `false` when none is left.
    pub fn try_retry(&self) -> bool {
        let allowed = self.retry.lock().unwrap_or_else(|p| p.into_inner()).try_retry();
        if !allowed {
            metrics::counter!(m::RETRIES, "pool" => self.name.clone(), "kind" => "denied").increment(1);
        }
        allowed
    }

    pub fn deployments(&self) -> usize {
        self.deployments.len()
    }
}

/// Every configured pool, with the NATS counters that share its budgets.
pub struct Pools {
    by_name: HashMap<String, Arc<Pool>>,
    /// `None` only in unit tests: budgets are then not enforced.
    shared: Option<Shared>,
}

/// Every pool built from the config, checked before anything connects, not
/// yet given the NATS counters its budgets are shared through.
pub struct Configured {
    by_name: HashMap<String, Arc<Pool>>,
}

impl Configured {
    /// The pools, their budgets shared through these counters.
    pub fn with_budgets(self, shared: Shared) -> Pools {
        Pools { by_name: self.by_name, shared: Some(shared) }
    }

    /// The pools without shared budgets (`rpm` and `tpm` not enforced).
    #[cfg(test)]
    pub fn unbudgeted(self) -> Pools {
        Pools { by_name: self.by_name, shared: None }
    }
}

impl Pools {
    /// Builds every pool's deployments. `env` resolves `api_key_env`; a
    /// missing variable or unreadable key file is a config error naming the key.
    pub fn configure(
        pools: &[PoolConfig],
        settings: &UpstreamConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Configured, ConfigError> {
        let mut shared_http = HashMap::new();
        let budget = client::answer_budget(settings);
        let mut by_name = HashMap::new();
        for (i, pool) in pools.iter().enumerate() {
            let configs = pool.deployments();
            let mut deployments = Vec::with_capacity(configs.len());
            for (j, d) in configs.iter().enumerate() {
                let prefix = if pool.deployments.is_empty() {
                    format!("pools[{i}]")
                } else {
                    format!("pools[{i}].deployments[{j}]")
                };
                let client = client::build(&prefix, d, settings, &mut shared_http, &budget, env)?;
                let label = (pool.name.clone(), d.name.clone());
                metrics::gauge!(m::BREAKER_STATE, "pool" => label.0, "deployment" => label.1).set(0.0);
                deployments.push(Arc::new(Deployment {
                    client,
                    pool: pool.name.clone(),
                    token: sluice_core::wire::subjects::token(&d.name),
                    weight: d.weight,
                    rpm: d.rpm,
                    tpm: d.tpm,
                    concurrency: (d.max_concurrency > 0).then(|| Arc::new(Semaphore::new(d.max_concurrency))),
                    health: Mutex::new(Health {
                        breaker: Breaker::Closed { failures: 0 },
                        blocked_until: None,
                        learned_rpm: None,
                        learned_tpm: None,
                    }),
                    breaker_failures: settings.breaker_failures.max(1),
                    breaker_open: ms(settings.breaker_open_ms),
                    headroom: settings.budget_headroom,
                }));
            }
            let retry = RetryBudget::new(settings.retry_budget_min, settings.retry_budget_ratio);
            by_name.insert(
                pool.name.clone(),
                Arc::new(Pool { name: pool.name.clone(), deployments, retry: Mutex::new(retry) }),
            );
        }
        Ok(Configured { by_name })
    }

    pub fn shared(&self) -> Option<&Shared> {
        self.shared.as_ref()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.by_name.get(name)
    }
}

#[cfg(test)]
mod tests;
