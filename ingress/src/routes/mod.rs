//! The OpenAI-compatible routes.

mod chat;
mod models;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::startup::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(models::list))
        .with_state(state)
}
