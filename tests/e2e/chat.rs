//! Synchronous chat completions through the queue.

use crate::harness::{ALIASED_MODEL, ANTHROPIC_MODEL, MODEL, Stack, job_id_of};

#[tokio::test]
async fn sync_completion_returns_the_mock_answer_with_usage_and_is_recorded() {
    let stack = Stack::start().await;
    let response = stack.chat(&Stack::chat_body("hello sluice")).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let headers = response.headers().clone();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["choices"][0]["message"]["content"], "mock reply to: hello sluice");
    let prompt = body["usage"]["prompt_tokens"].as_i64().unwrap();
    let completion = body["usage"]["completion_tokens"].as_i64().unwrap();
    assert!(prompt > 0 && completion > 0, "usage: {}", body["usage"]);

    let row = stack.ledger_row(job_id_of(&headers, &body), "completed").await;
    assert_eq!(row.attempts, 1);
    assert_eq!(row.prompt_tokens, Some(prompt as i32));
    assert_eq!(row.completion_tokens, Some(completion as i32));
    assert_eq!(row.upstream_status, Some(200));
}

#[tokio::test]
async fn an_aliased_pool_sends_its_upstream_model_name() {
    let stack = Stack::start().await;
    let body = serde_json::json!({"model": ALIASED_MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let response = stack.chat(&body).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    // The mock echoes the model it was asked for.
    assert_eq!(body["model"], "mock-upstream-name");
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_answer() {
    let stack = Stack::start().await;
    let calls = (0..40).map(|i| {
        let stack = &stack;
        async move {
            let r = stack.chat(&Stack::chat_body(&format!("request {i}"))).await;
            assert_eq!(r.status(), 200);
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["choices"][0]["message"]["content"], format!("mock reply to: request {i}"));
        }
    });
    futures::future::join_all(calls).await;
}

#[tokio::test]
async fn models_lists_the_configured_pools() {
    let stack = Stack::start().await;
    let r = stack.http.get(format!("{}/v1/models", stack.base)).bearer_auth(&stack.key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    let ids: Vec<&str> = body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![MODEL, ALIASED_MODEL, ANTHROPIC_MODEL]);
}

#[tokio::test]
async fn ops_endpoints_answer() {
    let stack = Stack::start().await;
    let get = |path: &str| stack.http.get(format!("{}{path}", stack.base)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    assert_eq!(stack.chat(&Stack::chat_body("count me")).await.status(), 200);
    // `/metrics` (tenant names in its labels) is on the ops listener only.
    assert_eq!(get("/metrics").await.unwrap().status(), 404);
    let metrics = stack.http.get(format!("{}/metrics", stack.ops)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("sluice_ingress_requests_total"), "{metrics}");
    assert!(metrics.contains("route=\"chat_completions\""), "{metrics}");
}

#[tokio::test]
async fn request_id_and_trace_context_travel_to_the_worker_in_nats_headers() {
    use futures::StreamExt;
    let stack = Stack::start().await;
    let mut jobs = stack.watch_jobs().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.base))
        .bearer_auth(&stack.key)
        .header("x-request-id", "req-abc-123")
        .header("traceparent", traceparent)
        .json(&Stack::chat_body("trace me"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-abc-123");
    let message = tokio::time::timeout(std::time::Duration::from_secs(5), jobs.next()).await.unwrap().unwrap();
    let headers = message.headers.unwrap();
    assert_eq!(headers.get("Sluice-Request-Id").unwrap().as_str(), "req-abc-123");
    assert_eq!(headers.get("traceparent").unwrap().as_str(), traceparent);
    assert_eq!(message.payload.as_ref(), serde_json::to_vec(&Stack::chat_body("trace me")).unwrap().as_slice());
    let job_id: uuid::Uuid = headers.get("Sluice-Job-Id").unwrap().as_str().parse().unwrap();
    stack.ledger_row(job_id, "completed").await;
    let request_id: String = sqlx::query_scalar("SELECT request_id FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(request_id, "req-abc-123");
}
