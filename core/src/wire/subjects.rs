//! Every NATS subject Sluice publishes or listens on, and the names of the
//! streams behind its key-value buckets: built and parsed here only.
//!
//! | subject | carried by | what it is |
//! | --- | --- | --- |
//! | `jobs.<pool>.<class>.<tenant>` | stream `nats.jobs_stream` | a job waiting for a worker |
//! | `sluice.wake.<pool>.<class>.<tenant>` | core NATS | a queue just got a job (no payload) |
//! | `events.job.batch` | stream `nats.events_stream` | outcome events for the ledger, batched |
//! | `_SLUICE.reply.<ingress>.<slot>` | core NATS | a worker's answer to a waiting request |
//! | `sluice.inflight.<tenant>` | stream `nats.counters_stream` | the tenant's running jobs |
//! | `sluice.queued.<tenant>` | stream `nats.counters_stream` | the tenant's queued jobs |
//! | `sluice.rate.<rpm\|tpm>.<tenant>.<window>` | stream `nats.rates_stream` | a tenant's rate window |
//! | `sluice.rate.dep.<rpm\|tpm>.<deployment>.<window>` | stream `nats.rates_stream` | a deployment's budget window |
//! | `$KV.<bucket>.<key>` | stream `KV_<bucket>` | a key of a key-value bucket |
//!
//! Names put into a subject go through [`token`] first: NATS gives `.`, `*`
//! and `>` meanings of their own.

use std::fmt;

use async_nats::jetstream::kv;
use uuid::Uuid;

use super::envelope::Class;

/// Every job subject (the jobs stream's filter).
pub const JOBS: &str = "jobs.>";
/// Every events subject (the events stream's filter).
pub const EVENTS: &str = "events.job.>";
/// Every wake-up subject.
pub const WAKES: &str = "sluice.wake.>";
/// The per-tenant counters (the counters stream's filters).
pub const COUNTERS: [&str; 2] = ["sluice.queued.*", "sluice.inflight.*"];
/// Every rate window, of tenants and of deployments (the rates stream's filter).
pub const RATES: &str = "sluice.rate.>";

const RATE_PREFIX: &str = "sluice.rate.";
const WAKE_PREFIX: &str = "sluice.wake.";
const REPLY_PREFIX: &str = "_SLUICE.reply.";

/// A subject-safe form of a name: anything but `[A-Za-z0-9_-]` becomes `_`.
pub fn token(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// The kind of a rate window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rate {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
}

impl Rate {
    pub fn as_str(self) -> &'static str {
        match self {
            Rate::Requests => "rpm",
            Rate::Tokens => "tpm",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "rpm" => Some(Rate::Requests),
            "tpm" => Some(Rate::Tokens),
            _ => None,
        }
    }
}

/// One fair queue: the jobs of one tenant, in one pool and class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue<'a> {
    /// The pool's subject token ([`token`] of its name).
    pub pool: &'a str,
    pub class: Class,
    pub tenant: Uuid,
}

/// A subject, typed. `to_string()` builds it; [`Subject::parse`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject<'a> {
    Job(Queue<'a>),
    Wake(Queue<'a>),
    Events,
    Reply { ingress: &'a str, slot: u64 },
    InFlight(Uuid),
    Queued(Uuid),
    TenantRate { rate: Rate, tenant: Uuid, window: u64 },
    DeploymentRate { rate: Rate, deployment: &'a str, window: u64 },
}

impl fmt::Display for Subject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Job(q) => write!(f, "jobs.{}.{}.{}", q.pool, q.class.as_str(), q.tenant.simple()),
            Subject::Wake(q) => write!(f, "{WAKE_PREFIX}{}.{}.{}", q.pool, q.class.as_str(), q.tenant.simple()),
            Subject::Events => f.write_str("events.job.batch"),
            Subject::Reply { ingress, slot } => write!(f, "{REPLY_PREFIX}{ingress}.{slot}"),
            Subject::InFlight(t) => write!(f, "sluice.inflight.{}", t.simple()),
            Subject::Queued(t) => write!(f, "sluice.queued.{}", t.simple()),
            Subject::TenantRate { rate, tenant, window } => {
                write!(f, "{RATE_PREFIX}{}.{}.{window}", rate.as_str(), tenant.simple())
            }
            Subject::DeploymentRate { rate, deployment, window } => {
                write!(f, "{RATE_PREFIX}dep.{}.{deployment}.{window}", rate.as_str())
            }
        }
    }
}

impl<'a> Subject<'a> {
    /// Reads a subject back; `None` for anything Sluice does not publish.
    pub fn parse(subject: &'a str) -> Option<Self> {
        let parts: Vec<&str> = subject.split('.').collect();
        let tenant = |s: &str| s.parse::<Uuid>().ok();
        let queue = |pool: &'a str, class: &str, t: &str| {
            Some(Queue { pool: non_empty(pool)?, class: Class::parse(class)?, tenant: tenant(t)? })
        };
        Some(match parts.as_slice() {
            ["jobs", pool, class, t] => Subject::Job(queue(pool, class, t)?),
            ["sluice", "wake", pool, class, t] => Subject::Wake(queue(pool, class, t)?),
            ["events", "job", "batch"] => Subject::Events,
            ["_SLUICE", "reply", ingress, slot] => {
                Subject::Reply { ingress: non_empty(ingress)?, slot: slot.parse().ok()? }
            }
            ["sluice", "inflight", t] => Subject::InFlight(tenant(t)?),
            ["sluice", "queued", t] => Subject::Queued(tenant(t)?),
            ["sluice", "rate", "dep", rate, deployment, window] => Subject::DeploymentRate {
                rate: Rate::parse(rate)?,
                deployment: non_empty(deployment)?,
                window: window.parse().ok()?,
            },
            ["sluice", "rate", rate, t, window] => {
                Subject::TenantRate { rate: Rate::parse(rate)?, tenant: tenant(t)?, window: window.parse().ok()? }
            }
            _ => return None,
        })
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The subject a job is published on.
pub fn job(pool: &str, class: Class, tenant: Uuid) -> String {
    Subject::Job(Queue { pool, class, tenant }).to_string()
}

/// The queue of a job subject.
pub fn parse_job(subject: &str) -> Option<Queue<'_>> {
    match Subject::parse(subject)? {
        Subject::Job(q) => Some(q),
        _ => None,
    }
}

/// The wake-up subject of a job subject (the same queue).
pub fn wake_of(job_subject: &str) -> Option<String> {
    parse_job(job_subject).map(|q| Subject::Wake(q).to_string())
}

/// The queue a wake-up names.
pub fn parse_wake(subject: &str) -> Option<Queue<'_>> {
    match Subject::parse(subject)? {
        Subject::Wake(q) => Some(q),
        _ => None,
    }
}

/// The subject outcome events are published on.
pub fn events() -> String {
    Subject::Events.to_string()
}

/// The subject of one reply slot of an ingress ([`replies_of`] subscribes to them all).
pub fn reply(ingress: &str, slot: u64) -> String {
    Subject::Reply { ingress, slot }.to_string()
}

/// The wildcard over every reply slot of an ingress.
pub fn replies_of(ingress: &str) -> String {
    format!("{REPLY_PREFIX}{ingress}.*")
}

/// The slot a reply subject names.
pub fn parse_reply(subject: &str) -> Option<u64> {
    match Subject::parse(subject)? {
        Subject::Reply { slot, .. } => Some(slot),
        _ => None,
    }
}

/// The tenant's jobs running now, over all workers.
pub fn in_flight(tenant: Uuid) -> String {
    Subject::InFlight(tenant).to_string()
}

/// The tenant's jobs queued or running.
pub fn queued(tenant: Uuid) -> String {
    Subject::Queued(tenant).to_string()
}

/// A tenant's rate window.
pub fn tenant_rate(rate: Rate, tenant: Uuid, window: u64) -> String {
    Subject::TenantRate { rate, tenant, window }.to_string()
}

/// A deployment's budget window (`deployment` is a [`token`]).
pub fn deployment_rate(rate: Rate, deployment: &str, window: u64) -> String {
    Subject::DeploymentRate { rate, deployment, window }.to_string()
}

/// Whether a counter subject lives in the rates stream.
pub fn is_rate(subject: &str) -> bool {
    subject.starts_with(RATE_PREFIX)
}

/// The stream behind a key-value bucket.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The subject a write to `key` of `store` goes to, as `kv::Store::put` sends
/// it (the store knows its own prefix; Sluice uses no JetStream domain).
pub fn kv_key(store: &kv::Store, key: &str) -> String {
    format!("{}{key}", store.put_prefix.as_ref().unwrap_or(&store.prefix))
}

/// The bucket and key of a key-value write's subject (`$KV.<bucket>.<key>`),
/// as a bucket's stream delivers it to a consumer.
pub fn parse_kv_key(subject: &str) -> Option<(&str, &str)> {
    let (bucket, key) = subject.strip_prefix("$KV.")?.split_once('.')?;
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn class() -> impl Strategy<Value = Class> {
        prop::sample::select(Class::ALL.to_vec())
    }

    fn rate() -> impl Strategy<Value = Rate> {
        prop::sample::select(vec![Rate::Requests, Rate::Tokens])
    }

    fn uuid() -> impl Strategy<Value = Uuid> {
        any::<u128>().prop_map(Uuid::from_u128)
    }

    /// Any name, as it becomes a token.
    fn name() -> impl Strategy<Value = String> {
        "\\PC{1,24}".prop_map(|s| token(&s))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn every_subject_parses_back(
            pool in name(), class in class(), tenant in uuid(), rate in rate(), window in any::<u64>(),
            slot in any::<u64>(), which in 0..8u8,
        ) {
            let queue = Queue { pool: &pool, class, tenant };
            let subject = match which {
                0 => Subject::Job(queue),
                1 => Subject::Wake(queue),
                2 => Subject::Events,
                3 => Subject::Reply { ingress: &pool, slot },
                4 => Subject::InFlight(tenant),
                5 => Subject::Queued(tenant),
                6 => Subject::TenantRate { rate, tenant, window },
                _ => Subject::DeploymentRate { rate, deployment: &pool, window },
            };
            let text = subject.to_string();
            prop_assert!(!text.contains(['*', '>', ' ']) && !text.contains(".."), "not a plain subject: {}", text);
            prop_assert_eq!(Subject::parse(&text), Some(subject));
        }

        #[test]
        fn a_job_subject_and_its_wake_up_name_one_queue(pool in name(), class in class(), tenant in uuid()) {
            let job = job(&pool, class, tenant);
            let wake = wake_of(&job).unwrap();
            prop_assert_eq!(parse_wake(&wake), parse_job(&job));
            prop_assert_eq!(is_rate(&tenant_rate(Rate::Tokens, tenant, 1)), true);
            prop_assert_eq!(is_rate(&queued(tenant)), false);
        }
    }

    #[test]
    fn foreign_subjects_are_not_read() {
        let t = Uuid::nil().simple().to_string();
        for s in [
            "jobs.mock.sync.x".to_owned(),
            "jobs.a.b.c.d".to_owned(),
            format!("jobs..normal.{t}"),
            format!("jobs.mock.later.{t}"),
            "_SLUICE.reply.ingress.x".to_owned(),
            format!("sluice.rate.rps.{t}.1"),
            "sluice.wake".to_owned(),
            String::new(),
        ] {
            assert_eq!(Subject::parse(&s), None, "{s}");
        }
    }

    #[test]
    fn names_become_safe_tokens() {
        let t = Uuid::nil();
        assert_eq!(
            job(&token("gpt-4.1 mini>*"), Class::Interactive, t),
            format!("jobs.gpt-4_1_mini__.interactive.{}", t.simple())
        );
        assert_eq!(kv_stream("JOB_STATE"), "KV_JOB_STATE");
        assert_eq!(parse_kv_key("$KV.JOB_STATE.a.b"), Some(("JOB_STATE", "a.b")));
        assert_eq!(parse_kv_key("$KV.JOB_STATE"), None);
        assert_eq!(parse_kv_key("jobs.a.b"), None);
    }
}
