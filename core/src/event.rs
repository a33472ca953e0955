//! Job outcome events: the worker publishes one to the events stream when a
//! job ends (or is retried), and the ledger loop writes them to Postgres.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::wire::envelope::Envelope;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    Expired,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled | Self::Expired)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub total_tokens: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job_id: Uuid,
    pub tenant_id: Uuid,
    pub pool: String,
    pub endpoint: String,
    pub status: JobStatus,
    /// Deliveries so far, this one included.
    pub attempts: i32,
    pub upstream_status: Option<i32>,
    #[serde(default)]
    pub usage: Usage,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub request_id: String,
    pub submitted_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Client metadata of an asynchronous job, as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// Upstream calls of this run that timed out or broke off after the
    /// request was sent (the provider may have billed them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unanswered_calls: i32,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

impl JobEvent {
    pub fn from_envelope(env: &Envelope, status: JobStatus, attempts: i32) -> Self {
        Self {
            job_id: env.job_id,
            tenant_id: env.tenant,
            pool: env.pool.clone(),
            endpoint: env.endpoint.as_str().to_owned(),
            status,
            attempts,
            upstream_status: None,
            usage: Usage::default(),
            error_code: None,
            error_message: None,
            request_id: env.request_id.clone(),
            submitted_ms: env.submitted_ms,
            started_ms: None,
            finished_ms: None,
            metadata: None,
            expires_ms: None,
            unanswered_calls: 0,
        }
    }
}
