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

/// Sets the tenant's default endpoint with a new secret, `sealed` for the
/// tenant (`seal::endpoint_place`). Set again, it rotates: the previous
/// secret keeps signing (a second signature) for [`ROTATION_OVERLAP`], and a
/// disabled endpoint is enabled again.
pub async fn set_endpoint(db: &PgPool, tenant: Uuid, url: &str, sealed: &str) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO webhook_endpoints (tenant_id, url, secret) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id) DO UPDATE SET url = EXCLUDED.url, secret = EXCLUDED.secret, disabled_at = NULL,
             previous_secret = webhook_endpoints.secret,
             previous_expires_at = now() + $4::interval",
    )
    .bind(tenant)
    .bind(url)
    .bind(sealed)
    .bind(ROTATION_OVERLAP)
    .execute(db)
    .await?;
    Ok(())
}

/// The tenants among these that have an enabled default endpoint. Their
/// deliveries carry no secret: it is looked up when each attempt is sent.
pub async fn with_endpoints(db: &PgPool, tenants: &[Uuid]) -> Result<HashMap<Uuid, String>, DbError> {
    let mut found = HashMap::new();
    if tenants.is_empty() {
        return Ok(found);
    }
    let rows =
        sqlx::query("SELECT tenant_id, url FROM webhook_endpoints WHERE tenant_id = ANY($1) AND disabled_at IS NULL")
            .bind(tenants)
            .fetch_all(db)
            .await?;
    for row in rows {
        found.insert(row.try_get("tenant_id")?, row.try_get("url")?);
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
    /// A per-job webhook's own secret, sealed for its job; none for the
    /// tenant's endpoint (its secrets are looked up at each attempt).
    pub secret: Option<String>,
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
    let (mut urls, mut secrets, mut tenant_endpoints, mut payloads): (_, Vec<Option<String>>, _, _) =
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
    pub job_id: Uuid,
    pub tenant_id: Uuid,
    /// Where it goes: for the tenant's endpoint, the endpoint's URL now.
    pub url: String,
    /// The sealed secret that signs: the job's own, or the tenant
    /// endpoint's current one (none when the endpoint was removed).
    pub secret: Option<String>,
    /// During a rotation of the tenant's endpoint, its previous secret.
    pub previous_secret: Option<String>,
    pub payload: String,
    pub attempts: i32,
    pub tenant_endpoint: bool,
}

/// Claims up to `limit` due deliveries (`FOR UPDATE SKIP LOCKED`, so
/// workers share them) and reserves each for `lease_ms`: a worker that dies
/// mid-attempt leaves it to another after that. A delivery to a tenant's
/// endpoint comes with the endpoint's URL and secrets as they are now.
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
        "WITH claimed AS (
         UPDATE webhook_deliveries SET next_attempt_at = now() + $2 * interval '1 millisecond'
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
         RETURNING id, job_id, tenant_id, url, secret, payload, attempts, tenant_endpoint)
         SELECT c.id, c.job_id, c.tenant_id, c.payload, c.attempts, c.tenant_endpoint,
                CASE WHEN c.tenant_endpoint THEN COALESCE(e.url, c.url) ELSE c.url END AS url,
                CASE WHEN c.tenant_endpoint THEN e.secret ELSE c.secret END AS secret,
                CASE WHEN c.tenant_endpoint AND e.previous_expires_at > now() THEN e.previous_secret END
                    AS previous_secret
         FROM claimed c LEFT JOIN webhook_endpoints e ON c.tenant_endpoint AND e.tenant_id = c.tenant_id",
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
                job_id: r.try_get("job_id")?,
                tenant_id: r.try_get("tenant_id")?,
                url: r.try_get("url")?,
                secret: r.try_get("secret")?,
                previous_secret: r.try_get("previous_secret")?,
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

/// An endpoint whose secrets are not all sealed with the current key (in
/// clear from before sealing, or under a key being rotated out).
pub struct UnsealedEndpoint {
    pub tenant: Uuid,
    pub secret: String,
    pub previous: Option<String>,
}

/// Up to `limit` such endpoints, after tenant `after` (a cursor, nil first).
pub async fn unsealed_endpoints(
    db: &PgPool,
    current: &str,
    after: Uuid,
    limit: i64,
) -> Result<Vec<UnsealedEndpoint>, DbError> {
    let rows = sqlx::query(
        "SELECT tenant_id, secret, previous_secret FROM webhook_endpoints
         WHERE (NOT starts_with(secret, $1) OR NOT starts_with(previous_secret, $1)) AND tenant_id > $2
         ORDER BY tenant_id LIMIT $3",
    )
    .bind(format!("sealed:v1:{current}:"))
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(UnsealedEndpoint {
                tenant: r.try_get("tenant_id")?,
                secret: r.try_get("secret")?,
                previous: r.try_get("previous_secret")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(DbError::from)
}

/// Up to `limit` deliveries whose (per-job) secret is not sealed with the
/// current key, after delivery id `after` (a cursor, empty first): id, job, secret.
pub async fn unsealed_deliveries(
    db: &PgPool,
    current: &str,
    after: &str,
    limit: i64,
) -> Result<Vec<(String, Uuid, String)>, DbError> {
    let rows = sqlx::query_as(
        "SELECT id, job_id, secret FROM webhook_deliveries WHERE NOT starts_with(secret, $1) AND id > $2
         ORDER BY id LIMIT $3",
    )
    .bind(format!("sealed:v1:{current}:"))
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows)
}

/// Replaces an endpoint's secrets by their resealed forms, if they are
/// still what was read (another worker may have resealed them first).
pub async fn replace_endpoint_secrets(
    db: &PgPool,
    tenant: Uuid,
    read: (&str, Option<&str>),
    sealed: (&str, Option<&str>),
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE webhook_endpoints SET secret = $4, previous_secret = $5
         WHERE tenant_id = $1 AND secret = $2 AND previous_secret IS NOT DISTINCT FROM $3",
    )
    .bind(tenant)
    .bind(read.0)
    .bind(read.1)
    .bind(sealed.0)
    .bind(sealed.1)
    .execute(db)
    .await?;
    Ok(())
}

/// Replaces a delivery's secret by its resealed form, if it is still what was read.
pub async fn replace_delivery_secret(db: &PgPool, id: &str, read: &str, sealed: &str) -> Result<(), DbError> {
    sqlx::query("UPDATE webhook_deliveries SET secret = $3 WHERE id = $1 AND secret = $2")
        .bind(id)
        .bind(read)
        .bind(sealed)
        .execute(db)
        .await?;
    Ok(())
}

/// What [`reseal`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resealed {
    /// Secrets sealed again with the current key.
    pub sealed: usize,
    /// Secrets that would not open (sealed under a key not in the keyring,
    /// or corrupted): left as they are, and their deliveries fail.
    pub unopenable: usize,
}

/// Seals every stored secret that is not sealed with the keyring's current
/// key (one in clear from before sealing, or under a key being rotated
/// out) with it. Workers run this at start; concurrent runs are harmless
/// (each replacement is conditional on the value read).
pub async fn reseal(db: &PgPool, keys: &crate::seal::Keyring) -> Result<Resealed, DbError> {
    use crate::seal;
    const PAGE: i64 = 500;
    let mut done = Resealed::default();
    let mut after = Uuid::nil();
    loop {
        let page = unsealed_endpoints(db, keys.current(), after, PAGE).await?;
        for e in &page {
            after = e.tenant;
            let place = seal::endpoint_place(e.tenant);
            let again = |stored: &str| keys.open(&place, stored).and_then(|clear| keys.seal(&place, &clear));
            // Each secret on its own: a previous secret that does not open
            // (it may long have expired) does not keep the current one unsealed.
            let current = again(&e.secret);
            let previous = e.previous.as_deref().map(|p| (p, again(p)));
            for error in
                [current.as_ref().err(), previous.as_ref().and_then(|(_, r)| r.as_ref().err())].into_iter().flatten()
            {
                tracing::warn!(tenant = %e.tenant, %error, "a webhook endpoint's secret does not open");
                done.unopenable += 1;
            }
            let secret = current.as_deref().unwrap_or(&e.secret).to_owned();
            let kept_previous = previous.as_ref().map(|(read, r)| r.as_deref().unwrap_or(read).to_owned());
            let changed = usize::from(current.is_ok()) + previous.as_ref().map_or(0, |(_, r)| usize::from(r.is_ok()));
            if changed > 0 {
                let read = (e.secret.as_str(), e.previous.as_deref());
                replace_endpoint_secrets(db, e.tenant, read, (&secret, kept_previous.as_deref())).await?;
                done.sealed += changed;
            }
        }
        if (page.len() as i64) < PAGE {
            break;
        }
    }
    let mut after = String::new();
    loop {
        let page = unsealed_deliveries(db, keys.current(), &after, PAGE).await?;
        for (id, job, stored) in &page {
            after.clone_from(id);
            let place = seal::job_place(*job);
            match keys.open(&place, stored).and_then(|clear| keys.seal(&place, &clear)) {
                Ok(sealed) => {
                    replace_delivery_secret(db, id, stored, &sealed).await?;
                    done.sealed += 1;
                }
                Err(error) => {
                    tracing::warn!(delivery = %id, %error, "a webhook delivery's secret does not open");
                    done.unopenable += 1;
                }
            }
        }
        if (page.len() as i64) < PAGE {
            break;
        }
    }
    Ok(done)
}
