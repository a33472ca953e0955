//! The request path's writes to JetStream: a job's publish and its state's
//! creation, both repeated with backoff (`backon`) while the error may pass
//! (the stream has no leader for a few seconds while a node dies and the
//! rest elect another; an acknowledgement is lost), for up to
//! `ingress.publish_retry_ms`: the client waits a little longer instead of
//! getting a 503. Errors another attempt cannot fix (too large, queue full)
//! are answered at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::kv;
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::group_commit::expect_revision;
use sluice_core::jobstate::{self, JobRecord};
use sluice_core::wire::envelope::{Envelope, H_MSG_ID};
use sluice_core::wire::reply::JobRef;
use sluice_core::wire::{stored, subjects};

use crate::state::AppState;

/// The pauses between attempts: 50 ms doubling to 1 s, at most
/// `ingress.publish_retry_ms` in all.
fn backoff(state: &AppState) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_total_delay(Some(Duration::from_millis(state.config.ingress.publish_retry_ms)))
        .without_max_times()
}

/// A job's message payload, and whether its body was stored apart by this
/// request (then this request deletes it if it turns out not to be needed).
pub struct Payload {
    bytes: Bytes,
    stored_now: bool,
}

/// The job's message payload: its body, or, when a NATS message cannot
/// carry it, nothing — the body goes to the bodies bucket first, under a
/// name of this request's own, and the envelope names it (`Sluice-Body-Ref`).
/// The worker deletes it once the job has left the queue; [`job`] deletes it
/// if the publish fails or turns out a duplicate (the job's first submit,
/// racing or long done, keeps its own copy).
pub async fn payload(state: &AppState, env: &mut Envelope, body: Bytes) -> Result<Payload, ApiError> {
    if !state.bodies.too_large_for_a_message(body.len()) {
        return Ok(Payload { bytes: body, stored_now: false });
    }
    let name = stored::copy_name(stored::Kind::Request, env.tenant, env.job_id);
    let stored = state.bodies.put(name, &body).await.map_err(|error| {
        tracing::warn!(%error, job_id = %env.job_id, "cannot store a large request body");
        ApiError::new(ErrorCode::Unavailable, "the store for large request bodies is unavailable; retry shortly")
            .retry_after(1)
    })?;
    env.body_ref = Some(stored);
    Ok(Payload { bytes: Bytes::new(), stored_now: true })
}

/// Publishes the job and waits for JetStream's acknowledgement, then wakes
/// the workers for its queue. Every job carries its id as `Nats-Msg-Id`, so
/// that a publish repeated after a lost acknowledgement is stored once.
pub async fn job(state: &AppState, subject: String, env: &Envelope, payload: Payload) -> Result<(), ApiError> {
    let mut headers = env.to_headers();
    headers.insert(H_MSG_ID, env.job_id.to_string().as_str());
    let wake = subjects::wake_of(&subject);
    let repeated = AtomicBool::new(false);
    let published = (|| state.jobs_commit.publish(subject.clone(), headers.clone(), payload.bytes.clone()))
        .retry(backoff(state))
        // No leader, a lost acknowledgement, a leader resetting its log
        // after an election or with a full inbound queue: repeated. A racing
        // submit of the same job (an idempotent duplicate on another ingress)
        // whose publish is being applied: repeated, it is acknowledged as
        // the duplicate.
        .when(|e| {
            sluice_core::group_commit::retryable(e)
                || sluice_core::nats::is_duplicate_in_process(e)
                || sluice_core::nats::is_transient_refusal(e)
        })
        .notify(|e, _| {
            metrics::counter!(crate::metrics::PUBLISH_RETRIES, "reason" => e.kind().to_string()).increment(1);
            tracing::info!(error = %e, job_id = %env.job_id, "publish failed; retrying");
            repeated.store(true, Ordering::Relaxed);
        })
        .await;
    let stored_now = env.body_ref.as_ref().filter(|_| payload.stored_now);
    match published {
        Err(e) => {
            if let Some(stored) = stored_now {
                state.bodies.delete(&stored.name).await;
            }
            return Err(publish_error(e));
        }
        // A duplicate of a message this request did not send (a replay of a
        // job queued or run already, with its own copy of the body): the
        // copy just stored is no one's. After a repeated publish the
        // duplicate may be this request's own first attempt, which needs it.
        Ok(ack) if ack.duplicate && !repeated.load(Ordering::Relaxed) => {
            if let Some(stored) = stored_now {
                state.bodies.delete(&stored.name).await;
            }
        }
        Ok(_) => {}
    }
    // A hint only: workers also list the queues every `scheduler.discover_ms`.
    if let Some(wake) = wake
        && let Err(error) = state.nats.publish(wake, Bytes::new()).await
    {
        tracing::debug!(%error, "could not wake the workers");
    }
    Ok(())
}

/// The client's error for a publish that failed for good.
pub fn publish_error(e: PublishError) -> ApiError {
    if sluice_core::nats::is_storage_full(&e) {
        return ApiError::new(ErrorCode::QueueFull, "the job queue is full; retry later").retry_after(5);
    }
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => {
            ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large for the job queue")
        }
        kind => {
            ApiError::new(ErrorCode::QueueUnavailable, format!("the job queue is unavailable ({kind}); retry shortly"))
                .retry_after(1)
        }
    }
}

/// Creates a job's first state (`value` carries a [`jobstate::new_claim`]).
/// `AlreadyExists` when another submit's state is there: a duplicate that
/// got in first, on this replica or another. A write whose answer is
/// ambiguous — a lost acknowledgement retried into "the key is taken", or a
/// clustered leader's "wrong last sequence" while a racing write is still
/// being applied — is settled by reading the key back: its claim says
/// whose write it holds.
pub async fn job_state(state: &AppState, key: &str, value: Bytes) -> Result<(), kv::CreateError> {
    let subject = subjects::kv_key(&state.job_state, key);
    let written = (|| state.state_commit.publish(subject.clone(), expect_revision(0), value.clone()))
        .retry(backoff(state))
        // Anything but a taken key or a value too large may pass (no leader,
        // a lost or refused acknowledgement during an election).
        .when(|e| !sluice_core::nats::is_taken(e) && e.kind() != PublishErrorKind::MaxPayloadExceeded)
        .notify(|e, _| {
            metrics::counter!(crate::metrics::PUBLISH_RETRIES, "reason" => "job_state").increment(1);
            tracing::info!(error = %e, "storing a job's state failed; retrying");
        })
        .await;
    let contested = match written {
        Ok(_) => return Ok(()),
        Err(e) if sluice_core::nats::is_taken(&e) => e,
        Err(e) => return Err(kv::CreateError::with_source(kv::CreateErrorKind::Publish, e)),
    };
    // The key holds a state (ours or another's), a tombstone (a submit taken
    // back, which the bucket's own create writes over), or nothing yet (a
    // racing write the leader has not applied).
    let mut pause = Duration::from_millis(20);
    for _ in 0..8 {
        match sluice_core::nats::kv_leader_last_write(&state.job_state, key).await {
            Ok(Some((_, Some(stored)))) => {
                return if jobstate::same_claim(&stored, &value) {
                    Ok(())
                } else {
                    Err(kv::CreateError::new(kv::CreateErrorKind::AlreadyExists))
                };
            }
            // A tombstone, or nothing yet: the create decides.
            Ok(_) => {
                if state.job_state.create(key, value.clone()).await.is_ok() {
                    return Ok(());
                }
            }
            Err(e) => return Err(kv::CreateError::with_source(kv::CreateErrorKind::Publish, e)),
        }
        metrics::counter!(crate::metrics::PUBLISH_RETRIES, "reason" => "job_state_contested").increment(1);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    tracing::warn!(error = %contested, "a job's state stayed contested: the key is taken, but its leader shows no state");
    Err(kv::CreateError::with_source(kv::CreateErrorKind::Publish, contested))
}

/// Records the job when the handler is dropped mid-wait (client disconnect).
pub struct DetachOnDrop(pub Option<(Arc<AppState>, Envelope)>);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if let Some((state, env)) = self.0.take() {
            let tasks = state.tasks.clone();
            tasks.spawn(async move { detached(&state, &env).await });
        }
    }
}

/// Makes a synchronous request whose wait ran out visible as a job. `create`
/// never overwrites: if the answer arrived meanwhile, it stays.
pub async fn detached(state: &AppState, env: &Envelope) {
    let record = JobRecord::of_job(&JobRef::of(env));
    let Ok(value) = serde_json::to_vec(&record) else { return };
    let key = jobstate::key(env.tenant, env.job_id);
    if let Err(error) = state.job_state.create(&key, value.into()).await
        && error.kind() != async_nats::jetstream::kv::CreateErrorKind::AlreadyExists
    {
        tracing::warn!(%error, job_id = %env.job_id, "could not record a timed-out request as a job");
    }
}
