//! The job envelope: what the ingress publishes on `jobs.<pool>.<class>.<tenant>`
//! and the worker executes.
//!
//! The payload of a job message is the client's request body, byte for byte
//! (or, for a body larger than a message can carry, nothing: `Sluice-Body-Ref`
//! names where the ingress stored it, [`super::stored`]); everything else
//! travels in NATS headers, so nothing is re-encoded on the hot path. `Sluice-Job-Id` carries the job id; `Nats-Msg-Id` (JetStream's
//! duplicate detection) is set by the ingress's publish (decision 0001).

use async_nats::HeaderMap;
use uuid::Uuid;

use super::stored::{H_BODY_REF, StoredBody};

pub const H_MSG_ID: &str = "Nats-Msg-Id";
pub const H_JOB_ID: &str = "Sluice-Job-Id";
pub const H_TENANT: &str = "Sluice-Tenant";
pub const H_POOL: &str = "Sluice-Pool";
pub const H_ENDPOINT: &str = "Sluice-Endpoint";
pub const H_REPLY: &str = "Sluice-Reply";
pub const H_DEADLINE: &str = "Sluice-Deadline-Ms";
pub const H_SUBMITTED: &str = "Sluice-Submitted-Ms";
pub const H_REQUEST_ID: &str = "Sluice-Request-Id";
pub const H_TRACEPARENT: &str = "traceparent";
/// Present on a job whose answer is streamed (`stream: true`).
pub const H_STREAM: &str = "Sluice-Stream";
/// Tokens the job is expected to use (prompt estimate plus requested output).
pub const H_EST_TOKENS: &str = "Sluice-Est-Tokens";
/// Present when the ingress counted the job in its tenant's queued-jobs
/// counter: the worker takes it off when the job leaves the queue.
pub const H_QUEUED_COUNTED: &str = "Sluice-Queued-Counted";
/// The minute window whose tokens-per-minute counter holds this job's
/// estimate; the worker corrects it by the real usage.
pub const H_TPM_WINDOW: &str = "Sluice-Tpm-Window";
/// When the waiting ingress stops waiting for a synchronous answer (ms since
/// the epoch): past it, the worker stores the outcome as the job's state.
/// Present when the waiting ingress confirms the answer it takes (a reply
/// to the answer message): a worker that gets no confirmation stores the
/// outcome as the job's state (decision 0021).
pub const H_CONFIRM: &str = "Sluice-Confirm";
pub const H_WAIT_UNTIL: &str = "Sluice-Wait-Until-Ms";
/// Present on a synchronous job whose state is in the job-state bucket from
/// its submit (it carries an `Idempotency-Key`): the worker moves it on like
/// an asynchronous job's and stores its outcome before it answers.
pub const H_KEPT: &str = "Sluice-Kept";

/// The API a job calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
    /// Anthropic's Messages API (`POST /v1/messages`).
    Messages,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Messages => "messages",
        }
    }

    /// The error envelope its clients expect.
    pub fn dialect(self) -> crate::error::Dialect {
        match self {
            Endpoint::ChatCompletions | Endpoint::Embeddings => crate::error::Dialect::OpenAi,
            Endpoint::Messages => crate::error::Dialect::Anthropic,
        }
    }

    /// Reads `chat.completions` or `embeddings`, or their paths
    /// `/v1/chat/completions`, `/v1/embeddings`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "chat.completions" | "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "embeddings" | "/v1/embeddings" => Some(Endpoint::Embeddings),
            "messages" | "/v1/messages" => Some(Endpoint::Messages),
            _ => None,
        }
    }
}

/// Scheduling class of a job, highest first: workers serve interactive
/// work before normal jobs before batch, while guaranteeing the lower classes
/// a minimum share (`scheduler.min_share_*`) so they never starve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// A client waits on the HTTP call (synchronous requests), or a job
    /// submitted with `priority: interactive`.
    Interactive,
    /// A job submitted with `POST /v1/jobs` (the default priority).
    Normal,
    /// A job submitted with `priority: batch`.
    Batch,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Interactive, Class::Normal, Class::Batch];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Interactive => "interactive",
            Class::Normal => "normal",
            Class::Batch => "batch",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "interactive" => Some(Class::Interactive),
            "normal" => Some(Class::Normal),
            "batch" => Some(Class::Batch),
            _ => None,
        }
    }

    /// The class a request runs in: the one it asks for, lowered to the
    /// tenant's tier (a batch-tier tenant's requests all run as batch).
    pub fn capped_by(self, tier: Class) -> Class {
        self.max(tier)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Everything a worker needs to know about a job, besides its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub job_id: Uuid,
    pub tenant: Uuid,
    pub pool: String,
    pub endpoint: Endpoint,
    /// Core-NATS subject on which the waiting ingress expects the answer.
    pub reply: Option<String>,
    /// Past this instant (ms since the epoch) nobody waits for the answer.
    pub deadline_ms: u64,
    pub submitted_ms: u64,
    pub request_id: String,
    pub traceparent: Option<String>,
    /// Estimated tokens (see [`H_EST_TOKENS`]); 0 when unknown.
    pub est_tokens: u64,
    pub queued_counted: bool,
    pub tpm_window: Option<u64>,
    /// The answer is streamed to the waiting ingress, chunk by chunk.
    pub stream: bool,
    /// Where the request body is, when it is not the message's payload.
    pub body_ref: Option<StoredBody>,
    /// A synchronous job: when its ingress stops waiting ([`H_WAIT_UNTIL`]).
    pub wait_until_ms: Option<u64>,
    /// A synchronous job whose state is kept in the bucket ([`H_KEPT`]).
    pub kept: bool,
    /// The waiting ingress confirms the answer ([`H_CONFIRM`]).
    pub confirm: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("job message has no headers")]
    NoHeaders,
    #[error("header {0} is missing")]
    Missing(&'static str),
    #[error("header {0} is malformed")]
    Malformed(&'static str),
}

impl Envelope {
    pub fn to_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(H_JOB_ID, self.job_id.to_string().as_str());
        h.insert(H_TENANT, self.tenant.to_string().as_str());
        h.insert(H_POOL, self.pool.as_str());
        h.insert(H_ENDPOINT, self.endpoint.as_str());
        if let Some(reply) = &self.reply {
            h.insert(H_REPLY, reply.as_str());
        }
        h.insert(H_DEADLINE, self.deadline_ms.to_string().as_str());
        h.insert(H_SUBMITTED, self.submitted_ms.to_string().as_str());
        h.insert(H_REQUEST_ID, self.request_id.as_str());
        if let Some(tp) = &self.traceparent {
            h.insert(H_TRACEPARENT, tp.as_str());
        }
        if self.est_tokens > 0 {
            h.insert(H_EST_TOKENS, self.est_tokens.to_string().as_str());
        }
        if self.queued_counted {
            h.insert(H_QUEUED_COUNTED, "1");
        }
        if let Some(w) = self.tpm_window {
            h.insert(H_TPM_WINDOW, w.to_string().as_str());
        }
        if self.stream {
            h.insert(H_STREAM, "1");
        }
        if let Some(body) = &self.body_ref {
            h.insert(H_BODY_REF, body.header_value().as_str());
        }
        if let Some(until) = self.wait_until_ms {
            h.insert(H_WAIT_UNTIL, until.to_string().as_str());
        }
        if self.kept {
            h.insert(H_KEPT, "1");
        }
        if self.confirm {
            h.insert(H_CONFIRM, "1");
        }
        h
    }

    pub fn from_headers(h: Option<&HeaderMap>) -> Result<Self, EnvelopeError> {
        let h = h.ok_or(EnvelopeError::NoHeaders)?;
        let get = |name: &'static str| h.get(name).map(|v| v.as_str());
        let need = |name: &'static str| get(name).ok_or(EnvelopeError::Missing(name));
        let uuid = |name: &'static str| need(name)?.parse::<Uuid>().map_err(|_| EnvelopeError::Malformed(name));
        let number = |name: &'static str| need(name)?.parse::<u64>().map_err(|_| EnvelopeError::Malformed(name));
        Ok(Self {
            job_id: uuid(H_JOB_ID)?,
            tenant: uuid(H_TENANT)?,
            pool: need(H_POOL)?.to_owned(),
            endpoint: Endpoint::parse(need(H_ENDPOINT)?).ok_or(EnvelopeError::Malformed(H_ENDPOINT))?,
            // Only an ingress's reply subject: a worker publishes the answer
            // there, so a forged header must not aim it at a job's state or
            // any other subject the worker may write.
            reply: match get(H_REPLY) {
                None => None,
                Some(v)
                    if matches!(super::subjects::Subject::parse(v), Some(super::subjects::Subject::Reply { .. })) =>
                {
                    Some(v.to_owned())
                }
                Some(_) => return Err(EnvelopeError::Malformed(H_REPLY)),
            },
            deadline_ms: number(H_DEADLINE)?,
            submitted_ms: number(H_SUBMITTED)?,
            request_id: need(H_REQUEST_ID)?.to_owned(),
            traceparent: get(H_TRACEPARENT).map(str::to_owned),
            est_tokens: get(H_EST_TOKENS).and_then(|v| v.parse().ok()).unwrap_or(0),
            queued_counted: get(H_QUEUED_COUNTED).is_some(),
            tpm_window: get(H_TPM_WINDOW).and_then(|v| v.parse().ok()),
            stream: get(H_STREAM).is_some(),
            body_ref: match get(H_BODY_REF) {
                None => None,
                Some(v) => Some(StoredBody::parse(v).ok_or(EnvelopeError::Malformed(H_BODY_REF))?),
            },
            wait_until_ms: match get(H_WAIT_UNTIL) {
                None => None,
                Some(v) => Some(v.parse().map_err(|_| EnvelopeError::Malformed(H_WAIT_UNTIL))?),
            },
            kept: get(H_KEPT).is_some(),
            confirm: get(H_CONFIRM).is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            job_id: Uuid::now_v7(),
            tenant: Uuid::new_v4(),
            pool: "gpt-4.1".into(),
            endpoint: Endpoint::ChatCompletions,
            reply: Some("_SLUICE.reply.abc.1".into()),
            deadline_ms: 1_700_000_000_000,
            submitted_ms: 1_699_999_999_000,
            request_id: "req-1".into(),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            est_tokens: 300,
            queued_counted: true,
            tpm_window: Some(29_000_000),
            stream: true,
            body_ref: Some(StoredBody { name: "req.a.b".into(), size: 2 << 20 }),
            wait_until_ms: Some(1_700_000_000_500),
            kept: true,
            confirm: true,
        }
    }

    #[test]
    fn envelope_round_trips_through_headers() {
        let e = sample();
        assert_eq!(Envelope::from_headers(Some(&e.to_headers())), Ok(e));
    }

    #[test]
    fn a_reply_subject_that_is_not_an_ingresss_is_refused() {
        for forged in ["$KV.JOB_STATE.a.b", "jobs.p.interactive.t", "_SLUICE.reply.x", "events.job.batch"] {
            let mut h = sample().to_headers();
            h.insert(H_REPLY, forged);
            assert_eq!(Envelope::from_headers(Some(&h)), Err(EnvelopeError::Malformed(H_REPLY)), "{forged}");
        }
    }

    #[test]
    fn missing_or_bad_headers_are_named() {
        assert_eq!(Envelope::from_headers(None), Err(EnvelopeError::NoHeaders));
        let mut h = sample().to_headers();
        h.insert(H_DEADLINE, "soon");
        assert_eq!(Envelope::from_headers(Some(&h)), Err(EnvelopeError::Malformed(H_DEADLINE)));
        let mut h = HeaderMap::new();
        h.insert(H_JOB_ID, Uuid::new_v4().to_string().as_str());
        assert_eq!(Envelope::from_headers(Some(&h)), Err(EnvelopeError::Missing(H_TENANT)));
    }

    #[test]
    fn classes_are_lowered_to_the_tier() {
        assert_eq!(Class::Interactive.capped_by(Class::Batch), Class::Batch);
        assert_eq!(Class::Batch.capped_by(Class::Interactive), Class::Batch);
        assert_eq!(Class::Interactive.capped_by(Class::Normal), Class::Normal);
    }
}
