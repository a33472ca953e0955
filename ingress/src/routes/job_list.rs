//! `GET /v1/jobs`: the tenant's job history from the ledger, newest first,
//! paged by cursor.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sluice_core::db;
use sluice_core::error::{ApiError, ErrorCode};
use uuid::Uuid;

use super::jobs::finish;
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    limit: Option<i64>,
    /// Cursor: the id of the last job of the previous page.
    #[serde(default)]
    after: Option<Uuid>,
    #[serde(default)]
    status: Option<String>,
}

const STATUSES: &[&str] = &["queued", "in_progress", "completed", "failed", "cancelled", "expired"];

pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let owner = state.keys.authenticate(&headers)?;
        let Query(query) = query.map_err(|e| {
            ApiError::new(ErrorCode::InvalidRequest, format!("bad query ({e}); parameters: limit, after, status"))
        })?;
        let limit = query.limit.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "`limit` must be 1 to 100").param("limit"));
        }
        if let Some(s) = &query.status
            && !STATUSES.contains(&s.as_str())
        {
            return Err(ApiError::new(ErrorCode::InvalidRequest, format!("`status` must be one of {STATUSES:?}"))
                .param("status"));
        }
        let rows = db::job_history(&state.db, owner.tenant_id, query.after, query.status.as_deref(), limit + 1)
            .await
            .map_err(|e| {
            tracing::warn!(error = %e, "job history query failed");
            ApiError::new(ErrorCode::Unavailable, "the job history is unavailable; retry shortly").retry_after(1)
        })?;
        let has_more = rows.len() as i64 > limit;
        let data: Vec<_> = rows.into_iter().take(limit as usize).collect();
        let last = data.last().and_then(|j| j.get("id").cloned());
        Ok(Json(serde_json::json!({"object": "list", "data": data, "has_more": has_more, "last_id": last}))
            .into_response())
    };
    finish("jobs_list", started, result.await)
}
