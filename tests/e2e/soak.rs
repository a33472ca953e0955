//! Soak: Sluice's processes under a steady load for a bounded time
//! (`SLUICE_SOAK_SECS`, 60 s by default in the test command; set it higher
//! for a longer run), with the resident memory of every process printed at
//! the start (after a warm-up) and at the end. Memory must not grow without
//! bound: the end may exceed the start by at most half plus 16 MB.

use std::time::{Duration, Instant};

use crate::harness::MODEL;
use crate::procs::{Cluster, settings};

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn memory_stays_bounded_under_a_steady_load() {
    let secs: u64 = std::env::var("SLUICE_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let mut cluster =
        Cluster::start(sluice_mock_provider::Settings { latency_ms: 20, ..Default::default() }, 32, "").await;
    cluster.start_ingress().await;
    cluster.start_worker().await;
    let (_, key) = cluster.tenant("soak", settings(None, None, None)).await;
    let chat =
        |i: u64| serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": format!("soak {i}")}]});
    let offer = |from: u64, for_secs: u64| {
        let (cluster, key) = (&cluster, key.clone());
        async move {
            // 100 requests a second: synchronous and asynchronous in turn.
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let started = Instant::now();
            let mut i = from;
            let mut pending = Vec::new();
            while started.elapsed() < Duration::from_secs(for_secs) {
                tick.tick().await;
                let body = chat(i);
                let key = key.clone();
                let sync = i.is_multiple_of(2);
                pending.push(async move {
                    if sync {
                        cluster.chat(0, &key, &body).await.status().as_u16()
                    } else {
                        let job = serde_json::json!({"endpoint": "chat.completions", "body": body});
                        cluster.submit(0, &key, &job).await.status().as_u16()
                    }
                });
                i += 1;
                if pending.len() >= 50 {
                    for status in futures::future::join_all(pending.drain(..)).await {
                        assert!(status == 200 || status == 202, "status {status}");
                    }
                }
            }
            for status in futures::future::join_all(pending).await {
                assert!(status == 200 || status == 202, "status {status}");
            }
            i
        }
    };
    // Warm-up: caches, pools and consumers fill; then the baseline.
    let next = offer(0, 5).await;
    let start: Vec<(String, u64)> = cluster.pids().into_iter().map(|(n, p)| (n, rss_kb(p))).collect();
    let sent = offer(next, secs).await - next;
    let end: Vec<(String, u64)> = cluster.pids().into_iter().map(|(n, p)| (n, rss_kb(p))).collect();
    println!("soak seconds={secs} requests={sent}");
    for ((name, a), (_, b)) in start.iter().zip(&end) {
        println!("soak rss {name} start_mb={:.1} end_mb={:.1}", *a as f64 / 1024.0, *b as f64 / 1024.0);
        assert!(*a > 0 && *b > 0, "cannot read {name}'s memory");
        assert!(*b <= a + a / 2 + 16 * 1024, "{name} grew from {a} kB to {b} kB");
    }
}
