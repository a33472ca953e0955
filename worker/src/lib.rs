//! Sluice's worker.
//!
//! - [`startup`]: connects NATS and Postgres, declares the streams and the
//!   durable consumer, runs the executor and the ledger until shutdown.
//! - [`executor`]: fills free slots from the tenant queues the fair
//!   scheduler picks, and runs each job.
//! - [`fair`]: the scheduler's choices: class priority with minimum shares,
//!   weighted fair queuing on tokens across tenants.
//! - [`queues`]: the tenant queues (one consumer each), wake-ups and discovery.
//! - [`tenants`]: tenants' weights and names, reloaded from Postgres.
//! - [`counts`]: releasing and repairing the admission counters.
//! - [`job`]: one job's life: deadline, upstream call, retries, answer, event.
//! - [`events`]: job outcomes batched into the events stream.
//! - [`state`]: an asynchronous job's stored state as the worker moves it on.
//! - [`stream`]: relaying a provider's server-sent events to the waiting ingress.
//! - [`pools`]: deployments chosen by weight and health, breakers, shared rate budgets.
//! - [`providers`]: the provider APIs (OpenAI-compatible, Anthropic) and translation.
//! - [`upstream`]: one deployment's HTTP calls and their failure classes.
//! - [`ledger`]: writes job outcome events to Postgres in batches.
//! - [`webhooks`]: webhook deliveries recorded and sent, with retries.
//! - [`batches`]: pulling a durable consumer in batches.
//! - [`metrics`]: every metric the worker records.

pub mod batches;
pub mod counts;
pub mod events;
pub mod executor;
pub mod fair;
pub mod job;
pub mod ledger;
pub mod metrics;
pub mod pools;
pub mod providers;
pub mod queues;
pub mod startup;
pub mod state;
pub mod stream;
pub mod tenants;
pub mod upstream;
pub mod webhooks;

#[cfg(test)]
mod properties;

pub use startup::Worker;
