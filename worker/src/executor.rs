//! The fetch loop: pull as many jobs as this worker has free slots, run
//! each in its own task, and never hold a message it is not working on
//! (a held message's `ack_wait` would run out while it waits).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::job::{self, JobContext};
use crate::metrics as m;

pub struct Executor {
    pub consumer: PullConsumer,
    pub ctx: Arc<JobContext>,
    pub slots: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub fetch_expires: Duration,
}

impl Executor {
    /// Runs until `shutdown` fires; in-flight jobs keep running afterwards
    /// (see [`Executor::drain`]).
    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let mut permits = vec![first];
            while let Ok(p) = self.slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            let wanted = permits.len();
            let batch = self.consumer.batch().max_messages(wanted).expires(self.fetch_expires).messages();
            let mut batch = match batch.await {
                Ok(b) => b,
                Err(error) => {
                    metrics::counter!(m::FETCH_ERRORS).increment(1);
                    tracing::warn!(%error, "pull request failed; retrying in 1 s");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            // Guard against a pull whose server went away: the server ends it
            // at `expires`, so a little past that the client ends it too.
            let give_up = tokio::time::Instant::now() + self.fetch_expires + Duration::from_secs(2);
            while let Some(permit) = permits.pop() {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = tokio::time::timeout_at(give_up, batch.next()) => next,
                };
                match next {
                    Ok(Some(Ok(message))) => {
                        let ctx = self.ctx.clone();
                        let gauge = metrics::gauge!(m::IN_FLIGHT);
                        gauge.increment(1.0);
                        tokio::spawn(async move {
                            job::run(ctx, message).await;
                            gauge.decrement(1.0);
                            drop(permit);
                        });
                    }
                    Ok(Some(Err(error))) => {
                        metrics::counter!(m::FETCH_ERRORS).increment(1);
                        tracing::debug!(%error, "pull request ended with an error");
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
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
