//! `stream: true` on chat completions: server-sent events through the queue.

use crate::harness::{MODEL, Stack, job_id_of};

/// The `data:` payloads of an SSE body, in order.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
}

#[tokio::test]
async fn a_streamed_completion_arrives_chunk_by_chunk_in_order_and_ends_with_done() {
    let stack = Stack::start().await;
    let body = serde_json::json!({"model": MODEL, "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "one two three four five"}]});
    let r = stack.chat(&body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let events = events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.len() > 5, "{text}");
    let content: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(content, "mock reply to: one two three four five", "the words arrive in order");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["total_tokens"].as_i64().unwrap() > 0, "{text}");
    // The ledger has the call with its usage.
    let id = job_id_of(&headers, &serde_json::Value::Null);
    let row = stack.ledger_row(id, "completed").await;
    assert_eq!(row.completion_tokens, usage["completion_tokens"].as_i64().map(|t| t as i32));
}

#[tokio::test]
async fn a_stream_that_fails_before_its_first_chunk_gets_an_ordinary_error() {
    let stack = Stack::start_with(|c| c.worker.max_attempts = 1).await;
    stack.mock.faults(serde_json::json!({"fail_next": 1})).await;
    let body = serde_json::json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let r = stack.chat(&body).await;
    assert_eq!(r.status(), 502);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_error");
}

#[tokio::test]
async fn a_job_cannot_ask_to_stream() {
    let stack = Stack::start().await;
    let job = serde_json::json!({"endpoint": "chat.completions",
        "body": {"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "x"}]}});
    let r = stack.submit_job(&stack.key, &job, None).await;
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "stream");
}

#[tokio::test]
async fn a_worker_dying_mid_stream_ends_the_stream_with_an_error_event() {
    let mut stack = Stack::start().await;
    stack.mock.faults(serde_json::json!({"stream_delay_ms": 150})).await;
    let body = serde_json::json!({"model": MODEL, "stream": true,
        "messages": [{"role": "user", "content": "a fairly long answer to stream slowly"}]});
    let mut r = stack.chat(&body).await;
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    while text.matches("data: ").count() < 3 {
        let chunk = r.chunk().await.unwrap().expect("the stream ended early");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    // The worker dies mid-stream; another takes the job once its ack wait
    // runs out, and starts the answer again.
    stack.worker.take().unwrap().kill().await;
    let _replacement = crate::harness::WorkerHandle::start(stack.config.clone()).await;
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events = events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let error: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "stream_interrupted", "{text}");
    assert!(error["error"]["message"].as_str().unwrap().contains("run again"), "{text}");
    // What came before the error is the first attempt's answer, in order.
    let content: String = events[..events.len() - 2]
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert!("mock reply to: a fairly long answer to stream slowly".starts_with(&content), "{content}");
}

#[tokio::test]
async fn a_client_leaving_mid_stream_does_not_stop_the_call_and_the_ledger_records_it() {
    let stack = Stack::start().await;
    stack.mock.faults(serde_json::json!({"stream_delay_ms": 100})).await;
    let body = serde_json::json!({"model": MODEL, "stream": true,
        "messages": [{"role": "user", "content": "the client will not wait for all of this"}]});
    let mut r = stack.chat(&body).await;
    let id = job_id_of(r.headers(), &serde_json::Value::Null);
    r.chunk().await.unwrap().expect("a first chunk");
    drop(r);
    // The call goes on to its end and is recorded once.
    let row = stack.ledger_row(id, "completed").await;
    assert_eq!(row.attempts, 1);
    assert_eq!(stack.mock.requests().await, 1);
}

/// Starts a streaming request on a raw connection whose receive buffer is
/// small, and never reads from it.
async fn stream_never_read(stack: &Stack, model: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr: std::net::SocketAddr = stack.base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    let body = serde_json::json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let body = body.to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        stack.key,
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Reads what the server sent until it closed the connection or ended the
/// chunked response; the bytes, or `None` if neither came by the deadline.
async fn read_until_closed(mut s: tokio::net::TcpStream, within: std::time::Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(all),
            Ok(Ok(n)) => {
                all.extend_from_slice(&buf[..n]);
                if all.ends_with(b"\r\n0\r\n\r\n") {
                    return Some(all);
                }
            }
        }
    }
}

/// Clients that start long streams and never read are cut off: their
/// buffers in the ingress are bounded (`ingress.stream_buffer_chunks`), their
/// connections closed once a write waits `ingress.write_timeout_ms`; other
/// clients are served meanwhile.
#[tokio::test]
async fn streams_whose_clients_never_read_are_closed_and_others_are_served() {
    let stack = Stack::start_with(|c| {
        c.ingress.write_timeout_ms = 1_000;
        c.ingress.stream_buffer_chunks = 32;
        crate::harness::add_profile_pool(c, "long-stream", "mock@tokens=2000,token_bytes=8192,tps=1000");
    })
    .await;
    let mut silent = Vec::new();
    let timeouts = || stack.ingress_metric("sluice_ingress_write_timeouts_total");
    let before = timeouts().await;
    for _ in 0..5 {
        silent.push(stream_never_read(&stack, "long-stream").await);
    }
    // Another client is served while they hang.
    let r = stack.chat(&Stack::chat_body("still here")).await;
    assert_eq!(r.status(), 200);
    // Their writes stall (16 MB each, at 8 MB/s) and time out.
    crate::harness::wait_for("the silent clients' writes to time out", std::time::Duration::from_secs(30), || async {
        (timeouts().await >= before + 5.0).then_some(())
    })
    .await;
    // Each silent client finds its stream cut off: the connection closed,
    // or (had its buffer overflowed before its socket filled) the stream
    // ended with an interruption; never the whole answer.
    for s in silent {
        let got = read_until_closed(s, std::time::Duration::from_secs(60)).await.expect("stream cut off");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..text.len().min(200)]);
        assert!(!text.contains("[DONE]"), "the stream was cut off, not finished");
    }
}

/// A stream holds its place in `ingress.max_in_flight` for as long as it is
/// open, not only until its first chunk.
#[tokio::test]
async fn open_streams_count_against_max_in_flight() {
    let stack = Stack::start_with(|c| {
        c.ingress.max_in_flight = 2;
        crate::harness::add_profile_pool(c, "slow-stream", "mock@tokens=30,tps=10");
    })
    .await;
    let body =
        serde_json::json!({"model": "slow-stream", "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let mut open = Vec::new();
    for _ in 0..2 {
        let r = stack.chat(&body).await;
        assert_eq!(r.status(), 200);
        open.push(r);
    }
    let r = stack.chat(&Stack::chat_body("one more")).await;
    assert_eq!(r.status(), 429, "both places are held by the open streams");
    for r in open {
        assert!(r.text().await.unwrap().contains("[DONE]"));
    }
    assert_eq!(stack.chat(&Stack::chat_body("now")).await.status(), 200);
}

/// During a long pause of the provider the client gets SSE comments every
/// `ingress.stream_keepalive_ms`, and the stream finishes; a pause longer
/// than `ingress.stream_chunk_gap_ms` ends it with `stream_interrupted`.
#[tokio::test]
async fn long_pauses_get_keep_alive_comments_and_a_gap_past_the_limit_ends_the_stream() {
    let stack = Stack::start_with(|c| {
        c.ingress.stream_keepalive_ms = 200;
        c.ingress.stream_chunk_gap_ms = 3_000;
        crate::harness::add_profile_pool(c, "pausing", "mock@tokens=2,pause_ms=1200,pause_every=1");
        crate::harness::add_profile_pool(c, "stalling", "mock@tokens=2,pause_ms=4000,pause_every=1");
    })
    .await;
    let ask = |model: &str| serde_json::json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let text = stack.chat(&ask("pausing")).await.text().await.unwrap();
    assert!(text.matches(": keep-alive").count() >= 3, "{text}");
    assert_eq!(events(&text).last().map(String::as_str), Some("[DONE]"), "{text}");
    let text = stack.chat(&ask("stalling")).await.text().await.unwrap();
    assert!(text.contains("stream_interrupted"), "{text}");
    assert!(text.contains(": keep-alive"), "{text}");
}

/// The stream buffer is bounded in bytes as well as in chunks: a client that
/// stops reading a stream of large events is cut off once
/// `ingress.stream_buffer_bytes` wait for it, long before the chunk bound.
#[tokio::test]
async fn a_stream_past_its_byte_bound_is_cut_off() {
    let stack = Stack::start_with(|c| {
        c.ingress.stream_buffer_chunks = 100_000;
        c.ingress.stream_buffer_bytes = 64 * 1024;
        c.ingress.write_timeout_ms = 60_000;
        crate::harness::add_profile_pool(c, "big-events", "mock@tokens=2000,token_bytes=8192,tps=1000");
    })
    .await;
    let cut = || stack.ingress_metric("sluice_ingress_streams_interrupted_total{reason=\"slow_client\"}");
    let before = cut().await;
    let silent = stream_never_read(&stack, "big-events").await;
    crate::harness::wait_for(
        "the stream to be cut off by its byte bound",
        std::time::Duration::from_secs(30),
        || async { (cut().await > before).then_some(()) },
    )
    .await;
    // The client, reading at last, finds the interruption, not the answer's end.
    let got = read_until_closed(silent, std::time::Duration::from_secs(30)).await.expect("stream ended");
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("read the stream too slowly"), "{}", &text[text.len().saturating_sub(300)..]);
    assert!(!text.contains("\"finish_reason\":\"stop\""), "the whole answer was buffered");
}
