//! A body kept in the bodies bucket (JetStream's object store) instead of in
//! a message, because it is larger than a NATS message can carry: a request
//! body on the job's envelope, an answer on the worker's reply, a result in
//! the job's state. The message carries this reference; [`crate::bodies`]
//! stores and reads the bytes.
//!
//! On the wire the reference is one header value, `<size> <name>`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The header of a job message or a reply whose body is stored apart (the
/// message's payload is then empty).
pub const H_BODY_REF: &str = "Sluice-Body-Ref";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBody {
    /// Object name in the bodies bucket.
    pub name: String,
    /// Length in bytes.
    pub size: u64,
}

/// What a stored body is, in its object name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A job's request body, written by the ingress.
    Request,
    /// A job's answer, written by the worker.
    Result,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Request => "req",
            Kind::Result => "res",
        }
    }
}

/// The object name of a job's request body or result: the tenant is in the
/// name, as it is in every key of the job-state bucket.
pub fn name(kind: Kind, tenant: Uuid, job: Uuid) -> String {
    format!("{}.{}.{}", kind.prefix(), tenant.simple(), job.simple())
}

/// A name of its own for one writer's copy (`<name>.<random>`): two submits
/// of one job (an idempotent retry racing its first) never write or delete
/// each other's body.
pub fn copy_name(kind: Kind, tenant: Uuid, job: Uuid) -> String {
    format!("{}.{}", name(kind, tenant, job), Uuid::new_v4().simple())
}

impl StoredBody {
    pub fn header_value(&self) -> String {
        format!("{} {}", self.size, self.name)
    }

    pub fn parse(value: &str) -> Option<Self> {
        let (size, name) = value.split_once(' ')?;
        let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.');
        valid.then_some(())?;
        Some(Self { name: name.to_owned(), size: size.parse().ok()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_reference_parses_back(size in any::<u64>(), result in any::<bool>(), t in any::<u128>(), j in any::<u128>()) {
            let kind = if result { Kind::Result } else { Kind::Request };
            let stored = StoredBody { name: name(kind, Uuid::from_u128(t), Uuid::from_u128(j)), size };
            prop_assert_eq!(StoredBody::parse(&stored.header_value()), Some(stored));
        }

        #[test]
        fn any_value_parses_or_is_refused(value in ".{0,80}") {
            if let Some(stored) = StoredBody::parse(&value) {
                prop_assert_eq!(stored.header_value(), value);
            }
        }
    }

    #[test]
    fn names_that_could_leave_the_bucket_are_refused() {
        for bad in ["12", "12 ", "x req.a", "12 ../x", "12 a b", "-1 a"] {
            assert_eq!(StoredBody::parse(bad), None, "{bad}");
        }
    }
}
