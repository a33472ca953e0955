//! `stream: true` on chat completions: server-sent events through the queue.

use crate::harness::{MODEL, Stack, job_id_of};

/// The `data:` payloads of an SSE body, in order.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
}

#[tokio::test]
async fn a_streamed_completion_arrives_chunk_by_chunk_in_order_and_ends_with_done() {
    let stack = Stack::start().await;
    let body = serde_json::json!({"model": MODEL, "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "one two three four five"}]});
    let r = stack.chat(&body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let events = events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.len() > 5, "{text}");
    let content: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(content, "mock reply to: one two three four five", "the words arrive in order");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["total_tokens"].as_i64().unwrap() > 0, "{text}");
    // The ledger has the call with its usage.
    let id = job_id_of(&headers, &serde_json::Value::Null);
    let row = stack.ledger_row(id, "completed").await;
    assert_eq!(row.completion_tokens, usage["completion_tokens"].as_i64().map(|t| t as i32));
}

#[tokio::test]
async fn a_stream_that_fails_before_its_first_chunk_gets_an_ordinary_error() {
    let stack = Stack::start_with(|c| c.worker.max_attempts = 1).await;
    stack.mock.faults(serde_json::json!({"fail_next": 1})).await;
    let body = serde_json::json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let r = stack.chat(&body).await;
    assert_eq!(r.status(), 502);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_error");
}

#[tokio::test]
async fn a_job_cannot_ask_to_stream() {
    let stack = Stack::start().await;
    let job = serde_json::json!({"endpoint": "chat.completions",
        "body": {"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "x"}]}});
    let r = stack.submit_job(&stack.key, &job, None).await;
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "stream");
}

#[tokio::test]
async fn a_worker_dying_mid_stream_ends_the_stream_with_an_error_event() {
    let mut stack = Stack::start().await;
    stack.mock.faults(serde_json::json!({"stream_delay_ms": 150})).await;
    let body = serde_json::json!({"model": MODEL, "stream": true,
        "messages": [{"role": "user", "content": "a fairly long answer to stream slowly"}]});
    let mut r = stack.chat(&body).await;
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    while text.matches("data: ").count() < 3 {
        let chunk = r.chunk().await.unwrap().expect("the stream ended early");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    // The worker dies mid-stream; another takes the job once its ack wait
    // runs out, and starts the answer again.
    stack.worker.take().unwrap().kill().await;
    let _replacement = crate::harness::WorkerHandle::start(stack.config.clone()).await;
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events = events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let error: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "stream_interrupted", "{text}");
    assert!(error["error"]["message"].as_str().unwrap().contains("run again"), "{text}");
    // What came before the error is the first attempt's answer, in order.
    let content: String = events[..events.len() - 2]
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert!("mock reply to: a fairly long answer to stream slowly".starts_with(&content), "{content}");
}

#[tokio::test]
async fn a_client_leaving_mid_stream_does_not_stop_the_call_and_the_ledger_records_it() {
    let stack = Stack::start().await;
    stack.mock.faults(serde_json::json!({"stream_delay_ms": 100})).await;
    let body = serde_json::json!({"model": MODEL, "stream": true,
        "messages": [{"role": "user", "content": "the client will not wait for all of this"}]});
    let mut r = stack.chat(&body).await;
    let id = job_id_of(r.headers(), &serde_json::Value::Null);
    r.chunk().await.unwrap().expect("a first chunk");
    drop(r);
    // The call goes on to its end and is recorded once.
    let row = stack.ledger_row(id, "completed").await;
    assert_eq!(row.attempts, 1);
    assert_eq!(stack.mock.requests().await, 1);
}
