//! `sluice-loadgen ttft`: time to first token of streamed chat completions,
//! straight to the mock provider and through Sluice, one request at a time
//! on one persistent connection each. Prints p50/p99 of both and what
//! Sluice adds.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;

pub struct TtftArgs {
    pub direct: String,
    pub gateway: String,
    pub key: String,
    pub model: String,
    pub requests: usize,
}

/// Microseconds until the first `data:` event of each of `n` streamed answers.
async fn measure(url: &str, key: &str, model: &str, n: usize) -> Result<Vec<u32>, String> {
    let (addr, path) = crate::split_url(url)?;
    let mut sender = crate::open(&addr).await?;
    let body = Bytes::from(format!(
        r#"{{"model":"{model}","stream":true,"messages":[{{"role":"user","content":"time to first token"}}]}}"#
    ));
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let request = crate::post(&addr, &path, key, body.clone())?;
        // The connection must be ready again after the last answer's end.
        sender.ready().await.map_err(|e| format!("{url}: {e}"))?;
        let started = Instant::now();
        let response = sender.send_request(request).await.map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url} answered {}", response.status()));
        }
        let mut body = response.into_body();
        let mut first = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if first.is_none() && frame.data_ref().is_some_and(|d| d.windows(5).any(|w| w == b"data:")) {
                first = Some(started.elapsed().as_micros() as u32);
            }
        }
        out.push(first.ok_or_else(|| format!("{url} sent no event"))?);
    }
    out.sort_unstable();
    Ok(out)
}

pub async fn run(args: TtftArgs) -> Result<(), String> {
    // Warm both paths (connections, consumers) before measuring.
    measure(&args.direct, &args.key, &args.model, 20).await?;
    measure(&args.gateway, &args.key, &args.model, 20).await?;
    let direct = measure(&args.direct, &args.key, &args.model, args.requests).await?;
    let sluice = measure(&args.gateway, &args.key, &args.model, args.requests).await?;
    let ms = |v: &[u32], q: f64| f64::from(crate::percentile(v, q)) / 1000.0;
    println!("ttft direct requests={} p50_ms={:.3} p99_ms={:.3}", direct.len(), ms(&direct, 0.5), ms(&direct, 0.99));
    println!("ttft sluice requests={} p50_ms={:.3} p99_ms={:.3}", sluice.len(), ms(&sluice, 0.5), ms(&sluice, 0.99));
    println!(
        "summary: streaming time to first token added by sluice p50_ms={:.3} p99_ms={:.3}",
        ms(&sluice, 0.5) - ms(&direct, 0.5),
        ms(&sluice, 0.99) - ms(&direct, 0.99)
    );
    Ok(())
}
