//! Closed-loop HTTP load for Sluice's benchmarks.
//!
//! `sluice-loadgen jobs --gateway URL --key KEY --model M [--connections 64] [--seconds 10]`
//! measures asynchronous jobs (see `jobs.rs`); `sluice-loadgen ttft …` the
//! time to first token of streamed answers (`ttft.rs`); `sluice-loadgen
//! submit …` submits one tenant's jobs for the fairness benchmark
//! (`submit.rs`); `sluice-loadgen autoscale …` replays a traffic spike
//! against the scaler and real worker processes (`autoscale.rs`); otherwise:
//!
//! `sluice-loadgen --direct URL --gateway URL --key KEY --model M
//!   [--connections 1,32,128] [--seconds 10] [--warmup 2] [--repeats 3]
//!   [--pid ingress=PID --pid worker=PID]`
//!
//! For every connection count and repeat it drives the direct URL (the mock
//! provider) and then the gateway URL with the same request, each connection
//! a persistent HTTP/1.1 connection sending the next request when the last
//! answer arrived. It prints one line per measurement, the medians over the
//! repeats, and last the headline comparison.
#![allow(
    clippy::disallowed_methods,
    reason = "the load generator's connections and receivers are its own; the ban on bare spawns is for the services"
)]

mod autoscale;
mod jobs;
mod submit;
mod ttft;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

struct Args {
    direct: String,
    gateway: String,
    key: String,
    model: String,
    connections: Vec<usize>,
    seconds: u64,
    warmup: u64,
    repeats: usize,
    pids: Vec<(String, u32)>,
}

#[derive(Clone, Copy, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        direct: String::new(),
        gateway: String::new(),
        key: String::new(),
        model: "bench".into(),
        connections: vec![1, 32, 128],
        seconds: 10,
        warmup: 2,
        repeats: 3,
        pids: Vec::new(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?.clone();
        let num = |v: &str| v.parse::<u64>().map_err(|_| format!("{flag}: `{v}` is not a number"));
        match flag.as_str() {
            "--direct" => a.direct = v,
            "--gateway" => a.gateway = v,
            "--key" => a.key = v,
            "--model" => a.model = v,
            "--seconds" => a.seconds = num(&v)?,
            "--warmup" => a.warmup = num(&v)?,
            "--repeats" => a.repeats = num(&v)? as usize,
            "--connections" => {
                a.connections =
                    v.split(',').map(|c| c.parse().map_err(|_| format!("bad count `{c}`"))).collect::<Result<_, _>>()?
            }
            "--pid" => {
                let (name, pid) = v.split_once('=').ok_or("--pid takes NAME=PID")?;
                a.pids.push((name.to_owned(), pid.parse().map_err(|_| format!("bad pid `{pid}`"))?));
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.direct.is_empty() || a.gateway.is_empty() {
        return Err("--direct and --gateway are required".into());
    }
    Ok(a)
}

/// `host:port` and path of an `http://` URL.
pub(crate) fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("http://").ok_or(format!("only http:// URLs: {url}"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((host.to_owned(), format!("/{path}")))
}

/// A persistent HTTP/1.1 connection to `addr` (`host:port`), Nagle off.
pub(crate) async fn open(addr: &str) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A JSON POST with the API key, for a connection made by [`open`].
pub(crate) fn post(addr: &str, path: &str, key: &str, body: Bytes) -> Result<Request<Full<Bytes>>, String> {
    Request::post(path)
        .header("host", addr)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(body))
        .map_err(|e| e.to_string())
}

/// The value at quantile `q` (0 to 1) of an ascending slice; 0 when empty.
pub(crate) fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    sorted.get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or_default()
}

/// One connection sending requests back to back until `until`; latencies
/// recorded only after `record_from`.
async fn connection(
    addr: String,
    path: String,
    key: String,
    body: Bytes,
    record_from: Instant,
    until: Instant,
) -> Result<(Vec<u32>, u64), String> {
    let mut sender = open(&addr).await?;
    let mut latencies = Vec::with_capacity(100_000);
    let mut errors = 0u64;
    while Instant::now() < until {
        let request = post(&addr, &path, &key, body.clone())?;
        let started = Instant::now();
        let ok = match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                let drained = response.into_body().collect().await.is_ok();
                status.is_success() && drained
            }
            Err(_) => return Ok((latencies, errors + 1)),
        };
        if started >= record_from {
            if ok {
                latencies.push(started.elapsed().as_micros() as u32);
            } else {
                errors += 1;
            }
        }
    }
    Ok((latencies, errors))
}

async fn measure(url: &str, args: &Args, connections: usize) -> Result<Run, String> {
    let (addr, path) = split_url(url)?;
    let body = Bytes::from(format!(
        r#"{{"model":"{}","messages":[{{"role":"user","content":"Say hello to the benchmark."}}],"max_tokens":16}}"#,
        args.model
    ));
    let start = Instant::now();
    let record_from = start + Duration::from_secs(args.warmup);
    let until = record_from + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            tokio::spawn(connection(addr.clone(), path.clone(), args.key.clone(), body.clone(), record_from, until))
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, err) = t.await.map_err(|e| e.to_string())??;
        all.extend(lat);
        errors += err;
    }
    all.sort_unstable();
    Ok(Run {
        rps: all.len() as f64 / args.seconds as f64,
        p50_ms: percentile(&all, 0.50) as f64 / 1000.0,
        p99_ms: percentile(&all, 0.99) as f64 / 1000.0,
        errors,
    })
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn summarize(runs: &[Run]) -> Run {
    Run {
        rps: median(runs.iter().map(|r| r.rps).collect()),
        p50_ms: median(runs.iter().map(|r| r.p50_ms).collect()),
        p99_ms: median(runs.iter().map(|r| r.p99_ms).collect()),
        errors: runs.iter().map(|r| r.errors).sum(),
    }
}

#[tokio::main]
async fn main() {
    let sub = std::env::args().nth(1).unwrap_or_default();
    let rest: Vec<String> = std::env::args().skip(2).collect();
    let get = |flag: &str| rest.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone());
    let text = |flag: &str, default: &str| get(flag).unwrap_or_else(|| default.to_owned());
    let number = |flag: &str, default: usize| get(flag).and_then(|v| v.parse().ok()).unwrap_or(default);
    let outcome = match sub.as_str() {
        "jobs" => Some(
            jobs::run(jobs::JobsArgs {
                gateway: text("--gateway", ""),
                key: text("--key", ""),
                model: text("--model", "bench"),
                connections: number("--connections", 64),
                seconds: number("--seconds", 10) as u64,
                receiver: text("--receiver", "127.0.0.1:0"),
            })
            .await,
        ),
        "ttft" => Some(
            ttft::run(ttft::TtftArgs {
                direct: text("--direct", ""),
                gateway: text("--gateway", ""),
                key: text("--key", ""),
                model: text("--model", "bench"),
                requests: number("--requests", 500),
            })
            .await,
        ),
        "autoscale" => Some(
            autoscale::run(autoscale::AutoscaleArgs {
                gateway: text("--gateway", ""),
                key: text("--key", ""),
                model: text("--model", "bench"),
                scaler: text("--scaler", "127.0.0.1:9095"),
                worker_bin: text("--worker-bin", "sluice-worker"),
                base_rps: get("--base-rps").and_then(|v| v.parse().ok()).unwrap_or(10.0),
                spike_x: get("--spike-x").and_then(|v| v.parse().ok()).unwrap_or(10.0),
                base_s: number("--base-s", 20) as u64,
                spike_s: number("--spike-s", 20) as u64,
                tail_s: number("--tail-s", 60) as u64,
                target: get("--target").and_then(|v| v.parse().ok()).unwrap_or(20.0),
                compress: get("--compress").and_then(|v| v.parse().ok()).unwrap_or(10.0),
                poll_ms: number("--poll-ms", 1000) as u64,
                min: number("--min", 1),
                max: number("--max", 10),
                out: text("--out", "autoscale.csv"),
            })
            .await,
        ),
        "submit" => Some(
            submit::run(submit::SubmitArgs {
                gateway: text("--gateway", ""),
                key: text("--key", ""),
                model: text("--model", "bench"),
                label: text("--label", ""),
                count: number("--count", 100),
                concurrency: number("--concurrency", 32),
                every_ms: get("--every-ms").and_then(|v| v.parse().ok()),
                prompt_chars: number("--prompt-chars", 40),
                max_tokens: number("--max-tokens", 16) as u64,
            })
            .await,
        ),
        _ => None,
    };
    if let Some(outcome) = outcome {
        if let Err(e) = outcome {
            eprintln!("sluice-loadgen {sub}: {e}");
            std::process::exit(1);
        }
        return;
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sluice-loadgen: {e}");
            std::process::exit(64);
        }
    };
    let mut headline = Vec::new();
    for &c in &args.connections {
        let mut direct = Vec::new();
        let mut gateway = Vec::new();
        let mut rss: Vec<Vec<f64>> = vec![Vec::new(); args.pids.len()];
        for repeat in 1..=args.repeats {
            for (label, url, runs) in [("direct", &args.direct, &mut direct), ("sluice", &args.gateway, &mut gateway)] {
                let run = match measure(url, &args, c).await {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("sluice-loadgen: {label} at {c} connections: {e}");
                        std::process::exit(1);
                    }
                };
                println!(
                    "run {label:<6} conns={c:<4} repeat={repeat} req/s={:.0} p50_ms={:.3} p99_ms={:.3} errors={}",
                    run.rps, run.p50_ms, run.p99_ms, run.errors
                );
                runs.push(run);
            }
            for (i, (_, pid)) in args.pids.iter().enumerate() {
                rss[i].push(rss_mb(*pid));
            }
        }
        let d = summarize(&direct);
        let g = summarize(&gateway);
        let rss_text: Vec<String> = args
            .pids
            .iter()
            .zip(&rss)
            .map(|((name, _), v)| format!("rss_{name}_mb={:.1}", median(v.clone())))
            .collect();
        println!(
            "median direct conns={c} req/s={:.0} p50_ms={:.3} p99_ms={:.3} errors={}",
            d.rps, d.p50_ms, d.p99_ms, d.errors
        );
        println!(
            "median sluice conns={c} req/s={:.0} p50_ms={:.3} p99_ms={:.3} errors={} {}",
            g.rps,
            g.p50_ms,
            g.p99_ms,
            g.errors,
            rss_text.join(" ")
        );
        let line = format!(
            "conns={c} added_p50_ms={:.3} added_p99_ms={:.3} throughput_ratio={:.3} sluice_req/s={:.0} {}",
            g.p50_ms - d.p50_ms,
            g.p99_ms - d.p99_ms,
            if d.rps > 0.0 { g.rps / d.rps } else { 0.0 },
            g.rps,
            rss_text.join(" ")
        );
        println!("compare {line}");
        headline.push(line);
    }
    println!("summary: {}", headline.join(" | "));
}
