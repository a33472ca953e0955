//! Shared counters in NATS: the state behind admission control, so that a
//! limit holds across every ingress replica instead of per process.
//!
//! Two JetStream streams with atomic counters (`allow_msg_counter`, NATS
//! 2.12+): a publish carrying `Nats-Incr: +N` adds N to the subject's total
//! on the stream leader and returns the new total in its acknowledgement, so
//! one round trip both counts and checks.
//!
//! - `nats.counters_stream`, subjects `sluice.queued.<tenant>`: jobs of the
//!   tenant in the queue (queued or running). The ingress adds one before
//!   publishing a job, the worker takes it off when the job leaves the queue.
//! - the same stream, subjects `sluice.inflight.<tenant>`: jobs of the tenant
//!   running now; a worker adds before it fetches for a tenant with a
//!   `max_in_flight` limit and takes off when the job ends.
//! - `nats.rates_stream`, subjects `sluice.rate.<rpm|tpm>.<tenant>.<minute>`:
//!   requests and estimated tokens admitted in each minute. Entries expire
//!   after three minutes; a sliding window weighs the previous minute in.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use serde::Deserialize;

use crate::config::NatsConfig;
use crate::nats::NatsError;
use crate::wire::subjects;

const INCREMENT: &str = "Nats-Incr";
const MSG_ID: &str = "Nats-Msg-Id";

/// How long a per-minute rate entry is kept: the current and previous
/// minute are read, a third covers clock skew between replicas.
pub const RATE_ENTRY_SECS: u64 = 180;

#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("counter update failed: {0}")]
    Publish(#[from] async_nats::jetstream::context::PublishError),
    #[error("counter read failed: {0}")]
    Read(String),
    #[error("counter answer without a value")]
    NoValue,
}

pub use crate::wire::subjects::Rate;

/// A count of tokens or calls as a counter's change: beyond `i64::MAX` it
/// saturates instead of wrapping negative (which would push a budget's
/// counter down, a limit bypass).
pub fn delta(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[derive(Clone)]
pub struct Counters {
    js: jetstream::Context,
    counters: stream::Stream,
    rates: stream::Stream,
}

#[derive(Deserialize)]
struct Value {
    val: String,
}

impl Counters {
    /// Declares both counter streams (idempotent) and opens them.
    pub async fn open(js: &jetstream::Context, config: &NatsConfig) -> Result<Self, NatsError> {
        let base = |name: &str, subjects: &[&str]| stream::Config {
            name: name.to_owned(),
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            allow_message_counter: true,
            allow_direct: true,
            // A counter's latest message holds its total; older ones are history.
            max_messages_per_subject: 1,
            ..Default::default()
        };
        let counters = base(&config.counters_stream, &subjects::COUNTERS);
        let rates = stream::Config {
            max_age: std::time::Duration::from_secs(RATE_ENTRY_SECS),
            ..base(&config.rates_stream, &[subjects::RATES])
        };
        let mut opened = Vec::with_capacity(2);
        for cfg in [counters, rates] {
            let name = cfg.name.clone();
            // Create or update: a stream made by an earlier version may lack a subject.
            js.create_or_update_stream(cfg).await.map_err(|source| NatsError::Stream { name: name.clone(), source })?;
            let stream = js
                .get_stream(&name)
                .await
                .map_err(|e| NatsError::Bucket { name: name.clone(), message: e.to_string() })?;
            opened.push(stream);
        }
        let rates = opened.pop().ok_or(NatsError::Bucket { name: "counters".into(), message: "missing".into() })?;
        let counters = opened.pop().ok_or(NatsError::Bucket { name: "counters".into(), message: "missing".into() })?;
        Ok(Self { js: js.clone(), counters, rates })
    }

    fn stream_of(&self, subject: &str) -> &stream::Stream {
        if subjects::is_rate(subject) { &self.rates } else { &self.counters }
    }

    /// Adds `delta` (which may be negative) and returns the new total.
    pub async fn add(&self, subject: &str, delta: i64) -> Result<i64, CounterError> {
        self.add_with(subject, delta, None).await?.ok_or(CounterError::NoValue)
    }

    /// Adds `delta` once for a given `id`: a second add with the same id
    /// within the stream's duplicate window is dropped (`None`). Counter
    /// increments cannot be made conditional on the last sequence (the
    /// server refuses that header on them), so workers repairing the same
    /// observation give it the same id instead.
    pub async fn add_once(&self, subject: &str, delta: i64, id: &str) -> Result<Option<i64>, CounterError> {
        self.add_with(subject, delta, Some(id)).await
    }

    async fn add_with(&self, subject: &str, delta: i64, id: Option<&str>) -> Result<Option<i64>, CounterError> {
        let mut headers = HeaderMap::new();
        headers.insert(INCREMENT, format!("{delta:+}").as_str());
        if let Some(id) = id {
            headers.insert(MSG_ID, id);
        }
        let ack = self.js.publish_with_headers(subject.to_owned(), headers, Bytes::new()).await?;
        let ack = ack.await?;
        if ack.duplicate {
            return Ok(None);
        }
        let value = ack.value.ok_or(CounterError::NoValue)?;
        value.parse().map(Some).map_err(|_| CounterError::Read(format!("counter value `{value}` is not a number")))
    }

    /// The subject's total and the sequence of its last write; `(0, 0)` for
    /// a subject never written (or expired).
    pub async fn get(&self, subject: &str) -> Result<(i64, u64), CounterError> {
        use async_nats::jetstream::stream::DirectGetErrorKind;
        match self.stream_of(subject).direct_get_last_for_subject(subject).await {
            Ok(message) => {
                let value: Value = serde_json::from_slice(&message.payload)
                    .map_err(|e| CounterError::Read(format!("counter entry is not a value: {e}")))?;
                let total = value
                    .val
                    .parse()
                    .map_err(|_| CounterError::Read(format!("counter value `{}` is not a number", value.val)))?;
                Ok((total, message.sequence))
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok((0, 0)),
            Err(e) => Err(CounterError::Read(e.to_string())),
        }
    }
}
