//! `GET /v1/models`: the pools this gateway serves.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::state::AppState;

pub async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let response = match state.keys.authenticate(&headers) {
        Ok(_) => {
            let data: Vec<_> = state
                .config
                .pools
                .iter()
                .map(|p| json!({"id": p.name, "object": "model", "created": 0, "owned_by": "sluice"}))
                .collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => {
            crate::metrics::rejected(e.code);
            e.into_response()
        }
    };
    crate::metrics::answered("models", response.status().as_u16(), started.elapsed());
    response
}
