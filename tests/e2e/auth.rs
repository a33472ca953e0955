//! API keys: missing, wrong and revoked keys get 401 with OpenAI's error body.

use std::time::Duration;

use crate::harness::{Stack, wait_for};

#[tokio::test]
async fn missing_or_unknown_key_gets_401() {
    let stack = Stack::start().await;
    let url = format!("{}/v1/chat/completions", stack.base);
    let body = Stack::chat_body("hi");
    let no_key = stack.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(no_key.status(), 401);
    let wrong = stack.http.post(&url).bearer_auth("sk-sluice-not-a-key").json(&body).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let error: serde_json::Value = wrong.json().await.unwrap();
    assert_eq!(error["error"]["type"], "authentication_error");
    assert_eq!(error["error"]["code"], "invalid_api_key");
    assert_eq!(stack.mock.requests().await, 0, "an unauthenticated request reached the provider");
}

#[tokio::test]
async fn revoked_key_stops_working_within_the_cache_bound() {
    let stack = Stack::start().await;
    assert_eq!(stack.chat(&Stack::chat_body("before")).await.status(), 200);
    assert!(sluice_core::db::revoke_key(&stack.db, stack.key_id).await.unwrap());
    // auth_refresh_ms is 100 in tests; allow generous slack on a loaded machine.
    wait_for("the revoked key to be refused", Duration::from_secs(5), || async {
        (stack.chat(&Stack::chat_body("after")).await.status() == 401).then_some(())
    })
    .await;
}

#[tokio::test]
async fn keys_are_stored_as_digests_only() {
    let stack = Stack::start().await;
    let stored: Vec<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys").fetch_all(&stack.db).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0], stack.key);
    assert!(!stored[0].contains(&stack.key[10..]));
    assert_eq!(stored[0].len(), 64);
}

/// Key reloads that keep failing do not keep a stale snapshot forever: past
/// `ingress.auth_max_staleness_ms` every request gets 503 (a key revoked
/// meanwhile is not served), and service resumes when reloads succeed again.
#[tokio::test]
async fn the_key_cache_fails_closed_when_reloads_keep_failing() {
    let stack = crate::harness::Stack::start_with(|c| c.ingress.auth_max_staleness_ms = 1_000).await;
    let models = || async {
        stack.http.get(format!("{}/v1/models", stack.base)).bearer_auth(&stack.key).send().await.unwrap().status()
    };
    assert_eq!(models().await, 200);
    // Reloads fail: the keys table is gone from the ingress's view.
    sqlx::query("ALTER TABLE api_keys RENAME TO api_keys_away").execute(&stack.db).await.unwrap();
    crate::harness::wait_for("requests to be refused with 503", std::time::Duration::from_secs(10), || async {
        (models().await == 503).then_some(())
    })
    .await;
    sqlx::query("ALTER TABLE api_keys_away RENAME TO api_keys").execute(&stack.db).await.unwrap();
    crate::harness::wait_for("service to resume", std::time::Duration::from_secs(10), || async {
        (models().await == 200).then_some(())
    })
    .await;
}
