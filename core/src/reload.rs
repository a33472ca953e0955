//! Periodic background work: [`Ticker`], and [`start`], a value reloaded in
//! the background (API keys, tenants' settings): loaded once at start, where
//! a failure is the caller's, then every `every` until `shutdown`; a reload
//! that fails keeps the previous value. `loaded` sees every outcome, for
//! metrics and logs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Ticks every `every`, the first tick at once; a late tick delays the next
/// ones rather than bunching them.
pub struct Ticker(tokio::time::Interval);

impl Ticker {
    pub fn new(every: Duration) -> Self {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self(interval)
    }

    /// Waits for the next tick; `false` once `shutdown` has fired.
    pub async fn tick(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = self.0.tick() => true,
        }
    }
}

pub async fn start<T, E, F, Fut, L>(
    every: Duration,
    tasks: &crate::tasks::Tasks,
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
    let shutdown = tasks.stopping();
    tasks.spawn(async move {
        let mut ticker = Ticker::new(every);
        // The first tick is now: the value was just loaded.
        ticker.tick(&shutdown).await;
        while ticker.tick(&shutdown).await {
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
