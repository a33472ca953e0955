use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[test]
fn env_overrides_nested_keys_and_list_entries() {
    let c = Config::load(
        None,
        env(&[
            ("SLUICE__INGRESS__SYNC_TIMEOUT_MS", "1500"),
            ("SLUICE__POOLS__0__NAME", "gpt-4.1"),
            ("SLUICE__POOLS__0__BASE_URL", "http://127.0.0.1:9/v1"),
            ("OTHER", "ignored"),
        ]),
    );
    let c = c.unwrap();
    assert_eq!(c.ingress.sync_timeout_ms, 1500);
    assert_eq!(c.pools[0].name, "gpt-4.1");
    assert_eq!(c.pools[0].subject_token(), "gpt-4_1");
}

#[test]
fn unknown_key_is_named() {
    let err = Config::load(None, env(&[("SLUICE__INGRESS__LISTEN_ADDR", "x")]));
    let msg = err.map(|_| ()).unwrap_err().to_string();
    assert!(msg.contains("ingress"), "{msg}");
    assert!(msg.contains("listen_addr"), "{msg}");
}

#[test]
fn wrong_type_is_named() {
    let err = Config::load(None, env(&[("SLUICE__WORKER__MAX_IN_FLIGHT", "many")]));
    let msg = err.map(|_| ()).unwrap_err().to_string();
    assert!(msg.contains("worker.max_in_flight"), "{msg}");
}

#[test]
fn an_admin_listener_needs_a_long_enough_token() {
    let err = Config::load(None, env(&[("SLUICE__ADMIN__LISTEN", "127.0.0.1:9099")]));
    assert!(err.map(|_| ()).unwrap_err().to_string().contains("admin.token"));
    let err =
        Config::load(None, env(&[("SLUICE__ADMIN__LISTEN", "127.0.0.1:9099"), ("SLUICE__ADMIN__TOKEN", "short")]));
    assert!(err.map(|_| ()).unwrap_err().to_string().contains("32"));
    let token = "x".repeat(32);
    assert!(
        Config::load(None, env(&[("SLUICE__ADMIN__LISTEN", "127.0.0.1:9099"), ("SLUICE__ADMIN__TOKEN", &token)]))
            .is_ok()
    );
}

#[test]
fn invalid_value_is_named() {
    let err = Config::load(None, env(&[("SLUICE__WORKER__ACK_WAIT_MS", "10")]));
    let msg = err.map(|_| ()).unwrap_err().to_string();
    assert!(msg.contains("worker.ack_wait_ms"), "{msg}");
}

#[test]
fn a_pool_has_deployments_or_one_on_itself() {
    let c = Config::load(
        None,
        env(&[
            ("SLUICE__POOLS__0__NAME", "chat"),
            ("SLUICE__POOLS__0__DEPLOYMENTS__0__BASE_URL", "http://127.0.0.1:9/v1"),
            ("SLUICE__POOLS__0__DEPLOYMENTS__0__RPM", "600"),
            ("SLUICE__POOLS__0__DEPLOYMENTS__1__BASE_URL", "http://127.0.0.1:10/v1"),
            ("SLUICE__POOLS__0__DEPLOYMENTS__1__PROVIDER", "anthropic"),
            ("SLUICE__POOLS__0__DEPLOYMENTS__1__MODEL", "claude-x"),
            ("SLUICE__POOLS__0__DEPLOYMENTS__1__WEIGHT", "3"),
        ]),
    )
    .unwrap();
    let d = c.pools[0].deployments();
    assert_eq!(d.len(), 2);
    assert_eq!((d[0].name.as_str(), d[0].model.as_deref(), d[0].rpm), ("chat-1", Some("chat"), 600));
    assert_eq!((d[1].provider, d[1].weight, d[1].model.as_deref()), (ProviderKind::Anthropic, 3, Some("claude-x")));

    let both = Config::load(
        None,
        env(&[
            ("SLUICE__POOLS__0__NAME", "chat"),
            ("SLUICE__POOLS__0__BASE_URL", "http://127.0.0.1:9/v1"),
            ("SLUICE__POOLS__0__DEPLOYMENTS__0__BASE_URL", "http://127.0.0.1:9/v1"),
        ]),
    );
    assert!(both.map(|_| ()).unwrap_err().to_string().contains("pools[0]"));
    let neither = Config::load(None, env(&[("SLUICE__POOLS__0__NAME", "chat")]));
    assert!(neither.map(|_| ()).unwrap_err().to_string().contains("base_url"));
    let weight = Config::load(
        None,
        env(&[
            ("SLUICE__POOLS__0__NAME", "chat"),
            ("SLUICE__POOLS__0__DEPLOYMENTS__0__BASE_URL", "http://127.0.0.1:9/v1"),
            ("SLUICE__POOLS__0__DEPLOYMENTS__0__WEIGHT", "0"),
        ]),
    );
    assert!(weight.map(|_| ()).unwrap_err().to_string().contains("deployments[0].weight"));
}

#[test]
fn the_scalers_grpc_off_loopback_needs_tls_or_an_explicit_plaintext_choice() {
    let open = ("SLUICE__SCALER__LISTEN", "0.0.0.0:9095");
    let transport = |pairs: &[(&str, &str)]| Config::load(None, env(pairs)).unwrap().scaler.check_transport();
    // The other components load such a config; only the scaler refuses it.
    let err = transport(&[open]).unwrap_err().to_string();
    assert!(err.contains("scaler.listen") && err.contains("scaler.tls"), "{err}");
    assert!(transport(&[open, ("SLUICE__SCALER__ALLOW_PLAINTEXT", "true")]).is_ok());
    let tls = [
        ("SLUICE__SCALER__TLS__CERT_FILE", "/etc/sluice/scaler-tls/tls.crt"),
        ("SLUICE__SCALER__TLS__KEY_FILE", "/etc/sluice/scaler-tls/tls.key"),
        ("SLUICE__SCALER__TLS__CLIENT_CA_FILE", "/etc/sluice/scaler-tls/ca.crt"),
    ];
    assert!(transport(&[open, tls[0], tls[1], tls[2]]).is_ok());
    // A TLS section must name all three files.
    let err = Config::load(None, env(&[open, tls[0], tls[1]])).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("client_ca_file"), "{err}");
    // Loopback (the default) is served in plain text.
    assert!(transport(&[]).is_ok());
}
