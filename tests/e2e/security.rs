//! Security by default: secrets stay out of logs and metrics, and webhook
//! targets are checked after DNS resolution. (Keys stored as digests, the
//! revocation bound and the admin API's refusal of tenant keys are tested
//! in `auth` and `admin`.)

use std::time::Duration;

use crate::harness::{MODEL, Stack, TempDir, wait_for};
use crate::procs::{Cluster, settings};

#[tokio::test]
async fn a_webhook_host_resolving_to_loopback_is_refused_unless_allowed() {
    let stack = Stack::start_with(|c| c.webhooks.allow_loopback_targets = false).await;
    for url in ["http://localhost:9/hook", "http://127.0.0.1:9/hook", "http://[::1]:9/hook"] {
        let mut body = Stack::job_body("no");
        body["webhook"] = serde_json::json!({"url": url});
        let r = stack.submit_job(&stack.key, &body, None).await;
        assert_eq!(r.status(), 400, "{url}");
        let error: serde_json::Value = r.json().await.unwrap();
        assert_eq!(error["error"]["param"], "webhook", "{url}: {error}");
    }
}

#[tokio::test]
async fn no_secret_appears_in_logs_or_metrics() {
    let logs = TempDir::new("secret-logs");
    let mut cluster = Cluster::start(sluice_mock_provider::Settings::default(), 8, "").await;
    cluster.logs = Some(logs.0.clone());
    cluster.start_ingress().await;
    cluster.start_worker().await;
    let (_, key) = cluster.tenant("secretive", settings(None, None, None)).await;

    // A receiver for the webhook, and a job signed with a secret.
    let app = axum::Router::new().route("/hook", axum::routing::post(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let secret = sluice_core::webhook::new_secret().unwrap();
    let chat = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "keep it secret"}]});
    assert_eq!(cluster.chat(0, &key, &chat).await.status(), 200);
    let job =
        serde_json::json!({"endpoint": "chat.completions", "body": chat, "webhook": {"url": hook, "secret": secret}});
    assert_eq!(cluster.submit(0, &key, &job).await.status(), 202);
    // A wrong key is logged as a failure, never echoed.
    let wrong = format!("{key}x");
    assert_eq!(cluster.chat(0, &wrong, &chat).await.status(), 401);
    wait_for("the job and its webhook", Duration::from_secs(15), || async {
        let delivered: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'")
            .fetch_one(&cluster.db)
            .await
            .unwrap_or(0);
        (cluster.ledger_count("completed").await >= 2 && delivered >= 1).then_some(())
    })
    .await;

    let mut seen = String::new();
    for base in cluster.ingress_ops.iter().chain(cluster.workers.iter()) {
        seen.push_str(&cluster.metrics(base).await);
    }
    let mut files = 0;
    for entry in std::fs::read_dir(&logs.0).unwrap() {
        seen.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
        files += 1;
    }
    assert!(files >= 2, "the processes' logs were not captured");
    assert!(seen.contains("sluice_ingress_requests_total"), "metrics were not read");
    assert!(seen.to_lowercase().contains("debug"), "the logs are not at debug level");
    for (what, value) in [
        ("API key", key.as_str()),
        ("wrong key", wrong.as_str()),
        ("upstream key", "sk-upstream-test"),
        ("webhook secret", secret.as_str()),
    ] {
        assert!(!seen.contains(value), "the {what} appears in logs or metrics");
    }
    // The webhook secret's base64 body alone must not leak either.
    assert!(!seen.contains(secret.trim_start_matches("whsec_")), "the webhook secret's key appears");
}
