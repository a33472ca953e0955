//! One job's life in a worker: decode, check the deadline, call upstream
//! while telling JetStream the job is in progress, then answer and ack, or
//! hand the job back with a delay for another attempt.
//!
//! Outcome → JetStream acknowledgement:
//! - answered (success, or a 4xx the request caused): reply, event, `Ack`;
//! - retryable failure with attempts and time left: `Nak(delay)`, the delay
//!   from exponential backoff with jitter, at least the upstream's `Retry-After`;
//! - retryable failure with no attempts or time left, or deadline passed:
//!   reply with the error, event `failed`, `Ack`;
//! - undecodable message: `Term` (it can never succeed);
//! - worker stopping past its grace period: `Nak` at once, so another worker
//!   takes the job without waiting for `ack_wait`.

use sluice_core::counters::delta;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::event::{JobEvent, JobStatus, Usage};
use sluice_core::jobstate::{JobRecord, LedgerNote};
use sluice_core::now_ms;
use sluice_core::wire::envelope::Envelope;
use sluice_core::wire::reply::{Answer, JobRef};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::exec::bodies::{RequestBody, request_body, store_if_large};
use crate::exec::outcome::{Outcome, failed, failure_of};
use crate::exec::state::{self, Begin};
use crate::metrics as m;
use crate::upstream::client::CallError;
use crate::upstream::pools::{Lease, Pools};

/// What every job task shares.
pub struct JobContext {
    /// Tenants' weights and names (for metric labels).
    pub tenants: crate::exec::tenants::TenantBook,
    /// Admission counters to release and correct.
    pub counts: crate::exec::counts::CountSink,
    pub default_max_tokens: u64,
    pub nats: async_nats::Client,
    pub events: crate::ledger::events::EventSink,
    /// State of asynchronous jobs.
    pub job_state: async_nats::jetstream::kv::Store,
    /// Writes to `job_state`, batched with `nats.group_commit`.
    pub state_commit: sluice_core::group_commit::GroupCommit,
    /// Bodies too large for a message: request bodies read, answers stored.
    pub bodies: sluice_core::bodies::Bodies,
    /// Longest request body read from `bodies` (`ingress.max_body_bytes`).
    pub max_body_bytes: usize,
    /// Bytes of stored request bodies held at once (`worker.max_body_memory_bytes`).
    pub body_budget: Arc<tokio::sync::Semaphore>,
    pub max_body_memory: usize,
    pub pools: Pools,
    pub max_attempts: u32,
    /// `upstream.max_unanswered_repeats`.
    pub max_unanswered_repeats: u32,
    /// How long after its submit a job whose state cannot be found is taken
    /// to be reading a replica that lags, and handed back, before it is
    /// ended as lost: the smaller of [`STATE_READ_GRACE`] and
    /// `jobs.retention_ms` (past which a state may have expired for real).
    pub state_read_grace: Duration,
    pub ack_wait: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Fired when the grace period after SIGTERM runs out.
    pub hard_stop: CancellationToken,
    /// Every task the worker starts; shutdown waits for them.
    pub tasks: sluice_core::tasks::Tasks,
}

/// See [`JobContext::state_read_grace`].
pub const STATE_READ_GRACE: Duration = Duration::from_secs(600);

/// How a job's message ended up.
enum Exit {
    /// It left the queue (acked or terminated); `tokens` is the real usage
    /// when the upstream reported it; `refund` when it ended without doing
    /// work (failed without usage, cancelled, expired): its estimate is
    /// taken back from the tenant's tokens-per-minute count; `ran` when this
    /// delivery took the job to its end (not a duplicate that found it
    /// handled elsewhere): only then is its stored request body deleted.
    Left { tokens: Option<u64>, refund: bool, ran: bool },
    /// It went back to the queue for another attempt.
    Stayed,
}

/// Runs one job; returns its real token usage when the upstream reported it.
pub async fn run(ctx: Arc<JobContext>, message: jetstream::Message, lease: Option<Lease>) -> Option<u64> {
    // A decoder bug must not crash the job's task before anything below can
    // end the message: that one would be redelivered for good.
    let decoded =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Envelope::from_headers(message.headers.as_ref())));
    let env = match decoded {
        Ok(Ok(env)) => env,
        Err(_) => {
            metrics::counter!(m::POISON).increment(1);
            tracing::error!(subject = %message.subject, "decoding a job message panicked; terminated");
            let _ = message.ack_with(AckKind::Term).await;
            return None;
        }
        Ok(Err(error)) => {
            metrics::counter!(m::POISON).increment(1);
            tracing::warn!(%error, subject = %message.subject, "undecodable job message terminated");
            let _ = message.ack_with(AckKind::Term).await;
            return None;
        }
    };
    let delivery = match message.info() {
        Ok(info) => state::Delivery { attempt: info.delivered.max(1) as u32, seq: Some(info.stream_sequence) },
        Err(_) => state::Delivery { attempt: 1, seq: None },
    };
    let attempt = delivery.attempt;
    let span = tracing::info_span!(
        "job", job_id = %env.job_id, tenant = %env.tenant, pool = %env.pool, attempt,
        request_id = %env.request_id, traceparent = env.traceparent.as_deref().unwrap_or("")
    );
    let tenant = ctx.tenants.get(env.tenant).name.clone();
    match execute(&ctx, message, &env, delivery, &tenant, lease).instrument(span).await {
        Exit::Stayed => None,
        Exit::Left { tokens, refund, ran } => {
            release(&ctx, &env, tokens, refund);
            if let Some(stored) = env.body_ref.clone().filter(|_| ran) {
                let bodies = ctx.bodies.clone();
                ctx.tasks.spawn(async move { bodies.delete(&stored.name).await });
            }
            if let Some(t) = tokens {
                metrics::counter!(m::SERVED_TOKENS, "pool" => env.pool.clone(), "tenant" => tenant).increment(t);
            }
            tokens
        }
    }
}

/// Takes a job that left the queue off its tenant's queued count, and
/// corrects the tokens-per-minute count by the real usage (or takes the
/// estimate back, for a job that did no work).
fn release(ctx: &JobContext, env: &Envelope, tokens: Option<u64>, refund: bool) {
    use sluice_core::wire::subjects::{Rate, queued as queued_subject, tenant_rate as rate_subject};
    if env.queued_counted {
        ctx.counts.add(queued_subject(env.tenant), -1);
    }
    let Some(window) = env.tpm_window else { return };
    let estimate = delta(env.est_tokens.max(1));
    let correction = match tokens {
        Some(used) => delta(used).saturating_sub(estimate),
        None if refund => -estimate,
        None => return,
    };
    ctx.counts.add(rate_subject(Rate::Tokens, env.tenant, window), correction);
}

async fn execute(
    ctx: &JobContext,
    message: jetstream::Message,
    env: &Envelope,
    delivery: state::Delivery,
    tenant: &str,
    lease: Option<Lease>,
) -> Exit {
    let mut attempt = delivery.attempt;
    let started = Instant::now();
    let started_ms = now_ms();
    if attempt == 1 {
        let waited = started_ms.saturating_sub(env.submitted_ms) as f64 / 1000.0;
        metrics::histogram!(m::QUEUE_WAIT_SECONDS, "pool" => env.pool.clone(), "tenant" => tenant.to_owned())
            .record(waited);
    }
    let remaining = Duration::from_millis(env.deadline_ms.saturating_sub(started_ms));
    let deadline = started + remaining;

    // An asynchronous job (or a synchronous one kept from its submit) moves
    // through its stored state: it runs only from `queued` (or
    // `in_progress` on a redelivery), never once cancelled.
    let mut record = None;
    if env.reply.is_none() || env.kept {
        match state::begin(&ctx.job_state, &ctx.state_commit, env, delivery, remaining.is_zero()).await {
            Ok(Begin::Run(r, revision)) => {
                // The run's number is the state's count of runs begun: a job
                // handed back without running (its state not found yet) does
                // not use up `worker.max_attempts`.
                attempt = r.attempts;
                record = Some((*r, revision));
            }
            Ok(Begin::Expired) => return conclude(ctx, message, env, JobStatus::Expired, attempt).await,
            Ok(Begin::Skip(JobStatus::Cancelled)) => {
                return conclude(ctx, message, env, JobStatus::Cancelled, attempt).await;
            }
            Ok(Begin::Done(record)) => return record_again(ctx, message, env, *record).await,
            Ok(Begin::Skip(status)) => {
                metrics::counter!(m::DUPLICATES_DROPPED, "status" => status.as_str()).increment(1);
                tracing::info!(status = status.as_str(), "job already handled elsewhere; message dropped");
                return dropped(message.ack().await);
            }
            Ok(Begin::Unreadable(error)) => {
                metrics::counter!(m::POISON).increment(1);
                tracing::warn!(%error, "asynchronous job whose stored state does not decode; failed without running");
                if let Err(e) = state::replace_unreadable(&ctx.state_commit, &ctx.job_state, env, attempt).await {
                    tracing::warn!(error = %e, "cannot replace the unreadable state; retrying in 1 s");
                    let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                    return Exit::Stayed;
                }
                return conclude(ctx, message, env, JobStatus::Failed, attempt).await;
            }
            Ok(Begin::Missing) => return state_lost(ctx, message, env, attempt, remaining.is_zero()).await,
            // The state is written before the job is published, and taking a
            // submit back leaves a tombstone (`Missing`): a state not found at
            // all, while it cannot have expired, is a read that came too early
            // (a node rejoining after a partition answers from a store it is
            // still rebuilding). Handed back, and read again.
            Ok(Begin::NotFound)
                if !remaining.is_zero()
                    && started_ms < env.submitted_ms.saturating_add(ctx.state_read_grace.as_millis() as u64) =>
            {
                metrics::counter!(m::STATE_NOT_FOUND).increment(1);
                tracing::warn!("asynchronous job whose state was not found; handed back to be read again in 5 s");
                let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await;
                return Exit::Stayed;
            }
            Ok(Begin::NotFound) => return state_lost(ctx, message, env, attempt, remaining.is_zero()).await,
            Err(error) => {
                tracing::warn!(%error, "cannot read the job's state; retrying in 1 s");
                let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return Exit::Stayed;
            }
        }
    }

    // Calls of this run that went unanswered (the provider may have billed them).
    let mut unanswered = 0;
    let outcome = if remaining.is_zero() {
        failed(ApiError::new(ErrorCode::Timeout, "the request's deadline passed before a worker could run it"), None)
    } else if attempt > ctx.max_attempts {
        failed(ApiError::new(ErrorCode::UpstreamError, format!("gave up after {} attempts", ctx.max_attempts)), None)
    } else if let Some(pool) = ctx.pools.get(&env.pool) {
        match with_progress(ctx, &message, request_body(ctx, &message, env)).await {
            None | Some(Err(RequestBody::Later)) => return Exit::Stayed,
            Some(Err(RequestBody::Unreadable(outcome))) => outcome,
            // (the body's permit lives until the call is done)
            Some(Ok((body, _permit))) => {
                let called =
                    call(ctx, &message, env, body, pool, lease, attempt, deadline, started, &mut unanswered).await;
                let Some(outcome) = crate::exec::outcome::of_call(ctx, env, pool, called, attempt, deadline) else {
                    return Exit::Stayed;
                };
                outcome
            }
        }
    } else {
        failed(ApiError::new(ErrorCode::ModelNotFound, format!("this worker serves no pool `{}`", env.pool)), None)
    };

    match outcome {
        Outcome::Retry { delay, reason } => {
            metrics::counter!(m::RETRIES, "pool" => env.pool.clone(), "kind" => "requeue").increment(1);
            tracing::info!(reason, delay_ms = delay.as_millis() as u64, "upstream failed; job goes back to the queue");
            if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!(%error, "nak failed; the job comes back after ack_wait");
            }
            Exit::Stayed
        }
        // (the answer's share of the budget is held until the job is done)
        Outcome::Answered { status, outcome, upstream_status, usage, held: _held } => {
            // Storing tens of megabytes may take longer than `ack_wait`.
            let (status, outcome) = match with_progress(ctx, &message, store_if_large(ctx, env, status, outcome)).await
            {
                None => return Exit::Stayed,
                Some(Ok(stored)) => stored,
                Some(Err(error)) => {
                    tracing::warn!(%error, "cannot store an answer too large for a message; retrying in 1 s");
                    let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                    return Exit::Stayed;
                }
            };
            let reported = (usage != Usage::default()).then(|| usage.clone());
            let tokens = usage.total_tokens.map(|t| t.max(0) as u64);
            let mut event = JobEvent::from_envelope(env, status, attempt as i32);
            event.upstream_status = upstream_status.map(i32::from);
            event.usage = usage;
            event.started_ms = Some(started_ms);
            event.finished_ms = Some(now_ms());
            event.unanswered_calls = i32::try_from(unanswered).unwrap_or(i32::MAX);
            if let Some((code, message)) = failure_of(&outcome) {
                tracing::info!(code, message = %message, "job failed");
                event.error_code = Some(code.to_owned());
                event.error_message = Some(message);
            }
            // An asynchronous job's event carries what its state carries for
            // the ledger: the event may reach the ledger before the state
            // changes do, and a completed row is final.
            if let Some((record, _)) = &record {
                event.metadata = record.metadata.as_ref().and_then(|m| serde_json::to_string(m).ok());
                event.expires_ms = Some(record.expires_at * 1000);
            }
            let ran = state::Ran {
                attempt,
                unanswered,
                ledger: LedgerNote { upstream_status: event.upstream_status, usage: event.usage.clone() },
            };
            // The state first, then the answer: a run that lost its job says
            // nothing, and a kept job's waiter finds its state written.
            let stored = if let Some((mut record, revision)) = record {
                record.unanswered_calls = unanswered;
                record.ledger = Some(ran.ledger.clone());
                let finish =
                    state::finish_repeated(&ctx.job_state, &ctx.state_commit, env, &record, revision, status, &outcome);
                match with_progress(ctx, &message, finish).await {
                    None => return Exit::Stayed,
                    Some(Ok(state::Finish::Stored)) => true,
                    Some(Ok(state::Finish::Lost)) => return lost(ctx, &outcome),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "cannot store the job's outcome; retrying in 1 s");
                        let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                        return Exit::Stayed;
                    }
                }
            } else {
                match with_progress(ctx, &message, state::adopt_detached(ctx, env, &ran, status, &outcome)).await {
                    None => return Exit::Stayed,
                    Some(stored) => stored,
                }
            };
            let answer = Answer {
                job: JobRef::of(env),
                attempt,
                outcome,
                ends_stream: env.stream,
                usage: reported,
                headers: Vec::new(),
                stored: stored && env.reply.is_some(),
            };
            if let Some(subject) = &env.reply {
                // The ingress confirms a synchronous answer its request
                // took (`Sluice-Confirm`); unconfirmed (lost with a NATS
                // node, left unread by a request that gave up, or its
                // ingress gone), the answer is stored as the job's state,
                // where the job id of the 504 the client gets finds it.
                let confirm = !stored && !env.stream && env.confirm;
                // (stored while the job is kept in progress: the store is
                // repeated while the bucket elects a leader)
                let stored_now = if !reply(ctx, subject, &answer, confirm).await && confirm {
                    let store = state::store_sync(ctx, env, &ran, status, &answer.outcome, true);
                    match with_progress(ctx, &message, store).await {
                        None => return Exit::Stayed,
                        Some(stored) => stored,
                    }
                } else {
                    false
                };
                if stored_now {
                    // Its ingress may only have been reconnecting (a NATS
                    // node restarting): the answer goes out again, as
                    // stored, for a request that still waits.
                    resend_later(ctx, subject.clone(), Answer { stored: true, ..answer.clone() });
                }
            }
            tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "answer published");
            if !recorded(ctx, &message, event).await {
                return Exit::Stayed;
            }
            let acked = message.ack().await;
            if let Err(error) = &acked {
                tracing::warn!(%error, "ack failed; the job may run again and the ledger keeps one record");
            }
            tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "event recorded and job acked");
            metrics::counter!(m::JOBS, "pool" => env.pool.clone(), "tenant" => tenant.to_owned(), "outcome" => status.as_str())
                .increment(1);
            metrics::histogram!(m::JOB_SECONDS, "pool" => env.pool.clone()).record(started.elapsed().as_secs_f64());
            left(acked, tokens, status != JobStatus::Completed)
        }
    }
}

/// Sends the answer to the ingress waiting on `subject`.
/// Publishes the answer to its ingress; with `confirm`, as a request the
/// ingress answers once it took the answer. `false` when the publish failed
/// or the confirmation did not come within [`CONFIRM_WAIT`].
async fn reply(ctx: &JobContext, subject: &str, answer: &Answer, confirm: bool) -> bool {
    let (headers, payload) = answer.encode();
    if !confirm {
        if let Err(error) = ctx.nats.publish_with_headers(subject.to_owned(), headers, payload).await {
            tracing::warn!(%error, "could not publish the answer to the ingress");
            return false;
        }
        return true;
    }
    let request = ctx.nats.request_with_headers(subject.to_owned(), headers, payload);
    match tokio::time::timeout(CONFIRM_WAIT, request).await {
        Ok(Ok(_)) => true,
        Ok(Err(error)) => {
            tracing::info!(%error, "the ingress did not confirm the answer");
            false
        }
        Err(_) => {
            tracing::info!("the ingress did not confirm the answer within 2 s");
            false
        }
    }
}

/// Publishes an answer already stored as its job's state again after each
/// of [`RESEND_AFTER`], unconfirmed: a request still waiting takes it (its
/// ingress was reconnecting when the answer first came), and an ingress
/// without a waiter for it drops it, since it is stored.
fn resend_later(ctx: &JobContext, subject: String, answer: Answer) {
    let nats = ctx.nats.clone();
    ctx.tasks.spawn(async move {
        for pause in RESEND_AFTER {
            tokio::time::sleep(pause).await;
            let (headers, payload) = answer.encode();
            if let Err(error) = nats.publish_with_headers(subject.clone(), headers, payload).await {
                tracing::debug!(%error, "could not send a stored answer again");
            }
        }
    });
}

/// When a stored, unconfirmed answer is sent again (after the first 2 s
/// wait for its confirmation): 1 s and 3 s later.
const RESEND_AFTER: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(2)];

/// How long a worker waits for its ingress to confirm a synchronous answer
/// before it stores the answer as the job's state.
const CONFIRM_WAIT: Duration = Duration::from_secs(2);

/// A message that was acked or terminated left the queue; one whose ack
/// failed may come back, and is released when it does.
fn left(acked: Result<(), async_nats::Error>, tokens: Option<u64>, refund: bool) -> Exit {
    match acked {
        Ok(()) => Exit::Left { tokens, refund, ran: true },
        Err(_) => Exit::Stayed,
    }
}

/// A run whose job was taken over by a redelivery while it ran (it stalled
/// past `ack_wait`): the other run owns the job, its message and its counts,
/// so this one records no state, no event and no webhook, leaves the message
/// alone and deletes the answer it stored apart.
fn lost(ctx: &JobContext, outcome: &sluice_core::wire::reply::Outcome) -> Exit {
    metrics::counter!(m::RUNS_LOST).increment(1);
    tracing::warn!("the job was taken over by another delivery while this run was calling; its outcome is dropped");
    if let sluice_core::wire::reply::Outcome::Stored { body, .. } = outcome {
        let (bodies, name) = (ctx.bodies.clone(), body.name.clone());
        ctx.tasks.spawn(async move { bodies.delete(&name).await });
    }
    Exit::Stayed
}

/// A message dropped without running its job (handled elsewhere, or no state).
fn dropped(acked: Result<(), async_nats::Error>) -> Exit {
    match acked {
        Ok(()) => Exit::Left { tokens: None, refund: false, ran: false },
        Err(_) => Exit::Stayed,
    }
}

/// An asynchronous job whose state is gone (its retention passed while it
/// waited, or its submit was taken back after a publish that did land): it
/// cannot run, since nothing could record its result, but it still ends with
/// a terminal event (`expired` past its deadline, else `failed`), so its
/// ledger row does not stay `queued`. Its message left the queue, so its
/// counts are released like any other's (for a submit taken back, which
/// released them already, the periodic count repair corrects the drift).
async fn state_lost(
    ctx: &JobContext,
    message: jetstream::Message,
    env: &Envelope,
    attempt: u32,
    expired: bool,
) -> Exit {
    metrics::counter!(m::POISON).increment(1);
    tracing::warn!(expired, "asynchronous job without stored state; ended without running");
    let status = if expired { JobStatus::Expired } else { JobStatus::Failed };
    let mut event = JobEvent::from_envelope(env, status, attempt as i32);
    event.finished_ms = Some(now_ms());
    if !expired {
        event.error_code = Some(ErrorCode::Internal.as_str().to_owned());
        event.error_message = Some("the job's stored state was gone when a worker took it; the job was not run".into());
    }
    if !recorded(ctx, &message, event).await {
        return Exit::Stayed;
    }
    dropped(message.ack_with(AckKind::Term).await)
}

/// A job whose outcome is stored while its message is still queued
/// ([`Begin::Done`]): the run that ended it could not record its terminal
/// event (the events stream was electing a leader), or its ack was lost,
/// or it died in between. The event is recorded again from the state (the
/// ledger keeps one row per job), and the message leaves the queue with the
/// counts that run did not release.
async fn record_again(ctx: &JobContext, message: jetstream::Message, env: &Envelope, record: JobRecord) -> Exit {
    metrics::counter!(m::EVENTS_RECORDED_AGAIN).increment(1);
    tracing::info!(status = record.status.as_str(), "the job has ended; its terminal event is recorded from its state");
    let note = record.ledger.clone().unwrap_or_default();
    let tokens = note.usage.total_tokens.map(|t| t.max(0) as u64);
    let mut event = JobEvent::from_envelope(env, record.status, i32::try_from(record.attempts).unwrap_or(i32::MAX));
    event.upstream_status = note.upstream_status;
    event.usage = note.usage;
    if let Some(error) = &record.error {
        event.error_code = Some(error.code.clone());
        event.error_message = Some(error.message.clone());
    }
    event.started_ms = record.started_ms;
    event.finished_ms = record.finished_ms;
    event.metadata = record.metadata.as_ref().and_then(|m| serde_json::to_string(m).ok());
    event.expires_ms = Some(record.expires_at * 1000);
    event.unanswered_calls = i32::try_from(record.unanswered_calls).unwrap_or(i32::MAX);
    if !recorded(ctx, &message, event).await {
        return Exit::Stayed;
    }
    left(message.ack().await, tokens, record.status != JobStatus::Completed)
}

/// Records the job's event while telling JetStream the job is in progress
/// (the publish is repeated through an election of the events stream's
/// leader, which outlasts `ack_wait`). Not recorded, the job goes back to
/// the queue for a second; its redelivery records the event from the
/// stored state ([`record_again`]) or, for a job without one, runs again.
async fn recorded(ctx: &JobContext, message: &jetstream::Message, event: JobEvent) -> bool {
    match with_progress(ctx, message, ctx.events.record(event)).await {
        Some(true) => true,
        Some(false) => {
            let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            false
        }
        None => false,
    }
}

/// Records a job that ends without a call (cancelled, expired) and acks it.
async fn conclude(
    ctx: &JobContext,
    message: jetstream::Message,
    env: &Envelope,
    status: JobStatus,
    attempt: u32,
) -> Exit {
    let mut event = JobEvent::from_envelope(env, status, attempt as i32);
    event.finished_ms = Some(now_ms());
    if !recorded(ctx, &message, event).await {
        return Exit::Stayed;
    }
    // A synchronous job kept from its submit may be waited for: its client
    // learns the end now, not at its 504.
    if let Some(subject) = &env.reply {
        let error = match status {
            JobStatus::Cancelled => ApiError::new(ErrorCode::Conflict, "the job was cancelled before it ran"),
            _ => ApiError::new(ErrorCode::Timeout, "the request's deadline passed before a worker could run it"),
        };
        let answer = Answer {
            job: JobRef::of(env),
            attempt,
            outcome: sluice_core::wire::reply::Outcome::Error(error),
            ends_stream: env.stream,
            usage: None,
            headers: Vec::new(),
            stored: true,
        };
        reply(ctx, subject, &answer, false).await;
    }
    tracing::info!(status = status.as_str(), "job ended without running");
    let tenant = ctx.tenants.get(env.tenant).name.clone();
    metrics::counter!(m::JOBS, "pool" => env.pool.clone(), "tenant" => tenant, "outcome" => status.as_str())
        .increment(1);
    left(message.ack().await, None, true)
}

/// What the calls of one attempt came to.
pub(crate) enum Called {
    Answered(Result<crate::upstream::client::Answer, CallError>),
    Streamed(crate::exec::stream::Relayed),
    /// No deployment could take the call; when one may next.
    NoDeployment(Option<Instant>),
    /// The worker is stopping; the job went back to the queue.
    HandedBack,
}

/// Calls the pool's deployments for one attempt: the leased one first, and
/// on a retryable failure another ready deployment at once (failover), as
/// long as the pool's retry budget allows. A call left unanswered (timed out
/// after its request was sent) is made again at most
/// `upstream.max_unanswered_repeats` times, on another deployment when there
/// is one; `unanswered` counts them.
#[allow(clippy::too_many_arguments, reason = "one attempt's whole context, passed once")]
async fn call(
    ctx: &JobContext,
    message: &jetstream::Message,
    env: &Envelope,
    body: Bytes,
    pool: &crate::upstream::pools::Pool,
    mut lease: Option<Lease>,
    attempt: u32,
    deadline: Instant,
    started: Instant,
    unanswered: &mut u32,
) -> Called {
    let shared = ctx.pools.shared();
    if attempt == 1 {
        pool.first_attempt();
    }
    let streaming = env.stream && env.reply.is_some();
    let mut tried: Vec<String> = Vec::new();
    let mut last: Option<CallError> = None;
    loop {
        let lease = match lease.take() {
            Some(l) => l,
            None => match pool.reserve(1, &tried, shared).await.pop() {
                Some(l) => l,
                None => {
                    return match last {
                        Some(e) => Called::Answered(Err(e)),
                        None => Called::NoDeployment(pool.ready_at()),
                    };
                }
            },
        };
        let d = lease.deployment.clone();
        let tpm_window = match shared {
            Some(s) => d.charge_tokens(s, env.est_tokens).await,
            None => None,
        };
        let call_started = Instant::now();
        let span = tracing::debug_span!("call", deployment = %d.client.name);
        let (result, opened) = if streaming {
            let open = d.client.call_streaming(env.endpoint, body.clone(), deadline);
            let Some((result, rate)) = with_progress(ctx, message, open.instrument(span)).await else {
                return Called::HandedBack;
            };
            d.record(&result.as_ref().map(|_| ()), &rate, call_started.elapsed(), shared);
            match result {
                Ok(opened) => (Ok(None), Some(opened)),
                Err(e) => (Err(e), None),
            }
        } else {
            let call = d.client.call(env.endpoint, body.clone(), deadline);
            let Some((result, rate)) = with_progress(ctx, message, call.instrument(span)).await else {
                return Called::HandedBack;
            };
            d.record(&result.as_ref().map(|_| ()), &rate, call_started.elapsed(), shared);
            (result.map(Some), None)
        };
        let finish = |usage: &Usage| {
            let used = usage.total_tokens.map(|t| t.max(0) as u64);
            if let Some(t) = used {
                metrics::counter!(m::UPSTREAM_TOKENS, "pool" => env.pool.clone(), "deployment" => d.client.name.clone())
                    .increment(t);
            }
            if let (Some(s), Some(w), Some(t)) = (shared, &tpm_window, used) {
                s.counts.add(w.clone(), delta(t).saturating_sub(delta(env.est_tokens)));
            }
        };
        tracing::debug!(deployment = %d.client.name, upstream_us = started.elapsed().as_micros() as u64, "upstream answered");
        match (result, opened) {
            (_, Some(opened)) => {
                let relayed = crate::exec::stream::relay(ctx, message, env, opened, attempt).await;
                finish(&relayed.usage);
                drop(lease);
                return Called::Streamed(relayed);
            }
            (Ok(answer), None) => {
                if let Some(a) = &answer {
                    finish(&a.usage);
                }
                return Called::Answered(answer.ok_or(CallError::DeadlineExceeded));
            }
            (Err(e @ CallError::Unanswered { .. }), None) => {
                // The provider may have done the work: the estimate stays in
                // its token window.
                *unanswered += 1;
                metrics::counter!(m::UNANSWERED_CALLS, "pool" => env.pool.clone(), "deployment" => d.client.name.clone())
                    .increment(1);
                tried.push(d.client.name.clone());
                drop(lease);
                if *unanswered <= ctx.max_unanswered_repeats && pool.try_retry() {
                    // Another deployment when there is one, else this one again.
                    if tried.len() >= pool.deployments() {
                        tried.clear();
                    }
                    metrics::counter!(m::RETRIES, "pool" => env.pool.clone(), "kind" => "unanswered").increment(1);
                    tracing::warn!(deployment = %d.client.name, error = ?e, calls = *unanswered,
                        "the call went unanswered after its request was sent (the provider may bill it); calling again");
                    last = Some(e);
                    continue;
                }
                return Called::Answered(Err(e));
            }
            (Err(e), None) => {
                // The call did no work the provider reports: its estimate
                // leaves the deployment's token window.
                if let (Some(s), Some(w)) = (shared, &tpm_window) {
                    s.counts.add(w.clone(), -delta(env.est_tokens));
                }
                let retryable = matches!(e, CallError::Retryable { .. });
                tried.push(d.client.name.clone());
                drop(lease);
                if retryable && tried.len() < pool.deployments() && pool.try_retry() {
                    metrics::counter!(m::RETRIES, "pool" => env.pool.clone(), "kind" => "failover").increment(1);
                    tracing::info!(deployment = %d.client.name, error = ?e, "deployment failed; failing over");
                    last = Some(e);
                    continue;
                }
                return Called::Answered(Err(e));
            }
        }
    }
}

/// Runs `call` while telling JetStream the job is in progress; `None` when
/// the worker's grace period ran out first (the job was handed back).
async fn with_progress<F: std::future::Future>(
    ctx: &JobContext,
    message: &jetstream::Message,
    call: F,
) -> Option<F::Output> {
    tokio::pin!(call);
    // Not `interval()`: its first tick goes through the timer wheel, which
    // costs up to a millisecond on every job.
    let every = ctx.ack_wait / 3;
    let mut progress = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        tokio::select! {
            result = &mut call => return Some(result),
            _ = progress.tick() => {
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "in-progress ack failed");
                }
            }
            _ = ctx.hard_stop.cancelled() => {
                tracing::warn!("grace period over; handing the job back to the queue");
                let _ = message.ack_with(AckKind::Nak(None)).await;
                return None;
            }
        }
    }
}
