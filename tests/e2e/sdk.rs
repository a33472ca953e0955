//! The official OpenAI and Anthropic Python SDKs, unchanged, against the ingress.

use crate::harness::{ANTHROPIC_MODEL, MODEL, Stack};

/// Runs a script of `tests/sdk/` with the test Python and `env`; returns its
/// standard output once it succeeded.
pub(crate) async fn run_sdk(script: &str, env: &[(&str, String)]) -> String {
    let python =
        std::env::var("SLUICE_TEST_PYTHON").expect("SLUICE_TEST_PYTHON is not set: run the tests with scripts/test.sh");
    let path = format!("{}/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let out =
        tokio::process::Command::new(python).arg(path).envs(env.iter().map(|(k, v)| (*k, v))).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    stdout
}

#[tokio::test]
async fn the_openai_python_sdk_gets_a_completion_a_stream_and_embeddings() {
    let stack = Stack::start().await;
    let stdout = run_sdk(
        "openai_chat.py",
        &[
            ("OPENAI_BASE_URL", format!("{}/v1", stack.base)),
            ("OPENAI_API_KEY", stack.key.clone()),
            ("SLUICE_MODEL", MODEL.to_owned()),
        ],
    )
    .await;
    assert!(stdout.contains("content: mock reply to: hello from the openai sdk"), "{stdout}");
    assert!(stdout.contains("models: ['mock-claude', 'mock-model', 'team.chat-v1']"), "{stdout}");
    assert!(stdout.contains("error: 404 model_not_found"), "{stdout}");
    assert!(stdout.contains("embeddings: 2 True"), "{stdout}");
    assert!(stdout.contains("stream: mock reply to: stream this please"), "{stdout}");
}

#[tokio::test]
async fn the_anthropic_python_sdk_gets_a_message_and_a_stream() {
    let stack = Stack::start().await;
    let stdout = run_sdk(
        "anthropic_messages.py",
        &[
            ("ANTHROPIC_BASE_URL", stack.base.clone()),
            ("ANTHROPIC_API_KEY", stack.key.clone()),
            ("SLUICE_MODELS", format!("{ANTHROPIC_MODEL},{MODEL}")),
        ],
    )
    .await;
    // Native: the deployment speaks Messages; translated: it speaks OpenAI's chat.
    for model in [ANTHROPIC_MODEL, MODEL] {
        let message = format!("{model} message: mock reply to: hello {model} from the anthropic sdk end_turn");
        assert!(stdout.contains(&message), "{stdout}");
        assert!(stdout.contains(&format!("{model} usage: True True")), "{stdout}");
        let stream = format!("{model} stream: mock reply to: stream {model} please True end_turn True");
        assert!(stdout.contains(&stream), "{stdout}");
    }
    assert!(stdout.contains("error: 404 not_found_error"), "{stdout}");
    // The Anthropic-speaking pool reached the mock's /v1/messages (two calls).
    assert_eq!(stack.mock.stats().await["messages"], 2);
}

#[tokio::test]
async fn the_anthropic_python_sdk_reads_the_workers_errors_in_its_own_shape() {
    let stack = Stack::start_with(|c| c.worker.max_attempts = 1).await;
    let env = [
        ("ANTHROPIC_BASE_URL", stack.base.clone()),
        ("ANTHROPIC_API_KEY", stack.key.clone()),
        ("SLUICE_MODELS", format!("{ANTHROPIC_MODEL},{MODEL}")),
    ];
    // The provider fails: the worker gives up and sends its error structured;
    // the ingress renders it once, as Anthropic's `api_error`.
    stack.mock.faults(serde_json::json!({"error_rate": 1.0, "error_status": 503})).await;
    let stdout = run_sdk("anthropic_errors.py", &env).await;
    for model in [ANTHROPIC_MODEL, MODEL] {
        let line = format!(
            "{model} error: InternalServerError 502 api_error the upstream failed (upstream_5xx) on every attempt"
        );
        assert!(stdout.contains(&line), "{stdout}");
    }
    // The provider refuses the request: an Anthropic deployment's own error
    // reaches the client as it came; an OpenAI deployment's is translated.
    stack.mock.faults(serde_json::json!({"error_rate": 1.0, "error_status": 400})).await;
    let stdout = run_sdk("anthropic_errors.py", &env).await;
    assert!(
        stdout.contains(&format!("{ANTHROPIC_MODEL} error: BadRequestError 400 api_error injected failure")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{MODEL} error: BadRequestError 400 invalid_request_error injected failure")),
        "{stdout}"
    );
}
