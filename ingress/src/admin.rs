//! Command-line administration: `migrate`, `create-key`, `revoke-key`.

use sluice_core::config::Config;
use sluice_core::db;
use uuid::Uuid;

pub async fn migrate(config: &Config) -> Result<(), db::DbError> {
    let pool = db::connect(&config.database).await?;
    db::migrate(&pool).await?;
    println!("migrations applied");
    Ok(())
}

/// Creates the tenant if needed and a new key for it, printed once.
pub async fn create_key(config: &Config, tenant: &str) -> Result<(), db::DbError> {
    let pool = db::connect(&config.database).await?;
    let tenant_id = db::ensure_tenant(&pool, tenant).await?;
    let key = db::create_key(&pool, tenant_id).await?;
    println!("tenant:  {tenant} ({tenant_id})");
    println!("key id:  {}", key.id);
    println!("api key: {}", key.key.expose());
    println!("(the key is shown only now; Sluice stores only its SHA-256 digest)");
    Ok(())
}

pub async fn revoke_key(config: &Config, key_id: Uuid) -> Result<bool, db::DbError> {
    let pool = db::connect(&config.database).await?;
    db::revoke_key(&pool, key_id).await
}
