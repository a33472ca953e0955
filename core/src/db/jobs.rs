//! The job ledger: outcome events written in batches, and a tenant's job
//! history read back for `GET /v1/jobs`.

use sqlx::Row;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::DbError;
use crate::event::JobEvent;

/// Writes a batch of job events in one statement, one row per job. A status
/// never goes back in rank, and a terminal row never becomes another
/// terminal state (the first one stored wins; a `completed` row is not
/// touched again), so a redelivered event or a job that ran twice leaves one
/// record, in the state its client was told.
pub async fn record_events(db: &PgPool, events: &[JobEvent]) -> Result<(), DbError> {
    let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut ids = Vec::new();
    let mut tenants = Vec::new();
    let mut pools = Vec::new();
    let mut endpoints = Vec::new();
    let mut statuses = Vec::new();
    let mut attempts = Vec::new();
    let mut upstream = Vec::new();
    let mut prompt = Vec::new();
    let mut completion = Vec::new();
    let mut total = Vec::new();
    let mut codes = Vec::new();
    let mut messages = Vec::new();
    let mut request_ids = Vec::new();
    let mut submitted = Vec::new();
    let mut started = Vec::new();
    let mut finished = Vec::new();
    let mut metadata = Vec::new();
    let mut expires = Vec::new();
    let mut unanswered = Vec::new();
    for e in events {
        ids.push(e.job_id);
        tenants.push(e.tenant_id);
        pools.push(e.pool.as_str());
        endpoints.push(e.endpoint.as_str());
        statuses.push(e.status.as_str().to_owned());
        attempts.push(e.attempts);
        upstream.push(e.upstream_status);
        prompt.push(e.usage.prompt_tokens);
        completion.push(e.usage.completion_tokens);
        total.push(e.usage.total_tokens);
        codes.push(e.error_code.as_deref());
        // (a provider's message may hold a NUL, which text refuses)
        messages.push(e.error_message.as_deref().map(|m| m.replace('\0', "\u{fffd}")));
        request_ids.push(e.request_id.as_str());
        submitted.push(ms(e.submitted_ms));
        started.push(e.started_ms.map(ms));
        finished.push(e.finished_ms.map(ms));
        metadata.push(e.metadata.as_deref());
        expires.push(e.expires_ms.map(ms));
        unanswered.push(e.unanswered_calls);
    }
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, pool, endpoint, status, attempts, upstream_status,
                           prompt_tokens, completion_tokens, total_tokens, error_code, error_message,
                           request_id, submitted_at, started_at, finished_at, metadata, expires_at,
                           unanswered_calls)
         SELECT id, tenant_id, pool, endpoint, status, attempts, upstream_status,
                prompt_tokens, completion_tokens, total_tokens, error_code, error_message, request_id,
                to_timestamp(submitted / 1000.0), to_timestamp(started / 1000.0), to_timestamp(finished / 1000.0),
                metadata::jsonb, to_timestamp(expires / 1000.0), unanswered
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::int4[], $7::int4[],
                     $8::int4[], $9::int4[], $10::int4[], $11::text[], $12::text[], $13::text[],
                     $14::int8[], $15::int8[], $16::int8[], $17::text[], $18::int8[], $19::int4[])
              AS e(id, tenant_id, pool, endpoint, status, attempts, upstream_status, prompt_tokens,
                   completion_tokens, total_tokens, error_code, error_message, request_id,
                   submitted, started, finished, metadata, expires, unanswered)
         ON CONFLICT (id) DO UPDATE SET
             status = EXCLUDED.status,
             attempts = GREATEST(jobs.attempts, EXCLUDED.attempts),
             upstream_status = COALESCE(EXCLUDED.upstream_status, jobs.upstream_status),
             prompt_tokens = COALESCE(EXCLUDED.prompt_tokens, jobs.prompt_tokens),
             completion_tokens = COALESCE(EXCLUDED.completion_tokens, jobs.completion_tokens),
             total_tokens = COALESCE(EXCLUDED.total_tokens, jobs.total_tokens),
             error_code = COALESCE(EXCLUDED.error_code, jobs.error_code),
             error_message = COALESCE(EXCLUDED.error_message, jobs.error_message),
             request_id = COALESCE(NULLIF(jobs.request_id, ''), EXCLUDED.request_id),
             started_at = LEAST(jobs.started_at, EXCLUDED.started_at),
             finished_at = COALESCE(EXCLUDED.finished_at, jobs.finished_at),
             metadata = COALESCE(EXCLUDED.metadata, jobs.metadata),
             expires_at = COALESCE(EXCLUDED.expires_at, jobs.expires_at),
             unanswered_calls = GREATEST(jobs.unanswered_calls, EXCLUDED.unanswered_calls),
             recorded_at = now()
         WHERE jobs.status <> 'completed'
           AND (job_status_rank(jobs.status) < 2 OR EXCLUDED.status = jobs.status)
           AND job_status_rank(EXCLUDED.status) >= job_status_rank(jobs.status)",
    )
    .bind(ids)
    .bind(tenants)
    .bind(pools)
    .bind(endpoints)
    .bind(statuses)
    .bind(attempts)
    .bind(upstream)
    .bind(prompt)
    .bind(completion)
    .bind(total)
    .bind(codes)
    .bind(messages)
    .bind(request_ids)
    .bind(submitted)
    .bind(started)
    .bind(finished)
    .bind(metadata)
    .bind(expires)
    .bind(unanswered)
    .execute(db)
    .await?;
    Ok(())
}

/// Whether Postgres refused the data itself (SQLSTATE class 22, a data
/// exception such as a NUL character or a number out of range, or class
/// 23, an integrity violation): no retry of the same row can succeed.
pub fn refused_data(error: &DbError) -> bool {
    match error {
        DbError::Sql(sqlx::Error::Database(e)) => e.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
        _ => false,
    }
}

/// Keeps an event the ledger cannot store, with Postgres' error, in
/// `ledger_dead_letters` (as JSON text, which holds what jsonb refuses).
pub async fn park_event(db: &PgPool, event: &JobEvent, error: &str) -> Result<(), DbError> {
    let text = serde_json::to_string(event).unwrap_or_else(|e| format!("unserialisable event: {e}"));
    // (serde_json writes a NUL as the six characters `\u0000`; an error
    // message quoting the row may hold a raw one, which text refuses)
    let error = error.replace('\0', "\\u0000");
    sqlx::query("INSERT INTO ledger_dead_letters (job_id, tenant_id, event, error) VALUES ($1, $2, $3, $4)")
        .bind(event.job_id)
        .bind(event.tenant_id)
        .bind(text)
        .bind(error)
        .execute(db)
        .await?;
    Ok(())
}

/// The tenant's jobs from the ledger, newest first, after the cursor job
/// (`GET /v1/jobs`), as the API shows them.
pub async fn job_history(
    db: &PgPool,
    tenant: Uuid,
    after: Option<Uuid>,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<serde_json::Value>, DbError> {
    let rows = sqlx::query(
        "SELECT id, endpoint, pool, status, attempts,
                extract(epoch FROM submitted_at)::int8 AS created_at,
                extract(epoch FROM finished_at)::int8 AS finished_at,
                metadata::text AS metadata, error_code
         FROM jobs
         WHERE tenant_id = $1
           AND ($2::text IS NULL OR status = $2)
           AND ($3::uuid IS NULL OR (submitted_at, id) <
                (SELECT submitted_at, id FROM jobs WHERE id = $3 AND tenant_id = $1))
         ORDER BY submitted_at DESC, id DESC
         LIMIT $4",
    )
    .bind(tenant)
    .bind(status)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|r| {
            let metadata: Option<String> = r.try_get("metadata")?;
            Ok(serde_json::json!({
                "id": r.try_get::<Uuid, _>("id")?,
                "object": "job",
                "endpoint": r.try_get::<String, _>("endpoint")?,
                "model": r.try_get::<String, _>("pool")?,
                "status": r.try_get::<String, _>("status")?,
                "attempts": r.try_get::<i32, _>("attempts")?,
                "created_at": r.try_get::<i64, _>("created_at")?,
                "finished_at": r.try_get::<Option<i64>, _>("finished_at")?,
                "metadata": metadata.and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok()),
                "error_code": r.try_get::<Option<String>, _>("error_code")?,
            }))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(DbError::from)
}
