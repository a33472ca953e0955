//! Hostile clients: bodies that are malformed in every way, slow senders,
//! and more connections than allowed. Each gets a clear 4xx or a closed
//! connection; none reaches the provider, and the ingress keeps serving.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{MODEL, Stack};

/// Sends raw bytes on a new connection and returns the status line's code,
/// or `None` if the server closed the connection without an answer.
async fn raw(addr: &str, request: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.ok()?.ok()?;
    let head = String::from_utf8_lossy(&buf[..n]);
    head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn post(key: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[tokio::test]
async fn malformed_bodies_get_a_4xx_and_never_reach_the_provider() {
    // A limit the raw client's 2 MiB write gets past before the 413.
    let stack = Stack::start_with(|c| c.ingress.max_body_bytes = 1024 * 1024).await;
    let addr = stack.base.trim_start_matches("http://").to_owned();
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let valid = serde_json::to_vec(&Stack::chat_body("x")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str, u16)> = vec![
        ("empty", b"".to_vec(), "application/json", 400),
        ("truncated", valid[..valid.len() / 2].to_vec(), "application/json", 400),
        ("invalid UTF-8", b"{\"model\":\"\xff\xfe\",\"messages\":[]}".to_vec(), "application/json", 400),
        ("deeply nested", nested.into_bytes(), "application/json", 400),
        ("not an object", b"[1,2,3]".to_vec(), "application/json", 400),
        (
            "messages not a list",
            format!("{{\"model\":\"{MODEL}\",\"messages\":7}}").into_bytes(),
            "application/json",
            400,
        ),
        ("null bytes", b"\0\0\0\0".to_vec(), "application/json", 400),
        ("form body", b"model=x".to_vec(), "application/x-www-form-urlencoded", 415),
        ("no content type", valid.clone(), "", 415),
        ("huge", vec![b' '; 2 * 1024 * 1024], "application/json", 413),
    ];
    for (what, body, content_type, want) in cases {
        let request = if content_type.is_empty() {
            String::from_utf8_lossy(&post(&stack.key, "x", &body)).replace("content-type: x\r\n", "").into_bytes()
        } else {
            post(&stack.key, content_type, &body)
        };
        assert_eq!(raw(&addr, &request).await, Some(want), "{what}");
    }
    // A declared length far beyond the limit is refused before any body is read.
    let lying = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 99999999999\r\n\r\n",
        stack.key
    );
    assert_eq!(raw(&addr, lying.as_bytes()).await, Some(413));
    // Garbage instead of HTTP: a 400 from the HTTP layer, or a closed connection.
    let garbage = raw(&addr, b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n").await;
    assert!(garbage.is_none() || garbage == Some(400), "{garbage:?}");
    assert_eq!(stack.mock.requests().await, 0, "nothing reached the provider");
    // And the ingress still serves.
    assert_eq!(stack.chat(&Stack::chat_body("still here")).await.status(), 200);
}

#[tokio::test]
async fn slow_clients_are_cut_off_by_the_header_and_body_deadlines() {
    let stack = Stack::start_with(|c| {
        c.ingress.header_timeout_ms = 500;
        c.ingress.body_timeout_ms = 500;
    })
    .await;
    let addr = stack.base.trim_start_matches("http://").to_owned();
    // Headers that never end: the connection is closed after the deadline.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("not cut off").unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(400), "cut off before the deadline");

    // A body that stops halfway: 408 with OpenAI's envelope.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\":",
        stack.key
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("no answer").unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert_eq!(stack.chat(&Stack::chat_body("still here")).await.status(), 200);
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_and_service_resumes() {
    let stack = Stack::start_with(|c| c.ingress.max_connections = 8).await;
    let addr = stack.base.trim_start_matches("http://").to_owned();
    // Eight idle connections hold every slot.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    // Give the server the time to accept them (it accepts in order).
    let probe = crate::harness::wait_for("the ninth connection to be refused", Duration::from_secs(5), || async {
        let mut s = TcpStream::connect(&addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.ok()?.unwrap_or(0);
        (n == 0).then_some(())
    })
    .await;
    let () = probe;
    // Released slots serve again.
    drop(held);
    crate::harness::wait_for("a connection to be served again", Duration::from_secs(5), || async {
        let r = stack.http.get(format!("{}/healthz", stack.base)).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let metrics = stack.http.get(format!("{}/metrics", stack.ops)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("sluice_ingress_connections_refused_total{reason=\"max_connections\"}")),
        "{metrics}"
    );
}
