//! Everything that crosses NATS between Sluice's processes, typed: built and
//! parsed here and nowhere else.
//!
//! - [`subjects`]: every subject, and the streams behind key-value buckets.
//! - [`envelope`]: the job a worker executes (NATS headers plus the client's body).
//! - [`reply`]: the worker's answer to a waiting ingress (an answer or a stream's chunk).
//! - [`stored`]: the reference a message carries instead of a body too large for it.

pub mod envelope;
pub mod reply;
pub mod stored;
pub mod subjects;
