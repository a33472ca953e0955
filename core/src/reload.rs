//! A value reloaded in the background (API keys, tenants' settings): loaded
//! once at start, where a failure is the caller's, then every `every` until
//! `shutdown`; a reload that fails keeps the previous value. `loaded` sees
//! every outcome, for metrics and logs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub async fn start<T, E, F, Fut, L>(
    every: Duration,
    shutdown: CancellationToken,
    mut load: F,
    mut loaded: L,
) -> Result<watch::Receiver<Arc<T>>, E>
where
    T: Send + Sync + 'static,
    E: Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, E>> + Send,
    L: FnMut(Result<&T, &E>) + Send + 'static,
{
    let first = load().await?;
    loaded(Ok(&first));
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match load().await {
                Ok(value) => {
                    loaded(Ok(&value));
                    tx.send_replace(Arc::new(value));
                }
                Err(error) => loaded(Err(&error)),
            }
        }
    });
    Ok(rx)
}
