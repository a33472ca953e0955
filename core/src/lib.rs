//! Sluice's shared library, used by the ingress, the worker and the tests.
//!
//! - [`config`]: the typed configuration, layered defaults → file → `SLUICE__…` env.
//! - [`secret`]: a wrapper that keeps secrets out of logs.
//! - [`seal`]: webhook signing secrets encrypted at rest under a mounted keyring.
//! - [`wire`]: everything that crosses NATS: subjects, the job envelope, the reply.
//! - [`event`]: the job outcome events the worker publishes and the ledger writes.
//! - [`jobstate`]: the state of asynchronous jobs, as kept in a key-value bucket.
//! - [`error`]: the one error-code enum, mapped to HTTP and gRPC status, rendered per client dialect.
//! - [`group_commit`]: many concurrent JetStream writes stored in one atomic batch.
//! - [`nats`]: connecting to NATS and declaring Sluice's JetStream streams.
//! - [`db`]: Postgres pool, embedded migrations, tenants and API keys.
//! - [`telemetry`]: logging and the Prometheus recorder.
//! - [`ops`]: `/healthz`, `/readyz` and `/metrics` for every component.
//! - [`webhook`]: Standard Webhooks signatures and the webhook target guard.
//! - [`tenant`]: a tenant's weight, tier and limits, resolved against the defaults.
//! - [`counters`]: the shared counters in NATS behind admission control.
//! - [`reload`]: values reloaded in the background, keeping the last good one.
//! - [`shutdown`]: SIGTERM/SIGINT into one cancellation token.
//! - [`clock`]: UTC calendar dates from Unix time and back.

pub mod bodies;
pub mod clock;
pub mod config;
pub mod counters;
pub mod db;
pub mod error;
pub mod event;
pub mod group_commit;
pub mod jobstate;
pub mod nats;
pub mod ops;
pub mod reload;
pub mod seal;
pub mod secret;
pub mod shutdown;
pub mod tasks;
pub mod telemetry;
pub mod tenant;
pub mod webhook;
pub mod wire;

#[cfg(test)]
mod properties;

/// Milliseconds since the Unix epoch, the time unit of envelopes and events.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
