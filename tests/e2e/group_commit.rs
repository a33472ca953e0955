//! The group commit (`nats.group_commit`): concurrent writes share atomic
//! batches on a real nats-server, each caller learns its own sequence and
//! its own refusal, and jobs submitted at once through it run once each.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishError, context::PublishErrorKind, publish::PublishAck, stream};
use bytes::Bytes;
use sluice_core::group_commit::{GroupCommit, expect_revision};
use sluice_core::tasks::Tasks;

use crate::harness::{NatsServer, Stack, poll_until, wait_for};

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

/// Headers carrying `id` as the message id.
fn with_id(id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    headers
}

/// Sends `n` writes at once, the i-th through `commits[i % commits.len()]`
/// with the subject, headers and payload `write(i)` gives; their answers, in order.
async fn write_at_once(
    commits: &[GroupCommit],
    n: usize,
    write: impl Fn(usize) -> (String, HeaderMap, Bytes),
) -> Vec<Result<PublishAck, PublishErrorKind>> {
    let writes = (0..n).map(|i| {
        let commit = commits[i % commits.len()].clone();
        let (subject, headers, payload) = write(i);
        tokio::spawn(async move { commit.publish(subject, headers, payload).await.map_err(|e| e.kind()) })
    });
    futures::future::join_all(writes).await.into_iter().map(Result::unwrap).collect()
}

#[tokio::test]
async fn concurrent_writes_share_commits_and_each_learns_its_own_sequence() {
    let nats = NatsServer::start().await;
    let (client, js, stream) = stream_with_atomic(&nats).await;
    let commit = GroupCommit::start(&Tasks::new(), client, js, "GC");
    let acks = write_at_once(std::slice::from_ref(&commit), 300, |i| {
        (format!("gc.w.{i}"), HeaderMap::new(), Bytes::from(i.to_string()))
    })
    .await;
    let sequences: Vec<u64> = acks.into_iter().map(|ack| ack.unwrap().sequence).collect();
    assert_eq!(sequences.iter().collect::<HashSet<_>>().len(), 300, "every write has its own sequence");
    for (i, seq) in sequences.into_iter().enumerate() {
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
    let commit = GroupCommit::start(&Tasks::new(), client, js, "GC");
    // Ten creates of one key race 190 creates of fresh keys: one of the ten
    // wins, nine are refused, and the batches they were in are stored apart.
    let subject = |i: usize| if i % 20 == 7 { "gc.key.same".to_owned() } else { format!("gc.key.{i}") };
    let answers = write_at_once(std::slice::from_ref(&commit), 200, |i| {
        (subject(i), expect_revision(0), Bytes::from(i.to_string()))
    })
    .await;
    let results: Vec<(String, Result<u64, PublishErrorKind>)> =
        answers.into_iter().enumerate().map(|(i, r)| (subject(i), r.map(|ack| ack.sequence))).collect();
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
    // The jobs and their states went through the group commit (only this
    // test sends Sluice's own streams through it in this process).
    let metrics = stack.http.get(format!("{}/metrics", stack.ops)).send().await.unwrap().text().await.unwrap();
    let writes_to = |stream: &str| -> f64 {
        let prefix = format!("sluice_group_commit_batch_size_sum{{stream=\"{stream}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    assert!(writes_to("JOBS") >= 70.0, "job publishes through the group commit:\n{metrics}");
    // Each of the 70 jobs: created by the ingress, moved on twice by the worker.
    assert!(
        writes_to(&sluice_core::wire::subjects::kv_stream("JOB_STATE")) >= 210.0,
        "state writes through the group commit:\n{metrics}"
    );
}

#[tokio::test]
async fn batched_writes_through_a_stream_leader_kill_are_stored_exactly_once() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use crate::chaos::cluster::NatsCluster;

    const LANES: usize = 48;
    const PER_LANE: usize = 40;
    let mut nats = NatsCluster::start().await;
    let servers = sluice_core::nats::server_addrs(&nats.url()).unwrap();
    let client = async_nats::connect(servers).await.unwrap();
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(3));
    js.create_stream(stream::Config {
        name: "GCR".into(),
        subjects: vec!["gcr.>".into()],
        storage: stream::StorageType::File,
        num_replicas: 3,
        allow_atomic_publish: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    let commit = GroupCommit::start(&Tasks::new(), client, js.clone(), "GCR");
    let acked = Arc::new(AtomicUsize::new(0));
    // Each lane writes its messages one after another, each under its own
    // `Nats-Msg-Id`, repeating on errors that may pass for up to 20 s (once
    // the stream answers again), as the ingress does with a job's publish.
    let lanes = (0..LANES).map(|lane| {
        let (commit, acked, js) = (commit.clone(), acked.clone(), js.clone());
        tokio::spawn(async move {
            let mut stored = Vec::new();
            for n in 0..PER_LANE {
                let id = format!("{lane}-{n}");
                let headers = with_id(&id);
                let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
                loop {
                    match commit.publish(format!("gcr.{lane}"), headers.clone(), Bytes::from(id.clone())).await {
                        Ok(_) => break,
                        Err(e) if tokio::time::Instant::now() < give_up => {
                            assert!(
                                matches!(
                                    e.kind(),
                                    PublishErrorKind::TimedOut
                                        | PublishErrorKind::BrokenPipe
                                        | PublishErrorKind::StreamNotFound
                                ),
                                "write {id} refused for good: {e}"
                            );
                            poll_until(Duration::from_secs(20), || {
                                let js = js.clone();
                                async move { js.get_stream("GCR").await.ok().map(|_| ()) }
                            })
                            .await;
                        }
                        Err(e) => panic!("write {id} still failing after 20 s: {e}"),
                    }
                }
                acked.fetch_add(1, Ordering::Relaxed);
                stored.push(id);
            }
            stored
        })
    });
    let lanes: Vec<_> = lanes.collect();
    // The fault strikes once a quarter of the writes are acknowledged.
    let watched = acked.clone();
    wait_for("a quarter of the writes acknowledged", Duration::from_secs(30), || {
        let watched = watched.clone();
        async move { (watched.load(Ordering::Relaxed) >= LANES * PER_LANE / 4).then_some(()) }
    })
    .await;
    let leader = nats.leader_of("GCR").await.expect("the stream has a leader");
    nats.kill(&leader).await;
    let mut acknowledged = Vec::new();
    for lane in futures::future::join_all(lanes).await {
        acknowledged.extend(lane.unwrap());
    }
    assert_eq!(acknowledged.len(), LANES * PER_LANE);

    // Audit, replica by replica: the killed node comes back; once every
    // replica is current with the leader (so a missing write is lost, not
    // lagging), each node in turn leads and is read back whole. Every
    // acknowledged write must be on every replica exactly once.
    nats.restart(&leader);
    nats.caught_up("GCR").await;
    let mut stream = js.get_stream("GCR").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    for node in nats.names() {
        nats.make_leader("GCR", &node).await;
        let mut seen = std::collections::HashMap::<String, usize>::new();
        let (mut present, mut gaps) = (0, 0);
        for seq in 1..=last {
            // A sequence holds a message or none (a batch refused by a new
            // leader leaves a gap); any other answer is asked again.
            let read = poll_until(Duration::from_secs(10), || {
                let (stream, node) = (stream.clone(), node.clone());
                async move {
                    match stream.get_raw_message(seq).await {
                        Ok(message) => Some(Some(message)),
                        Err(e)
                            if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                        {
                            Some(None)
                        }
                        Err(e) => {
                            println!("{node}: reading sequence {seq}: {e}; asking again");
                            None
                        }
                    }
                }
            })
            .await
            .unwrap_or_else(|| panic!("{node}: sequence {seq} could not be read within 10 s"));
            match read {
                Some(message) => {
                    present += 1;
                    *seen.entry(String::from_utf8(message.payload.to_vec()).unwrap()).or_default() += 1;
                }
                None => gaps += 1,
            }
        }
        let missing: Vec<&String> = acknowledged.iter().filter(|id| !seen.contains_key(*id)).collect();
        let doubled: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
        println!(
            "group commit leader kill, replica {node} (leading, all replicas current): sequences={last} messages={present} gaps={gaps} acknowledged_missing={} doubled={}",
            missing.len(),
            doubled.len()
        );
        assert!(missing.is_empty(), "{node}: acknowledged but not stored: {missing:?}");
        assert!(doubled.is_empty(), "{node}: stored more than once: {doubled:?}");
    }
    let counts = commit.counts();
    let (commits, written) = (counts.commits.load(Ordering::Relaxed), counts.writes.load(Ordering::Relaxed));
    println!(
        "group commit through a leader kill: {} writes acknowledged, {written} sent in {commits} commits, {} batches split",
        acknowledged.len(),
        counts.fallbacks.load(Ordering::Relaxed)
    );
    assert!(commits < written, "the writes shared commits");
}

#[tokio::test]
async fn batches_beyond_the_servers_in_flight_limit_fall_back_to_single_writes() {
    // One atomic batch in flight per stream: two processes' group commits,
    // two slots each, exceed it at once.
    let nats = NatsServer::start_with("limits { batch { max_inflight_per_stream: 1 } }").await;
    let (client, js, stream) = stream_with_atomic(&nats).await;
    let other = async_nats::connect(&nats.url).await.unwrap();
    let commits = [
        GroupCommit::start(&Tasks::new(), client, js, "GC"),
        GroupCommit::start(&Tasks::new(), other.clone(), jetstream::new(other), "GC"),
    ];
    let stored = write_at_once(&commits, 2000, |i| {
        (format!("gc.limit.{i}"), with_id(&format!("w-{i}")), Bytes::from(i.to_string()))
    })
    .await;
    for (i, ack) in stored.into_iter().enumerate() {
        let seq = ack.expect("every write is stored").sequence;
        assert_eq!(stream.get_raw_message(seq).await.unwrap().payload, Bytes::from(i.to_string()));
    }
    assert_eq!(stream.clone().info().await.unwrap().state.messages, 2000, "each write stored once");
    let split: u64 = commits.iter().map(|c| c.counts().fallbacks.load(Ordering::Relaxed)).sum();
    println!("in-flight limit 1: {split} batches refused and written one by one");
    assert!(split > 0, "the server refused batches beyond its limit");
}

#[tokio::test]
async fn a_repeated_message_id_in_a_batch_is_answered_as_the_duplicate_it_is() {
    let nats = NatsServer::start().await;
    let (client, js, stream) = stream_with_atomic(&nats).await;
    let commit = GroupCommit::start(&Tasks::new(), client, js, "GC");
    let first = commit.publish("gc.dup".into(), with_id("job-7"), Bytes::from("first")).await.unwrap();
    // The stream refuses a batch holding a repeated id as a whole (nats-server
    // error 10201); every write of it must still get its own, right answer.
    let acks = write_at_once(std::slice::from_ref(&commit), 100, |i| {
        let id = if i == 50 { "job-7".to_owned() } else { format!("job-x{i}") };
        ("gc.dup".into(), with_id(&id), Bytes::from(format!("w{i}")))
    })
    .await;
    for (i, ack) in acks.into_iter().enumerate() {
        let ack = ack.unwrap();
        if i == 50 {
            assert!(ack.duplicate, "the repeated id is reported as a duplicate");
            assert_eq!(ack.sequence, first.sequence, "and points at the stored original");
        } else {
            assert!(!ack.duplicate);
            assert_eq!(stream.get_raw_message(ack.sequence).await.unwrap().payload, Bytes::from(format!("w{i}")));
        }
    }
    assert_eq!(stream.clone().info().await.unwrap().state.messages, 100, "the original and 99 new writes");
}

/// A write larger than a NATS message can hold (an answer over the
/// server's `max_payload`) fails alone, as not retryable; the other
/// tenants' writes batched with it are stored.
#[tokio::test]
async fn a_write_too_large_for_nats_fails_alone_and_its_batch_is_stored() {
    let nats = NatsServer::start().await;
    let (client, js, stream) = stream_with_atomic(&nats).await;
    let max = client.server_info().max_payload;
    let commit = GroupCommit::start(&Tasks::new(), client, js, "GC");
    let acks = write_at_once(std::slice::from_ref(&commit), 64, |i| {
        let payload = if i == 7 { Bytes::from(vec![b'x'; max + 1]) } else { Bytes::from(i.to_string()) };
        (format!("gc.w.{i}"), HeaderMap::new(), payload)
    })
    .await;
    for (i, ack) in acks.into_iter().enumerate() {
        if i == 7 {
            let kind = ack.expect_err("the oversized write is refused");
            assert!(!sluice_core::group_commit::retryable(&PublishError::new(kind)), "{kind:?} must not be retried");
        } else {
            let seq = ack.unwrap_or_else(|e| panic!("write {i} failed with the oversized one: {e:?}")).sequence;
            assert_eq!(stream.get_raw_message(seq).await.unwrap().subject.as_str(), format!("gc.w.{i}"));
        }
    }
    assert!(commit.counts().commits.load(Ordering::Relaxed) < 63, "the others still shared commits");
}
