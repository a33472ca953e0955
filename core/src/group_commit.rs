//! Group commit for the writes on a job's path (`nats.group_commit`).
//!
//! With `sync_interval: always` every JetStream write is synced to disk
//! before it is acknowledged, one sync per message: that, not CPU, bounds
//! how many jobs a second Sluice accepts and runs. A [`GroupCommit`] hands
//! the writes of many concurrent requests to one task per process and
//! stream, which stores whatever is waiting in one JetStream atomic batch:
//! one commit, one sync and one acknowledgement for the lot.
//!
//! It never waits for more writes to arrive. While `in_flight` batches await
//! their acknowledgement, new writes queue; the next batch takes all of them
//! (up to [`MAX_BATCH`]). An idle process therefore sends each write alone,
//! as an ordinary publish, and a busy one sends as many per commit as arrive
//! during one sync — the batch grows with the load.
//!
//! Nothing is acknowledged before it is stored: a caller gets its answer
//! from its batch's commit. A batch is stored whole or not at all; when the
//! stream refuses one (a key's expected revision did not match, a duplicate
//! message id, a stream without atomic publishes), every write of it is
//! sent again on its own so that each caller gets its own answer. Errors
//! that another attempt may fix (no stream leader, a lost acknowledgement)
//! go to every caller of the batch, whose own retry applies.

use crate::tasks::Tasks;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, publish::PublishAck};
use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Writes in one batch at most (the server refuses batches over 1,000).
pub const MAX_BATCH: usize = 256;
/// A batch stops taking writes once their payloads pass this many bytes.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Batches of one stream awaiting their commit at once, per process.
const IN_FLIGHT: usize = 2;

/// Histogram of writes per commit, labelled with the stream.
pub const BATCH_SIZE: &str = "sluice_group_commit_batch_size";
/// Batches the stream refused and that were sent again write by write.
pub const BATCH_FALLBACKS: &str = "sluice_group_commit_fallbacks_total";
pub const BATCH_SHORT: &str = "sluice_group_commit_short_acks_total";
/// Writes too large for a NATS message, sent (and refused) alone.
pub const OVERSIZED: &str = "sluice_group_commit_oversized_total";

/// Describes the metrics above (called by each process's `describe`).
pub fn describe() {
    metrics::describe_histogram!(BATCH_SIZE, "writes stored per commit by the group commit, by stream");
    metrics::describe_counter!(BATCH_FALLBACKS, "atomic batches the stream refused, sent again write by write");
    metrics::describe_counter!(
        BATCH_SHORT,
        "atomic batches whose commit acknowledgement named another batch or fewer writes than were sent; their writes were answered as failed, to be repeated"
    );
    metrics::describe_counter!(OVERSIZED, "writes too large for a NATS message, sent alone so they fail alone");
}

struct Write {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    done: oneshot::Sender<Result<PublishAck, PublishError>>,
}

/// Writes to one stream: through the batching task, or (disabled) each
/// published and acknowledged on its own.
#[derive(Clone)]
pub struct GroupCommit {
    js: jetstream::Context,
    batches: Option<mpsc::Sender<Write>>,
    counts: Arc<Counts>,
}

/// What a [`GroupCommit`] has sent since it started.
#[derive(Debug, Default)]
pub struct Counts {
    /// Commits: lone publishes and atomic batches.
    pub commits: AtomicU64,
    /// Writes in them.
    pub writes: AtomicU64,
    /// Batches the stream refused, sent again write by write.
    pub fallbacks: AtomicU64,
}

impl GroupCommit {
    /// Each write published on its own (`nats.group_commit = false`).
    pub fn direct(js: jetstream::Context) -> Self {
        Self { js, batches: None, counts: Arc::default() }
    }

    /// Starts the batching task for one stream; `stream` labels its metrics.
    /// The stream must allow atomic publishes (nats-server 2.12 or later).
    pub fn start(tasks: &Tasks, nats: async_nats::Client, js: jetstream::Context, stream: &str) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        let counts = Arc::<Counts>::default();
        tasks.spawn(run(tasks.clone(), nats, js.clone(), rx, stream.to_owned(), counts.clone()));
        Self { js, batches: Some(tx), counts }
    }

    /// Commits, writes and fallbacks so far (batched mode only).
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// `start` when `enabled`, else `direct`.
    pub fn new(tasks: &Tasks, enabled: bool, nats: async_nats::Client, js: jetstream::Context, stream: &str) -> Self {
        if enabled { Self::start(tasks, nats, js, stream) } else { Self::direct(js) }
    }

    /// Stores one message and returns its acknowledgement (its own sequence
    /// in the stream), or the error of the publish, as a plain publish would.
    pub async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PublishAck, PublishError> {
        let Some(batches) = &self.batches else {
            return self.js.publish_with_headers(subject, headers, payload).await?.await;
        };
        let (done, answer) = oneshot::channel();
        if batches.send(Write { subject, headers, payload, done }).await.is_err() {
            return Err(PublishError::new(PublishErrorKind::BrokenPipe));
        }
        answer.await.unwrap_or_else(|_| Err(PublishError::new(PublishErrorKind::BrokenPipe)))
    }
}

/// Commits what the channel brings until shutdown begins, then what is
/// still queued in it, and stops (a write sent after that fails as a
/// broken pipe would).
async fn run(
    tasks: Tasks,
    nats: async_nats::Client,
    js: jetstream::Context,
    mut rx: mpsc::Receiver<Write>,
    stream: String,
    counts: Arc<Counts>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let stopping = tasks.stopping();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let next = tokio::select! {
            biased;
            write = rx.recv() => write,
            _ = stopping.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = next else { return };
        let mut bytes = first.payload.len();
        let mut writes = vec![first];
        while writes.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            let Ok(write) = rx.try_recv() else { break };
            bytes += write.payload.len();
            writes.push(write);
        }
        metrics::histogram!(BATCH_SIZE, "stream" => stream.clone()).record(writes.len() as f64);
        counts.commits.fetch_add(1, Ordering::Relaxed);
        counts.writes.fetch_add(writes.len() as u64, Ordering::Relaxed);
        let (nats, js, stream, counts) = (nats.clone(), js.clone(), stream.clone(), counts.clone());
        tasks.spawn(async move {
            commit(&nats, &js, writes, &stream, &counts).await;
            drop(slot);
        });
    }
}

/// Room kept for a write's subject and headers when judging whether it
/// fits in one NATS message.
const MESSAGE_HEADROOM: usize = 8 * 1024;

/// Stores `writes` in one atomic batch and answers each of them. A write
/// that cannot fit in a NATS message is sent alone, so that its failure
/// (`MaxPayloadExceeded`, not retryable) is its own and never its batch's.
async fn commit(nats: &async_nats::Client, js: &jetstream::Context, writes: Vec<Write>, stream: &str, counts: &Counts) {
    let fits = nats.server_info().max_payload.saturating_sub(MESSAGE_HEADROOM);
    let (alone, writes): (Vec<Write>, Vec<Write>) = writes.into_iter().partition(|w| w.payload.len() > fits);
    if alone.is_empty() {
        return commit_fitting(nats, js, writes, stream, counts).await;
    }
    metrics::counter!(OVERSIZED, "stream" => stream.to_owned()).increment(alone.len() as u64);
    let each = alone.into_iter().map(|w| async move {
        let result = single(js, w.subject, w.headers, w.payload).await;
        let _ = w.done.send(result);
    });
    futures::future::join(futures::future::join_all(each), commit_fitting(nats, js, writes, stream, counts)).await;
}

async fn commit_fitting(
    nats: &async_nats::Client,
    js: &jetstream::Context,
    mut writes: Vec<Write>,
    stream: &str,
    counts: &Counts,
) {
    if writes.is_empty() {
        return;
    }
    if writes.len() == 1
        && let Some(w) = writes.pop()
    {
        let result = single(js, w.subject, w.headers, w.payload).await;
        let _ = w.done.send(result);
        return;
    }
    match send_batch(nats, js, &writes).await.and_then(|(id, ack)| covers(ack, &id, writes.len())) {
        Ok(ack) => {
            let last = writes.len() as u64 - 1;
            for (i, w) in writes.into_iter().enumerate() {
                let mut own = ack.clone();
                // A batch is stored in one run of sequences, in order.
                own.sequence = ack.sequence - (last - i as u64);
                let _ = w.done.send(Ok(own));
            }
        }
        Err(e) if retryable(&e) => {
            let (kind, message) = (e.kind(), e.to_string());
            for w in writes {
                let _ = w.done.send(Err(PublishError::with_source(kind, message.clone())));
            }
        }
        Err(e) => {
            // The stream refused the batch as a whole: find out which write
            // it objected to by sending each on its own.
            metrics::counter!(BATCH_FALLBACKS, "stream" => stream.to_owned()).increment(1);
            counts.fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, writes = writes.len(), "atomic batch refused; writing one by one");
            let each = writes.into_iter().map(|w| async move {
                let result = single(js, w.subject, w.headers, w.payload).await;
                let _ = w.done.send(result);
            });
            futures::future::join_all(each).await;
        }
    }
}

async fn single(
    js: &jetstream::Context,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<PublishAck, PublishError> {
    js.publish_with_headers(subject, headers, payload).await?.await
}

/// The commit's acknowledgement when it says the server stored this batch
/// (`batch`) whole (`count`). A clustered stream's apply may skip a member it
/// could not store and still acknowledge the commit: then which writes are
/// stored is unknown, so none is answered as stored. The error may pass
/// (each caller repeats its write under its message id or expected
/// revision, and finds it if it was stored after all).
pub fn covers(ack: PublishAck, batch_id: &str, writes: usize) -> Result<PublishAck, PublishError> {
    if ack.batch_id.as_deref() == Some(batch_id) && ack.batch_size == Some(writes as u64) {
        return Ok(ack);
    }
    metrics::counter!(BATCH_SHORT).increment(1);
    tracing::warn!(
        batch = batch_id, sent = writes, acked_batch = ?ack.batch_id, acked_count = ?ack.batch_size,
        "an atomic batch's acknowledgement does not cover every write; none is taken as stored"
    );
    Err(PublishError::with_source(
        PublishErrorKind::BrokenPipe,
        format!("the batch's acknowledgement covers {:?} of {writes} writes", ack.batch_size),
    ))
}

/// Sends every write but the last as a batch member, then the last with the
/// commit marker; returns the batch's id and the commit's acknowledgement.
async fn send_batch(
    nats: &async_nats::Client,
    js: &jetstream::Context,
    writes: &[Write],
) -> Result<(String, PublishAck), PublishError> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let n = writes.len();
    let headers = |i: usize, w: &Write| {
        let mut h = w.headers.clone();
        h.insert("Nats-Batch-Id", id.as_str());
        h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        if i + 1 == n {
            h.insert("Nats-Batch-Commit", "1");
        }
        h
    };
    for (i, w) in writes[..n - 1].iter().enumerate() {
        nats.publish_with_headers(w.subject.clone(), headers(i, w), w.payload.clone())
            .await
            .map_err(|e| PublishError::with_source(PublishErrorKind::BrokenPipe, e))?;
    }
    let last = &writes[n - 1];
    let ack = js.publish_with_headers(last.subject.clone(), headers(n - 1, last), last.payload.clone()).await?.await?;
    Ok((id, ack))
}

/// Errors that say nothing about the writes themselves and may pass: the
/// stream had no leader (no responders), the connection broke or the
/// acknowledgement was lost or late. The write (or its batch) may then have
/// been stored; callers retry it under its message id, as after a lone publish.
pub fn retryable(e: &PublishError) -> bool {
    matches!(e.kind(), PublishErrorKind::StreamNotFound | PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe)
}

/// Headers of a key-value write that must find `revision` as the key's last
/// (0: the key must not exist), as `kv::Store::update` sends.
pub fn expect_revision(revision: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", revision.to_string().as_str());
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(batch: Option<&str>, count: Option<u64>) -> PublishAck {
        let mut json = serde_json::json!({"stream": "JOBS", "seq": 40});
        if let Some(b) = batch {
            json["batch"] = b.into();
        }
        if let Some(c) = count {
            json["count"] = c.into();
        }
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_commit_ack_covers_its_batch_only_when_it_names_it_and_counts_every_write() {
        assert_eq!(covers(ack(Some("b1"), Some(4)), "b1", 4).unwrap().sequence, 40);
        // Trimmed: the server stored fewer writes than were sent.
        let short = covers(ack(Some("b1"), Some(3)), "b1", 4).unwrap_err();
        assert!(retryable(&short), "the writes are repeated: {short}");
        // Forged or foreign: another batch's acknowledgement, or none at all.
        assert!(covers(ack(Some("b2"), Some(4)), "b1", 4).is_err());
        assert!(covers(ack(None, None), "b1", 4).is_err());
    }
}
