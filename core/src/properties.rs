//! Property tests of what Sluice decodes from the outside: the job envelope
//! in NATS headers, job records from the state bucket, cron expressions,
//! RFC 3339 times. Whatever the input, decoding returns a value or an
//! error, never panics; and what Sluice writes, it reads back unchanged.

use crate::wire::envelope::{
    Endpoint, Envelope, H_DEADLINE, H_ENDPOINT, H_JOB_ID, H_POOL, H_REQUEST_ID, H_SUBMITTED, H_TENANT,
};
use crate::wire::stored::{self, StoredBody};
use proptest::prelude::*;
use uuid::Uuid;

fn header_value() -> impl Strategy<Value = String> {
    // Printable ASCII, as NATS header values are; empty and odd values included.
    prop_oneof![
        "[ -~]{0,40}",
        Just(String::new()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string()),
        Just("chat.completions".to_owned()),
        Just("messages".to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_headers_decode_or_fail_cleanly(values in proptest::collection::vec(proptest::option::of(header_value()), 7)) {
        let names = [H_JOB_ID, H_TENANT, H_POOL, H_ENDPOINT, H_DEADLINE, H_SUBMITTED, H_REQUEST_ID];
        let mut h = async_nats::HeaderMap::new();
        for (name, value) in names.iter().zip(&values) {
            if let Some(v) = value {
                h.insert(*name, v.as_str());
            }
        }
        if let Ok(env) = Envelope::from_headers(Some(&h)) {
            // Whatever decoded, encodes and decodes to the same envelope.
            prop_assert_eq!(Envelope::from_headers(Some(&env.to_headers())).unwrap(), env);
        }
    }

    #[test]
    fn envelopes_round_trip(
        job in any::<u128>(), tenant in any::<u128>(), pool in "[a-zA-Z0-9._-]{1,64}",
        endpoint in prop_oneof![Just(Endpoint::ChatCompletions), Just(Endpoint::Embeddings), Just(Endpoint::Messages)],
        reply in proptest::option::of("_SLUICE\\.reply\\.[a-z0-9]{1,20}\\.[0-9]{1,12}"), deadline in any::<u64>(), submitted in any::<u64>(),
        request_id in "[!-~]{1,64}", est in any::<u64>(), counted in any::<bool>(),
        window in proptest::option::of(any::<u64>()), stream in any::<bool>(),
        stored in proptest::option::of((any::<u64>(), any::<bool>())),
        wait_until in proptest::option::of(any::<u64>()), kept in any::<bool>(), confirm in any::<bool>(),
    ) {
        let body_ref = stored.map(|(size, result)| {
            let kind = if result { stored::Kind::Result } else { stored::Kind::Request };
            StoredBody { name: stored::name(kind, Uuid::from_u128(tenant), Uuid::from_u128(job)), size }
        });
        let env = Envelope {
            job_id: Uuid::from_u128(job), tenant: Uuid::from_u128(tenant), pool, endpoint, reply,
            deadline_ms: deadline, submitted_ms: submitted, request_id, traceparent: None,
            est_tokens: est, queued_counted: counted, tpm_window: window, stream, body_ref,
            wait_until_ms: wait_until, kept, confirm,
        };
        prop_assert_eq!(Envelope::from_headers(Some(&env.to_headers())).unwrap(), env);
    }

    #[test]
    fn job_records_from_any_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = serde_json::from_slice::<crate::jobstate::JobRecord>(&bytes);
    }

    #[test]
    fn cron_expressions_parse_or_fail(expr in "[0-9*/,\\- ]{0,40}", secs in 0u64..4_102_444_800) {
        if let Ok(cron) = crate::clock::Cron::parse(&expr) {
            let _ = cron.matches(&crate::clock::Civil::from_unix(secs));
        }
    }

    #[test]
    fn civil_times_round_trip_through_rfc3339(secs in 0u64..253_402_300_799) {
        let c = crate::clock::Civil::from_unix(secs);
        let text = format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", c.year, c.month, c.day, c.hour, c.minute, c.second);
        prop_assert_eq!(crate::clock::rfc3339_ms(&text), Some(secs * 1000));
    }

    #[test]
    fn rfc3339_of_anything_parses_or_fails(text in "\\PC{0,40}") {
        let _ = crate::clock::rfc3339_ms(&text);
    }
}
