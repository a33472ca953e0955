//! Sluice's HTTP ingress.
//!
//! - [`startup`]: connects NATS and Postgres, builds the app, serves it until
//!   the shutdown token fires, then drains within the grace period.
//! - [`auth`]: API keys, checked against an in-memory snapshot of the live
//!   keys that a background task reloads from Postgres.
//! - [`replies`]: one wildcard inbox per ingress; answers from workers are
//!   routed to the request waiting for them.
//! - [`body`]: content type, size limit, the memory budget of bodies, and JSON parsing.
//! - [`stream`]: a streamed answer forwarded as server-sent events, with its buffer, pace and keep-alives.
//! - [`stored`]: answers and job results too large for a NATS message, sent as they are read.
//! - [`routes`]: the handlers: OpenAI-compatible endpoints, Anthropic's Messages API, jobs.
//! - [`validate`]: checking each endpoint's body and a job's fields before anything is queued.
//! - [`publish`]: the request path's JetStream writes, repeated with backoff while the error may pass.
//! - [`state`]: what every handler shares.
//! - [`serve`]: the accept loop: connection limit, header deadline, graceful shutdown.
//! - [`admin`]: command-line administration (migrations, tenants, keys).
//! - [`metrics`]: every metric the ingress records.
//!
//! The request path touches NATS only: a JetStream publish that waits for its
//! acknowledgement, then the worker's answer on core NATS.

pub mod admin;
pub mod admin_api;
pub mod admission;
pub mod auth;
pub mod body;
pub mod idempotency;
pub mod kept;
pub mod metrics;
pub mod publish;
pub mod replies;
pub mod routes;
pub mod serve;
pub mod startup;
pub mod state;
pub mod stored;
pub mod stream;
pub mod validate;

pub use startup::Ingress;
