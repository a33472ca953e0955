//! Pulling a durable consumer in batches: wait for a message, gather more for
//! a short while, hand the batch over. Used by the ledger and by webhook
//! enqueueing, which both write a batch to Postgres in one statement.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Calls `handle` with batches of up to `max` messages, each gathered for at
/// most `linger` after its first message, until `shutdown` fires. `what`
/// names the loop in logs. A failed pull is retried after a second.
pub async fn run<F, Fut>(
    consumer: PullConsumer,
    max: usize,
    linger: Duration,
    what: &'static str,
    shutdown: CancellationToken,
    mut handle: F,
) where
    F: FnMut(Vec<Message>) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let stream = consumer.stream().max_messages_per_batch(max).expires(Duration::from_secs(5)).messages();
        let mut messages = match stream.await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, what, "cannot pull; retrying in 1 s");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = messages.next() => next,
            };
            let first = match first {
                Some(Ok(m)) => m,
                Some(Err(error)) => {
                    tracing::debug!(%error, what, "pull interrupted");
                    continue;
                }
                None => break,
            };
            let mut batch = vec![first];
            let flush_at = tokio::time::Instant::now() + linger;
            while batch.len() < max {
                match tokio::time::timeout_at(flush_at, messages.next()).await {
                    Ok(Some(Ok(m))) => batch.push(m),
                    Ok(Some(Err(_))) => continue,
                    _ => break,
                }
            }
            handle(batch).await;
        }
    }
}
