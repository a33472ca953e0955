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
        }
    }
}

impl ScalerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.refresh_ms == 0 {
            return Err(ConfigError::key("scaler.refresh_ms", "must be greater than zero"));
        }
        if self.stale_ms <= self.refresh_ms {
            return Err(ConfigError::key("scaler.stale_ms", "must be greater than scaler.refresh_ms"));
        }
        for (i, s) in self.schedules.iter().enumerate() {
            crate::clock::Cron::parse(&s.cron)
                .map_err(|e| ConfigError::key(format!("scaler.schedules[{i}].cron"), e.to_string()))?;
        }
        Ok(())
    }
}
