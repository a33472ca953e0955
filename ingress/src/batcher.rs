//! Job publishes coalesced into JetStream atomic batches (`nats.batch_publishes`).
//!
//! Requests hand their job to one task. It takes what is waiting — never
//! waiting for more — and stores it in one commit: a single job is published
//! as usual; several are sent with `Nats-Batch-Id` and `Nats-Batch-Sequence`,
//! the last with `Nats-Batch-Commit`, and the stream acknowledges the whole
//! batch at once (all stored, or none). Each request is answered when its
//! batch's acknowledgement arrives, so nothing is acknowledged before it is
//! stored (and, with `sync_interval: always`, on disk). Batches are sent one
//! after another on one connection and acknowledged concurrently.

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// Jobs in one batch at most (the server's default limit is 1,000).
const MAX_BATCH: usize = 256;

struct Job {
    subject: String,
    headers: HeaderMap,
    body: Bytes,
    done: oneshot::Sender<Result<(), PublishErrorKind>>,
}

#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    pub fn start(nats: async_nats::Client, js: async_nats::jetstream::Context) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
        tokio::spawn(run(nats, js, rx));
        Self { tx }
    }

    /// Stores one job; `Err` with the batch's error kind (every job of a
    /// failed batch gets it, and none of them was stored).
    pub async fn publish(&self, subject: String, headers: HeaderMap, body: Bytes) -> Result<(), PublishError> {
        let (done, answer) = oneshot::channel();
        let job = Job { subject, headers, body, done };
        if self.tx.send(job).await.is_err() {
            return Err(PublishError::new(PublishErrorKind::BrokenPipe));
        }
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(kind)) => Err(PublishError::new(kind)),
            Err(_) => Err(PublishError::new(PublishErrorKind::BrokenPipe)),
        }
    }
}

async fn run(nats: async_nats::Client, js: async_nats::jetstream::Context, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        metrics::histogram!(crate::metrics::PUBLISH_BATCH).record(jobs.len() as f64);
        let outcome = send(&nats, &js, &mut jobs).await;
        // The acknowledgement is awaited elsewhere: the next batch goes out now.
        tokio::spawn(async move {
            let result = match outcome {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.kind()),
                Err(kind) => Err(kind),
            };
            for job in jobs {
                let _ = job.done.send(result);
            }
        });
    }
}

/// Sends a batch; returns the future of its (commit's) acknowledgement.
async fn send(
    nats: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    jobs: &mut [Job],
) -> Result<async_nats::jetstream::context::PublishAckFuture, PublishErrorKind> {
    let n = jobs.len();
    if n > 1 {
        let id = uuid::Uuid::new_v4().simple().to_string();
        for (i, job) in jobs.iter_mut().enumerate() {
            job.headers.insert("Nats-Batch-Id", id.as_str());
            job.headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        }
        jobs[n - 1].headers.insert("Nats-Batch-Commit", "1");
        for job in &jobs[..n - 1] {
            nats.publish_with_headers(job.subject.clone(), job.headers.clone(), job.body.clone())
                .await
                .map_err(|_| PublishErrorKind::BrokenPipe)?;
        }
    }
    let last = &jobs[n - 1];
    js.publish_with_headers(last.subject.clone(), last.headers.clone(), last.body.clone()).await.map_err(|e| e.kind())
}
