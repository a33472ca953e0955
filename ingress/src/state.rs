//! What every request handler shares: the configuration, the NATS client,
//! the job-state bucket and its group commits, the key cache, admission, the
//! reply router and the bound on waiting requests.

use std::sync::Arc;
use std::time::Duration;

use sluice_core::config::Config;
use sluice_core::group_commit::GroupCommit;
use sqlx::PgPool;
use tokio::sync::Semaphore;

use crate::auth::KeyCache;
use crate::replies::Replies;

/// What every request handler shares.
pub struct AppState {
    pub config: Config,
    pub nats: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    /// State of asynchronous jobs.
    pub job_state: async_nats::jetstream::kv::Store,
    /// Which job each `Idempotency-Key` names (`crate::idempotency`).
    pub idempotency: async_nats::jetstream::kv::Store,
    /// Bodies too large for a NATS message: request bodies stored, answers read.
    pub bodies: sluice_core::bodies::Bodies,
    /// Job publishes, batched with `nats.group_commit`.
    pub jobs_commit: GroupCommit,
    /// New jobs' states, batched with `nats.group_commit`.
    pub state_commit: GroupCommit,
    /// Postgres, for the job history behind `GET /v1/jobs` (never on the submit path).
    pub db: PgPool,
    pub keys: KeyCache,
    /// Tenant limits, counted in NATS across all ingress replicas.
    pub admission: crate::admission::Admission,
    pub replies: Replies,
    /// Bounds the memory request bodies hold at once (`ingress.max_body_memory_bytes`).
    pub body_budget: crate::body::BodyBudget,
    /// Bounds the synchronous requests waiting at once (`ingress.max_in_flight`).
    pub in_flight: Arc<Semaphore>,
    /// Every task the ingress starts; shutdown waits for them.
    pub tasks: sluice_core::tasks::Tasks,
    /// Pool name → its subject token and output limit, precomputed.
    pub pools: std::collections::HashMap<String, crate::validate::PoolRoute>,
    /// Seals the webhook secrets of submitted jobs (`webhooks.secret_keys_file`).
    pub sealer: sluice_core::seal::Keyring,
}

impl AppState {
    /// How long a client may take to send a request body.
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.config.ingress.body_timeout_ms)
    }
}
