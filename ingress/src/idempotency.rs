//! Which job an `Idempotency-Key` names (on `POST /v1/jobs` and on the
//! synchronous routes). The first use of a key writes, in its own bucket
//! (`jobs.idempotency_bucket`), the new job's id and the request's digest;
//! every later use within the key's window — `jobs.retention_ms` from its
//! first use — names that job (a different request is a 409). After the
//! window the entry is gone and the key names a new job, with an id of its
//! own: its ledger row, events and webhooks are not mistaken for the old
//! job's. The job's state is written after the key and outlives it, so a
//! key never names a job that is no longer there.
//!
//! Concurrent first uses, on one replica or several, are settled by the
//! bucket's create (one wins); a create whose answer is ambiguous (a lost
//! acknowledgement, a clustered leader still applying a racing write) is
//! settled by reading the key back: the job id in it says whose write won.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::jobstate;
use uuid::Uuid;

use crate::state::AppState;

/// A key's entry: the job it names and the digest of its first request.
#[derive(Serialize, Deserialize)]
struct Named {
    job: Uuid,
    request_hash: String,
}

/// The bucket key of a tenant's idempotency key (keys are the client's
/// strings; the digest keeps them within the characters a key may use).
pub fn entry_key(tenant: Uuid, key: &str) -> String {
    format!("{tenant}.{}", jobstate::hash_hex(key.as_bytes()))
}

/// The job `key` names for `tenant`: a new one when this request is the
/// key's first use, else the job its first use named (whose request must
/// be this one: `request_hash`, else 409).
pub async fn job_for(state: &AppState, tenant: Uuid, key: &str, request_hash: &str) -> Result<Uuid, ApiError> {
    let entry = entry_key(tenant, key);
    let job = Uuid::now_v7();
    let value = serde_json::to_vec(&Named { job, request_hash: request_hash.to_owned() })
        .map_err(|_| ApiError::new(ErrorCode::Internal, "cannot encode an idempotency key"))?;
    let give_up = Instant::now() + Duration::from_millis(state.config.ingress.publish_retry_ms);
    let mut pause = Duration::from_millis(20);
    loop {
        let error = match state.idempotency.create(&entry, value.clone().into()).await {
            Ok(_) => return Ok(job),
            Err(e) => e,
        };
        // Taken, by a first use or by this create whose answer was lost; or
        // the store did not answer: read the key back.
        match state.idempotency.entry(&entry).await {
            Ok(Some(found)) if found.operation == kv::Operation::Put => {
                let named: Named = serde_json::from_slice(&found.value)
                    .map_err(|_| ApiError::new(ErrorCode::Internal, "an idempotency key's entry does not decode"))?;
                if named.job == job {
                    return Ok(job);
                }
                if named.request_hash != request_hash {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        "this Idempotency-Key was used for a different request",
                    )
                    .param("Idempotency-Key"));
                }
                return Ok(named.job);
            }
            // Nothing readable yet (a racing create not applied, or read
            // from a replica that lags): create again.
            Ok(_) => {}
            Err(e) => tracing::info!(error = %e, "reading an idempotency key failed; retrying"),
        }
        if Instant::now() + pause > give_up {
            tracing::warn!(%error, "cannot claim an idempotency key");
            return Err(ApiError::new(ErrorCode::QueueUnavailable, "the job store is unavailable; retry shortly")
                .retry_after(1));
        }
        metrics::counter!(crate::metrics::PUBLISH_RETRIES, "reason" => "idempotency_key").increment(1);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}
