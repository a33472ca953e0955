//! The official OpenAI Python SDK, unchanged, against the ingress.

use crate::harness::{MODEL, Stack};

#[tokio::test]
async fn the_openai_python_sdk_gets_a_completion_a_stream_and_embeddings() {
    let stack = Stack::start().await;
    let python =
        std::env::var("SLUICE_TEST_PYTHON").expect("SLUICE_TEST_PYTHON is not set: run the tests with scripts/test.sh");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/openai_chat.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .env("OPENAI_BASE_URL", format!("{}/v1", stack.base))
        .env("OPENAI_API_KEY", &stack.key)
        .env("SLUICE_MODEL", MODEL)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sdk script failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("content: mock reply to: hello from the openai sdk"), "{stdout}");
    assert!(stdout.contains("models: ['mock-model', 'team.chat-v1']"), "{stdout}");
    assert!(stdout.contains("error: 404 model_not_found"), "{stdout}");
    assert!(stdout.contains("embeddings: 2 True"), "{stdout}");
    assert!(stdout.contains("stream: mock reply to: stream this please"), "{stdout}");
}
