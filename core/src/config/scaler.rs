//! The KEDA external scaler's settings.

use std::net::SocketAddr;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScalerConfig {
    /// Address of the gRPC `externalscaler.ExternalScaler` service KEDA calls.
    pub listen: SocketAddr,
    /// Address of the scaler's `/healthz`, `/readyz` and `/metrics`.
    pub ops_listen: SocketAddr,
    /// How often the backlog snapshot is read from JetStream (KEDA's calls
    /// are answered from the snapshot and cost nothing).
    pub refresh_ms: u64,
    /// A snapshot older than this (NATS unreachable) makes every RPC fail
    /// with `UNAVAILABLE`, so that KEDA's fallback applies, never a made-up zero.
    pub stale_ms: u64,
    /// Scheduled minimums: while `cron` matches the current minute (UTC), the
    /// pool's metric is at least `min_backlog`, so known peaks are pre-scaled.
    pub schedules: Vec<ScheduleConfig>,
    /// Mutual TLS on the gRPC service: the scaler's certificate, and the CA
    /// that KEDA's client certificate (its TriggerAuthentication's
    /// `tlsClientCert`) must be signed by. Without it the service is plain
    /// gRPC, which is refused on an address other than loopback unless
    /// `allow_plaintext` says so.
    pub tls: Option<ScalerTls>,
    /// Serve plain gRPC on a non-loopback `listen` (anyone who reaches the
    /// port can read every pool's backlog and hold streams open). Off by
    /// default; for a network where something else (a mesh's mTLS) does it.
    pub allow_plaintext: bool,
    /// After SIGTERM, how long the scaler keeps answering with `/readyz`
    /// saying 503, so that the Service stops sending it new connections
    /// before its gRPC server says GOAWAY to the ones it has. 0: none.
    pub drain_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalerTls {
    /// PEM certificate chain the scaler presents (its name must be the one
    /// KEDA dials: the `scalerAddress` host, e.g. `sluice-scaler`).
    pub cert_file: String,
    /// PEM private key of that certificate.
    pub key_file: String,
    /// PEM CA certificate(s): a client must present a certificate signed by
    /// one of them, or the handshake fails.
    pub client_ca_file: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub pool: String,
    /// Five cron fields, UTC: minute hour day-of-month month day-of-week
    /// (`*`, numbers, ranges `a-b`, lists `a,b`, steps `*/n`), e.g. `* 8-17 * * 1-5`.
    pub cron: String,
    /// The metric's floor (a backlog-equivalent) while the window is open.
    pub min_backlog: u64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9095)),
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9096)),
            refresh_ms: 500,
            stale_ms: 5_000,
            schedules: Vec::new(),
            tls: None,
            allow_plaintext: false,
            drain_ms: 2_000,
        }
    }
}

impl ScalerConfig {
    /// The scaler's own start-up check (other components share the config
    /// file and never serve the gRPC port): plain gRPC only on loopback
    /// unless `allow_plaintext` says otherwise.
    pub fn check_transport(&self) -> Result<(), ConfigError> {
        if self.tls.is_none() && !self.allow_plaintext && !self.listen.ip().is_loopback() {
            return Err(ConfigError::key(
                "scaler.listen",
                format!(
                    "{} is reachable from other hosts: set scaler.tls (KEDA presents a client certificate) \
                     or scaler.allow_plaintext = true",
                    self.listen
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.refresh_ms == 0 {
            return Err(ConfigError::key("scaler.refresh_ms", "must be greater than zero"));
        }
        if self.stale_ms <= self.refresh_ms {
            return Err(ConfigError::key("scaler.stale_ms", "must be greater than scaler.refresh_ms"));
        }
        if let Some(tls) = &self.tls {
            for (key, path) in
                [("cert_file", &tls.cert_file), ("key_file", &tls.key_file), ("client_ca_file", &tls.client_ca_file)]
            {
                if path.is_empty() {
                    return Err(ConfigError::key(format!("scaler.tls.{key}"), "must name a PEM file"));
                }
            }
        }
        for (i, s) in self.schedules.iter().enumerate() {
            crate::clock::Cron::parse(&s.cron)
                .map_err(|e| ConfigError::key(format!("scaler.schedules[{i}].cron"), e.to_string()))?;
        }
        Ok(())
    }
}
