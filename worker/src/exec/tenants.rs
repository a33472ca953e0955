//! The worker's view of the tenants: weight and tier for the fair scheduler,
//! name for metric labels (bounded by the tenants in Postgres, never taken
//! from a request), and limits for counter repair. Reloaded in the background.

use sluice_core::tasks::Tasks;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::config::TenantDefaults;
use sluice_core::db;
use sluice_core::tenant::TenantPolicy;
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

/// Label of a tenant not found in Postgres (deleted since it submitted).
const UNKNOWN: &str = "unknown";

#[derive(Clone)]
pub struct TenantBook {
    tenants: watch::Receiver<Arc<HashMap<Uuid, Arc<TenantPolicy>>>>,
    fallback: Arc<TenantPolicy>,
}

async fn load(db: &PgPool, defaults: &TenantDefaults) -> Result<HashMap<Uuid, Arc<TenantPolicy>>, db::DbError> {
    Ok(db::tenants(db).await?.iter().map(|row| (row.id, Arc::new(TenantPolicy::resolve(row, defaults)))).collect())
}

impl TenantBook {
    /// Loads the tenants once, then every `every` until `shutdown`.
    pub async fn start(
        db: PgPool,
        defaults: TenantDefaults,
        every: Duration,
        tasks: &Tasks,
    ) -> Result<Self, db::DbError> {
        let fallback = Arc::new(TenantPolicy { name: UNKNOWN.into(), ..TenantPolicy::defaults(&defaults) });
        let tenants = sluice_core::reload::start(
            every,
            tasks,
            move || {
                let (db, defaults) = (db.clone(), defaults.clone());
                async move { load(&db, &defaults).await }
            },
            |outcome: Result<&_, &db::DbError>| {
                if let Err(error) = outcome {
                    tracing::warn!(%error, "tenant reload failed; keeping the previous settings");
                }
            },
        )
        .await?;
        Ok(Self { tenants, fallback })
    }

    pub fn get(&self, tenant: Uuid) -> Arc<TenantPolicy> {
        self.tenants.borrow().get(&tenant).cloned().unwrap_or_else(|| self.fallback.clone())
    }

    /// Every tenant with a queued-jobs limit, for counter repair.
    pub fn capped(&self) -> Vec<Uuid> {
        self.tenants.borrow().iter().filter(|(_, p)| p.max_queued.is_some()).map(|(id, _)| *id).collect()
    }

    /// Every tenant with a running-jobs limit, for counter repair.
    pub fn capped_in_flight(&self) -> Vec<Uuid> {
        self.tenants.borrow().iter().filter(|(_, p)| p.max_in_flight.is_some()).map(|(id, _)| *id).collect()
    }
}
