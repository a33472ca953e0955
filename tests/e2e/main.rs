//! Sluice's end-to-end tests: one test binary, one module per concern, every
//! test on its own nats-server and its own Postgres database.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "a panic in a test is a failed test")]
#![allow(
    clippy::disallowed_methods,
    reason = "tests start servers, clients and load of their own; the ban on bare spawns is for the services"
)]

mod harness;
mod procs;

mod admin;
mod auth;
mod chaos;
mod chat;
mod config;
mod embeddings;
mod failures;
mod fairness;
mod group_commit;
mod hostile;
mod isolation;
mod jobs;
mod large;
mod nats_users;
mod once;
mod providers;
mod rolling;
mod scaler;
mod sdk;
mod security;
mod soak;
mod streaming;
mod validation;
mod webhooks;
