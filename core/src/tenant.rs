//! A tenant's scheduling weight, priority tier and admission limits: its own
//! values from Postgres where set, else the `[tenants]` defaults of the config.

use uuid::Uuid;

use crate::config::TenantDefaults;
use crate::wire::envelope::Class;

/// Largest weight a tenant may have; bounds how far one tenant's share can
/// exceed another's.
pub const MAX_WEIGHT: u32 = 1000;

/// A tenant's row in Postgres; `None` takes the config default, `Some(0)`
/// for a limit means no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantRow {
    pub id: Uuid,
    pub name: String,
    pub weight: Option<i32>,
    pub tier: Option<String>,
    pub max_queued: Option<i64>,
    pub max_in_flight: Option<i64>,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
}

/// What the ingress and the workers apply to a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPolicy {
    pub name: String,
    pub weight: u32,
    pub tier: Class,
    /// `None`: no limit.
    pub max_queued: Option<u64>,
    /// Jobs of the tenant running at once over all workers.
    pub max_in_flight: Option<u64>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

fn limit(own: Option<i64>, default: u64) -> Option<u64> {
    let value = own.map_or(default, |v| v.max(0) as u64);
    (value > 0).then_some(value)
}

impl TenantPolicy {
    pub fn resolve(row: &TenantRow, defaults: &TenantDefaults) -> Self {
        let default_tier = Class::parse(&defaults.tier).unwrap_or(Class::Interactive);
        Self {
            name: row.name.clone(),
            weight: row.weight.map_or(defaults.weight, |w| w.clamp(1, MAX_WEIGHT as i32) as u32),
            tier: row.tier.as_deref().and_then(Class::parse).unwrap_or(default_tier),
            max_queued: limit(row.max_queued, defaults.max_queued),
            max_in_flight: limit(row.max_in_flight, defaults.max_in_flight),
            rpm: limit(row.rpm, defaults.rpm),
            tpm: limit(row.tpm, defaults.tpm),
        }
    }

    /// The policy of a tenant not (yet) known from Postgres.
    pub fn defaults(defaults: &TenantDefaults) -> Self {
        Self::resolve(&TenantRow::default(), defaults)
    }

    pub fn has_admission_limits(&self) -> bool {
        self.max_queued.is_some() || self.rpm.is_some() || self.tpm.is_some()
    }
}

/// A request's token estimate: about four bytes per prompt token (the body is
/// JSON, so this overestimates a little), plus the output it may produce.
pub fn estimate_tokens(body_len: usize, max_tokens: Option<u64>, default_max_tokens: u64) -> u64 {
    (body_len as u64).div_ceil(4).saturating_add(max_tokens.unwrap_or(default_max_tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_values_override_defaults_and_zero_means_unlimited() {
        let defaults =
            TenantDefaults { weight: 2, tier: "normal".into(), max_queued: 100, max_in_flight: 0, rpm: 60, tpm: 0 };
        let row = TenantRow { weight: Some(4), rpm: Some(0), tpm: Some(1000), ..TenantRow::default() };
        let p = TenantPolicy::resolve(&row, &defaults);
        assert_eq!(p.weight, 4);
        assert_eq!(p.tier, Class::Normal);
        assert_eq!(p.max_queued, Some(100));
        assert_eq!(p.rpm, None);
        assert_eq!(p.tpm, Some(1000));
        assert!(!TenantPolicy::defaults(&TenantDefaults::default()).has_admission_limits());
    }

    #[test]
    fn estimate_counts_prompt_and_output() {
        assert_eq!(estimate_tokens(400, Some(50), 256), 150);
        assert_eq!(estimate_tokens(1, None, 256), 257);
    }
}
