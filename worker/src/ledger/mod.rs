//! The ledger loop: job outcome events from the events stream into Postgres,
//! many per statement. Each message of the stream holds a batch of events. An event is acked only after its batch committed, so
//! a crash or a Postgres outage delays the ledger but loses nothing.
//!
//! Writes are idempotent: one row per job, and a `completed` row is never
//! overwritten, so a redelivered event or a job that ran twice leaves one
//! record.

pub mod events;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use sluice_core::db;
use sluice_core::event::{JobEvent, JobStatus};
use sluice_core::jobstate::JobRecord;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// Longest a received event waits for more to fill its batch.
const FLUSH_AFTER: Duration = Duration::from_millis(50);

/// A stream message the ledger cannot read (it is terminated).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a job-state subject: {0}")]
    Subject(String),
    #[error("undecodable payload: {0}")]
    Json(#[from] serde_json::Error),
    #[error("job id in subject and record differ")]
    Mismatch,
}

/// A job-state message: its tenant and record; `None` for a deletion.
pub fn parse_state(message: &Message) -> Result<Option<(uuid::Uuid, JobRecord)>, DecodeError> {
    let deleted = message
        .headers
        .as_ref()
        .and_then(|h| h.get("KV-Operation"))
        .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
    if deleted {
        return Ok(None);
    }
    let subject = message.subject.as_str();
    let (tenant, job) = sluice_core::wire::subjects::parse_kv_key(subject)
        .and_then(|(_, key)| sluice_core::jobstate::parse_key(key))
        .ok_or_else(|| DecodeError::Subject(subject.to_owned()))?;
    let record: JobRecord = serde_json::from_slice(&message.payload)?;
    if record.id != job {
        return Err(DecodeError::Mismatch);
    }
    Ok(Some((tenant, record)))
}

/// Turns one stream message into the job rows it speaks of.
pub type Decode = fn(&Message) -> Result<Vec<JobEvent>, DecodeError>;

/// Outcome events, as the worker's event sink publishes them: a batch each.
pub fn decode_events(message: &Message) -> Result<Vec<JobEvent>, DecodeError> {
    Ok(serde_json::from_slice(&message.payload)?)
}

/// Job-state changes of asynchronous jobs, from the key-value bucket's
/// stream (`$KV.<bucket>.<tenant>.<job>`): the ledger learns of a job when it
/// is queued, not only when it ends.
pub fn decode_state(message: &Message) -> Result<Vec<JobEvent>, DecodeError> {
    let Some((tenant, record)) = parse_state(message)? else { return Ok(Vec::new()) };
    let job = record.id;
    // (the run's own account, when it ended the job: a completed row is
    // final, so the state's row must carry the tokens if it comes first)
    let note = record.ledger.unwrap_or_default();
    Ok(vec![JobEvent {
        job_id: job,
        tenant_id: tenant,
        pool: record.model,
        endpoint: record.endpoint,
        status: record.status,
        attempts: record.attempts as i32,
        upstream_status: note.upstream_status,
        usage: note.usage,
        error_code: record.error.as_ref().map(|e| e.code.clone()),
        error_message: record.error.as_ref().map(|e| e.message.clone()),
        request_id: String::new(),
        submitted_ms: record.created_ms.unwrap_or(record.created_at * 1000),
        started_ms: record.started_ms.or(record.started_at.map(|s| s * 1000)),
        finished_ms: record.finished_ms.or(record.finished_at.map(|s| s * 1000)),
        metadata: record.metadata.and_then(|m| serde_json::to_string(&m).ok()),
        expires_ms: Some(record.expires_at * 1000),
        unanswered_calls: i32::try_from(record.unanswered_calls).unwrap_or(i32::MAX),
    }])
}

pub async fn run(consumer: PullConsumer, db: PgPool, batch_size: usize, decode: Decode, shutdown: CancellationToken) {
    crate::batches::run(consumer, batch_size, FLUSH_AFTER, "ledger", shutdown, |batch| write_batch(&db, batch, decode))
        .await;
}

async fn write_batch(db: &PgPool, batch: Vec<Message>, decode: Decode) {
    // Sorted by job id: the two ledger loops write concurrently, and rows
    // locked in the same order cannot deadlock each other.
    let mut events: BTreeMap<uuid::Uuid, JobEvent> = BTreeMap::new();
    let mut valid = Vec::with_capacity(batch.len());
    for message in batch {
        match decode(&message) {
            Ok(batch) => {
                for event in batch {
                    // One row per job in a statement: keep the event that wins.
                    match events.get(&event.job_id) {
                        Some(kept) if rank(kept) >= rank(&event) => {}
                        _ => {
                            events.insert(event.job_id, event);
                        }
                    }
                }
                valid.push(message);
            }
            Err(error) => {
                tracing::warn!(%error, "undecodable job event terminated");
                let _ = message.ack_with(AckKind::Term).await;
            }
        }
    }
    if events.is_empty() {
        return;
    }
    let started = Instant::now();
    let count = events.len();
    let events: Vec<JobEvent> = events.into_values().collect();
    let written = match db::jobs::record_events(db, &events).await {
        Err(error) if db::jobs::refused_data(&error) => {
            // One row spoils the statement for all: write them one by one
            // and park those Postgres refuses, so none holds the others.
            tracing::warn!(%error, events = count, "ledger batch refused; writing its rows one by one");
            one_by_one(db, &events).await
        }
        other => other,
    };
    match written {
        Ok(()) => {
            metrics::histogram!(m::LEDGER_BATCH_SECONDS).record(started.elapsed().as_secs_f64());
            metrics::counter!(m::LEDGER_WRITES).increment(count as u64);
            for message in valid {
                if let Err(error) = message.ack().await {
                    tracing::debug!(%error, "ledger ack failed; the event will be written again");
                }
            }
        }
        Err(error) => {
            metrics::counter!(m::LEDGER_FAILURES).increment(1);
            tracing::warn!(%error, events = count, "ledger write failed; events will be retried");
            for message in valid {
                let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(2)))).await;
            }
        }
    }
}

/// Writes each event alone; one Postgres refuses for its data goes to
/// `ledger_dead_letters`. An error of another kind (Postgres away) stops
/// here: the batch is retried whole, and the rows already written are
/// written again harmlessly.
async fn one_by_one(db: &PgPool, events: &[JobEvent]) -> Result<(), db::DbError> {
    for event in events {
        match db::jobs::record_events(db, std::slice::from_ref(event)).await {
            Ok(()) => {}
            Err(error) if db::jobs::refused_data(&error) => {
                db::jobs::park_event(db, event, &error.to_string()).await?;
                metrics::counter!(m::LEDGER_PARKED).increment(1);
                tracing::error!(%error, job_id = %event.job_id, tenant = %event.tenant_id,
                    "job event refused by Postgres; parked in ledger_dead_letters");
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Which of two events about one job the ledger keeps: the later in rank
/// (queued, in progress by attempt, terminal); of two terminal ones the
/// first, as the jobs table keeps the first terminal state it stores.
fn rank(e: &JobEvent) -> (u8, i32) {
    match e.status {
        s if s.is_terminal() => (2, 0),
        JobStatus::InProgress => (1, e.attempts),
        _ => (0, e.attempts),
    }
}
