//! Routing workers' answers to the requests waiting for them.
//!
//! Each ingress subscribes once to `_SLUICE.reply.<ingress-id>.*`; a request
//! registers a numbered slot before it publishes its job and names the slot's
//! subject in the envelope. One task owns the slot table and hands each
//! answer to its waiter, so there is no per-request subscription and no lock.
//!
//! An answer whose request is gone (the client timed out or disconnected)
//! is not lost: it is stored as the job's state, where
//! `GET /v1/jobs/{id}` finds it with the job id the 504 named.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use sluice_core::envelope::{
    Endpoint, H_ATTEMPTS, H_CHUNK, H_DEADLINE, H_ENDPOINT, H_EVENT, H_JOB_ID, H_POOL, H_RETRY_AFTER, H_STATUS,
    H_STREAM_END, H_SUBMITTED, H_TENANT,
};
use sluice_core::event::JobStatus;
use sluice_core::jobstate::{self, JobRecord};
use sluice_core::now_ms;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A worker's answer: the HTTP status and body to give the client; or, for
/// a streamed answer, one chunk of it (`chunk`), then its end (`end`).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: Bytes,
    /// Position of a streamed chunk, from 0.
    pub chunk: Option<u64>,
    /// The attempt that sent it.
    pub attempt: Option<u64>,
    /// The last message of a streamed answer.
    pub end: bool,
    /// A streamed chunk's server-sent event name, when it has one.
    pub event: Option<String>,
}

enum Command {
    Register(u64, mpsc::UnboundedSender<Reply>),
    Forget(u64),
}

pub struct Replies {
    prefix: String,
    next: AtomicU64,
    commands: mpsc::UnboundedSender<Command>,
}

/// A registered slot; dropping it frees the slot.
pub struct Waiter {
    pub subject: String,
    id: u64,
    rx: mpsc::UnboundedReceiver<Reply>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Waiter {
    /// Waits for the answer (or the next chunk of a streamed one); `None`
    /// if the router stopped.
    pub async fn recv(&mut self) -> Option<Reply> {
        self.rx.recv().await
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Forget(self.id));
    }
}

impl Replies {
    /// Subscribes to this ingress's reply subjects and starts the router.
    pub async fn start(
        client: &async_nats::Client,
        ingress_id: &str,
        job_state: kv::Store,
        shutdown: CancellationToken,
    ) -> Result<Self, async_nats::SubscribeError> {
        let prefix = format!("_SLUICE.reply.{ingress_id}");
        let mut subscription = client.subscribe(format!("{prefix}.*")).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
        tokio::spawn(async move {
            let mut waiting: HashMap<u64, mpsc::UnboundedSender<Reply>> = HashMap::new();
            loop {
                tokio::select! {
                    // Registrations first: a slot is always known before its answer.
                    biased;
                    _ = shutdown.cancelled() => return,
                    command = rx.recv() => match command {
                        Some(Command::Register(id, sender)) => { waiting.insert(id, sender); }
                        Some(Command::Forget(id)) => { waiting.remove(&id); }
                        None => return,
                    },
                    message = subscription.next() => {
                        let Some(message) = message else { return };
                        if let Some(orphan) = route(&mut waiting, message) {
                            tokio::spawn(store_orphan(job_state.clone(), orphan));
                        }
                    }
                }
            }
        });
        Ok(Self { prefix, next: AtomicU64::new(1), commands: tx })
    }

    pub fn register(&self) -> Waiter {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.commands.send(Command::Register(id, tx));
        Waiter { subject: format!("{}.{id}", self.prefix), id, rx, commands: self.commands.clone() }
    }
}

/// An answer nobody waits for any more: its body and headers.
type Orphan = (Bytes, Option<async_nats::HeaderMap>);

/// Hands the answer to its waiter; returns it when nobody waits any more.
fn route(waiting: &mut HashMap<u64, mpsc::UnboundedSender<Reply>>, message: async_nats::Message) -> Option<Orphan> {
    let id = message.subject.rsplit('.').next().and_then(|t| t.parse::<u64>().ok());
    let header = |name: &str| message.headers.as_ref()?.get(name)?.as_str().parse::<u64>().ok();
    let chunk = header(H_CHUNK);
    let end = message.headers.as_ref().and_then(|h| h.get(H_STREAM_END)).is_some();
    // A chunk leaves its slot in place for the next one; a final answer frees it.
    let sender = match (id, chunk) {
        (Some(id), Some(_)) => waiting.get(&id).cloned(),
        (Some(id), None) => waiting.remove(&id),
        (None, _) => None,
    };
    let Some(sender) = sender else {
        metrics::counter!(crate::metrics::ORPHAN_REPLIES).increment(1);
        // A streamed answer's pieces are not stored: it went out as it came.
        return (chunk.is_none() && !end).then_some((message.payload, message.headers));
    };
    let reply = Reply {
        status: header(H_STATUS).and_then(|s| u16::try_from(s).ok()).unwrap_or(502),
        retry_after: header(H_RETRY_AFTER),
        chunk,
        attempt: header(H_ATTEMPTS),
        end,
        event: message.headers.as_ref().and_then(|h| h.get(H_EVENT)).map(|v| v.as_str().to_owned()),
        body: message.payload,
    };
    let headers = message.headers;
    match sender.send(reply) {
        Ok(()) => None,
        Err(mpsc::error::SendError(reply)) => {
            // The waiter gave up between our lookup and now.
            metrics::counter!(crate::metrics::ORPHAN_REPLIES).increment(1);
            (reply.chunk.is_none() && !reply.end).then_some((reply.body, headers))
        }
    }
}

/// Stores an answer nobody waits for as the job's final state.
async fn store_orphan(job_state: kv::Store, (payload, headers): Orphan) {
    let Some(h) = headers.as_ref() else { return };
    let text = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
    let number = |name: &str| text(name).and_then(|v| v.parse::<u64>().ok());
    let (Some(job), Some(tenant), Some(pool)) = (
        text(H_JOB_ID).and_then(|v| v.parse::<Uuid>().ok()),
        text(H_TENANT).and_then(|v| v.parse::<Uuid>().ok()),
        text(H_POOL),
    ) else {
        return;
    };
    let status = number(H_STATUS).and_then(|s| u16::try_from(s).ok()).unwrap_or(502);
    let submitted = number(H_SUBMITTED).unwrap_or_else(now_ms);
    let deadline = number(H_DEADLINE).unwrap_or(submitted);
    let endpoint = text(H_ENDPOINT).and_then(|e| Endpoint::parse(&e)).unwrap_or(Endpoint::ChatCompletions);
    let mut record = JobRecord::queued(job, endpoint.as_str(), &pool, submitted, deadline.saturating_sub(submitted));
    record.attempts = number(H_ATTEMPTS).unwrap_or(1) as u32;
    let outcome = if (200..300).contains(&status) { JobStatus::Completed } else { JobStatus::Failed };
    record.conclude(outcome, status, &payload, now_ms() / 1000);
    let Ok(value) = serde_json::to_vec(&record) else { return };
    if let Err(error) = job_state.put(jobstate::key(tenant, job), value.into()).await {
        tracing::warn!(%error, job_id = %job, "could not store an answer whose client left");
    }
}
