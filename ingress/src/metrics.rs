//! Every metric the ingress records, described once.

use std::time::Duration;

pub const REQUESTS: &str = "sluice_ingress_requests_total";
pub const REQUEST_SECONDS: &str = "sluice_ingress_request_duration_seconds";
pub const PUBLISH_SECONDS: &str = "sluice_ingress_publish_duration_seconds";
pub const REJECTED: &str = "sluice_ingress_rejected_total";
pub const IN_FLIGHT: &str = "sluice_ingress_sync_in_flight";
pub const AUTH_KEYS: &str = "sluice_ingress_auth_keys";
pub const AUTH_REFRESH_FAILURES: &str = "sluice_ingress_auth_refresh_failures_total";
pub const ORPHAN_REPLIES: &str = "sluice_ingress_orphan_replies_total";
pub const ADMISSION_REJECTED: &str = "sluice_ingress_admission_rejected_total";
pub const ADMISSION_ERRORS: &str = "sluice_ingress_admission_errors_total";
pub const STREAMS_INTERRUPTED: &str = "sluice_ingress_streams_interrupted_total";
pub const CONNECTIONS: &str = "sluice_ingress_connections";
pub const PUBLISH_RETRIES: &str = "sluice_ingress_publish_retries_total";
pub const CONNECTIONS_REFUSED: &str = "sluice_ingress_connections_refused_total";
pub const BODY_BUDGET_REFUSED: &str = "sluice_ingress_body_budget_refused_total";
pub const AUTH_STALE_REFUSED: &str = "sluice_ingress_auth_stale_refused_total";
pub const WRITE_TIMEOUTS: &str = "sluice_ingress_write_timeouts_total";
pub const STREAMS_OPEN: &str = "sluice_ingress_streams_open";
pub const STORED_ANSWERS_KEPT: &str = "sluice_ingress_stored_answers_kept_total";

pub fn describe() {
    sluice_core::group_commit::describe();
    sluice_core::bodies::describe();
    metrics::describe_counter!(
        AUTH_STALE_REFUSED,
        "requests refused with 503 because the API-key snapshot is older than ingress.auth_max_staleness_ms"
    );
    metrics::describe_counter!(WRITE_TIMEOUTS, "connections closed because the client stopped reading");
    metrics::describe_gauge!(STREAMS_OPEN, "streamed answers being sent (counted in ingress.max_in_flight)");
    metrics::describe_counter!(
        STORED_ANSWERS_KEPT,
        "large synchronous answers whose client left mid-body, kept as the job's result"
    );
    metrics::describe_counter!(
        BODY_BUDGET_REFUSED,
        "requests refused with 429 because request bodies held ingress.max_body_memory_bytes"
    );
    metrics::describe_counter!(REQUESTS, "HTTP requests answered, by route template and status code");
    metrics::describe_gauge!(CONNECTIONS, "open client connections");
    metrics::describe_counter!(
        PUBLISH_RETRIES,
        "job publishes repeated (no stream leader, late acknowledgement), by reason"
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "client connections closed at accept, by reason (max_connections, accept_error)"
    );
    metrics::describe_histogram!(REQUEST_SECONDS, metrics::Unit::Seconds, "time to answer, by route template");
    metrics::describe_histogram!(PUBLISH_SECONDS, metrics::Unit::Seconds, "JetStream publish until acknowledged");
    metrics::describe_counter!(REJECTED, "requests refused or failed, by error code");
    metrics::describe_gauge!(IN_FLIGHT, "synchronous requests waiting for their answer");
    metrics::describe_gauge!(AUTH_KEYS, "live API keys in the auth cache");
    metrics::describe_counter!(AUTH_REFRESH_FAILURES, "failed reloads of the API-key cache from Postgres");
    metrics::describe_counter!(ORPHAN_REPLIES, "worker answers that arrived after their request gave up");
    metrics::describe_counter!(
        ADMISSION_REJECTED,
        "requests refused by a tenant limit, by tenant name and reason (rate_limit_requests, rate_limit_tokens, queued_jobs_limit)"
    );
    metrics::describe_counter!(ADMISSION_ERRORS, "admission counter updates that failed (NATS unreachable)");
    metrics::describe_counter!(
        STREAMS_INTERRUPTED,
        "streamed answers ended with an error event, by reason (gap, restarted, upstream)"
    );
}

pub fn answered(route: &'static str, status: u16, elapsed: Duration) {
    metrics::counter!(REQUESTS, "route" => route, "status" => status.to_string()).increment(1);
    metrics::histogram!(REQUEST_SECONDS, "route" => route).record(elapsed.as_secs_f64());
}

pub fn rejected(code: sluice_core::error::ErrorCode) {
    metrics::counter!(REJECTED, "reason" => code.as_str()).increment(1);
}
