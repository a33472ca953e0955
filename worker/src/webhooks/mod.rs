//! Webhook delivery, in two loops that never touch job execution:
//!
//! - **enqueue**: follows the job-state stream; when an asynchronous job
//!   reaches a final status and has a webhook (its own, or its tenant's
//!   default endpoint), it records one delivery in Postgres — its id is the
//!   `webhook-id` of every attempt — and only then acks the state message.
//! - **deliver**: claims due deliveries (`FOR UPDATE SKIP LOCKED`, with a
//!   lease, so several workers share the work), posts them signed per
//!   Standard Webhooks with bounded concurrency, records every attempt, and
//!   schedules the next from `webhooks.retry_schedule_ms` (±10 % jitter, at
//!   least the receiver's `Retry-After`). A 2xx delivers; a 410 stops the
//!   delivery and disables a tenant endpoint; the target is checked against
//!   private addresses again, after DNS resolution, before every attempt,
//!   and the connection resolves the name through the same guard
//!   ([`resolve`]), so DNS rebinding reaches nothing.
//!
//! Signing secrets are sealed at rest ([`sluice_core::seal`]) and opened
//! only to sign an attempt; a delivery to a tenant's endpoint carries no
//! secret of its own and signs with the endpoint's secrets as they are when
//! it is sent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use sluice_core::config::WebhooksConfig;
use sluice_core::db::DbError;
use sluice_core::db::webhooks::{self as hooks, AttemptRecord, Due, NewDelivery};
use sluice_core::event::JobStatus;
use sluice_core::jobstate::JobRecord;
use sluice_core::seal::{self, Keyring};
use sluice_core::tasks::Tasks;
use sluice_core::webhook;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics as m;

mod resolve;

/// Wakes the delivery loop when a delivery was recorded, so a webhook does
/// not wait for the next poll.
pub type Wake = Arc<tokio::sync::Notify>;

/// Most job states turned into deliveries in one statement.
const ENQUEUE_BATCH: usize = 128;
/// Longest the first state of a batch waits for company.
const ENQUEUE_LINGER: Duration = Duration::from_millis(20);

pub async fn enqueue(consumer: PullConsumer, db: PgPool, keys: Arc<Keyring>, wake: Wake, shutdown: CancellationToken) {
    crate::batches::run(consumer, ENQUEUE_BATCH, ENQUEUE_LINGER, "webhook enqueue", shutdown, |batch| {
        enqueue_batch(&db, &keys, &wake, batch)
    })
    .await;
}

async fn enqueue_batch(db: &PgPool, keys: &Keyring, wake: &Wake, batch: Vec<async_nats::jetstream::Message>) {
    let mut finished = Vec::new();
    for message in &batch {
        match crate::ledger::parse_state(message) {
            Ok(Some((tenant, record))) => {
                if let Some(kind) = event_type(record.status) {
                    finished.push((tenant, kind, record));
                }
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "undecodable job state skipped by webhook enqueue"),
        }
    }
    match record_deliveries(db, keys, finished).await {
        Ok(recorded) => {
            for message in batch {
                let _ = message.ack().await;
            }
            if recorded > 0 {
                wake.notify_one();
            }
        }
        Err(error) => {
            metrics::counter!(m::WEBHOOK_FAILURES, "reason" => "enqueue").increment(1);
            tracing::warn!(%error, "cannot record webhook deliveries; retrying in 2 s");
            for message in batch {
                let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(2)))).await;
            }
        }
    }
}

fn event_type(status: JobStatus) -> Option<&'static str> {
    match status {
        JobStatus::Completed => Some("job.completed"),
        JobStatus::Failed => Some("job.failed"),
        JobStatus::Cancelled => Some("job.cancelled"),
        JobStatus::Expired => Some("job.expired"),
        JobStatus::Queued | JobStatus::InProgress => None,
    }
}

/// Records one delivery per finished job that has a target, in one
/// statement; returns how many jobs had one.
async fn record_deliveries(
    db: &PgPool,
    keys: &Keyring,
    finished: Vec<(Uuid, &'static str, JobRecord)>,
) -> Result<usize, DbError> {
    // Tenants' default endpoints, for jobs without a webhook of their own.
    let tenants: Vec<Uuid> = finished.iter().filter(|(_, _, r)| r.webhook.is_none()).map(|(t, _, _)| *t).collect();
    let defaults = hooks::with_endpoints(db, &tenants).await?;
    let timestamp = sluice_core::now_ms() / 1000;
    let mut seen = std::collections::HashSet::new();
    let mut deliveries = Vec::new();
    for (tenant, kind, record) in finished {
        let (url, secret, tenant_endpoint) = match &record.webhook {
            Some(hook) => (hook.url.clone(), Some(sealed_for_job(keys, record.id, &hook.secret)), false),
            None => match defaults.get(&tenant) {
                Some(url) => (url.clone(), None, true),
                None => continue,
            },
        };
        let id = format!("msg_{}_{}", record.id.simple(), record.status.as_str());
        if !seen.insert(id.clone()) {
            continue;
        }
        let payload = serde_json::json!({"type": kind, "timestamp": timestamp, "data": record.public()});
        deliveries.push(NewDelivery {
            id,
            job_id: record.id,
            tenant_id: tenant,
            event_type: kind,
            url,
            secret,
            tenant_endpoint,
            payload: payload.to_string(),
        });
    }
    let count = deliveries.len();
    hooks::insert_deliveries(db, deliveries).await?;
    Ok(count)
}

/// A job's own secret as its delivery keeps it: sealed with the current key
/// (the ingress sealed it; one stored in clear by an older ingress, or under
/// a key being rotated out, is sealed again here). One that does not open
/// is kept as it is: its attempts fail, and say why.
fn sealed_for_job(keys: &Keyring, job: Uuid, stored: &str) -> String {
    if keys.is_current(stored) {
        return stored.to_owned();
    }
    let place = seal::job_place(job);
    keys.open(&place, stored).and_then(|clear| keys.seal(&place, &clear)).unwrap_or_else(|error| {
        tracing::warn!(%job, %error, "a job's webhook secret does not open");
        stored.to_owned()
    })
}

/// The secrets that sign an attempt, opened, space-separated (a tenant's
/// endpoint during a rotation has two).
fn signing_secrets(keys: &Keyring, d: &Due) -> Result<String, String> {
    let place = if d.tenant_endpoint { seal::endpoint_place(d.tenant_id) } else { seal::job_place(d.job_id) };
    let Some(secret) = &d.secret else {
        return Err("the tenant's webhook endpoint was removed".to_owned());
    };
    let mut secrets = keys.open(&place, secret).map_err(|e| format!("cannot open the signing secret: {e}"))?;
    if let Some(previous) = &d.previous_secret {
        match keys.open(&place, previous) {
            Ok(p) => {
                secrets.push(' ');
                secrets.push_str(&p);
            }
            Err(error) => {
                tracing::warn!(tenant = %d.tenant_id, %error, "the previous endpoint secret does not open; signed with the current one only")
            }
        }
    }
    Ok(secrets)
}

/// Claims and attempts due deliveries until shutdown begins; attempts under
/// way then finish (they are tracked in `tasks`).
pub async fn deliver(db: PgPool, config: WebhooksConfig, keys: Arc<Keyring>, wake: Wake, tasks: Tasks) {
    let shutdown = tasks.stopping();
    let lookup: Arc<dyn webhook::Lookup> = Arc::new(webhook::SystemLookup);
    let client = match resolve::client(Duration::from_millis(config.timeout_ms), config.policy(), lookup) {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "cannot build the webhook HTTP client; webhooks are not delivered");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(config.max_concurrency));
    let shares = Shares::default();
    let config = Arc::new(config);
    let mut tick = tokio::time::interval(Duration::from_millis(config.poll_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // While the last claim came back full there is a backlog: claim again as
    // soon as a slot frees up instead of waiting for the next poll.
    let mut backlog = false;
    loop {
        if !backlog {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = wake.notified() => {}
            }
        }
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        // A claimed delivery is reserved for three attempt timeouts: if its
        // worker dies mid-attempt, another takes it after that.
        let lease_ms = (config.timeout_ms * 3) as i64;
        let share = config.max_concurrency_per_tenant;
        let full = shares.full(share);
        let claimed = hooks::claim_deliveries(&db, permits.len() as i64, lease_ms, share as i64, &full).await;
        let due = match claimed {
            Ok(d) => d,
            Err(error) => {
                tracing::warn!(%error, "cannot claim webhook deliveries");
                backlog = false;
                continue;
            }
        };
        backlog = due.len() == permits.len();
        let mut over = Vec::new();
        for delivery in due {
            let Some(taken) = shares.take(delivery.tenant_id, share) else {
                over.push(delivery.id);
                continue;
            };
            let Some(permit) = permits.pop() else { break };
            let (db, client, config, keys) = (db.clone(), client.clone(), config.clone(), keys.clone());
            tasks.spawn(async move {
                attempt(&db, &client, &config, &keys, delivery).await;
                drop((permit, taken));
            });
        }
        if !over.is_empty()
            && let Err(error) = hooks::release_deliveries(&db, &over).await
        {
            tracing::debug!(%error, "claimed deliveries past their tenant's share wait for their lease");
        }
    }
}

/// Deliveries in flight per tenant, so that one tenant's slow receivers
/// hold at most `webhooks.max_concurrency_per_tenant` of the slots.
#[derive(Clone, Default)]
struct Shares(Arc<std::sync::Mutex<std::collections::HashMap<Uuid, usize>>>);

/// One delivery's place in its tenant's share; given back when dropped.
struct Taken(Shares, Uuid);

impl Shares {
    /// Tenants with all their share in flight.
    fn full(&self, share: usize) -> Vec<Uuid> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().filter(|(_, n)| **n >= share).map(|(t, _)| *t).collect()
    }

    fn take(&self, tenant: Uuid, share: usize) -> Option<Taken> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(tenant).or_default();
        if *n >= share {
            return None;
        }
        *n += 1;
        Some(Taken(self.clone(), tenant))
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let mut map = (self.0).0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

enum Attempt {
    Delivered(u16),
    Gone(u16),
    Retry { status: Option<u16>, error: Option<String>, retry_after: Option<Duration> },
    Refused(String),
}

async fn attempt(db: &PgPool, client: &reqwest::Client, config: &WebhooksConfig, keys: &Keyring, d: Due) {
    let started = Instant::now();
    let attempt_no = d.attempts + 1;
    let result = send(client, config, keys, &d).await;
    let latency_ms = started.elapsed().as_millis() as i32;
    let (status_code, error) = match &result {
        Attempt::Delivered(s) | Attempt::Gone(s) => (Some(i32::from(*s)), None),
        Attempt::Retry { status, error, .. } => (status.map(i32::from), error.clone()),
        Attempt::Refused(e) => (None, Some(e.clone())),
    };
    // Next attempt, if any: the schedule's delay for this retry, ±10 %.
    let next = match &result {
        Attempt::Retry { retry_after, .. } => config.retry_schedule_ms.get(d.attempts as usize).map(|ms| {
            let jitter = 0.9 + 0.2 * fastrand_unit();
            Duration::from_millis((*ms as f64 * jitter) as u64).max(retry_after.unwrap_or_default())
        }),
        _ => None,
    };
    let status = match (&result, next) {
        (Attempt::Delivered(_), _) => "delivered",
        (Attempt::Gone(_), _) => "gone",
        (Attempt::Retry { .. }, Some(_)) => "pending",
        _ => "failed",
    };
    metrics::counter!(m::WEBHOOK_ATTEMPTS, "outcome" => status).increment(1);
    if let Some(e) = &error {
        tracing::info!(delivery = %d.id, attempt = attempt_no, error = %e, "webhook attempt failed");
    }
    let record = AttemptRecord {
        delivery: &d,
        attempt: attempt_no,
        response_status: status_code,
        error: error.as_deref(),
        latency_ms,
        status,
        next_in_ms: next.map(|n| n.as_millis() as i64),
        disable_endpoint: matches!(result, Attempt::Gone(_)),
    };
    match hooks::record_attempt(db, &record).await {
        Ok(()) if record.disable_endpoint && d.tenant_endpoint => {
            tracing::warn!(tenant = %d.tenant_id, "webhook endpoint answered 410 Gone; disabled");
        }
        Ok(()) => {}
        Err(error) => {
            metrics::counter!(m::WEBHOOK_FAILURES, "reason" => "record").increment(1);
            tracing::warn!(%error, delivery = %d.id, "cannot record a webhook attempt; it will be retried after its lease");
        }
    }
}

async fn send(client: &reqwest::Client, config: &WebhooksConfig, keys: &Keyring, d: &Due) -> Attempt {
    if let Err(e) = webhook::check_target(&d.url, config.policy()).await {
        return Attempt::Refused(e.to_string());
    }
    // A secret that does not open is retried on the schedule, not failed:
    // during a keyring rotation another worker (or this one, once rolled
    // out) may hold the key.
    let secrets = match signing_secrets(keys, d) {
        Ok(s) => s,
        Err(e) => {
            metrics::counter!(m::WEBHOOK_FAILURES, "reason" => "secret").increment(1);
            return Attempt::Retry { status: None, error: Some(e), retry_after: None };
        }
    };
    let timestamp = sluice_core::now_ms() / 1000;
    let signature = match webhook::sign_all(&secrets, &d.id, timestamp, d.payload.as_bytes()) {
        Ok(s) => s,
        Err(e) => return Attempt::Refused(e.to_string()),
    };
    let response = client
        .post(&d.url)
        .header("content-type", "application/json")
        .header("webhook-id", &d.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(d.payload.clone())
        .send()
        .await;
    match response {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                // (believed up to a day: a receiver cannot push its events further)
                .map(|s| Duration::from_secs(s.min(86_400)));
            match status {
                200..=299 => Attempt::Delivered(status),
                410 => Attempt::Gone(status),
                _ => Attempt::Retry { status: Some(status), error: None, retry_after },
            }
        }
        Err(e) => Attempt::Retry { status: None, error: Some(e.to_string()), retry_after: None },
    }
}

/// A number in [0, 1) for jitter, from the OS's random source.
fn fastrand_unit() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}
