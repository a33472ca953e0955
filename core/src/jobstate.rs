//! The state of asynchronous jobs, kept where polling is cheap: a JetStream
//! key-value bucket, one key per job (`<tenant>.<job>`), written by the
//! ingress at submit and by the worker as the job moves on. Entries expire
//! after `jobs.retention_ms`; the history stays in Postgres.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::event::{JobStatus, Usage};
use crate::wire::reply::{JobRef, Outcome};
use crate::wire::stored::StoredBody;

/// One job as clients see it on `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: Uuid,
    pub object: String,
    pub endpoint: String,
    pub model: String,
    pub status: JobStatus,
    /// Seconds since the epoch, like OpenAI's `created` fields.
    pub created_at: u64,
    pub expires_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// `started_at` in milliseconds, for the ledger's ordering. Not shown to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// `created_at` in milliseconds, for the ledger's queue waits. Not shown to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// `finished_at` in milliseconds, for the ledger. Not shown to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    /// The provider's answer, as it sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
    /// Where the answer is when it is too large for the record (a NATS
    /// message): `GET /v1/jobs/{id}` sends it as `result`, webhook events
    /// leave it out and say `result_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_ref: Option<StoredBody>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// Where the job's outcome is delivered (else the tenant's default endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookTarget>,
    /// SHA-256 of the submitted body, to refuse an `Idempotency-Key` reused
    /// for a different request. Not shown to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_hash: Option<String>,
    /// Upstream calls of the run that ended the job which timed out or broke
    /// off after the request was sent: the provider may have done, and
    /// billed, the work (`upstream.max_unanswered_repeats` bounds them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unanswered_calls: u32,
    /// Drawn at random by the submit that wrote the first state, and kept by
    /// every later write: a submit whose write was contested (a duplicate
    /// racing it, an acknowledgement lost) reads the state back and knows
    /// from this whether it holds its own write. Not shown to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// What the ledger is told of the run that ended the job and the state
    /// alone does not say (the provider's status, the tokens it reported):
    /// a redelivery of a job whose terminal event could not be recorded
    /// records it again from here. Not shown to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<LedgerNote>,
    /// The `JOBS` stream sequence of the message whose run set the job
    /// `in_progress`. A delivery of that same message carries the run on
    /// whatever its delivery count says (a consumer's new leader may deliver
    /// a message again as if for the first time); a delivery of another
    /// message of the job (a repeated publish) is a duplicate. Not shown to
    /// clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_seq: Option<u64>,
    /// JetStream's delivery count for the delivery that began the latest
    /// run. `attempts` counts runs begun; this counts how often the message
    /// was handed out, which a job handed back without running (its state
    /// not found yet, a worker stopping) raises and a consumer's new leader
    /// may restart at 1. Not shown to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<u32>,
}

/// See [`JobRecord::ledger`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LedgerNote {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<i32>,
    #[serde(default)]
    pub usage: Usage,
}

/// A new random claim for a job's first state.
pub fn new_claim() -> String {
    Uuid::new_v4().simple().to_string()
}

/// Whether two encoded states were written by the same submit (their claims match).
pub fn same_claim(a: &[u8], b: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Claimed {
        claim: Option<String>,
    }
    let claim = |v: &[u8]| serde_json::from_slice::<Claimed>(v).ok().and_then(|c| c.claim);
    matches!((claim(a), claim(b)), (Some(x), Some(y)) if x == y)
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WebhookTarget {
    pub url: String,
    /// `whsec_…`; never shown after the submit's answer.
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobError {
    pub code: String,
    pub message: String,
    /// HTTP status the job's request would have been answered with.
    pub status: u16,
}

impl JobRecord {
    /// The record as clients see it (without internal fields).
    pub fn public(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.remove("request_hash");
            object.remove("claim");
            object.remove("started_ms");
            object.remove("created_ms");
            object.remove("finished_ms");
            object.remove("ledger");
            object.remove("message_seq");
            object.remove("deliveries");
            if let Some(stored) = object.remove("result_ref") {
                object.insert("result_bytes".into(), stored["size"].clone());
            }
            if let Some(hook) = object.get_mut("webhook").and_then(|w| w.as_object_mut()) {
                hook.remove("secret");
            }
        }
        value
    }
}

impl JobRecord {
    /// A job as first stored: queued, nothing known yet but what it asks for.
    pub fn queued(id: Uuid, endpoint: &str, model: &str, submitted_ms: u64, expiry_ms: u64) -> Self {
        Self {
            id,
            object: "job".into(),
            endpoint: endpoint.into(),
            model: model.into(),
            status: JobStatus::Queued,
            created_at: submitted_ms / 1000,
            expires_at: (submitted_ms + expiry_ms) / 1000,
            started_at: None,
            started_ms: None,
            created_ms: Some(submitted_ms),
            finished_at: None,
            finished_ms: None,
            attempts: 0,
            metadata: None,
            priority: None,
            result: None,
            result_ref: None,
            error: None,
            webhook: None,
            request_hash: None,
            unanswered_calls: 0,
            claim: None,
            ledger: None,
            message_seq: None,
            deliveries: None,
        }
    }

    /// A synchronous request's job, first stored queued (its client left, or
    /// its state is replaced): what its envelope or its answer names.
    pub fn of_job(job: &JobRef) -> Self {
        Self::queued(
            job.job_id,
            job.endpoint.as_str(),
            &job.pool,
            job.submitted_ms,
            job.deadline_ms.saturating_sub(job.submitted_ms),
        )
    }

    /// Sets the outcome: the provider's answer as `result` when `status` is
    /// `completed` (a body that is not JSON makes the job `failed`), else the
    /// error: Sluice's own, or the one in a provider's refusal passed through.
    pub fn conclude(&mut self, status: JobStatus, outcome: &Outcome, now_s: u64) {
        self.status = status;
        self.finished_at = Some(now_s);
        self.finished_ms = Some(crate::now_ms().max(now_s * 1000));
        let (http_status, body) = match outcome {
            Outcome::Error(e) => {
                self.error =
                    Some(JobError { code: e.code.as_str().to_owned(), message: e.message.clone(), status: e.status });
                return;
            }
            Outcome::Body { status, body } => (*status, body),
            Outcome::Stored { status: http_status, body } => {
                if status == JobStatus::Completed {
                    self.result_ref = Some(body.clone());
                } else {
                    let message = format!("the provider refused the request ({} bytes, not kept)", body.size);
                    self.error = Some(JobError { code: "upstream_error".into(), message, status: *http_status });
                }
                return;
            }
        };
        if status == JobStatus::Completed {
            match RawValue::from_string(String::from_utf8_lossy(body).into_owned()) {
                Ok(raw) => self.result = Some(raw),
                Err(_) => {
                    self.status = JobStatus::Failed;
                    self.error = Some(JobError {
                        code: "upstream_error".into(),
                        message: "the provider's answer was not JSON".into(),
                        status: 502,
                    });
                }
            }
            return;
        }
        #[derive(Deserialize)]
        struct Envelope {
            error: Inner,
        }
        #[derive(Deserialize)]
        struct Inner {
            #[serde(default)]
            message: Option<String>,
            #[serde(default)]
            code: Option<serde_json::Value>,
        }
        let parsed = serde_json::from_slice::<Envelope>(body).ok();
        let code = parsed
            .as_ref()
            .and_then(|e| e.error.code.as_ref())
            .map_or_else(|| "upstream_error".to_owned(), |c| c.as_str().map_or_else(|| c.to_string(), str::to_owned));
        let message = parsed.and_then(|e| e.error.message).unwrap_or_else(|| "the job failed".into());
        self.error = Some(JobError { code, message, status: http_status });
    }
}

/// KV key of a job: tenant and job id in simple hex form.
pub fn key(tenant: Uuid, job: Uuid) -> String {
    format!("{}.{}", tenant.simple(), job.simple())
}

/// The tenant and job of a KV key made by [`key`].
pub fn parse_key(key: &str) -> Option<(Uuid, Uuid)> {
    let (tenant, job) = key.split_once('.')?;
    Some((Uuid::parse_str(tenant).ok()?, Uuid::parse_str(job).ok()?))
}

pub fn hash_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back() {
        let (t, j) = (Uuid::new_v4(), Uuid::now_v7());
        assert_eq!(parse_key(&key(t, j)), Some((t, j)));
        assert_eq!(parse_key("nope"), None);
    }

    #[test]
    fn a_state_is_known_by_its_claim() {
        let mut a = JobRecord::queued(Uuid::nil(), "chat.completions", "m", 1_000, 1_000);
        let mut b = a.clone();
        assert!(!same_claim(&serde_json::to_vec(&a).unwrap(), &serde_json::to_vec(&b).unwrap()), "no claims");
        a.claim = Some(new_claim());
        b.claim = Some(new_claim());
        let (ea, eb) = (serde_json::to_vec(&a).unwrap(), serde_json::to_vec(&b).unwrap());
        assert!(!same_claim(&ea, &eb), "identical submits in one millisecond still differ");
        let mut later = a.clone();
        later.status = JobStatus::Completed;
        assert!(same_claim(&ea, &serde_json::to_vec(&later).unwrap()), "a later state keeps the claim");
    }

    #[test]
    fn public_view_hides_internal_fields() {
        let mut r = JobRecord::queued(Uuid::nil(), "chat.completions", "m", 1_000, 1_000);
        r.webhook = Some(WebhookTarget { url: "https://example.com/h".into(), secret: "whsec_x".into() });
        r.request_hash = Some("abc".into());
        r.claim = Some(new_claim());
        r.ledger = Some(LedgerNote { upstream_status: Some(200), ..Default::default() });
        r.message_seq = Some(42);
        let v = r.public();
        assert!(v.get("ledger").is_none(), "the ledger's note is not the API's");
        assert!(v.get("message_seq").is_none(), "the queue's sequence is the worker's, not the API's");
        assert_eq!(v["status"], "queued");
        assert!(v.get("request_hash").is_none());
        assert!(v.get("claim").is_none());
        assert!(v.get("created_ms").is_none(), "millisecond fields are the ledger's, not the API's");
        assert_eq!(v["webhook"]["url"], "https://example.com/h");
        assert!(v["webhook"].get("secret").is_none());
    }
}
