//! Pools and their deployments as the worker sees them: which deployment
//! takes the next call (by weight, among those healthy and within budget),
//! each deployment's circuit breaker, its rate budget shared with every
//! other worker through NATS counters, and each pool's retry budget.
//!
//! **Budgets.** A deployment's `rpm` is spent in windows of at least a
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
//! **Breaker.** After `upstream.breaker_failures` consecutive failures
//! (5xx, timeouts, connection errors) a deployment is left out for
//! `upstream.breaker_open_ms`; then one probe call is let through
//! (half-open): success closes the breaker, failure opens it again for twice
//! as long (up to 16 times). A breaker is per worker process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sluice_core::config::{ConfigError, PoolConfig, UpstreamConfig, ms};
use sluice_core::counters::Counters;
use sluice_core::wire::subjects::{self, Rate};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::exec::counts::CountSink;
use crate::metrics as m;
use crate::upstream::client::{self, CallError, Client};
use crate::upstream::providers::RateInfo;

/// Window of the shared tokens-per-minute count.
const TPM_WINDOW_MS: u64 = 6_000;
/// How long a deployment at its concurrency limit is left alone.
const BUSY_PAUSE: Duration = Duration::from_millis(20);
/// A budget that cannot be counted (NATS unreachable) is not risked for this long.
const COUNT_FAILED_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Breaker {
    Closed { failures: u32 },
    Open { until: Instant, cooldown: Duration },
    HalfOpen { probing: bool, cooldown: Duration },
}

impl Breaker {
    fn gauge(&self) -> f64 {
        match self {
            Breaker::Closed { .. } => 0.0,
            Breaker::HalfOpen { .. } => 1.0,
            Breaker::Open { .. } => 2.0,
        }
    }
}

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

/// A window of a shared budget: its counter subject, its limit, its end.
struct Window {
    subject: String,
    limit: i64,
    ends: Instant,
}

/// The current window of a budget of `per_minute` (already less headroom)
/// counted in windows of `window_ms`. A window's limit is its share of the
/// minute, the fractions carried over so that the windows of a minute add
/// up to the budget (19.5 per window alternates 19 and 20).
fn window(kind: Rate, token: &str, per_minute: f64, window_ms: u64) -> Window {
    let now = sluice_core::now_ms();
    let index = now / window_ms;
    let per_window = per_minute * window_ms as f64 / 60_000.0;
    let limit = ((per_window * (index + 1) as f64).floor() - (per_window * index as f64).floor()) as i64;
    let ends = Instant::now() + Duration::from_millis((index + 1) * window_ms - now);
    Window { subject: subjects::deployment_rate(kind, token, index), limit, ends }
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

    /// Windows of a second, or of one call when the limit is below one a second.
    fn rpm_window(&self, rpm: u64) -> Window {
        let window_ms = 60_000u64.div_ceil(rpm.max(1)).max(1_000);
        window(Rate::Requests, &self.token, rpm as f64 * (1.0 - self.headroom), window_ms)
    }

    /// When this deployment can next take a call; `None` when it can now.
    fn ready_at(&self, now: Instant) -> Option<Instant> {
        let mut h = self.health();
        let blocked = h.blocked_until.filter(|t| *t > now);
        let breaker = match h.breaker {
            Breaker::Open { until, cooldown } if until <= now => {
                h.breaker = Breaker::HalfOpen { probing: false, cooldown };
                None
            }
            Breaker::Open { until, .. } => Some(until),
            Breaker::HalfOpen { probing: true, .. } => Some(now + BUSY_PAUSE),
            _ => None,
        };
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

    async fn reserve_requests(&self, s: &Shared, rpm: u64, n: usize) -> usize {
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
        match shared.counters.add(&w.subject, estimate as i64).await {
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

    /// Learns from a call's outcome and its rate-limit headers.
    pub fn record(&self, outcome: &Result<(), &CallError>, rate: &RateInfo, took: Duration, shared: Option<&Shared>) {
        let now = Instant::now();
        let [(_, pool), (_, name)] = self.label();
        let kind = match outcome {
            Ok(()) => "ok",
            Err(CallError::Rejected { .. } | CallError::Unsupported(_)) => "rejected",
            Err(CallError::Retryable { status: Some(429), .. }) => "rate_limited",
            Err(CallError::DeadlineExceeded) => "deadline",
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
            if let Err(CallError::Retryable { status: Some(429), retry_after, .. }) = outcome {
                let wait = retry_after.or(rate.retry_after).or(rate.reset_requests).unwrap_or(Duration::from_secs(1));
                until = Some(now + wait);
            }
            if rate.remaining_requests == Some(0) {
                until = until.max(Some(now + rate.reset_requests.unwrap_or(Duration::from_secs(1))));
            }
            if rate.remaining_tokens == Some(0) {
                until = until.max(Some(now + rate.reset_tokens.unwrap_or(Duration::from_secs(1))));
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
            h.breaker = match (h.breaker, unhealthy) {
                (Breaker::HalfOpen { cooldown, .. }, true) => {
                    let cooldown = (cooldown * 2).min(self.breaker_open * 16);
                    tracing::warn!(deployment = %name, cooldown_ms = cooldown.as_millis() as u64, "probe failed; breaker open again");
                    Breaker::Open { until: now + cooldown, cooldown }
                }
                (Breaker::Closed { failures }, true) if failures + 1 >= self.breaker_failures => {
                    tracing::warn!(deployment = %name, failures = failures + 1, "breaker open");
                    Breaker::Open { until: now + self.breaker_open, cooldown: self.breaker_open }
                }
                (Breaker::Closed { failures }, true) => Breaker::Closed { failures: failures + 1 },
                (b @ Breaker::Open { .. }, true) => b,
                (Breaker::HalfOpen { .. }, false) => {
                    tracing::info!(deployment = %name, "probe succeeded; breaker closed");
                    Breaker::Closed { failures: 0 }
                }
                (_, false) => Breaker::Closed { failures: 0 },
            };
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

fn effective(configured: u64, learned: Option<u64>) -> u64 {
    match (configured, learned) {
        (0, Some(l)) => l,
        (c, Some(l)) => c.min(l),
        (c, None) => c,
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

/// The NATS side of the budgets.
pub struct Shared {
    pub counters: Counters,
    pub counts: CountSink,
}

struct RetryBudget {
    tokens: f64,
    cap: f64,
    ratio: f64,
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
        let total: u64 = ready.iter().map(|d| u64::from(d.weight)).sum();
        let mut asked = vec![0usize; ready.len()];
        for _ in 0..want {
            let mut r = random() % total.max(1);
            let i = ready
                .iter()
                .position(|d| {
                    let w = u64::from(d.weight);
                    if r < w {
                        true
                    } else {
                        r -= w;
                        false
                    }
                })
                .unwrap_or(0);
            asked[i] += 1;
        }
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
        let mut r = self.retry.lock().unwrap_or_else(|p| p.into_inner());
        r.tokens = (r.tokens + r.ratio).min(r.cap);
    }

    /// Spends one retry from the budget; `false` when none is left.
    pub fn try_retry(&self) -> bool {
        let mut r = self.retry.lock().unwrap_or_else(|p| p.into_inner());
        // (a float sum of ratios may fall a hair short of a whole retry)
        let allowed = r.tokens >= 1.0 - 1e-9;
        if allowed {
            r.tokens = (r.tokens - 1.0).max(0.0);
        } else {
            metrics::counter!(m::RETRIES, "pool" => self.name.clone(), "kind" => "denied").increment(1);
        }
        allowed
    }

    pub fn deployments(&self) -> usize {
        self.deployments.len()
    }
}

/// Every configured pool, with the NATS counters attached once connected.
pub struct Pools {
    by_name: HashMap<String, Arc<Pool>>,
    shared: OnceLock<Shared>,
}

impl Pools {
    /// Builds every pool's deployments. `env` resolves `api_key_env`; a
    /// missing variable or unreadable key file is a config error naming the key.
    pub fn new(
        pools: &[PoolConfig],
        settings: &UpstreamConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut shared_http = HashMap::new();
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
                let client = client::build(&prefix, d, settings, &mut shared_http, env)?;
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
            let min = f64::from(settings.retry_budget_min.max(1));
            let retry = RetryBudget { tokens: min, cap: min, ratio: settings.retry_budget_ratio };
            by_name.insert(
                pool.name.clone(),
                Arc::new(Pool { name: pool.name.clone(), deployments, retry: Mutex::new(retry) }),
            );
        }
        Ok(Self { by_name, shared: OnceLock::new() })
    }

    /// Attaches the shared counters; until then budgets are not enforced.
    pub fn attach(&self, counters: Counters, counts: CountSink) {
        let _ = self.shared.set(Shared { counters, counts });
    }

    pub fn shared(&self) -> Option<&Shared> {
        self.shared.get()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.by_name.get(name)
    }
}

/// A cheap pseudo-random number (splitmix64 over a shared counter): good
/// enough to spread calls by weight.
fn random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let mut x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed) ^ u64::from(std::process::id());
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests;
