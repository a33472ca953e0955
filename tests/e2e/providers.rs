//! Pools of deployments: failover and the circuit breaker, budgets that keep
//! a pool's jobs queued, and translation to an Anthropic deployment.

use std::time::Duration;

use sluice_core::config::{DeploymentConfig, PoolConfig};
use sluice_core::secret::Secret;

use crate::harness::{ANTHROPIC_MODEL, MODEL, Mock, Stack, job_id_of, wait_for};

fn deployment(name: &str, base: &str, rpm: u64) -> DeploymentConfig {
    DeploymentConfig {
        api_key: Some(Secret::new("sk-upstream-test")),
        rpm,
        ..DeploymentConfig::new(name, &format!("{base}/v1"))
    }
}

fn pool_of(name: &str, deployments: Vec<DeploymentConfig>) -> PoolConfig {
    let mut p = PoolConfig::single(name, "http://unused");
    p.base_url = None;
    p.deployments = deployments;
    p
}

fn chat(model: &str, content: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": content}]})
}

#[tokio::test]
async fn a_failing_deployment_trips_its_breaker_and_calls_fail_over_without_client_errors() {
    let bad = Mock::start(sluice_mock_provider::Settings::default()).await;
    bad.faults(serde_json::json!({"error_rate": 1.0, "error_status": 503})).await;
    let bad_base = bad.base.clone();
    let stack = Stack::start_with(move |c| {
        let good = c.pools[0].base_url.clone().unwrap().trim_end_matches("/v1").to_owned();
        c.upstream.breaker_failures = 3;
        c.upstream.breaker_open_ms = 500;
        c.pools.push(pool_of("pair", vec![deployment("bad", &bad_base, 0), deployment("good", &good, 0)]));
    })
    .await;
    for i in 0..30 {
        let r = stack.chat(&chat("pair", &format!("call {i}"))).await;
        let headers = r.headers().clone();
        assert_eq!(r.status(), 200, "call {i} saw the failing deployment");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], format!("mock reply to: call {i}"));
        // Failover happens within the attempt, not by a redelivery.
        let row = stack.ledger_row(job_id_of(&headers, &body), "completed").await;
        assert_eq!(row.attempts, 1);
    }
    // Half of 30 calls would go to the failing deployment without a breaker;
    // it opens after 3 consecutive failures (a probe may follow if a call
    // lands after the 500 ms cooldown).
    let failed = bad.stats().await["errors"].as_u64().unwrap();
    assert!((3..=5).contains(&failed), "the failing deployment got {failed} calls");

    // Healed, it gets traffic again once a half-open probe succeeds.
    bad.faults(serde_json::json!({})).await;
    wait_for("the healed deployment to serve again", Duration::from_secs(10), || async {
        let r = stack.chat(&chat("pair", "after healing")).await;
        assert_eq!(r.status(), 200);
        (bad.stats().await["ok"].as_u64().unwrap() > 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_pool_out_of_budget_keeps_its_jobs_queued_while_another_pool_completes() {
    let limited = Mock::start(sluice_mock_provider::Settings::default()).await;
    let limited_base = limited.base.clone();
    // 2 requests per minute: one per 30-second window, shared by every worker.
    let stack = Stack::start_with(move |c| {
        c.upstream.budget_headroom = 0.0;
        c.pools.push(pool_of("slow", vec![deployment("slow-1", &limited_base, 2)]));
    })
    .await;
    let submit = |model: &'static str, i: usize| {
        let body = serde_json::json!({"endpoint": "chat.completions", "body": chat(model, &format!("job {i}"))});
        let stack = &stack;
        async move {
            let r = stack.submit_job(&stack.key, &body, None).await;
            assert_eq!(r.status(), 202);
            r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
        }
    };
    let mut slow = Vec::new();
    for i in 0..4 {
        slow.push(submit("slow", i).await);
    }
    let mut fast = Vec::new();
    for i in 0..6 {
        fast.push(submit(MODEL, i).await);
    }
    for id in &fast {
        stack.job_with_status(id, "completed").await;
    }
    // The budget allowed one call (two if the jobs straddled a window edge);
    // the rest were never fetched: still `queued`, not held or retried.
    wait_for("the slow pool's first job", Duration::from_secs(10), || async {
        (limited.stats().await["ok"].as_u64().unwrap() >= 1).then_some(())
    })
    .await;
    let mut queued = 0;
    for id in &slow {
        let job: serde_json::Value = stack.get_job(&stack.key, id).await.json().await.unwrap();
        if job["status"] == "queued" {
            queued += 1;
        }
    }
    let calls = limited.requests().await;
    assert!(calls <= 2, "the out-of-budget deployment got {calls} calls");
    assert_eq!(queued as u64, 4 - calls, "jobs not called stay queued");
    assert_eq!(limited.stats().await["rate_limited"], 0, "no call was refused upstream");
}

#[tokio::test]
async fn chat_completions_reach_an_anthropic_deployment_translated_both_ways() {
    let stack = Stack::start().await;
    let mut body = chat(ANTHROPIC_MODEL, "translate me");
    body["messages"] = serde_json::json!([{"role": "system", "content": "be brief"},
        {"role": "user", "content": "translate me"}]);
    let r = stack.chat(&body).await;
    assert_eq!(r.status(), 200);
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["content"], "mock reply to: translate me");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert!(answer["usage"]["total_tokens"].as_u64().unwrap() > 0, "{answer}");
    assert_eq!(stack.mock.stats().await["messages"], 1, "the call went to /v1/messages");

    body["stream"] = serde_json::json!(true);
    let text = stack.chat(&body).await.text().await.unwrap();
    let datas: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{text}");
    let content: String = datas
        .iter()
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(content, "mock reply to: translate me");
    assert!(!text.contains("event:"), "OpenAI streams carry no event names: {text}");
}

/// The mock's profiles shape Anthropic answers too: a pool whose deployment
/// asks for `mock@tokens=40` gets 40 output tokens, streamed and not,
/// through the translation to chat completions.
#[tokio::test]
async fn an_anthropic_deployment_with_a_mock_profile_answers_its_token_count() {
    let stack = Stack::start_with(|c| {
        let mut p = c.pools.iter().find(|p| p.name == ANTHROPIC_MODEL).unwrap().clone();
        p.name = "claude-long".into();
        p.model = Some("mock@tokens=40".into());
        c.pools.push(p);
    })
    .await;
    let mut body = chat("claude-long", "count");
    let answer: serde_json::Value = stack.chat(&body).await.json().await.unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 40, "{answer}");
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.matches(" tok").count(), 40, "{content}");
    body["stream"] = serde_json::json!(true);
    let text = stack.chat(&body).await.text().await.unwrap();
    let streamed: String = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.strip_prefix("data: ")?).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(streamed, content, "the stream says what the answer said");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}
