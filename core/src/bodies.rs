//! The bodies bucket: JetStream's object store (file storage, replicated like
//! the streams), holding every body too large for a NATS message — request
//! bodies the ingress could not put in a job's message, answers the worker
//! could not put in its reply or in a job's state. The message carries a
//! [`StoredBody`] instead ([`crate::wire::stored`]).
//!
//! A body goes apart when it is longer than [`Bodies::inline_max`]: the
//! server's `max_payload` less [`HEADROOM`] for the headers and the rest of a
//! job's state. Objects expire after `jobs.max_expiry_ms + jobs.retention_ms`
//! (a request body must outlive the longest wait in the queue, a result the
//! retention of its job's state); the bucket holds at most
//! `nats.bodies_max_bytes`, and a write past that is refused rather than
//! evicting anyone's body. Request bodies are deleted when their job leaves
//! the queue, and an answer read by the client that waited for it is deleted
//! once sent.

use std::time::Duration;

use async_nats::jetstream::object_store::{self, GetErrorKind, ObjectStore};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use tokio::io::AsyncReadExt;

use crate::config::{JobsConfig, NatsConfig, ms};
use crate::nats::NatsError;
use crate::wire::stored::StoredBody;

/// Bytes of a NATS message kept for headers and a job state's other fields.
pub const HEADROOM: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Past its expiry, deleted, or never written.
    #[error("stored body {0} is gone")]
    NotFound(String),
    #[error("stored body {name} is {size} bytes, more than the {limit} allowed here")]
    TooLarge { name: String, size: u64, limit: usize },
    #[error("bodies bucket: {0}")]
    Store(String),
}

#[derive(Clone)]
pub struct Bodies {
    store: ObjectStore,
    inline_max: usize,
}

impl Bodies {
    /// Opens the bucket, creating it on first use.
    pub async fn open(
        js: &jetstream::Context,
        max_payload: usize,
        nats: &NatsConfig,
        jobs: &JobsConfig,
    ) -> Result<Self, NatsError> {
        let name = nats.bodies_bucket.clone();
        let store = match js.get_object_store(&name).await {
            Ok(store) => store,
            Err(_) => {
                let config = object_store::Config {
                    bucket: name.clone(),
                    description: Some("Sluice: bodies too large for a NATS message".into()),
                    max_age: ms(jobs.max_expiry_ms.saturating_add(jobs.retention_ms)),
                    max_bytes: nats.bodies_max_bytes,
                    storage: stream::StorageType::File,
                    num_replicas: nats.replicas,
                    ..Default::default()
                };
                match js.create_object_store(config).await {
                    Ok(store) => store,
                    // Another process created it meanwhile.
                    Err(created) => js
                        .get_object_store(&name)
                        .await
                        .map_err(|_| NatsError::Bucket { name: name.clone(), message: created.to_string() })?,
                }
            }
        };
        Ok(Self { store, inline_max: max_payload.saturating_sub(HEADROOM) })
    }

    /// The longest body sent inside a message.
    pub fn inline_max(&self) -> usize {
        self.inline_max
    }

    /// Whether a body of `len` bytes must be stored apart.
    pub fn too_large_for_a_message(&self, len: usize) -> bool {
        len > self.inline_max
    }

    /// Stores `body` under `name` (replacing an earlier body of that name).
    pub async fn put(&self, name: String, body: &[u8]) -> Result<StoredBody, BodyError> {
        let started = std::time::Instant::now();
        let mut reader = body;
        let info = self.store.put(name.as_str(), &mut reader).await.map_err(|e| {
            metrics::counter!(FAILURES, "op" => "put").increment(1);
            BodyError::Store(e.to_string())
        })?;
        metrics::counter!(STORED_BYTES).increment(body.len() as u64);
        metrics::histogram!(PUT_SECONDS).record(started.elapsed().as_secs_f64());
        Ok(StoredBody { name, size: info.size as u64 })
    }

    /// Reads a stored body whole, refusing one longer than `limit`.
    pub async fn read(&self, body: &StoredBody, limit: usize) -> Result<Bytes, BodyError> {
        if body.size > limit as u64 {
            return Err(BodyError::TooLarge { name: body.name.clone(), size: body.size, limit });
        }
        let mut object = self.open_object(body).await?;
        if object.info.size as u64 > limit as u64 {
            return Err(BodyError::TooLarge { name: body.name.clone(), size: object.info.size as u64, limit });
        }
        let mut bytes = Vec::with_capacity(object.info.size);
        object.read_to_end(&mut bytes).await.map_err(|e| {
            metrics::counter!(FAILURES, "op" => "read").increment(1);
            BodyError::Store(e.to_string())
        })?;
        Ok(Bytes::from(bytes))
    }

    /// A stored body as a stream of chunks, for a response that sends it on
    /// as it is read (memory: one chunk, not the body).
    pub async fn stream(
        &self,
        body: &StoredBody,
    ) -> Result<impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static, BodyError> {
        let object = self.open_object(body).await?;
        Ok(tokio_util::io::ReaderStream::with_capacity(object, CHUNK))
    }

    async fn open_object(&self, body: &StoredBody) -> Result<object_store::Object, BodyError> {
        self.store.get(body.name.as_str()).await.map_err(|e| match e.kind() {
            GetErrorKind::NotFound => BodyError::NotFound(body.name.clone()),
            _ => {
                metrics::counter!(FAILURES, "op" => "read").increment(1);
                BodyError::Store(e.to_string())
            }
        })
    }

    /// Deletes a body no one needs any more; a failure only leaves it to
    /// expire.
    pub async fn delete(&self, name: &str) {
        match tokio::time::timeout(DELETE_TIMEOUT, self.store.delete(name)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%error, name, "stored body not deleted; it expires instead"),
            Err(_) => tracing::debug!(name, "deleting a stored body timed out; it expires instead"),
        }
    }
}

/// Size of the pieces a stored body is read in.
const CHUNK: usize = 128 * 1024;
const DELETE_TIMEOUT: Duration = Duration::from_secs(5);

pub const STORED_BYTES: &str = "sluice_stored_body_bytes_total";
pub const PUT_SECONDS: &str = "sluice_stored_body_put_seconds";
pub const FAILURES: &str = "sluice_stored_body_failures_total";

pub fn describe() {
    metrics::describe_counter!(STORED_BYTES, "Bytes of bodies stored apart because a NATS message cannot carry them");
    metrics::describe_histogram!(PUT_SECONDS, "Time to store one body in the bodies bucket");
    metrics::describe_counter!(FAILURES, "Failed writes and reads of the bodies bucket, by op");
}
