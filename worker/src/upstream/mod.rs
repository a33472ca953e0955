//! Everything on the provider side of a job.
//!
//! - [`pools`]: deployments chosen by weight and health, breakers, shared rate budgets.
//! - [`client`]: one deployment's HTTP calls and their failure classes.
//! - [`providers`]: the provider APIs (OpenAI-compatible, Anthropic) and translation.

pub mod client;
pub mod pools;
pub mod providers;
