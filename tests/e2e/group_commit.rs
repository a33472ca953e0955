//! The group commit (`nats.group_commit`): concurrent writes share atomic
//! batches on a real nats-server, each caller learns its own sequence and
//! its own refusal, and jobs submitted at once through it run once each.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use sluice_core::group_commit::{GroupCommit, expect_revision};

use crate::harness::{NatsServer, Stack, wait_for};

async fn stream_with_atomic(nats: &NatsServer) -> (async_nats::Client, jetstream::Context, stream::Stream) {
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(stream::Config {
            name: "GC".into(),
            subjects: vec!["gc.>".into()],
            storage: stream::StorageType::File,
            allow_atomic_publish: true,
            ..Default::default()
        })
        .await
        .unwrap();
    (client, js, stream)
}

#[tokio::test]
async fn concurrent_writes_share_commits_and_each_learns_its_own_sequence() {
    let nats = NatsServer::start().await;
    let (client, js, stream) = stream_with_atomic(&nats).await;
    let commit = GroupCommit::start(client, js, "GC");
    let writes = (0..300).map(|i| {
        let commit = commit.clone();
        tokio::spawn(async move {
            let ack =
                commit.publish(format!("gc.w.{i}"), async_nats::HeaderMap::new(), Bytes::from(i.to_string())).await;
            (i, ack.unwrap().sequence)
        })
    });
    let acks: Vec<(usize, u64)> = futures::future::join_all(writes).await.into_iter().map(Result::unwrap).collect();
    let sequences: HashSet<u64> = acks.iter().map(|(_, seq)| *seq).collect();
    assert_eq!(sequences.len(), 300, "every write has its own sequence");
    for (i, seq) in acks {
        let stored = stream.get_raw_message(seq).await.unwrap();
        assert_eq!(stored.subject.as_str(), format!("gc.w.{i}"), "sequence {seq} holds another write");
        assert_eq!(stored.payload, Bytes::from(i.to_string()));
    }
    let counts = commit.counts();
    let (commits, written) = (counts.commits.load(Ordering::Relaxed), counts.writes.load(Ordering::Relaxed));
    assert_eq!(written, 300);
    assert!(commits < 150, "writes waiting together share a commit: {commits} commits for 300 writes");
    assert_eq!(counts.fallbacks.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_refused_write_fails_alone_and_the_rest_of_its_batch_is_stored() {
    let nats = NatsServer::start().await;
    let (client, js, stream) = stream_with_atomic(&nats).await;
    let commit = GroupCommit::start(client, js, "GC");
    // Ten creates of one key race 190 creates of fresh keys: one of the ten
    // wins, nine are refused, and the batches they were in are stored apart.
    let writes = (0..200).map(|i| {
        let commit = commit.clone();
        let subject = if i % 20 == 7 { "gc.key.same".to_owned() } else { format!("gc.key.{i}") };
        tokio::spawn(async move {
            let result = commit.publish(subject.clone(), expect_revision(0), Bytes::from(i.to_string())).await;
            (subject, result.map(|ack| ack.sequence).map_err(|e| e.kind()))
        })
    });
    let results: Vec<_> = futures::future::join_all(writes).await.into_iter().map(Result::unwrap).collect();
    let same: Vec<_> = results.iter().filter(|(s, _)| s == "gc.key.same").collect();
    assert_eq!(same.len(), 10);
    assert_eq!(same.iter().filter(|(_, r)| r.is_ok()).count(), 1, "one create of the key wins");
    assert!(same.iter().filter(|(_, r)| r.is_err()).all(|(_, r)| *r == Err(PublishErrorKind::WrongLastSequence)));
    for (subject, result) in results.iter().filter(|(s, _)| s != "gc.key.same") {
        let seq = *result.as_ref().unwrap_or_else(|e| panic!("{subject} was refused: {e:?}"));
        assert_eq!(stream.get_raw_message(seq).await.unwrap().subject.as_str(), subject);
    }
    assert_eq!(stream.clone().info().await.unwrap().state.messages, 191);
    assert!(commit.counts().fallbacks.load(Ordering::Relaxed) >= 1, "a batch holding a refused write was split");
}

#[tokio::test]
async fn jobs_submitted_at_once_through_the_group_commit_complete_once_each() {
    let stack = Stack::start_with(|c| c.nats.group_commit = true).await;
    let submits = (0..80).map(|i| {
        let (http, base, key) = (stack.http.clone(), stack.base.clone(), stack.key.clone());
        // Every fourth submit repeats an idempotency key used by another.
        let idem = (i % 4 == 0).then(|| format!("order-{}", i / 8));
        async move {
            let mut request = http
                .post(format!("{base}/v1/jobs"))
                .bearer_auth(key)
                .json(&Stack::job_body(&format!("job {}", i / 8 * 8)));
            if let Some(idem) = &idem {
                request = request.header("idempotency-key", idem);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 202, "submit {i}");
            let body: serde_json::Value = response.json().await.unwrap();
            body["id"].as_str().unwrap().to_owned()
        }
    });
    let ids: Vec<String> = futures::future::join_all(submits).await;
    let distinct: HashSet<&String> = ids.iter().collect();
    // 60 without a key, 20 with 10 keys used twice each.
    assert_eq!(distinct.len(), 70, "a repeated idempotency key returned its job");
    for id in &distinct {
        stack.job_with_status(id, "completed").await;
    }
    wait_for("every job in the ledger", Duration::from_secs(20), || async {
        (stack.ledger_count().await == 70).then_some(())
    })
    .await;
    assert_eq!(stack.mock.requests().await, 70, "each job ran once");
}
