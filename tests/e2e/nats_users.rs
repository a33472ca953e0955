//! The whole system on a NATS server that authorizes `deploy/`'s users
//! (`deploy/base/nats/users.conf`): each component connects as its own user
//! and does all of its work without one permission violation, and what a
//! role must not do (the scaler publishing a job or reading the worker's
//! deliveries, the ingress pulling jobs) is refused by the server.

use std::time::Duration;

use futures::StreamExt;
use sluice_core::config::Config;
use sluice_core::nats::Role;
use sluice_core::secret::Secret;

use crate::harness::{MODEL, NatsServer, Stack, wait_for};

const USERS: &str = include_str!("../../deploy/base/nats/users.conf");

fn password(role: Role) -> String {
    format!("test-password-of-{role:?}")
}

fn user(role: Role) -> &'static str {
    match role {
        Role::Ingress => "sluice-ingress",
        Role::Worker => "sluice-worker",
        Role::Scaler => "sluice-scaler",
    }
}

fn connect_as(c: &mut Config, role: Role) {
    c.nats.user = Some(user(role).to_owned());
    c.nats.password = Secret::new(password(role));
}

async fn users_server() -> NatsServer {
    let env = [
        ("SLUICE_NATS_INGRESS_PASSWORD", password(Role::Ingress)),
        ("SLUICE_NATS_WORKER_PASSWORD", password(Role::Worker)),
        ("SLUICE_NATS_SCALER_PASSWORD", password(Role::Scaler)),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    NatsServer::start_configured("", "include ./users.conf", &[("users.conf", USERS)], &env).await
}

/// A raw client of `role`'s user, with `role`'s inbox prefix.
async fn client_as(stack: &Stack, role: Role) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user(role).into(), password(role))
        .custom_inbox_prefix(role.inbox_prefix())
        .connect(&stack.nats.url)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_component_works_as_its_own_nats_user_and_nothing_else_is_allowed() {
    let stack = Stack::start_on(
        users_server().await,
        |c| {
            c.pools[0].rpm = 100_000;
            c.pools[0].tpm = 100_000_000;
            connect_as(c, Role::Scaler);
        },
        connect_as,
    )
    .await;
    let unauthenticated = async_nats::connect(&stack.nats.url).await;
    assert!(unauthenticated.is_err(), "a client without a user was let in");
    sluice_core::db::set_tenant(
        &stack.db,
        "acme",
        &crate::procs::with_tpm(None, Some(1000), Some(10_000), Some(10_000_000)),
    )
    .await
    .unwrap();

    // Synchronous, streamed, large both ways, and a job with a webhook.
    assert_eq!(stack.chat(&Stack::chat_body("hello")).await.status(), 200);
    let streamed =
        serde_json::json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "x y z"}]});
    let r = stack.chat(&streamed).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    let long = "long context ".repeat(3 * 1024 * 1024 / 13);
    assert_eq!(stack.chat(&Stack::chat_body(&long)).await.status(), 200);
    let inputs: Vec<String> = (0..100).map(|i| format!("document {i}")).collect();
    let embeddings = serde_json::json!({"model": MODEL, "input": inputs, "dimensions": 1536});
    let r = stack.http.post(format!("{}/v1/embeddings", stack.base)).bearer_auth(&stack.key).json(&embeddings);
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().len() > 1024 * 1024);
    let mut receiver = crate::webhooks::Receiver::start(&[]).await;
    let mut job = serde_json::json!({"endpoint": "embeddings", "body": embeddings});
    job["webhook"] = serde_json::json!({"url": receiver.url});
    let r = stack.submit_job(&stack.key, &job, None).await;
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let done = stack.job_with_status(&id, "completed").await;
    assert_eq!(done["result"]["data"].as_array().map(Vec::len), Some(100));
    let event: serde_json::Value = serde_json::from_str(&receiver.next().await.body).unwrap();
    assert_eq!(event["type"], "job.completed");
    stack.ledger_row(id.parse().unwrap(), "completed").await;
    let r = stack.submit_job(&stack.key, &Stack::job_body(&long), Some("long-one")).await;
    let id = r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    stack.job_with_status(&id, "completed").await;
    assert_eq!(stack.submit_job(&stack.key, &Stack::job_body(&long), Some("long-one")).await.status(), 202);

    // The scaler, as its user, reads the backlog.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let server = sluice_scaler::server::Server::build(stack.config.clone()).await.unwrap();
    tokio::spawn(server.run(sluice_scaler::server::Listeners { grpc: listener, ops: None }, stop));
    let backlog = wait_for("the scaler's metric", Duration::from_secs(10), || async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).ok()?.connect().await.ok()?;
        let mut client = sluice_scaler::proto::external_scaler_client::ExternalScalerClient::new(channel);
        let object = sluice_scaler::proto::ScaledObjectRef {
            name: "sluice-worker".into(),
            namespace: "sluice".into(),
            scaler_metadata: [("pool".to_owned(), MODEL.to_owned())].into(),
        };
        let request =
            sluice_scaler::proto::GetMetricsRequest { scaled_object_ref: Some(object), metric_name: String::new() };
        client.get_metrics(request).await.ok().map(|r| r.into_inner().metric_values[0].metric_value)
    })
    .await;
    assert_eq!(backlog, 0);
    assert_eq!(stack.nats.violations(), Vec::<String>::new(), "a component was refused something it needs");

    // What each role must not do.
    let scaler = client_as(&stack, Role::Scaler).await;
    let mut deliveries = scaler.subscribe("_INBOX_WORKER.>").await.unwrap();
    scaler.publish("jobs.mock-model.interactive.x", "forged".into()).await.unwrap();
    scaler.publish("$JS.API.DIRECT.GET.KV_JOB_STATE", "{}".into()).await.unwrap();
    let ingress = client_as(&stack, Role::Ingress).await;
    ingress.publish("$JS.API.CONSUMER.MSG.NEXT.JOBS.workers_x", "{}".into()).await.unwrap();
    let mut replies = ingress.subscribe("_INBOX_WORKER.>").await.unwrap();
    let refused = [
        ("sluice-scaler", "Subscription Violation - Subject \"_INBOX_WORKER.>\""),
        ("sluice-scaler", "Publish Violation - Subject \"jobs.mock-model.interactive.x\""),
        ("sluice-scaler", "Publish Violation - Subject \"$JS.API.DIRECT.GET.KV_JOB_STATE\""),
        ("sluice-ingress", "Publish Violation - Subject \"$JS.API.CONSUMER.MSG.NEXT.JOBS.workers_x\""),
        ("sluice-ingress", "Subscription Violation - Subject \"_INBOX_WORKER.>\""),
    ];
    wait_for("the server to refuse each", Duration::from_secs(10), || async {
        let seen = stack.nats.violations();
        let found = |(user, what): &(&str, &str)| {
            seen.iter().any(|l| l.contains(&format!("user:{user}\"")) && l.contains(what))
        };
        refused.iter().all(found).then_some(())
    })
    .await;
    // The worker's deliveries of a job run now reach neither.
    assert_eq!(stack.chat(&Stack::chat_body("private")).await.status(), 200);
    let leaked =
        tokio::time::timeout(Duration::from_millis(200), futures::future::select(deliveries.next(), replies.next()));
    assert!(leaked.await.is_err(), "another role received the worker's deliveries");
}
