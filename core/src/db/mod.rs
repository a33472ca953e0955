//! Postgres, Sluice's one storage module: the pool, the embedded
//! migrations, tenants and API keys here; the job ledger in [`jobs`];
//! webhook endpoints, deliveries and attempts in [`webhooks`]. No other
//! module writes SQL.
//!
//! API keys are random 192-bit tokens shown once at creation; only their
//! SHA-256 digest is stored. A slow password hash would add nothing for keys
//! of that entropy, and a digest lets the ingress look a key up in memory.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Row, SqlSafeStr};
use uuid::Uuid;

use crate::config::DatabaseConfig;

pub mod jobs;
pub mod webhooks;

pub use jobs::job_history;
pub use webhooks::redeliver_webhook;

/// Prefix of every Sluice API key, so that secret scanners can find leaked ones.
pub const KEY_PREFIX: &str = "sk-sluice-";

/// The files of `migrations/`, embedded so the binaries carry their schema.
/// `migration_list_matches_directory` keeps this list honest.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "tenants keys jobs", include_str!("../../../migrations/0001_tenants_keys_jobs.sql")),
    (2, "job metadata and status rank", include_str!("../../../migrations/0002_job_metadata_and_status_rank.sql")),
    (3, "webhooks", include_str!("../../../migrations/0003_webhooks.sql")),
    (4, "webhook secret rotation", include_str!("../../../migrations/0004_webhook_secret_rotation.sql")),
    (5, "tenant limits", include_str!("../../../migrations/0005_tenant_limits.sql")),
    (6, "tenant max in flight", include_str!("../../../migrations/0006_tenant_max_in_flight.sql")),
    (7, "ledger dead letters", include_str!("../../../migrations/0007_ledger_dead_letters.sql")),
    (8, "webhook fair claims", include_str!("../../../migrations/0008_webhook_fair_claims.sql")),
    (9, "unanswered calls", include_str!("../../../migrations/0009_unanswered_calls.sql")),
    (10, "sealed webhook secrets", include_str!("../../../migrations/0010_sealed_webhook_secrets.sql")),
];

pub type KeyDigest = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("no tenant named {0}")]
    NoTenant(String),
    #[error("random source failed: {0}")]
    Random(String),
}

pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, DbError> {
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_millis(config.connect_timeout_ms))
        .connect(config.url.expose())
        .await?;
    Ok(pool)
}

/// A pool that connects on first use, for a process to which Postgres is
/// optional (the scaler looks tenants up in it): it starts while Postgres
/// is down. At most `max_connections`, or the config's if that is lower.
pub fn connect_lazy(config: &DatabaseConfig, max_connections: u32) -> Result<PgPool, DbError> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections.min(config.max_connections).max(1))
        .acquire_timeout(Duration::from_millis(config.connect_timeout_ms))
        .connect_lazy(config.url.expose())?;
    Ok(pool)
}

pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    let migrations = MIGRATIONS
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(*version, Cow::Borrowed(*description), MigrationType::Simple, sql.into_sql_str(), false)
        })
        .collect();
    Migrator::with_migrations(migrations).run(pool).await?;
    Ok(())
}

/// Answers when Postgres does (readiness checks).
pub async fn ping(pool: &PgPool) -> Result<(), DbError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

pub fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<KeyDigest> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Creates a tenant, or returns the id of the one with that name.
pub async fn ensure_tenant(pool: &PgPool, name: &str) -> Result<Uuid, DbError> {
    let row = sqlx::query(
        "INSERT INTO tenants (id, name) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .fetch_one(pool)
    .await?;
    Ok(row.try_get("id")?)
}

pub async fn tenant_id(pool: &PgPool, name: &str) -> Result<Uuid, DbError> {
    let row = sqlx::query("SELECT id FROM tenants WHERE name = $1").bind(name).fetch_optional(pool).await?;
    match row {
        Some(row) => Ok(row.try_get("id")?),
        None => Err(DbError::NoTenant(name.to_owned())),
    }
}

/// A key freshly made: the clear text exists only here, to be shown once.
#[derive(Debug)]
pub struct NewKey {
    pub id: Uuid,
    pub key: crate::secret::Secret,
    pub prefix: String,
}

pub async fn create_key(pool: &PgPool, tenant: Uuid) -> Result<NewKey, DbError> {
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| DbError::Random(e.to_string()))?;
    let key = format!("{KEY_PREFIX}{}", hex(&raw));
    let prefix = key[..KEY_PREFIX.len() + 6].to_owned();
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO api_keys (id, tenant_id, prefix, key_hash) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(tenant)
        .bind(&prefix)
        .bind(hex(&digest(&key)))
        .execute(pool)
        .await?;
    Ok(NewKey { id, key: crate::secret::Secret::new(key), prefix })
}

/// Revokes a key by id; returns whether a live key was revoked.
pub async fn revoke_key(pool: &PgPool, key_id: Uuid) -> Result<bool, DbError> {
    let done = sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
        .bind(key_id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// An API key as operators see it: never its clear text nor its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub tenant: String,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    /// Unix seconds.
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// The query of [`KeyInfo`]s, with its condition.
macro_rules! key_info_where {
    ($condition:literal) => {
        concat!(
            "SELECT k.id, k.tenant_id, t.name, k.prefix, extract(epoch FROM k.created_at)::int8 AS created_at,
                    extract(epoch FROM k.revoked_at)::int8 AS revoked_at
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE ",
            $condition
        )
    };
}

fn key_info(row: &sqlx::postgres::PgRow) -> Result<KeyInfo, sqlx::Error> {
    Ok(KeyInfo {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        tenant: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

/// Keys, newest first: of one tenant or of all, the revoked ones too with `revoked`.
pub async fn keys(pool: &PgPool, tenant: Option<Uuid>, revoked: bool) -> Result<Vec<KeyInfo>, DbError> {
    let rows = sqlx::query(key_info_where!(
        "($1::uuid IS NULL OR k.tenant_id = $1) AND ($2 OR k.revoked_at IS NULL) ORDER BY k.created_at DESC, k.id DESC"
    ))
    .bind(tenant)
    .bind(revoked)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(key_info).collect::<Result<_, _>>()?)
}

/// One key by id, live or revoked.
pub async fn key(pool: &PgPool, id: Uuid) -> Result<Option<KeyInfo>, DbError> {
    let row = sqlx::query(key_info_where!("k.id = $1")).bind(id).fetch_optional(pool).await?;
    Ok(row.as_ref().map(key_info).transpose()?)
}

/// Who a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    pub tenant_id: Uuid,
    pub key_id: Uuid,
}

/// Every live key, by digest: the ingress's auth cache.
pub async fn live_keys(pool: &PgPool) -> Result<HashMap<KeyDigest, KeyOwner>, DbError> {
    let rows =
        sqlx::query("SELECT id, tenant_id, key_hash FROM api_keys WHERE revoked_at IS NULL").fetch_all(pool).await?;
    let mut keys = HashMap::with_capacity(rows.len());
    for row in rows {
        let hash: String = row.try_get("key_hash")?;
        let Some(digest) = unhex(&hash) else {
            tracing::warn!(key_id = %row.try_get::<Uuid, _>("id")?, "api key with malformed digest ignored");
            continue;
        };
        keys.insert(digest, KeyOwner { tenant_id: row.try_get("tenant_id")?, key_id: row.try_get("id")? });
    }
    Ok(keys)
}

/// The query of [`crate::tenant::TenantRow`]s (a macro, so that a condition can be appended with `concat!`).
macro_rules! tenant_rows {
    () => {
        "SELECT id, name, weight, tier, max_queued, max_in_flight, rpm, tpm FROM tenants"
    };
}

fn tenant_row(row: &sqlx::postgres::PgRow) -> Result<crate::tenant::TenantRow, sqlx::Error> {
    Ok(crate::tenant::TenantRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        weight: row.try_get("weight")?,
        tier: row.try_get("tier")?,
        max_queued: row.try_get("max_queued")?,
        max_in_flight: row.try_get("max_in_flight")?,
        rpm: row.try_get("rpm")?,
        tpm: row.try_get("tpm")?,
    })
}

/// Every tenant with its own settings (the rest come from the config).
pub async fn tenants(pool: &PgPool) -> Result<Vec<crate::tenant::TenantRow>, DbError> {
    let rows = sqlx::query(tenant_rows!()).fetch_all(pool).await?;
    Ok(rows.iter().map(tenant_row).collect::<Result<_, _>>()?)
}

/// One tenant by name.
pub async fn tenant(pool: &PgPool, name: &str) -> Result<Option<crate::tenant::TenantRow>, DbError> {
    let row = sqlx::query(concat!(tenant_rows!(), " WHERE name = $1")).bind(name).fetch_optional(pool).await?;
    Ok(row.as_ref().map(tenant_row).transpose()?)
}

/// One change to a tenant setting: a value, or back to the config default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting<T> {
    Keep,
    Default,
    Value(T),
}

#[derive(Debug, Clone)]
pub struct TenantChanges {
    pub weight: Setting<i32>,
    pub tier: Setting<String>,
    pub max_queued: Setting<i64>,
    pub max_in_flight: Setting<i64>,
    pub rpm: Setting<i64>,
    pub tpm: Setting<i64>,
}

/// Applies `changes` to the named tenant (creating it if needed) and returns
/// its row. Postgres' checks refuse out-of-range values.
pub async fn set_tenant(
    pool: &PgPool,
    name: &str,
    changes: &TenantChanges,
) -> Result<crate::tenant::TenantRow, DbError> {
    let id = ensure_tenant(pool, name).await?;
    fn parts<T: Clone>(s: &Setting<T>) -> (bool, Option<T>) {
        match s {
            Setting::Keep => (false, None),
            Setting::Default => (true, None),
            Setting::Value(v) => (true, Some(v.clone())),
        }
    }
    let (w_set, w) = parts(&changes.weight);
    let (t_set, t) = parts(&changes.tier);
    let (q_set, q) = parts(&changes.max_queued);
    let (f_set, f) = parts(&changes.max_in_flight);
    let (r_set, r) = parts(&changes.rpm);
    let (k_set, k) = parts(&changes.tpm);
    sqlx::query(
        "UPDATE tenants SET
            weight = CASE WHEN $2 THEN $3 ELSE weight END,
            tier = CASE WHEN $4 THEN $5 ELSE tier END,
            max_queued = CASE WHEN $6 THEN $7 ELSE max_queued END,
            rpm = CASE WHEN $8 THEN $9 ELSE rpm END,
            tpm = CASE WHEN $10 THEN $11 ELSE tpm END,
            max_in_flight = CASE WHEN $12 THEN $13 ELSE max_in_flight END,
            updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(w_set)
    .bind(w)
    .bind(t_set)
    .bind(t)
    .bind(q_set)
    .bind(q)
    .bind(r_set)
    .bind(r)
    .bind(k_set)
    .bind(k)
    .bind(f_set)
    .bind(f)
    .execute(pool)
    .await?;
    let row = tenants(pool).await?.into_iter().find(|t| t.id == id);
    row.ok_or_else(|| DbError::NoTenant(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let d = digest("sk-sluice-abc");
        assert_eq!(unhex(&hex(&d)), Some(d));
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn migration_list_matches_directory() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .map(|it| it.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        files.retain(|f| f.ends_with(".sql"));
        files.sort();
        let listed: Vec<i64> = MIGRATIONS.iter().map(|m| m.0).collect();
        let on_disk: Vec<i64> = files.iter().filter_map(|f| f.split('_').next()?.parse().ok()).collect();
        assert_eq!(listed, on_disk, "every file in migrations/ must be listed in db::MIGRATIONS");
    }
}
