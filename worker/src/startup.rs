//! Building the worker from its config and running it until shutdown.

use std::sync::Arc;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use sluice_core::config::{Config, ConfigError, ms};
use sluice_core::envelope::JOBS_SUBJECTS;
use sluice_core::ops::{self, Readiness};
use sluice_core::{db, nats};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::executor::Executor;
use crate::job::JobContext;
use crate::upstream::Upstreams;

/// Name of the durable consumer that feeds the ledger with outcome events.
pub const LEDGER_CONSUMER: &str = "ledger";
/// Name of the durable consumer that feeds the ledger with job-state changes.
pub const LEDGER_STATE_CONSUMER: &str = "ledger-state";
/// Name of the durable consumer that turns finished jobs into webhook deliveries.
pub const WEBHOOK_CONSUMER: &str = "webhooks";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("cannot create consumer {name}: {message}")]
    Consumer { name: String, message: String },
    #[error("ops server error: {0}")]
    Io(#[from] std::io::Error),
}

/// A durable pull consumer over the whole stream, explicit acks, no
/// delivery limit (the loops that use it decide what to skip).
async fn durable(
    stream: &async_nats::jetstream::stream::Stream,
    name: &str,
    ack_wait_ms: u64,
) -> Result<PullConsumer, StartError> {
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ms(ack_wait_ms),
            max_deliver: -1,
            ..Default::default()
        })
        .await
        .map_err(|e| StartError::Consumer { name: name.to_owned(), message: e.to_string() })
}

pub struct Worker {
    config: Config,
    nats: async_nats::Client,
    db: PgPool,
    executor: Executor,
    ledger: PullConsumer,
    ledger_state: PullConsumer,
    webhooks: PullConsumer,
}

impl Worker {
    /// Connects NATS and Postgres, declares the streams and consumers, and
    /// builds the upstream clients. `env` resolves `api_key_env` names.
    pub async fn build(config: Config, env: impl Fn(&str) -> Option<String>) -> Result<Self, StartError> {
        crate::metrics::describe();
        let upstreams = Upstreams::new(&config.pools, &config.upstream, env)?;
        let client = nats::connect(&config.nats, "sluice-worker").await?;
        let js = nats::jetstream(client.clone(), &config.nats);
        nats::ensure_streams(&js, &config.nats).await?;
        let job_state = nats::state_bucket(&js, &config.nats, &config.jobs).await?;
        let db = db::connect(&config.database).await?;

        let w = &config.worker;
        let consumer_error = |name: &str, e: &dyn std::fmt::Display| StartError::Consumer {
            name: name.to_owned(),
            message: e.to_string(),
        };
        let jobs = js.get_stream(&config.nats.jobs_stream).await.map_err(|e| consumer_error(&w.consumer, &e))?;
        let consumer: PullConsumer = jobs
            .create_consumer(pull::Config {
                durable_name: Some(w.consumer.clone()),
                filter_subject: JOBS_SUBJECTS.into(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: ms(w.ack_wait_ms),
                // Attempts are counted by the worker, which fails a job past
                // `max_attempts` itself: a work-queue stream would otherwise
                // keep an exhausted message forever.
                max_deliver: -1,
                max_ack_pending: 100_000,
                ..Default::default()
            })
            .await
            .map_err(|e| consumer_error(&w.consumer, &e))?;
        // The ledger follows the outcome events and the job-state bucket's
        // stream; webhook delivery follows the latter too.
        let events =
            js.get_stream(&config.nats.events_stream).await.map_err(|e| consumer_error(LEDGER_CONSUMER, &e))?;
        let ledger = durable(&events, LEDGER_CONSUMER, w.ack_wait_ms).await?;
        let state_stream = format!("KV_{}", config.jobs.state_bucket);
        let states = js.get_stream(&state_stream).await.map_err(|e| consumer_error(LEDGER_STATE_CONSUMER, &e))?;
        let ledger_state = durable(&states, LEDGER_STATE_CONSUMER, w.ack_wait_ms).await?;
        let webhooks = durable(&states, WEBHOOK_CONSUMER, w.ack_wait_ms).await?;

        let ctx = Arc::new(JobContext {
            nats: client.clone(),
            events: crate::events::EventSink::start(js),
            job_state,
            upstreams,
            max_attempts: w.max_attempts,
            ack_wait: ms(w.ack_wait_ms),
            retry_min: ms(w.retry_min_delay_ms),
            retry_max: ms(w.retry_max_delay_ms),
            hard_stop: CancellationToken::new(),
        });
        let executor = Executor {
            consumer,
            ctx,
            slots: Arc::new(Semaphore::new(w.max_in_flight)),
            max_in_flight: w.max_in_flight,
            fetch_expires: ms(w.fetch_expires_ms),
        };
        Ok(Self { config, nats: client, db, executor, ledger, ledger_state, webhooks })
    }

    /// Runs the executor and the ledger (and the ops server on `ops`, if
    /// given) until `shutdown` fires; then stops fetching, lets running jobs
    /// finish within `worker.shutdown_grace_ms`, and hands back the rest.
    pub async fn run(self, ops: Option<TcpListener>, shutdown: CancellationToken) -> Result<(), StartError> {
        let background = CancellationToken::new();
        if let Some(listener) = ops {
            let readiness = Readiness { nats: Some(self.nats.clone()), db: Some(self.db.clone()) };
            let app = ops::router(readiness);
            let stop = background.clone();
            tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
                    tracing::warn!(%error, "ops server stopped");
                }
            });
        }
        let ledger = tokio::spawn(crate::ledger::run(
            self.ledger.clone(),
            self.db.clone(),
            self.config.worker.ledger_batch,
            crate::ledger::decode_events,
            background.clone(),
        ));
        let ledger_state = tokio::spawn(crate::ledger::run(
            self.ledger_state.clone(),
            self.db.clone(),
            self.config.worker.ledger_batch,
            crate::ledger::decode_state,
            background.clone(),
        ));

        let wake = crate::webhooks::Wake::default();
        let enqueue = tokio::spawn(crate::webhooks::enqueue(
            self.webhooks.clone(),
            self.db.clone(),
            wake.clone(),
            background.clone(),
        ));
        let deliver = tokio::spawn(crate::webhooks::deliver(
            self.db.clone(),
            self.config.webhooks.clone(),
            wake,
            background.clone(),
        ));

        self.executor.run(shutdown).await;
        let grace = ms(self.config.worker.shutdown_grace_ms);
        tracing::info!(grace_ms = grace.as_millis() as u64, "stopped fetching; draining running jobs");
        if self.executor.drain(grace).await {
            tracing::info!("all running jobs finished");
        } else {
            tracing::warn!("grace period ran out; unfinished jobs were handed back to the queue");
        }
        background.cancel();
        let _ = ledger.await;
        let _ = ledger_state.await;
        let _ = enqueue.await;
        let _ = deliver.await;
        if let Err(error) = self.nats.flush().await {
            tracing::warn!(%error, "could not flush NATS on shutdown");
        }
        Ok(())
    }
}
