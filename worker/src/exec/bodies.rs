//! Bodies too large for a NATS message ([`sluice_core::bodies`]), on the
//! worker's side: the request body the ingress stored apart, read before the
//! call; an answer too large for the reply, stored before it is sent.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use sluice_core::bodies::BodyError;
use sluice_core::error::{ApiError, ErrorCode};
use sluice_core::event::JobStatus;
use sluice_core::wire::envelope::Envelope;
use sluice_core::wire::{reply, stored};

use crate::exec::job::JobContext;
use crate::exec::outcome::{Outcome, failed};

/// Why a job's request body is not at hand.
pub(crate) enum RequestBody {
    /// It can never be read (gone, or larger than this worker accepts): the
    /// job fails with this.
    Unreadable(Outcome),
    /// The bodies bucket failed; the job went back to the queue.
    Later,
}

/// A request body read from the bodies bucket, with its bytes of the
/// worker's body budget (`worker.max_body_memory_bytes`), held until the job
/// is done with it.
pub(crate) type BodyPermit = Option<tokio::sync::OwnedSemaphorePermit>;

/// The request body: the message's payload, or the body the ingress stored
/// apart because a message could not carry it. A stored body first takes
/// its size from the worker's body budget, all at once (so jobs waiting for
/// it never hold part of it): a backlog of large bodies runs as many at a
/// time as the budget holds instead of exhausting the worker.
pub(crate) async fn request_body(
    ctx: &JobContext,
    message: &jetstream::Message,
    env: &Envelope,
) -> Result<(Bytes, BodyPermit), RequestBody> {
    let Some(stored) = &env.body_ref else { return Ok((message.payload.clone(), None)) };
    // (`max_body_memory` fits a u32: the budget is a semaphore.)
    let Some(n) = u32::try_from(stored.size).ok().filter(|n| *n as usize <= ctx.max_body_memory) else {
        let limit = ctx.max_body_memory;
        let message = format!("the request body is {} bytes, more than this worker's {limit}", stored.size);
        let error = ApiError::new(ErrorCode::PayloadTooLarge, format!("{message} (worker.max_body_memory_bytes)"));
        return Err(RequestBody::Unreadable(failed(error, None)));
    };
    let Ok(permit) = ctx.body_budget.clone().acquire_many_owned(n).await else { return Err(RequestBody::Later) };
    match ctx.bodies.read(stored, ctx.max_body_bytes).await {
        Ok(body) => Ok((body, Some(permit))),
        Err(error @ BodyError::Store(_)) => {
            tracing::warn!(%error, "cannot read the stored request body; retrying in 1 s");
            let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            Err(RequestBody::Later)
        }
        Err(error @ BodyError::TooLarge { .. }) => Err(RequestBody::Unreadable(failed(
            ApiError::new(ErrorCode::PayloadTooLarge, format!("{error} (ingress.max_body_bytes)")),
            None,
        ))),
        Err(error @ BodyError::NotFound(_)) => Err(RequestBody::Unreadable(failed(
            ApiError::new(ErrorCode::Internal, format!("the request body cannot be read: {error}")),
            None,
        ))),
    }
}

/// An answer too large for a NATS message goes to the bodies bucket, and the
/// reply and the job's state carry its reference (such an answer is JSON:
/// [`classify`] failed one that is not).
pub(crate) async fn store_if_large(
    ctx: &JobContext,
    env: &Envelope,
    status: JobStatus,
    outcome: reply::Outcome,
) -> Result<(JobStatus, reply::Outcome), BodyError> {
    let reply::Outcome::Body { status: http, body } = outcome else { return Ok((status, outcome)) };
    if !ctx.bodies.too_large_for_a_message(body.len()) {
        return Ok((status, reply::Outcome::Body { status: http, body }));
    }
    // A name of this run's own: a run that loses its job to a redelivery
    // never overwrites the answer the job's state points at.
    let name = stored::copy_name(stored::Kind::Result, env.tenant, env.job_id);
    let stored = ctx.bodies.put(name, &body).await?;
    tracing::debug!(bytes = body.len(), "answer stored apart");
    Ok((status, reply::Outcome::Stored { status: http, body: stored }))
}
