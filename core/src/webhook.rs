//! Standard Webhooks v1: secrets (`whsec_` + base64), signatures
//! (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`), and the guard
//! that keeps webhook targets off private, loopback and link-local addresses.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

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
    #[error("webhook host {0} did not resolve within {1:?}")]
    ResolveTimeout(String, Duration),
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

/// How long a webhook host's name may take to resolve, at submit and before
/// each delivery (a name that never resolves must not hold a submit or a
/// delivery slot that other tenants share).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Name resolution, replaceable so that tests control what a name resolves
/// to (a DNS-rebinding test answers a public address, then a private one).
pub trait Lookup: Send + Sync + 'static {
    fn lookup(&self, host: String, port: u16)
    -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;
}

/// The system's resolver.
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(
        &self,
        host: String,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.collect()) })
    }
}

/// The addresses of `host`, resolved within `timeout`, when every one of
/// them is allowed by `policy`: a name that resolves to any forbidden
/// address is refused whole. The webhook client connects only to what this
/// returns (its resolver), so a name re-pointed after the check (DNS
/// rebinding) reaches nothing.
pub async fn resolve_allowed(
    lookup: &dyn Lookup,
    host: &str,
    port: u16,
    policy: TargetPolicy,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, WebhookError> {
    let addrs = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::time::timeout(timeout, lookup.lookup(host.to_owned(), port))
            .await
            .map_err(|_| WebhookError::ResolveTimeout(host.to_owned(), timeout))?
            .map_err(|_| WebhookError::Unresolved(host.to_owned()))?,
    };
    if addrs.is_empty() {
        return Err(WebhookError::Unresolved(host.to_owned()));
    }
    if let Some(bad) = addrs.iter().find(|a| forbidden(a.ip(), policy)) {
        return Err(WebhookError::Forbidden(bad.ip()));
    }
    Ok(addrs)
}

/// Refuses a URL that is not http(s), or whose host resolves to an address
/// the policy forbids (or does not resolve within [`RESOLVE_TIMEOUT`]).
/// Checked at submit and again before every delivery; the delivery's own
/// connection resolves through [`resolve_allowed`] as well.
pub async fn check_target(url: &str, policy: TargetPolicy) -> Result<(), WebhookError> {
    check_target_with(&SystemLookup, url, policy, RESOLVE_TIMEOUT).await
}

pub async fn check_target_with(
    lookup: &dyn Lookup,
    url: &str,
    policy: TargetPolicy,
    timeout: Duration,
) -> Result<(), WebhookError> {
    let parsed = url::Url::parse(url).map_err(|e| WebhookError::BadUrl(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(WebhookError::BadUrl("only http and https".into()));
    }
    let host = parsed.host_str().ok_or_else(|| WebhookError::BadUrl("no host".into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = parsed.port_or_known_default().unwrap_or(443);
    resolve_allowed(lookup, host, port, policy, timeout).await.map(|_| ())
}

/// The IPv4 address an IPv6 address carries, in the forms that reach IPv4
/// hosts: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`),
/// NAT64 (`64:ff9b::/96` and the local-use `64:ff9b:1::/48`) and 6to4
/// (`2002:aabb:ccdd::/48`).
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
        return Some(tail);
    }
    if s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0; 4] || s[2] == 1) {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    None
}

/// Whether `v4` lies in the /24 that starts with `prefix`.
fn in_v4(v4: Ipv4Addr, prefix: [u8; 3]) -> bool {
    v4.octets()[..3] == prefix
}

fn forbidden(ip: IpAddr, policy: TargetPolicy) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    // Teredo (2001::/32) hides its IPv4 endpoints; nothing legitimate posts
    // webhooks over it.
    if let IpAddr::V6(v6) = ip
        && v6.segments()[0] == 0x2001
        && v6.segments()[1] == 0
    {
        return !policy.allow_private;
    }
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
                || a >= 240 // reserved (240/4)
                || (a == 198 && (b & 0xfe) == 18) // benchmarking (198.18/15)
                || in_v4(v4, [192, 0, 0]) // IETF protocol assignments
                || in_v4(v4, [192, 0, 2]) // documentation (TEST-NET-1)
                || in_v4(v4, [198, 51, 100]) // documentation (TEST-NET-2)
                || in_v4(v4, [203, 0, 113]) // documentation (TEST-NET-3)
        }
        IpAddr::V6(v6) => {
            let [first, second, third, fourth, ..] = v6.segments();
            v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link local
                || (first == 0x2001 && second == 0x0db8) // documentation (2001:db8::/32)
                || (first == 0x3fff && (second & 0xf000) == 0) // documentation (3fff::/20)
                || (first == 0x0100 && second == 0 && third == 0 && fourth == 0) // discard-only (100::/64)
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
            // Ranges that are not on the public Internet either: a target
            // there reaches whatever the gateway's network routes them to.
            "http://192.0.0.8/",
            "http://192.0.2.1/",
            "http://198.51.100.7/",
            "http://203.0.113.9/",
            "http://198.18.0.1/",
            "http://198.19.255.254/",
            "http://240.0.0.1/",
            "http://255.255.255.254/",
            "http://[2001:db8::1]/",
            "http://[3fff:fff::1]/",
            "http://[100::1]/",
        ] {
            assert!(check_target(url, strict).await.is_err(), "{url} should be refused");
        }
        assert!(check_target("ftp://example.com/", strict).await.is_err());
        let loopback = TargetPolicy { allow_loopback: true, allow_private: false };
        assert!(check_target("http://127.0.0.1:9000/", loopback).await.is_ok());
        assert!(check_target("http://10.1.2.3/", loopback).await.is_err());
        assert!(check_target("http://93.184.215.14/", strict).await.is_ok());
        // The neighbours of those ranges are public.
        for url in [
            "http://192.0.3.1/",
            "http://198.20.0.1/",
            "http://203.0.114.1/",
            "http://[2001:db9::1]/",
            "http://[3fff:1000::1]/",
            "http://[100:0:0:1::1]/",
        ] {
            assert!(check_target(url, strict).await.is_ok(), "{url} should pass");
        }
    }

    #[tokio::test]
    async fn ipv6_forms_that_carry_a_private_ipv4_address_are_refused() {
        let strict = TargetPolicy::default();
        for url in [
            "http://[64:ff9b::a9fe:a9fe]/",                   // NAT64 of 169.254.169.254
            "http://[64:ff9b::7f00:1]/",                      // NAT64 of 127.0.0.1
            "http://[64:ff9b:1::a00:1]/",                     // local-use NAT64 of 10.0.0.1
            "http://[2002:c0a8:1::1]/",                       // 6to4 of 192.168.0.1
            "http://[::a00:1]/",                              // IPv4-compatible 10.0.0.1
            "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", // Teredo
        ] {
            assert!(matches!(check_target(url, strict).await, Err(WebhookError::Forbidden(_))), "{url}");
        }
        // The same forms around a public address pass.
        assert!(check_target("http://[64:ff9b::5db8:d70e]/", strict).await.is_ok());
        assert!(check_target("http://[2002:5db8:d70e::1]/", strict).await.is_ok());
    }

    /// A resolver that never answers.
    struct Silent;

    impl Lookup for Silent {
        fn lookup(&self, _: String, _: u16) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_that_never_resolves_is_refused_after_the_timeout() {
        let timeout = Duration::from_secs(2);
        let checked = check_target_with(&Silent, "http://never.example/", TargetPolicy::default(), timeout).await;
        assert_eq!(checked, Err(WebhookError::ResolveTimeout("never.example".into(), timeout)));
    }
}
