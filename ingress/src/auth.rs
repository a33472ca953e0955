//! API-key authentication against an in-memory snapshot of the live keys.
//!
//! The snapshot maps SHA-256 digests to their tenant. A background task
//! reloads it from Postgres every `ingress.auth_refresh_ms`, so a request
//! never waits on Postgres, a new key works and a revoked key stops working
//! within that bound. The same reload brings each tenant's weight, tier and
//! limits (see [`sluice_core::tenant`]), so admission never reads Postgres
//! either. Looking a digest up in a map leaks nothing useful about
//! a key: an attacker who times it learns about digests of guesses, not about
//! the keys.
//!
//! The cache fails closed: while reloads fail (Postgres unreachable), the last
//! snapshot keeps serving for `ingress.auth_max_staleness_ms` (5 minutes by
//! default), then every request gets 503 until a reload succeeds. A key
//! revoked during an outage thus stops working within that bound too, at the
//! price of the API's availability in a long Postgres outage; 0 keeps the
//! last snapshot forever (available, but a revoked key keeps working).

use sluice_core::tasks::Tasks;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use sluice_core::config::TenantDefaults;
use sluice_core::db::{self, KeyDigest, KeyOwner};
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::tenant::TenantPolicy;
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

struct Loaded {
    keys: HashMap<KeyDigest, KeyOwner>,
    tenants: HashMap<Uuid, Arc<TenantPolicy>>,
    at: Instant,
}

type Snapshot = Arc<Loaded>;

#[derive(Clone)]
pub struct KeyCache {
    keys: watch::Receiver<Snapshot>,
    /// The policy of a tenant created after the last reload.
    fallback: Arc<TenantPolicy>,
    /// Oldest snapshot still trusted (`ingress.auth_max_staleness_ms`; none when 0).
    max_staleness: Option<Duration>,
}

async fn load(db: &PgPool, defaults: &TenantDefaults) -> Result<Loaded, db::DbError> {
    let keys = db::live_keys(db).await?;
    let tenants =
        db::tenants(db).await?.iter().map(|row| (row.id, Arc::new(TenantPolicy::resolve(row, defaults)))).collect();
    Ok(Loaded { keys, tenants, at: Instant::now() })
}

impl KeyCache {
    /// Loads the live keys once, then keeps reloading them in the background
    /// until `shutdown` fires.
    pub async fn start(
        db: PgPool,
        defaults: TenantDefaults,
        every: Duration,
        max_staleness: Duration,
        tasks: &Tasks,
    ) -> Result<Self, db::DbError> {
        let fallback = Arc::new(TenantPolicy::defaults(&defaults));
        let keys = sluice_core::reload::start(
            every,
            tasks,
            move || {
                let (db, defaults) = (db.clone(), defaults.clone());
                async move { load(&db, &defaults).await }
            },
            |outcome: Result<&Loaded, &db::DbError>| match outcome {
                Ok(loaded) => metrics::gauge!(crate::metrics::AUTH_KEYS).set(loaded.keys.len() as f64),
                Err(error) => {
                    metrics::counter!(crate::metrics::AUTH_REFRESH_FAILURES).increment(1);
                    tracing::warn!(%error, "api key cache reload failed; keeping the previous keys");
                }
            },
        )
        .await?;
        let max_staleness = (!max_staleness.is_zero()).then_some(max_staleness);
        Ok(Self { keys, fallback, max_staleness })
    }

    /// The tenant behind the request's `Authorization: Bearer …` (or
    /// Anthropic-style `x-api-key`) header, or 401.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<KeyOwner, ApiError> {
        let key = bearer(headers).ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidApiKey, "missing API key: send `Authorization: Bearer <key>`")
        })?;
        let digest = db::digest(key);
        let snapshot = self.keys.borrow();
        if self.max_staleness.is_some_and(|bound| snapshot.at.elapsed() > bound) {
            metrics::counter!(crate::metrics::AUTH_STALE_REFUSED).increment(1);
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "API keys cannot be checked: the key store has been unreachable too long; retry shortly",
            )
            .retry_after(5));
        }
        snapshot
            .keys
            .get(&digest)
            .cloned()
            .ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey, "invalid or revoked API key"))
    }

    /// The tenant's weight, tier and limits as of the last reload.
    pub fn policy(&self, tenant: Uuid) -> Arc<TenantPolicy> {
        self.keys.borrow().tenants.get(&tenant).cloned().unwrap_or_else(|| self.fallback.clone())
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, token) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty());
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::bearer;
    use axum::http::{HeaderMap, HeaderValue};

    #[test]
    fn bearer_token_is_read() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer sk-sluice-1"));
        assert_eq!(bearer(&h), Some("sk-sluice-1"));
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }
}
