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

use serde::{Deserialize, Serialize};
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::jobstate;
use uuid::Uuid;

use crate::routes::jobs::unavailable;
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
        // the store did not answer: read the key back (from the stream's
        // leader: a lagging replica would keep this loop from settling).
        match sluice_core::nats::kv_leader_last_write(&state.idempotency, &entry).await {
            Ok(Some((revision, Some(found)))) => {
                let named: Named = serde_json::from_slice(&found)
                    .map_err(|_| ApiError::new(ErrorCode::Internal, "an idempotency key's entry does not decode"))?;
                if named.job == job || named.request_hash == request_hash {
                    return Ok(named.job);
                }
                // A different request. The key is spent only if its job was
                // stored: a first use refused before that (a 429, a 503)
                // leaves it to a corrected request, which takes it over.
                let stored = sluice_core::nats::kv_last_write(&state.job_state, &jobstate::key(tenant, named.job))
                    .await
                    .map_err(|e| unavailable(&e))?;
                if stored.is_some_and(|(_, value)| value.is_some()) {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        "this Idempotency-Key was used for a different request",
                    )
                    .param("Idempotency-Key"));
                }
                if state.idempotency.update(&entry, value.clone().into(), revision).await.is_ok() {
                    return Ok(job);
                }
            }
            // Nothing yet (a racing create not applied): create again.
            Ok(_) => {}
            Err(e) => tracing::info!(error = %e, "reading an idempotency key failed; retrying"),
        }
        if Instant::now() + pause > give_up {
            tracing::warn!(%error, "cannot claim an idempotency key");
            return Err(ApiError::new(
                ErrorCode::QueueUnavailable,
                "the Idempotency-Key could not be claimed (its store is unavailable); retry shortly",
            )
            .retry_after(1));
        }
        metrics::counter!(crate::metrics::PUBLISH_RETRIES, "reason" => "idempotency_key").increment(1);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}
