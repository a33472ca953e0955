//! The fetch loop: whenever this worker has free slots, ask the fair
//! scheduler which tenant queue goes next, fetch a small batch of what that
//! queue holds now, and run each job in its own task. Nothing is fetched
//! ahead of a free slot (a held message's `ack_wait` would run out while it
//! waits, and another worker could have run it).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use sluice_core::envelope::H_EST_TOKENS;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::fair::{Fair, QueueKey};
use crate::job::{self, JobContext};
use crate::metrics as m;
use crate::queues::{Hint, Queues};

pub struct Executor {
    pub queues: Queues,
    pub fair: Fair,
    pub hints: mpsc::Receiver<Hint>,
    pub ctx: Arc<JobContext>,
    pub slots: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub max_fetch: usize,
    /// Longest wait for a hint while idle.
    pub discover: Duration,
}

/// A finished job's real usage, to correct the scheduler's estimate.
struct Done {
    tenant: Uuid,
    class: sluice_core::envelope::Class,
    estimate: f64,
    charged: f64,
    used: f64,
}

impl Executor {
    /// Runs until `shutdown` fires; in-flight jobs keep running afterwards
    /// (see [`Executor::drain`]).
    pub async fn run(&mut self, shutdown: CancellationToken) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut permits: Vec<OwnedSemaphorePermit> = Vec::new();
        let mut last_prune = tokio::time::Instant::now();
        loop {
            if permits.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    permit = self.slots.clone().acquire_owned() => match permit {
                        Ok(p) => permits.push(p),
                        Err(_) => return,
                    },
                }
            }
            while let Ok(p) = self.slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            while let Ok(hint) = self.hints.try_recv() {
                self.queues.apply(hint);
            }
            while let Ok(done) = done_rx.try_recv() {
                let weight = self.ctx.tenants.get(done.tenant).weight;
                self.fair.complete(done.tenant, done.class, done.estimate, done.charged, done.used, weight);
            }
            if last_prune.elapsed() > self.discover {
                last_prune = tokio::time::Instant::now();
                let live = self.queues.prune();
                self.fair.forget_idle(&live);
            }

            let backlogged = self.queues.backlogged();
            let Some(key) = self.fair.pick(&backlogged) else {
                // Nothing to fetch: wait for a hint, a queue's dry pause to
                // end, or the next discovery.
                let until = self
                    .queues
                    .next_retry()
                    .unwrap_or_else(|| tokio::time::Instant::now() + self.discover)
                    .min(tokio::time::Instant::now() + self.discover);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    hint = self.hints.recv() => match hint {
                        Some(h) => self.queues.apply(h),
                        None => return,
                    },
                    _ = tokio::time::sleep_until(until) => {}
                }
                continue;
            };
            // A fair slice of the free slots: other backlogged tenants of the
            // class get theirs on the next picks.
            let tenants = backlogged.iter().filter(|q| q.class == key.class).count().max(1);
            let want = permits
                .len()
                .div_ceil(tenants)
                .min(self.max_fetch)
                .min(self.queues.pending(&key).max(1) as usize)
                .max(1);
            let messages = match self.queues.fetch(&key, want).await {
                Ok(messages) => messages,
                Err(error) => {
                    metrics::counter!(m::FETCH_ERRORS).increment(1);
                    tracing::warn!(%error, "fetch failed");
                    continue;
                }
            };
            tracing::debug!(
                tenant = %key.tenant, class = key.class.as_str(), want, got = messages.len(),
                backlogged = backlogged.len(), "fetched"
            );
            for message in messages {
                let Some(permit) = permits.pop() else {
                    // Cannot happen (we asked for at most the free slots);
                    // hand the message straight back.
                    let _ = message.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                    continue;
                };
                self.dispatch(&key, message, permit, done_tx.clone());
            }
        }
    }

    fn dispatch(
        &mut self,
        key: &QueueKey,
        message: Message,
        permit: OwnedSemaphorePermit,
        done: mpsc::UnboundedSender<Done>,
    ) {
        let estimate = estimated_tokens(&message, self.ctx.default_max_tokens) as f64;
        let policy = self.ctx.tenants.get(key.tenant);
        let charged = self.fair.expected(key.tenant, estimate);
        self.fair.charge(key.tenant, charged, policy.weight);
        let ctx = self.ctx.clone();
        let (tenant, class) = (key.tenant, key.class);
        let gauge = metrics::gauge!(m::IN_FLIGHT);
        gauge.increment(1.0);
        let tenant_gauge =
            metrics::gauge!(m::TENANT_IN_FLIGHT, "pool" => key.pool.clone(), "tenant" => policy.name.clone());
        tenant_gauge.increment(1.0);
        tokio::spawn(async move {
            let used = job::run(ctx, message).await;
            gauge.decrement(1.0);
            tenant_gauge.decrement(1.0);
            drop(permit);
            if let Some(used) = used {
                let _ = done.send(Done { tenant, class, estimate, charged, used: used as f64 });
            }
        });
    }

    /// Waits for the jobs still running, up to `grace`; then fires the hard
    /// stop, which hands them back to the queue. Returns whether all finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        let all = self.max_in_flight as u32;
        match tokio::time::timeout(grace, self.slots.acquire_many(all)).await {
            Ok(_) => true,
            Err(_) => {
                self.ctx.hard_stop.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(2), self.slots.acquire_many(all)).await;
                false
            }
        }
    }
}

/// The job's token estimate from the ingress, or one from its size.
fn estimated_tokens(message: &Message, default_max_tokens: u64) -> u64 {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(H_EST_TOKENS))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or_else(|| sluice_core::tenant::estimate_tokens(message.payload.len(), None, default_max_tokens))
}
