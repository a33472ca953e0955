//! Recording job outcomes: events are gathered for a few milliseconds and
//! published to the events stream as one message, so a job costs a fraction
//! of a JetStream write instead of a whole one (and the ledger a fraction of
//! a delivery and an ack). A job is acked only after the batch holding its
//! event is stored; the client's answer never waits for this.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use sluice_core::event::JobEvent;
use sluice_core::wire::envelope::H_MSG_ID;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::metrics as m;

/// Most events in one batch message.
const MAX_BATCH: usize = 128;
/// Longest the first event of a batch waits for company.
const LINGER: Duration = Duration::from_millis(2);
/// How long a batch's publish is repeated before its jobs go back to the
/// queue (their redeliveries record the events from the jobs' states).
const PUBLISH_FOR: Duration = Duration::from_secs(15);

type Pending = (JobEvent, oneshot::Sender<bool>);

#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Pending>,
}

impl EventSink {
    /// Starts the batching task; it ends when shutdown begins and what was
    /// sent before is recorded, or when every sink is dropped.
    pub fn start(js: async_nats::jetstream::Context, tasks: &sluice_core::tasks::Tasks) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tasks.spawn(run(js, rx, tasks.stopping()));
        Self { tx }
    }

    /// Records `event`; `true` once JetStream has stored it.
    pub async fn record(&self, event: JobEvent) -> bool {
        let (done, stored) = oneshot::channel();
        if self.tx.send((event, done)).await.is_err() {
            return false;
        }
        stored.await.unwrap_or(false)
    }
}

async fn run(
    js: async_nats::jetstream::Context,
    mut rx: mpsc::Receiver<Pending>,
    stopping: tokio_util::sync::CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            p = rx.recv() => p,
            _ = stopping.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = next else { return };
        let mut batch = vec![first];
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(p) => batch.push(p),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        let (events, waiters): (Vec<JobEvent>, Vec<oneshot::Sender<bool>>) = batch.into_iter().unzip();
        let stored = publish(&js, &events).await;
        for waiter in waiters {
            let _ = waiter.send(stored);
        }
    }
}

/// Publishes one batch and waits for JetStream to store it, retrying with
/// backoff under one message id, so a retry that raced a lost ack is a duplicate.
async fn publish(js: &async_nats::jetstream::Context, events: &[JobEvent]) -> bool {
    let Ok(payload) = serde_json::to_vec(events) else { return false };
    let payload = Bytes::from(payload);
    let msg_id = Uuid::now_v7().to_string();
    let subject = sluice_core::wire::subjects::events();
    let attempt = || async {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(H_MSG_ID, msg_id.as_str());
        js.publish_with_headers(subject.clone(), headers, payload.clone()).await?.await
    };
    // For up to PUBLISH_FOR: through an election of the events stream's
    // leader (about ten seconds when a node is cut off), not just a blip.
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .with_total_delay(Some(PUBLISH_FOR))
        .without_max_times();
    match attempt.retry(policy).await {
        Ok(_) => true,
        Err(error) => {
            metrics::counter!(m::EVENT_PUBLISH_FAILURES).increment(events.len() as u64);
            tracing::warn!(%error, events = events.len(), "could not record job outcomes; those jobs will run again");
            false
        }
    }
}
