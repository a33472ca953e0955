//! A worker's answer to the ingress waiting for it, on the request's reply
//! subject (`_SLUICE.reply.<ingress>.<slot>`, core NATS): built by
//! [`Reply::encode`] in the worker and read by [`Reply::decode`] in the
//! ingress, nowhere else.
//!
//! Like the envelope, a reply's payload is the body and everything else
//! travels in headers:
//!
//! | header | on | what it says |
//! | --- | --- | --- |
//! | `Sluice-Chunk` | chunk | position of a streamed chunk, from 0 (its presence makes the message a chunk) |
//! | `Sluice-Event` | chunk | the server-sent event's name, when it has one |
//! | `Sluice-Attempts` | both | the delivery that sent it |
//! | `Sluice-Status` | answer | the HTTP status the client gets |
//! | `Sluice-Job-Id`, `-Tenant`, `-Pool`, `-Endpoint`, `-Submitted-Ms`, `-Deadline-Ms` | answer | the job, so an ingress whose client left can store the outcome |
//! | `Sluice-Stream-End` | answer | the last message of a streamed answer |
//! | `Sluice-Error-Code`, `-Error-Param`, `-Retry-After` | answer | a structured error; the payload is its message |
//! | `Sluice-Usage` | answer | `prompt,completion,total` tokens, each empty when unknown |
//! | `Sluice-Pass-<name>` | answer | a header for the client's response |
//! | `Sluice-Body-Ref` | answer | `<size> <name>`: the body is in the bodies bucket, the payload empty ([`super::stored`]) |
//! | `Sluice-Stored` | answer | the worker stored the outcome as the job's state: an ingress whose client left stores nothing, and a body in the bodies bucket is the job's result, kept |
//!
//! An error stays structured until the edge: the worker never renders an
//! error body, the ingress renders it once in the dialect of the client's
//! route ([`crate::error::Dialect`]).

use async_nats::HeaderMap;
use bytes::Bytes;
use uuid::Uuid;

use super::envelope::{Endpoint, Envelope, H_DEADLINE, H_ENDPOINT, H_JOB_ID, H_POOL, H_SUBMITTED, H_TENANT};
use super::stored::{H_BODY_REF, StoredBody};
use crate::error::{ApiError, ErrorCode};
use crate::event::Usage;

const H_CHUNK: &str = "Sluice-Chunk";
const H_EVENT: &str = "Sluice-Event";
const H_ATTEMPTS: &str = "Sluice-Attempts";
const H_STATUS: &str = "Sluice-Status";
const H_STREAM_END: &str = "Sluice-Stream-End";
const H_ERROR_CODE: &str = "Sluice-Error-Code";
const H_ERROR_PARAM: &str = "Sluice-Error-Param";
const H_RETRY_AFTER: &str = "Sluice-Retry-After";
const H_USAGE: &str = "Sluice-Usage";
const H_PASS: &str = "Sluice-Pass-";
const H_STORED: &str = "Sluice-Stored";

/// The job an answer belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRef {
    pub job_id: Uuid,
    pub tenant: Uuid,
    pub pool: String,
    pub endpoint: Endpoint,
    pub submitted_ms: u64,
    pub deadline_ms: u64,
}

impl JobRef {
    pub fn of(env: &Envelope) -> Self {
        Self {
            job_id: env.job_id,
            tenant: env.tenant,
            pool: env.pool.clone(),
            endpoint: env.endpoint,
            submitted_ms: env.submitted_ms,
            deadline_ms: env.deadline_ms,
        }
    }
}

/// What the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A body already in the client's API: the provider's answer, or the
    /// refusal of a provider that speaks the client's API, as it came.
    Body { status: u16, body: Bytes },
    /// Such a body, too large for a message, kept in the bodies bucket.
    Stored { status: u16, body: StoredBody },
    /// Sluice's own error (or a refusal translated from another API),
    /// rendered by the ingress.
    Error(ApiError),
}

impl Outcome {
    pub fn status(&self) -> u16 {
        match self {
            Outcome::Body { status, .. } | Outcome::Stored { status, .. } => *status,
            Outcome::Error(e) => e.status,
        }
    }
}

/// A job's answer: the whole of it, or the end of a streamed one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub job: JobRef,
    pub attempt: u32,
    pub outcome: Outcome,
    /// The last message of a streamed answer (its chunks went before; a
    /// body, if any, is empty).
    pub ends_stream: bool,
    /// Tokens the provider reported, when it did.
    pub usage: Option<Usage>,
    /// Headers for the client's response, lowercase names.
    pub headers: Vec<(String, String)>,
    /// The worker stored the outcome as the job's state (`GET /v1/jobs/{id}`
    /// finds it): nobody else stores it, and a stored body is the job's result.
    pub stored: bool,
}

/// One event of a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub index: u64,
    pub attempt: u32,
    /// The server-sent event's name (Anthropic's streams name every event).
    pub event: Option<String>,
    pub data: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Answer(Box<Answer>),
    Chunk(Chunk),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplyError {
    #[error("reply has no headers")]
    NoHeaders,
    #[error("reply header {0} is missing")]
    Missing(&'static str),
    #[error("reply header {0} is malformed")]
    Malformed(&'static str),
}

/// A header value without the characters NATS headers cannot hold.
fn header_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

fn number(n: Option<i32>) -> String {
    n.map(|n| n.to_string()).unwrap_or_default()
}

impl Answer {
    /// The answer's headers and payload (what [`Reply::encode`] sends for it,
    /// without building a `Reply`).
    pub fn encode(&self) -> (HeaderMap, Bytes) {
        let a = self;
        let mut h = HeaderMap::new();
        h.insert(H_STATUS, a.outcome.status().to_string().as_str());
        h.insert(H_ATTEMPTS, a.attempt.to_string().as_str());
        h.insert(H_JOB_ID, a.job.job_id.to_string().as_str());
        h.insert(H_TENANT, a.job.tenant.to_string().as_str());
        h.insert(H_POOL, a.job.pool.as_str());
        h.insert(H_ENDPOINT, a.job.endpoint.as_str());
        h.insert(H_SUBMITTED, a.job.submitted_ms.to_string().as_str());
        h.insert(H_DEADLINE, a.job.deadline_ms.to_string().as_str());
        if a.ends_stream {
            h.insert(H_STREAM_END, "1");
        }
        if a.stored {
            h.insert(H_STORED, "1");
        }
        if let Some(u) = &a.usage {
            let usage =
                format!("{},{},{}", number(u.prompt_tokens), number(u.completion_tokens), number(u.total_tokens));
            h.insert(H_USAGE, usage.as_str());
        }
        for (name, value) in &a.headers {
            h.insert(format!("{H_PASS}{name}").as_str(), header_safe(value).as_str());
        }
        match &a.outcome {
            Outcome::Body { body, .. } => (h, body.clone()),
            Outcome::Stored { body, .. } => {
                h.insert(H_BODY_REF, body.header_value().as_str());
                (h, Bytes::new())
            }
            Outcome::Error(e) => {
                h.insert(H_ERROR_CODE, e.code.as_str());
                if let Some(p) = &e.param {
                    h.insert(H_ERROR_PARAM, header_safe(p).as_str());
                }
                if let Some(secs) = e.retry_after_secs {
                    h.insert(H_RETRY_AFTER, secs.to_string().as_str());
                }
                (h, Bytes::from(e.message.clone().into_bytes()))
            }
        }
    }
}

impl Reply {
    pub fn encode(&self) -> (HeaderMap, Bytes) {
        let mut h = HeaderMap::new();
        match self {
            Reply::Chunk(c) => {
                h.insert(H_CHUNK, c.index.to_string().as_str());
                h.insert(H_ATTEMPTS, c.attempt.to_string().as_str());
                if let Some(name) = &c.event {
                    h.insert(H_EVENT, header_safe(name).as_str());
                }
                (h, c.data.clone())
            }
            Reply::Answer(a) => a.encode(),
        }
    }

    pub fn decode(headers: Option<&HeaderMap>, payload: Bytes) -> Result<Self, ReplyError> {
        let h = headers.ok_or(ReplyError::NoHeaders)?;
        let get = |name: &'static str| h.get(name).map(|v| v.as_str());
        let need = |name: &'static str| get(name).ok_or(ReplyError::Missing(name));
        let parse = |name: &'static str| need(name)?.parse::<u64>().map_err(|_| ReplyError::Malformed(name));
        let attempt = u32::try_from(parse(H_ATTEMPTS)?).map_err(|_| ReplyError::Malformed(H_ATTEMPTS))?;
        if get(H_CHUNK).is_some() {
            return Ok(Reply::Chunk(Chunk {
                index: parse(H_CHUNK)?,
                attempt,
                event: get(H_EVENT).map(str::to_owned),
                data: payload,
            }));
        }
        let uuid = |name: &'static str| need(name)?.parse::<Uuid>().map_err(|_| ReplyError::Malformed(name));
        let status = u16::try_from(parse(H_STATUS)?).map_err(|_| ReplyError::Malformed(H_STATUS))?;
        let job = JobRef {
            job_id: uuid(H_JOB_ID)?,
            tenant: uuid(H_TENANT)?,
            pool: need(H_POOL)?.to_owned(),
            endpoint: Endpoint::parse(need(H_ENDPOINT)?).ok_or(ReplyError::Malformed(H_ENDPOINT))?,
            submitted_ms: parse(H_SUBMITTED)?,
            deadline_ms: parse(H_DEADLINE)?,
        };
        let usage = match get(H_USAGE) {
            None => None,
            Some(text) => Some(usage(text).ok_or(ReplyError::Malformed(H_USAGE))?),
        };
        let mut headers: Vec<(String, String)> = h
            .iter()
            .filter_map(|(name, values)| {
                let name = AsRef::<str>::as_ref(name).strip_prefix(H_PASS)?;
                Some((name.to_owned(), values.last()?.as_str().to_owned()))
            })
            .collect();
        headers.sort();
        let outcome = match (get(H_ERROR_CODE), get(H_BODY_REF)) {
            (None, None) => Outcome::Body { status, body: payload },
            (None, Some(stored)) => {
                Outcome::Stored { status, body: StoredBody::parse(stored).ok_or(ReplyError::Malformed(H_BODY_REF))? }
            }
            (Some(code), _) => Outcome::Error(ApiError {
                code: ErrorCode::parse(code).ok_or(ReplyError::Malformed(H_ERROR_CODE))?,
                status,
                message: String::from_utf8_lossy(&payload).into_owned(),
                param: get(H_ERROR_PARAM).map(str::to_owned),
                retry_after_secs: match get(H_RETRY_AFTER) {
                    None => None,
                    Some(_) => Some(parse(H_RETRY_AFTER)?),
                },
                job_id: None,
            }),
        };
        let ends_stream = get(H_STREAM_END).is_some();
        let stored = get(H_STORED).is_some();
        Ok(Reply::Answer(Box::new(Answer { job, attempt, outcome, ends_stream, usage, headers, stored })))
    }
}

/// `prompt,completion,total`, each empty when unknown.
fn usage(text: &str) -> Option<Usage> {
    let mut parts = text.split(',').map(|p| if p.is_empty() { Ok(None) } else { p.parse::<i32>().map(Some) });
    let (Some(Ok(prompt)), Some(Ok(completion)), Some(Ok(total)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some(Usage { prompt_tokens: prompt, completion_tokens: completion, total_tokens: total })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::stored;
    use super::*;

    fn endpoint() -> impl Strategy<Value = Endpoint> {
        prop::sample::select(vec![Endpoint::ChatCompletions, Endpoint::Embeddings, Endpoint::Messages])
    }

    fn job() -> impl Strategy<Value = JobRef> {
        (any::<u128>(), any::<u128>(), "[a-zA-Z0-9._-]{1,64}", endpoint(), any::<u64>(), any::<u64>()).prop_map(
            |(job, tenant, pool, endpoint, submitted_ms, deadline_ms)| JobRef {
                job_id: Uuid::from_u128(job),
                tenant: Uuid::from_u128(tenant),
                pool,
                endpoint,
                submitted_ms,
                deadline_ms,
            },
        )
    }

    fn error() -> impl Strategy<Value = ApiError> {
        (
            prop::sample::select(ErrorCode::ALL.to_vec()),
            100..600u16,
            "\\PC{0,80}",
            proptest::option::of("[!-~][ -~]{0,30}[!-~]"),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(code, status, message, param, retry_after_secs)| ApiError {
                code,
                status,
                message,
                param,
                retry_after_secs,
                job_id: None,
            })
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            (100..600u16, proptest::collection::vec(any::<u8>(), 0..256))
                .prop_map(|(status, body)| Outcome::Body { status, body: Bytes::from(body) }),
            (100..600u16, any::<u64>(), any::<u128>(), any::<u128>()).prop_map(|(status, size, t, j)| {
                let name = stored::name(stored::Kind::Result, Uuid::from_u128(t), Uuid::from_u128(j));
                Outcome::Stored { status, body: StoredBody { name, size } }
            }),
            error().prop_map(Outcome::Error),
        ]
    }

    fn usage() -> impl Strategy<Value = Option<Usage>> {
        let n = || proptest::option::of(any::<i32>());
        proptest::option::of((n(), n(), n()).prop_map(|(p, c, t)| Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: t,
        }))
    }

    fn answer() -> impl Strategy<Value = Reply> {
        let pass = proptest::collection::btree_map("[a-z][a-z0-9-]{0,20}", "[!-~]([ -~]{0,30}[!-~])?", 0..4);
        (job(), any::<u32>(), outcome(), any::<bool>(), usage(), pass, any::<bool>()).prop_map(
            |(job, attempt, outcome, ends_stream, usage, pass, stored)| {
                let headers = pass.into_iter().collect();
                Reply::Answer(Box::new(Answer { job, attempt, outcome, ends_stream, usage, headers, stored }))
            },
        )
    }

    fn chunk() -> impl Strategy<Value = Reply> {
        (
            any::<u64>(),
            any::<u32>(),
            proptest::option::of("[a-z_]{1,24}"),
            proptest::collection::vec(any::<u8>(), 0..256),
        )
            .prop_map(|(index, attempt, event, data)| Reply::Chunk(Chunk { index, attempt, event, data: data.into() }))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn every_reply_round_trips_through_headers(reply in prop_oneof![answer(), chunk()]) {
            let (headers, payload) = reply.encode();
            prop_assert_eq!(Reply::decode(Some(&headers), payload), Ok(reply));
        }

        #[test]
        fn any_headers_decode_or_fail_cleanly(
            values in proptest::collection::vec(proptest::option::of("[ -~]{0,24}"), 13),
        ) {
            let names = [H_CHUNK, H_ATTEMPTS, H_STATUS, H_JOB_ID, H_TENANT, H_POOL, H_ENDPOINT, H_SUBMITTED,
                H_DEADLINE, H_ERROR_CODE, H_USAGE, H_RETRY_AFTER, H_BODY_REF];
            let mut h = HeaderMap::new();
            for (name, value) in names.iter().zip(&values) {
                if let Some(v) = value {
                    h.insert(*name, v.as_str());
                }
            }
            if let Ok(reply) = Reply::decode(Some(&h), Bytes::new()) {
                let (headers, payload) = reply.encode();
                prop_assert_eq!(Reply::decode(Some(&headers), payload), Ok(reply));
            }
        }
    }

    #[test]
    fn missing_or_bad_headers_are_named() {
        assert_eq!(Reply::decode(None, Bytes::new()), Err(ReplyError::NoHeaders));
        let mut h = HeaderMap::new();
        h.insert(H_ATTEMPTS, "1");
        assert_eq!(Reply::decode(Some(&h), Bytes::new()), Err(ReplyError::Missing(H_STATUS)));
        h.insert(H_STATUS, "200");
        h.insert(H_JOB_ID, "not a uuid");
        assert_eq!(Reply::decode(Some(&h), Bytes::new()), Err(ReplyError::Malformed(H_JOB_ID)));
    }
}
