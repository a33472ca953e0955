//! A fake LLM provider, OpenAI-compatible and Anthropic-compatible, for Sluice's development, tests and
//! benchmarks.
//!
//! - [`settings`]: latency, token counts and faults, set at start and changed
//!   at run time through `POST /_mock/faults`.
//! - [`handlers`]: chat completions, embeddings, models, and the control routes.
//! - [`anthropic`]: Anthropic's Messages API, plain and streamed.
//! - [`limiter`]: a requests-per-minute limit answered with the providers' real headers.
//! - [`profile`]: answer sizes, token rates, first-token delays and pauses, chosen per request by the model name.
//!
//! It answers from memory without locks (atomics only, and one mutex when a
//! rate limit is set), so that it is never
//! the bottleneck of a benchmark. Replies are deterministic: the content
//! quotes the last message, so a test can tell whose answer it got.

pub mod anthropic;
pub mod handlers;
pub mod limiter;
pub mod profile;
pub mod settings;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use settings::{Faults, Settings};

/// Serves the mock on `listener` until `shutdown` is cancelled.
pub async fn run(listener: TcpListener, settings: Settings, shutdown: CancellationToken) -> std::io::Result<()> {
    let state = Arc::new(handlers::MockState::new(settings));
    let app = handlers::router(state);
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
