//! One tenant's input cannot hold back or hurt another's: values Postgres
//! cannot store, numbers that overflow, sizes beyond a NATS message.

use std::time::Duration;

use sluice_core::event::{JobEvent, JobStatus, Usage};
use uuid::Uuid;

use crate::harness::{Stack, wait_for};

#[tokio::test]
async fn a_nul_in_metadata_is_refused_with_400_naming_the_field() {
    let stack = Stack::start().await;
    for metadata in [serde_json::json!({"k": "a\u{0}b"}), serde_json::json!({"k\u{0}": "v"})] {
        let body =
            serde_json::json!({"endpoint": "chat.completions", "body": Stack::chat_body("x"), "metadata": metadata});
        let r = stack.submit_job(&stack.key, &body, None).await;
        assert_eq!(r.status(), 400);
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], "metadata", "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("NUL"), "{e}");
    }
    assert_eq!(stack.mock.requests().await, 0);
}

/// POSTs `body` to `path` on the stack's ingress with `key`.
async fn post_json(stack: &Stack, path: &str, key: &str, body: &serde_json::Value) -> reqwest::Response {
    stack.http.post(format!("{}{path}", stack.base)).bearer_auth(key).json(body).send().await.unwrap()
}

fn event(tenant: Uuid, metadata: Option<&str>) -> JobEvent {
    JobEvent {
        job_id: Uuid::now_v7(),
        tenant_id: tenant,
        pool: "mock".into(),
        endpoint: "chat.completions".into(),
        status: JobStatus::Completed,
        attempts: 1,
        upstream_status: Some(200),
        usage: Usage::default(),
        error_code: None,
        error_message: None,
        request_id: "req".into(),
        submitted_ms: sluice_core::now_ms(),
        started_ms: None,
        finished_ms: Some(sluice_core::now_ms()),
        metadata: metadata.map(str::to_owned),
        expires_ms: None,
        unanswered_calls: 0,
    }
}

/// An event Postgres refuses (jsonb holds no `\u0000`), sent in one message
/// with three other tenants' events, as a worker would batch them: the
/// three reach the ledger within seconds, the refused one is parked with
/// its error, and nothing is retried forever.
#[tokio::test]
async fn a_row_postgres_refuses_is_parked_and_other_tenants_events_reach_the_ledger() {
    let stack = Stack::start().await;
    let bad = event(Uuid::now_v7(), Some(r#"{"k":"\u0000"}"#));
    let good: Vec<JobEvent> = (0..3).map(|_| event(Uuid::now_v7(), Some(r#"{"k":"v"}"#))).collect();
    let mut batch = vec![bad.clone()];
    batch.extend(good.iter().cloned());
    let nats = async_nats::connect(&stack.nats.url).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    js.publish(sluice_core::wire::subjects::events(), serde_json::to_vec(&batch).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    for e in &good {
        stack.ledger_row(e.job_id, "completed").await;
    }
    let parked: (Uuid, String, String) =
        wait_for("the refused event to be parked", Duration::from_secs(10), || async {
            sqlx::query_as("SELECT tenant_id, event, error FROM ledger_dead_letters WHERE job_id = $1")
                .bind(bad.job_id)
                .fetch_optional(&stack.db)
                .await
                .unwrap()
        })
        .await;
    assert_eq!(parked.0, bad.tenant_id);
    assert!(parked.1.contains(&bad.job_id.to_string()), "{}", parked.1);
    assert!(parked.2.to_lowercase().contains("unicode"), "Postgres' error is kept: {}", parked.2);
    let in_jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = $1")
        .bind(bad.job_id)
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(in_jobs, 0);
}

/// `max_tokens` beyond the pool's `max_output_tokens` is refused before it
/// can charge the pool's token budget (2^62 would fill a `tpm` window for
/// every tenant; 2^63 and above once wrapped the counters negative).
#[tokio::test]
async fn huge_max_tokens_on_a_budgeted_pool_are_refused_and_other_tenants_are_served() {
    let stack = Stack::start_with(|c| c.pools[0].tpm = 200_000).await;
    let huge = ["4611686018427387904", "9223372036854775808", "18446744073709551615", "18446744073709551616"];
    for n in huge {
        for (path, field) in [
            ("/v1/chat/completions", "max_tokens"),
            ("/v1/chat/completions", "max_completion_tokens"),
            ("/v1/messages", "max_tokens"),
        ] {
            let body = format!(
                r#"{{"model":"{}","messages":[{{"role":"user","content":"hi"}}],"{field}":{n}}}"#,
                crate::harness::MODEL
            );
            let r = stack
                .http
                .post(format!("{}{path}", stack.base))
                .bearer_auth(&stack.key)
                .header("content-type", "application/json")
                .header("anthropic-version", "2023-06-01")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{path} {field}={n}");
            let e: serde_json::Value = r.json().await.unwrap();
            assert!(e.to_string().contains(field), "{path} {field}={n}: {e}");
        }
    }
    assert_eq!(stack.mock.requests().await, 0, "nothing reached the provider");
    // Another tenant, asking for a sane amount, is served at once.
    let other = stack.key_of("other").await;
    let mut body = Stack::chat_body("hello");
    body["max_tokens"] = 64.into();
    let r = post_json(&stack, "/v1/chat/completions", &other, &body).await;
    assert_eq!(r.status(), 200);
    // At the limit is allowed.
    body["max_tokens"] = sluice_core::config::DEFAULT_MAX_OUTPUT_TOKENS.into();
    let r = post_json(&stack, "/v1/chat/completions", &stack.key, &body).await;
    assert_ne!(r.status(), 400, "max_tokens at the pool's limit is accepted");
}

/// An upstream answer larger than `upstream.max_response_bytes` is not
/// read further: the client gets 502 `upstream_response_too_large`, the job
/// fails once (no retry: the same request brings the same answer), and the
/// worker goes on serving.
#[tokio::test]
async fn an_answer_over_max_response_bytes_gets_502_once_and_the_worker_goes_on() {
    let stack = Stack::start_with(|c| c.upstream.max_response_bytes = 16 * 1024).await;
    let inputs: Vec<String> = (0..400).map(|i| format!("text {i}")).collect();
    let big = serde_json::json!({"model": crate::harness::MODEL, "input": inputs});
    let r = post_json(&stack, "/v1/embeddings", &stack.key, &big).await;
    assert_eq!(r.status(), 502);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_response_too_large", "{e}");
    assert_eq!(stack.mock.requests().await, 1, "not retried");
    // A small answer on the same worker is served.
    let small = serde_json::json!({"model": crate::harness::MODEL, "input": "one"});
    let r = post_json(&stack, "/v1/embeddings", &stack.key, &small).await;
    assert_eq!(r.status(), 200);
}

/// Request bodies hold at most `ingress.max_body_memory_bytes` at once:
/// while two slow clients hold the budget with 1.5 MiB uploads each, a third
/// large body is refused with 429 before it is read, a small request of
/// another tenant is still served, and once the slow clients go their bytes
/// are free again.
#[tokio::test]
async fn large_bodies_past_the_memory_budget_get_429_and_small_requests_are_served() {
    use tokio::io::AsyncWriteExt;
    let stack = Stack::start_with(|c| {
        c.ingress.max_body_bytes = 2 * 1024 * 1024;
        c.ingress.max_body_memory_bytes = 3 * 1024 * 1024 + 512 * 1024;
    })
    .await;
    let addr = stack.base.trim_start_matches("http://").to_owned();
    let declared = 1536 * 1024;
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: {declared}\r\n\r\n{{\"model\":",
            stack.key
        );
        s.write_all(head.as_bytes()).await.unwrap();
        slow.push(s);
    }
    let big = Stack::chat_body(&"x".repeat(declared));
    wait_for("a large body to be refused for memory", Duration::from_secs(10), || async {
        let r = post_json(&stack, "/v1/chat/completions", &stack.key, &big).await;
        (r.status() == 429).then_some(())
    })
    .await;
    let other = stack.key_of("other").await;
    let small = Stack::chat_body(&"y".repeat(100 * 1024));
    assert_eq!(post_json(&stack, "/v1/chat/completions", &other, &small).await.status(), 200);
    drop(slow);
    wait_for("the budget to be free again", Duration::from_secs(10), || async {
        let r = post_json(&stack, "/v1/chat/completions", &stack.key, &big).await;
        (r.status() == 200).then_some(())
    })
    .await;
}

/// A request that fails without the provider reporting usage gives its
/// estimated tokens back: failures do not use up a tenant's `tpm`.
#[tokio::test]
async fn failed_requests_give_their_token_estimates_back() {
    let stack = Stack::start_with(|c| {
        c.tenants.tpm = 1_000;
        c.worker.max_attempts = 1;
    })
    .await;
    stack.mock.faults(serde_json::json!({"error_rate": 1.0})).await;
    // Each asks for 300 output tokens: four of them, unrefunded, would hold
    // more than the tenant's 1,000 per minute.
    let mut body = Stack::chat_body("fails");
    body["max_tokens"] = 300.into();
    for _ in 0..4 {
        let status = stack.chat(&body).await.status();
        assert!(status == 502 || status == 429, "{status}");
    }
    stack.mock.faults(serde_json::json!({"error_rate": 0.0})).await;
    wait_for("a request to be admitted within the minute", Duration::from_secs(10), || async {
        (stack.chat(&body).await.status() == 200).then_some(())
    })
    .await;
}

/// A job whose stored state no longer decodes is failed, visibly, instead of
/// being handed back to the queue forever (and holding its place there).
#[tokio::test]
async fn a_job_whose_state_does_not_decode_is_failed_not_retried_forever() {
    let mut stack = Stack::start().await;
    stack.worker.take().unwrap().kill().await;
    let r = stack.submit_job(&stack.key, &Stack::job_body("poisoned"), None).await;
    assert_eq!(r.status(), 202);
    let id: Uuid = r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
    let tenant: Uuid = sqlx::query_scalar("SELECT tenant_id FROM api_keys WHERE id = $1")
        .bind(stack.key_id)
        .fetch_one(&stack.db)
        .await
        .unwrap();
    let nats = async_nats::connect(&stack.nats.url).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let bucket = js.get_key_value(&stack.config.jobs.state_bucket).await.unwrap();
    bucket.put(sluice_core::jobstate::key(tenant, id), "{not json".into()).await.unwrap();
    stack.worker = Some(crate::harness::WorkerHandle::start(stack.config.clone()).await);
    let job = stack.job_with_status(&id.to_string(), "failed").await;
    assert!(job["error"]["message"].as_str().unwrap().contains("unreadable"), "{job}");
    assert_eq!(stack.mock.requests().await, 0, "it never ran");
    stack.ledger_row(id, "failed").await;
}

/// A provider's absurd `Retry-After` (u64::MAX seconds, or not a number at
/// all) is clamped: nothing panics or overflows, the client gets a 429
/// with a `Retry-After` of at most a day instead of a request parked for
/// ages, the deployment is paused for at most `MAX_PAUSE` (unit test in the
/// pools), and another tenant on another deployment is served at once.
#[tokio::test]
async fn absurd_retry_after_from_a_provider_is_clamped_and_other_tenants_are_served() {
    let told = ["18446744073709551615", "1e308", "-5", "soon"];
    let stack = Stack::start_with(|c| {
        for i in 0..told.len() {
            crate::harness::add_profile_pool(c, &format!("told-{i}"), "mock");
        }
    })
    .await;
    let other = stack.key_of("other").await;
    for (i, value) in told.iter().enumerate() {
        stack.mock.faults(serde_json::json!({"error_rate": 1.0, "error_status": 429, "retry_after": value})).await;
        let mut body = Stack::chat_body("pace me");
        body["model"] = format!("told-{i}").into();
        let r = stack.chat(&body).await;
        let status = r.status().as_u16();
        let retry_after: Option<u64> = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
        // Told to wait past the deadline: answered at once, the wait cut to
        // a day. Not a wait at all ("-5", "soon"): ignored, the job retried
        // on its own backoff until its attempts ran out, and answered 429
        // all the same (the pace, not a failure, is the answer).
        assert_eq!(status, 429, "{value}: the provider's pace reaches the client as a 429");
        let secs = retry_after.expect("a Retry-After");
        assert!((1..=86_400).contains(&secs), "{value}: Retry-After {secs}");
        stack.mock.faults(serde_json::json!({"error_rate": 0.0})).await;
        let r = post_json(&stack, "/v1/chat/completions", &other, &Stack::chat_body("me")).await;
        assert_eq!(r.status(), 200, "{value}: the other tenant waited");
    }
}

/// A worker holds at most `worker.max_body_memory_bytes` of stored request
/// bodies at once: of four 1.5 MiB jobs at once with room for two, two run
/// while the others wait (no more at the provider at once), and all four
/// complete.
#[tokio::test]
async fn a_workers_large_bodies_run_as_many_at_a_time_as_its_budget_holds() {
    let stack = Stack::start_with(|c| {
        c.ingress.max_body_bytes = 2 * 1024 * 1024;
        c.worker.max_body_memory_bytes = 3 * 1024 * 1024 + 512 * 1024;
        // Each answer takes 800 ms, so the jobs overlap at the provider.
        crate::harness::add_profile_pool(c, "slow", "mock@first_ms=800");
    })
    .await;
    let text = "x".repeat(1536 * 1024);
    let mut job = Stack::job_body(&text);
    job["body"]["model"] = "slow".into();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let r = stack.submit_job(&stack.key, &job, None).await;
        assert_eq!(r.status(), 202);
        ids.push(r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        stack.job_with_status(id, "completed").await;
    }
    let peak = stack.mock.stats().await["peak_in_flight"].as_u64().unwrap();
    assert!(peak <= 2, "{peak} large bodies were at the provider at once");
}

/// A worker holds at most `upstream.max_response_memory_bytes` of answers at
/// once: with room for one 2 MB answer, eight asked at once take turns
/// (their waits counted) instead of being held together, and all are
/// answered whole.
#[tokio::test]
async fn a_workers_large_answers_take_turns_in_its_answer_budget_and_all_complete() {
    let stack = Stack::start_with(|c| {
        c.upstream.max_response_bytes = 3 << 20;
        c.upstream.max_response_memory_bytes = 3 << 20;
    })
    .await;
    let waits = "sluice_worker_answer_budget_waits_total";
    let before = stack.ingress_metric(waits).await;
    let inputs: Vec<String> = (0..100).map(|i| format!("document {i}")).collect();
    let body = serde_json::json!({"model": crate::harness::MODEL, "input": inputs, "dimensions": 1536});
    let asks = (0..8).map(|_| async {
        let r = post_json(&stack, "/v1/embeddings", &stack.key, &body).await;
        (r.status().as_u16(), r.bytes().await.map(|b| b.len()).unwrap_or(0))
    });
    for (status, len) in futures::future::join_all(asks).await {
        assert_eq!(status, 200);
        assert!(len > 2_000_000, "{len} bytes");
    }
    let after = stack.ingress_metric(waits).await;
    assert!(after > before, "no answer waited for the budget ({before} → {after})");
}
