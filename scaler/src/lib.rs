//! Sluice's KEDA external scaler.
//!
//! KEDA asks it, over gRPC (`externalscaler.ExternalScaler`, exactly as KEDA
//! defines it), whether a worker pool has work and how much. The answer is
//! Sluice's real backlog: the jobs queued or running in the pool's tenant
//! queues, read from the jobs stream's per-subject counts (answered by the
//! stream leader, so never stale on a follower), optionally for one tenant,
//! optionally capped at what the pool's provider rate limits can absorb,
//! and raised to a scheduled minimum during known peaks.
//!
//! - [`snapshot`]: the backlog, refreshed in the background; wake-ups of idle pools.
//! - [`selection`]: what a ScaledObject's metadata asks to measure.
//! - [`service`]: the four RPCs.
//! - [`server`]: connecting NATS, the background tasks, the gRPC and ops listeners.
//! - [`proto`]: KEDA's messages and the generated server and client.

pub mod proto;
pub mod selection;
pub mod server;
pub mod service;
pub mod snapshot;

pub use service::Scaler;
