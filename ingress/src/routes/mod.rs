//! The routes: OpenAI-compatible endpoints, Anthropic's `POST /v1/messages`,
//! and Sluice's jobs. Handlers only: checks live in [`crate::validate`], JetStream
//! writes in [`crate::publish`].

mod chat;
mod job_list;
mod job_submit;
pub(crate) mod jobs;
mod models;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::state::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/embeddings", post(chat::embeddings))
        .route("/v1/messages", post(chat::messages))
        .route("/v1/models", get(models::list))
        .route("/v1/jobs", post(job_submit::submit).get(job_list::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/webhook/redeliver", post(jobs::redeliver))
        .with_state(state)
}
