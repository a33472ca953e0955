//! Every accepted request keeps its result, once (`docs/reliability.md`): a
//! slow answer is not a failure, a call the provider may have billed is not
//! made again past its budget, a run that lost its job to a redelivery
//! records nothing, and a job whose state is gone still ends.

use std::time::Duration;

use futures::StreamExt;
use sluice_core::event::JobStatus;
use sluice_core::jobstate::{self, JobRecord};

use crate::harness::{Stack, WorkerHandle, add_profile_pool, wait_for, wait_past_deadline};
use crate::procs::{Cluster, settings};

/// `unanswered_calls` and `attempts` of a job's ledger row.
async fn ledger_calls(db: &sqlx::PgPool, job: uuid::Uuid) -> (i32, i32) {
    sqlx::query_as("SELECT unanswered_calls, attempts FROM jobs WHERE id = $1").bind(job).fetch_one(db).await.unwrap()
}

/// A non-streamed answer's headers come only once the provider has made the
/// whole answer: 35 s and 3 minutes of generation (at 10 tokens/s) reach the
/// official SDK, with its own defaults, each from one provider call.
#[tokio::test]
async fn slow_non_streamed_answers_reach_the_openai_sdk_with_one_provider_call_each() {
    let stack = Stack::start_with(|c| {
        // The defaults, which the test harness otherwise shortens.
        c.ingress.sync_timeout_ms = sluice_core::config::IngressConfig::default().sync_timeout_ms;
        add_profile_pool(c, "slow-35s", "mock@tokens=350,tps=10");
        add_profile_pool(c, "slow-3m", "mock@tokens=1800,tps=10");
    })
    .await;
    let stdout = crate::sdk::run_sdk(
        "openai_slow.py",
        &[
            ("OPENAI_BASE_URL", format!("{}/v1", stack.base)),
            ("OPENAI_API_KEY", stack.key.clone()),
            ("SLUICE_MODELS", "slow-35s,slow-3m".to_owned()),
        ],
    )
    .await;
    for (model, tokens, at_least) in [("slow-35s", 350, 34.0), ("slow-3m", 1800, 179.0)] {
        let line = stdout.lines().find(|l| l.starts_with(&format!("{model}: "))).expect(&stdout).to_owned();
        assert!(line.contains(": 200 "), "{line}");
        let field = |name: &str| line.split(&format!("{name}=")).nth(1).and_then(|v| v.split(' ').next()).unwrap();
        assert!(field("completion_tokens").parse::<u64>().unwrap() >= tokens, "{line}");
        assert!(field("seconds").parse::<f64>().unwrap() >= at_least, "the answer took its time: {line}");
        let job: uuid::Uuid = field("job").parse().unwrap();
        let row = stack.ledger_row(job, "completed").await;
        assert_eq!(row.attempts, 1, "{line}");
    }
    assert_eq!(stack.mock.requests().await, 2, "one provider call each: {stdout}");
}

/// A call that runs past `upstream.request_timeout_ms` after its request was
/// sent may have been billed: it is made again `max_unanswered_repeats`
/// times, never handed back to the queue for `max_attempts` more, and the
/// job's record and ledger row count the calls.
#[tokio::test]
async fn a_call_left_unanswered_is_made_again_only_within_its_budget() {
    let stack = Stack::start_with(|c| {
        c.upstream.request_timeout_ms = 500;
        c.upstream.max_unanswered_repeats = 1;
        c.worker.max_attempts = 4;
        add_profile_pool(c, "too-slow", "mock@first_ms=2000");
    })
    .await;
    let mut body = Stack::job_body("slower than the call's timeout");
    body["body"]["model"] = "too-slow".into();
    let job: serde_json::Value = stack.submit_job(&stack.key, &body, None).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let job = stack.job_with_status(&id, "failed").await;
    assert_eq!(job["error"]["code"], "timeout", "{job}");
    assert_eq!(job["error"]["status"], 504, "{job}");
    assert_eq!(job["unanswered_calls"], 2, "{job}");
    let row = stack.ledger_row(id.parse().unwrap(), "failed").await;
    assert_eq!(row.error_code.as_deref(), Some("timeout"));
    assert_eq!(ledger_calls(&stack.db, id.parse().unwrap()).await, (2, 1), "two calls, one delivery");
    assert_eq!(stack.mock.requests().await, 2, "the first call and one repeat, not one per attempt");
}

/// A worker that stalls (SIGSTOP) mid-call past `ack_wait` loses its job to
/// the redelivery another worker runs; when it wakes and its own call
/// returns, it records nothing: the job's state has one terminal revision
/// (the other run's, so one webhook), and the loss is counted.
#[tokio::test]
async fn a_stalled_run_that_lost_its_job_to_a_redelivery_records_nothing() {
    let mut cluster = Cluster::start(sluice_mock_provider::Settings::default(), 4, "").await;
    cluster.start_ingress().await;
    cluster.start_worker().await;
    let (tenant, key) = cluster.tenant("stalled", settings(None, None, None)).await;
    // The first call takes 6 s: long enough to stall its worker past ack_wait (2 s).
    cluster.mock_faults(serde_json::json!({"hang_next": 1, "hang_ms": 6000})).await;
    let body = Stack::job_body("stall me");
    let job: serde_json::Value = cluster.submit(0, &key, &body).await.json().await.unwrap();
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    wait_for("the first worker's call", Duration::from_secs(10), || async {
        (cluster.mock_stats().await["requests"] == 1).then_some(())
    })
    .await;
    let (_, stalled) = cluster.pids().into_iter().find(|(name, _)| name == "sluice-worker").unwrap();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill").args([sig, &stalled.to_string()]).status().unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    // Another worker takes the redelivered job and finishes it.
    cluster.start_worker().await;
    let get = |key: String| {
        let (http, base) = (cluster.http.clone(), cluster.ingresses[0].clone());
        async move {
            let r = http.get(format!("{base}/v1/jobs/{id}")).bearer_auth(&key).send().await.unwrap();
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let done = wait_for("the redelivered job to complete", Duration::from_secs(20), || async {
        let job = get(key.clone()).await;
        (job["status"] == "completed").then_some(job)
    })
    .await;
    assert_eq!(done["attempts"], 2, "{done}");
    signal("-CONT");
    // The stalled worker's call returns; its run finds the job taken over.
    let stalled_ops = cluster.workers[0].clone();
    wait_for("the stalled run to count itself lost", Duration::from_secs(20), || async {
        let text = cluster.metrics(&stalled_ops).await;
        text.lines().any(|l| l.starts_with("sluice_worker_runs_lost_total") && l.ends_with(" 1")).then_some(())
    })
    .await;
    let job = get(key.clone()).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("completed"), Some(2)), "{job}");
    assert_eq!(cluster.mock_stats().await["requests"], 2, "each run called once");
    // One terminal revision in the job's state history: one webhook event.
    let nats = async_nats::connect(cluster.nats_url()).await.unwrap();
    let kv = async_nats::jetstream::new(nats).get_key_value("JOB_STATE").await.unwrap();
    let mut history = kv.history(jobstate::key(tenant, id)).await.unwrap();
    let mut terminal = Vec::new();
    while let Ok(Some(Ok(entry))) = tokio::time::timeout(Duration::from_secs(2), history.next()).await {
        let record: JobRecord = serde_json::from_slice(&entry.value).unwrap();
        if record.status.is_terminal() {
            terminal.push((record.status, record.attempts));
        }
    }
    assert_eq!(terminal, vec![(JobStatus::Completed, 2)], "only the run that owned the job wrote its end");
    // And the ledger keeps that run's record.
    wait_for("the ledger row", Duration::from_secs(10), || async {
        let row: Option<(String, i32)> = sqlx::query_as("SELECT status, attempts FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&cluster.db)
            .await
            .unwrap();
        (row == Some(("completed".into(), 2))).then_some(())
    })
    .await;
}

/// Submits `body` as a job while no worker runs and purges its stored state,
/// as if its retention had passed while it waited: returns the job record.
async fn orphaned(stack: &mut Stack, body: &serde_json::Value) -> serde_json::Value {
    stack.worker.take().unwrap().shutdown().await;
    let job: serde_json::Value = stack.submit_job(&stack.key, body, None).await.json().await.unwrap();
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    // (the stack's tenant; its ledger row waits for a worker's ledger loop)
    let tenant = sluice_core::db::ensure_tenant(&stack.db, "acme").await.unwrap();
    let nats = async_nats::connect(&stack.nats.url).await.unwrap();
    let kv = async_nats::jetstream::new(nats).get_key_value("JOB_STATE").await.unwrap();
    kv.purge(jobstate::key(tenant, id)).await.unwrap();
    job
}

/// A job whose stored state is gone when a worker takes it (its retention
/// passed while it waited, or a submit taken back after its publish landed)
/// cannot run, but it still ends: its ledger row does not stay `queued`.
#[tokio::test]
async fn a_job_whose_state_was_lost_still_ends_with_a_terminal_event() {
    let mut stack = Stack::start().await;
    let job = orphaned(&mut stack, &Stack::job_body("orphaned")).await;
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    stack.worker = Some(WorkerHandle::start(stack.config.clone()).await);
    let row = stack.ledger_row(id, "failed").await;
    assert_eq!(row.error_code.as_deref(), Some("internal_error"));
    assert_eq!(stack.mock.requests().await, 0, "nothing could record its result, so it was not run");
}

/// A job whose state is not found at all (no write of its key, not even the
/// tombstone a submit taken back leaves) while it cannot have expired: the
/// read came too early (a node rejoining after a partition answers from a
/// store it is still rebuilding). The job is handed back and read again,
/// and runs once its state is there, instead of ending as lost.
#[tokio::test]
async fn a_job_whose_state_is_not_found_yet_is_read_again_and_runs() {
    // One attempt: handing the job back while its state is not found must
    // not use it up.
    let mut stack = Stack::start_with(|c| c.worker.max_attempts = 1).await;
    stack.worker.take().unwrap().shutdown().await;
    let job: serde_json::Value =
        stack.submit_job(&stack.key, &Stack::job_body("read too early"), None).await.json().await.unwrap();
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let tenant = sluice_core::db::ensure_tenant(&stack.db, "acme").await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(&stack.nats.url).await.unwrap());
    let kv = js.get_key_value("JOB_STATE").await.unwrap();
    let key = jobstate::key(tenant, id);
    let state = kv.get(&key).await.unwrap().unwrap();
    // Every write of the key removed, without a tombstone.
    let bucket = js.get_stream("KV_JOB_STATE").await.unwrap();
    bucket.purge().filter(format!("$KV.JOB_STATE.{key}")).await.unwrap();
    assert!(kv.entry(&key).await.unwrap().is_none());

    stack.worker = Some(WorkerHandle::start(stack.config.clone()).await);
    wait_for("the worker to find no state and hand the job back", Duration::from_secs(10), || async {
        (stack.ingress_metric("sluice_worker_job_state_not_found_total").await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(stack.mock.requests().await, 0, "not run without its state");
    // The state arrives (the replica caught up): the job runs.
    kv.put(&key, state).await.unwrap();
    let row = stack.ledger_row(id, "completed").await;
    assert_eq!((row.error_code, row.attempts), (None, 1), "one run, however often it was handed back");
    assert_eq!(stack.mock.requests().await, 1);
}

/// A job whose outcome is stored while its message is still queued (the
/// run that ended it stored its state, then could not record its terminal
/// event: the events stream was electing a leader, as when its node is cut
/// off; or the run died in between): the redelivery does not run it again
/// and does not drop it either, it records the event from the state, with
/// the provider's status and usage, so the ledger row ends `completed`.
#[tokio::test]
async fn a_job_ended_without_its_event_is_recorded_from_its_state_by_the_redelivery() {
    let mut stack = Stack::start().await;
    stack.worker.take().unwrap().shutdown().await;
    let job: serde_json::Value =
        stack.submit_job(&stack.key, &Stack::job_body("ended, event lost"), None).await.json().await.unwrap();
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let tenant = sluice_core::db::ensure_tenant(&stack.db, "acme").await.unwrap();
    let nats = async_nats::connect(&stack.nats.url).await.unwrap();
    let kv = async_nats::jetstream::new(nats).get_key_value("JOB_STATE").await.unwrap();
    // The state as the run left it: completed, with the answer and the
    // ledger's note of the call.
    let key = jobstate::key(tenant, id);
    let mut record: JobRecord = serde_json::from_slice(&kv.get(&key).await.unwrap().unwrap()).unwrap();
    record.status = JobStatus::Completed;
    record.attempts = 1;
    record.started_ms = Some(sluice_core::now_ms());
    record.finished_ms = record.started_ms;
    record.finished_at = record.started_ms.map(|ms| ms / 1000);
    let answer = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"stored before the event was lost"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":11,"total_tokens":18}}"#;
    record.result = Some(serde_json::value::RawValue::from_string(answer.into()).unwrap());
    record.ledger = Some(jobstate::LedgerNote {
        upstream_status: Some(200),
        usage: sluice_core::event::Usage {
            prompt_tokens: Some(7),
            completion_tokens: Some(11),
            total_tokens: Some(18),
        },
    });
    kv.put(&key, serde_json::to_vec(&record).unwrap().into()).await.unwrap();

    stack.worker = Some(WorkerHandle::start(stack.config.clone()).await);
    let row = stack.ledger_row(id, "completed").await;
    assert_eq!((row.prompt_tokens, row.completion_tokens, row.upstream_status), (Some(7), Some(11), Some(200)));
    assert_eq!(row.attempts, 1, "the attempt that ran it, not the redelivery");
    assert_eq!(stack.mock.requests().await, 0, "a job with its outcome is not run again");
    let got: serde_json::Value = stack.get_job(&stack.key, &id.to_string()).await.json().await.unwrap();
    assert_eq!(got["result"]["choices"][0]["message"]["content"], "stored before the event was lost", "{got}");
    assert!(got.get("ledger").is_none(), "the ledger's note is not shown: {got}");
    // The job-state loop of the ledger saw the completed state too; the
    // event recorded from it is what the ledger has when that loop is the
    // one held up (its consumer led by a node still catching up). (The
    // worker runs in this process: its metrics are on the ingress's page.)
    wait_for("the terminal event recorded from the state", Duration::from_secs(10), || async {
        (stack.ingress_metric("sluice_worker_events_recorded_again_total").await >= 1.0).then_some(())
    })
    .await;
}

/// Queues a job while no worker runs and leaves its state as a run of
/// delivery 1 left it when its worker went away: `in_progress`, naming the
/// message it ran (the job's own, or, with `own` false, another).
async fn left_in_progress(stack: &Stack, body: &serde_json::Value, own: bool) -> (uuid::Uuid, serde_json::Value) {
    let tenant = sluice_core::db::ensure_tenant(&stack.db, "acme").await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(&stack.nats.url).await.unwrap());
    let kv = js.get_key_value("JOB_STATE").await.unwrap();
    let mut jobs = js.get_stream(&stack.config.nats.jobs_stream).await.unwrap();
    let job: serde_json::Value = stack.submit_job(&stack.key, body, None).await.json().await.unwrap();
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let seq = jobs.info().await.unwrap().state.last_sequence;
    let message = jobs.get_raw_message(seq).await.unwrap();
    let named = message.headers.get("Nats-Msg-Id").map(|v| v.to_string());
    assert_eq!(named.as_deref(), Some(id.to_string().as_str()), "the stream's last message is this job's");
    let key = jobstate::key(tenant, id);
    let mut record: JobRecord = serde_json::from_slice(&kv.get(&key).await.unwrap().unwrap()).unwrap();
    record.status = JobStatus::InProgress;
    record.attempts = 1;
    record.started_ms = Some(sluice_core::now_ms());
    record.started_at = record.started_ms.map(|ms| ms / 1000);
    record.message_seq = Some(if own { seq } else { seq + 1_000_000 });
    kv.put(&key, serde_json::to_vec(&record).unwrap().into()).await.unwrap();
    (id, job)
}

/// A consumer whose leader changed may deliver a message again with a
/// delivery count of 1 (the deliveries its old leader made were not yet
/// replicated). Such a delivery of the message whose run left its job
/// `in_progress` carries the run on; a delivery of another message of the
/// same job (a repeated publish) is dropped as the duplicate it is.
#[tokio::test]
async fn a_job_left_in_progress_is_carried_on_by_its_own_message_whatever_its_delivery_count() {
    let mut stack = Stack::start().await;
    stack.worker.take().unwrap().shutdown().await;
    let (own, _) = left_in_progress(&stack, &Stack::job_body("its own message"), true).await;
    left_in_progress(&stack, &Stack::job_body("another message"), false).await;

    stack.worker = Some(WorkerHandle::start(stack.config.clone()).await);
    let row = stack.ledger_row(own, "completed").await;
    assert_eq!(row.attempts, 2, "the run cut short, and the one that carried it on");
    let got: serde_json::Value = stack.get_job(&stack.key, &own.to_string()).await.json().await.unwrap();
    assert_eq!(got["status"], "completed", "{got}");
    assert!(got.get("message_seq").is_none(), "the queue's sequence is not shown: {got}");
    // The second job's message is not the one that runs it: dropped, not run.
    wait_for("the duplicate message dropped", Duration::from_secs(10), || async {
        (stack.ingress_metric("sluice_worker_duplicate_messages_dropped_total").await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(stack.mock.requests().await, 1, "the carried-on run called once; the duplicate never");
}

/// The same once the job's deadline has passed: it ends `expired` (it
/// stayed `in_progress` for ever when such a redelivery was dropped).
#[tokio::test]
async fn a_job_left_in_progress_past_its_deadline_ends_expired() {
    let mut stack = Stack::start().await;
    stack.worker.take().unwrap().shutdown().await;
    let mut body = Stack::job_body("in progress, then too late");
    body["expires_in"] = serde_json::json!(1);
    let (id, job) = left_in_progress(&stack, &body, true).await;
    wait_past_deadline(&job).await;
    stack.worker = Some(WorkerHandle::start(stack.config.clone()).await);
    let row = stack.ledger_row(id, "expired").await;
    assert_eq!(row.error_code, None);
    assert_eq!(stack.mock.requests().await, 0);
}

/// The same past its deadline: the job ends `expired`, not `failed`.
#[tokio::test]
async fn a_job_whose_state_was_lost_past_its_deadline_ends_expired() {
    let mut stack = Stack::start().await;
    let mut body = Stack::job_body("orphaned, then too late");
    body["expires_in"] = serde_json::json!(1);
    let job = orphaned(&mut stack, &body).await;
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    wait_past_deadline(&job).await;
    stack.worker = Some(WorkerHandle::start(stack.config.clone()).await);
    let row = stack.ledger_row(id, "expired").await;
    assert_eq!(row.error_code, None);
    assert_eq!(stack.mock.requests().await, 0);
}

/// A synchronous request whose wait ran out (504 naming its job) keeps its
/// answer when its ingress is gone before the answer comes (a rolling
/// deploy): the worker stores the outcome itself, a small answer and one
/// too large for a message alike, and another ingress serves it.
#[tokio::test]
async fn a_timed_out_request_keeps_its_answer_when_its_ingress_restarts() {
    let stack = Stack::start_with(|c| c.ingress.sync_timeout_ms = 1_000).await;
    stack.mock.faults(serde_json::json!({"hang_next": 2, "hang_ms": 4000})).await;
    let body = Stack::chat_body("answered after its ingress left");
    let small = stack.chat(&body);
    let large = stack
        .http
        .post(format!("{}/v1/embeddings", stack.base))
        .bearer_auth(&stack.key)
        .json(&crate::large::embeddings_body(100))
        .send();
    let (small, large) = tokio::join!(small, large);
    let mut ids = Vec::new();
    for r in [small, large.unwrap()] {
        assert_eq!(r.status(), 504);
        assert_eq!(r.headers().get("x-should-retry").and_then(|v| v.to_str().ok()), Some("false"));
        let error: serde_json::Value = r.json().await.unwrap();
        ids.push(error["error"]["job_id"].as_str().unwrap().to_owned());
    }
    // Gone before either answer came: nobody is subscribed to its replies.
    stack.stop_ingress();
    assert!(stack.mock.requests().await <= 2);
    let (other, _guard) = stack.another_ingress().await;
    let get = |id: &str| {
        let url = format!("{other}/v1/jobs/{id}");
        let (http, key) = (stack.http.clone(), stack.key.clone());
        async move { http.get(url).bearer_auth(key).send().await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    for (id, check) in ids.iter().zip(["chat", "embeddings"]) {
        let job = wait_for("the answer stored by the worker", Duration::from_secs(20), || async {
            let job = get(id).await;
            (job["status"] == "completed").then_some(job)
        })
        .await;
        match check {
            "chat" => assert_eq!(
                job["result"]["choices"][0]["message"]["content"], "mock reply to: answered after its ingress left",
                "{job}"
            ),
            _ => {
                assert_eq!(job["result"]["data"].as_array().map(Vec::len), Some(100));
                assert!(job["result_bytes"].as_u64().unwrap() > 1024 * 1024);
            }
        }
    }
    assert_eq!(stack.mock.requests().await, 2, "each ran once");
}

/// A synchronous request repeated with its `Idempotency-Key` while the first
/// runs, and after it ended, gets the first one's answer: one provider call.
/// The key reused for another body is refused.
#[tokio::test]
async fn a_repeated_synchronous_request_with_its_idempotency_key_gets_the_first_answer() {
    let stack = Stack::start().await;
    stack.mock.faults(serde_json::json!({"hang_next": 1, "hang_ms": 1500})).await;
    let body = Stack::chat_body("only once");
    let send = |body: serde_json::Value| {
        let (http, url, key) = (stack.http.clone(), format!("{}/v1/chat/completions", stack.base), stack.key.clone());
        async move { http.post(url).bearer_auth(key).header("idempotency-key", "k-1").json(&body).send().await.unwrap() }
    };
    let first = tokio::spawn(send(body.clone()));
    wait_for("the first call", Duration::from_secs(10), || async { (stack.mock.requests().await == 1).then_some(()) })
        .await;
    let during = send(body.clone()).await;
    let first = first.await.unwrap();
    let after = send(body.clone()).await;
    let job = |r: &reqwest::Response| r.headers().get("x-sluice-job-id").unwrap().to_str().unwrap().to_owned();
    let (id, during_id, after_id) = (job(&first), job(&during), job(&after));
    assert_eq!((during_id.as_str(), after_id.as_str()), (id.as_str(), id.as_str()));
    let replayed = |r: &reqwest::Response| r.headers().get("idempotent-replayed").is_some();
    assert_eq!((replayed(&first), replayed(&during), replayed(&after)), (false, true, true));
    let mut contents = Vec::new();
    for r in [first, during, after] {
        assert_eq!(r.status(), 200);
        let answer: serde_json::Value = r.json().await.unwrap();
        contents.push(answer["choices"][0]["message"]["content"].as_str().unwrap().to_owned());
    }
    assert!(contents.iter().all(|c| c == "mock reply to: only once"), "{contents:?}");
    assert_eq!(stack.mock.requests().await, 1, "one provider call for three requests");
    // The job is there to fetch, like any other.
    assert_eq!(stack.job_with_status(&id, "completed").await["attempts"], 1);
    let other = send(Stack::chat_body("something else")).await;
    assert_eq!(other.status(), 409);
    assert_eq!(stack.mock.requests().await, 1);
}

/// A synchronous request kept by its `Idempotency-Key` and cancelled before
/// a worker took it is answered as cancelled (409) when a worker does, not
/// left waiting for its 504.
#[tokio::test]
async fn a_kept_synchronous_request_cancelled_while_queued_is_answered_at_once() {
    let mut stack = Stack::start().await;
    stack.worker.take().unwrap().shutdown().await;
    let (http, url, key) = (stack.http.clone(), format!("{}/v1/chat/completions", stack.base), stack.key.clone());
    let body = Stack::chat_body("cancel me");
    let waiting = tokio::spawn(async move {
        http.post(url).bearer_auth(key).header("idempotency-key", "c-1").json(&body).send().await.unwrap()
    });
    let tenant = sluice_core::db::ensure_tenant(&stack.db, "acme").await.unwrap();
    let id = stack.job_of_key(tenant, "c-1").await.to_string();
    wait_for("the kept request's state", Duration::from_secs(10), || async {
        (stack.get_job(&stack.key, &id).await.status() == 200).then_some(())
    })
    .await;
    let r = stack.http.post(format!("{}/v1/jobs/{id}/cancel", stack.base)).bearer_auth(&stack.key).send().await;
    assert_eq!(r.unwrap().status(), 200);
    stack.worker = Some(WorkerHandle::start(stack.config.clone()).await);
    let r = waiting.await.unwrap();
    assert_eq!(r.status(), 409, "cancelled, not a 504 at the end of the wait");
    assert_eq!(stack.mock.requests().await, 0);
}

/// A synchronous answer lost on its way to the ingress (the ingress's NATS
/// node went down as the worker published it, say) is not lost with it: the
/// ingress confirms every answer it takes, and a worker whose answer is not
/// confirmed stores it as the job's state. Here the job names a reply
/// subject nobody listens on, as an ingress cut off from NATS would.
#[tokio::test]
async fn a_synchronous_answer_its_ingress_never_got_is_stored_and_sent_again() {
    use sluice_core::wire::envelope::{Class, Endpoint, Envelope};
    let stack = Stack::start().await;
    let tenant = sluice_core::db::ensure_tenant(&stack.db, "acme").await.unwrap();
    let now = sluice_core::now_ms();
    let env = Envelope {
        job_id: uuid::Uuid::now_v7(),
        tenant,
        pool: crate::harness::MODEL.to_owned(),
        endpoint: Endpoint::ChatCompletions,
        reply: Some(sluice_core::wire::subjects::reply("cut-off-ingress", 1)),
        deadline_ms: now + 60_000,
        submitted_ms: now,
        request_id: "lost-answer".into(),
        traceparent: None,
        est_tokens: 0,
        queued_counted: false,
        tpm_window: None,
        stream: false,
        body_ref: None,
        wait_until_ms: Some(now + 20_000),
        kept: false,
        confirm: true,
    };
    let nats = async_nats::connect(&stack.nats.url).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let subject = sluice_core::wire::subjects::job(&env.pool, Class::Interactive, tenant);
    let body = serde_json::to_vec(&Stack::chat_body("nobody hears this")).unwrap();
    js.publish_with_headers(subject, env.to_headers(), body.into()).await.unwrap().await.unwrap();

    let job = wait_for("the answer stored as the job's state", Duration::from_secs(10), || async {
        let r = stack.get_job(&stack.key, &env.job_id.to_string()).await;
        let job: serde_json::Value = r.json().await.ok()?;
        (job["status"] == "completed").then_some(job)
    })
    .await;
    let content = job["result"]["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(content.contains("nobody hears this"), "{job}");
    // The stored state carries the call's tokens for the ledger, which may
    // read it before the run's event (and keeps the first terminal row).
    let kv = js.get_key_value("JOB_STATE").await.unwrap();
    let stored: sluice_core::jobstate::JobRecord =
        serde_json::from_slice(&kv.get(jobstate::key(tenant, env.job_id)).await.unwrap().unwrap()).unwrap();
    let note = stored.ledger.expect("the ledger's note is stored with the outcome");
    assert!(note.usage.prompt_tokens.is_some() && note.upstream_status == Some(200), "{note:?}");
    // An ingress that was only reconnecting subscribes again: the stored
    // answer is sent to it once more, marked stored (nothing to confirm).
    let late = async_nats::connect(&stack.nats.url).await.unwrap();
    let mut again = late.subscribe(env.reply.clone().unwrap()).await.unwrap();
    late.flush().await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(10), again.next())
        .await
        .expect("the stored answer sent again within 10 s")
        .unwrap();
    match sluice_core::wire::reply::Reply::decode(message.headers.as_ref(), message.payload).unwrap() {
        sluice_core::wire::reply::Reply::Answer(answer) => {
            assert!(answer.stored && !answer.ends_stream, "{answer:?}");
            assert_eq!(answer.job.job_id, env.job_id);
        }
        other => panic!("not an answer: {other:?}"),
    }
    assert_eq!(stack.mock.requests().await, 1);
}
