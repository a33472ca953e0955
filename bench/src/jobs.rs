//! The asynchronous-jobs benchmark: closed-loop `POST /v1/jobs` at N
//! connections, each job carrying a webhook back to a receiver in this
//! process and its submit time in `metadata.t`. Prints jobs accepted per
//! second (each acknowledged durably by JetStream before its 202) and the
//! time from submit to webhook received.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub struct JobsArgs {
    pub gateway: String,
    pub key: String,
    pub model: String,
    pub connections: usize,
    pub seconds: u64,
    pub receiver: String,
}

/// Latencies (ms) of received webhooks.
type Arrivals = Arc<Mutex<Vec<u64>>>;

async fn receiver(listener: TcpListener, arrivals: Arrivals) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let arrivals = arrivals.clone();
                async move {
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let t = serde_t(&body);
                    if let Some(t) = t
                        && let Ok(mut a) = arrivals.lock()
                    {
                        a.push(now_ms().saturating_sub(t));
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// `data.metadata.t` of a webhook body, without a JSON library.
fn serde_t(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("\"t\":\"")? + 5;
    let end = text[start..].find('"')? + start;
    text[start..end].parse().ok()
}

async fn submitter(
    addr: String,
    key: String,
    model: String,
    hook: String,
    until: Instant,
) -> Result<(Vec<u32>, u64), String> {
    let mut sender = crate::open(&addr).await?;
    let mut latencies = Vec::new();
    let mut errors = 0;
    while Instant::now() < until {
        let body = format!(
            r#"{{"endpoint":"chat.completions","body":{{"model":"{model}","messages":[{{"role":"user","content":"bench"}}]}},"metadata":{{"t":"{}"}},"webhook":{{"url":"{hook}"}}}}"#,
            now_ms()
        );
        let request = crate::post(&addr, "/v1/jobs", &key, Bytes::from(body))?;
        let started = Instant::now();
        match sender.send_request(request).await {
            Ok(r) => {
                let accepted = r.status().as_u16() == 202;
                let _ = r.into_body().collect().await;
                if accepted {
                    latencies.push(started.elapsed().as_micros() as u32);
                } else {
                    errors += 1;
                }
            }
            Err(_) => return Ok((latencies, errors + 1)),
        }
    }
    Ok((latencies, errors))
}

pub async fn run(args: JobsArgs) -> Result<(), String> {
    let arrivals: Arrivals = Arc::default();
    let listener = TcpListener::bind(&args.receiver).await.map_err(|e| format!("receiver: {e}"))?;
    let hook = format!("http://{}/hook", listener.local_addr().map_err(|e| e.to_string())?);
    tokio::spawn(receiver(listener, arrivals.clone()));
    let addr = args.gateway.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| tokio::spawn(submitter(addr.clone(), args.key.clone(), args.model.clone(), hook.clone(), until)))
        .collect();
    let mut submits = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, err) = t.await.map_err(|e| e.to_string())??;
        submits.extend(lat);
        errors += err;
    }
    submits.sort_unstable();
    let accepted = submits.len();
    println!(
        "jobs conns={} accepted={} accepted/s={:.0} submit_p50_ms={:.3} submit_p99_ms={:.3} errors={}",
        args.connections,
        accepted,
        accepted as f64 / args.seconds as f64,
        crate::percentile(&submits, 0.5) as f64 / 1000.0,
        crate::percentile(&submits, 0.99) as f64 / 1000.0,
        errors
    );
    // Wait for the webhooks of every accepted job, for at most two minutes.
    let drain_started = Instant::now();
    while drain_started.elapsed() < Duration::from_secs(120) {
        let got = arrivals.lock().map(|a| a.len()).unwrap_or(0);
        if got >= accepted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut lat: Vec<u64> = arrivals.lock().map(|a| a.clone()).unwrap_or_default();
    lat.sort_unstable();
    let p = |q: f64| crate::percentile(&lat, q);
    println!(
        "webhooks received={} of {} drained_in_s={:.1} submit_to_webhook_p50_ms={} submit_to_webhook_p99_ms={}",
        lat.len(),
        accepted,
        drain_started.elapsed().as_secs_f64(),
        p(0.5),
        p(0.99)
    );
    println!(
        "summary: jobs accepted/s={:.0} at {} connections, submit_to_webhook p50_ms={} p99_ms={} ({} of {} webhooks)",
        accepted as f64 / args.seconds as f64,
        args.connections,
        p(0.5),
        p(0.99),
        lat.len(),
        accepted
    );
    Ok(())
}
