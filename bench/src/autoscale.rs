//! `sluice-loadgen autoscale`: a time-compressed replay of autoscaling on
//! one machine. It offers a traffic profile to the real ingress (a base
//! rate, a spike of `--spike-x` times it, the base again) and plays KEDA
//! and the HPA: every `--poll-ms` it asks the real scaler for the pool's
//! metric (`GetMetrics`, as KEDA does), computes replicas = ceil(metric /
//! target), applies the HPA behaviour with its periods divided by
//! `--compress` (scale-up: +100 % or +4 pods per 15 s, whichever is more;
//! scale-down: −10 % per 60 s after a 300 s stabilization window), and
//! starts and stops real `sluice-worker` processes (SIGTERM: running jobs
//! finish, the rest go back to the queue). One CSV row per poll:
//! `t_s,t_unix_ms,offered_per_s,backlog,desired,replicas`.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_scaler::proto::external_scaler_client::ExternalScalerClient;
use sluice_scaler::proto::{GetMetricsRequest, ScaledObjectRef};

pub struct AutoscaleArgs {
    pub gateway: String,
    pub key: String,
    pub model: String,
    pub scaler: String,
    pub worker_bin: String,
    pub base_rps: f64,
    pub spike_x: f64,
    pub base_s: u64,
    pub spike_s: u64,
    pub tail_s: u64,
    pub target: f64,
    pub compress: f64,
    pub poll_ms: u64,
    pub min: usize,
    pub max: usize,
    pub out: String,
}

/// The offered rate at `t` seconds into the run.
fn rate_at(a: &AutoscaleArgs, t: f64) -> f64 {
    let spike = (a.base_s as f64)..((a.base_s + a.spike_s) as f64);
    if spike.contains(&t) { a.base_rps * a.spike_x } else { a.base_rps }
}

/// Submits jobs at the profile's rate until it ends; counts them.
async fn offer(a: Arc<AutoscaleArgs>, submitted: Arc<AtomicU64>, started: Instant) -> Result<(), String> {
    let addr = a.gateway.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let body = Bytes::from(format!(
        r#"{{"endpoint":"chat.completions","body":{{"model":"{}","max_tokens":16,"messages":[{{"role":"user","content":"autoscale"}}]}}}}"#,
        a.model
    ));
    let total = (a.base_s + a.spike_s + a.tail_s) as f64;
    // Several connections, so the spike's rate does not depend on one
    // connection's round trip.
    let tasks: Vec<_> = (0..8)
        .map(|lane| {
            let (a, addr, body, submitted) = (a.clone(), addr.clone(), body.clone(), submitted.clone());
            tokio::spawn(async move {
                let mut sender = crate::open(&addr).await?;
                // The lanes take turns: lane i starts i intervals in.
                let mut next = lane as f64 / a.base_rps;
                loop {
                    let t = started.elapsed().as_secs_f64();
                    if t >= total {
                        return Ok::<_, String>(());
                    }
                    if next > t {
                        tokio::time::sleep(Duration::from_secs_f64(next - t)).await;
                    }
                    let request = crate::post(&addr, "/v1/jobs", &a.key, body.clone())?;
                    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
                    if response.status().as_u16() == 202 {
                        submitted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        eprintln!("submit refused: {}", response.status());
                    }
                    use http_body_util::BodyExt;
                    let _ = response.into_body().collect().await;
                    // Each of the 8 lanes offers an eighth of the rate (open
                    // loop: a late submit does not delay the schedule).
                    next += 8.0 / rate_at(&a, next);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

struct Workers {
    bin: String,
    running: Vec<tokio::process::Child>,
}

impl Workers {
    fn scale_to(&mut self, n: usize) -> Result<(), String> {
        while self.running.len() < n {
            let child = tokio::process::Command::new(&self.bin)
                .env("SLUICE__WORKER__OPS_LISTEN", "127.0.0.1:0")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", self.bin))?;
            self.running.push(child);
        }
        while self.running.len() > n {
            let Some(mut child) = self.running.pop() else { break };
            // SIGTERM: the worker finishes its running jobs and hands back the rest.
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            }
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
        }
        Ok(())
    }
}

/// The HPA's decision, its periods compressed: `history` holds
/// `(time, replicas)` after each decision and `desired` the raw desires.
struct Hpa {
    /// Replicas before the first decision.
    initial: usize,
    compress: f64,
    min: usize,
    max: usize,
    history: VecDeque<(f64, usize)>,
    desires: VecDeque<(f64, usize)>,
}

impl Hpa {
    /// The replicas decided last at or before `t`.
    fn replicas_at(&self, t: f64) -> usize {
        self.history.iter().rev().find(|(at, _)| *at <= t).map_or(self.initial, |(_, r)| *r)
    }

    fn decide(&mut self, t: f64, current: usize, desired: usize) -> usize {
        let desired = desired.clamp(self.min, self.max);
        self.desires.push_back((t, desired));
        let window = 300.0 / self.compress;
        while self.desires.front().is_some_and(|(at, _)| *at < t - window) {
            self.desires.pop_front();
        }
        let next = if desired > current {
            // Up: from the replicas one period ago, at most +100 % or +4.
            let base = self.replicas_at(t - 15.0 / self.compress);
            desired.min((base * 2).max(base + 4))
        } else {
            // Down: the highest desire of the stabilization window, at most
            // −10 % (rounded up, at least one pod) of the replicas a period ago.
            let stable = self.desires.iter().map(|(_, d)| *d).max().unwrap_or(desired).min(current);
            let base = self.replicas_at(t - 60.0 / self.compress);
            let step = (base as f64 * 0.10).ceil() as usize;
            stable.max(base.saturating_sub(step.max(1))).min(current)
        };
        let next = next.clamp(self.min, self.max);
        self.history.push_back((t, next));
        next
    }
}

pub async fn run(a: AutoscaleArgs) -> Result<(), String> {
    let a = Arc::new(a);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", a.scaler))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("scaler {}: {e}", a.scaler))?;
    let mut scaler = ExternalScalerClient::new(channel);
    let object = ScaledObjectRef {
        name: "sluice-worker".into(),
        namespace: "bench".into(),
        scaler_metadata: [
            ("pool".to_owned(), a.model.clone()),
            ("targetBacklogPerReplica".to_owned(), a.target.to_string()),
        ]
        .into_iter()
        .collect(),
    };
    let mut out = std::fs::File::create(&a.out).map_err(|e| format!("{}: {e}", a.out))?;
    writeln!(out, "t_s,t_unix_ms,offered_per_s,backlog,desired,replicas").map_err(|e| e.to_string())?;

    let mut workers = Workers { bin: a.worker_bin.clone(), running: Vec::new() };
    workers.scale_to(a.min)?;
    let mut hpa = Hpa {
        initial: a.min,
        compress: a.compress,
        min: a.min,
        max: a.max,
        history: VecDeque::new(),
        desires: VecDeque::new(),
    };
    let submitted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let load = tokio::spawn(offer(a.clone(), submitted.clone(), started));
    let profile_end = (a.base_s + a.spike_s + a.tail_s) as f64;
    let spike_end = (a.base_s + a.spike_s) as f64;
    let (mut peak, mut peak_at, mut drained_at, mut events) = (0.0f64, 0.0f64, None::<f64>, 0usize);
    let mut last_count = 0u64;
    let mut last_t = 0.0f64;
    let mut tick = tokio::time::interval(Duration::from_millis(a.poll_ms));
    loop {
        tick.tick().await;
        let t = started.elapsed().as_secs_f64();
        let count = submitted.load(Ordering::Relaxed);
        let offered = (count - last_count) as f64 / (t - last_t).max(1e-3);
        (last_count, last_t) = (count, t);
        let request = GetMetricsRequest { scaled_object_ref: Some(object.clone()), metric_name: String::new() };
        let backlog = match scaler.get_metrics(request).await {
            Ok(r) => r.into_inner().metric_values.first().map_or(0.0, |v| v.metric_value_float),
            Err(status) => {
                eprintln!("GetMetrics failed: {status}; keeping {} replicas", workers.running.len());
                continue;
            }
        };
        let desired = (backlog / a.target).ceil() as usize;
        let current = workers.running.len();
        let next = hpa.decide(t, current, desired);
        if next != current {
            events += 1;
            workers.scale_to(next)?;
        }
        if backlog > peak {
            (peak, peak_at) = (backlog, t);
        }
        if t >= spike_end && drained_at.is_none() && backlog <= a.target {
            drained_at = Some(t);
        }
        let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        writeln!(out, "{t:.2},{unix_ms},{offered:.1},{backlog},{desired},{next}").map_err(|e| e.to_string())?;
        if t >= profile_end && backlog == 0.0 {
            break;
        }
        if t >= profile_end + 120.0 {
            eprintln!("the backlog did not drain within 120 s of the profile's end");
            break;
        }
    }
    load.await.map_err(|e| e.to_string())??;
    workers.scale_to(0)?;
    // Let the stopped workers exit before the caller tears the stack down.
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "offered jobs={} base_rps={} spike_rps={}",
        submitted.load(Ordering::Relaxed),
        a.base_rps,
        a.base_rps * a.spike_x
    );
    println!("peak backlog={peak:.0} at t={peak_at:.1}s");
    match drained_at {
        Some(d) => println!("drained to ≤ one replica's target {:.1} s after the spike ended", d - spike_end),
        None => println!("not drained to ≤ one replica's target"),
    }
    println!("scale events={events} max_replicas={}", hpa.history.iter().map(|(_, r)| *r).max().unwrap_or(0));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Hpa;

    fn hpa(initial: usize) -> Hpa {
        Hpa { initial, compress: 1.0, min: 1, max: 50, history: Default::default(), desires: Default::default() }
    }

    #[test]
    fn scale_up_is_limited_per_period() {
        let mut h = hpa(1);
        // From 1: at most max(2 × 1, 1 + 4) = 5 in one period.
        assert_eq!(h.decide(0.0, 1, 30), 5);
        // Within the same 15 s period the base is still 1.
        assert_eq!(h.decide(5.0, 5, 30), 5);
        // A period later, from 5: max(10, 9) = 10.
        assert_eq!(h.decide(20.0, 5, 30), 10);
    }

    #[test]
    fn scale_down_waits_for_the_stabilization_window_then_goes_ten_percent_a_minute() {
        let mut h = hpa(20);
        assert_eq!(h.decide(0.0, 20, 20), 20);
        // The desire drops, but the last 300 s held a desire of 20.
        assert_eq!(h.decide(10.0, 20, 2), 20);
        assert_eq!(h.decide(299.0, 20, 2), 20);
        // Past the window: at most 10 % (2 pods) of the replicas a minute ago.
        assert_eq!(h.decide(311.0, 20, 2), 18);
        assert_eq!(h.decide(320.0, 18, 2), 18, "the same minute's base was 20 → floor 18");
        assert_eq!(h.decide(372.0, 18, 2), 16);
    }
}
