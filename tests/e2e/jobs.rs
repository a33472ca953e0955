//! Asynchronous jobs: submit, poll, cancel, expiry, idempotency, isolation.

use std::time::Duration;

use crate::harness::{Stack, WorkerHandle, wait_for, wait_past_deadline};

#[tokio::test]
async fn a_submitted_job_is_visible_at_once_and_completes_with_the_result() {
    let stack = Stack::start().await;
    let mut body = Stack::job_body("async hello");
    body["metadata"] = serde_json::json!({"batch": "nightly-7"});
    let r = stack.submit_job(&stack.key, &body, None).await;
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let job: serde_json::Value = r.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/jobs/{id}"));
    assert_eq!(job["object"], "job");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["metadata"]["batch"], "nightly-7");

    let done = stack.job_with_status(&id, "completed").await;
    assert_eq!(done["result"]["choices"][0]["message"]["content"], "mock reply to: async hello");
    assert!(done["result"]["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(done["attempts"], 1);
    assert!(done["started_at"].as_u64().is_some() && done["finished_at"].as_u64().is_some());
    let row = stack.ledger_row(id.parse().unwrap(), "completed").await;
    assert_eq!(row.attempts, 1);
    // The ledger knows what it cost, whichever of its two sources (the
    // job's state, its terminal event) wrote the completed row first.
    let tokens = done["result"]["usage"]["prompt_tokens"].as_i64().map(|t| t as i32);
    assert_eq!((row.prompt_tokens, row.upstream_status), (tokens, Some(200)), "{row:?}");
}

#[tokio::test]
async fn another_tenants_job_is_a_404_on_every_route() {
    let stack = Stack::start().await;
    let job: serde_json::Value =
        stack.submit_job(&stack.key, &Stack::job_body("mine"), None).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    let other = stack.key_of("intruder").await;
    assert_eq!(stack.get_job(&other, id).await.status(), 404);
    let cancel =
        stack.http.post(format!("{}/v1/jobs/{id}/cancel", stack.base)).bearer_auth(&other).send().await.unwrap();
    assert_eq!(cancel.status(), 404);
    assert_eq!(stack.get_job(&stack.key, id).await.status(), 200);
    assert_eq!(stack.get_job(&stack.key, "not-a-job-id").await.status(), 404);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_job_and_runs_it_once() {
    let stack = Stack::start().await;
    let body = Stack::job_body("exactly once");
    let first = stack.submit_job(&stack.key, &body, Some("order-42")).await;
    assert_eq!(first.status(), 202);
    let first: serde_json::Value = first.json().await.unwrap();
    let id = first["id"].as_str().unwrap().to_owned();
    stack.job_with_status(&id, "completed").await;

    let again = stack.submit_job(&stack.key, &body, Some("order-42")).await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["status"], "completed");

    let reused = stack.submit_job(&stack.key, &Stack::job_body("something else"), Some("order-42")).await;
    assert_eq!(reused.status(), 409);
    // Another tenant's identical key is another job.
    let other = stack.key_of("other").await;
    let theirs: serde_json::Value = stack.submit_job(&other, &body, Some("order-42")).await.json().await.unwrap();
    assert_ne!(theirs["id"], first["id"]);
    stack.ledger_row(theirs["id"].as_str().unwrap().parse().unwrap(), "completed").await;
    assert_eq!(stack.mock.requests().await, 2, "each tenant's job ran once");
    assert_eq!(stack.ledger_count().await, 2);
}

#[tokio::test]
async fn a_cancelled_job_never_runs() {
    let mut stack = Stack::start().await;
    stack.worker.take().unwrap().shutdown().await;
    let job: serde_json::Value =
        stack.submit_job(&stack.key, &Stack::job_body("never"), None).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let cancel = |key: String| {
        let url = format!("{}/v1/jobs/{id}/cancel", stack.base);
        let http = stack.http.clone();
        async move { http.post(url).bearer_auth(key).send().await.unwrap() }
    };
    let r = cancel(stack.key.clone()).await;
    assert_eq!(r.status(), 200);
    let cancelled: serde_json::Value = r.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancel(stack.key.clone()).await.status(), 409, "a cancelled job cannot be cancelled again");

    let _worker = WorkerHandle::start(stack.config.clone()).await;
    stack.ledger_row(id.parse().unwrap(), "cancelled").await;
    assert_eq!(stack.mock.requests().await, 0);
    let job: serde_json::Value = stack.get_job(&stack.key, &id).await.json().await.unwrap();
    assert_eq!(job["status"], "cancelled");
}

#[tokio::test]
async fn a_job_still_queued_at_its_deadline_expires_and_never_runs() {
    let mut stack = Stack::start().await;
    stack.worker.take().unwrap().shutdown().await;
    let mut body = Stack::job_body("too late");
    body["expires_in"] = serde_json::json!(1);
    let job: serde_json::Value = stack.submit_job(&stack.key, &body, None).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    wait_past_deadline(&job).await;

    let _worker = WorkerHandle::start(stack.config.clone()).await;
    stack.ledger_row(id.parse().unwrap(), "expired").await;
    assert_eq!(stack.job_with_status(&id, "expired").await["status"], "expired");
    assert_eq!(stack.mock.requests().await, 0);
}

#[tokio::test]
async fn bad_job_submissions_get_400_and_404() {
    let stack = Stack::start().await;
    let cases = [
        (serde_json::json!({"endpoint": "images.generate", "body": {}}), 400, "endpoint"),
        (serde_json::json!({"endpoint": "chat.completions"}), 400, ""),
        (
            serde_json::json!({"endpoint": "chat.completions", "body": Stack::chat_body("x"), "webhook": {"url": "http://10.0.0.1/x"}}),
            400,
            "webhook",
        ),
        (
            serde_json::json!({"endpoint": "chat.completions", "body": Stack::chat_body("x"), "metadata": {"n": 1}}),
            400,
            "metadata",
        ),
        (
            serde_json::json!({"endpoint": "chat.completions", "body": Stack::chat_body("x"), "expires_in": 0}),
            400,
            "expires_in",
        ),
        (
            serde_json::json!({"endpoint": "chat.completions", "body": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}}),
            404,
            "model",
        ),
    ];
    for (body, status, param) in cases {
        let r = stack.submit_job(&stack.key, &body, None).await;
        assert_eq!(r.status().as_u16(), status, "{body}");
        let error: serde_json::Value = r.json().await.unwrap();
        if !param.is_empty() {
            assert_eq!(error["error"]["param"], param, "{body}");
        }
    }
    assert_eq!(stack.mock.requests().await, 0);
}

#[tokio::test]
async fn the_job_list_is_paged_newest_first_filtered_and_per_tenant() {
    let stack = Stack::start().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut body = Stack::job_body(&format!("list {i}"));
        body["metadata"] = serde_json::json!({"n": i.to_string()});
        let job: serde_json::Value = stack.submit_job(&stack.key, &body, None).await.json().await.unwrap();
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        stack.ledger_row(id.parse().unwrap(), "completed").await;
    }
    let list = |query: &'static str, key: String| {
        let url = format!("{}/v1/jobs{query}", stack.base);
        let http = stack.http.clone();
        async move {
            let r = http.get(url).bearer_auth(key).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let page = list("?limit=2", stack.key.clone()).await;
    assert_eq!(page["object"], "list");
    let got: Vec<&str> = page["data"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(got, vec![ids[2].as_str(), ids[1].as_str()], "newest first");
    assert_eq!(page["has_more"], true);
    assert_eq!(page["data"][0]["metadata"]["n"], "2");

    let url = format!("{}/v1/jobs?limit=2&after={}", stack.base, page["last_id"].as_str().unwrap());
    let next: serde_json::Value =
        stack.http.get(url).bearer_auth(&stack.key).send().await.unwrap().json().await.unwrap();
    let got: Vec<&str> = next["data"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(got, vec![ids[0].as_str()]);
    assert_eq!(next["has_more"], false);

    assert_eq!(list("?status=completed", stack.key.clone()).await["data"].as_array().unwrap().len(), 3);
    assert_eq!(list("?status=queued", stack.key.clone()).await["data"].as_array().unwrap().len(), 0);
    let other = stack.key_of("someone-else").await;
    assert_eq!(list("", other).await["data"].as_array().unwrap().len(), 0);
    let bad = stack.http.get(format!("{}/v1/jobs?limit=1000", stack.base)).bearer_auth(&stack.key).send().await;
    assert_eq!(bad.unwrap().status(), 400);
}

#[tokio::test]
async fn a_queued_job_reaches_the_ledger_before_it_runs() {
    let stack = Stack::start().await;
    // The first call hangs, so the job stays in progress while we look.
    stack.mock.faults(serde_json::json!({"hang_next": 1, "hang_ms": 2000})).await;
    let job: serde_json::Value =
        stack.submit_job(&stack.key, &Stack::job_body("watch me"), None).await.json().await.unwrap();
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    stack.ledger_row(id, "in_progress").await;
    stack.ledger_row(id, "completed").await;
}

#[tokio::test]
async fn a_sync_request_that_outlives_its_wait_goes_on_as_a_job() {
    let stack = Stack::start_with(|c| c.ingress.sync_timeout_ms = 1_000).await;
    stack.mock.faults(serde_json::json!({"hang_next": 1, "hang_ms": 2000})).await;
    let r = stack.chat(&Stack::chat_body("slow sync")).await;
    assert_eq!(r.status(), 504);
    // The official SDKs would resubmit a 504 (and run it twice) unless told not to.
    assert_eq!(r.headers().get("x-should-retry").and_then(|v| v.to_str().ok()), Some("false"));
    let error: serde_json::Value = r.json().await.unwrap();
    let id = error["error"]["job_id"].as_str().unwrap().to_owned();
    // Visible at once, then with the answer the client did not wait for.
    assert_eq!(stack.get_job(&stack.key, &id).await.status(), 200);
    let job = stack.job_with_status(&id, "completed").await;
    assert_eq!(job["result"]["choices"][0]["message"]["content"], "mock reply to: slow sync");
    assert_eq!(stack.mock.requests().await, 1, "it ran once");
    stack.ledger_row(id.parse().unwrap(), "completed").await;
}

#[tokio::test]
async fn results_leave_the_hot_store_after_retention_and_stay_in_the_ledger() {
    let stack = Stack::start_with(|c| {
        c.jobs.retention_ms = 1_000;
        c.jobs.max_expiry_ms = 1_000;
        c.jobs.default_expiry_ms = 1_000;
    })
    .await;
    let job: serde_json::Value =
        stack.submit_job(&stack.key, &Stack::job_body("short-lived"), None).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    stack.job_with_status(&id, "completed").await;
    wait_for("the job's state to expire", Duration::from_secs(10), || async {
        (stack.get_job(&stack.key, &id).await.status() == 404).then_some(())
    })
    .await;
    stack.ledger_row(id.parse().unwrap(), "completed").await;
}

#[tokio::test]
async fn an_idempotency_key_holds_across_ingress_replicas() {
    let stack = Stack::start().await;
    let (other_base, _other) = stack.another_ingress().await;
    let body = Stack::job_body("one of two replicas");
    let first: serde_json::Value =
        stack.submit_job(&stack.key, &body, Some("replicated-7")).await.json().await.unwrap();
    // The same submit retried against another replica, as after a lost response.
    let again = stack
        .http
        .post(format!("{other_base}/v1/jobs"))
        .bearer_auth(&stack.key)
        .header("idempotency-key", "replicated-7")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 202);
    let again: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    let id = first["id"].as_str().unwrap();
    stack.job_with_status(id, "completed").await;
    stack.ledger_row(id.parse().unwrap(), "completed").await;
    assert_eq!(stack.mock.requests().await, 1, "one execution");
}

#[tokio::test]
async fn a_sync_request_whose_client_disconnects_goes_on_as_a_job() {
    use futures::StreamExt;
    let stack = Stack::start().await;
    let mut jobs = stack.watch_jobs().await;

    stack.mock.faults(serde_json::json!({"hang_next": 1, "hang_ms": 1500})).await;
    let impatient = crate::harness::http_client();
    let gone = impatient
        .post(format!("{}/v1/chat/completions", stack.base))
        .bearer_auth(&stack.key)
        .timeout(Duration::from_millis(300))
        .json(&Stack::chat_body("I will not wait"))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up");
    let message = tokio::time::timeout(Duration::from_secs(5), jobs.next()).await.unwrap().unwrap();
    let id = message.headers.unwrap().get("Sluice-Job-Id").unwrap().as_str().to_owned();
    // Recorded when the client left, then completed with the answer.
    wait_for("the job to be recorded", Duration::from_secs(5), || async {
        (stack.get_job(&stack.key, &id).await.status() == 200).then_some(())
    })
    .await;
    let job = stack.job_with_status(&id, "completed").await;
    assert_eq!(job["result"]["choices"][0]["message"]["content"], "mock reply to: I will not wait");
}

/// An `Idempotency-Key` names its job for `jobs.retention_ms` after its
/// first use; after that it names a new job with an id of its own (its
/// ledger row and webhooks are not mistaken for the old job's).
#[tokio::test]
async fn an_idempotency_key_names_a_new_job_after_its_window() {
    let stack = Stack::start_with(|c| {
        c.jobs.retention_ms = 3_000;
        c.jobs.max_expiry_ms = 3_000;
        c.jobs.default_expiry_ms = 3_000;
    })
    .await;
    let body = Stack::job_body("once per window");
    let first: serde_json::Value = stack.submit_job(&stack.key, &body, Some("w-1")).await.json().await.unwrap();
    let id = first["id"].as_str().unwrap().to_owned();
    stack.job_with_status(&id, "completed").await;
    let again = stack.submit_job(&stack.key, &body, Some("w-1")).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true", "within the window: the same job");
    let tenant = sluice_core::db::tenant_id(&stack.db, "acme").await.unwrap();
    assert_eq!(stack.job_of_key(tenant, "w-1").await.to_string(), id);
    // The key's entry expires with the window.
    let nats = async_nats::connect(&stack.nats.url).await.unwrap();
    let keys = async_nats::jetstream::new(nats).get_key_value(&stack.config.jobs.idempotency_bucket).await.unwrap();
    let entry = sluice_ingress::idempotency::entry_key(tenant, "w-1");
    wait_for("the key's window to end", Duration::from_secs(20), || async {
        keys.get(&entry).await.unwrap().is_none().then_some(())
    })
    .await;
    let later = stack.submit_job(&stack.key, &body, Some("w-1")).await;
    assert_eq!(later.status(), 202);
    assert!(later.headers().get("idempotent-replayed").is_none(), "a new job, not a replay");
    let later: serde_json::Value = later.json().await.unwrap();
    let new_id = later["id"].as_str().unwrap().to_owned();
    assert_ne!(new_id, id, "after the window the key names a new job");
    stack.job_with_status(&new_id, "completed").await;
    stack.ledger_row(id.parse().unwrap(), "completed").await;
    stack.ledger_row(new_id.parse().unwrap(), "completed").await;
    assert_eq!(stack.mock.requests().await, 2, "once per window");
}

/// A first use of an `Idempotency-Key` refused before its job was stored
/// (here a 429: the tenant's queue is full) does not spend the key: the
/// corrected request, with another body, is accepted under it.
#[tokio::test]
async fn an_idempotency_key_refused_at_admission_is_not_spent() {
    let mut stack = Stack::start().await;
    sluice_core::db::set_tenant(&stack.db, "acme", &crate::procs::settings(None, Some(1), None)).await.unwrap();
    stack.worker.take().unwrap().shutdown().await;
    let first: serde_json::Value =
        stack.submit_job(&stack.key, &Stack::job_body("fills the queue"), None).await.json().await.unwrap();
    // (the cap reaches the ingress within its refresh; until then a submit
    // without a key may still be accepted)
    wait_for("the queue cap to refuse a submit", Duration::from_secs(5), || async {
        let r = stack.submit_job(&stack.key, &Stack::job_body("refused"), None).await;
        (r.status() == 429).then_some(())
    })
    .await;
    let r = stack.submit_job(&stack.key, &Stack::job_body("refused"), Some("k-429")).await;
    assert_eq!(r.status(), 429, "the keyed submit is refused at admission");
    stack.worker = Some(WorkerHandle::start(stack.config.clone()).await);
    stack.job_with_status(first["id"].as_str().unwrap(), "completed").await;
    let corrected = wait_for("the corrected request accepted", Duration::from_secs(10), || async {
        let r = stack.submit_job(&stack.key, &Stack::job_body("corrected"), Some("k-429")).await;
        assert_ne!(r.status(), 409, "a key whose job was never stored is not spent");
        (r.status() == 202).then_some(r)
    })
    .await;
    let job: serde_json::Value = corrected.json().await.unwrap();
    stack.job_with_status(job["id"].as_str().unwrap(), "completed").await;
}
