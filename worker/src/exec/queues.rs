//! The tenant queues a worker knows about, and the consumers it fetches them
//! through.
//!
//! A queue is one subject of the jobs stream, `jobs.<pool>.<class>.<tenant>`,
//! read through its own durable pull consumer (`<worker.consumer>_<pool>_
//! <class>_<tenant>`), shared by every worker and created on first use.
//! JetStream delivers one consumer's messages in stream order, so one
//! consumer over all tenants would make everyone wait behind a flood; one
//! per queue lets the scheduler choose. The server removes a consumer idle
//! for `scheduler.idle_consumer_ms`; the worker forgets the queue then too.
//!
//! How a worker learns that a queue holds jobs:
//! - a wake-up: every submit publishes `sluice.wake.<pool>.<class>.<tenant>`
//!   on core NATS, so an idle tenant's first job is seen at once;
//! - discovery: every `scheduler.discover_ms` the stream's per-subject counts
//!   (one JetStream API call), which also catches jobs that come back after a
//!   delay and wake-ups that were lost;
//! - each fetched message's `pending`: what is left in its queue.
//!
//! A fetch asks only for what is there now (no wait on the server), so it
//! holds nothing; a fetch that comes back empty (the jobs are running, or
//! waiting out a retry delay) marks the queue dry for a growing pause.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::stream::Stream;
use futures::{StreamExt, TryStreamExt};
use sluice_core::wire::subjects;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::exec::fair::QueueKey;
use crate::metrics as m;

/// Most in-flight or delayed jobs one queue's consumer holds at once.
const MAX_ACK_PENDING: i64 = 10_000;
const DRY_FIRST: Duration = Duration::from_millis(20);

/// What the wake-up and discovery tasks tell the executor.
pub enum Hint {
    Wake(QueueKey),
    /// Every queue holding messages, with its count (running jobs included).
    Counts(Vec<(QueueKey, u64)>),
}

struct Queue {
    consumer: Option<PullConsumer>,
    /// Jobs believed fetchable now.
    pending: u64,
    dry_until: Option<Instant>,
    dry_pause: Duration,
    last_used: Instant,
    /// When a fetch last brought a job.
    last_job: Option<Instant>,
}

pub struct Queues {
    stream: Stream,
    prefix: String,
    ack_wait: Duration,
    idle: Duration,
    max_dry: Duration,
    queues: HashMap<QueueKey, Queue>,
}

#[derive(Debug, thiserror::Error)]
#[error("fetch from {queue} failed: {message}")]
pub struct FetchError {
    queue: String,
    message: String,
}

impl Queues {
    pub fn new(stream: Stream, prefix: String, ack_wait: Duration, idle: Duration, discover: Duration) -> Self {
        Self { stream, prefix, ack_wait, idle, max_dry: discover, queues: HashMap::new() }
    }

    pub fn apply(&mut self, hint: Hint) {
        let now = Instant::now();
        match hint {
            Hint::Wake(key) => {
                let q = self.entry(key, now);
                q.pending = q.pending.saturating_add(1);
                q.dry_until = None;
                q.dry_pause = DRY_FIRST;
            }
            Hint::Counts(counts) => {
                let listed: HashSet<&QueueKey> = counts.iter().map(|(k, _)| k).collect();
                for q in self.queues.iter_mut().filter(|(k, _)| !listed.contains(k)).map(|(_, q)| q) {
                    q.pending = 0;
                }
                for (key, count) in counts {
                    let q = self.entry(key, now);
                    q.pending = q.pending.max(count);
                }
            }
        }
    }

    fn entry(&mut self, key: QueueKey, now: Instant) -> &mut Queue {
        self.queues.entry(key).or_insert_with(|| Queue {
            consumer: None,
            pending: 0,
            dry_until: None,
            dry_pause: DRY_FIRST,
            last_used: now,
            last_job: None,
        })
    }

    /// Queues worth a fetch now.
    pub fn backlogged(&self) -> Vec<QueueKey> {
        let now = Instant::now();
        self.queues
            .iter()
            .filter(|(_, q)| q.pending > 0 && q.dry_until.is_none_or(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// When the earliest dry queue may be tried again, if any holds jobs.
    pub fn next_retry(&self) -> Option<Instant> {
        self.queues.values().filter(|q| q.pending > 0).filter_map(|q| q.dry_until).min()
    }

    /// Notes that a job of the queue arrived (through a standing pull).
    pub fn saw_job(&mut self, key: &QueueKey) {
        let now = Instant::now();
        let q = self.entry(key.clone(), now);
        q.last_job = Some(now);
        q.last_used = now;
    }

    /// Queues that had a job within `within`, most recent first.
    pub fn hot(&self, within: Duration) -> Vec<QueueKey> {
        let now = Instant::now();
        let mut hot: Vec<(&QueueKey, Instant)> = self
            .queues
            .iter()
            .filter(|(_, q)| q.last_job.is_some_and(|t| now.duration_since(t) < within))
            .filter_map(|(k, q)| Some((k, q.last_job?)))
            .collect();
        hot.sort_by_key(|e| std::cmp::Reverse(e.1));
        hot.into_iter().map(|(k, _)| k.clone()).collect()
    }

    /// Leaves a queue alone for `pause` (its tenant is at its running-jobs limit).
    pub fn pause(&mut self, key: &QueueKey, pause: Duration) {
        let q = self.entry(key.clone(), Instant::now());
        q.dry_until = Some(Instant::now() + pause);
    }

    /// Ends the pauses of a tenant's queues (one of its jobs just ended).
    pub fn resume(&mut self, tenant: Uuid) {
        for (_, q) in self.queues.iter_mut().filter(|(k, _)| k.tenant == tenant) {
            q.dry_until = None;
        }
    }

    pub fn pending(&self, key: &QueueKey) -> u64 {
        self.queues.get(key).map_or(0, |q| q.pending)
    }

    /// Forgets queues with nothing pending that were not used for the idle
    /// time (the server removes their consumers after the same time).
    pub fn prune(&mut self) -> HashSet<QueueKey> {
        let now = Instant::now();
        let idle = self.idle;
        self.queues.retain(|_, q| q.pending > 0 || now.duration_since(q.last_used) < idle);
        self.queues.keys().cloned().collect()
    }

    /// Fetches up to `max` jobs that are in the queue now.
    pub async fn fetch(&mut self, key: &QueueKey, max: usize) -> Result<Vec<Message>, FetchError> {
        let consumer = self.consumer(key).await?;
        let result = fetch_now(&consumer, max).await;
        let now = Instant::now();
        let max_dry = self.max_dry;
        let q = self.entry(key.clone(), now);
        q.last_used = now;
        let messages = match result {
            Ok(messages) => messages,
            Err(message) => {
                // A consumer the server removed (idle) is made again next time.
                q.consumer = None;
                q.dry_until = Some(now + q.dry_pause);
                return Err(FetchError { queue: consumer_name_of(key), message });
            }
        };
        match messages.last().and_then(|m| m.info().ok()) {
            Some(info) => {
                q.last_job = Some(now);
                q.pending = info.pending;
                q.dry_pause = DRY_FIRST;
                q.dry_until = None;
            }
            None => {
                q.dry_until = Some(now + q.dry_pause);
                q.dry_pause = (q.dry_pause * 2).min(max_dry);
            }
        }
        Ok(messages)
    }

    /// The queue's consumer, created on first use.
    pub async fn consumer(&mut self, key: &QueueKey) -> Result<PullConsumer, FetchError> {
        if let Some(c) = self.queues.get(key).and_then(|q| q.consumer.clone()) {
            return Ok(c);
        }
        let name = consumer_name(&self.prefix, key);
        let config = pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: subjects::job(&key.pool, key.class, key.tenant),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Attempts are counted by the worker, which fails a job past
            // `max_attempts` itself: a work-queue stream would otherwise
            // keep an exhausted message forever.
            max_deliver: -1,
            max_ack_pending: MAX_ACK_PENDING,
            inactive_threshold: self.idle,
            ..Default::default()
        };
        let consumer: PullConsumer = self
            .stream
            .create_consumer(config)
            .await
            .map_err(|e| FetchError { queue: name.clone(), message: e.to_string() })?;
        metrics::counter!(m::CONSUMERS_CREATED).increment(1);
        let now = Instant::now();
        self.entry(key.clone(), now).consumer = Some(consumer.clone());
        Ok(consumer)
    }
}

/// The durable consumer name of a queue.
pub fn consumer_name(prefix: &str, key: &QueueKey) -> String {
    format!("{prefix}_{}", consumer_name_of(key))
}

fn consumer_name_of(key: &QueueKey) -> String {
    format!("{}_{}_{}", key.pool, key.class.as_str(), key.tenant.simple())
}

async fn fetch_now(consumer: &PullConsumer, max: usize) -> Result<Vec<Message>, String> {
    // No `expires`: with one, the server would hold an empty pull open
    // until it ran out instead of answering "no messages" at once.
    let mut batch = consumer.fetch().max_messages(max).messages().await.map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(max);
    // A no-wait pull ends at once; the timeout guards a server gone quiet.
    let give_up = Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::time::timeout_at(give_up, batch.next()).await {
            Ok(Some(Ok(message))) => out.push(message),
            Ok(Some(Err(error))) => {
                if out.is_empty() && !error.to_string().contains("no messages") {
                    return Err(error.to_string());
                }
                break;
            }
            Ok(None) | Err(_) => break,
        }
    }
    Ok(out)
}

/// Forwards wake-ups until `shutdown`. A full channel drops them: they are
/// hints, and discovery catches up.
pub async fn wake_ups(nats: async_nats::Client, tx: mpsc::Sender<Hint>, shutdown: CancellationToken) {
    let mut sub = match nats.subscribe(subjects::WAKES).await {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot subscribe to wake-ups; relying on discovery");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        if let Some(q) = subjects::parse_wake(message.subject.as_str()) {
            let _ = tx.try_send(Hint::Wake(QueueKey { pool: q.pool.to_owned(), class: q.class, tenant: q.tenant }));
        }
    }
}

/// Lists the queues holding jobs every `every` until `shutdown`; each listing
/// also goes to `observe` (metrics, counter repair).
pub async fn discover(
    stream: Stream,
    every: Duration,
    tx: mpsc::Sender<Hint>,
    mut observe: impl FnMut(&[(QueueKey, u64)]),
    shutdown: CancellationToken,
) {
    let mut ticker = sluice_core::reload::Ticker::new(every);
    while ticker.tick(&shutdown).await {
        match list(&stream).await {
            Ok(counts) => {
                observe(&counts);
                if tx.send(Hint::Counts(counts)).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                metrics::counter!(m::FETCH_ERRORS).increment(1);
                tracing::warn!(%error, "cannot list the job queues");
            }
        }
    }
}

async fn list(stream: &Stream) -> Result<Vec<(QueueKey, u64)>, async_nats::Error> {
    let mut info = stream.info_with_subjects(subjects::JOBS).await?;
    let mut out = Vec::new();
    while let Some((subject, count)) = info.try_next().await? {
        if let Some(q) = subjects::parse_job(&subject) {
            out.push((QueueKey { pool: q.pool.to_owned(), class: q.class, tenant: q.tenant }, count as u64));
        }
    }
    Ok(out)
}

/// Each tenant's messages in the stream, summed over its queues.
pub fn per_tenant(counts: &[(QueueKey, u64)]) -> HashMap<Uuid, i64> {
    let mut out = HashMap::new();
    for (key, count) in counts {
        *out.entry(key.tenant).or_insert(0) += *count as i64;
    }
    out
}
