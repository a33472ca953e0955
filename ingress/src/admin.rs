//! Command-line administration: `migrate`, `create-key`, `revoke-key`,
//! `set-webhook`, `set-tenant`.

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

/// Sets the tenant's default webhook endpoint with a new secret, printed
/// once. Run again, it rotates: the previous secret keeps signing (a second
/// signature) for 24 hours, so receivers can switch without losing events.
pub async fn set_webhook(config: &Config, tenant: &str, url: &str) -> Result<String, String> {
    sluice_core::webhook::check_target(url, config.webhooks.policy()).await.map_err(|e| e.to_string())?;
    let secret = sluice_core::webhook::new_secret().map_err(|e| e.to_string())?;
    let pool = db::connect(&config.database).await.map_err(|e| e.to_string())?;
    let tenant_id = db::tenant_id(&pool, tenant).await.map_err(|e| e.to_string())?;
    db::webhooks::set_endpoint(&pool, tenant_id, url, &secret).await.map_err(|e| e.to_string())?;
    println!("tenant:  {tenant}");
    println!("url:     {url}");
    println!("secret:  {secret}");
    println!("(the secret is shown only now; deliveries are signed with it)");
    Ok(secret)
}

/// Parses `set-tenant` options: `--weight N`, `--tier T`, `--max-queued N`, `--max-in-flight N`,
/// `--rpm N`, `--tpm N`; the value `default` goes back to the config default.
pub fn tenant_changes(options: &[&str]) -> Result<db::TenantChanges, String> {
    use db::Setting;
    let mut changes = db::TenantChanges {
        weight: Setting::Keep,
        tier: Setting::Keep,
        max_queued: Setting::Keep,
        max_in_flight: Setting::Keep,
        rpm: Setting::Keep,
        tpm: Setting::Keep,
    };
    fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<Setting<T>, String> {
        if value == "default" {
            return Ok(Setting::Default);
        }
        value.parse().map(Setting::Value).map_err(|_| format!("{flag} needs a number or `default`, not `{value}`"))
    }
    let mut rest = options;
    while let [flag, value, tail @ ..] = rest {
        match *flag {
            "--weight" => changes.weight = number(flag, value)?,
            "--max-queued" => changes.max_queued = number(flag, value)?,
            "--max-in-flight" => changes.max_in_flight = number(flag, value)?,
            "--rpm" => changes.rpm = number(flag, value)?,
            "--tpm" => changes.tpm = number(flag, value)?,
            "--tier" if *value == "default" => changes.tier = Setting::Default,
            "--tier" => {
                sluice_core::wire::envelope::Class::parse(value)
                    .ok_or_else(|| format!("--tier must be interactive, normal, batch or default, not `{value}`"))?;
                changes.tier = Setting::Value((*value).to_owned());
            }
            other => return Err(format!("unknown option `{other}`")),
        }
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(format!("`{}` needs a value", rest[0]));
    }
    Ok(changes)
}

/// Sets a tenant's weight, tier and limits (creating the tenant if needed)
/// and prints what now applies, defaults filled in.
pub async fn set_tenant(config: &Config, tenant: &str, options: &[&str]) -> Result<(), String> {
    let changes = tenant_changes(options)?;
    let pool = db::connect(&config.database).await.map_err(|e| e.to_string())?;
    let row = db::set_tenant(&pool, tenant, &changes).await.map_err(|e| e.to_string())?;
    let policy = sluice_core::tenant::TenantPolicy::resolve(&row, &config.tenants);
    let shown = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |v| v.to_string());
    println!("tenant:     {} ({})", row.name, row.id);
    println!("weight:     {}", policy.weight);
    println!("tier:       {}", policy.tier.as_str());
    println!("max queued: {}", shown(policy.max_queued));
    println!("max in flight: {}", shown(policy.max_in_flight));
    println!("rpm:        {}", shown(policy.rpm));
    println!("tpm:        {}", shown(policy.tpm));
    println!("(ingresses and workers pick this up within their reload intervals)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::tenant_changes;
    use sluice_core::db::Setting;

    #[test]
    fn set_tenant_options_parse() {
        let c = tenant_changes(&["--weight", "4", "--rpm", "default", "--tier", "batch"]).unwrap();
        assert_eq!(c.weight, Setting::Value(4));
        assert_eq!(c.rpm, Setting::Default);
        assert_eq!(c.tier, Setting::Value("batch".into()));
        assert_eq!(c.tpm, Setting::Keep);
        assert!(tenant_changes(&["--weight"]).is_err());
        assert!(tenant_changes(&["--tier", "urgent"]).is_err());
        assert!(tenant_changes(&["--colour", "red"]).is_err());
    }
}
