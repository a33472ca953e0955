//! Every task a Sluice process starts, in one place.
//!
//! A process builds one [`Tasks`] and hands it to whatever starts work in
//! the background: loops that run until shutdown (key and tenant reloads,
//! the group commit, the reply inbox, the ledger) and one-off work that must
//! not be lost (a timed-out request recorded as a job, an orphan answer
//! stored, a webhook attempt, a job run). At shutdown the process first
//! stops taking work, then [`Tasks::shutdown`] cancels the loops (they
//! finish their current round) and waits, bounded, for everything still
//! running. `tokio::spawn` is banned elsewhere (`clippy.toml`), so nothing
//! started on a request path can be dropped unseen when the process exits.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The tasks of one process (or one in-process app in tests).
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a tracked task: shutdown waits for it.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Cancelled when shutdown begins: background loops stop on it.
    pub fn stopping(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Cancels the loops and waits up to `within` for every task to end.
    /// Returns whether they all did; those left are dropped with the runtime.
    pub async fn shutdown(&self, within: Duration) -> bool {
        self.stop.cancel();
        self.tracker.close();
        let done = tokio::time::timeout(within, self.tracker.wait()).await.is_ok();
        if !done {
            tracing::warn!(
                tasks = self.tracker.len(),
                within_ms = within.as_millis() as u64,
                "background tasks still running at exit"
            );
        }
        done
    }
}

/// Starts a task that lives as long as the process and has nothing to
/// finish (the signal listener): the one untracked spawn.
#[allow(clippy::disallowed_methods, reason = "the one untracked spawn, for a task that never needs waiting for")]
pub fn detach<F>(task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(task);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_waits_for_work_and_stops_loops() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let tasks = Tasks::new();
        // A loop that runs until shutdown, and one-off work still running
        // when shutdown begins.
        let stop = tasks.stopping();
        tasks.spawn(async move { stop.cancelled().await });
        let (release, gate) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        let seen = finished.clone();
        tasks.spawn(async move {
            let _ = gate.await;
            seen.store(true, Ordering::SeqCst);
        });
        assert_eq!(tasks.running(), 2);
        let work_ends = async {
            tokio::task::yield_now().await;
            assert!(!finished.load(Ordering::SeqCst));
            let _ = release.send(());
        };
        let ((), all_ended) = tokio::join!(work_ends, tasks.shutdown(Duration::from_secs(10)));
        assert!(all_ended);
        assert!(finished.load(Ordering::SeqCst), "shutdown returned only after the work ended");
        assert_eq!(tasks.running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_is_bounded() {
        let tasks = Tasks::new();
        tasks.spawn(std::future::pending::<()>());
        assert!(!tasks.shutdown(Duration::from_millis(50)).await);
    }
}
