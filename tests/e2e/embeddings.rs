//! `POST /v1/embeddings` through the queue, synchronously and as a job.

use crate::harness::{MODEL, Stack, job_id_of};

async fn embed(stack: &Stack, body: &serde_json::Value) -> reqwest::Response {
    stack.http.post(format!("{}/v1/embeddings", stack.base)).bearer_auth(&stack.key).json(body).send().await.unwrap()
}

#[tokio::test]
async fn embeddings_come_back_through_the_queue_and_are_recorded() {
    let stack = Stack::start().await;
    let r = embed(&stack, &serde_json::json!({"model": MODEL, "input": ["first text", "second text"]})).await;
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 2, "{body}");
    assert!(!body["data"][0]["embedding"].as_array().unwrap().is_empty());
    let tokens = body["usage"]["prompt_tokens"].as_i64().unwrap();
    let row = stack.ledger_row(job_id_of(&headers, &body), "completed").await;
    assert_eq!(row.prompt_tokens, Some(tokens as i32));
    let endpoint: String = sqlx::query_scalar("SELECT endpoint FROM jobs WHERE id = $1")
        .bind(job_id_of(&headers, &body))
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(endpoint, "embeddings");
}

#[tokio::test]
async fn bad_embeddings_requests_are_refused_before_the_queue() {
    let stack = Stack::start().await;
    for (body, param) in [
        (serde_json::json!({"model": MODEL, "input": ""}), "input"),
        (serde_json::json!({"model": MODEL, "input": []}), "input"),
        (serde_json::json!({"model": MODEL, "input": 42}), "input"),
        (serde_json::json!({"model": "no-such-model", "input": "x"}), "model"),
    ] {
        let r = embed(&stack, &body).await;
        let status = r.status().as_u16();
        let e: serde_json::Value = r.json().await.unwrap();
        assert!(status == 400 || status == 404, "{body}: {status}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }
    let r = embed(&stack, &serde_json::json!({"model": MODEL})).await;
    assert_eq!(r.status(), 400, "a missing input is refused");
    assert_eq!(stack.mock.requests().await, 0, "nothing reached the provider");
}

#[tokio::test]
async fn an_embeddings_job_completes_with_its_result() {
    let stack = Stack::start().await;
    let job = serde_json::json!({"endpoint": "embeddings", "body": {"model": MODEL, "input": "embed me"}});
    let r = stack.submit_job(&stack.key, &job, None).await;
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let done = stack.job_with_status(&id, "completed").await;
    assert_eq!(done["endpoint"], "embeddings");
    assert_eq!(done["result"]["object"], "list", "{done}");
}

#[tokio::test]
async fn an_embeddings_answer_that_outlives_its_request_is_kept_as_an_embeddings_job() {
    let stack = Stack::start_with(|c| c.ingress.sync_timeout_ms = 500).await;
    stack.mock.faults(serde_json::json!({"hang_next": 1, "hang_ms": 1500})).await;
    let r = embed(&stack, &serde_json::json!({"model": MODEL, "input": "slow"})).await;
    assert_eq!(r.status(), 504);
    let body: serde_json::Value = r.json().await.unwrap();
    let id = body["error"]["job_id"].as_str().unwrap();
    let done = stack.job_with_status(id, "completed").await;
    assert_eq!(done["endpoint"], "embeddings", "{done}");
    assert_eq!(done["result"]["object"], "list", "{done}");
}
