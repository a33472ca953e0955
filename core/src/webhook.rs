//! Standard Webhooks v1: secrets (`whsec_` + base64), signatures
//! (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`), and the guard
//! that keeps webhook targets off private, loopback and link-local addresses.

use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub const SECRET_PREFIX: &str = "whsec_";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("webhook secrets look like `whsec_` followed by base64")]
    BadSecret,
    #[error("webhook URL is not valid: {0}")]
    BadUrl(String),
    #[error("webhook target {0} is a private, loopback or link-local address")]
    Forbidden(IpAddr),
    #[error("webhook host {0} does not resolve")]
    Unresolved(String),
    #[error("random source failed")]
    Random,
}

/// A new random secret, `whsec_` + base64 of 24 bytes.
pub fn new_secret() -> Result<String, WebhookError> {
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|_| WebhookError::Random)?;
    Ok(format!("{SECRET_PREFIX}{}", STANDARD.encode(raw)))
}

/// Checks a secret's form.
pub fn check_secret(secret: &str) -> Result<(), WebhookError> {
    key_of(secret).map(|_| ())
}

fn key_of(secret: &str) -> Result<Vec<u8>, WebhookError> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).ok_or(WebhookError::BadSecret)?;
    let key = STANDARD.decode(encoded).map_err(|_| WebhookError::BadSecret)?;
    if key.len() < 16 {
        return Err(WebhookError::BadSecret);
    }
    Ok(key)
}

/// The `webhook-signature` value for one secret.
pub fn sign(secret: &str, msg_id: &str, timestamp: u64, body: &[u8]) -> Result<String, WebhookError> {
    let key = key_of(secret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| WebhookError::BadSecret)?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())))
}

/// The `webhook-signature` value for every secret in `secrets` (separated by
/// spaces, as during a rotation), space-separated as the standard has it.
pub fn sign_all(secrets: &str, msg_id: &str, timestamp: u64, body: &[u8]) -> Result<String, WebhookError> {
    let signatures: Result<Vec<String>, WebhookError> =
        secrets.split_whitespace().map(|s| sign(s, msg_id, timestamp, body)).collect();
    let signatures = signatures?;
    if signatures.is_empty() {
        return Err(WebhookError::BadSecret);
    }
    Ok(signatures.join(" "))
}

/// Which targets a deployment allows besides public addresses.
#[derive(Debug, Clone, Copy, Default)]
pub struct TargetPolicy {
    pub allow_private: bool,
    pub allow_loopback: bool,
}

/// Refuses a URL that is not http(s), or whose host resolves to an address
/// the policy forbids. Checked at submit and again before every delivery,
/// after DNS resolution (a name can be pointed at a private address later).
pub async fn check_target(url: &str, policy: TargetPolicy) -> Result<(), WebhookError> {
    let parsed = url::Url::parse(url).map_err(|e| WebhookError::BadUrl(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(WebhookError::BadUrl("only http and https".into()));
    }
    let host = parsed.host_str().ok_or_else(|| WebhookError::BadUrl("no host".into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|_| WebhookError::Unresolved(host.to_owned()))?
            .map(|a| a.ip())
            .collect(),
    };
    if addrs.is_empty() {
        return Err(WebhookError::Unresolved(host.to_owned()));
    }
    for ip in addrs {
        if forbidden(ip, policy) {
            return Err(WebhookError::Forbidden(ip));
        }
    }
    Ok(())
}

fn forbidden(ip: IpAddr, policy: TargetPolicy) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if ip.is_loopback() {
        return !policy.allow_loopback;
    }
    let private = match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
                || a == 0
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link local
        }
    };
    private && !policy.allow_private
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn rotation_signs_with_every_secret() {
        let (a, b) = (new_secret().unwrap(), new_secret().unwrap());
        let both = sign_all(&format!("{a} {b}"), "msg_1", 5, b"{}").unwrap();
        let parts: Vec<&str> = both.split(' ').collect();
        assert_eq!(parts, vec![sign(&a, "msg_1", 5, b"{}").unwrap(), sign(&b, "msg_1", 5, b"{}").unwrap()]);
        assert_eq!(sign_all("", "m", 1, b""), Err(WebhookError::BadSecret));
    }

    #[test]
    fn secrets_are_checked_and_made() {
        assert_eq!(check_secret("nope"), Err(WebhookError::BadSecret));
        assert_eq!(check_secret("whsec_!!"), Err(WebhookError::BadSecret));
        let s = new_secret().unwrap();
        assert!(s.starts_with("whsec_"));
        assert_eq!(check_secret(&s), Ok(()));
    }

    #[tokio::test]
    async fn private_targets_are_refused_unless_allowed() {
        let strict = TargetPolicy::default();
        for url in [
            "http://10.1.2.3/hook",
            "http://192.168.0.1/",
            "http://172.20.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://127.0.0.1:9000/",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:10.0.0.1]/",
            "http://0.0.0.0/",
            "http://localhost/",
        ] {
            assert!(check_target(url, strict).await.is_err(), "{url} should be refused");
        }
        assert!(check_target("ftp://example.com/", strict).await.is_err());
        let loopback = TargetPolicy { allow_loopback: true, allow_private: false };
        assert!(check_target("http://127.0.0.1:9000/", loopback).await.is_ok());
        assert!(check_target("http://10.1.2.3/", loopback).await.is_err());
        assert!(check_target("http://93.184.215.14/", strict).await.is_ok());
    }
}
