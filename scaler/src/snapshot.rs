//! The backlog of every tenant queue, read from JetStream every
//! `scaler.refresh_ms` and kept in a watch channel, so that KEDA's frequent
//! calls read memory. A failed read keeps the last snapshot, which turns
//! stale after `scaler.stale_ms`: then every RPC fails (KEDA's fallback
//! applies) rather than report a backlog nobody measured.
//!
//! The per-subject message counts of the jobs stream are exactly the jobs
//! queued or running: the stream keeps a job until a worker acks it.

use sluice_core::wire::subjects;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const REFRESH_FAILURES: &str = "sluice_scaler_refresh_failures_total";
pub const BACKLOG: &str = "sluice_scaler_backlog";
pub const SNAPSHOT_AGE: &str = "sluice_scaler_snapshot_age_seconds";

/// Jobs queued or running, by pool subject token and tenant.
#[derive(Debug, Default)]
pub struct Backlog {
    pub taken: Option<Instant>,
    pub counts: HashMap<String, HashMap<Uuid, u64>>,
}

impl Backlog {
    /// Jobs of a pool (by subject token), of one tenant if given.
    pub fn of(&self, pool_token: &str, tenant: Option<Uuid>) -> u64 {
        let Some(tenants) = self.counts.get(pool_token) else { return 0 };
        match tenant {
            Some(t) => tenants.get(&t).copied().unwrap_or(0),
            None => tenants.values().sum(),
        }
    }
}

/// A backlog that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot list the jobs stream's subjects: {0}")]
    List(#[source] async_nats::Error),
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
}

/// Reads the counts once, within `timeout`.
pub async fn read(stream: &async_nats::jetstream::stream::Stream, timeout: Duration) -> Result<Backlog, ReadError> {
    let list = async {
        let list_error = |e| ReadError::List(async_nats::Error::from(e));
        let mut info = stream.info_with_subjects(subjects::JOBS).await.map_err(list_error)?;
        let mut counts: HashMap<String, HashMap<Uuid, u64>> = HashMap::new();
        while let Some((subject, count)) = info.try_next().await.map_err(|e| ReadError::List(e.into()))? {
            if let Some(q) = subjects::parse_job(&subject) {
                *counts.entry(q.pool.to_owned()).or_default().entry(q.tenant).or_insert(0) += count as u64;
            }
        }
        Ok::<_, ReadError>(counts)
    };
    match tokio::time::timeout(timeout, list).await {
        Ok(Ok(counts)) => Ok(Backlog { taken: Some(Instant::now()), counts }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ReadError::Timeout(timeout)),
    }
}

/// Keeps `tx` fresh until `shutdown`; `pools` maps subject tokens to pool
/// names for the backlog gauge.
pub async fn refresh(
    stream: async_nats::jetstream::stream::Stream,
    every: Duration,
    pools: HashMap<String, String>,
    tx: watch::Sender<Arc<Backlog>>,
    shutdown: CancellationToken,
) {
    let mut ticker = sluice_core::reload::Ticker::new(every);
    while ticker.tick(&shutdown).await {
        match read(&stream, every.max(Duration::from_secs(1))).await {
            Ok(backlog) => {
                for (token, name) in &pools {
                    metrics::gauge!(BACKLOG, "pool" => name.clone()).set(backlog.of(token, None) as f64);
                }
                tx.send_replace(Arc::new(backlog));
            }
            Err(error) => {
                metrics::counter!(REFRESH_FAILURES).increment(1);
                tracing::warn!(%error, "cannot read the backlog from JetStream");
            }
        }
        if let Some(at) = tx.borrow().taken {
            metrics::gauge!(SNAPSHOT_AGE).set(at.elapsed().as_secs_f64());
        }
    }
}

/// Forwards the submit wake-ups (`sluice.wake.<pool>.<class>.<tenant>`) as
/// `(pool token, tenant)`: work arrived, before the next snapshot shows it.
pub async fn wake_ups(nats: async_nats::Client, tx: broadcast::Sender<(String, Uuid)>, shutdown: CancellationToken) {
    let mut sub = match nats.subscribe(subjects::WAKES).await {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot subscribe to wake-ups; StreamIsActive follows the snapshot only");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        if let Some(q) = subjects::parse_wake(&message.subject) {
            let _ = tx.send((q.pool.to_owned(), q.tenant));
        }
    }
}
