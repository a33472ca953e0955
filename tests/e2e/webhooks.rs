//! Webhooks: Standard Webhooks signatures, retries with the same id, every
//! attempt recorded, 410, tenant default endpoints, the SSRF guard.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use hmac::{KeyInit, Mac};
use tokio::sync::mpsc;

use crate::harness::{Stack, wait_for};

/// One request the receiver got.
pub(crate) struct Received {
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

/// A webhook receiver on a dynamic loopback port; answers with the queued
/// statuses, then 200.
pub(crate) struct Receiver {
    pub(crate) url: String,
    rx: mpsc::UnboundedReceiver<Received>,
}

type Shared = (mpsc::UnboundedSender<Received>, Arc<Mutex<VecDeque<u16>>>);

impl Receiver {
    pub(crate) async fn start(statuses: &[u16]) -> Self {
        Self::start_on("127.0.0.1:0", statuses).await
    }

    async fn start_on(addr: &str, statuses: &[u16]) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Mutex::new(statuses.iter().copied().collect::<VecDeque<u16>>()));
        let app = axum::Router::new()
            .route(
                "/hook",
                axum::routing::post(|State((tx, queue)): State<Shared>, headers: HeaderMap, body: String| async move {
                    let _ = tx.send(Received { headers, body });
                    let status = queue.lock().unwrap().pop_front().unwrap_or(200);
                    // A 503 asks for a one-second pause, as receivers under load do.
                    let retry_after = if status == 503 { "1" } else { "0" };
                    (StatusCode::from_u16(status).unwrap(), [("retry-after", retry_after)])
                }),
            )
            .with_state((tx, queue));
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url: format!("http://{addr}/hook"), rx }
    }

    pub(crate) async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv()).await.expect("no webhook within 10 s").unwrap()
    }
}

/// Verifies a Standard Webhooks signature twice, both independently of
/// Sluice's code: by hand here, and with the Standard Webhooks reference
/// library (PyPI `standardwebhooks`, installed by the test set-up).
async fn verify(secret: &str, r: &Received) {
    verify_by_hand(secret, r);
    let python = std::env::var("SLUICE_TEST_PYTHON").expect("SLUICE_TEST_PYTHON is not set: run scripts/test.sh");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/verify_webhook.py");
    let header = |name: &str| r.headers[name].to_str().unwrap().to_owned();
    let mut child = tokio::process::Command::new(python)
        .arg(script)
        .env("WEBHOOK_SECRET", secret)
        .env("WEBHOOK_ID", header("webhook-id"))
        .env("WEBHOOK_TIMESTAMP", header("webhook-timestamp"))
        .env("WEBHOOK_SIGNATURE", header("webhook-signature"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, r.body.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("verified"),
        "the reference library refused the signature: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn verify_by_hand(secret: &str, r: &Received) {
    let id = r.headers["webhook-id"].to_str().unwrap();
    let ts = r.headers["webhook-timestamp"].to_str().unwrap();
    let key = base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.{}", r.body).as_bytes());
    let expected = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    let given = r.headers["webhook-signature"].to_str().unwrap();
    assert!(given.split(' ').any(|s| s == expected), "signature {given} is not {expected}");
    let now = sluice_core::now_ms() / 1000;
    assert!(ts.parse::<u64>().unwrap().abs_diff(now) < 60, "timestamp {ts} is not now");
}

async fn attempts(stack: &Stack, delivery: &str) -> Vec<Option<i32>> {
    sqlx::query_scalar("SELECT response_status FROM webhook_attempts WHERE delivery_id = $1 ORDER BY attempt")
        .bind(delivery)
        .fetch_all(&stack.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_finished_job_is_delivered_signed_and_the_attempt_recorded() {
    let stack = Stack::start().await;
    let mut receiver = Receiver::start(&[]).await;
    let secret = sluice_core::webhook::new_secret().unwrap();
    let mut body = Stack::job_body("hook me");
    body["webhook"] = serde_json::json!({"url": receiver.url, "secret": secret});
    let r = stack.submit_job(&stack.key, &body, None).await;
    let status = r.status();
    let job: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["webhook"]["url"], receiver.url.as_str());
    let id = job["id"].as_str().unwrap().to_owned();

    let got = receiver.next().await;
    verify(&secret, &got).await;
    let event: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(event["type"], "job.completed");
    assert_eq!(event["data"]["id"], id.as_str());
    assert_eq!(event["data"]["result"]["choices"][0]["message"]["content"], "mock reply to: hook me");
    assert!(event["data"]["webhook"].get("secret").is_none(), "the secret never travels");
    let delivery = got.headers["webhook-id"].to_str().unwrap().to_owned();
    wait_for("the attempt to be recorded", Duration::from_secs(5), || async {
        (attempts(&stack, &delivery).await == vec![Some(200)]).then_some(())
    })
    .await;
    // GET never shows the secret either.
    let job: serde_json::Value = stack.get_job(&stack.key, &id).await.json().await.unwrap();
    assert!(job["webhook"].get("secret").is_none());
}

#[tokio::test]
async fn a_failing_receiver_gets_retries_with_the_same_webhook_id() {
    let stack = Stack::start().await;
    let mut receiver = Receiver::start(&[500, 503]).await;
    let mut body = Stack::job_body("retry the hook");
    body["webhook"] = serde_json::json!({"url": receiver.url});
    let job: serde_json::Value = stack.submit_job(&stack.key, &body, None).await.json().await.unwrap();
    // No secret given: one was made and shown once.
    let secret = job["webhook"]["secret"].as_str().unwrap().to_owned();
    let first = receiver.next().await;
    let second = receiver.next().await;
    let third = receiver.next().await;
    let id = first.headers["webhook-id"].to_str().unwrap().to_owned();
    assert_eq!(second.headers["webhook-id"], id.as_str());
    assert_eq!(third.headers["webhook-id"], id.as_str());
    verify(&secret, &third).await;
    wait_for("three attempts recorded", Duration::from_secs(5), || async {
        (attempts(&stack, &id).await == vec![Some(500), Some(503), Some(200)]).then_some(())
    })
    .await;
    let status: String = sqlx::query_scalar("SELECT status FROM webhook_deliveries WHERE id = $1")
        .bind(&id)
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(status, "delivered");
    // The schedule says 100 ms, the 503's Retry-After says 1 s: the receiver wins.
    let gap_ms: f64 = sqlx::query_scalar(
        "SELECT (extract(epoch FROM (max(attempted_at) FILTER (WHERE attempt = 3)
                                   - max(attempted_at) FILTER (WHERE attempt = 2))) * 1000)::float8
         FROM webhook_attempts WHERE delivery_id = $1",
    )
    .bind(&id)
    .fetch_one(&stack.db)
    .await
    .unwrap();
    assert!(gap_ms >= 900.0, "retry came {gap_ms} ms after the 503, before its Retry-After");
}

#[tokio::test]
async fn a_410_disables_the_tenant_endpoint_and_cancelled_jobs_are_announced() {
    let mut stack = Stack::start().await;
    let mut receiver = Receiver::start(&[410]).await;
    let secret = sluice_core::webhook::new_secret().unwrap();
    let tenant = sluice_core::db::tenant_id(&stack.db, "acme").await.unwrap();
    sqlx::query("INSERT INTO webhook_endpoints (tenant_id, url, secret) VALUES ($1, $2, $3)")
        .bind(tenant)
        .bind(&receiver.url)
        .bind(&secret)
        .execute(&stack.db)
        .await
        .unwrap();
    // A job cancelled while queued is announced as job.cancelled.
    stack.worker.take().unwrap().shutdown().await;
    let job: serde_json::Value =
        stack.submit_job(&stack.key, &Stack::job_body("cancel me"), None).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    let cancel = stack.http.post(format!("{}/v1/jobs/{id}/cancel", stack.base)).bearer_auth(&stack.key).send();
    assert_eq!(cancel.await.unwrap().status(), 200);
    let _worker = crate::harness::WorkerHandle::start(stack.config.clone()).await;

    let got = receiver.next().await;
    verify(&secret, &got).await;
    let event: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(event["type"], "job.cancelled");
    wait_for("the endpoint to be disabled", Duration::from_secs(5), || async {
        let disabled: Option<bool> =
            sqlx::query_scalar("SELECT disabled_at IS NOT NULL FROM webhook_endpoints WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_optional(&stack.db)
                .await
                .unwrap();
        (disabled == Some(true)).then_some(())
    })
    .await;
    let status: String = sqlx::query_scalar("SELECT status FROM webhook_deliveries WHERE job_id = $1::uuid")
        .bind(id)
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(status, "gone");
}

#[tokio::test]
async fn private_webhook_targets_are_refused() {
    let stack = Stack::start().await;
    for url in ["http://10.0.0.7/hook", "http://169.254.169.254/latest", "http://192.168.1.1/x", "ftp://example.com/"] {
        let mut body = Stack::job_body("no");
        body["webhook"] = serde_json::json!({"url": url});
        let r = stack.submit_job(&stack.key, &body, None).await;
        assert_eq!(r.status(), 400, "{url}");
        let error: serde_json::Value = r.json().await.unwrap();
        assert_eq!(error["error"]["param"], "webhook", "{url}");
    }
    let mut body = Stack::job_body("no");
    body["webhook"] = serde_json::json!({"url": "http://127.0.0.1:9/hook", "secret": "not-a-secret"});
    assert_eq!(stack.submit_job(&stack.key, &body, None).await.status(), 400);
    assert_eq!(stack.mock.requests().await, 0);
}

#[tokio::test]
async fn redeliver_sends_the_webhook_again_with_the_same_id() {
    let stack = Stack::start().await;
    let mut receiver = Receiver::start(&[]).await;
    let mut body = Stack::job_body("again");
    body["webhook"] = serde_json::json!({"url": receiver.url});
    let job: serde_json::Value = stack.submit_job(&stack.key, &body, None).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    let first = receiver.next().await;
    let url = format!("{}/v1/jobs/{id}/webhook/redeliver", stack.base);
    let delivery = first.headers["webhook-id"].to_str().unwrap().to_owned();
    wait_for("the first delivery to be recorded", Duration::from_secs(5), || async {
        (attempts(&stack, &delivery).await == vec![Some(200)]).then_some(())
    })
    .await;
    assert_eq!(stack.http.post(&url).bearer_auth(&stack.key).send().await.unwrap().status(), 202);
    let again = receiver.next().await;
    assert_eq!(again.headers["webhook-id"], first.headers["webhook-id"]);
    let other = stack.key_of("stranger").await;
    assert_eq!(stack.http.post(&url).bearer_auth(&other).send().await.unwrap().status(), 404);
}

#[tokio::test]
async fn a_receiver_that_is_down_at_first_gets_the_event_when_it_comes_up() {
    let stack = Stack::start_with(|c| c.webhooks.retry_schedule_ms = vec![300; 8]).await;
    // A port with nothing listening: connections are refused.
    let port = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let mut body = Stack::job_body("wait for me");
    body["webhook"] = serde_json::json!({"url": url});
    let job: serde_json::Value = stack.submit_job(&stack.key, &body, None).await.json().await.unwrap();
    let secret = job["webhook"]["secret"].as_str().unwrap().to_owned();
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    wait_for("an attempt to fail against the closed port", Duration::from_secs(10), || async {
        let failed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
             WHERE d.job_id = $1 AND a.error IS NOT NULL",
        )
        .bind(id)
        .fetch_one(&stack.db)
        .await
        .unwrap();
        (failed >= 1).then_some(())
    })
    .await;
    let mut receiver = Receiver::start_on(&format!("127.0.0.1:{port}"), &[]).await;
    let got = receiver.next().await;
    verify(&secret, &got).await;
    let event: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(event["type"], "job.completed");
}

#[tokio::test]
async fn a_worker_killed_after_the_call_still_delivers_one_webhook_and_one_result() {
    let mut stack = Stack::start().await;
    let mut receiver = Receiver::start(&[]).await;
    stack.mock.faults(serde_json::json!({"hang_next": 1, "hang_ms": 300})).await;
    let mut body = Stack::job_body("kill after the call");
    body["webhook"] = serde_json::json!({"url": receiver.url});
    let job: serde_json::Value = stack.submit_job(&stack.key, &body, None).await.json().await.unwrap();
    let secret = job["webhook"]["secret"].as_str().unwrap().to_owned();
    let id = job["id"].as_str().unwrap().to_owned();
    // The moment the provider has answered, the worker dies.
    wait_for("the provider to answer", Duration::from_secs(10), || async {
        (stack.mock.stats().await["ok"] == 1).then_some(())
    })
    .await;
    stack.worker.take().unwrap().kill().await;
    let _replacement = crate::harness::WorkerHandle::start(stack.config.clone()).await;

    let got = receiver.next().await;
    verify(&secret, &got).await;
    let event: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(event["data"]["id"], id.as_str());
    // One delivery for the job: one webhook-id. (If the kill lands between
    // sending a webhook and recording the attempt, the receiver may get the
    // same event again later, under the same id, as at-least-once allows.)
    let delivery = got.headers["webhook-id"].to_str().unwrap().to_owned();
    let deliveries: Vec<String> = sqlx::query_scalar("SELECT id FROM webhook_deliveries WHERE job_id = $1::uuid")
        .bind(&id)
        .fetch_all(&stack.db)
        .await
        .unwrap();
    assert_eq!(deliveries, vec![delivery], "one webhook for the job");
    let job = stack.job_with_status(&id, "completed").await;
    assert_eq!(job["result"]["choices"][0]["message"]["content"], "mock reply to: kill after the call");
    stack.ledger_row(id.parse().unwrap(), "completed").await;
    assert_eq!(stack.ledger_count().await, 1);
}

#[tokio::test]
async fn a_rotated_tenant_secret_signs_alongside_the_previous_one() {
    let stack = Stack::start().await;
    let mut receiver = Receiver::start(&[]).await;
    let old = sluice_ingress::admin::set_webhook(&stack.config, "acme", &receiver.url).await.unwrap();
    let new = sluice_ingress::admin::set_webhook(&stack.config, "acme", &receiver.url).await.unwrap();
    assert_ne!(old, new);
    let (previous, overlapping): (Option<String>, Option<bool>) =
        sqlx::query_as("SELECT previous_secret, previous_expires_at > now() FROM webhook_endpoints")
            .fetch_one(&stack.db)
            .await
            .unwrap();
    assert_eq!(overlapping, Some(true));
    let tenant = sluice_core::db::ensure_tenant(&stack.db, "acme").await.unwrap();
    let keyring = stack.config.webhooks.keyring().unwrap();
    let place = sluice_core::seal::endpoint_place(tenant);
    assert_eq!(keyring.open(&place, &previous.unwrap()).unwrap(), old, "the previous secret, sealed");
    stack.submit_job(&stack.key, &Stack::job_body("rotate"), None).await;
    let got = receiver.next().await;
    let signatures = got.headers["webhook-signature"].to_str().unwrap();
    assert_eq!(signatures.split(' ').count(), 2, "{signatures}");
    // A receiver holding either secret accepts the event.
    verify(&old, &got).await;
    verify(&new, &got).await;
}

/// One tenant's receivers that hang hold at most its share of the delivery
/// slots (`webhooks.max_concurrency_per_tenant`): another tenant's webhook
/// goes out at once instead of waiting for their timeouts.
#[tokio::test]
async fn a_tenant_with_hanging_receivers_does_not_hold_up_another_tenants_webhooks() {
    let stack = Stack::start_with(|c| {
        c.webhooks.max_concurrency = 4;
        c.webhooks.max_concurrency_per_tenant = 2;
        c.webhooks.timeout_ms = 20_000;
    })
    .await;
    // A receiver that takes every request and never answers (the attempt
    // times out after `webhooks.timeout_ms`).
    let (tx, mut hung) = mpsc::unbounded_channel::<()>();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let tx = tx.clone();
            async move {
                let _ = tx.send(());
                std::future::pending::<StatusCode>().await
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    for i in 0..12 {
        let mut body = Stack::job_body(&format!("slow {i}"));
        body["webhook"] = serde_json::json!({"url": slow_url});
        assert_eq!(stack.submit_job(&stack.key, &body, None).await.status(), 202);
    }
    // Its share of the slots is taken, and no more.
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), hung.recv()).await.expect("slow deliveries start").unwrap();
    }
    let other = stack.key_of("other").await;
    let mut receiver = Receiver::start(&[]).await;
    let mut body = Stack::job_body("fast");
    body["webhook"] = serde_json::json!({"url": receiver.url});
    assert_eq!(stack.submit_job(&other, &body, None).await.status(), 202);
    let got = tokio::time::timeout(Duration::from_secs(5), receiver.next()).await;
    assert!(got.is_ok(), "the other tenant's webhook waited behind the hanging receivers");
    assert!(hung.try_recv().is_err(), "the hanging tenant got no more than its share");
}

/// A job's result too large for a NATS message stays out of its webhook
/// event (the delivery table keeps one row per event): the event says its
/// size in `result_bytes`, and `GET /v1/jobs/{id}` sends the result whole.
#[tokio::test]
async fn a_webhook_event_leaves_a_stored_result_out_and_names_its_size() {
    let stack = Stack::start().await;
    let mut receiver = Receiver::start(&[]).await;
    let inputs: Vec<String> = (0..100).map(|i| format!("document {i}")).collect();
    let body = serde_json::json!({
        "endpoint": "embeddings",
        "body": {"model": crate::harness::MODEL, "input": inputs, "dimensions": 1536},
        "webhook": {"url": receiver.url},
    });
    let r = stack.submit_job(&stack.key, &body, None).await;
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let got = receiver.next().await;
    let event: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(event["type"], "job.completed");
    assert!(event["data"].get("result").is_none(), "the stored result travelled in the event");
    let size = event["data"]["result_bytes"].as_u64().unwrap();
    assert!(size > 1024 * 1024, "{size}");
    assert!(got.body.len() < 64 * 1024, "the event is small: {} bytes", got.body.len());
    let job: serde_json::Value = stack.get_job(&stack.key, &id).await.json().await.unwrap();
    assert_eq!(job["result"]["data"].as_array().unwrap().len(), 100);
    assert_eq!(job["result_bytes"].as_u64(), Some(size));
}

/// Webhook secrets are sealed at rest (issue 15, item 7): the endpoint's
/// secret in Postgres, a per-job secret in the job's state and its delivery
/// row, none of them readable without the keyring; a delivery to the
/// tenant's endpoint keeps no copy and is signed with the endpoint's
/// secret as it is when sent, so a redelivery after a rotation carries the
/// new secret's signature; a secret left in clear by an older version
/// still signs and is sealed when a worker starts.
#[tokio::test]
async fn webhook_secrets_are_sealed_at_rest_and_a_redelivery_signs_with_the_rotated_secret() {
    let mut stack = Stack::start().await;
    let mut receiver = Receiver::start(&[]).await;
    let keyring = stack.config.webhooks.keyring().unwrap();
    let acme = sluice_core::db::ensure_tenant(&stack.db, "acme").await.unwrap();
    let stored = |db: sqlx::PgPool| async move {
        sqlx::query_as::<_, (String, Option<String>)>("SELECT secret, previous_secret FROM webhook_endpoints")
            .fetch_one(&db)
            .await
            .unwrap()
    };
    // A secret as its base64 body: what must not appear anywhere stored.
    let body_of = |s: &str| s.strip_prefix("whsec_").unwrap().to_owned();

    let old = sluice_ingress::admin::set_webhook(&stack.config, "acme", &receiver.url).await.unwrap();
    let (secret, _) = stored(stack.db.clone()).await;
    assert!(secret.starts_with("sealed:v1:test:") && !secret.contains(&body_of(&old)), "{secret}");
    let place = sluice_core::seal::endpoint_place(acme);
    assert_eq!(keyring.open(&place, &secret).unwrap(), old);
    let other = sluice_core::seal::endpoint_place(uuid::Uuid::now_v7());
    assert!(keyring.open(&other, &secret).is_err(), "sealed for its tenant only");

    stack.submit_job(&stack.key, &Stack::job_body("sealed"), None).await;
    let first = receiver.next().await;
    verify(&old, &first).await;
    let delivery = first.headers["webhook-id"].to_str().unwrap().to_owned();
    let copied: Option<String> = sqlx::query_scalar("SELECT secret FROM webhook_deliveries WHERE id = $1")
        .bind(&delivery)
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(copied, None, "a delivery to the tenant's endpoint keeps no copy of its secret");

    // Rotated, then redelivered: signed with the new secret (and the old one, for the overlap).
    let new = sluice_ingress::admin::set_webhook(&stack.config, "acme", &receiver.url).await.unwrap();
    let (secret, previous) = stored(stack.db.clone()).await;
    assert!(!secret.contains(&body_of(&new)) && !previous.as_deref().unwrap().contains(&body_of(&old)));
    wait_for("the first delivery to be recorded", Duration::from_secs(5), || async {
        (attempts(&stack, &delivery).await == vec![Some(200)]).then_some(())
    })
    .await;
    let job =
        serde_json::from_str::<serde_json::Value>(&first.body).unwrap()["data"]["id"].as_str().unwrap().to_owned();
    let url = format!("{}/v1/jobs/{job}/webhook/redeliver", stack.base);
    assert_eq!(stack.http.post(&url).bearer_auth(&stack.key).send().await.unwrap().status(), 202);
    let again = receiver.next().await;
    assert_eq!(again.headers["webhook-id"].to_str().unwrap(), delivery);
    verify(&new, &again).await;
    verify(&old, &again).await;

    // A per-job secret: shown once at submit, sealed for its job in the
    // job's state and in its delivery row.
    let mut body = Stack::job_body("own secret");
    body["webhook"] = serde_json::json!({"url": receiver.url});
    let job: serde_json::Value = stack.submit_job(&stack.key, &body, None).await.json().await.unwrap();
    let own = job["webhook"]["secret"].as_str().unwrap().to_owned();
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let got = receiver.next().await;
    verify(&own, &got).await;
    let nats = async_nats::connect(&stack.config.nats.url).await.unwrap();
    let states = async_nats::jetstream::new(nats).get_key_value(&stack.config.jobs.state_bucket).await.unwrap();
    let entry = states.get(sluice_core::jobstate::key(acme, id)).await.unwrap().unwrap();
    let record: sluice_core::jobstate::JobRecord = serde_json::from_slice(&entry).unwrap();
    let in_state = record.webhook.unwrap().secret;
    assert!(in_state.starts_with("sealed:v1:test:") && !in_state.contains(&body_of(&own)), "{in_state}");
    assert_eq!(keyring.open(&sluice_core::seal::job_place(id), &in_state).unwrap(), own);
    let row: Option<String> = sqlx::query_scalar("SELECT secret FROM webhook_deliveries WHERE job_id = $1")
        .bind(id)
        .fetch_one(&stack.db)
        .await
        .unwrap();
    let row = row.unwrap();
    assert!(row.starts_with("sealed:v1:test:") && !row.contains(&body_of(&own)), "{row}");

    // A secret in clear, as an older version stored it, still signs, and a
    // worker that starts seals it.
    let clear = sluice_core::webhook::new_secret().unwrap();
    sqlx::query("UPDATE webhook_endpoints SET secret = $1, previous_secret = NULL")
        .bind(&clear)
        .execute(&stack.db)
        .await
        .unwrap();
    stack.submit_job(&stack.key, &Stack::job_body("clear"), None).await;
    verify(&clear, &receiver.next().await).await;
    stack.worker.take().unwrap().shutdown().await;
    stack.worker = Some(crate::harness::WorkerHandle::start(stack.config.clone()).await);
    let (secret, _) = stored(stack.db.clone()).await;
    assert!(secret.starts_with("sealed:v1:test:"), "sealed at the worker's start: {secret}");
    assert_eq!(keyring.open(&place, &secret).unwrap(), clear);
}
