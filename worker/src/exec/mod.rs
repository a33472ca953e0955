//! Running jobs: the fair scheduler picks tenant queues, the executor fills
//! free slots from them, and each job runs its life here.
//!
//! - [`executor`]: fills free slots from the queues the scheduler picks, and runs each job.
//! - [`fair`]: the scheduler's choices: class priority with minimum shares,
//!   weighted fair queuing on tokens across tenants.
//! - [`queues`]: the tenant queues (one consumer each), wake-ups and discovery.
//! - [`job`]: one job's life (and the context every job shares): deadline,
//!   upstream call, retries, answer, event.
//! - [`bodies`]: request bodies and answers too large for a NATS message.
//! - [`outcome`]: what an attempt's result means: an answer, or another attempt.
//! - [`stream`]: relaying a provider's server-sent events to the waiting ingress.
//! - [`state`]: an asynchronous job's stored state as the worker moves it on.
//! - [`counts`]: releasing and repairing the admission counters.
//! - [`tenants`]: tenants' weights and names, reloaded from Postgres.

pub mod bodies;
pub mod counts;
pub mod executor;
pub mod fair;
pub mod job;
pub mod outcome;
pub mod queues;
pub mod state;
pub mod stream;
pub mod tenants;
