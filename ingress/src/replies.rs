//! Routing workers' answers to the requests waiting for them.
//!
//! Each ingress subscribes once to `_SLUICE.reply.<ingress-id>.*`; a request
//! registers a numbered slot before it publishes its job and names the slot's
//! subject in the envelope. One task owns the slot table and hands each
//! answer to its waiter, so there is no per-request subscription and no lock.
//!
//! An answer whose request is gone (the client timed out or disconnected)
//! is not lost: it is stored as the job's state, where
//! `GET /v1/jobs/{id}` finds it with the job id the 504 named. A worker that
//! asks for it (a request with a reply subject) gets a confirmation once the
//! answer is handed over or stored; without one it stores the answer itself
//! (decision 0021).

use sluice_core::tasks::Tasks;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use async_nats::jetstream::kv;
use futures::StreamExt;
use sluice_core::event::JobStatus;
use sluice_core::jobstate::{self, JobRecord};
use sluice_core::nats::Role;
use sluice_core::now_ms;
use sluice_core::wire::reply::{Answer, Reply};
use sluice_core::wire::subjects;
use tokio::sync::mpsc;

enum Command {
    Register(u64, Slot),
    Forget(u64),
}

/// The router's side of a waiter: a buffer bounded in chunks
/// (`ingress.stream_buffer_chunks`) and in bytes (`ingress.stream_buffer_bytes`).
struct Slot {
    /// Each reply, with the subject of the confirmation its worker asked for.
    tx: mpsc::Sender<(Reply, Option<async_nats::Subject>)>,
    held: Arc<Held>,
}

/// What a waiter's buffer holds, shared by the router and the waiter.
#[derive(Default)]
struct Held {
    /// Bytes of chunks sent and not yet received.
    bytes: AtomicUsize,
    /// The router cut the waiter off: its buffer was full.
    overflowed: AtomicBool,
}

/// The bounds of each waiter's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    pub chunks: usize,
    pub bytes: usize,
}

pub struct Replies {
    ingress_id: String,
    confirm: Confirm,
    next: AtomicU64,
    buffer: Buffer,
    commands: mpsc::UnboundedSender<Command>,
}

/// A registered slot; dropping it frees the slot.
pub struct Waiter {
    pub subject: String,
    id: u64,
    rx: mpsc::Receiver<(Reply, Option<async_nats::Subject>)>,
    held: Arc<Held>,
    commands: mpsc::UnboundedSender<Command>,
    confirm: Confirm,
}

impl Waiter {
    /// Waits for the answer (or the next chunk of a streamed one); `None`
    /// if the router stopped, or dropped this waiter because its client
    /// read too slowly ([`Waiter::overflowed`]). An answer is confirmed to
    /// its worker only here, once the request has it: one left in the
    /// buffer by a request that gave up (504, client gone) is not, and its
    /// worker stores it as the job's state.
    pub async fn recv(&mut self) -> Option<Reply> {
        let (reply, asks) = self.rx.recv().await?;
        if let Reply::Chunk(c) = &reply {
            self.held.bytes.fetch_sub(c.data.len(), Ordering::Relaxed);
        }
        if let Some(to) = asks {
            self.confirm.send(to);
        }
        Some(reply)
    }

    /// Whether the router cut this waiter off: its buffer was full.
    pub fn overflowed(&self) -> bool {
        self.held.overflowed.load(Ordering::Relaxed)
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
        buffer: Buffer,
        tasks: &Tasks,
    ) -> Result<Self, async_nats::SubscribeError> {
        let mut subscription = client.subscribe(subjects::replies_of(ingress_id)).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
        let (shutdown, orphans) = (tasks.stopping(), tasks.clone());
        let confirm = Confirm::start(client.clone(), tasks);
        let router_confirm = confirm.clone();
        tasks.spawn(async move {
            let mut waiting: HashMap<u64, Slot> = HashMap::new();
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
                        if let Some((orphan, asks)) = route(&mut waiting, message, buffer.bytes) {
                            let confirm = asks.map(|to| (router_confirm.clone(), to));
                            orphans.spawn(store_orphan(job_state.clone(), orphan, confirm));
                        }
                    }
                }
            }
        });
        let buffer = Buffer { chunks: buffer.chunks.max(1), bytes: buffer.bytes };
        Ok(Self { ingress_id: ingress_id.to_owned(), confirm, next: AtomicU64::new(1), buffer, commands: tx })
    }

    pub fn register(&self) -> Waiter {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.buffer.chunks);
        let held = Arc::new(Held::default());
        let _ = self.commands.send(Command::Register(id, Slot { tx, held: held.clone() }));
        let subject = subjects::reply(&self.ingress_id, id);
        Waiter { subject, id, rx, held, commands: self.commands.clone(), confirm: self.confirm.clone() }
    }
}

/// Hands the answer to its waiter; returns it when nobody waits any more,
/// with the confirmation its worker asked for (sent once it is stored).
/// A streamed answer's pieces are not returned: they went out as they came.
/// A waiter whose buffer is full (its client reads slower than the provider
/// writes) is dropped: its stream ends, and nothing else waits for it.
fn route(
    waiting: &mut HashMap<u64, Slot>,
    message: async_nats::Message,
    max_bytes: usize,
) -> Option<(Box<Answer>, Option<async_nats::Subject>)> {
    // Only a worker's inbox: the confirmation is sent with the ingress's
    // response permission, which must not reach any other subject.
    let asks = message.reply.filter(|to| to.starts_with(&format!("{}.", Role::Worker.inbox_prefix())));
    let reply = match Reply::decode(message.headers.as_ref(), message.payload) {
        Ok(reply) => reply,
        Err(error) => {
            metrics::counter!(crate::metrics::ORPHAN_REPLIES).increment(1);
            tracing::warn!(%error, subject = %message.subject, "undecodable reply dropped");
            return None;
        }
    };
    // (an answer the worker stored as the job's state needs nothing more)
    let unwanted = |reply: Reply, asks: Option<async_nats::Subject>| match reply {
        Reply::Answer(a) if !a.ends_stream && !a.stored => Some((a, asks)),
        _ => None,
    };
    let Some(slot) = subjects::parse_reply(message.subject.as_str()) else {
        metrics::counter!(crate::metrics::ORPHAN_REPLIES).increment(1);
        return unwanted(reply, asks);
    };
    // A chunk leaves its slot in place for the next one; an answer frees it.
    let (sent, held) = match (&reply, waiting.get(&slot)) {
        (_, None) => {
            metrics::counter!(crate::metrics::ORPHAN_REPLIES).increment(1);
            return unwanted(reply, asks);
        }
        (Reply::Chunk(c), Some(waiter)) => {
            let len = c.data.len();
            // Counted before it is sent, so the waiter never counts it below zero.
            let before = waiter.held.bytes.fetch_add(len, Ordering::Relaxed);
            let sent = if before + len > max_bytes {
                Err(mpsc::error::TrySendError::Full((reply, None)))
            } else {
                waiter.tx.try_send((reply, None))
            };
            if sent.is_err() {
                waiter.held.bytes.fetch_sub(len, Ordering::Relaxed);
            }
            (sent, waiter.held.clone())
        }
        (Reply::Answer(_), Some(_)) => match waiting.remove(&slot) {
            Some(waiter) => (waiter.tx.try_send((reply, asks)), waiter.held),
            None => return None,
        },
    };
    match sent {
        Ok(()) => None,
        Err(mpsc::error::TrySendError::Full((reply, asks))) => {
            held.overflowed.store(true, Ordering::Relaxed);
            waiting.remove(&slot);
            metrics::counter!(crate::metrics::STREAMS_INTERRUPTED, "reason" => "slow_client").increment(1);
            unwanted(reply, asks)
        }
        Err(mpsc::error::TrySendError::Closed((reply, asks))) => {
            // The waiter gave up between our lookup and now.
            waiting.remove(&slot);
            metrics::counter!(crate::metrics::ORPHAN_REPLIES).increment(1);
            unwanted(reply, asks)
        }
    }
}

/// Confirmations of answers the router took (a worker that asks for one
/// stores the answer as the job's state when it does not come), sent by a
/// task of their own so that a slow connection never holds up the router.
/// A confirmation dropped on a full buffer only makes a worker store an
/// answer that was delivered.
#[derive(Clone)]
pub(crate) struct Confirm(mpsc::Sender<async_nats::Subject>);

impl Confirm {
    fn start(client: async_nats::Client, tasks: &Tasks) -> Self {
        let (tx, mut rx) = mpsc::channel::<async_nats::Subject>(4096);
        let shutdown = tasks.stopping();
        tasks.spawn(async move {
            loop {
                let to = tokio::select! {
                    to = rx.recv() => match to { Some(to) => to, None => return },
                    _ = shutdown.cancelled() => return,
                };
                let _ = client.publish(to, bytes::Bytes::new()).await;
            }
        });
        Self(tx)
    }

    fn send(&self, to: async_nats::Subject) {
        if self.0.try_send(to).is_err() {
            tracing::debug!("confirmation buffer full; the worker stores the answer as the job's state");
        }
    }
}

/// Stores an answer nobody waits for as the job's final state, unless the
/// job has one already (its worker, not confirmed in time, stored it); then
/// confirms it to its worker, when it asked.
pub(crate) async fn store_orphan(
    job_state: kv::Store,
    answer: Box<Answer>,
    confirm: Option<(Confirm, async_nats::Subject)>,
) {
    let job = &answer.job;
    let mut record = JobRecord::of_job(job);
    record.attempts = answer.attempt;
    let status = answer.outcome.status();
    let outcome = if (200..300).contains(&status) { JobStatus::Completed } else { JobStatus::Failed };
    record.conclude(outcome, &answer.outcome, now_ms() / 1000);
    let Ok(value) = serde_json::to_vec(&record) else { return };
    let key = jobstate::key(job.tenant, job.job_id);
    // Created, or written over a state that is not terminal (the `queued`
    // one of a 504), never over an outcome.
    let stored = match job_state.create(&key, value.clone().into()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => match job_state.entry(&key).await {
            Ok(Some(entry)) => match serde_json::from_slice::<JobRecord>(&entry.value) {
                Ok(existing) if existing.status.is_terminal() => Ok(()),
                _ => job_state.update(&key, value.into(), entry.revision).await.map(|_| ()).map_err(|e| e.to_string()),
            },
            Ok(None) => Err("the job's state vanished".to_owned()),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    match stored {
        Ok(()) => {
            if let Some((confirm, to)) = confirm {
                confirm.send(to);
            }
        }
        Err(error) => tracing::warn!(%error, job_id = %job.job_id, "could not store an answer whose client left"),
    }
}
