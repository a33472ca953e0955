//! Connecting to NATS and declaring Sluice's JetStream streams.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::config::{JobsConfig, NatsConfig, ms};
use crate::wire::subjects;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect { url: String, source: async_nats::ConnectError },
    #[error("nats.url `{url}` is not a list of NATS URLs: {message}")]
    Url { url: String, message: String },
    #[error("cannot declare stream {name}: {source}")]
    Stream { name: String, source: async_nats::jetstream::context::CreateStreamError },
    #[error("cannot open key-value bucket {name}: {message}")]
    Bucket { name: String, message: String },
}

/// Connects with Sluice's options: a name for the server's monitoring, the
/// configured connect timeout, and reconnects forever. `nats.url` may list
/// several servers of a cluster, comma-separated: any of them that answers
/// will do, and the client learns the others from the cluster.
pub async fn connect(config: &NatsConfig, role: Role, name: &str) -> Result<async_nats::Client, NatsError> {
    let servers =
        server_addrs(&config.url).map_err(|e| NatsError::Url { url: config.url.clone(), message: e.to_string() })?;
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .custom_inbox_prefix(role.inbox_prefix())
        .connection_timeout(ms(config.connect_timeout_ms))
        .request_timeout(Some(ms(config.request_timeout_ms)));
    if let Some(user) = &config.user {
        options = options.user_and_password(user.clone(), config.password.expose().to_owned());
    }
    options.connect(servers).await.map_err(|source| NatsError::Connect { url: config.url.clone(), source })
}

/// Which Sluice process a connection is. Each has its own inbox prefix (the
/// subjects its requests' replies and its JetStream deliveries come on), so
/// that a NATS user per role can be allowed its own inbox only: a scaler
/// cannot subscribe to the worker's deliveries (prompts) or the ingress's
/// reads of job states (results).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Ingress,
    Worker,
    Scaler,
}

impl Role {
    pub fn inbox_prefix(self) -> &'static str {
        match self {
            Role::Ingress => "_INBOX_INGRESS",
            Role::Worker => "_INBOX_WORKER",
            Role::Scaler => "_INBOX_SCALER",
        }
    }
}

/// The servers of a `nats.url`: one URL or a comma-separated list.
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, std::io::Error> {
    url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(|u| u.parse::<async_nats::ServerAddr>()).collect()
}

/// How long a process that is stopping waits for its last writes to reach
/// NATS. The client waits for a reconnect forever; a process told to stop
/// while NATS is down must still exit.
pub const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Sends what the client still buffers, waiting at most [`FINAL_FLUSH`].
pub async fn final_flush(client: &async_nats::Client) {
    match tokio::time::timeout(FINAL_FLUSH, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "could not flush NATS on shutdown"),
        Err(_) => tracing::warn!("NATS did not answer within 5 s of shutdown; exiting without the final flush"),
    }
}

pub fn jetstream(client: async_nats::Client, config: &NatsConfig) -> jetstream::Context {
    let mut js = jetstream::new(client);
    js.set_timeout(ms(config.request_timeout_ms));
    js
}

/// Declares the jobs stream (work queue, file storage, dedup window, bounded)
/// and the events stream; both calls are idempotent, so every component makes
/// them at start.
pub async fn ensure_streams(js: &jetstream::Context, config: &NatsConfig) -> Result<(), NatsError> {
    let jobs = stream::Config {
        name: config.jobs_stream.clone(),
        subjects: vec![subjects::JOBS.into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        duplicate_window: ms(config.dedup_window_ms),
        max_messages: config.max_queued_jobs,
        discard: stream::DiscardPolicy::New,
        // Lets a process store several jobs in one commit (`nats.group_commit`).
        allow_atomic_publish: true,
        ..Default::default()
    };
    let events = stream::Config {
        name: config.events_stream.clone(),
        subjects: vec![subjects::EVENTS.into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        duplicate_window: ms(config.dedup_window_ms),
        // Events wait here while Postgres is down; a week bounds the backlog.
        max_age: Duration::from_secs(7 * 24 * 3600),
        ..Default::default()
    };
    // The jobs stream is updated as well: one declared by an earlier version
    // of Sluice lacks atomic publishes.
    let name = jobs.name.clone();
    js.create_or_update_stream(jobs).await.map_err(|source| NatsError::Stream { name, source })?;
    let name = events.name.clone();
    js.get_or_create_stream(events).await.map_err(|source| NatsError::Stream { name, source })?;
    Ok(())
}

/// Opens the job-state bucket, creating it on first use: one value per key
/// (no history), file storage, entries removed `jobs.retention_ms` after
/// their last write; its stream allows atomic publishes (`nats.group_commit`).
pub async fn state_bucket(
    js: &jetstream::Context,
    nats: &NatsConfig,
    jobs: &JobsConfig,
) -> Result<jetstream::kv::Store, NatsError> {
    let name = jobs.state_bucket.clone();
    let bucket_error = |e: &dyn std::fmt::Display| NatsError::Bucket { name: name.clone(), message: e.to_string() };
    let store = match js.get_key_value(&name).await {
        Ok(store) => store,
        Err(_) => create_bucket(js, &name, nats, jobs).await?,
    };
    let mut stream = js.get_stream(&store.stream_name).await.map_err(|e| bucket_error(&e))?;
    let info = stream.info().await.map_err(|e| bucket_error(&e))?;
    if !info.config.allow_atomic_publish {
        let mut config = info.config.clone();
        config.allow_atomic_publish = true;
        js.update_stream(config).await.map_err(|e| bucket_error(&e))?;
    }
    Ok(store)
}

/// Creates a key-value bucket as Sluice keeps them: one value per key, file
/// storage, entries removed `jobs.retention_ms` after their last write, at
/// `nats.replicas`.
async fn create_bucket(
    js: &jetstream::Context,
    name: &str,
    nats: &NatsConfig,
    jobs: &JobsConfig,
) -> Result<jetstream::kv::Store, NatsError> {
    js.create_key_value(jetstream::kv::Config {
        bucket: name.to_owned(),
        history: 1,
        max_age: ms(jobs.retention_ms),
        storage: stream::StorageType::File,
        num_replicas: nats.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| NatsError::Bucket { name: name.to_owned(), message: e.to_string() })
}

/// Opens the bucket of idempotency keys, creating it on first use: which
/// job each key names (one value per key, file storage), each entry removed
/// `jobs.retention_ms` after it was written. The job's state is written
/// after its key and lives `jobs.retention_ms` after its last change, so a
/// key never outlives its job's state: within the window it names a job
/// that can be replayed, and after it the key names a new job.
pub async fn idempotency_bucket(
    js: &jetstream::Context,
    nats: &NatsConfig,
    jobs: &JobsConfig,
) -> Result<jetstream::kv::Store, NatsError> {
    match js.get_key_value(&jobs.idempotency_bucket).await {
        Ok(store) => Ok(store),
        Err(_) => create_bucket(js, &jobs.idempotency_bucket, nats, jobs).await,
    }
}

/// A key's last write in a key-value bucket: its revision, and its value
/// (none for a tombstone); `None` when the key was never written (or has
/// expired). A key-value read may be answered by any replica of a
/// replicated bucket, and a replica may not have applied a write that was
/// just acknowledged: a read that finds no value is asked again of the
/// stream's leader (`$JS.API.STREAM.MSG.GET`), so a state just written is
/// never taken for missing.
pub async fn kv_last_write(
    store: &jetstream::kv::Store,
    key: &str,
) -> Result<Option<(u64, Option<bytes::Bytes>)>, async_nats::Error> {
    if let Some(entry) = store.entry(key).await?
        && entry.operation == jetstream::kv::Operation::Put
    {
        return Ok(Some((entry.revision, Some(entry.value))));
    }
    kv_leader_last_write(store, key).await
}

/// A key's last write as the stream's leader has it (never a lagging
/// replica's): for reads that settle a contested write.
pub async fn kv_leader_last_write(
    store: &jetstream::kv::Store,
    key: &str,
) -> Result<Option<(u64, Option<bytes::Bytes>)>, async_nats::Error> {
    match store.stream.get_last_raw_message_by_subject(&subjects::kv_key(store, key)).await {
        Ok(message) => {
            let tombstone = message.headers.get("KV-Operation").is_some();
            Ok(Some((message.sequence, (!tombstone).then_some(message.payload))))
        }
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether a write conditional on a subject's last sequence failed because
/// the subject already has a message: 10071 (`wrong last sequence: N`), or,
/// on a clustered stream, 10164 (`wrong last sequence`, the constant form a
/// leader answers while another write to the subject is still being
/// applied), which the client library reports as `Other`.
pub fn is_taken(e: &jetstream::context::PublishError) -> bool {
    e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence
        || error_code(e) == Some(jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT)
}

/// Whether a publish was refused because a message with its `Nats-Msg-Id`
/// is being stored (proposed on a clustered stream, not yet applied): 10158,
/// "duplicate message id is in process", which the client library reports
/// as `Other`. Repeated a moment later it is acknowledged as the duplicate.
pub fn is_duplicate_in_process(e: &jetstream::context::PublishError) -> bool {
    error_code(e) == Some(jetstream::ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT)
}

/// Whether a publish was refused for a moment, not for good (the client
/// library reports both as `Other`): 10063, "expected stream sequence does
/// not match", which a stream leader answers as it resets its log after a
/// leader change, and 10167, "too many requests", a leader whose inbound
/// queue is full. Either is repeated within `ingress.publish_retry_ms`; a
/// job's publish carries its `Nats-Msg-Id`, so a repeat is stored once.
pub fn is_transient_refusal(e: &jetstream::context::PublishError) -> bool {
    matches!(
        error_code(e),
        Some(jetstream::ErrorCode::STREAM_SEQUENCE_NOT_MATCH | jetstream::ErrorCode::STREAM_TOO_MANY_REQUESTS)
    )
}

/// Whether a publish failed because the stream is at its limits (its
/// `max_msgs` or `max_bytes`, or the server's storage): JetStream's error
/// code 10077, "stream store failed".
pub fn is_storage_full(e: &jetstream::context::PublishError) -> bool {
    error_code(e) == Some(jetstream::ErrorCode::STREAM_STORE_FAILED)
}

/// JetStream's error code for a failed publish, read from the error's
/// source chain (the client library keeps only a kind of its own).
fn error_code(e: &jetstream::context::PublishError) -> Option<jetstream::ErrorCode> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(js) = s.downcast_ref::<jetstream::Error>() {
            return Some(js.error_code());
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};

    /// A publish refused by the server with JetStream error `code`, as the
    /// client library hands it over (kind `Other`, the API error as source).
    fn refused(code: u64) -> PublishError {
        let api: jetstream::Error =
            serde_json::from_value(serde_json::json!({"code": 503, "err_code": code, "description": "refused"}))
                .unwrap();
        PublishError::with_source(PublishErrorKind::Other, api)
    }

    #[test]
    fn refusals_are_told_apart_by_their_code() {
        assert!(is_transient_refusal(&refused(10063)), "a leader resetting its log");
        assert!(is_transient_refusal(&refused(10167)), "a full inbound queue");
        assert!(!is_transient_refusal(&refused(10077)), "a full stream is not repeated");
        assert!(is_storage_full(&refused(10077)));
        assert!(is_duplicate_in_process(&refused(10158)));
        assert!(!is_transient_refusal(&refused(10158)));
        assert!(!is_transient_refusal(&PublishError::new(PublishErrorKind::Other)), "no code, no repeat");
    }
}
