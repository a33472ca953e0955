//! The worker's side of the admission counters: when a job leaves the queue
//! it takes it off its tenant's queued-jobs count, and it corrects the
//! tokens-per-minute count by the real usage. Changes are summed per counter
//! and sent every few milliseconds, one update per counter, so a busy tenant
//! costs one NATS round trip per flush rather than one per job.
//!
//! A count can drift when a process dies between a job leaving the queue and
//! the update (or between an ingress counting and publishing). [`repair`]
//! sets such a count to the truth, the tenant's messages in the jobs stream,
//! once it has seen the count and the truth disagree and both stay unchanged
//! over a full round, so it never races a live update.

use std::collections::HashMap;
use std::time::Duration;

use sluice_core::counters::Counters;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::metrics as m;

const FLUSH_EVERY: Duration = Duration::from_millis(5);

/// Sends counter changes to the flusher.
#[derive(Clone)]
pub struct CountSink {
    tx: mpsc::UnboundedSender<(String, i64)>,
}

impl CountSink {
    pub fn add(&self, subject: String, delta: i64) {
        if delta != 0 {
            let _ = self.tx.send((subject, delta));
        }
    }

    /// Starts the flusher; it sends what is left when shutdown begins.
    pub fn start(counters: Counters, tasks: &sluice_core::tasks::Tasks) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, i64)>();
        let shutdown = tasks.stopping();
        tasks.spawn(async move {
            let mut pending: HashMap<String, i64> = HashMap::new();
            loop {
                let stopping = tokio::select! {
                    _ = shutdown.cancelled() => true,
                    got = rx.recv() => match got {
                        Some((s, d)) => { *pending.entry(s).or_insert(0) += d; false }
                        None => true,
                    },
                };
                if !stopping {
                    tokio::time::sleep(FLUSH_EVERY).await;
                }
                while let Ok((s, d)) = rx.try_recv() {
                    *pending.entry(s).or_insert(0) += d;
                }
                for (subject, delta) in std::mem::take(&mut pending) {
                    if delta == 0 {
                        continue;
                    }
                    if let Err(error) = counters.add(&subject, delta).await {
                        metrics::counter!(m::COUNTER_FAILURES).increment(1);
                        tracing::warn!(%error, subject, "counter update failed; kept for the next flush");
                        *pending.entry(subject).or_insert(0) += delta;
                    }
                }
                if stopping {
                    return;
                }
            }
        });
        Self { tx }
    }
}

/// What [`repair`] saw of one tenant's count last round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    value: i64,
    sequence: u64,
    truth: i64,
}

/// Sets drifted counts (`subject_of` each tenant) to the truth: `truth`
/// holds each capped tenant's real figure (messages in the jobs stream, or
/// jobs being worked on); `seen` carries the last round's observations.
/// Returns the counts repaired.
pub async fn repair(
    counters: &Counters,
    subject_of: fn(Uuid) -> String,
    truth: &HashMap<Uuid, i64>,
    capped: &[Uuid],
    seen: &mut HashMap<Uuid, Seen>,
) -> usize {
    let mut repaired = 0;
    let mut next = HashMap::with_capacity(capped.len());
    for tenant in capped {
        let subject = subject_of(*tenant);
        let Ok((value, sequence)) = counters.get(&subject).await else {
            continue;
        };
        let now = Seen { value, sequence, truth: truth.get(tenant).copied().unwrap_or(0) };
        if value != now.truth && seen.get(tenant) == Some(&now) {
            // Workers seeing the same state name the repair alike: it applies once.
            let id = format!("repair-{subject}-{sequence}");
            match counters.add_once(&subject, now.truth - value, &id).await {
                Ok(Some(_)) => {
                    repaired += 1;
                    tracing::info!(%tenant, subject, from = value, to = now.truth, "drifted count repaired");
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, %tenant, subject, "count repair failed"),
            }
            continue;
        }
        next.insert(*tenant, now);
    }
    *seen = next;
    repaired
}
