//! `sluice-admin [--config FILE] COMMAND`: the operator's command line, for
//! the database the whole deployment shares (schema, tenants, API keys,
//! webhook endpoints). See `sluice-admin --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sluice_core::config::{Config, EXIT_BAD_CONFIG};
use sluice_ingress::admin::{self, AdminError, TenantOptions};
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "sluice-admin",
    version,
    about = "Administers a Sluice deployment: schema, tenants, API keys, webhooks"
)]
#[command(after_help = "Configuration: the TOML file named by --config or SLUICE_CONFIG, \
    then SLUICE__SECTION__KEY variables (only [database], [tenants] and [webhooks] are used).")]
struct Cli {
    /// The configuration file (else SLUICE_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Applies the database migrations.
    Migrate,
    /// Tenants: their scheduling weight, tier and limits.
    #[command(subcommand)]
    Tenants(Tenants),
    /// API keys: shown once when created, stored only as a digest.
    #[command(subcommand)]
    Keys(Keys),
    /// A tenant's default webhook endpoint.
    #[command(subcommand)]
    Webhooks(Webhooks),
}

#[derive(Subcommand)]
enum Tenants {
    /// Every tenant, with the settings that apply to it.
    List,
    /// One tenant's settings and live keys.
    Show { name: String },
    /// Sets a tenant's weight, tier and limits (creating it if needed);
    /// `default` goes back to the config's [tenants] value, 0 is no limit.
    Set {
        name: String,
        #[command(flatten)]
        options: SetOptions,
    },
}

#[derive(Args)]
struct SetOptions {
    /// Scheduling weight (1..=1000).
    #[arg(long, value_name = "N|default")]
    weight: Option<String>,
    /// Priority tier: interactive, normal or batch.
    #[arg(long, value_name = "TIER|default")]
    tier: Option<String>,
    /// Jobs queued at once.
    #[arg(long, value_name = "N|default")]
    max_queued: Option<String>,
    /// Jobs running at once over all workers.
    #[arg(long, value_name = "N|default")]
    max_in_flight: Option<String>,
    /// Requests per minute.
    #[arg(long, value_name = "N|default")]
    rpm: Option<String>,
    /// Tokens per minute.
    #[arg(long, value_name = "N|default")]
    tpm: Option<String>,
}

#[derive(Subcommand)]
enum Keys {
    /// Creates a key for a tenant (and the tenant if needed); prints it once.
    Create {
        #[arg(long)]
        tenant: String,
    },
    /// Keys, newest first: live ones, of every tenant or of one.
    List {
        #[arg(long)]
        tenant: Option<String>,
        /// Revoked keys too.
        #[arg(long)]
        all: bool,
    },
    /// One key: its tenant, prefix, creation and revocation.
    Show { id: Uuid },
    /// Revokes a key; it stops working within `ingress.auth_refresh_ms`.
    Revoke { id: Uuid },
}

#[derive(Subcommand)]
enum Webhooks {
    /// Sets a tenant's default endpoint with a new signing secret, printed
    /// once; run again, it rotates (the previous secret signs for 24 hours).
    Set {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        url: String,
    },
    /// Prints a new line for the keyring file (`webhooks.secret_keys_file`):
    /// the id and 32 random bytes in base64. Put it first to make it the key
    /// that seals (see the README's webhook section for a rotation).
    NewKey {
        /// The key's id (letters, digits, `-`, `_`); by default `k` and today's date.
        #[arg(long)]
        id: Option<String>,
    },
    /// Seals every stored webhook secret with the keyring's first key (those
    /// in clear or under an older key); workers also do this when they start.
    Reseal,
}

impl From<SetOptions> for TenantOptions {
    fn from(o: SetOptions) -> Self {
        TenantOptions {
            weight: o.weight,
            tier: o.tier,
            max_queued: o.max_queued,
            max_in_flight: o.max_in_flight,
            rpm: o.rpm,
            tpm: o.tpm,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = cli.config.or_else(|| std::env::var_os("SLUICE_CONFIG").map(PathBuf::from));
    let config = match Config::load(file.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(error) => {
            eprintln!("sluice-admin: bad configuration: {error}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    sluice_core::telemetry::init_logging(&config.log);
    let done = match cli.command {
        Command::Migrate => admin::migrate(&config).await,
        Command::Tenants(Tenants::List) => admin::list_tenants(&config).await,
        Command::Tenants(Tenants::Show { name }) => admin::show_tenant(&config, &name).await,
        Command::Tenants(Tenants::Set { name, options }) => admin::set_tenant(&config, &name, options.into()).await,
        Command::Keys(Keys::Create { tenant }) => admin::create_key(&config, &tenant).await,
        Command::Keys(Keys::List { tenant, all }) => admin::list_keys(&config, tenant.as_deref(), all).await,
        Command::Keys(Keys::Show { id }) => admin::show_key(&config, id).await,
        Command::Keys(Keys::Revoke { id }) => admin::revoke_key(&config, id).await,
        Command::Webhooks(Webhooks::Set { tenant, url }) => {
            admin::set_webhook(&config, &tenant, &url).await.map(|_| ())
        }
        Command::Webhooks(Webhooks::NewKey { id }) => admin::new_webhook_key(id),
        Command::Webhooks(Webhooks::Reseal) => admin::reseal_webhook_secrets(&config).await,
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(error @ AdminError::Usage(_)) => {
            eprintln!("sluice-admin: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("sluice-admin: {error}");
            ExitCode::FAILURE
        }
    }
}
