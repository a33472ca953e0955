//! The webhook client's resolver: every name it connects to is resolved
//! here, within [`webhook::RESOLVE_TIMEOUT`], and refused when any of its
//! addresses is one the target policy forbids. The check before each
//! attempt and the connection then agree on the addresses: a name that
//! answers a public address to the check and a private one to the
//! connection (DNS rebinding) reaches nothing. IP literals are not resolved;
//! the check before each attempt covers them.

use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sluice_core::webhook::{self, Lookup, TargetPolicy};

pub struct GuardedResolver {
    pub lookup: Arc<dyn Lookup>,
    pub policy: TargetPolicy,
    pub timeout: Duration,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let (lookup, policy, timeout) = (self.lookup.clone(), self.policy, self.timeout);
        Box::pin(async move {
            // The connector sets the port; 0 here.
            let addrs = webhook::resolve_allowed(&*lookup, name.as_str(), 0, policy, timeout).await.map_err(|e| {
                metrics::counter!(crate::metrics::WEBHOOK_FAILURES, "reason" => "refused_at_connect").increment(1);
                Box::new(e) as Box<dyn std::error::Error + Send + Sync>
            })?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The webhook HTTP client: its attempt timeout, no redirects (a redirect
/// could lead anywhere), and every connection through [`GuardedResolver`].
pub fn client(timeout: Duration, policy: TargetPolicy, lookup: Arc<dyn Lookup>) -> reqwest::Result<reqwest::Client> {
    // reqwest is built without a bundled TLS backend; rustls uses ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(GuardedResolver { lookup, policy, timeout: webhook::RESOLVE_TIMEOUT })
        .build()
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Answers a public address the first time and the loopback listener's
    /// address every time after: a rebinding name.
    struct Rebinding {
        calls: AtomicUsize,
        private: SocketAddr,
    }

    impl Lookup for Rebinding {
        fn lookup(
            &self,
            _: String,
            port: u16,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
            let first = self.calls.fetch_add(1, Ordering::SeqCst) == 0;
            let addr = if first { SocketAddr::from(([93, 184, 215, 14], port)) } else { self.private };
            Box::pin(async move { Ok(vec![addr]) })
        }
    }

    #[tokio::test]
    async fn a_name_rebound_to_loopback_after_the_check_is_never_connected_to() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let private = listener.local_addr().unwrap();
        let lookup = Arc::new(Rebinding { calls: AtomicUsize::new(0), private });
        let policy = TargetPolicy::default();
        let url = format!("http://hooks.rebinding.test:{}/hook", private.port());
        // The check sees the public address and passes.
        webhook::check_target_with(&*lookup, &url, policy, Duration::from_secs(1)).await.unwrap();
        // The delivery's own resolution sees loopback and is refused.
        let client = client(Duration::from_secs(5), policy, lookup.clone()).unwrap();
        let sent = client.post(&url).body("{}").send().await;
        assert!(sent.is_err(), "the request must fail");
        assert_eq!(lookup.calls.load(Ordering::SeqCst), 2, "the connection resolved the name itself");
        // Nothing connected: the listener's backlog is empty.
        let accepted = listener.accept();
        assert!(
            matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a connection reached the refused address: {accepted:?}"
        );
    }
}
