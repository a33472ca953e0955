//! What one attempt's result means for the job: an answer to send (the
//! provider's, its refusal, or Sluice's own error) or another attempt after
//! a delay; and what a failed outcome records.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Deserialize;
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::event::{JobStatus, Usage};
use sluice_core::wire::envelope::Envelope;
use sluice_core::wire::reply;
use tokio::time::Instant;

use bytes::Bytes;

use crate::exec::job::{Called, JobContext};
use crate::exec::stream::Relayed;
use crate::metrics as m;
use crate::upstream::client::{CallError, Held};

pub(crate) enum Outcome {
    /// `held`: the answer's share of the worker's answer budget, kept until
    /// the answer is sent on and stored.
    Answered {
        status: JobStatus,
        outcome: reply::Outcome,
        upstream_status: Option<u16>,
        usage: Usage,
        held: Held,
    },
    Retry {
        delay: Duration,
        reason: &'static str,
    },
}

/// What one attempt's calls mean for the job; `None` when the worker is
/// stopping and handed the job back.
pub(crate) fn of_call(
    ctx: &JobContext,
    env: &Envelope,
    pool: &crate::upstream::pools::Pool,
    called: Called,
    attempt: u32,
    deadline: Instant,
) -> Option<Outcome> {
    Some(match called {
        Called::HandedBack => return None,
        Called::NoDeployment(ready_at) => {
            // Every deployment is out of budget or unhealthy: back to the
            // queue until one is ready (the fetch loop skips the pool
            // meanwhile, so this happens only to jobs already taken).
            let delay = ready_at
                .map_or(ctx.retry_min, |t| t.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(50));
            if attempt >= ctx.max_attempts {
                // The last attempt: the provider's limits are the answer
                // (429 with the wait), not a generic "gave up".
                let error = ApiError::new(
                    ErrorCode::UpstreamRateLimited,
                    format!("no deployment of pool {} had capacity within {} attempts", pool.name, ctx.max_attempts),
                )
                .retry_after(delay.as_secs().clamp(1, 86_400));
                return Some(failed(error, None));
            }
            Outcome::Retry { delay, reason: "no_deployment_ready" }
        }
        Called::Answered(result) => classify(ctx, env, pool, result, attempt, deadline),
        Called::Streamed(Relayed { usage, error: None }) => Outcome::Answered {
            status: JobStatus::Completed,
            outcome: reply::Outcome::Body { status: 200, body: Bytes::new() },
            upstream_status: Some(200),
            usage,
            held: Held::default(),
        },
        Called::Streamed(Relayed { usage, error: Some(error) }) => Outcome::Answered {
            status: JobStatus::Failed,
            outcome: reply::Outcome::Error(error),
            upstream_status: Some(200),
            usage,
            held: Held::default(),
        },
    })
}

pub(crate) fn failed(error: ApiError, upstream_status: Option<u16>) -> Outcome {
    Outcome::Answered {
        status: JobStatus::Failed,
        outcome: reply::Outcome::Error(error),
        upstream_status,
        usage: Usage::default(),
        held: Held::default(),
    }
}

/// The error code and message a failed outcome records.
pub(crate) fn failure_of(outcome: &reply::Outcome) -> Option<(&'static str, String)> {
    match outcome {
        reply::Outcome::Error(e) => Some((e.code.as_str(), e.message.clone())),
        reply::Outcome::Body { status: 200..=299, .. } | reply::Outcome::Stored { status: 200..=299, .. } => None,
        reply::Outcome::Stored { body, .. } => {
            Some((ErrorCode::InvalidRequest.as_str(), format!("the provider refused ({} bytes)", body.size)))
        }
        reply::Outcome::Body { body, .. } => Some((
            ErrorCode::InvalidRequest.as_str(),
            String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        )),
    }
}

/// The message of a provider's error body (`error.message`, in either API's
/// shape), or its first bytes.
fn provider_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Envelope {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        message: String,
    }
    serde_json::from_slice::<Envelope>(body)
        .map(|e| e.error.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

fn classify(
    ctx: &JobContext,
    env: &Envelope,
    pool: &crate::upstream::pools::Pool,
    result: Result<crate::upstream::client::Answer, CallError>,
    attempt: u32,
    deadline: Instant,
) -> Outcome {
    match result {
        Ok(answer) if !answer.json && ctx.bodies.too_large_for_a_message(answer.body.len()) => {
            // Kept apart, it would be a job's result: it must be JSON.
            failed(ApiError::new(ErrorCode::UpstreamError, "the provider's answer was not JSON"), Some(answer.status))
        }
        Ok(answer) => Outcome::Answered {
            status: JobStatus::Completed,
            usage: answer.usage,
            upstream_status: Some(answer.status),
            outcome: reply::Outcome::Body { status: answer.status, body: answer.body },
            held: answer.held,
        },
        // A provider of the client's API refused: its own words, as they came.
        Err(CallError::Rejected { status, body, native: true }) => Outcome::Answered {
            status: JobStatus::Failed,
            outcome: reply::Outcome::Body { status, body },
            upstream_status: Some(status),
            usage: Usage::default(),
            held: Held::default(),
        },
        // One of the other API: its message, in the client's envelope.
        Err(CallError::Rejected { status, body, native: false }) => {
            failed(ApiError::new(ErrorCode::InvalidRequest, provider_message(&body)).with_status(status), Some(status))
        }
        Err(CallError::Unsupported(e)) => {
            let mut error = ApiError::new(ErrorCode::InvalidRequest, e.to_string());
            error.param = e.param();
            failed(error, None)
        }
        // The same request would bring the same answer: not retried.
        Err(CallError::TooLarge { limit }) => {
            metrics::counter!(m::UPSTREAM_FAILURES, "pool" => env.pool.clone(), "reason" => "too_large").increment(1);
            let message = format!("the upstream's answer is larger than {limit} bytes (upstream.max_response_bytes)");
            failed(ApiError::new(ErrorCode::UpstreamResponseTooLarge, message), None)
        }
        Err(CallError::DeadlineExceeded) => {
            metrics::counter!(m::UPSTREAM_FAILURES, "pool" => env.pool.clone(), "reason" => "deadline").increment(1);
            failed(ApiError::new(ErrorCode::Timeout, "the upstream did not answer before the request's deadline"), None)
        }
        // Called as many times as `upstream.max_unanswered_repeats` allows:
        // another call could be billed again.
        Err(CallError::Unanswered { reason }) => {
            metrics::counter!(m::UPSTREAM_FAILURES, "pool" => env.pool.clone(), "reason" => reason).increment(1);
            let message = format!(
                "the upstream's answer did not come ({reason}) within upstream.request_timeout_ms; \
                 the call is not made again past upstream.max_unanswered_repeats, as the provider may have billed it"
            );
            failed(ApiError::new(ErrorCode::Timeout, message), None)
        }
        Err(CallError::Retryable { reason, status, retry_after }) => {
            metrics::counter!(m::UPSTREAM_FAILURES, "pool" => env.pool.clone(), "reason" => reason).increment(1);
            let backoff = ExponentialBuilder::default()
                .with_min_delay(ctx.retry_min)
                .with_max_delay(ctx.retry_max)
                .with_jitter()
                .with_max_times(ctx.max_attempts as usize)
                .build()
                .nth(attempt.saturating_sub(1) as usize)
                .unwrap_or(ctx.retry_max);
            let mut delay = backoff.max(retry_after.unwrap_or_default());
            // A 429 is the provider's pace, not a failure to limit; other
            // failures retry at once only while the pool's budget allows.
            if status != Some(429) && !pool.try_retry() {
                delay = delay.max(ctx.retry_max);
            }
            if attempt < ctx.max_attempts && Instant::now() + delay < deadline {
                return Outcome::Retry { delay, reason };
            }
            let error = if status == Some(429) {
                ApiError::new(ErrorCode::UpstreamRateLimited, "the upstream provider is rate limiting; retry later")
                    .retry_after(retry_after.map_or(1, |d| d.as_secs().max(1)))
            } else {
                ApiError::new(ErrorCode::UpstreamError, format!("the upstream failed ({reason}) on every attempt"))
            };
            failed(error, status)
        }
    }
}
