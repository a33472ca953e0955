//! The ingress: listeners, body and memory limits, timeouts, streams, and
//! the API-key cache.

use std::net::SocketAddr;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    pub listen: SocketAddr,
    /// Address of `/metrics`, `/healthz` and `/readyz`, off the public
    /// listener (`/metrics` names tenants in its labels); none: no
    /// `/metrics` (the public listener still answers `/healthz`, `/readyz`).
    pub ops_listen: Option<SocketAddr>,
    /// Largest request body accepted; larger ones get 413. A body larger
    /// than a NATS message is kept in the bodies bucket (`nats.bodies_bucket`).
    pub max_body_bytes: usize,
    /// Memory all request bodies being read or queued may hold at once in
    /// one ingress; a body that does not fit gets 429 before it is read.
    pub max_body_memory_bytes: usize,
    /// How long a synchronous request waits for its answer before 504
    /// (10 minutes, as the official SDKs wait; a long non-streamed
    /// generation takes minutes). Past it the request goes on as a job.
    pub sync_timeout_ms: u64,
    /// Synchronous requests waiting at once in one ingress; beyond it, 429.
    pub max_in_flight: usize,
    /// How often the API-key cache is reloaded from Postgres; a revoked key
    /// stops working within this bound.
    pub auth_refresh_ms: u64,
    /// How long the last loaded keys are trusted while reloads fail; past
    /// it every request gets 503 (fails closed). 0: trusted forever.
    pub auth_max_staleness_ms: u64,
    /// After SIGTERM, how long the ingress keeps serving with `/readyz`
    /// answering 503 and every answer carrying `Connection: close`, so that
    /// load balancers stop sending it requests and clients drop their
    /// keep-alive connections before its listener closes. 0: none.
    pub drain_ms: u64,
    /// Time given to in-flight requests after the drain, once the listener
    /// has closed.
    pub shutdown_grace_ms: u64,
    /// Open client connections at once; a connection past the limit is
    /// closed as soon as it is accepted.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (also the idle limit
    /// of a keep-alive connection between requests).
    pub header_timeout_ms: u64,
    /// Time a client has to send a request's body (408 past it).
    pub body_timeout_ms: u64,
    /// Longest a write to a client may wait for the client to read; past
    /// it the connection is closed (a stream's client that stopped reading).
    pub write_timeout_ms: u64,
    /// Chunks of a streamed answer held for a client that reads slower than
    /// the provider writes; beyond it the stream is cut off.
    pub stream_buffer_chunks: usize,
    /// The same bound in bytes (a provider sending large events).
    pub stream_buffer_bytes: usize,
    /// Longest wait for a stream's next chunk before it is ended with a
    /// `stream_interrupted` error.
    pub stream_chunk_gap_ms: u64,
    /// A stream waiting for its next chunk sends an SSE comment this often,
    /// so that proxies do not cut a long pause as idle.
    pub stream_keepalive_ms: u64,
    /// How long a job's publish is repeated while the jobs stream has no
    /// leader or its acknowledgement is late, before the client gets a 503.
    /// 0: no repeat.
    pub publish_retry_ms: u64,
    /// How long a synchronous request waits for the ingress's NATS
    /// connection to come back (a node restarting, the client moving to
    /// another) before it gets a 503. 0: a 503 at once.
    pub reconnect_wait_ms: u64,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ops_listen: None,
            max_body_bytes: 32 * 1024 * 1024,
            max_body_memory_bytes: 128 * 1024 * 1024,
            sync_timeout_ms: 600_000,
            max_in_flight: 10_000,
            auth_refresh_ms: 5_000,
            auth_max_staleness_ms: 300_000,
            drain_ms: 2_000,
            shutdown_grace_ms: 25_000,
            max_connections: 10_000,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            stream_buffer_chunks: 256,
            stream_buffer_bytes: 1024 * 1024,
            stream_chunk_gap_ms: 60_000,
            stream_keepalive_ms: 15_000,
            publish_retry_ms: 10_000,
            reconnect_wait_ms: 2_000,
        }
    }
}
