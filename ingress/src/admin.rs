//! The operator's commands, shared by `sluice-admin` and the older
//! `sluice-ingress` subcommands: the schema, tenants, API keys and webhook
//! endpoints in Postgres. Each prints what it did; secrets only once.

use sluice_core::clock::Civil;
use sluice_core::config::Config;
use sluice_core::db::{self, KeyInfo, Setting, TenantChanges};
use sluice_core::tenant::{TenantPolicy, TenantRow};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Db(db::DbError),
    #[error("webhook endpoint refused: {0}")]
    Webhook(#[from] sluice_core::webhook::WebhookError),
    /// The command line is wrong (exit code 2).
    #[error("{0}")]
    Usage(String),
    #[error("no tenant named `{0}`")]
    NoTenant(String),
    #[error("no key with id {0}")]
    NoKey(Uuid),
    #[error("key {0} is already revoked")]
    Revoked(Uuid),
    #[error(transparent)]
    Keys(#[from] sluice_core::seal::SealError),
}

impl From<db::DbError> for AdminError {
    fn from(e: db::DbError) -> Self {
        match e {
            db::DbError::NoTenant(name) => AdminError::NoTenant(name),
            other => AdminError::Db(other),
        }
    }
}

async fn connect(config: &Config) -> Result<sqlx::PgPool, AdminError> {
    Ok(db::connect(&config.database).await?)
}

pub async fn migrate(config: &Config) -> Result<(), AdminError> {
    db::migrate(&connect(config).await?).await?;
    println!("migrations applied");
    Ok(())
}

/// A tenant setting as typed: a number (or tier), or `default`.
#[derive(Debug, Default, Clone)]
pub struct TenantOptions {
    pub weight: Option<String>,
    pub tier: Option<String>,
    pub max_queued: Option<String>,
    pub max_in_flight: Option<String>,
    pub rpm: Option<String>,
    pub tpm: Option<String>,
}

impl TenantOptions {
    /// Reads `--weight N`, `--tier T`, `--max-queued N`, `--max-in-flight N`,
    /// `--rpm N`, `--tpm N` pairs (the older `sluice-ingress set-tenant`).
    pub fn from_flags(options: &[&str]) -> Result<Self, AdminError> {
        let mut o = Self::default();
        let mut rest = options;
        while let [flag, value, tail @ ..] = rest {
            let slot = match *flag {
                "--weight" => &mut o.weight,
                "--tier" => &mut o.tier,
                "--max-queued" => &mut o.max_queued,
                "--max-in-flight" => &mut o.max_in_flight,
                "--rpm" => &mut o.rpm,
                "--tpm" => &mut o.tpm,
                other => return Err(AdminError::Usage(format!("unknown option `{other}`"))),
            };
            *slot = Some((*value).to_owned());
            rest = tail;
        }
        if let [flag] = rest {
            return Err(AdminError::Usage(format!("`{flag}` needs a value")));
        }
        Ok(o)
    }

    /// The changes to apply: `default` goes back to the config's value.
    pub fn changes(&self) -> Result<TenantChanges, AdminError> {
        fn number<T: std::str::FromStr>(flag: &str, value: &Option<String>) -> Result<Setting<T>, AdminError> {
            match value.as_deref() {
                None => Ok(Setting::Keep),
                Some("default") => Ok(Setting::Default),
                Some(v) => v
                    .parse()
                    .map(Setting::Value)
                    .map_err(|_| AdminError::Usage(format!("--{flag} needs a number or `default`, not `{v}`"))),
            }
        }
        let tier = match self.tier.as_deref() {
            None => Setting::Keep,
            Some("default") => Setting::Default,
            Some(v) => {
                sluice_core::wire::envelope::Class::parse(v).ok_or_else(|| {
                    AdminError::Usage(format!("--tier must be interactive, normal, batch or default, not `{v}`"))
                })?;
                Setting::Value(v.to_owned())
            }
        };
        Ok(TenantChanges {
            weight: number("weight", &self.weight)?,
            tier,
            max_queued: number("max-queued", &self.max_queued)?,
            max_in_flight: number("max-in-flight", &self.max_in_flight)?,
            rpm: number("rpm", &self.rpm)?,
            tpm: number("tpm", &self.tpm)?,
        })
    }
}

fn unlimited(v: Option<u64>) -> String {
    v.map_or_else(|| "unlimited".to_owned(), |v| v.to_string())
}

fn print_tenant(row: &TenantRow, policy: &TenantPolicy) {
    println!("tenant:        {} ({})", row.name, row.id);
    println!("weight:        {}", policy.weight);
    println!("tier:          {}", policy.tier.as_str());
    println!("max queued:    {}", unlimited(policy.max_queued));
    println!("max in flight: {}", unlimited(policy.max_in_flight));
    println!("rpm:           {}", unlimited(policy.rpm));
    println!("tpm:           {}", unlimited(policy.tpm));
}

/// Sets a tenant's weight, tier and limits (creating the tenant if needed)
/// and prints what now applies, defaults filled in.
pub async fn set_tenant(config: &Config, tenant: &str, options: TenantOptions) -> Result<(), AdminError> {
    let changes = options.changes()?;
    let row = db::set_tenant(&connect(config).await?, tenant, &changes).await?;
    print_tenant(&row, &TenantPolicy::resolve(&row, &config.tenants));
    println!("(ingresses and workers pick this up within their reload intervals)");
    Ok(())
}

/// Every tenant, one line each, with the settings that apply to it.
pub async fn list_tenants(config: &Config) -> Result<(), AdminError> {
    let mut rows = db::tenants(&connect(config).await?).await?;
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    println!(
        "{:<36}  {:<24}  {:>6}  {:<11}  {:>10}  {:>10}  {:>10}  {:>12}",
        "id", "name", "weight", "tier", "max queued", "in flight", "rpm", "tpm"
    );
    for row in &rows {
        let p = TenantPolicy::resolve(row, &config.tenants);
        println!(
            "{:<36}  {:<24}  {:>6}  {:<11}  {:>10}  {:>10}  {:>10}  {:>12}",
            row.id,
            row.name,
            p.weight,
            p.tier.as_str(),
            unlimited(p.max_queued),
            unlimited(p.max_in_flight),
            unlimited(p.rpm),
            unlimited(p.tpm)
        );
    }
    println!("({} tenants)", rows.len());
    Ok(())
}

/// One tenant's settings and its live keys.
pub async fn show_tenant(config: &Config, name: &str) -> Result<(), AdminError> {
    let pool = connect(config).await?;
    let row = db::tenant(&pool, name).await?.ok_or_else(|| AdminError::NoTenant(name.to_owned()))?;
    print_tenant(&row, &TenantPolicy::resolve(&row, &config.tenants));
    let keys = db::keys(&pool, Some(row.id), false).await?;
    println!("live keys:     {}", keys.len());
    for key in &keys {
        println!("  {}  {}…  created {}", key.id, key.prefix, when(key.created_at));
    }
    Ok(())
}

/// Creates the tenant if needed and a new key for it, printed once.
pub async fn create_key(config: &Config, tenant: &str) -> Result<(), AdminError> {
    let pool = connect(config).await?;
    let tenant_id = db::ensure_tenant(&pool, tenant).await?;
    let key = db::create_key(&pool, tenant_id).await?;
    println!("tenant:  {tenant} ({tenant_id})");
    println!("key id:  {}", key.id);
    println!("api key: {}", key.key.expose());
    println!("(the key is shown only now; Sluice stores only its SHA-256 digest)");
    Ok(())
}

fn when(unix_s: i64) -> String {
    let c = Civil::from_unix(unix_s.max(0) as u64);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", c.year, c.month, c.day, c.hour, c.minute, c.second)
}

fn print_key_line(k: &KeyInfo) {
    let revoked = k.revoked_at.map_or_else(|| "-".to_owned(), when);
    println!(
        "{:<36}  {:<24}  {:<17}  {:<20}  {}",
        k.id,
        k.tenant,
        format!("{}…", k.prefix),
        when(k.created_at),
        revoked
    );
}

/// Keys, newest first: live ones (all with `all`), of one tenant or every one.
pub async fn list_keys(config: &Config, tenant: Option<&str>, all: bool) -> Result<(), AdminError> {
    let pool = connect(config).await?;
    let tenant_id = match tenant {
        Some(name) => Some(db::tenant_id(&pool, name).await?),
        None => None,
    };
    let keys = db::keys(&pool, tenant_id, all).await?;
    println!("{:<36}  {:<24}  {:<17}  {:<20}  revoked", "id", "tenant", "prefix", "created");
    for k in &keys {
        print_key_line(k);
    }
    println!("({} keys)", keys.len());
    Ok(())
}

/// One key: its tenant, prefix, creation and revocation (never the key).
pub async fn show_key(config: &Config, id: Uuid) -> Result<(), AdminError> {
    let k = db::key(&connect(config).await?, id).await?.ok_or(AdminError::NoKey(id))?;
    println!("key id:  {}", k.id);
    println!("tenant:  {} ({})", k.tenant, k.tenant_id);
    println!("prefix:  {}…", k.prefix);
    println!("created: {}", when(k.created_at));
    println!("revoked: {}", k.revoked_at.map_or_else(|| "no".to_owned(), when));
    Ok(())
}

/// Revokes a key; the ingresses stop accepting it within `ingress.auth_refresh_ms`.
pub async fn revoke_key(config: &Config, id: Uuid) -> Result<(), AdminError> {
    let pool = connect(config).await?;
    if db::revoke_key(&pool, id).await? {
        println!("revoked");
        return Ok(());
    }
    match db::key(&pool, id).await? {
        Some(_) => Err(AdminError::Revoked(id)),
        None => Err(AdminError::NoKey(id)),
    }
}

/// Sets the tenant's default webhook endpoint with a new secret, printed
/// once. Run again, it rotates: the previous secret keeps signing (a second
/// signature) for 24 hours, so receivers can switch without losing events.
pub async fn set_webhook(config: &Config, tenant: &str, url: &str) -> Result<String, AdminError> {
    sluice_core::webhook::check_target(url, config.webhooks.policy()).await?;
    let keys = config.webhooks.keyring()?;
    let secret = sluice_core::webhook::new_secret()?;
    let pool = connect(config).await?;
    let tenant_id = db::tenant_id(&pool, tenant).await?;
    let sealed = keys.seal(&sluice_core::seal::endpoint_place(tenant_id), &secret)?;
    db::webhooks::set_endpoint(&pool, tenant_id, url, &sealed).await?;
    println!("tenant:  {tenant}");
    println!("url:     {url}");
    println!("secret:  {secret}");
    println!("(the secret is shown only now; deliveries are signed with it)");
    Ok(secret)
}

/// Prints a new keyring line; its id defaults to `k` and today's date.
pub fn new_webhook_key(id: Option<String>) -> Result<(), AdminError> {
    let id = id.unwrap_or_else(|| {
        let today = sluice_core::clock::Civil::now();
        format!("k{:04}{:02}{:02}", today.year, today.month, today.day)
    });
    let line = sluice_core::seal::Keyring::new_key_line(&id)?;
    // Checked as the processes will read it (a bad id is refused now).
    sluice_core::seal::Keyring::parse(&line)?;
    println!("{line}");
    Ok(())
}

/// Seals every stored webhook secret with the keyring's first key.
pub async fn reseal_webhook_secrets(config: &Config) -> Result<(), AdminError> {
    let keys = config.webhooks.keyring()?;
    let pool = connect(config).await?;
    let done = db::webhooks::reseal(&pool, &keys).await?;
    println!("sealed again with key {}: {}", keys.current(), done.sealed);
    println!("would not open (left as they are): {}", done.unopenable);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::TenantOptions;
    use sluice_core::db::Setting;

    #[test]
    fn set_tenant_options_parse() {
        let o = TenantOptions::from_flags(&["--weight", "4", "--rpm", "default", "--tier", "batch"]).unwrap();
        let c = o.changes().unwrap();
        assert_eq!(c.weight, Setting::Value(4));
        assert_eq!(c.rpm, Setting::Default);
        assert_eq!(c.tier, Setting::Value("batch".into()));
        assert_eq!(c.tpm, Setting::Keep);
        assert!(TenantOptions::from_flags(&["--weight"]).is_err());
        assert!(TenantOptions::from_flags(&["--tier", "urgent"]).unwrap().changes().is_err());
        assert!(TenantOptions::from_flags(&["--weight", "heavy"]).unwrap().changes().is_err());
        assert!(TenantOptions::from_flags(&["--colour", "red"]).is_err());
    }
}
