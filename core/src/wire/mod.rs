//! Everything that crosses NATS between Sluice's processes, typed: built and
//! parsed here and nowhere else.
//!
//! - [`subjects`]: every subject, and the streams behind key-value buckets.
//! - [`envelope`]: the job a worker executes (NATS headers plus the client's body).
//! - [`reply`]: the worker's answer to a waiting ingress (an answer or a stream's chunk).

pub mod envelope;
pub mod reply;
pub mod subjects;
