//! How workers call the providers: timeouts, connection pooling, the
//! largest answer read, breakers, the retry budget and budget headroom.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub connect_timeout_ms: u64,
    /// Whole-call timeout of one upstream request (10 minutes, as the
    /// official SDKs wait): a non-streamed answer's headers come only once
    /// the provider has made the whole answer, so this is what bounds a long
    /// generation.
    pub request_timeout_ms: u64,
    /// Time allowed until a streamed call's response headers arrive (a
    /// provider sends them as the stream starts). Not applied to
    /// non-streamed calls.
    pub response_header_timeout_ms: u64,
    /// Times a job's call that timed out or broke off after its request was
    /// sent (the provider may have done and billed the work) is made again,
    /// on another deployment of the pool when there is one; past it the job
    /// fails with 504 `timeout`. Such calls are never handed back to the
    /// queue, are counted in `sluice_worker_unanswered_calls_total` and on
    /// the job's ledger row (`unanswered_calls`). A worker that dies
    /// mid-call is another matter: the job is redelivered and called again.
    pub max_unanswered_repeats: u32,
    /// Largest answer read from an upstream (a non-streamed body); a larger
    /// one is not read further and the job fails with 502
    /// `upstream_response_too_large`, so no answer can exhaust a worker.
    pub max_response_bytes: usize,
    /// The large non-streamed answers one worker holds at once: an answer
    /// past 1 MiB takes its size from this budget before it is read (its
    /// whole `max_response_bytes` while its length is unknown, the rest given
    /// back once read) and, when it succeeded, holds it until its job is done;
    /// a declared one waits for room up to the job's deadline. So one
    /// tenant's many large answers cannot exhaust the worker. Not counted:
    /// answers up to 1 MiB (bounded by `worker.max_in_flight`), a refusal's
    /// body once classified, a translated copy. At least `max_response_bytes`.
    pub max_response_memory_bytes: usize,
    /// Idle keep-alive connections kept per upstream host.
    pub pool_max_idle_per_host: usize,
    pub pool_idle_timeout_ms: u64,
    pub tcp_keepalive_ms: u64,
    /// Consecutive failures (5xx, timeouts, connection errors) of one
    /// deployment, seen by one worker, that open its circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps the deployment out before one probe
    /// call is let through (half-open); doubled after each failed probe, up
    /// to 16 times this.
    pub breaker_open_ms: u64,
    /// Retries (failovers and redeliveries after a failure) allowed per first
    /// attempt, over a pool's recent calls; past it a failed job waits the
    /// longest backoff instead of retrying at once.
    pub retry_budget_ratio: f64,
    /// Retries always allowed on top of the ratio (a quiet pool can still retry).
    pub retry_budget_min: u32,
    /// Share of each deployment's `rpm`/`tpm` left unused, so that timing
    /// jitter between Sluice's windows and the provider's never meets the
    /// provider's edge (0.025: calls are paced at 97.5 % of the limit).
    pub budget_headroom: f64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 5_000,
            request_timeout_ms: 600_000,
            response_header_timeout_ms: 30_000,
            max_unanswered_repeats: 1,
            max_response_bytes: 128 << 20,
            max_response_memory_bytes: 256 << 20,
            pool_max_idle_per_host: 512,
            pool_idle_timeout_ms: 90_000,
            tcp_keepalive_ms: 30_000,
            breaker_failures: 5,
            breaker_open_ms: 5_000,
            retry_budget_ratio: 0.2,
            retry_budget_min: 10,
            budget_headroom: 0.025,
        }
    }
}
