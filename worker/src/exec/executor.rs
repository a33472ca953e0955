//! The fetch loop: whenever this worker has free slots, ask the fair
//! scheduler which tenant queue goes next, fetch a small batch of what that
//! queue holds now, and run each job in its own task. Nothing is fetched
//! ahead of a free slot (a held message's `ack_wait` would run out while it
//! waits, and another worker could have run it).
//!
//! When nothing is waiting and slots are free, the worker also keeps a pull
//! request open on the queues that had jobs in the last second (standing
//! pulls), with part of its free slots: the server hands such a queue's next
//! job over the moment it is stored, without the wake-up and fetch round
//! trips. Fairness is not at stake then, since there is idle capacity; a
//! standing pull takes at most half the free slots, ends after a second, and
//! is never abandoned (a message sent to an abandoned pull would wait out
//! `ack_wait`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use sluice_core::wire::envelope::H_EST_TOKENS;
use sluice_core::wire::subjects::in_flight as in_flight_subject;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::exec::fair::{Fair, QueueKey};
use crate::exec::job::{self, JobContext};
use crate::exec::queues::{Hint, Queues};
use crate::metrics as m;

/// How long a tenant at its running-jobs limit is left alone, unless one of
/// its jobs on this worker ends first.
const AT_LIMIT_PAUSE: Duration = Duration::from_millis(20);
/// A queue that had a job this recently gets a standing pull when idle.
const HOT: Duration = Duration::from_secs(1);
/// How long a standing pull waits on the server.
const STANDING_EXPIRES: Duration = Duration::from_secs(1);
/// Most queues with a standing pull at once.
const MAX_STANDING: usize = 4;

/// What a standing pull reports to the fetch loop.
enum Standing {
    Arrived { key: QueueKey, message: Box<Message>, permit: OwnedSemaphorePermit },
    Ended(QueueKey),
}

pub struct Executor {
    pub queues: Queues,
    /// Running-jobs counts of tenants with a `max_in_flight` limit.
    pub counters: sluice_core::counters::Counters,
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
    class: sluice_core::wire::envelope::Class,
    estimate: f64,
    charged: f64,
    used: f64,
    /// The tenant has a running-jobs limit.
    limited: bool,
}

impl Executor {
    /// Runs until `shutdown` fires; in-flight jobs keep running afterwards
    /// (see [`Executor::drain`]).
    pub async fn run(&mut self, shutdown: CancellationToken) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let (standing_tx, mut standing_rx) = mpsc::unbounded_channel::<Standing>();
        let mut standing: std::collections::HashSet<QueueKey> = std::collections::HashSet::new();
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
                    Some(s) = standing_rx.recv() => {
                        self.on_standing(s, &mut standing, &done_tx);
                        continue;
                    }
                }
            }
            while let Ok(s) = standing_rx.try_recv() {
                self.on_standing(s, &mut standing, &done_tx);
            }
            while let Ok(p) = self.slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            while let Ok(hint) = self.hints.try_recv() {
                self.queues.apply(hint);
            }
            while let Ok(done) = done_rx.try_recv() {
                if done.limited {
                    self.queues.resume(done.tenant);
                }
                let weight = self.ctx.tenants.get(done.tenant).weight;
                self.fair.complete(done.tenant, done.class, done.estimate, done.charged, done.used, weight);
            }
            if last_prune.elapsed() > self.discover {
                last_prune = tokio::time::Instant::now();
                let live = self.queues.prune();
                self.fair.forget_idle(&live);
            }

            // A queue with a standing pull gets its jobs through it (the pull
            // ends as soon as its slots are used); fetching it as well would
            // mostly come back empty.
            let mut backlogged = self.queues.backlogged();
            backlogged.retain(|k| !standing.contains(k));
            // A pool whose deployments are all out of budget or unhealthy is
            // not fetched: its jobs stay queued until one is ready.
            let paused_until = self.skip_paused_pools(&mut backlogged);
            let Some(key) = self.fair.pick(&backlogged) else {
                self.stand(&mut permits, &mut standing, &standing_tx, &shutdown).await;
                // Nothing to fetch: wait for a hint, a queue's dry pause to
                // end, or the next discovery.
                let until = self
                    .queues
                    .next_retry()
                    .unwrap_or_else(|| tokio::time::Instant::now() + self.discover)
                    .min(tokio::time::Instant::now() + self.discover)
                    .min(paused_until.unwrap_or(tokio::time::Instant::now() + self.discover));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    hint = self.hints.recv() => match hint {
                        Some(h) => self.queues.apply(h),
                        None => return,
                    },
                    Some(s) = standing_rx.recv() => self.on_standing(s, &mut standing, &done_tx),
                    _ = tokio::time::sleep_until(until) => {}
                }
                continue;
            };
            // A fair slice of the free slots: other backlogged tenants of the
            // class get theirs on the next picks.
            let tenants = backlogged.iter().filter(|q| q.class == key.class).count().max(1);
            let mut want = permits
                .len()
                .div_ceil(tenants)
                .min(self.max_fetch)
                .min(self.queues.pending(&key).max(1) as usize)
                .max(1);
            let limit = self.ctx.tenants.get(key.tenant).max_in_flight;
            if let Some(cap) = limit {
                match self.reserve(key.tenant, cap, want).await {
                    0 => {
                        self.queues.pause(&key, AT_LIMIT_PAUSE);
                        continue;
                    }
                    allowed => want = allowed,
                }
            }
            // One call reserved per job before fetching it: a pool out of
            // budget is left in the queue, not fetched and held.
            let mut leases = Vec::new();
            if let Some(pool) = self.ctx.pools.get(&key.pool) {
                leases = pool.reserve(want, &[], self.ctx.pools.shared()).await;
                if limit.is_some() && leases.len() < want {
                    self.ctx.counts.add(in_flight_subject(key.tenant), -((want - leases.len()) as i64));
                }
                if leases.is_empty() {
                    metrics::counter!(m::POOL_PAUSED, "pool" => key.pool.clone()).increment(1);
                    continue;
                }
                want = leases.len();
            }
            let fetched = self.queues.fetch(&key, want).await;
            if limit.is_some() {
                let unused = want - fetched.as_ref().map_or(0, Vec::len);
                self.ctx.counts.add(in_flight_subject(key.tenant), -(unused as i64));
            }
            let got = fetched.as_ref().map_or(0, Vec::len);
            for lease in leases.drain(got.min(leases.len())..) {
                lease.release(self.ctx.pools.shared());
            }
            let messages = match fetched {
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
                self.dispatch(&key, message, permit, limit.is_some(), done_tx.clone(), leases.pop());
            }
        }
    }

    /// Drops the queues of pools that cannot take a call now; returns when
    /// the first of them can.
    fn skip_paused_pools(&self, backlogged: &mut Vec<QueueKey>) -> Option<tokio::time::Instant> {
        let mut ready: std::collections::HashMap<String, Option<tokio::time::Instant>> = Default::default();
        let mut earliest: Option<tokio::time::Instant> = None;
        backlogged.retain(|k| {
            let at =
                *ready.entry(k.pool.clone()).or_insert_with(|| self.ctx.pools.get(&k.pool).and_then(|p| p.ready_at()));
            if let Some(t) = at {
                earliest = Some(earliest.map_or(t, |e| e.min(t)));
            }
            at.is_none()
        });
        earliest
    }

    /// Opens standing pulls on hot queues that have none, with at most half
    /// of the free slots.
    async fn stand(
        &mut self,
        permits: &mut Vec<OwnedSemaphorePermit>,
        standing: &mut std::collections::HashSet<QueueKey>,
        tx: &mpsc::UnboundedSender<Standing>,
        stop: &CancellationToken,
    ) {
        let hot: Vec<QueueKey> = self
            .queues
            .hot(HOT)
            .into_iter()
            .filter(|k| !standing.contains(k) && self.ctx.tenants.get(k.tenant).max_in_flight.is_none())
            // Jobs of a budgeted pool are fetched only with a reserved call.
            .filter(|k| self.ctx.pools.get(&k.pool).is_some_and(|p| !p.budgeted() && p.ready_at().is_none()))
            .take(MAX_STANDING.saturating_sub(standing.len()))
            .collect();
        if hot.is_empty() {
            return;
        }
        let each = (permits.len() / 2) / hot.len();
        if each == 0 {
            return;
        }
        for key in hot {
            let Ok(consumer) = self.queues.consumer(&key).await else { continue };
            let held: Vec<OwnedSemaphorePermit> = permits.drain(..each).collect();
            standing.insert(key.clone());
            self.ctx.tasks.spawn(standing_pull(consumer, key, held, tx.clone(), stop.clone()));
        }
    }

    fn on_standing(
        &mut self,
        s: Standing,
        standing: &mut std::collections::HashSet<QueueKey>,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        match s {
            Standing::Arrived { key, message, permit } => {
                self.queues.saw_job(&key);
                self.dispatch(&key, *message, permit, false, done.clone(), None);
            }
            Standing::Ended(key) => {
                standing.remove(&key);
            }
        }
    }

    /// Counts `want` jobs of a tenant with a running-jobs limit `cap` as
    /// running, over all workers; returns how many fit (the rest are taken
    /// back). 0 when the count cannot be reached: the limit is not risked.
    async fn reserve(&self, tenant: Uuid, cap: u64, want: usize) -> usize {
        let subject = in_flight_subject(tenant);
        match self.counters.add(&subject, want as i64).await {
            Ok(total) => {
                let over = (total - cap as i64).clamp(0, want as i64) as usize;
                self.ctx.counts.add(subject, -(over as i64));
                want - over
            }
            Err(error) => {
                metrics::counter!(m::COUNTER_FAILURES).increment(1);
                tracing::warn!(%error, %tenant, "cannot count running jobs; the tenant waits");
                0
            }
        }
    }

    fn dispatch(
        &mut self,
        key: &QueueKey,
        message: Message,
        permit: OwnedSemaphorePermit,
        limited: bool,
        done: mpsc::UnboundedSender<Done>,
        lease: Option<crate::upstream::pools::Lease>,
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
        self.ctx.tasks.spawn(async move {
            let used = job::run(ctx.clone(), message, lease).await;
            gauge.decrement(1.0);
            tenant_gauge.decrement(1.0);
            if limited {
                ctx.counts.add(in_flight_subject(tenant), -1);
            }
            drop(permit);
            // Without a real usage the estimate stays charged.
            let used = used.map_or(charged, |u| u as f64);
            let _ = done.send(Done { tenant, class, estimate, charged, used, limited });
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

/// Holds a pull request open on one queue for up to [`STANDING_EXPIRES`],
/// passing each job that arrives to the fetch loop with one of `permits`.
async fn standing_pull(
    consumer: async_nats::jetstream::consumer::PullConsumer,
    key: QueueKey,
    mut permits: Vec<OwnedSemaphorePermit>,
    tx: mpsc::UnboundedSender<Standing>,
    stop: CancellationToken,
) {
    use futures::StreamExt;
    let batch = consumer.batch().max_messages(permits.len()).expires(STANDING_EXPIRES).messages().await;
    if let Ok(mut batch) = batch {
        // Past `expires` the server ends the pull; a little later the client
        // stops waiting too, in case that server went away.
        let give_up = tokio::time::Instant::now() + STANDING_EXPIRES + Duration::from_secs(2);
        while !permits.is_empty() {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    hand_back(batch).await;
                    break;
                }
                next = tokio::time::timeout_at(give_up, batch.next()) => next,
            };
            match next {
                Ok(Some(Ok(message))) => {
                    let Some(permit) = permits.pop() else { break };
                    let _ = tx.send(Standing::Arrived { key: key.clone(), message: Box::new(message), permit });
                }
                Ok(Some(Err(_))) | Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = tx.send(Standing::Ended(key));
}

/// Ends a standing pull of a stopping worker, whose fetch loop is gone:
/// the pull is withdrawn first, so the server sends it nothing more, and
/// the jobs already on their way are handed straight back. Left open, the
/// pull would take job after job until it expired, each handed back and
/// redelivered at once, often to the same pull: every round counts as a
/// delivery, and a job bounced past `worker.max_attempts` deliveries fails
/// without a single call (seen as a 502 in a rolling restart).
async fn hand_back(mut batch: async_nats::jetstream::consumer::pull::Batch) {
    use futures::{FutureExt, StreamExt};
    let mut arrived = Vec::new();
    while let Some(Some(Ok(message))) = batch.next().now_or_never() {
        arrived.push(message);
    }
    // Dropping the subscription unsubscribes; the client sends that before
    // the naks below, so their redeliveries go to other pulls.
    drop(batch);
    for message in arrived {
        let _ = message.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
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
