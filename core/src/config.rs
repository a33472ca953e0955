//! Typed configuration for every Sluice component.
//!
//! Layers, later wins: built-in defaults → an optional TOML file → environment
//! variables `SLUICE__SECTION__KEY` (double underscores separate the path;
//! a number indexes a list, as in `SLUICE__POOLS__0__BASE_URL`). Unknown keys
//! are refused, and [`Config::validate`] checks what types cannot. A bad
//! config is a [`ConfigError`] that names the key; binaries exit with code 64.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

pub mod cli;
mod env;
mod ingress;
mod pools;
mod scaler;
mod upstream;
use env::{env_value, set_path};
pub use ingress::IngressConfig;
pub use pools::{DEFAULT_MAX_OUTPUT_TOKENS, DeploymentConfig, MAX_OUTPUT_TOKENS_LIMIT, PoolConfig, ProviderKind};
pub use scaler::{ScalerConfig, ScalerTls, ScheduleConfig};
pub use upstream::UpstreamConfig;

/// Exit code for a bad configuration (`EX_CONFIG` is 78; linkerd and the
/// BSD `sysexits.h` use 64, `EX_USAGE`, for "the invocation is wrong").
pub const EXIT_BAD_CONFIG: i32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

impl ConfigError {
    fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Key { key: key.into(), message: message.into() }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub database: DatabaseConfig,
    pub ingress: IngressConfig,
    pub worker: WorkerConfig,
    pub upstream: UpstreamConfig,
    pub jobs: JobsConfig,
    pub webhooks: WebhooksConfig,
    pub tenants: TenantDefaults,
    pub scheduler: SchedulerConfig,
    pub admin: AdminConfig,
    pub scaler: ScalerConfig,
    pub log: LogConfig,
    /// Model aliases that clients name in `model`, each served by one or more deployments.
    pub pools: Vec<PoolConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub url: String,
    /// The NATS user this process connects as (with `password`); none for a
    /// server without authorization. `deploy/` gives each component its own
    /// user with only the subjects it needs (`deploy/base/nats/users.conf`).
    pub user: Option<String>,
    /// That user's password (secret; e.g. `SLUICE__NATS__PASSWORD`).
    pub password: Secret,
    /// Name of the work-queue stream holding jobs.
    pub jobs_stream: String,
    /// Name of the stream holding job outcome events for the ledger.
    pub events_stream: String,
    /// Name of the counter stream holding each tenant's queued-jobs count.
    pub counters_stream: String,
    /// Name of the counter stream holding per-minute request and token
    /// counts (entries expire after three minutes).
    pub rates_stream: String,
    /// Stream replicas: 1 in development, 3 in production.
    pub replicas: usize,
    /// Upper bound on queued jobs; a submit beyond it is refused with 429.
    pub max_queued_jobs: i64,
    /// Object store bucket holding bodies too large for a NATS message
    /// (request bodies, answers and job results), by reference.
    pub bodies_bucket: String,
    /// Upper bound on the bytes that bucket holds; a body that does not fit
    /// is refused (503 for a request, a retry for an answer).
    pub bodies_max_bytes: i64,
    /// Store the writes on a job's path (its publish, its state's changes)
    /// that a process has waiting at once in one JetStream atomic batch: one
    /// commit and, with `sync_interval: always`, one disk sync per batch
    /// instead of per write. Nothing is acknowledged before its batch is
    /// stored. Needs nats-server 2.12 or later.
    pub group_commit: bool,
    /// Window in which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    pub dedup_window_ms: u64,
    pub connect_timeout_ms: u64,
    /// Timeout of a JetStream API call or publish acknowledgement.
    pub request_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: Secret,
    pub max_connections: u32,
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Address of the worker's `/healthz`, `/readyz` and `/metrics`.
    pub ops_listen: SocketAddr,
    /// Jobs executed at once by one worker process.
    pub max_in_flight: usize,
    /// Name prefix of the durable pull consumers, one per tenant queue
    /// (`<consumer>_<pool>_<class>_<tenant>`), shared by all workers.
    pub consumer: String,
    /// JetStream ack wait: a job held this long without an ack or an
    /// in-progress signal is redelivered to another worker.
    pub ack_wait_ms: u64,
    /// Deliveries of one job before it is failed (first try included).
    pub max_attempts: u32,
    /// Exponential backoff with jitter between attempts: first delay and cap.
    pub retry_min_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    /// Time given to in-flight calls after SIGTERM.
    pub shutdown_grace_ms: u64,
    /// Ledger: most event messages (each a batch of up to 128 job events)
    /// written to Postgres in one statement.
    pub ledger_batch: usize,
    /// Bytes of request bodies read back from the bodies bucket (those too
    /// large for a NATS message) held at once; jobs past it wait their turn.
    pub max_body_memory_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// JetStream key-value bucket holding the state of asynchronous jobs.
    pub state_bucket: String,
    /// JetStream key-value bucket holding which job each `Idempotency-Key`
    /// names, for `retention_ms` after the key's first use.
    pub idempotency_bucket: String,
    /// How long a job's state and result stay readable after its last
    /// change; also the window of an `Idempotency-Key`: it names one job for
    /// this long after its first use, and a new job after that.
    pub retention_ms: u64,
    /// Expiry of a job that sets no `expires_in`: still queued then, it
    /// becomes `expired` and never runs.
    pub default_expiry_ms: u64,
    /// Largest `expires_in` a client may ask for.
    pub max_expiry_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Allow targets on private networks (10/8, 172.16/12, 192.168/16,
    /// link-local, unique-local). Off by default: SSRF.
    pub allow_private_targets: bool,
    /// Allow loopback targets (127/8, ::1). On in the development config.
    pub allow_loopback_targets: bool,
    /// Delay before each retry; its length is the number of retries. Each
    /// delay gets ±10 % jitter and is at least the receiver's `Retry-After`.
    pub retry_schedule_ms: Vec<u64>,
    /// Timeout of one delivery attempt.
    pub timeout_ms: u64,
    /// Deliveries in flight at once per worker process.
    pub max_concurrency: usize,
    /// Of those, at most this many for one tenant: a tenant whose receivers
    /// are slow cannot hold every slot.
    pub max_concurrency_per_tenant: usize,
    /// How often the delivery loop looks for due deliveries.
    pub poll_ms: u64,
    /// The keyring that seals webhook signing secrets at rest: a file
    /// mounted from a secret, one `<id> <base64 32-byte key>` per line, the
    /// first key sealing (see `sluice_core::seal` and the README's Webhooks
    /// section for rotation). Required by the ingress, the worker and `sluice-admin
    /// webhooks set`; `sluice-admin webhooks new-key` prints a key line.
    pub secret_keys_file: Option<std::path::PathBuf>,
}

/// Limits of a tenant that has no value of its own in Postgres (set them
/// per tenant with `sluice-admin tenants set`). A limit of 0 means none.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantDefaults {
    /// Share of a pool's capacity relative to other backlogged tenants.
    pub weight: u32,
    /// Highest class the tenant's requests run in: `interactive` (no
    /// lowering), `normal` or `batch`.
    pub tier: String,
    /// Jobs (synchronous and asynchronous) queued or running at once; beyond
    /// it a submit gets 429 `queued_jobs_limit`. Held across all ingresses.
    pub max_queued: u64,
    /// Jobs running at once over all workers; the schedulers skip the
    /// tenant while it has that many running.
    pub max_in_flight: u64,
    /// Requests admitted per minute (sliding window), across all ingresses.
    pub rpm: u64,
    /// Estimated tokens admitted per minute (prompt estimate plus requested
    /// output), across all ingresses; corrected by the real usage.
    pub tpm: u64,
}

/// The ingress's admin API: tenants' settings and API keys over HTTP, on
/// its own listener, behind a bearer token. Off unless both are set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener; keep it off the public network.
    pub listen: Option<SocketAddr>,
    /// The admin bearer token (prefer `SLUICE__ADMIN__TOKEN` in the
    /// environment); at least 32 characters.
    pub token: Option<Secret>,
}

/// The workers' fair scheduler.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// How often a worker lists the queues that hold jobs; a backstop, since
    /// every submit also wakes the workers at once.
    pub discover_ms: u64,
    /// Most jobs fetched from one tenant's queue in one pull.
    pub max_fetch: usize,
    /// Share of the work guaranteed to normal-priority jobs while interactive
    /// requests have backlog.
    pub min_share_normal: f64,
    /// Share of the work guaranteed to batch jobs while higher classes have backlog.
    pub min_share_batch: f64,
    /// A tenant queue's consumer unused this long is removed from JetStream.
    pub idle_consumer_ms: u64,
    /// Output tokens assumed for a request that sets no `max_tokens`, in the
    /// token estimates used for fairness and for `tpm`.
    pub default_max_tokens: u64,
    /// How often a worker reloads tenants' weights from Postgres.
    pub tenants_refresh_ms: u64,
    /// How often workers look for admission counts that drifted (a process
    /// killed between counting and publishing); a count is repaired once it
    /// has disagreed with the truth, unchanged, for one whole interval.
    pub repair_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `sluice_worker=debug,info`.
    pub filter: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            user: None,
            password: Secret::default(),
            jobs_stream: "JOBS".into(),
            events_stream: "EVENTS".into(),
            counters_stream: "SLUICE_COUNTERS".into(),
            rates_stream: "SLUICE_RATES".into(),
            replicas: 1,
            max_queued_jobs: 1_000_000,
            bodies_bucket: "SLUICE_BODIES".into(),
            bodies_max_bytes: 8 << 30,
            group_commit: false,
            dedup_window_ms: 120_000,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 5_000,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://sluice@127.0.0.1:5432/sluice"),
            max_connections: 8,
            connect_timeout_ms: 5_000,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            max_in_flight: 256,
            consumer: "workers".into(),
            ack_wait_ms: 30_000,
            max_attempts: 4,
            retry_min_delay_ms: 200,
            retry_max_delay_ms: 10_000,
            shutdown_grace_ms: 25_000,
            ledger_batch: 32,
            max_body_memory_bytes: 256 * 1024 * 1024,
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            state_bucket: "JOB_STATE".into(),
            idempotency_bucket: "IDEMPOTENCY".into(),
            retention_ms: 7 * 24 * 3600 * 1000,
            default_expiry_ms: 24 * 3600 * 1000,
            max_expiry_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            allow_private_targets: false,
            allow_loopback_targets: false,
            // 5 s, 1 min, 5 min, 30 min, 2 h, 5 h, 10 h: about 17 hours in all.
            retry_schedule_ms: vec![5_000, 60_000, 300_000, 1_800_000, 7_200_000, 18_000_000, 36_000_000],
            timeout_ms: 10_000,
            max_concurrency: 32,
            max_concurrency_per_tenant: 8,
            poll_ms: 200,
            secret_keys_file: None,
        }
    }
}

impl WebhooksConfig {
    /// The keyring of `secret_keys_file`; an error naming the key when it is not set.
    pub fn keyring(&self) -> Result<crate::seal::Keyring, crate::seal::SealError> {
        match &self.secret_keys_file {
            Some(path) => crate::seal::Keyring::load(path),
            None => Err(crate::seal::SealError::NotConfigured),
        }
    }

    pub fn policy(&self) -> crate::webhook::TargetPolicy {
        crate::webhook::TargetPolicy {
            allow_private: self.allow_private_targets,
            allow_loopback: self.allow_loopback_targets,
        }
    }
}

impl Default for TenantDefaults {
    fn default() -> Self {
        Self { weight: 1, tier: "interactive".into(), max_queued: 0, max_in_flight: 0, rpm: 0, tpm: 0 }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            discover_ms: 1_000,
            max_fetch: 32,
            min_share_normal: 0.2,
            min_share_batch: 0.05,
            idle_consumer_ms: 600_000,
            default_max_tokens: 256,
            tenants_refresh_ms: 5_000,
            repair_ms: 10_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { filter: "info".into(), format: "text".into() }
    }
}

pub fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

impl Config {
    /// Loads defaults, then `file` if given, then the `SLUICE__…` entries of
    /// `env`, and validates the result. Tests pass their own `env` instead of
    /// calling `set_var`.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut root = toml::Table::new();
        if let Some(path) = file {
            let shown = path.display().to_string();
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
            root = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Parse { path: shown, message: e.message().to_owned() })?;
        }
        for (name, value) in env {
            let Some(path) = name.strip_prefix("SLUICE__") else {
                continue;
            };
            let segments: Vec<String> = path.split("__").map(str::to_lowercase).collect();
            set_path(&mut root, &segments, env_value(&value))
                .map_err(|message| ConfigError::key(name.clone(), message))?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(root))
            .map_err(|e| ConfigError::key(e.path().to_string(), e.inner().message().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules that types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.upstream.max_response_memory_bytes < self.upstream.max_response_bytes {
            return Err(ConfigError::key(
                "upstream.max_response_memory_bytes",
                "must be at least upstream.max_response_bytes (one answer of the largest size must fit)",
            ));
        }
        if self.nats.user.is_some() && self.nats.password.is_empty() {
            return Err(ConfigError::key("nats.password", "required with nats.user"));
        }
        let positive = [
            ("nats.connect_timeout_ms", self.nats.connect_timeout_ms),
            ("nats.request_timeout_ms", self.nats.request_timeout_ms),
            ("nats.bodies_max_bytes", self.nats.bodies_max_bytes.max(0) as u64),
            ("ingress.sync_timeout_ms", self.ingress.sync_timeout_ms),
            ("ingress.max_body_bytes", self.ingress.max_body_bytes as u64),
            ("ingress.max_body_memory_bytes", self.ingress.max_body_memory_bytes as u64),
            ("ingress.max_in_flight", self.ingress.max_in_flight as u64),
            ("ingress.auth_refresh_ms", self.ingress.auth_refresh_ms),
            ("ingress.max_connections", self.ingress.max_connections as u64),
            ("ingress.header_timeout_ms", self.ingress.header_timeout_ms),
            ("ingress.body_timeout_ms", self.ingress.body_timeout_ms),
            ("ingress.write_timeout_ms", self.ingress.write_timeout_ms),
            ("ingress.stream_buffer_chunks", self.ingress.stream_buffer_chunks as u64),
            ("ingress.stream_buffer_bytes", self.ingress.stream_buffer_bytes as u64),
            ("ingress.stream_chunk_gap_ms", self.ingress.stream_chunk_gap_ms),
            ("ingress.stream_keepalive_ms", self.ingress.stream_keepalive_ms),
            ("worker.max_in_flight", self.worker.max_in_flight as u64),
            ("worker.ack_wait_ms", self.worker.ack_wait_ms),
            ("worker.max_attempts", u64::from(self.worker.max_attempts)),
            ("worker.ledger_batch", self.worker.ledger_batch as u64),
            ("upstream.connect_timeout_ms", self.upstream.connect_timeout_ms),
            ("upstream.request_timeout_ms", self.upstream.request_timeout_ms),
            ("upstream.response_header_timeout_ms", self.upstream.response_header_timeout_ms),
            ("upstream.max_response_bytes", self.upstream.max_response_bytes as u64),
            ("upstream.breaker_failures", u64::from(self.upstream.breaker_failures)),
            ("upstream.breaker_open_ms", self.upstream.breaker_open_ms),
            ("jobs.retention_ms", self.jobs.retention_ms),
            ("jobs.default_expiry_ms", self.jobs.default_expiry_ms),
            ("jobs.max_expiry_ms", self.jobs.max_expiry_ms),
            ("webhooks.timeout_ms", self.webhooks.timeout_ms),
            ("webhooks.max_concurrency", self.webhooks.max_concurrency as u64),
            ("webhooks.max_concurrency_per_tenant", self.webhooks.max_concurrency_per_tenant as u64),
            ("webhooks.poll_ms", self.webhooks.poll_ms),
            ("tenants.weight", u64::from(self.tenants.weight)),
            ("scheduler.discover_ms", self.scheduler.discover_ms),
            ("scheduler.max_fetch", self.scheduler.max_fetch as u64),
            ("scheduler.idle_consumer_ms", self.scheduler.idle_consumer_ms),
            ("scheduler.tenants_refresh_ms", self.scheduler.tenants_refresh_ms),
            ("scheduler.repair_ms", self.scheduler.repair_ms),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::key(key, "must be greater than zero"));
            }
        }
        self.scaler.validate()?;
        if self.scheduler.default_max_tokens > pools::MAX_OUTPUT_TOKENS_LIMIT {
            return Err(ConfigError::key(
                "scheduler.default_max_tokens",
                format!("must be at most {}", pools::MAX_OUTPUT_TOKENS_LIMIT),
            ));
        }
        if !(0.0..=0.5).contains(&self.upstream.budget_headroom) {
            return Err(ConfigError::key("upstream.budget_headroom", "must be between 0 and 0.5"));
        }
        if !(0.0..=10.0).contains(&self.upstream.retry_budget_ratio) {
            return Err(ConfigError::key("upstream.retry_budget_ratio", "must be between 0 and 10"));
        }
        if self.worker.max_body_memory_bytes < self.ingress.max_body_bytes {
            return Err(ConfigError::key(
                "worker.max_body_memory_bytes",
                "must be at least ingress.max_body_bytes (a body of the largest size could never run)",
            ));
        }
        if self.ingress.max_body_memory_bytes < self.ingress.max_body_bytes {
            return Err(ConfigError::key(
                "ingress.max_body_memory_bytes",
                "must be at least ingress.max_body_bytes (a body of the largest size could never be read)",
            ));
        }
        if self.worker.ack_wait_ms < 1_000 {
            return Err(ConfigError::key("worker.ack_wait_ms", "must be at least 1000"));
        }
        if self.worker.retry_min_delay_ms > self.worker.retry_max_delay_ms {
            return Err(ConfigError::key("worker.retry_min_delay_ms", "must not exceed worker.retry_max_delay_ms"));
        }
        if self.jobs.max_expiry_ms > self.jobs.retention_ms {
            return Err(ConfigError::key(
                "jobs.max_expiry_ms",
                "must not exceed jobs.retention_ms (a queued job's state would vanish before it runs)",
            ));
        }
        if self.jobs.default_expiry_ms > self.jobs.max_expiry_ms {
            return Err(ConfigError::key("jobs.default_expiry_ms", "must not exceed jobs.max_expiry_ms"));
        }
        if !matches!(self.nats.replicas, 1 | 3 | 5) {
            return Err(ConfigError::key("nats.replicas", "must be 1, 3 or 5"));
        }
        if crate::wire::envelope::Class::parse(&self.tenants.tier).is_none() {
            return Err(ConfigError::key("tenants.tier", "must be `interactive`, `normal` or `batch`"));
        }
        if self.tenants.weight > crate::tenant::MAX_WEIGHT {
            return Err(ConfigError::key("tenants.weight", format!("must be at most {}", crate::tenant::MAX_WEIGHT)));
        }
        for (key, share) in [
            ("scheduler.min_share_normal", self.scheduler.min_share_normal),
            ("scheduler.min_share_batch", self.scheduler.min_share_batch),
        ] {
            if !(0.0..=0.5).contains(&share) {
                return Err(ConfigError::key(key, "must be between 0 and 0.5"));
            }
        }
        if self.admin.listen.is_some() {
            match &self.admin.token {
                None => return Err(ConfigError::key("admin.token", "must be set when admin.listen is")),
                Some(t) if t.expose().len() < 32 => {
                    return Err(ConfigError::key("admin.token", "must be at least 32 characters"));
                }
                Some(_) => {}
            }
        }
        if self.scheduler.idle_consumer_ms < 1_000 {
            return Err(ConfigError::key("scheduler.idle_consumer_ms", "must be at least 1000"));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::key("log.format", "must be `text` or `json`"));
        }
        for name in [
            &self.nats.jobs_stream,
            &self.nats.events_stream,
            &self.nats.counters_stream,
            &self.nats.rates_stream,
            &self.worker.consumer,
            &self.jobs.state_bucket,
        ] {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(ConfigError::key(
                    "nats.*_stream / worker.consumer / jobs.state_bucket",
                    "names may hold only letters, digits, `_` and `-`",
                ));
            }
        }
        let mut tokens = std::collections::HashSet::new();
        for (i, pool) in self.pools.iter().enumerate() {
            let key = |field: &str| format!("pools[{i}].{field}");
            if pool.name.is_empty() || pool.name.len() > 128 {
                return Err(ConfigError::key(key("name"), "must be 1 to 128 characters"));
            }
            if !tokens.insert(pool.subject_token()) {
                return Err(ConfigError::key(key("name"), "collides with another pool's name"));
            }
            pool.validate(i)?;
        }
        Ok(())
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests;
