//! The admin API, served on `admin.listen` behind `admin.token` (never on the
//! public listener, and a tenant's API key is not an admin token):
//!
//! - `GET /admin/tenants/{name}`: the tenant's settings, defaults filled in;
//! - `PUT /admin/tenants/{name}`: sets some of `weight`, `tier`,
//!   `max_queued`, `max_in_flight`, `rpm`, `tpm` (a field left out is kept,
//!   `null` goes back to the config default, 0 is no limit); creates the
//!   tenant if needed;
//! - `POST /admin/tenants/{name}/keys`: a new API key, shown once;
//! - `DELETE /admin/keys/{id}`: revokes a key.
//!
//! Changes reach the ingresses within `ingress.auth_refresh_ms` and the
//! workers within `scheduler.tenants_refresh_ms`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use sha2::{Digest, Sha256};
use sluice_core::config::{Config, TenantDefaults};
use sluice_core::db::{self, Setting, TenantChanges};
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::tenant::{TenantPolicy, TenantRow};
use sqlx::PgPool;
use uuid::Uuid;

struct Admin {
    db: PgPool,
    defaults: TenantDefaults,
    /// SHA-256 of the admin token: compared digest to digest, in constant time.
    token: [u8; 32],
}

/// The admin router, or `None` when no admin token is configured.
pub fn router(config: &Config, db: PgPool) -> Option<Router> {
    let token = config.admin.token.as_ref()?;
    let admin = Arc::new(Admin {
        db,
        defaults: config.tenants.clone(),
        token: Sha256::digest(token.expose().as_bytes()).into(),
    });
    Some(
        Router::new()
            .route("/admin/tenants/{name}", get(show).put(update))
            .route("/admin/tenants/{name}/keys", post(create_key))
            .route("/admin/keys/{id}", delete(revoke_key))
            .with_state(admin),
    )
}

fn authorize(admin: &Admin, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    let differs = digest.iter().zip(admin.token.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if given.is_empty() || differs != 0 {
        return Err(ApiError::new(ErrorCode::InvalidApiKey, "the admin API needs the admin token"));
    }
    Ok(())
}

fn unavailable(error: &db::DbError) -> ApiError {
    tracing::warn!(%error, "admin request failed");
    ApiError::new(ErrorCode::Unavailable, "the database is unavailable; retry shortly").retry_after(1)
}

fn shown(row: &TenantRow, defaults: &TenantDefaults) -> serde_json::Value {
    let p = TenantPolicy::resolve(row, defaults);
    serde_json::json!({
        "id": row.id,
        "name": row.name,
        "weight": p.weight,
        "tier": p.tier.as_str(),
        "max_queued": p.max_queued,
        "max_in_flight": p.max_in_flight,
        "rpm": p.rpm,
        "tpm": p.tpm,
        "own": {
            "weight": row.weight, "tier": row.tier, "max_queued": row.max_queued,
            "max_in_flight": row.max_in_flight, "rpm": row.rpm, "tpm": row.tpm,
        },
    })
}

async fn show(State(admin): State<Arc<Admin>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let result = async {
        authorize(&admin, &headers)?;
        let row = db::tenant(&admin.db, &name)
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no tenant named `{name}`")))?;
        Ok::<_, ApiError>(Json(shown(&row, &admin.defaults)).into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// One field of a `PUT`: absent keeps, `null` resets, a value sets.
fn field<T>(
    body: &serde_json::Map<String, serde_json::Value>,
    name: &'static str,
    read: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<Setting<T>, ApiError> {
    match body.get(name) {
        None => Ok(Setting::Keep),
        Some(serde_json::Value::Null) => Ok(Setting::Default),
        Some(v) => read(v).map(Setting::Value).ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidRequest, format!("`{name}` has a value out of range")).param(name)
        }),
    }
}

async fn update(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let result = async {
        authorize(&admin, &headers)?;
        if name.is_empty() || name.len() > 128 {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "a tenant name is 1 to 128 characters"));
        }
        let body: serde_json::Map<String, serde_json::Value> = crate::body::parse(&body)?;
        const KNOWN: [&str; 6] = ["weight", "tier", "max_queued", "max_in_flight", "rpm", "tpm"];
        if let Some(unknown) = body.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(ApiError::new(ErrorCode::InvalidRequest, format!("unknown field `{unknown}`")));
        }
        let limit = |v: &serde_json::Value| v.as_i64().filter(|n| *n >= 0);
        let changes = TenantChanges {
            weight: field(&body, "weight", |v| {
                v.as_i64().filter(|w| (1..=i64::from(sluice_core::tenant::MAX_WEIGHT)).contains(w)).map(|w| w as i32)
            })?,
            tier: field(&body, "tier", |v| {
                v.as_str().filter(|t| sluice_core::wire::envelope::Class::parse(t).is_some()).map(str::to_owned)
            })?,
            max_queued: field(&body, "max_queued", limit)?,
            max_in_flight: field(&body, "max_in_flight", limit)?,
            rpm: field(&body, "rpm", limit)?,
            tpm: field(&body, "tpm", limit)?,
        };
        let row = db::set_tenant(&admin.db, &name, &changes).await.map_err(|e| unavailable(&e))?;
        tracing::info!(tenant = %name, "tenant settings changed through the admin API");
        Ok(Json(shown(&row, &admin.defaults)).into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

async fn create_key(State(admin): State<Arc<Admin>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let result = async {
        authorize(&admin, &headers)?;
        let tenant = db::tenant_id(&admin.db, &name)
            .await
            .map_err(|_| ApiError::new(ErrorCode::NotFound, format!("no tenant named `{name}`")))?;
        let key = db::create_key(&admin.db, tenant).await.map_err(|e| unavailable(&e))?;
        tracing::info!(tenant = %name, key_id = %key.id, "api key created through the admin API");
        let body = serde_json::json!({"key_id": key.id, "prefix": key.prefix, "api_key": key.key.expose()});
        Ok::<_, ApiError>((StatusCode::CREATED, Json(body)).into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

async fn revoke_key(State(admin): State<Arc<Admin>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let result = async {
        authorize(&admin, &headers)?;
        let id: Uuid = id.parse().map_err(|_| ApiError::new(ErrorCode::NotFound, "no such key"))?;
        match db::revoke_key(&admin.db, id).await.map_err(|e| unavailable(&e))? {
            true => {
                tracing::info!(key_id = %id, "api key revoked through the admin API");
                Ok::<_, ApiError>(StatusCode::NO_CONTENT.into_response())
            }
            false => Err(ApiError::new(ErrorCode::NotFound, "no live key with this id")),
        }
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}
