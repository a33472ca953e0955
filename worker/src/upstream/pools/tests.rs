use super::budget::window;
use super::*;
use sluice_core::config::DeploymentConfig;
use sluice_core::wire::subjects::{Rate, Subject};

fn pool(weights: &[u32], failures: u32) -> Pools {
    let mut p = PoolConfig::single("p", "http://127.0.0.1:9/v1");
    p.base_url = None;
    p.deployments = weights
        .iter()
        .enumerate()
        .map(|(i, w)| DeploymentConfig {
            weight: *w,
            ..DeploymentConfig::new(&format!("d{i}"), &format!("http://127.0.0.{}:9/v1", i + 1))
        })
        .collect();
    let settings = UpstreamConfig { breaker_failures: failures, breaker_open_ms: 50, ..Default::default() };
    Pools::configure(&[p], &settings, &|_| None).unwrap().unbudgeted()
}

fn failure() -> CallError {
    CallError::Retryable { reason: "upstream_5xx", status: Some(500), retry_after: None }
}

#[tokio::test]
async fn calls_spread_by_weight() {
    let pools = pool(&[1, 3], 5);
    let p = pools.get("p").unwrap();
    let mut to_second = 0;
    for _ in 0..400 {
        let leases = p.reserve(1, &[], None).await;
        assert_eq!(leases.len(), 1);
        if leases[0].deployment.client.name == "d1" {
            to_second += 1;
        }
    }
    assert!((250..350).contains(&to_second), "d1 got {to_second} of 400 at weight 3:1");
    // A batch is spread too, and nothing is lost.
    assert_eq!(p.reserve(16, &[], None).await.len(), 16);
}

#[tokio::test(start_paused = true)]
async fn breaker_opens_probes_and_closes() {
    let pools = pool(&[1, 1], 2);
    let p = pools.get("p").unwrap();
    let d0 = p.deployments[0].clone();
    let fail = failure();
    d0.record(&Err(&fail), &RateInfo::default(), Duration::ZERO, None);
    assert!(d0.ready_at(Instant::now()).is_none(), "one failure is not enough");
    d0.record(&Err(&fail), &RateInfo::default(), Duration::ZERO, None);
    assert!(d0.ready_at(Instant::now()).is_some(), "two consecutive failures open it");
    for _ in 0..20 {
        let leases = p.reserve(1, &[], None).await;
        assert_eq!(leases[0].deployment.client.name, "d1", "an open deployment takes no calls");
    }
    // Failing over excludes the one tried; with both out, nothing is leased.
    assert!(p.reserve(1, &["d1".into()], None).await.is_empty());
    tokio::time::advance(Duration::from_millis(60)).await;
    let probe = d0.take(5, None).await;
    assert_eq!(probe.len(), 1, "half-open lets one probe through");
    assert!(d0.take(1, None).await.is_empty(), "and only one");
    d0.record(&Err(&fail), &RateInfo::default(), Duration::ZERO, None);
    drop(probe);
    tokio::time::advance(Duration::from_millis(60)).await;
    assert!(d0.ready_at(Instant::now()).is_some(), "a failed probe doubles the cooldown");
    tokio::time::advance(Duration::from_millis(50)).await;
    let probe = d0.take(1, None).await;
    assert_eq!(probe.len(), 1);
    d0.record(&Ok(()), &RateInfo::default(), Duration::ZERO, None);
    assert_eq!(d0.take(3, None).await.len(), 3, "a good probe closes it");
}

#[tokio::test(start_paused = true)]
async fn a_provider_saying_none_left_blocks_until_its_reset() {
    let pools = pool(&[1], 5);
    let p = pools.get("p").unwrap();
    let d = p.deployments[0].clone();
    let rate = RateInfo {
        limit_requests: Some(600),
        remaining_requests: Some(0),
        reset_requests: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    d.record(&Ok(()), &rate, Duration::ZERO, None);
    assert!(p.ready_at().is_some());
    assert!(p.reserve(1, &[], None).await.is_empty());
    assert_eq!(d.rpm(&d.health()), 600, "the provider's limit is learned");
    tokio::time::advance(Duration::from_millis(2_100)).await;
    assert!(p.ready_at().is_none());
    let limited =
        CallError::Retryable { reason: "upstream_429", status: Some(429), retry_after: Some(Duration::from_secs(3)) };
    d.record(&Err(&limited), &RateInfo::default(), Duration::ZERO, None);
    assert!(p.ready_at().is_some_and(|t| t >= Instant::now() + Duration::from_millis(2_900)));
    assert!(matches!(d.health().breaker, Breaker::Closed { failures: 0 }), "a 429 is not a health failure");
}

#[test]
fn the_retry_budget_allows_a_share_of_first_attempts() {
    let pools = pool(&[1], 5);
    let p = pools.get("p").unwrap();
    let allowed = (0..20).filter(|_| p.try_retry()).count();
    assert_eq!(allowed, 10, "the minimum is a burst");
    for _ in 0..50 {
        p.first_attempt();
    }
    let allowed = (0..20).filter(|_| p.try_retry()).count();
    assert_eq!(allowed, 10, "50 first attempts at 0.2 earn 10 retries");
}

#[test]
fn windows_pace_the_minute() {
    // 1200 a minute at 97.5 %: 19.5 a second, alternating 19 and 20.
    let now = window(Rate::Requests, "d", 1170.0, 1_000).limit;
    assert!(now == 19 || now == 20, "{now}");
    let per_window = 1170.0 * 1_000.0 / 60_000.0;
    let minute: f64 = (0..60u64).map(|i| (per_window * (i + 1) as f64).floor() - (per_window * i as f64).floor()).sum();
    assert_eq!(minute, 1170.0);
    let w = window(Rate::Requests, "d", 10.0, 6_000);
    assert_eq!(w.limit, 1);
    assert!(matches!(
        Subject::parse(&w.subject),
        Some(Subject::DeploymentRate { rate: Rate::Requests, deployment: "d", .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_providers_far_retry_after_pauses_a_deployment_for_at_most_max_pause() {
    let pools = pool(&[1], 5);
    let p = pools.get("p").unwrap();
    let d = p.reserve(1, &[], None).await.pop().unwrap().deployment;
    let far = crate::upstream::providers::MAX_TOLD_WAIT;
    let limited = CallError::Retryable { reason: "upstream_429", status: Some(429), retry_after: Some(far) };
    let rate = RateInfo { remaining_tokens: Some(0), reset_tokens: Some(far), ..Default::default() };
    d.record(&Err(&limited), &rate, Duration::ZERO, None);
    let ready = p.ready_at().expect("paused");
    assert!(ready <= Instant::now() + MAX_PAUSE, "paused past MAX_PAUSE");
    tokio::time::advance(MAX_PAUSE + Duration::from_millis(1)).await;
    assert!(p.ready_at().is_none(), "probed again after the pause");
    assert_eq!(p.reserve(1, &[], None).await.len(), 1);
}
