//! The binaries refuse a bad configuration with exit code 64 and name the key.

use std::process::Command;

use crate::harness::binary;

fn run(bin: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(binary(bin));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_config_exits_64_and_names_the_key() {
    for bin in ["sluice-ingress", "sluice-worker"] {
        let (code, stderr) = run(bin, &[("SLUICE__WORKER__ACK_WAIT_MS", "5")]);
        assert_eq!(code, Some(64), "{bin}: {stderr}");
        assert!(stderr.contains("worker.ack_wait_ms"), "{bin}: {stderr}");

        let (code, stderr) = run(bin, &[("SLUICE__INGRESS__NO_SUCH_KEY", "1")]);
        assert_eq!(code, Some(64), "{bin}: {stderr}");
        assert!(stderr.contains("no_such_key"), "{bin}: {stderr}");
    }
}

#[test]
fn a_missing_upstream_key_variable_exits_64_naming_it() {
    let (code, stderr) = run(
        "sluice-worker",
        &[
            ("SLUICE__POOLS__0__NAME", "gpt-4o-mini"),
            ("SLUICE__POOLS__0__BASE_URL", "https://api.openai.com/v1"),
            ("SLUICE__POOLS__0__API_KEY_ENV", "SLUICE_TEST_UNSET_VARIABLE"),
        ],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("pools[0].api_key_env"), "{stderr}");
}
