//! Upstream failures, worker crashes, NATS outages and shutdown.

use std::time::{Duration, Instant};

use crate::harness::{Stack, WorkerHandle, job_id_of, wait_for};

#[tokio::test]
async fn upstream_500_once_then_success_is_invisible_to_the_client() {
    let stack = Stack::start().await;
    stack.mock.faults(serde_json::json!({"fail_next": 1, "error_status": 500})).await;
    let r = stack.chat(&Stack::chat_body("retry me")).await;
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "mock reply to: retry me");
    let stats = stack.mock.stats().await;
    assert_eq!(stats["errors"], 1);
    assert_eq!(stats["ok"], 1);
    let row = stack.ledger_row(job_id_of(&headers, &body), "completed").await;
    assert_eq!(row.attempts, 2);
}

#[tokio::test]
async fn upstream_4xx_is_returned_at_once_without_retry() {
    let stack = Stack::start().await;
    stack.mock.faults(serde_json::json!({"fail_next": 1, "error_status": 400})).await;
    let r = stack.chat(&Stack::chat_body("bad for upstream")).await;
    assert_eq!(r.status(), 400);
    let headers = r.headers().clone();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["message"], "injected failure");
    assert_eq!(stack.mock.requests().await, 1);
    let row = stack.ledger_row(job_id_of(&headers, &body), "failed").await;
    assert_eq!(row.upstream_status, Some(400));
    assert_eq!(row.attempts, 1);
}

#[tokio::test]
async fn persistent_upstream_5xx_fails_after_max_attempts_with_502() {
    let stack = Stack::start_with(|c| c.worker.max_attempts = 3).await;
    stack.mock.faults(serde_json::json!({"fail_next": 100, "error_status": 503})).await;
    let r = stack.chat(&Stack::chat_body("doomed")).await;
    assert_eq!(r.status(), 502);
    let headers = r.headers().clone();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_error");
    assert_eq!(stack.mock.requests().await, 3);
    let row = stack.ledger_row(job_id_of(&headers, &body), "failed").await;
    assert_eq!(row.attempts, 3);
    assert_eq!(row.error_code.as_deref(), Some("upstream_error"));
}

#[tokio::test]
async fn upstream_hang_past_the_timeout_gets_504_and_a_failed_record() {
    let stack = Stack::start_with(|c| {
        c.ingress.sync_timeout_ms = 5_000;
        c.upstream.request_timeout_ms = 1_000;
        c.upstream.max_unanswered_repeats = 1;
        c.worker.max_attempts = 4;
    })
    .await;
    stack.mock.faults(serde_json::json!({"hang_next": 10})).await;
    let started = Instant::now();
    let r = stack.chat(&Stack::chat_body("hang")).await;
    assert_eq!(r.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(5), "504 took {:?}", started.elapsed());
    let headers = r.headers().clone();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout");
    // The call and its one repeat hang past the upstream timeout (the
    // provider may have done the work each time): the job fails, and is
    // not handed back for the remaining attempts.
    let job_id = job_id_of(&headers, &body);
    let row = stack.ledger_row(job_id, "failed").await;
    assert_eq!(row.error_code.as_deref(), Some("timeout"));
    assert_eq!(row.attempts, 1);
    assert_eq!(stack.mock.requests().await, 2);
}

#[tokio::test]
async fn a_worker_dying_mid_call_loses_nothing_and_the_job_completes_once() {
    let mut stack = Stack::start().await;
    // The first call hangs, so the worker is mid-call when it dies.
    stack.mock.faults(serde_json::json!({"hang_next": 1})).await;
    let body = Stack::chat_body("survive");
    let first_worker = stack.worker.take().unwrap();
    let request = stack.chat(&body);
    let chaos = async {
        wait_for("the worker to be mid-call", Duration::from_secs(5), || async {
            (stack.mock.requests().await == 1).then_some(())
        })
        .await;
        first_worker.kill().await;
        // A fresh worker picks the job up once its ack_wait (1 s) runs out.
        WorkerHandle::start(stack.config.clone()).await
    };
    let (response, _replacement) = tokio::join!(request, chaos);
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "mock reply to: survive");
    let row = stack.ledger_row(job_id_of(&headers, &body), "completed").await;
    assert_eq!(row.attempts, 2);
    assert_eq!(stack.ledger_count().await, 1, "exactly one job record");
}

#[tokio::test]
async fn nats_down_at_the_ingress_gets_503_not_a_hang() {
    let mut stack = Stack::start().await;
    assert_eq!(stack.chat(&Stack::chat_body("before")).await.status(), 200);
    stack.nats.kill().await;
    let started = Instant::now();
    let r = stack.chat(&Stack::chat_body("during")).await;
    assert_eq!(r.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(5), "503 took {:?}", started.elapsed());
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_unavailable");
    let ready = stack.http.get(format!("{}/readyz", stack.base)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
}

/// A request that comes while the ingress's NATS connection is down waits
/// for it to come back (`ingress.reconnect_wait_ms`, 2 s) and is answered:
/// a NATS node's restart is a pause for the client, not a 503.
#[tokio::test]
async fn a_request_while_nats_reconnects_waits_for_it_and_is_answered() {
    let mut stack = Stack::start().await;
    assert_eq!(stack.chat(&Stack::chat_body("before")).await.status(), 200);
    stack.nats.kill().await;
    // The ingress knows its connection is down (its readiness says so).
    let ready = format!("{}/readyz", stack.base);
    wait_for("the ingress to see NATS gone", Duration::from_secs(10), || async {
        let r = stack.http.get(&ready).send().await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    let body = Stack::chat_body("during the restart");
    let request = stack.http.post(format!("{}/v1/chat/completions", stack.base)).bearer_auth(&stack.key).json(&body);
    let (response, ()) = tokio::join!(request.send(), stack.nats.restart());
    let response = response.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("mock reply to: during the restart"), "{text}");
}

#[tokio::test]
async fn worker_shutdown_finishes_the_call_in_flight() {
    let mut stack = Stack::start().await;
    stack.mock.faults(serde_json::json!({"hang_next": 1, "hang_ms": 1500})).await;
    let body = Stack::chat_body("finish me");
    let worker = stack.worker.take().unwrap();
    let request = stack.chat(&body);
    let stop = async {
        wait_for("the worker to be mid-call", Duration::from_secs(5), || async {
            (stack.mock.requests().await == 1).then_some(())
        })
        .await;
        let started = Instant::now();
        worker.shutdown().await;
        started.elapsed()
    };
    let (response, stop_took) = tokio::join!(request, stop);
    assert_eq!(response.status(), 200, "the call in flight was not finished");
    assert!(stop_took < Duration::from_secs(5), "shutdown took {stop_took:?}");
    assert_eq!(stack.mock.requests().await, 1, "the job ran once");
}

#[tokio::test]
async fn ingress_shutdown_lets_the_request_in_flight_finish() {
    let stack = Stack::start().await;
    stack.mock.faults(serde_json::json!({"hang_next": 1, "hang_ms": 1000})).await;
    let body = Stack::chat_body("drain me");
    let request = stack.chat(&body);
    let stop = async {
        wait_for("the request to be in flight", Duration::from_secs(5), || async {
            (stack.mock.requests().await == 1).then_some(())
        })
        .await;
        stack.stop_ingress();
    };
    let (response, ()) = tokio::join!(request, stop);
    assert_eq!(response.status(), 200, "the request in flight was cut off");
    // New connections are refused once the ingress has drained.
    wait_for("the ingress to stop listening", Duration::from_secs(5), || async {
        stack.http.get(format!("{}/healthz", stack.base)).send().await.is_err().then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_upstream_rate_limit_keeps_the_job_waiting_instead_of_failing_it() {
    let stack = Stack::start_with(|c| c.ingress.sync_timeout_ms = 1_500).await;
    stack.mock.faults(serde_json::json!({"rpm": 1})).await;
    let first = stack.chat(&Stack::chat_body("first")).await;
    assert_eq!(first.status(), 200);
    let first_id: uuid::Uuid = first.headers()["x-sluice-job-id"].to_str().unwrap().parse().unwrap();
    stack.ledger_row(first_id, "completed").await;
    // The mock said so in its headers (none left, reset within a minute):
    // the second job waits in the queue for the reset instead of failing,
    // and is not even tried meanwhile; the client, whose wait ends first,
    // gets the job id.
    let r = stack.chat(&Stack::chat_body("second")).await;
    assert_eq!(r.status(), 504);
    let body: serde_json::Value = r.json().await.unwrap();
    let id = body["error"]["job_id"].as_str().unwrap();
    let job: serde_json::Value = stack.get_job(&stack.key, id).await.json().await.unwrap();
    assert_eq!(job["status"], "queued", "{job}");
    let stats = stack.mock.stats().await;
    assert_eq!((stats["requests"].as_u64(), stats["rate_limited"].as_u64()), (Some(1), Some(0)), "{stats}");
    assert_eq!(stack.ledger_count().await, 1, "only the first job has finished");
}

#[tokio::test]
async fn a_worker_told_to_stop_while_nats_is_down_still_exits() {
    let mut stack = Stack::start_with(|c| c.worker.shutdown_grace_ms = 1_000).await;
    // One job first, so that every loop of the worker has done work.
    let response = stack.chat(&Stack::chat_body("before the outage")).await;
    assert_eq!(response.status(), 200);
    stack.nats.kill().await;
    let worker = stack.worker.take().unwrap();
    let began = Instant::now();
    // Its grace (1 s), the bounded wait for its loops and the bounded final
    // flush (5 s each): the client alone would wait for NATS forever.
    tokio::time::timeout(Duration::from_secs(20), worker.shutdown())
        .await
        .expect("the worker did not exit within 20 s of its stop signal with NATS down");
    assert!(began.elapsed() < Duration::from_secs(20));
}
