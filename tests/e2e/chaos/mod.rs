//! The chaos suite: Sluice as it runs in production, attacked one fault at
//! a time while it serves a mixed load, then audited.
//!
//! Set-up: a three-node NATS cluster (JetStream, every stream at three
//! replicas), two `sluice-ingress` and two `sluice-worker` processes, a
//! private Postgres instance (so that it can be restarted), the mock
//! provider answering in 150 ms, and a webhook receiver. The load: one
//! request every 15 ms for 6 seconds, alternating synchronous chat
//! completions and asynchronous jobs with a webhook, spread over both
//! ingresses, each with a unique marker in its prompt. Mid-load, one fault:
//!
//! - `worker`: kill -9 of a worker with calls in flight, then a new one;
//! - `stalled-worker`: a worker stopped (SIGSTOP) past `worker.ack_wait_ms`,
//!   then continued: its jobs ran again elsewhere, and its own runs must
//!   record nothing (no second terminal state, no second webhook);
//! - `ingress`: kill -9 of an ingress, then a new one;
//! - `ingress-504`: the next 6 provider calls hang 25 s, past the 20 s
//!   synchronous wait; the ingress that answered a 504 naming its job is
//!   restarted (SIGTERM) at once; every such job's answer must be fetched
//!   afterwards (`timed_out(unfetched)`);
//! - `nats-leader`: kill -9 of the JOBS stream's leader node, restarted 2 s later;
//! - `postgres`: Postgres restarted;
//! - `provider`: the mock fails the next 30 calls (503) and answers 4 only
//!   after 5 s (slow, not failed: each is waited for, called once);
//! - `slow`: two asynchronous jobs whose (non-streamed) answers take 35 s
//!   and 130 s to come, headers included, as a long generation's do: each
//!   must complete after exactly one provider call (audited at the end);
//! - `duplicates`: 40 asynchronous submits with an `Idempotency-Key`, each
//!   sent twice at the same moment, once to each ingress: both copies must
//!   name the same job, exactly one of them as its first write (the other
//!   answered with `idempotent-replayed: true`), and the job must run once (its state's
//!   `attempts` is 1).
//!
//! Audit, after the load: every request whose submit got a 2xx (or a 504
//! naming its job) has exactly one ledger row in a terminal state (else it
//! is *lost*); every synchronous answer quotes its own marker and no two
//! requests got the same job id (else *duplicated*); no asynchronous job
//! announced two terminal outcomes (two webhook deliveries: else
//! *double_terminal*); every completed asynchronous job's webhook arrived.
//! The table is printed with the refusals by status and the time the fault
//! took to heal (from the fault to the last refused request; every later
//! one was accepted).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::harness::{MODEL, Mock, http_client, poll_until, wait_for};

pub(crate) mod cluster;
mod partition;
mod scenarios;
mod sluice;
use cluster::{NatsCluster, Postgres};
use scenarios::{audit_races, audit_slow, race_duplicates, submit_slow};
use sluice::{Sluice, hook_receiver};

/// What one request of the load saw.
#[derive(Debug, Clone)]
struct Outcome {
    sync: bool,
    /// HTTP status, or `None` when the connection failed.
    status: Option<u16>,
    job: Option<Uuid>,
    /// For a synchronous 200: the answer quoted its own marker.
    own_answer: bool,
    sent: Instant,
    /// When the answer (or the failure) arrived.
    done: Instant,
    base: String,
}

/// Offers the load for `duration`; `bases` may change under it (an
/// ingress killed, another started).
async fn load(
    sent_count: Arc<std::sync::atomic::AtomicUsize>,
    bases: Arc<Mutex<Vec<String>>>,
    key: String,
    hook: String,
    scenario: &'static str,
    duration: Duration,
) -> Vec<Outcome> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(15));
    while started.elapsed() < duration {
        tick.tick().await;
        let base = {
            let b = bases.lock().unwrap();
            // Both kinds of request reach every ingress (sync, async, sync…
            // against A, B, B, A… for two).
            b[(i + i / 2) % b.len()].clone()
        };
        let (http, key, hook) = (http.clone(), key.clone(), hook.clone());
        let marker = format!("{scenario}-{i}-{}", Uuid::new_v4().simple());
        let sync = i.is_multiple_of(2);
        i += 1;
        sent_count.store(i, std::sync::atomic::Ordering::Relaxed);
        let sent_at = Instant::now();
        tasks.push(tokio::spawn(async move {
            let chat = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": marker}]});
            let sent = if sync {
                http.post(format!("{base}/v1/chat/completions")).bearer_auth(&key).json(&chat).send().await
            } else {
                let secret = sluice_core::webhook::new_secret().unwrap();
                let body = serde_json::json!({"endpoint": "chat.completions", "body": chat,
                    "webhook": {"url": hook, "secret": secret}});
                http.post(format!("{base}/v1/jobs")).bearer_auth(&key).json(&body).send().await
            };
            let mut outcome = Outcome {
                sync,
                status: None,
                job: None,
                own_answer: false,
                sent: sent_at,
                done: sent_at,
                base: base.clone(),
            };
            outcome.done = Instant::now();
            let Ok(r) = sent else { return outcome };
            outcome.status = Some(r.status().as_u16());
            let header_job = r.headers().get("x-sluice-job-id").and_then(|v| v.to_str().ok()?.parse().ok());
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            outcome.done = Instant::now();
            outcome.job = header_job
                .or_else(|| body["id"].as_str().and_then(|s| s.parse().ok()))
                .or_else(|| body["error"]["job_id"].as_str().and_then(|s| s.parse().ok()));
            if let Some(content) = body["choices"][0]["message"]["content"].as_str() {
                outcome.own_answer = content == format!("mock reply to: {marker}");
            }
            outcome
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A request counts as accepted when the gateway took responsibility for
/// it: a 2xx, or a 504 that names the job it goes on as.
fn accepted(o: &Outcome) -> bool {
    matches!(o.status, Some(200..=299)) || (o.status == Some(504) && o.job.is_some())
}

#[derive(Debug)]
struct Row {
    scenario: &'static str,
    sent: usize,
    accepted: usize,
    /// Jobs with more than one terminal outcome announced (two webhook
    /// deliveries: the delivery id names the status). Counted for the
    /// asynchronous half of the load, whose jobs have a webhook.
    double_terminal: i64,
    /// Synchronous requests answered 504 naming their job, and of those,
    /// how many could not be fetched completed with their answer afterwards
    /// from an ingress that was not the one that answered.
    timed_out: usize,
    timed_out_unfetched: usize,
    completed: i64,
    failed: Vec<(String, i64)>,
    lost: usize,
    duplicated: usize,
    webhooks_missing: usize,
    /// Requests refused (not accepted), by status (`conn` when the
    /// connection failed).
    refused: Vec<(String, usize)>,
    recovered_ms: u128,
    /// Requests sent after the last refusal were accepted.
    resumed: bool,
    /// The longest an accepted request sent after the fault waited.
    slowest_ms: u128,
}

async fn audit(
    db: &sqlx::PgPool,
    scenario: &'static str,
    outcomes: &[Outcome],
    hooks: &Arc<Mutex<HashSet<Uuid>>>,
    fault_at: Instant,
    base: &str,
    key: &str,
) -> Row {
    let took: Vec<&Outcome> = outcomes.iter().filter(|o| accepted(o)).collect();
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    let mut duplicated = 0;
    let mut lost = 0;
    for o in &took {
        match o.job {
            Some(id) => {
                if !seen.insert(id) {
                    duplicated += 1;
                }
                ids.push(id);
            }
            // Accepted without a job to follow: nothing can prove it ran.
            None => lost += 1,
        }
        if o.sync && o.status == Some(200) && !o.own_answer {
            duplicated += 1;
        }
    }
    let terminal = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status IN ('completed', 'failed', 'expired', 'cancelled')",
        )
        .bind(&ids)
        .fetch_one(db)
        .await
        .unwrap_or(0)
    };
    // Every accepted job reaches a terminal state, or it is counted lost.
    poll_until(Duration::from_secs(90), || async { (terminal().await as usize == ids.len()).then_some(()) }).await;
    let done = terminal().await;
    lost += ids.len() - done as usize;
    let completed_async: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM jobs WHERE id = ANY($1) AND status = 'completed'")
            .bind(took.iter().filter(|o| !o.sync).filter_map(|o| o.job).collect::<Vec<_>>())
            .fetch_all(db)
            .await
            .unwrap();
    let missing_hooks = || {
        let got = hooks.lock().unwrap();
        completed_async.iter().filter(|id| !got.contains(id)).count()
    };
    poll_until(Duration::from_secs(30), || async { (missing_hooks() == 0).then_some(()) }).await;
    let missing = missing_hooks();
    let completed: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = ANY($1) AND status = 'completed'")
        .bind(&ids)
        .fetch_one(db)
        .await
        .unwrap();
    let failed: Vec<(String, i64)> = sqlx::query_as(
        "SELECT coalesce(error_code, status), count(*) FROM jobs WHERE id = ANY($1) AND status <> 'completed' AND status IN ('failed', 'expired', 'cancelled') GROUP BY 1 ORDER BY 1",
    )
    .bind(&ids)
    .fetch_all(db)
    .await
    .unwrap();
    if std::env::var("SLUICE_CHAOS_DEBUG").is_ok() {
        let reasons: Vec<(String, Option<String>, i64)> = sqlx::query_as(
            "SELECT status, error_message, count(*) FROM jobs WHERE id = ANY($1) AND status <> 'completed' GROUP BY 1, 2",
        )
        .bind(&ids)
        .fetch_all(db)
        .await
        .unwrap();
        println!("{scenario}: not completed {reasons:?}");
        // What the stored state says of the jobs not terminal in the ledger
        // (a state loop behind, or a job stuck in its queue), a few of them.
        let stuck: Vec<(Uuid, bool)> = sqlx::query_as(
            "SELECT id, false FROM jobs WHERE id = ANY($1) AND status NOT IN ('completed', 'failed', 'expired', 'cancelled') LIMIT 5",
        )
        .bind(&ids)
        .fetch_all(db)
        .await
        .unwrap();
        let http = http_client();
        for (id, _) in stuck {
            let sync = took.iter().any(|o| o.job == Some(id) && o.sync);
            let state = match http.get(format!("{base}/v1/jobs/{id}")).bearer_auth(key).send().await {
                Ok(r) => format!(
                    "{} {}",
                    r.status(),
                    r.text().await.unwrap_or_default().chars().take(160).collect::<String>()
                ),
                Err(e) => e.to_string(),
            };
            println!("{scenario}: stuck job {id} sync={sync} state: {state}");
        }
    }
    let double_terminal: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT job_id FROM webhook_deliveries WHERE job_id = ANY($1)
                               GROUP BY job_id HAVING count(*) > 1) t",
    )
    .bind(&ids)
    .fetch_one(db)
    .await
    .unwrap();
    // A 504 naming its job: the job goes on, and its answer is fetched later
    // (here from `base`, the ingress that answered may be gone).
    let timed_out: Vec<Uuid> = took.iter().filter(|o| o.sync && o.status == Some(504)).filter_map(|o| o.job).collect();
    // Polled together under one deadline: a fault that strands many of them
    // must fail the test, not keep it waiting a minute per job.
    let http = http_client();
    let pending = Mutex::new(timed_out.clone());
    poll_until(Duration::from_secs(60), || async {
        let ids = pending.lock().unwrap().clone();
        let mut still = Vec::new();
        for id in ids {
            let url = format!("{base}/v1/jobs/{id}");
            let job: Option<serde_json::Value> = match http.get(&url).bearer_auth(key).send().await {
                Ok(response) => response.json().await.ok(),
                Err(_) => None,
            };
            let fetched = job.is_some_and(|job| {
                job["status"] == "completed" && job["result"]["choices"][0]["message"]["content"].is_string()
            });
            if !fetched {
                still.push(id);
            }
        }
        let done = still.is_empty();
        *pending.lock().unwrap() = still;
        done.then_some(())
    })
    .await;
    let timed_out_unfetched = pending.lock().unwrap().len();
    // Recovered: from the fault until the last refused request was sent
    // (every request sent later was accepted); 0 when none was refused.
    let recovered_ms = outcomes
        .iter()
        .filter(|o| !accepted(o))
        .filter_map(|o| o.sent.checked_duration_since(fault_at))
        .max()
        .map_or(0, |d| d.as_millis());
    let slowest_ms = outcomes
        .iter()
        .filter(|o| accepted(o) && o.sent > fault_at)
        .map(|o| o.done - o.sent)
        .max()
        .map_or(0, |d| d.as_millis());
    let resumed = outcomes
        .iter()
        .any(|o| accepted(o) && o.sent.checked_duration_since(fault_at).is_some_and(|d| d.as_millis() > recovered_ms));
    let mut refused: std::collections::BTreeMap<String, usize> = Default::default();
    for o in outcomes.iter().filter(|o| !accepted(o)) {
        if std::env::var("SLUICE_CHAOS_DEBUG").is_ok() {
            println!(
                "refused {} {:?} sent {:?} after fault",
                o.base,
                o.status,
                o.sent.checked_duration_since(fault_at)
            );
        }
        *refused.entry(o.status.map_or("conn".to_owned(), |s| s.to_string())).or_default() += 1;
    }
    Row {
        scenario,
        sent: outcomes.len(),
        accepted: took.len(),
        double_terminal,
        timed_out: timed_out.len(),
        timed_out_unfetched,
        completed,
        failed,
        lost,
        duplicated,
        webhooks_missing: missing,
        refused: refused.into_iter().collect(),
        recovered_ms,
        resumed,
        slowest_ms,
    }
}

#[tokio::test]
async fn chaos_no_accepted_request_is_lost_or_duplicated() {
    let mut nats = NatsCluster::start().await;
    let (pg, db, db_url, _) = Postgres::start().await;
    let mock = Mock::start(sluice_mock_provider::Settings { latency_ms: 150, ..Default::default() }).await;
    let (receiver, hooks) = hook_receiver("127.0.0.1").await;
    let slow_pools = format!(
        r#"
# Answers that take 35 s and 130 s (10 tokens a second, sent whole).
[[pools]]
name = "slow-35s"
base_url = "{mock}/v1"
model = "mock@tokens=350,tps=10"
api_key = "sk-upstream-test"
[[pools]]
name = "slow-130s"
base_url = "{mock}/v1"
model = "mock@tokens=1300,tps=10"
api_key = "sk-upstream-test"
"#,
        mock = mock.base
    );
    let mut sluice = Sluice::configure(&nats.url(), &db_url, &mock.base, &slow_pools);
    let tenant = sluice_core::db::ensure_tenant(&db, "chaos").await.unwrap();
    let key = sluice_core::db::create_key(&db, tenant).await.unwrap().key.expose().to_owned();
    for _ in 0..2 {
        sluice.add_ingress().await;
        sluice.add_worker().await;
    }
    sluice.key_everywhere(&key).await;

    let scenarios: [&'static str; 9] = [
        "worker",
        "stalled-worker",
        "ingress",
        "ingress-504",
        "nats-leader",
        "postgres",
        "provider",
        "slow",
        "duplicates",
    ];
    let mut rows = Vec::new();
    let mut raced = Vec::new();
    let mut slow = Vec::new();
    for scenario in scenarios {
        let bases = Arc::new(Mutex::new(sluice.bases()));
        // Long enough after the fault to see the service come back.
        let length = if scenario == "nats-leader" { 14 } else { 6 };
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let running = tokio::spawn(load(
            sent.clone(),
            bases.clone(),
            key.clone(),
            receiver.clone(),
            scenario,
            Duration::from_secs(length),
        ));
        // The fault strikes once the load is under way (about 2 s of it).
        wait_for("the load to be under way", Duration::from_secs(10), || async {
            (sent.load(std::sync::atomic::Ordering::Relaxed) >= 130).then_some(())
        })
        .await;
        let fault_at = Instant::now();
        match scenario {
            "worker" => {
                let mut victim = sluice.workers.remove(0);
                let _ = victim.start_kill();
                let _ = victim.wait().await;
                sluice.add_worker().await;
            }
            "stalled-worker" => {
                // Stopped past `worker.ack_wait_ms` (2 s): its jobs run again
                // elsewhere, and its own runs, when it goes on, record nothing.
                let pid = sluice.workers[0].id().expect("the worker runs").to_string();
                let signal = |sig: &str| {
                    assert!(std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success())
                };
                signal("-STOP");
                let stopped_at = sent.load(std::sync::atomic::Ordering::Relaxed);
                // 200 more requests sent: about 3 s, past the ack wait.
                wait_for("the load to go on past the ack wait", Duration::from_secs(20), || async {
                    (sent.load(std::sync::atomic::Ordering::Relaxed) >= stopped_at + 200).then_some(())
                })
                .await;
                signal("-CONT");
            }
            "ingress-504" => {
                // The next calls hang past the 20 s synchronous wait: their
                // clients get 504 naming the job; the ingress that answered
                // is restarted (SIGTERM) at once, and the jobs' answers must
                // still be fetched from an ingress.
                let http = http_client();
                let ops = sluice.ops();
                // 504s each ingress has answered so far.
                let timeouts = |o: String| {
                    let http = http.clone();
                    async move {
                        let text = http.get(format!("{o}/metrics")).send().await.ok()?.text().await.ok()?;
                        let count = text
                            .lines()
                            .filter(|l| l.starts_with("sluice_ingress_requests_total{") && l.contains("status=\"504\""))
                            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                            .sum::<f64>();
                        Some(count)
                    }
                };
                let mut before = Vec::new();
                for o in &ops {
                    before.push(timeouts(o.clone()).await.unwrap_or(0.0));
                }
                mock.faults(serde_json::json!({"hang_next": 6, "hang_ms": 25000})).await;
                let answered = wait_for("a 504 naming a job", Duration::from_secs(60), || async {
                    for (i, o) in ops.iter().enumerate() {
                        if timeouts(o.clone()).await? > before[i] {
                            return Some(i);
                        }
                    }
                    None
                })
                .await;
                let (base, _, mut victim) = sluice.ingresses.remove(answered);
                let pid = victim.id().expect("the ingress runs").to_string();
                assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
                let _ = victim.wait().await;
                bases.lock().unwrap().retain(|b| *b != base);
                sluice.add_ingress().await;
                *bases.lock().unwrap() = sluice.bases();
            }
            "ingress" => {
                let (base, _, mut victim) = sluice.ingresses.remove(0);
                let _ = victim.start_kill();
                let _ = victim.wait().await;
                bases.lock().unwrap().retain(|b| *b != base);
                sluice.add_ingress().await;
                *bases.lock().unwrap() = sluice.bases();
            }
            "nats-leader" => {
                let leader = nats.leader_of("JOBS").await.expect("the JOBS stream has a leader");
                nats.kill(&leader).await;
                // The survivors elect a new leader; then the node comes back.
                wait_for("a new JOBS leader", Duration::from_secs(30), || async {
                    nats.leader_of("JOBS").await.filter(|l| *l != leader).map(|_| ())
                })
                .await;
                nats.restart(&leader);
            }
            "postgres" => {
                pg.run("restart");
            }
            "provider" => {
                mock.faults(serde_json::json!({"fail_next": 30, "error_status": 503, "hang_next": 4, "hang_ms": 5000}))
                    .await
            }
            "slow" => slow = submit_slow(&sluice.bases()[0], &key).await,
            "duplicates" => raced = race_duplicates(&sluice.bases(), &key).await,
            _ => unreachable!(),
        }
        let outcomes = running.await.unwrap();
        rows.push(audit(&db, scenario, &outcomes, &hooks, fault_at, &sluice.bases()[0], &key).await);
        mock.faults(serde_json::json!({})).await;
    }

    print_table(&rows);
    let racing = audit_races(&sluice.bases()[0], &key, &raced).await;
    println!("{racing}");
    let slow_ok = audit_slow(&db, &sluice.bases()[0], &key, &slow).await;
    let mock_calls = mock.requests().await;
    println!("chaos upstream calls={mock_calls} (jobs re-run after a kill are counted again)");
    // The faults met batched commits: writes and commits of the ingresses
    // still running (their job publishes and job states).
    let (mut writes, mut commits) = (0.0, 0.0);
    for base in sluice.ops() {
        let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
        for line in text.lines() {
            let value = || line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            if line.starts_with("sluice_group_commit_batch_size_sum{") {
                writes += value();
            } else if line.starts_with("sluice_group_commit_batch_size_count{") {
                commits += value();
            }
        }
    }
    println!("chaos group_commit ingresses_running writes={writes} commits={commits}");
    assert!(racing.clean(), "{racing}");
    assert!(slow_ok, "every slow answer must complete after one provider call");
    for r in &rows {
        // A job Sluice itself failed (a state a lagging replica did not
        // have yet, a body it could not read) is a fault of its own.
        assert!(r.failed.iter().all(|(reason, _)| reason != "internal_error"), "{r:?}");
        assert_eq!(r.lost, 0, "{r:?}");
        assert_eq!(r.duplicated, 0, "{r:?}");
        assert_eq!(r.double_terminal, 0, "{r:?}");
        assert_eq!(r.timed_out_unfetched, 0, "{r:?}");
        assert_eq!(r.webhooks_missing, 0, "{r:?}");
        assert!(r.resumed, "requests must be accepted again after the fault: {r:?}");
        if r.scenario != "nats-leader" {
            assert!(r.accepted > r.sent * 9 / 10, "nearly every request must be accepted: {r:?}");
        }
        if r.scenario == "ingress-504" {
            assert!(r.timed_out > 0, "the scenario must produce 504s naming their jobs: {r:?}");
        }
    }
}

/// Prints the audit's table, one line per scenario.
fn print_table(rows: &[Row]) {
    println!(
        "chaos scenario         sent accepted completed failed(reason)       lost duplicated double_terminal webhooks_missing timed_out(unfetched) refused(status)   recovered_ms slowest_after_fault_ms"
    );
    for r in rows {
        let failed: Vec<String> = r.failed.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let refused: Vec<String> = r.refused.iter().map(|(k, n)| format!("{k}x{n}")).collect();
        println!(
            "chaos {:<16} {:>5} {:>8} {:>9} {:<20} {:>4} {:>10} {:>15} {:>16} {:>20} {:<17} {:>12} {:>22}",
            r.scenario,
            r.sent,
            r.accepted,
            r.completed,
            if failed.is_empty() { "0".to_owned() } else { failed.join(",") },
            r.lost,
            r.duplicated,
            r.double_terminal,
            r.webhooks_missing,
            format!("{}({})", r.timed_out, r.timed_out_unfetched),
            if refused.is_empty() { "0".to_owned() } else { refused.join(",") },
            r.recovered_ms,
            r.slowest_ms
        );
    }
}
