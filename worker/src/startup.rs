//! Building the worker from its config and running it until shutdown.

use std::sync::Arc;

use std::collections::HashSet;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use sluice_core::config::{Config, ConfigError, ms};
use sluice_core::ops::{self, Readiness};
use sluice_core::tasks::Tasks;
use sluice_core::{db, nats};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::exec::executor::Executor;
use crate::exec::fair::{Fair, QueueKey};
use crate::exec::job::JobContext;
use crate::exec::queues::{self, Queues};
use crate::upstream::pools::{Pools, Shared};

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
    #[error(transparent)]
    Keys(#[from] sluice_core::seal::SealError),
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
    jobs: async_nats::jetstream::stream::Stream,
    counters: sluice_core::counters::Counters,
    hints: tokio::sync::mpsc::Sender<queues::Hint>,
    /// Every task the worker starts, those of `build` included.
    tasks: Tasks,
    ledger: PullConsumer,
    ledger_state: PullConsumer,
    webhooks: PullConsumer,
    /// Seals and opens webhook signing secrets (`webhooks.secret_keys_file`).
    keys: Arc<sluice_core::seal::Keyring>,
}

impl Worker {
    /// Connects NATS and Postgres, declares the streams and consumers, and
    /// builds the upstream clients. `env` resolves `api_key_env` names.
    pub async fn build(config: Config, env: impl Fn(&str) -> Option<String>) -> Result<Self, StartError> {
        crate::metrics::describe();
        let pools = Pools::configure(&config.pools, &config.upstream, &env)?;
        let keys = Arc::new(config.webhooks.keyring()?);
        let client = nats::connect(&config.nats, nats::Role::Worker, "sluice-worker").await?;
        let js = nats::jetstream(client.clone(), &config.nats);
        nats::ensure_streams(&js, &config.nats).await?;
        let job_state = nats::state_bucket(&js, &config.nats, &config.jobs).await?;
        let max_payload = client.server_info().max_payload;
        let bodies = sluice_core::bodies::Bodies::open(&js, max_payload, &config.nats, &config.jobs).await?;
        let db = db::connect(&config.database).await?;
        // Secrets in clear from before sealing, or under a key being rotated
        // out, are sealed with the current key.
        match db::webhooks::reseal(&db, &keys).await {
            Ok(done) if done == db::webhooks::Resealed::default() => {}
            Ok(done) => {
                tracing::info!(sealed = done.sealed, unopenable = done.unopenable, "webhook secrets sealed again")
            }
            Err(error) => tracing::warn!(%error, "cannot seal stored webhook secrets again; the next start tries"),
        }

        let w = &config.worker;
        let consumer_error = |name: &str, e: &dyn std::fmt::Display| StartError::Consumer {
            name: name.to_owned(),
            message: e.to_string(),
        };
        let jobs = js.get_stream(&config.nats.jobs_stream).await.map_err(|e| consumer_error(&w.consumer, &e))?;
        // Before fair queues, one consumer named `worker.consumer` read the
        // whole stream; a work-queue stream refuses the per-tenant consumers
        // while it exists. Its unacknowledged jobs stay in the stream.
        if jobs.delete_consumer(&w.consumer).await.is_ok() {
            tracing::info!(consumer = %w.consumer, "removed the single consumer of earlier versions");
        }
        let counters = sluice_core::counters::Counters::open(&js, &config.nats).await?;
        // The ledger follows the outcome events and the job-state bucket's
        // stream; webhook delivery follows the latter too.
        let events =
            js.get_stream(&config.nats.events_stream).await.map_err(|e| consumer_error(LEDGER_CONSUMER, &e))?;
        let ledger = durable(&events, LEDGER_CONSUMER, w.ack_wait_ms).await?;
        let state_stream = sluice_core::wire::subjects::kv_stream(&config.jobs.state_bucket);
        let states = js.get_stream(&state_stream).await.map_err(|e| consumer_error(LEDGER_STATE_CONSUMER, &e))?;
        let ledger_state = durable(&states, LEDGER_STATE_CONSUMER, w.ack_wait_ms).await?;
        let webhooks = durable(&states, WEBHOOK_CONSUMER, w.ack_wait_ms).await?;

        let tasks = Tasks::new();
        let tenants = crate::exec::tenants::TenantBook::start(
            db.clone(),
            config.tenants.clone(),
            ms(config.scheduler.tenants_refresh_ms),
            &tasks,
        )
        .await?;
        let counts = crate::exec::counts::CountSink::start(counters.clone(), &tasks);
        let ctx = Arc::new(JobContext {
            tenants,
            counts: counts.clone(),
            default_max_tokens: config.scheduler.default_max_tokens,
            nats: client.clone(),
            events: crate::ledger::events::EventSink::start(js.clone(), &tasks),
            state_commit: sluice_core::group_commit::GroupCommit::new(
                &tasks,
                config.nats.group_commit,
                client.clone(),
                js,
                &job_state.stream_name,
            ),
            job_state,
            bodies,
            max_body_bytes: config.ingress.max_body_bytes,
            body_budget: Arc::new(tokio::sync::Semaphore::new(w.max_body_memory_bytes.min(u32::MAX as usize))),
            max_body_memory: w.max_body_memory_bytes.min(u32::MAX as usize),
            pools: pools.with_budgets(Shared { counters: counters.clone(), counts: counts.clone() }),
            max_attempts: w.max_attempts,
            max_unanswered_repeats: config.upstream.max_unanswered_repeats,
            state_read_grace: crate::exec::job::STATE_READ_GRACE.min(ms(config.jobs.retention_ms)),
            ack_wait: ms(w.ack_wait_ms),
            retry_min: ms(w.retry_min_delay_ms),
            retry_max: ms(w.retry_max_delay_ms),
            hard_stop: CancellationToken::new(),
            tasks: tasks.clone(),
        });
        let sc = &config.scheduler;
        let (hints, hints_rx) = tokio::sync::mpsc::channel(4096);
        let executor = Executor {
            counters: counters.clone(),
            queues: Queues::new(
                jobs.clone(),
                w.consumer.clone(),
                ms(w.ack_wait_ms),
                ms(sc.idle_consumer_ms),
                ms(sc.discover_ms),
            ),
            fair: Fair::new(sc.min_share_normal, sc.min_share_batch),
            hints: hints_rx,
            ctx,
            slots: Arc::new(Semaphore::new(w.max_in_flight)),
            max_in_flight: w.max_in_flight,
            max_fetch: sc.max_fetch,
            discover: ms(sc.discover_ms),
        };
        Ok(Self {
            config,
            nats: client,
            db,
            executor,
            jobs,
            counters,
            hints,
            tasks,
            ledger,
            ledger_state,
            webhooks,
            keys,
        })
    }

    /// Runs the executor and the ledger (and the ops server on `ops`, if
    /// given) until `shutdown` fires; then stops fetching, lets running jobs
    /// finish within `worker.shutdown_grace_ms`, and hands back the rest.
    pub async fn run(mut self, ops: Option<TcpListener>, shutdown: CancellationToken) -> Result<(), StartError> {
        let tasks = self.tasks.clone();
        let background = tasks.stopping();
        tasks.spawn(queues::wake_ups(self.nats.clone(), self.hints.clone(), background.clone()));
        let (counts_tx, counts_rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
        let book = self.executor.ctx.tenants.clone();
        let mut shown: HashSet<QueueKey> = HashSet::new();
        let observe = move |counts: &[(QueueKey, u64)]| {
            let now: HashSet<QueueKey> = counts.iter().map(|(k, _)| k.clone()).collect();
            for (key, count) in
                counts.iter().map(|(k, c)| (k, *c as f64)).chain(shown.difference(&now).map(|k| (k, 0.0)))
            {
                metrics::gauge!(crate::metrics::QUEUED, "pool" => key.pool.clone(), "class" => key.class.as_str(),
                    "tenant" => book.get(key.tenant).name.clone())
                .set(count);
            }
            shown = now;
            counts_tx.send_replace(Arc::new(counts.to_vec()));
        };
        tasks.spawn(queues::discover(
            self.jobs.clone(),
            ms(self.config.scheduler.discover_ms),
            self.hints.clone(),
            observe,
            background.clone(),
        ));
        tasks.spawn(repair_counts(
            self.counters.clone(),
            self.jobs.clone(),
            self.config.worker.consumer.clone(),
            self.executor.ctx.tenants.clone(),
            counts_rx,
            ms(self.config.scheduler.repair_ms),
            background.clone(),
        ));
        if let Some(listener) = ops {
            let readiness = Readiness {
                nats: Some(self.nats.clone()),
                db: Some(self.db.clone()),
                stopping: Some(shutdown.clone()),
            };
            let app = ops::router(readiness);
            let stop = background.clone();
            tasks.spawn(async move {
                if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
                    tracing::warn!(%error, "ops server stopped");
                }
            });
        }
        tasks.spawn(crate::ledger::run(
            self.ledger.clone(),
            self.db.clone(),
            self.config.worker.ledger_batch,
            crate::ledger::decode_events,
            background.clone(),
        ));
        tasks.spawn(crate::ledger::run(
            self.ledger_state.clone(),
            self.db.clone(),
            self.config.worker.ledger_batch,
            crate::ledger::decode_state,
            background.clone(),
        ));

        let wake = crate::webhooks::Wake::default();
        let (db, keys) = (self.db.clone(), self.keys.clone());
        tasks.spawn(crate::webhooks::enqueue(
            self.webhooks.clone(),
            db.clone(),
            keys.clone(),
            wake.clone(),
            background.clone(),
        ));
        tasks.spawn(crate::webhooks::deliver(db, self.config.webhooks.clone(), keys, wake, tasks.clone()));

        self.executor.run(shutdown).await;
        let grace = ms(self.config.worker.shutdown_grace_ms);
        tracing::info!(grace_ms = grace.as_millis() as u64, "stopped fetching; draining running jobs");
        if self.executor.drain(grace).await {
            tracing::info!("all running jobs finished");
        } else {
            tracing::warn!("grace period ran out; unfinished jobs were handed back to the queue");
        }
        // The background loops finish their current round (a ledger batch,
        // the last counter changes, a webhook attempt); with NATS or Postgres
        // down that round would wait for them forever, so it is bounded.
        if !tasks.shutdown(nats::FINAL_FLUSH).await {
            tracing::warn!("background work did not finish within 5 s of shutdown (NATS or Postgres down?); exiting");
        }
        nats::final_flush(&self.nats).await;
        Ok(())
    }
}

/// Every `every` (`scheduler.repair_ms`), sets drifted counts to the truth (see
/// [`crate::exec::counts::repair`]): queued jobs from the latest discovery, running
/// jobs from the acknowledgements pending on the tenant's queue consumers.
async fn repair_counts(
    counters: sluice_core::counters::Counters,
    jobs: async_nats::jetstream::stream::Stream,
    prefix: String,
    tenants: crate::exec::tenants::TenantBook,
    counts: tokio::sync::watch::Receiver<Arc<Vec<(QueueKey, u64)>>>,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut seen = std::collections::HashMap::new();
    let mut seen_running = std::collections::HashMap::new();
    let mut ticker = sluice_core::reload::Ticker::new(every);
    while ticker.tick(&shutdown).await {
        let listed = counts.borrow().clone();
        let truth = queues::per_tenant(&listed);
        let subject = sluice_core::wire::subjects::queued;
        let mut repaired = crate::exec::counts::repair(&counters, subject, &truth, &tenants.capped(), &mut seen).await;
        let limited = tenants.capped_in_flight();
        if !limited.is_empty() {
            let mut running = std::collections::HashMap::new();
            for (key, _) in listed.iter().filter(|(k, _)| limited.contains(&k.tenant)) {
                if let Ok(info) = jobs.consumer_info(queues::consumer_name(&prefix, key)).await {
                    *running.entry(key.tenant).or_insert(0) += info.num_ack_pending as i64;
                }
            }
            let subject = sluice_core::wire::subjects::in_flight;
            repaired += crate::exec::counts::repair(&counters, subject, &running, &limited, &mut seen_running).await;
        }
        metrics::counter!(crate::metrics::COUNTER_REPAIRS).increment(repaired as u64);
    }
}
