//! `sluice-loadgen submit`: submits asynchronous jobs for one tenant, either
//! all at once (`--concurrency` connections, back to back) or one every
//! `--every-ms` milliseconds, and prints how many were accepted. The
//! fairness benchmark runs several at a time, one per tenant, and reads the
//! queue waits from the ledger afterwards.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

pub struct SubmitArgs {
    pub gateway: String,
    pub key: String,
    pub model: String,
    pub label: String,
    pub count: usize,
    pub concurrency: usize,
    /// One job every this many ms instead of back to back.
    pub every_ms: Option<u64>,
    pub prompt_chars: usize,
    pub max_tokens: u64,
}

fn body(model: &str, prompt: &str, max_tokens: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"endpoint":"chat.completions","body":{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{prompt}"}}]}}}}"#
    ))
}

async fn submit_one(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: &str,
    key: &str,
    body: Bytes,
) -> Result<bool, String> {
    let request = crate::post(addr, "/v1/jobs", key, body)?;
    let r = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    if status != 202 {
        eprintln!("submit refused: {status} {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
    }
    Ok(status == 202)
}

pub async fn run(args: SubmitArgs) -> Result<(), String> {
    let addr = args.gateway.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let prompt = "x".repeat(args.prompt_chars);
    let payload = body(&args.model, &prompt, args.max_tokens);
    let started = Instant::now();
    let (accepted, errors) = match args.every_ms {
        Some(every) => {
            let mut sender = crate::open(&addr).await?;
            let mut tick = tokio::time::interval(Duration::from_millis(every));
            let (mut ok, mut bad) = (0usize, 0usize);
            for _ in 0..args.count {
                tick.tick().await;
                match submit_one(&mut sender, &addr, &args.key, payload.clone()).await? {
                    true => ok += 1,
                    false => bad += 1,
                }
            }
            (ok, bad)
        }
        None => {
            let per = args.count.div_ceil(args.concurrency.max(1));
            let tasks: Vec<_> = (0..args.concurrency.max(1))
                .map(|i| {
                    let n = per.min(args.count.saturating_sub(i * per));
                    let (addr, key, payload) = (addr.clone(), args.key.clone(), payload.clone());
                    tokio::spawn(async move {
                        let mut sender = crate::open(&addr).await?;
                        let (mut ok, mut bad) = (0usize, 0usize);
                        for _ in 0..n {
                            match submit_one(&mut sender, &addr, &key, payload.clone()).await? {
                                true => ok += 1,
                                false => bad += 1,
                            }
                        }
                        Ok::<_, String>((ok, bad))
                    })
                })
                .collect();
            let (mut ok, mut bad) = (0, 0);
            for t in tasks {
                let (o, b) = t.await.map_err(|e| e.to_string())??;
                ok += o;
                bad += b;
            }
            (ok, bad)
        }
    };
    println!(
        "submitted tenant={} accepted={accepted} refused={errors} seconds={:.1}",
        args.label,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
