//! Command-line administration: `migrate`, `create-key`, `revoke-key`,
//! `set-webhook`.

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

/// How long the previous secret keeps signing after `set-webhook` rotates it.
const ROTATION_OVERLAP: &str = "24 hours";

/// Sets the tenant's default webhook endpoint with a new secret, printed
/// once. Run again, it rotates: the previous secret keeps signing (a second
/// signature) for 24 hours, so receivers can switch without losing events.
pub async fn set_webhook(config: &Config, tenant: &str, url: &str) -> Result<String, String> {
    sluice_core::webhook::check_target(url, config.webhooks.policy()).await.map_err(|e| e.to_string())?;
    let secret = sluice_core::webhook::new_secret().map_err(|e| e.to_string())?;
    let pool = db::connect(&config.database).await.map_err(|e| e.to_string())?;
    let tenant_id = db::tenant_id(&pool, tenant).await.map_err(|e| e.to_string())?;
    sqlx::query(
        "INSERT INTO webhook_endpoints (tenant_id, url, secret) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id) DO UPDATE SET url = EXCLUDED.url, secret = EXCLUDED.secret, disabled_at = NULL,
             previous_secret = webhook_endpoints.secret,
             previous_expires_at = now() + $4::interval",
    )
    .bind(tenant_id)
    .bind(url)
    .bind(&secret)
    .bind(ROTATION_OVERLAP)
    .execute(&pool)
    .await
    .map_err(|e| e.to_string())?;
    println!("tenant:  {tenant}");
    println!("url:     {url}");
    println!("secret:  {secret}");
    println!("(the secret is shown only now; deliveries are signed with it)");
    Ok(secret)
}
