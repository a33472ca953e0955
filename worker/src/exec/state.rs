//! An asynchronous job's state in the key-value bucket, as the worker moves
//! it on: `queued → in_progress` before the call (conditional on the revision
//! read, so a cancel and a worker cannot both win), then the outcome,
//! conditional on the revision the run began with: a run that stalled past
//! `ack_wait` while the redelivered job ran elsewhere finds the revision
//! moved on and records nothing (one terminal state per job, one webhook).
//! Both writes go through the group commit (`nats.group_commit`).
//!
//! A synchronous job has a state only when its client can no longer take
//! the answer from its ingress: the ingress answered 504 naming the job, or
//! its client left (the ingress then stores it `queued`), or it carries an
//! `Idempotency-Key` (its state is written at submit, like an asynchronous
//! job's). [`adopt`] stores such a job's outcome from the worker, so
//! `GET /v1/jobs/{id}` finds it whatever became of the ingress.

use std::time::Duration;

use async_nats::jetstream::kv;
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use sluice_core::event::JobStatus;
use sluice_core::group_commit::{GroupCommit, expect_revision};
use sluice_core::jobstate::{self, JobRecord};
use sluice_core::now_ms;
use sluice_core::wire::envelope::Envelope;
use sluice_core::wire::reply::{JobRef, Outcome};
use sluice_core::wire::subjects::kv_key;

use crate::exec::job::JobContext;
use crate::metrics as m;

/// What the worker may do with an asynchronous job.
pub enum Begin {
    /// The job is now `in_progress`, owned by this delivery as long as its
    /// state keeps this revision.
    Run(Box<JobRecord>, u64),
    /// Its deadline passed while it was queued, or before a redelivery
    /// could carry its run on: now `expired`.
    Expired,
    /// Someone else decided: cancelled, or a duplicate message of a job
    /// another delivery runs.
    Skip(JobStatus),
    /// The job has its outcome (completed, failed or expired) and its message
    /// is still queued: the run that stored the outcome could not record its
    /// terminal event or ack, or died first. The event is recorded again from
    /// this state (the ledger keeps one row per job).
    Done(Box<JobRecord>),
    /// The submit was taken back (a tombstone where its state was).
    Missing,
    /// No write of the key at all: its retention passed, or the read was
    /// answered by a replica that does not have it yet.
    NotFound,
    /// A state that does not decode: it never will, so the job cannot run
    /// (it is failed instead of being handed back forever).
    Unreadable(String),
}

#[derive(Debug, thiserror::Error)]
#[error("job state store: {0}")]
pub struct StateError(String);

fn err(e: impl std::fmt::Display) -> StateError {
    StateError(e.to_string())
}

/// A key's last write: its revision, and its value (none for a tombstone).
struct Found {
    revision: u64,
    value: Option<Bytes>,
}

/// The key's last write, asked of the stream's leader when a replica had
/// none ([`sluice_core::nats::kv_last_write`]): a job is never taken for one
/// without a state because a replica lagged.
async fn last_write(store: &kv::Store, key: &str) -> Result<Option<Found>, StateError> {
    let found = sluice_core::nats::kv_last_write(store, key).await.map_err(err)?;
    Ok(found.map(|(revision, value)| Found { revision, value }))
}

pub async fn begin(
    store: &kv::Store,
    commit: &GroupCommit,
    env: &Envelope,
    delivery: Delivery,
    expired: bool,
) -> Result<Begin, StateError> {
    let key = jobstate::key(env.tenant, env.job_id);
    let subject = kv_key(store, &key);
    for _ in 0..3 {
        let (revision, value) = match last_write(store, &key).await? {
            Some(Found { revision, value: Some(value) }) => (revision, value),
            Some(Found { value: None, .. }) => return Ok(Begin::Missing),
            None => return Ok(Begin::NotFound),
        };
        let mut record: JobRecord = match serde_json::from_slice(&value) {
            Ok(record) => record,
            Err(e) => return Ok(Begin::Unreadable(e.to_string())),
        };
        match record.status {
            JobStatus::Queued => {}
            // This message's run began and did not end (its worker died or
            // stalled, or its acknowledgement was lost): carry on.
            JobStatus::InProgress if delivery.continues(record.message_seq) => {}
            JobStatus::Completed | JobStatus::Failed | JobStatus::Expired => return Ok(Begin::Done(Box::new(record))),
            other => return Ok(Begin::Skip(other)),
        }
        let now_ms = now_ms();
        let now = now_ms / 1000;
        // Past its deadline the job ends `expired`, whether it waited in the
        // queue or its run was cut short by a worker that is gone.
        let next = if expired {
            record.status = JobStatus::Expired;
            record.finished_at = Some(now);
            record.finished_ms = Some(now_ms);
            Begin::Expired
        } else {
            record.status = JobStatus::InProgress;
            record.started_at.get_or_insert(now);
            record.started_ms.get_or_insert(now_ms);
            // Runs begun, this one included: JetStream's delivery count also
            // counts deliveries handed back without a run, and may start
            // again at 1 after a consumer's leader changes.
            record.attempts = record.attempts.saturating_add(1);
            record.deliveries = Some(delivery.attempt);
            record.message_seq = delivery.seq;
            Begin::Run(Box::new(record.clone()), 0)
        };
        let value = serde_json::to_vec(&record).map_err(err)?;
        match commit.publish(subject.clone(), expect_revision(revision), Bytes::from(value)).await {
            Ok(ack) => {
                return Ok(match next {
                    Begin::Run(record, _) => Begin::Run(record, ack.sequence),
                    other => other,
                });
            }
            Err(e) if sluice_core::nats::is_taken(&e) => continue,
            Err(e) => return Err(err(e)),
        }
    }
    Err(StateError("the job's state kept changing".into()))
}

/// Which delivery of which job message a run is.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// The delivery count JetStream reports (1 for the first).
    pub attempt: u32,
    /// The message's sequence in the `JOBS` stream.
    pub seq: Option<u64>,
}

impl Delivery {
    /// Whether a job left `in_progress` by the run of message `began` is
    /// this delivery's to carry on. The same message: yes, whatever the
    /// delivery count says — a consumer whose leader changed may deliver a
    /// message again with a count of 1 (its deliveries were not yet
    /// replicated), and a run that skipped it as a duplicate would leave the
    /// job `in_progress` for ever. Another message of the same job (a
    /// publish repeated past the stream's duplicate window): no. A state
    /// written before the sequence was kept says nothing, and the delivery
    /// count decides as it did then.
    pub fn continues(&self, began: Option<u64>) -> bool {
        match (began, self.seq) {
            (Some(began), Some(seq)) => began == seq,
            _ => self.attempt > 1,
        }
    }
}

/// Replaces a state that does not decode with a failed one, so that
/// `GET /v1/jobs/{id}` says what happened.
pub async fn replace_unreadable(
    commit: &GroupCommit,
    store: &kv::Store,
    env: &Envelope,
    attempt: u32,
) -> Result<(), StateError> {
    let mut record = JobRecord::of_job(&JobRef::of(env));
    record.attempts = attempt;
    let error = sluice_core::error::ApiError::new(
        sluice_core::error::ErrorCode::Internal,
        "the job's stored state was unreadable; the job was not run",
    );
    record.conclude(JobStatus::Failed, &Outcome::Error(error), now_ms() / 1000);
    let value = serde_json::to_vec(&record).map_err(err)?;
    let subject = kv_key(store, &jobstate::key(env.tenant, env.job_id));
    commit.publish(subject, async_nats::HeaderMap::new(), Bytes::from(value)).await.map_err(err)?;
    Ok(())
}

/// How storing a run's outcome went.
pub enum Finish {
    Stored,
    /// The state moved on since the run began (a redelivery of the job took
    /// it over, and may have finished it): this run's outcome is not the
    /// job's, and nothing of it may be recorded.
    Lost,
}

/// Stores the outcome (the provider's answer, or the error), if the state is
/// still at `revision`, the one this run's `begin` wrote.
/// The backoff of a state write a run must not give up on at the first
/// failure (the bucket electing a leader): from 200 ms to 2 s between tries,
/// for up to `total`.
fn repeated_for(total: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(2))
        .with_total_delay(Some(total))
        .without_max_times()
}

/// How long a run repeats storing its outcome while the write fails.
const FINISH_FOR: Duration = Duration::from_secs(15);

/// [`finish`], repeated while the write fails (the bucket electing a leader,
/// a lost acknowledgement — a repeat of a write that landed finds it as this
/// run's own) for up to [`FINISH_FOR`]: a job handed back for a failed write
/// is run again, and its provider called (and paid) again. The caller keeps
/// the job's delivery alive meanwhile.
pub async fn finish_repeated(
    store: &kv::Store,
    commit: &GroupCommit,
    env: &Envelope,
    record: &JobRecord,
    revision: u64,
    status: JobStatus,
    outcome: &Outcome,
) -> Result<Finish, StateError> {
    (|| finish(store, commit, env, record.clone(), revision, status, outcome))
        .retry(repeated_for(FINISH_FOR))
        .notify(|error, _| tracing::info!(%error, "storing the job's outcome failed; retrying"))
        .await
}

pub async fn finish(
    store: &kv::Store,
    commit: &GroupCommit,
    env: &Envelope,
    mut record: JobRecord,
    revision: u64,
    status: JobStatus,
    outcome: &Outcome,
) -> Result<Finish, StateError> {
    record.conclude(status, outcome, now_ms() / 1000);
    let value = serde_json::to_vec(&record).map_err(err)?;
    let key = jobstate::key(env.tenant, env.job_id);
    let subject = kv_key(store, &key);
    match commit.publish(subject.clone(), expect_revision(revision), Bytes::from(value)).await {
        Ok(_) => Ok(Finish::Stored),
        // The state moved on: another run's outcome, or this run's own, when
        // this is a repeat of a write whose acknowledgement was lost. This
        // run's attempt number tells them apart (a redelivery runs under
        // another).
        Err(e) if sluice_core::nats::is_taken(&e) => {
            // (read from the leader: a lagging replica's older state would
            // make a stored outcome look lost)
            let leader = sluice_core::nats::kv_leader_last_write(store, &key).await.map_err(err)?;
            let ours = match leader {
                Some((_, Some(value))) => serde_json::from_slice::<JobRecord>(&value)
                    .is_ok_and(|stored| stored.status == status && stored.attempts == record.attempts),
                _ => false,
            };
            Ok(if ours { Finish::Stored } else { Finish::Lost })
        }
        Err(e) => Err(err(e)),
    }
}

/// Stores a synchronous job's outcome as its state when the job has one that
/// is not terminal yet (its ingress stored it when the client left or the
/// wait ran out), or, with `create`, when it has none (the ingress's wait is
/// over, and its own write may not have landed, or never will: it may have
/// restarted). `Ok(true)` when this call stored it; `Ok(false)` when the job
/// needs nothing (no state: the ingress still waits; or an outcome is there).
#[allow(clippy::too_many_arguments, reason = "the job and its outcome, passed once")]
pub async fn adopt(
    store: &kv::Store,
    commit: &GroupCommit,
    env: &Envelope,
    ran: &Ran,
    status: JobStatus,
    outcome: &Outcome,
    create: bool,
) -> Result<bool, StateError> {
    let key = jobstate::key(env.tenant, env.job_id);
    let subject = kv_key(store, &key);
    for _ in 0..3 {
        let (mut record, revision) = match last_write(store, &key).await? {
            Some(Found { revision, value: Some(value) }) => match serde_json::from_slice::<JobRecord>(&value) {
                Ok(record) if !record.status.is_terminal() => (record, revision),
                _ => return Ok(false),
            },
            // A key taken back or never written: the revision to expect is
            // that of its tombstone, or 0.
            other if create => (JobRecord::of_job(&JobRef::of(env)), other.map_or(0, |f| f.revision)),
            _ => return Ok(false),
        };
        record.attempts = ran.attempt;
        record.unanswered_calls = ran.unanswered;
        // The ledger may read this state before the run's event: it carries
        // the call's tokens and status too, as an asynchronous job's does.
        record.ledger = Some(ran.ledger.clone());
        record.conclude(status, outcome, now_ms() / 1000);
        let value = serde_json::to_vec(&record).map_err(err)?;
        match commit.publish(subject.clone(), expect_revision(revision), Bytes::from(value)).await {
            Ok(_) => return Ok(true),
            // The ingress wrote meanwhile: read again.
            Err(e) if sluice_core::nats::is_taken(&e) => continue,
            Err(e) => return Err(err(e)),
        }
    }
    Err(StateError("the job's state kept changing".into()))
}

/// A synchronous job run for longer than this since its submit may have lost
/// its client (the ingress then stored it `queued`): its state is looked up.
/// Shorter ones are not, so the common case costs no extra round trip.
const ADOPT_CHECK_AFTER_MS: u64 = 1_000;
/// Clocks of ingresses and workers may differ by this much: an answer this
/// close to the end of its ingress's wait is stored as if the wait were over.
const WAIT_CLOCK_MARGIN_MS: u64 = 2_000;

/// Stores a synchronous job's outcome as its state when its client may no
/// longer take it from the ingress ([`state::adopt`]): the ingress's wait is
/// over (it answered 504 naming the job, or it is gone), or the job ran long
/// enough for its client to have left. A streamed answer went out as it came
/// and is not kept. `true` when the outcome is stored.
pub(crate) async fn adopt_detached(
    ctx: &JobContext,
    env: &Envelope,
    ran: &Ran,
    status: JobStatus,
    outcome: &Outcome,
) -> bool {
    if env.reply.is_none() || env.stream {
        return false;
    }
    let now = now_ms();
    let wait_over = env.wait_until_ms.is_some_and(|until| now + WAIT_CLOCK_MARGIN_MS >= until);
    if !wait_over && now.saturating_sub(env.submitted_ms) < ADOPT_CHECK_AFTER_MS {
        return false;
    }
    store_sync(ctx, env, ran, status, outcome, wait_over).await
}

/// What a run stores with a synchronous job's outcome besides the outcome:
/// its attempt, its unanswered calls, and the ledger's note of the call.
pub struct Ran {
    pub attempt: u32,
    pub unanswered: u32,
    pub ledger: jobstate::LedgerNote,
}

/// How long a worker repeats storing an outcome it alone holds.
const STORE_SYNC_FOR: Duration = Duration::from_secs(30);

/// Stores a synchronous job's outcome as its state ([`state::adopt`]; with
/// `create`, also when the job has none), counted and logged. Called with
/// `create` when the ingress's wait is over, or when the ingress did not
/// confirm the answer (lost with its NATS node, left unread, or the ingress
/// gone): its client then gets a 504 naming the job, and
/// `GET /v1/jobs/{id}` finds the outcome.
pub(crate) async fn store_sync(
    ctx: &JobContext,
    env: &Envelope,
    ran: &Ran,
    status: JobStatus,
    outcome: &Outcome,
    create: bool,
) -> bool {
    // The only copy of the answer: repeated while the bucket has no leader
    // (an election, a partition), for up to `STORE_SYNC_FOR`.
    let stored = (|| adopt(&ctx.job_state, &ctx.state_commit, env, ran, status, outcome, create))
        .retry(repeated_for(STORE_SYNC_FOR))
        .notify(|error, _| tracing::info!(%error, "storing a synchronous job's outcome failed; retrying"))
        .await;
    match stored {
        Ok(stored) => {
            if stored {
                metrics::counter!(m::SYNC_OUTCOMES_STORED, "result" => "stored").increment(1);
                tracing::info!(create, "the client may no longer wait; its outcome is stored as the job's state");
            }
            stored
        }
        Err(error) => {
            // The ingress, if it is still there, stores it when nobody takes it.
            metrics::counter!(m::SYNC_OUTCOMES_STORED, "result" => "failed").increment(1);
            tracing::warn!(%error, "cannot store the outcome of a synchronous job whose client may have left");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Delivery;

    #[test]
    fn a_run_is_carried_on_by_its_own_message_only() {
        let own = |attempt, seq| Delivery { attempt, seq: Some(seq) };
        assert!(own(1, 7).continues(Some(7)), "a count of 1 after a consumer's leader changed");
        assert!(own(3, 7).continues(Some(7)));
        assert!(!own(1, 8).continues(Some(7)), "another message of the job is a duplicate");
        assert!(!own(2, 8).continues(Some(7)), "redelivered or not");
        // A state written before the sequence was kept: the count decides.
        assert!(own(2, 8).continues(None));
        assert!(!own(1, 8).continues(None));
        assert!(Delivery { attempt: 2, seq: None }.continues(Some(7)));
    }
}
