//! Property tests of what the worker decodes from providers and clients:
//! request translation, answers, stream events and rate-limit headers.
//! Whatever the bytes, each returns a value or an error, never panics.

use proptest::prelude::*;
use sluice_core::wire::envelope::Endpoint;

use crate::upstream::providers::{self, translate};

fn endpoint() -> impl Strategy<Value = Endpoint> {
    prop_oneof![Just(Endpoint::ChatCompletions), Just(Endpoint::Embeddings), Just(Endpoint::Messages)]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        // JSON-looking text built from the fields translation reads.
        proptest::collection::vec(
            prop_oneof![
                Just(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]"#.to_owned()),
                Just(r#","system":"#.to_owned()),
                Just(r#","stop":["a"]"#.to_owned()),
                Just(r#","max_tokens":"#.to_owned()),
                Just(r#"[{"type":"image_url"}]"#.to_owned()),
                Just("}".to_owned()),
                "[ -~]{0,12}",
            ],
            0..8
        )
        .prop_map(|parts| parts.concat().into_bytes()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn requests_translate_or_fail(bytes in body(), api in endpoint()) {
        for kind in [sluice_core::config::ProviderKind::Openai, sluice_core::config::ProviderKind::Anthropic] {
            let _ = providers::of(kind).request(api, &bytes, "upstream-model");
        }
    }

    #[test]
    fn answers_translate_or_pass_through(bytes in body()) {
        let _ = translate::chat_to_messages_answer(&bytes);
        let _ = translate::messages_to_chat_answer(&bytes);
    }

    #[test]
    fn stream_events_translate_or_are_skipped(
        events in proptest::collection::vec((proptest::option::of("[a-z_]{0,20}"), "\\PC{0,60}"), 0..12),
        api in endpoint(),
    ) {
        for kind in [sluice_core::config::ProviderKind::Openai, sluice_core::config::ProviderKind::Anthropic] {
            let mut relay = providers::of(kind).stream(api);
            for (name, data) in &events {
                let _ = relay.event(name.as_deref(), data);
            }
            let _ = relay.finish();
        }
    }

    #[test]
    fn rate_headers_of_any_value_are_read_or_ignored(values in proptest::collection::vec("[ -~]{0,24}", 8)) {
        let names = ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens", "retry-after", "anthropic-ratelimit-requests-reset",
            "anthropic-ratelimit-tokens-reset", "anthropic-ratelimit-requests-remaining"];
        let mut h = http::HeaderMap::new();
        for (n, v) in names.iter().zip(&values) {
            if let Ok(v) = http::HeaderValue::from_str(v) {
                h.insert(*n, v);
            }
        }
        for kind in [sluice_core::config::ProviderKind::Openai, sluice_core::config::ProviderKind::Anthropic] {
            let _ = providers::of(kind).limits(&h);
        }
    }
}
