//! The OpenAI-compatible routes, and Anthropic's `POST /v1/messages`.

mod chat;
mod jobs;
mod models;
mod sse;
mod submit;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::startup::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/embeddings", post(chat::embeddings))
        .route("/v1/messages", post(chat::messages))
        .route("/v1/models", get(models::list))
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/webhook/redeliver", post(jobs::redeliver))
        .with_state(state)
}
