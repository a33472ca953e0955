//! The chaos suite's network partition: the JOBS stream's leader cut off
//! from the other two NATS nodes for longer than an election, with an
//! ingress and a worker on each side, then healed, under the suite's load.
//!
//! Each NATS node runs in a network namespace of its own (`ip netns`),
//! joined to the others by a bridge; the test process stays outside, on the
//! bridge's own address, with the mock provider and the webhook receiver
//! (both sides reach them, as both zones of a deployment reach a provider).
//! Postgres is reached over its Unix socket, from both sides. The cut is a
//! pair of blackhole routes per node pair: inside the cut-off namespace to
//! the other two nodes, and inside theirs to it. Every address is this
//! machine's own (10.2xx.y.0/24 on a bridge this test creates and deletes).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::cluster::{NatsCluster, Postgres};
use super::sluice::{Place, Sluice, hook_receiver};
use super::{accepted, audit, load, print_table};
use crate::harness::{Mock, wait_for};

/// A bridge and one network namespace per node, removed on drop.
struct Network {
    bridge: String,
    spaces: Vec<String>,
    /// The first three octets of the bridge's /24.
    prefix: String,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("iproute2's `ip` runs");
    assert!(
        out.status.success(),
        "ip {}: {} (this test builds network namespaces: it must run as root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Network {
    fn create(nodes: usize) -> Self {
        // Names and subnet from the pid: two test runs on one machine do not meet.
        let id = std::process::id() % 12_800;
        let tag = format!("sl{id}");
        let prefix = format!("10.{}.{}", 200 + id / 256, id % 256);
        let net =
            Self { bridge: format!("{tag}br"), spaces: (0..nodes).map(|i| format!("{tag}n{i}")).collect(), prefix };
        ip(&["link", "add", &net.bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}/24", net.gateway()), "dev", &net.bridge]);
        ip(&["link", "set", &net.bridge, "up"]);
        for (i, ns) in net.spaces.iter().enumerate() {
            let (outside, inside) = (format!("{tag}v{i}"), format!("{tag}p{i}"));
            ip(&["netns", "add", ns]);
            ip(&["link", "add", &outside, "type", "veth", "peer", "name", &inside]);
            ip(&["link", "set", &inside, "netns", ns]);
            ip(&["link", "set", &outside, "master", &net.bridge, "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{}/24", net.host(i)), "dev", &inside]);
            ip(&["-n", ns, "link", "set", &inside, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn host(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, i + 1)
    }

    /// The bridge's own address: the test process, the mock, the receiver.
    fn gateway(&self) -> String {
        format!("{}.254", self.prefix)
    }

    fn place(&self, i: usize) -> Place {
        Place { host: self.host(i), netns: Some(self.spaces[i].clone()), nats: None }
    }

    /// Cuts namespace `alone` off from every other one (`add`), or heals
    /// the cut (`del`); each keeps its way to the bridge's address.
    fn route(&self, action: &str, alone: usize) {
        for other in (0..self.spaces.len()).filter(|o| *o != alone) {
            for (from, to) in [(alone, other), (other, alone)] {
                let dest = format!("{}/32", self.host(to));
                ip(&["-n", &self.spaces[from], "route", action, "blackhole", &dest]);
            }
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth, and so the pair.
        for ns in &self.spaces {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::process::Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

#[tokio::test]
async fn chaos_a_partition_that_cuts_the_stream_leader_off_loses_and_duplicates_nothing() {
    let net = Network::create(3);
    let places: Vec<Place> = (0..3).map(|i| net.place(i)).collect();
    let nats = NatsCluster::start_at(&places).await;
    let (_pg, db, _, db_socket) = Postgres::start().await;
    let mock =
        Mock::start_at(&net.gateway(), sluice_mock_provider::Settings { latency_ms: 150, ..Default::default() }).await;
    let (receiver, hooks) = hook_receiver(&net.gateway()).await;
    let mut sluice = Sluice::configure(&nats.url(), &db_socket, &mock.base, "");
    let tenant = sluice_core::db::ensure_tenant(&db, "partition").await.unwrap();
    let key = sluice_core::db::create_key(&db, tenant).await.unwrap().key.expose().to_owned();
    // Side A (n0, the leaders-to-be, alone) and side B (n1, with n2): each
    // side's processes connect to their own node first.
    for (i, place) in places[..2].iter().enumerate() {
        let place = Place { nats: Some(nats.node_url(&format!("n{i}"))), ..place.clone() };
        sluice.add_ingress_at(&place).await;
        sluice.add_worker_at(&place).await;
    }
    sluice.key_everywhere(&key).await;
    let (side_a, side_b) = (sluice.bases()[0].clone(), sluice.bases()[1].clone());
    // The jobs and their states both led from the side that will be cut off.
    for stream in ["JOBS", "KV_JOB_STATE"] {
        nats.caught_up(stream).await;
        nats.make_leader(stream, "n0").await;
    }

    let sent = Arc::new(AtomicUsize::new(0));
    let bases = Arc::new(std::sync::Mutex::new(sluice.bases()));
    let running = tokio::spawn(load(sent.clone(), bases, key.clone(), receiver, "partition", Duration::from_secs(24)));
    wait_for("the load to be under way", Duration::from_secs(10), || async {
        (sent.load(Ordering::Relaxed) >= 130).then_some(())
    })
    .await;
    // Every stream n0 leads when the cut comes (the jobs and their states,
    // and whichever of the others the cluster placed there): the majority
    // side serves once it has elected a leader of its own for each.
    let led_by_n0 = nats.streams_led_by("n0").await;
    let fault_at = Instant::now();
    net.route("add", 0);
    // The majority elects leaders of its own (an election takes seconds);
    // the cut holds while 200 more requests are sent (about 3 s) on both
    // sides, then heals.
    let elected = wait_for("n1 and n2 to elect a JOBS leader of their own", Duration::from_secs(30), || async {
        nats.leader_seen_by("n1", "JOBS").await.filter(|l| l != "n0")
    })
    .await;
    let mut elections = Vec::new();
    for stream in &led_by_n0 {
        wait_for(&format!("n1 and n2 to elect a {stream} leader"), Duration::from_secs(30), || async {
            nats.leader_seen_by("n1", stream).await.filter(|l| l != "n0").map(|_| ())
        })
        .await;
        elections.push(format!("{stream}={}", fault_at.elapsed().as_millis()));
    }
    let elected_after = fault_at.elapsed();
    let at_election = sent.load(Ordering::Relaxed);
    wait_for("the load to go on while the cut holds", Duration::from_secs(20), || async {
        (sent.load(Ordering::Relaxed) >= at_election + 200).then_some(())
    })
    .await;
    net.route("del", 0);
    let healed_at = Instant::now();
    let outcomes = running.await.unwrap();
    let row = audit(&db, "partition", &outcomes, &hooks, fault_at, &side_b, &key).await;
    print_table(std::slice::from_ref(&row));
    // The cut-off node rejoins: every replica current again (so that a job
    // missing from one is lost, not lagging). In one run inside the full
    // suite this took more than 60 s (cause not known); the time is printed.
    for stream in ["JOBS", "KV_JOB_STATE"] {
        nats.caught_up_within(stream, Duration::from_secs(180)).await;
    }
    let rejoined = healed_at.elapsed();
    // Jobs the audit counted lost that reached the ledger by the time every
    // replica was current: late, not gone (printed, still a failure).
    let accepted_ids: Vec<uuid::Uuid> = outcomes.iter().filter(|o| accepted(o)).filter_map(|o| o.job).collect();
    if row.lost > 0 {
        let still: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status IN ('completed', 'failed', 'expired', 'cancelled')",
        )
        .bind(&accepted_ids)
        .fetch_one(&db)
        .await
        .unwrap();
        println!(
            "chaos partition: {} of the {} lost were terminal in the ledger {} ms after the heal",
            row.lost as i64 - (accepted_ids.len() as i64 - still),
            row.lost,
            healed_at.elapsed().as_millis()
        );
        for stream in ["JOBS", "EVENTS", "KV_JOB_STATE"] {
            for line in nats.consumers_report(stream).await {
                println!("chaos partition: {line}");
            }
        }
    }
    // Accepted jobs a worker found without a state (failed, internal_error):
    // what the bucket holds of them now, for a few.
    if row.failed.iter().any(|(reason, _)| reason == "internal_error") {
        let missing: Vec<(uuid::Uuid, uuid::Uuid, Option<String>)> = sqlx::query_as(
            "SELECT id, tenant_id, error_message FROM jobs WHERE id = ANY($1) AND error_code = 'internal_error' LIMIT 5",
        )
        .bind(&accepted_ids)
        .fetch_all(&db)
        .await
        .unwrap();
        for (id, tenant, message) in missing {
            let sync = outcomes.iter().any(|o| o.job == Some(id) && o.sync);
            let side = outcomes.iter().find(|o| o.job == Some(id)).map(|o| if o.base == side_a { "A" } else { "B" });
            let sent = outcomes.iter().find(|o| o.job == Some(id)).map(|o| o.sent.saturating_duration_since(fault_at));
            println!(
                "chaos partition: job {id} sync={sync} side={side:?} sent_after_fault={sent:?} failed: {message:?}"
            );
            for line in nats.key_history("JOB_STATE", &sluice_core::jobstate::key(tenant, id)).await {
                println!("chaos partition:   {line}");
            }
        }
    }
    // Requests sent while the cut held, once the majority had its leader:
    // accepted, sent, and the longest wait, per side.
    let during = |base: &str| {
        let cut = outcomes.iter().filter(|o| o.base == base && o.sent > fault_at + elected_after && o.sent < healed_at);
        let all: Vec<_> = cut.collect();
        let slowest = all.iter().map(|o| o.done - o.sent).max().unwrap_or_default().as_millis();
        (all.iter().filter(|o| accepted(o)).count(), all.len(), slowest)
    };
    let (a_ok, a_all, a_slowest) = during(&side_a);
    let (b_ok, b_all, b_slowest) = during(&side_b);
    // The majority side's refusals while cut, each as (sync, status, sent
    // after the fault in ms, waited ms): what to read when it refused.
    let b_refused: Vec<_> = outcomes
        .iter()
        .filter(|o| o.base == side_b && o.sent > fault_at + elected_after && o.sent < healed_at && !accepted(o))
        .map(|o| (o.sync, o.status, (o.sent - fault_at).as_millis(), (o.done - o.sent).as_millis()))
        .collect();
    // The same by kind, for the figures line: (sync, status) → count.
    let mut b_refusals = std::collections::BTreeMap::new();
    for (sync, status, _, _) in &b_refused {
        *b_refusals.entry((*sync, *status)).or_insert(0usize) += 1;
    }
    let run_again: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = ANY($1) AND attempts > 1")
        .bind(&accepted_ids)
        .fetch_one(&db)
        .await
        .unwrap();
    println!(
        "chaos partition new_leader={elected} led_by_n0_elected_ms=[{}] elected_after_ms={} cut_ms={} rejoined_after_heal_ms={} while_cut(accepted/sent, slowest_ms) side_a(n0 alone)={a_ok}/{a_all},{a_slowest} side_b(n1+n2)={b_ok}/{b_all},{b_slowest} side_b_refused(sync,status)={b_refusals:?} jobs_delivered_again={run_again} upstream_calls={}",
        elections.join(" "),
        elected_after.as_millis(),
        (healed_at - fault_at).as_millis(),
        rejoined.as_millis(),
        mock.requests().await
    );
    assert_eq!(row.lost, 0, "{row:?}");
    assert_eq!(row.duplicated, 0, "{row:?}");
    assert_eq!(row.double_terminal, 0, "{row:?}");
    assert_eq!(row.timed_out_unfetched, 0, "{row:?}");
    assert_eq!(row.webhooks_missing, 0, "{row:?}");
    assert!(row.failed.iter().all(|(reason, _)| reason != "internal_error"), "{row:?}");
    assert!(row.resumed, "requests must be accepted again after the heal: {row:?}");
    // The majority's side served while the cut held, once it had its leader.
    assert!(b_all > 0 && b_ok * 10 >= b_all * 9, "side B accepted {b_ok} of {b_all} while cut; refused: {b_refused:?}");
}
