//! What one ScaledObject asks the scaler to measure, from its trigger
//! metadata:
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `pool` | (required) | the pool (model name) whose backlog is measured |
//! | `tenant` | all tenants | a tenant's name or id: only its jobs count |
//! | `targetBacklogPerReplica` | `10` | jobs queued or running per worker replica (KEDA's target) |
//! | `activationBacklog` | `0` | the pool is active (scaled from zero) above this |
//! | `capacityAware` | `false` | cap the metric at what the pool's provider limits can absorb |
//! | `callsPerMinutePerReplica` | (required when capacity-aware) | upstream calls one replica makes per minute at full load |
//! | `minBacklogSchedule` | none | `cron=N;cron=N`: the metric's floor while a UTC cron window is open |
//! | `metricName` | `sluice-backlog-<pool>[-<tenant>]` | the metric's name |

use std::collections::HashMap;

use sluice_core::clock::{Civil, Cron};
use sluice_core::config::Config;

/// A tenant named in the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantRef {
    Id(uuid::Uuid),
    Name(String),
}

#[derive(Debug, Clone)]
pub struct Selection {
    pub pool: String,
    pub pool_token: String,
    pub tenant: Option<TenantRef>,
    pub target: f64,
    pub activation: f64,
    /// Most replicas the pool's provider limits can keep busy.
    pub max_useful_replicas: Option<f64>,
    pub schedules: Vec<(Cron, f64)>,
    pub metric_name: String,
}

/// Trigger metadata the scaler cannot use (KEDA gets `InvalidArgument`).
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata `{0}` is required")]
    Required(&'static str),
    #[error("no pool `{0}` in the scaler's config")]
    NoPool(String),
    #[error("metadata `{key}` must be {expected}, not `{value}`")]
    Invalid { key: &'static str, expected: &'static str, value: String },
    #[error("metadata `callsPerMinutePerReplica` (> 0) is required with capacityAware")]
    NoCallRate,
    #[error("capacityAware needs `rpm` on every deployment of pool `{0}`")]
    NoRpm(String),
    #[error("schedule `{window}`: {reason}")]
    Schedule { window: String, reason: String },
}

fn number(
    meta: &HashMap<String, String>,
    key: &'static str,
    default: Option<f64>,
) -> Result<Option<f64>, MetadataError> {
    match meta.get(key) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<f64>() {
            Ok(n) if n.is_finite() && n >= 0.0 => Ok(Some(n)),
            _ => Err(MetadataError::Invalid { key, expected: "a non-negative number", value: v.clone() }),
        },
    }
}

impl Selection {
    /// Reads the metadata against the config (the pool must exist; config
    /// schedules of the pool are added to the metadata's).
    pub fn parse(meta: &HashMap<String, String>, config: &Config) -> Result<Self, MetadataError> {
        let pool_name =
            meta.get("pool").map(|p| p.trim()).filter(|p| !p.is_empty()).ok_or(MetadataError::Required("pool"))?;
        let pool = config.pool(pool_name).ok_or_else(|| MetadataError::NoPool(pool_name.to_owned()))?;
        let tenant =
            meta.get("tenant").map(|t| t.trim()).filter(|t| !t.is_empty()).map(|t| match uuid::Uuid::parse_str(t) {
                Ok(id) => TenantRef::Id(id),
                Err(_) => TenantRef::Name(t.to_owned()),
            });
        let target = number(meta, "targetBacklogPerReplica", Some(10.0))?.unwrap_or(10.0);
        if target <= 0.0 {
            let value = meta.get("targetBacklogPerReplica").cloned().unwrap_or_default();
            return Err(MetadataError::Invalid {
                key: "targetBacklogPerReplica",
                expected: "greater than zero",
                value,
            });
        }
        let activation = number(meta, "activationBacklog", Some(0.0))?.unwrap_or(0.0);
        let capacity_aware = match meta.get("capacityAware").map(|v| v.trim().to_ascii_lowercase()) {
            None => false,
            Some(v) if v == "true" => true,
            Some(v) if v == "false" => false,
            Some(value) => {
                return Err(MetadataError::Invalid { key: "capacityAware", expected: "true or false", value });
            }
        };
        let max_useful_replicas = if capacity_aware {
            let per_replica = number(meta, "callsPerMinutePerReplica", None)?
                .filter(|n| *n > 0.0)
                .ok_or(MetadataError::NoCallRate)?;
            let deployments = pool.deployments();
            if deployments.iter().any(|d| d.rpm == 0) {
                return Err(MetadataError::NoRpm(pool_name.to_owned()));
            }
            let rpm: u64 = deployments.iter().map(|d| d.rpm).sum();
            Some((rpm as f64 / per_replica).ceil().max(1.0))
        } else {
            None
        };
        let mut schedules = Vec::new();
        if let Some(spec) = meta.get("minBacklogSchedule") {
            for window in spec.split(';').map(str::trim).filter(|w| !w.is_empty()) {
                let bad = |reason: String| MetadataError::Schedule { window: window.to_owned(), reason };
                let (cron, floor) = window.rsplit_once('=').ok_or_else(|| bad("not `cron=N`".into()))?;
                let cron = Cron::parse(cron.trim()).map_err(|e| bad(e.to_string()))?;
                let floor: f64 = floor.trim().parse().map_err(|_| bad(format!("`{floor}` is not a number")))?;
                schedules.push((cron, floor));
            }
        }
        for s in config.scaler.schedules.iter().filter(|s| s.pool == pool_name) {
            if let Ok(cron) = Cron::parse(&s.cron) {
                schedules.push((cron, s.min_backlog as f64));
            }
        }
        let metric_name = meta.get("metricName").cloned().unwrap_or_else(|| {
            let tenant = meta.get("tenant").map(|t| format!("-{t}")).unwrap_or_default();
            format!("sluice-backlog-{}{tenant}", pool.subject_token())
        });
        Ok(Self {
            pool: pool_name.to_owned(),
            pool_token: pool.subject_token(),
            tenant,
            target,
            activation,
            max_useful_replicas,
            schedules,
            metric_name,
        })
    }

    /// The metric for a measured `backlog` at time `now`: capped at what the
    /// provider can absorb, then raised to an open window's floor.
    pub fn metric(&self, backlog: u64, now: &Civil) -> f64 {
        let mut value = backlog as f64;
        if let Some(replicas) = self.max_useful_replicas {
            value = value.min(replicas * self.target);
        }
        for (cron, floor) in &self.schedules {
            if cron.matches(now) {
                value = value.max(*floor);
            }
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::config::PoolConfig;

    fn config() -> Config {
        let mut c = Config::default();
        let mut p = PoolConfig::single("chat.v1", "http://127.0.0.1:9/v1");
        p.rpm = 600;
        c.pools = vec![p];
        c
    }

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_and_errors() {
        let s = Selection::parse(&meta(&[("pool", "chat.v1")]), &config()).unwrap();
        assert_eq!((s.target, s.activation, s.metric_name.as_str()), (10.0, 0.0, "sluice-backlog-chat_v1"));
        assert!(Selection::parse(&meta(&[]), &config()).unwrap_err().to_string().contains("pool"));
        assert!(Selection::parse(&meta(&[("pool", "nope")]), &config()).unwrap_err().to_string().contains("nope"));
        let bad = meta(&[("pool", "chat.v1"), ("targetBacklogPerReplica", "lots")]);
        assert!(Selection::parse(&bad, &config()).unwrap_err().to_string().contains("targetBacklogPerReplica"));
        let no_rate = meta(&[("pool", "chat.v1"), ("capacityAware", "true")]);
        assert!(Selection::parse(&no_rate, &config()).unwrap_err().to_string().contains("callsPerMinutePerReplica"));
    }

    #[test]
    fn capacity_caps_and_schedules_raise() {
        // 600 rpm over 100 calls per replica-minute: 6 useful replicas × 5 = 30.
        let m = meta(&[
            ("pool", "chat.v1"),
            ("targetBacklogPerReplica", "5"),
            ("capacityAware", "true"),
            ("callsPerMinutePerReplica", "100"),
            ("minBacklogSchedule", "* 7 * * 0=12; 0 9 * * 1=99"),
        ]);
        let s = Selection::parse(&m, &config()).unwrap();
        let sunday_7am = Civil::from_unix(1_795_330_801);
        let sunday_8am = Civil::from_unix(1_795_330_801 + 3600);
        assert_eq!(s.metric(500, &sunday_8am), 30.0);
        assert_eq!(s.metric(3, &sunday_8am), 3.0);
        assert_eq!(s.metric(3, &sunday_7am), 12.0, "the open window's floor");
    }
}
