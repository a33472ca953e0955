//! Every metric the worker records, described once.

pub const JOBS: &str = "sluice_worker_jobs_total";
pub const JOB_SECONDS: &str = "sluice_worker_job_duration_seconds";
pub const QUEUE_WAIT_SECONDS: &str = "sluice_worker_queue_wait_seconds";
pub const UPSTREAM_SECONDS: &str = "sluice_worker_upstream_duration_seconds";
pub const UPSTREAM_REQUESTS: &str = "sluice_worker_upstream_requests_total";
pub const UPSTREAM_TOKENS: &str = "sluice_worker_upstream_tokens_total";
pub const BREAKER_STATE: &str = "sluice_worker_upstream_breaker_state";
pub const BUDGET_REMAINING: &str = "sluice_worker_upstream_budget_remaining";
pub const POOL_PAUSED: &str = "sluice_worker_pool_paused_total";
pub const UPSTREAM_FAILURES: &str = "sluice_worker_upstream_failures_total";
pub const RETRIES: &str = "sluice_worker_retries_total";
pub const IN_FLIGHT: &str = "sluice_worker_jobs_in_flight";
pub const FETCH_ERRORS: &str = "sluice_worker_fetch_errors_total";
pub const POISON: &str = "sluice_worker_poison_messages_total";
pub const EVENT_PUBLISH_FAILURES: &str = "sluice_worker_event_publish_failures_total";
pub const LEDGER_WRITES: &str = "sluice_ledger_events_written_total";
pub const LEDGER_BATCH_SECONDS: &str = "sluice_ledger_batch_duration_seconds";
pub const LEDGER_FAILURES: &str = "sluice_ledger_write_failures_total";
pub const LEDGER_PARKED: &str = "sluice_ledger_parked_events_total";
pub const WEBHOOK_ATTEMPTS: &str = "sluice_webhook_attempts_total";
pub const WEBHOOK_FAILURES: &str = "sluice_webhook_internal_failures_total";
pub const SERVED_TOKENS: &str = "sluice_worker_served_tokens_total";
pub const TENANT_IN_FLIGHT: &str = "sluice_worker_tenant_jobs_in_flight";
pub const QUEUED: &str = "sluice_queue_jobs";
pub const CONSUMERS_CREATED: &str = "sluice_worker_queue_consumers_created_total";
pub const COUNTER_FAILURES: &str = "sluice_worker_counter_failures_total";
pub const COUNTER_REPAIRS: &str = "sluice_worker_counter_repairs_total";
pub const ANSWER_MEMORY: &str = "sluice_worker_answer_memory_bytes";
pub const ANSWER_BUDGET_WAITS: &str = "sluice_worker_answer_budget_waits_total";
pub const RUNS_LOST: &str = "sluice_worker_runs_lost_total";
pub const EVENTS_RECORDED_AGAIN: &str = "sluice_worker_events_recorded_again_total";
pub const DUPLICATES_DROPPED: &str = "sluice_worker_duplicate_messages_dropped_total";
pub const STATE_NOT_FOUND: &str = "sluice_worker_job_state_not_found_total";
pub const UNANSWERED_CALLS: &str = "sluice_worker_unanswered_calls_total";
pub const SYNC_OUTCOMES_STORED: &str = "sluice_worker_sync_outcomes_stored_total";

pub fn describe() {
    sluice_core::group_commit::describe();
    sluice_core::bodies::describe();
    metrics::describe_counter!(JOBS, "jobs finished, by pool, tenant and outcome (completed, failed, expired)");
    metrics::describe_histogram!(JOB_SECONDS, metrics::Unit::Seconds, "time a worker spent on a job, by pool");
    metrics::describe_histogram!(
        QUEUE_WAIT_SECONDS,
        metrics::Unit::Seconds,
        "submit until a worker took the job, by pool and tenant"
    );
    metrics::describe_counter!(SERVED_TOKENS, "tokens served (the upstream's usage), by pool and tenant");
    metrics::describe_gauge!(TENANT_IN_FLIGHT, "jobs this worker is executing, by pool and tenant");
    metrics::describe_gauge!(
        QUEUED,
        "jobs in the queue (waiting or running), by pool, class and tenant, as of the last discovery"
    );
    metrics::describe_counter!(CONSUMERS_CREATED, "tenant queue consumers this worker created or bound");
    metrics::describe_counter!(COUNTER_FAILURES, "admission counter updates that failed and were retried");
    metrics::describe_counter!(COUNTER_REPAIRS, "queued-jobs counts found drifted and set to the truth");
    metrics::describe_histogram!(
        UPSTREAM_SECONDS,
        metrics::Unit::Seconds,
        "upstream call duration, by pool and deployment"
    );
    metrics::describe_counter!(
        UPSTREAM_REQUESTS,
        "upstream calls by pool, deployment and outcome (ok, rejected, rate_limited, error, deadline)"
    );
    metrics::describe_counter!(UPSTREAM_TOKENS, "tokens the upstream reported used, by pool and deployment");
    metrics::describe_gauge!(BREAKER_STATE, "circuit breaker of each deployment: 0 closed, 1 half-open, 2 open");
    metrics::describe_gauge!(
        BUDGET_REMAINING,
        "budget left in the current window, by pool, deployment and kind (requests, tokens, provider_requests)"
    );
    metrics::describe_counter!(POOL_PAUSED, "times the fetch loop found a pool out of budget or unhealthy, by pool");
    metrics::describe_counter!(UPSTREAM_FAILURES, "failed upstream calls, by pool and reason");
    metrics::describe_counter!(
        RETRIES,
        "retries by pool and kind (failover to another deployment, requeue, denied by the retry budget)"
    );
    metrics::describe_gauge!(IN_FLIGHT, "jobs this worker is executing");
    metrics::describe_counter!(FETCH_ERRORS, "failed pull requests to JetStream");
    metrics::describe_gauge!(
        ANSWER_MEMORY,
        "bytes of upstream.max_response_memory_bytes held by answers being read or sent on"
    );
    metrics::describe_counter!(
        ANSWER_BUDGET_WAITS,
        "answers that waited for room in upstream.max_response_memory_bytes before being read"
    );
    metrics::describe_counter!(
        SYNC_OUTCOMES_STORED,
        "synchronous jobs whose client was no longer waiting (the ingress answered 504, or its client left) whose outcome the worker stored as the job's state, by result (stored, failed)"
    );
    metrics::describe_counter!(
        RUNS_LOST,
        "runs whose asynchronous job a redelivery took over while they called (stalled past ack_wait); nothing of theirs was recorded"
    );
    metrics::describe_counter!(
        UNANSWERED_CALLS,
        "upstream calls that timed out or broke off after the request was sent (the provider may have done and billed the work), by pool and deployment"
    );
    metrics::describe_counter!(
        EVENTS_RECORDED_AGAIN,
        "terminal job events recorded from the job's stored state by a redelivery (the run that ended the job could not record its event, or its ack was lost)"
    );
    metrics::describe_counter!(
        DUPLICATES_DROPPED,
        "job messages dropped without a run because another message of the same job (a publish repeated past the duplicate window) runs it, by the job's status then"
    );
    metrics::describe_counter!(
        STATE_NOT_FOUND,
        "asynchronous jobs whose state was not found while it could not have expired, handed back to be read again"
    );
    metrics::describe_counter!(POISON, "job messages that could not be decoded and were terminated");
    metrics::describe_counter!(EVENT_PUBLISH_FAILURES, "job events that could not be published to the events stream");
    metrics::describe_counter!(LEDGER_WRITES, "job events written to Postgres");
    metrics::describe_histogram!(LEDGER_BATCH_SECONDS, metrics::Unit::Seconds, "time to write one ledger batch");
    metrics::describe_counter!(LEDGER_FAILURES, "ledger batches that failed to write and were retried");
    metrics::describe_counter!(
        LEDGER_PARKED,
        "job events Postgres refused for their data, kept in ledger_dead_letters instead of the jobs table"
    );
    metrics::describe_counter!(WEBHOOK_ATTEMPTS, "webhook delivery attempts, by resulting delivery status");
    metrics::describe_counter!(
        WEBHOOK_FAILURES,
        "webhook failures of Sluice's own, by reason: enqueue, record (Postgres), secret (a signing secret that does not open)"
    );
}
