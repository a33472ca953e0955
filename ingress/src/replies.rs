//! Routing workers' answers to the requests waiting for them.
//!
//! Each ingress subscribes once to `_SLUICE.reply.<ingress-id>.*`; a request
//! registers a numbered slot before it publishes its job and names the slot's
//! subject in the envelope. One task owns the slot table and hands each
//! answer to its waiter, so there is no per-request subscription and no lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use sluice_core::envelope::{H_RETRY_AFTER, H_STATUS};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// A worker's answer: the HTTP status and body to give the client.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: Bytes,
}

enum Command {
    Register(u64, oneshot::Sender<Reply>),
    Forget(u64),
}

pub struct Replies {
    prefix: String,
    next: AtomicU64,
    commands: mpsc::UnboundedSender<Command>,
}

/// A registered slot; dropping it frees the slot.
pub struct Waiter {
    pub subject: String,
    id: u64,
    rx: oneshot::Receiver<Reply>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Waiter {
    /// Waits for the answer; `None` if the router stopped.
    pub async fn recv(&mut self) -> Option<Reply> {
        (&mut self.rx).await.ok()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Forget(self.id));
    }
}

impl Replies {
    /// Subscribes to this ingress's reply subjects and starts the router.
    pub async fn start(
        client: &async_nats::Client,
        ingress_id: &str,
        shutdown: CancellationToken,
    ) -> Result<Self, async_nats::SubscribeError> {
        let prefix = format!("_SLUICE.reply.{ingress_id}");
        let mut subscription = client.subscribe(format!("{prefix}.*")).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
        tokio::spawn(async move {
            let mut waiting: HashMap<u64, oneshot::Sender<Reply>> = HashMap::new();
            loop {
                tokio::select! {
                    // Registrations first: a slot is always known before its answer.
                    biased;
                    _ = shutdown.cancelled() => return,
                    command = rx.recv() => match command {
                        Some(Command::Register(id, sender)) => { waiting.insert(id, sender); }
                        Some(Command::Forget(id)) => { waiting.remove(&id); }
                        None => return,
                    },
                    message = subscription.next() => {
                        let Some(message) = message else { return };
                        route(&mut waiting, message);
                    }
                }
            }
        });
        Ok(Self { prefix, next: AtomicU64::new(1), commands: tx })
    }

    pub fn register(&self) -> Waiter {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Register(id, tx));
        Waiter { subject: format!("{}.{id}", self.prefix), id, rx, commands: self.commands.clone() }
    }
}

fn route(waiting: &mut HashMap<u64, oneshot::Sender<Reply>>, message: async_nats::Message) {
    let id = message.subject.rsplit('.').next().and_then(|t| t.parse::<u64>().ok());
    let Some(sender) = id.and_then(|id| waiting.remove(&id)) else {
        metrics::counter!(crate::metrics::ORPHAN_REPLIES).increment(1);
        return;
    };
    let header = |name: &str| message.headers.as_ref()?.get(name)?.as_str().parse::<u64>().ok();
    let reply = Reply {
        status: header(H_STATUS).and_then(|s| u16::try_from(s).ok()).unwrap_or(502),
        retry_after: header(H_RETRY_AFTER),
        body: message.payload,
    };
    let _ = sender.send(reply);
}
