//! Webhook endpoints (a tenant's default target and its signing secrets),
//! deliveries (one per finished job with a target; its id is the
//! `webhook-id` of every attempt) and their attempts.

use std::collections::HashMap;

use sqlx::Row;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::DbError;

/// How long the previous secret keeps signing after an endpoint's secret is rotated.
pub const ROTATION_OVERLAP: &str = "24 hours";

/// Sets the tenant's default endpoint with a new secret. Set again, it
/// rotates: the previous secret keeps signing (a second signature) for
/// [`ROTATION_OVERLAP`], and a disabled endpoint is enabled again.
pub async fn set_endpoint(db: &PgPool, tenant: Uuid, url: &str, secret: &str) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO webhook_endpoints (tenant_id, url, secret) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id) DO UPDATE SET url = EXCLUDED.url, secret = EXCLUDED.secret, disabled_at = NULL,
             previous_secret = webhook_endpoints.secret,
             previous_expires_at = now() + $4::interval",
    )
    .bind(tenant)
    .bind(url)
    .bind(secret)
    .bind(ROTATION_OVERLAP)
    .execute(db)
    .await?;
    Ok(())
}

/// The enabled default endpoints of these tenants: their URL and signing
/// secrets (during a rotation the previous one too, space-separated, until
/// it expires).
pub async fn endpoints(db: &PgPool, tenants: &[Uuid]) -> Result<HashMap<Uuid, (String, String)>, DbError> {
    let mut found = HashMap::new();
    if tenants.is_empty() {
        return Ok(found);
    }
    let rows = sqlx::query(
        "SELECT tenant_id, url, secret || CASE WHEN previous_secret IS NOT NULL AND previous_expires_at > now()
                                               THEN ' ' || previous_secret ELSE '' END AS secret
         FROM webhook_endpoints WHERE tenant_id = ANY($1) AND disabled_at IS NULL",
    )
    .bind(tenants)
    .fetch_all(db)
    .await?;
    for row in rows {
        found.insert(row.try_get("tenant_id")?, (row.try_get("url")?, row.try_get("secret")?));
    }
    Ok(found)
}

/// A delivery to record, pending its first attempt.
pub struct NewDelivery {
    pub id: String,
    pub job_id: Uuid,
    pub tenant_id: Uuid,
    pub event_type: &'static str,
    pub url: String,
    pub secret: String,
    /// Sent to the tenant's default endpoint (which a 410 disables).
    pub tenant_endpoint: bool,
    pub payload: String,
}

/// Records the deliveries in one statement; one already recorded (same id)
/// is left as it is.
pub async fn insert_deliveries(db: &PgPool, deliveries: Vec<NewDelivery>) -> Result<(), DbError> {
    if deliveries.is_empty() {
        return Ok(());
    }
    let n = deliveries.len();
    let (mut ids, mut jobs, mut owners, mut kinds) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut urls, mut secrets, mut tenant_endpoints, mut payloads) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for d in deliveries {
        ids.push(d.id);
        jobs.push(d.job_id);
        owners.push(d.tenant_id);
        kinds.push(d.event_type);
        urls.push(d.url);
        secrets.push(d.secret);
        tenant_endpoints.push(d.tenant_endpoint);
        payloads.push(d.payload);
    }
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, job_id, tenant_id, event_type, url, secret, tenant_endpoint, payload, status)
         SELECT id, job_id, tenant_id, event_type, url, secret, tenant_endpoint, payload, 'pending'
         FROM UNNEST($1::text[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::bool[], $8::text[])
              AS d(id, job_id, tenant_id, event_type, url, secret, tenant_endpoint, payload)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(ids)
    .bind(jobs)
    .bind(owners)
    .bind(kinds)
    .bind(urls)
    .bind(secrets)
    .bind(tenant_endpoints)
    .bind(payloads)
    .execute(db)
    .await?;
    Ok(())
}

/// A delivery claimed for an attempt.
pub struct Due {
    pub id: String,
    pub tenant_id: Uuid,
    pub url: String,
    pub secret: String,
    pub payload: String,
    pub attempts: i32,
    pub tenant_endpoint: bool,
}

/// Claims up to `limit` due deliveries (`FOR UPDATE SKIP LOCKED`, so
/// workers share them) and reserves each for `lease_ms`: a worker that dies
/// mid-attempt leaves it to another after that.
pub async fn claim_deliveries(
    db: &PgPool,
    limit: i64,
    lease_ms: i64,
    per_tenant: i64,
    skip_tenants: &[Uuid],
) -> Result<Vec<Due>, DbError> {
    // Tenants by their oldest due delivery, at most `per_tenant` each: one
    // tenant's backlog cannot take every slot from the others.
    let rows = sqlx::query(
        "UPDATE webhook_deliveries SET next_attempt_at = now() + $2 * interval '1 millisecond'
         WHERE id IN (
             SELECT d.id
             FROM (SELECT tenant_id, min(next_attempt_at) AS oldest FROM webhook_deliveries
                   WHERE status = 'pending' AND next_attempt_at <= now() AND tenant_id <> ALL($4)
                   GROUP BY tenant_id ORDER BY oldest LIMIT $1) t
             CROSS JOIN LATERAL (
                 SELECT id FROM webhook_deliveries w
                 WHERE w.tenant_id = t.tenant_id AND w.status = 'pending' AND w.next_attempt_at <= now()
                 ORDER BY w.next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) d
             LIMIT $1)
         RETURNING id, tenant_id, url, secret, payload, attempts, tenant_endpoint",
    )
    .bind(limit)
    .bind(lease_ms)
    .bind(per_tenant)
    .bind(skip_tenants)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Due {
                id: r.try_get("id")?,
                tenant_id: r.try_get("tenant_id")?,
                url: r.try_get("url")?,
                secret: r.try_get("secret")?,
                payload: r.try_get("payload")?,
                attempts: r.try_get("attempts")?,
                tenant_endpoint: r.try_get("tenant_endpoint")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(DbError::from)
}

/// Hands claimed deliveries back at once (their tenant was at its share).
pub async fn release_deliveries(db: &PgPool, ids: &[String]) -> Result<(), DbError> {
    sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE id = ANY($1) AND status = 'pending'")
        .bind(ids)
        .execute(db)
        .await?;
    Ok(())
}

/// One attempt's outcome, as recorded.
pub struct AttemptRecord<'a> {
    pub delivery: &'a Due,
    pub attempt: i32,
    pub response_status: Option<i32>,
    pub error: Option<&'a str>,
    pub latency_ms: i32,
    /// The delivery's status after it: `delivered`, `gone`, `pending` or `failed`.
    pub status: &'static str,
    /// When the next attempt is due, for a `pending` delivery.
    pub next_in_ms: Option<i64>,
    /// The endpoint answered 410 Gone: a tenant endpoint is disabled.
    pub disable_endpoint: bool,
}

/// Records an attempt and the delivery's new status in one transaction.
pub async fn record_attempt(db: &PgPool, a: &AttemptRecord<'_>) -> Result<(), DbError> {
    let d = a.delivery;
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO webhook_attempts (delivery_id, attempt, response_status, error, latency_ms, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, now() + $6 * interval '1 millisecond')",
    )
    .bind(&d.id)
    .bind(a.attempt)
    .bind(a.response_status)
    .bind(a.error)
    .bind(a.latency_ms)
    .bind(a.next_in_ms)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE webhook_deliveries SET status = $2, attempts = $3, last_status = $4,
             next_attempt_at = COALESCE(now() + $5 * interval '1 millisecond', next_attempt_at),
             delivered_at = CASE WHEN $2 = 'delivered' THEN now() ELSE delivered_at END
         WHERE id = $1",
    )
    .bind(&d.id)
    .bind(a.status)
    .bind(a.attempt)
    .bind(a.response_status)
    .bind(a.next_in_ms)
    .execute(&mut *tx)
    .await?;
    if a.disable_endpoint && d.tenant_endpoint {
        sqlx::query("UPDATE webhook_endpoints SET disabled_at = now() WHERE tenant_id = $1 AND url = $2")
            .bind(d.tenant_id)
            .bind(&d.url)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Schedules a job's webhook delivery again from a fresh retry schedule
/// (`POST /v1/jobs/{id}/webhook/redeliver`); a delivery still being
/// attempted is left alone. The statuses of the job's deliveries, `reset`
/// for those rescheduled; empty when the job has none.
pub async fn redeliver_webhook(db: &PgPool, job: Uuid, tenant: Uuid) -> Result<Vec<String>, DbError> {
    let statuses = sqlx::query_scalar(
        "WITH reset AS (
             UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now()
             WHERE job_id = $1 AND tenant_id = $2 AND status <> 'pending' RETURNING id)
         SELECT CASE WHEN id IN (SELECT id FROM reset) THEN 'reset' ELSE status END
         FROM webhook_deliveries WHERE job_id = $1 AND tenant_id = $2",
    )
    .bind(job)
    .bind(tenant)
    .fetch_all(db)
    .await?;
    Ok(statuses)
}
