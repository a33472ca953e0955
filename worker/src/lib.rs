//! Sluice's worker.
//!
//! - [`startup`]: connects NATS and Postgres, declares the streams and the
//!   durable consumer, runs the executor and the ledger until shutdown.
//! - [`exec`]: running jobs: the fair scheduler, the executor, one job's
//!   life, streams, job state, admission counters, tenants.
//! - [`upstream`]: the provider side: pools and deployments (breakers,
//!   budgets, choice), HTTP clients, provider APIs and translation.
//! - [`ledger`]: job outcome events batched into the events stream, and
//!   written to Postgres in batches.
//! - [`webhooks`]: webhook deliveries recorded and sent, with retries.
//! - [`batches`]: pulling a durable consumer in batches.
//! - [`metrics`]: every metric the worker records.

pub mod batches;
pub mod exec;
pub mod ledger;
pub mod metrics;
pub mod startup;
pub mod upstream;
pub mod webhooks;

#[cfg(test)]
mod properties;

pub use startup::Worker;
