//! Sluice's worker.
//!
//! - [`startup`]: connects NATS and Postgres, declares the streams and the
//!   durable consumer, runs the executor and the ledger until shutdown.
//! - [`executor`]: pulls jobs in batches sized to its free slots, runs them,
//!   and acks, naks with a delay, or terminates each by its outcome.
//! - [`job`]: one job's life: deadline, upstream call, retries, answer, event.
//! - [`events`]: job outcomes batched into the events stream.
//! - [`state`]: an asynchronous job's stored state as the worker moves it on.
//! - [`upstream`]: the OpenAI-compatible HTTP client of each pool.
//! - [`ledger`]: writes job outcome events to Postgres in batches.
//! - [`webhooks`]: webhook deliveries recorded and sent, with retries.
//! - [`batches`]: pulling a durable consumer in batches.
//! - [`metrics`]: every metric the worker records.

pub mod batches;
pub mod events;
pub mod executor;
pub mod job;
pub mod ledger;
pub mod metrics;
pub mod startup;
pub mod state;
pub mod upstream;
pub mod webhooks;

pub use startup::Worker;
