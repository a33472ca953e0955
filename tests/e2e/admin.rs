//! The admin API: its own listener, its own token, tenants' settings and keys.

use std::time::Duration;

use crate::harness::{Stack, wait_for};

const TOKEN: &str = "admin-token-for-tests-0123456789abcdef";

/// The admin API of `stack`'s config and database on a port of its own.
async fn admin_api(stack: &Stack) -> String {
    let mut config = stack.config.clone();
    config.admin.token = Some(sluice_core::secret::Secret::new(TOKEN));
    let router = sluice_ingress::admin_api::router(&config, stack.db.clone()).expect("admin token is set");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// Waits until `GET /v1/models` with `key` is answered `status` (keys
/// reload every 100 ms in tests).
async fn key_answers(stack: &Stack, key: &str, status: u16, what: &str) {
    wait_for(what, Duration::from_secs(5), || async {
        let r = stack.http.get(format!("{}/v1/models", stack.base)).bearer_auth(key).send().await.unwrap();
        (r.status() == status).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_admin_api_refuses_anything_but_the_admin_token() {
    let stack = Stack::start().await;
    let admin = admin_api(&stack).await;
    let url = format!("{admin}/admin/tenants/acme");
    for token in [None, Some("wrong-token"), Some(stack.key.as_str())] {
        let mut request = stack.http.get(&url);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 401, "token {token:?}");
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "invalid_api_key");
    }
    let r = stack.http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // And the public listener has no admin routes.
    let r = stack.http.get(format!("{}/admin/tenants/acme", stack.base)).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn tenant_limits_set_through_the_admin_api_apply_at_the_ingress() {
    let stack = Stack::start().await;
    let admin = admin_api(&stack).await;
    let url = format!("{admin}/admin/tenants/acme");
    let put = |body: serde_json::Value| stack.http.put(&url).bearer_auth(TOKEN).json(&body).send();

    for bad in [
        serde_json::json!({"weight": 0}),
        serde_json::json!({"tier": "urgent"}),
        serde_json::json!({"rpm": -1}),
        serde_json::json!({"colour": "red"}),
    ] {
        assert_eq!(put(bad.clone()).await.unwrap().status(), 400, "{bad}");
    }
    let r = put(serde_json::json!({"rpm": 1, "weight": 3})).await.unwrap();
    assert_eq!(r.status(), 200);
    let shown: serde_json::Value = r.json().await.unwrap();
    assert_eq!(shown["rpm"], 1);
    assert_eq!(shown["weight"], 3);
    assert_eq!(shown["tier"], "interactive", "defaults fill what is not set");

    // Within the reload interval the ingress refuses the tenant's second
    // request of the minute.
    wait_for("the rpm limit to apply", Duration::from_secs(5), || async {
        (stack.chat(&Stack::chat_body("hi")).await.status() == 429).then_some(())
    })
    .await;

    // `null` goes back to the default (no limit).
    let shown: serde_json::Value = put(serde_json::json!({"rpm": null})).await.unwrap().json().await.unwrap();
    assert!(shown["rpm"].is_null(), "{shown}");
    assert_eq!(shown["weight"], 3, "fields left out are kept");
    wait_for("the limit to be lifted", Duration::from_secs(5), || async {
        (stack.chat(&Stack::chat_body("hi")).await.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn keys_made_and_revoked_through_the_admin_api() {
    let stack = Stack::start().await;
    let admin = admin_api(&stack).await;
    let r = stack.http.post(format!("{admin}/admin/tenants/acme/keys")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let made: serde_json::Value = r.json().await.unwrap();
    let key = made["api_key"].as_str().unwrap().to_owned();
    key_answers(&stack, &key, 200, "the new key to work").await;

    let revoke = format!("{admin}/admin/keys/{}", made["key_id"].as_str().unwrap());
    assert_eq!(stack.http.delete(&revoke).bearer_auth(TOKEN).send().await.unwrap().status(), 204);
    key_answers(&stack, &key, 401, "the revoked key to stop working").await;
    assert_eq!(stack.http.delete(&revoke).bearer_auth(TOKEN).send().await.unwrap().status(), 404);
    let r = stack.http.post(format!("{admin}/admin/tenants/nobody/keys")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

/// Runs `sluice-admin` against `stack`'s database: exit code, stdout, stderr.
fn admin_cli(stack: &Stack, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(crate::harness::binary("sluice-admin"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE__DATABASE__URL", stack.config.database.url.expose())
        .env("SLUICE__WEBHOOKS__SECRET_KEYS_FILE", crate::harness::webhook_keys_file())
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code(), text(out.stdout), text(out.stderr))
}

/// The value after `label` on its line of the CLI's output.
fn field(out: &str, label: &str) -> String {
    let line = out.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no `{label}` in {out}"));
    line[label.len()..].trim().to_owned()
}

#[tokio::test]
async fn the_admin_cli_creates_lists_shows_and_revokes_keys_and_tenants() {
    let stack = Stack::start().await;
    let (code, out, _) = admin_cli(&stack, &["--version"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("sluice-admin "), "{out}");

    let (code, out, err) = admin_cli(&stack, &["keys", "create", "--tenant", "cli-team"]);
    assert_eq!(code, Some(0), "{err}");
    let (id, key) = (field(&out, "key id:"), field(&out, "api key:"));
    key_answers(&stack, &key, 200, "the new key to work").await;

    // Listed and shown by id and prefix, never in clear.
    let (code, listed, _) = admin_cli(&stack, &["keys", "list", "--tenant", "cli-team"]);
    assert_eq!(code, Some(0));
    assert!(listed.contains(&id) && listed.contains(&key[..16]) && !listed.contains(&key), "{listed}");
    assert!(listed.contains("(1 keys)"), "{listed}");
    let (_, shown, _) = admin_cli(&stack, &["tenants", "show", "cli-team"]);
    assert_eq!(field(&shown, "live keys:"), "1", "{shown}");
    assert!(shown.contains(&id) && !shown.contains(&key), "{shown}");
    let (_, all, _) = admin_cli(&stack, &["tenants", "list"]);
    assert!(all.lines().any(|l| l.contains("cli-team")), "{all}");

    // Settings: set, then shown with the defaults filled in.
    let (code, out, err) = admin_cli(&stack, &["tenants", "set", "cli-team", "--weight", "7", "--rpm", "600"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(field(&out, "weight:"), "7");
    let (_, shown, _) = admin_cli(&stack, &["tenants", "show", "cli-team"]);
    assert_eq!(field(&shown, "rpm:"), "600");
    let (code, _, err) = admin_cli(&stack, &["tenants", "set", "cli-team", "--weight", "heavy"]);
    assert_eq!(code, Some(2), "a bad value is a usage error: {err}");
    assert!(err.contains("--weight"), "{err}");
    let (code, _, err) = admin_cli(&stack, &["tenants", "show", "nobody"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no tenant named `nobody`"), "{err}");

    // Revoked: the key stops working, shows as revoked, and is listed only with --all.
    let (code, out, _) = admin_cli(&stack, &["keys", "revoke", &id]);
    assert_eq!((code, out.trim()), (Some(0), "revoked"));
    key_answers(&stack, &key, 401, "the revoked key to stop working").await;
    let (code, _, err) = admin_cli(&stack, &["keys", "revoke", &id]);
    assert_eq!(code, Some(1));
    assert!(err.contains("already revoked"), "{err}");
    let (_, shown, _) = admin_cli(&stack, &["keys", "show", &id]);
    assert!(field(&shown, "revoked:").starts_with("20"), "{shown}");
    let (_, live, _) = admin_cli(&stack, &["keys", "list", "--tenant", "cli-team"]);
    assert!(!live.contains(&id) && live.contains("(0 keys)"), "{live}");
    let (_, all, _) = admin_cli(&stack, &["keys", "list", "--all"]);
    assert!(all.contains(&id), "{all}");
    let (code, _, err) = admin_cli(&stack, &["keys", "show", &uuid::Uuid::now_v7().to_string()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no key with id"), "{err}");
}
