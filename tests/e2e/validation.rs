//! Bad requests get the right status and OpenAI's error envelope, and never
//! reach the provider.

use crate::harness::Stack;

async fn post_raw(stack: &Stack, content_type: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let r = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.base))
        .bearer_auth(&stack.key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

fn assert_openai_error(body: &serde_json::Value, kind: &str, code: &str) {
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(body["error"].as_object().unwrap().contains_key("param"), "{body}");
}

#[tokio::test]
async fn malformed_json_gets_400() {
    let stack = Stack::start().await;
    let (status, body) =
        post_raw(&stack, "application/json", br#"{"model": "mock-model", "messages": [ "#.to_vec()).await;
    assert_eq!(status, 400);
    assert_openai_error(&body, "invalid_request_error", "invalid_json");

    let (status, body) = post_raw(&stack, "application/json", br#"{"model": "mock-model"}"#.to_vec()).await;
    assert_eq!(status, 400);
    assert_openai_error(&body, "invalid_request_error", "invalid_request");

    let (status, body) =
        post_raw(&stack, "application/json", br#"{"model": "mock-model", "messages": []}"#.to_vec()).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "messages");
    assert_eq!(stack.mock.requests().await, 0);
}

#[tokio::test]
async fn oversized_body_gets_413() {
    let stack = Stack::start_with(|c| c.ingress.max_body_bytes = 64 * 1024).await;
    let big = "x".repeat(100 * 1024);
    let body = serde_json::to_vec(&Stack::chat_body(&big)).unwrap();
    let (status, error) = post_raw(&stack, "application/json", body).await;
    assert_eq!(status, 413);
    assert_openai_error(&error, "invalid_request_error", "payload_too_large");

    // Without a Content-Length (chunked), the limit holds while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..100).map(|_| Ok(vec![b' '; 1024])).collect();
    let r = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.base))
        .bearer_auth(&stack.key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(stack.mock.requests().await, 0);
}

#[tokio::test]
async fn wrong_content_type_gets_415() {
    let stack = Stack::start().await;
    let body = serde_json::to_vec(&Stack::chat_body("hi")).unwrap();
    let (status, error) = post_raw(&stack, "text/plain", body).await;
    assert_eq!(status, 415);
    assert_openai_error(&error, "invalid_request_error", "unsupported_media_type");
}

#[tokio::test]
async fn unknown_model_gets_404() {
    let stack = Stack::start().await;
    let body = serde_json::json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]});
    let r = stack.chat(&body).await;
    assert_eq!(r.status(), 404);
    let error: serde_json::Value = r.json().await.unwrap();
    assert_openai_error(&error, "invalid_request_error", "model_not_found");
    assert_eq!(error["error"]["param"], "model");
}

#[tokio::test]
async fn ingress_over_its_in_flight_bound_gets_429() {
    let stack = Stack::start_with(|c| c.ingress.max_in_flight = 1).await;
    stack.mock.faults(serde_json::json!({"hang_next": 1, "hang_ms": 3000})).await;
    let slow = Stack::chat_body("slow");
    let first = stack.chat(&slow);
    let second = async {
        crate::harness::wait_for("the first request to reach the mock", std::time::Duration::from_secs(5), || async {
            (stack.mock.requests().await == 1).then_some(())
        })
        .await;
        stack.chat(&Stack::chat_body("rejected")).await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(second.status(), 429);
    assert!(second.headers().contains_key("retry-after"));
    let error: serde_json::Value = second.json().await.unwrap();
    assert_openai_error(&error, "rate_limit_error", "gateway_overloaded");
    assert_eq!(first.status(), 200);
}

#[tokio::test]
async fn a_full_queue_gets_429_queue_full() {
    let mut stack = Stack::start_with(|c| {
        c.nats.max_queued_jobs = 2;
        c.ingress.sync_timeout_ms = 300;
    })
    .await;
    // No worker: jobs stay queued.
    stack.worker.take().unwrap().shutdown().await;
    assert_eq!(stack.chat(&Stack::chat_body("one")).await.status(), 504);
    assert_eq!(stack.chat(&Stack::chat_body("two")).await.status(), 504);
    let third = stack.chat(&Stack::chat_body("three")).await;
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    let error: serde_json::Value = third.json().await.unwrap();
    assert_openai_error(&error, "rate_limit_error", "queue_full");
}
