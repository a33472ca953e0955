//! `sluice-ingress [--config FILE] [serve | migrate | create-key … | revoke-key … | set-webhook … | set-tenant …]`

use std::process::ExitCode;

use sluice_core::config::{Config, EXIT_BAD_CONFIG};
use sluice_ingress::startup::Listeners;
use sluice_ingress::{Ingress, admin};

const USAGE: &str = "usage: sluice-ingress [--config FILE] [COMMAND]

  serve                                  run the HTTP ingress (default)
  migrate                                apply the database migrations
  create-key --tenant NAME               create a tenant if needed and print a new API key for it, once
  revoke-key KEY_ID                      revoke an API key by its id
  set-webhook --tenant NAME --url URL    set a tenant's default webhook endpoint; prints its signing secret, once
  set-tenant --tenant NAME [--weight N] [--tier interactive|normal|batch] [--max-queued N]
             [--max-in-flight N] [--rpm N] [--tpm N]
                                         set a tenant's scheduling weight, tier and limits (0: no limit,
                                         `default`: the config's [tenants] value)

Configuration: the TOML file named by --config or SLUICE_CONFIG, then SLUICE__SECTION__KEY variables.";

#[tokio::main]
async fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let mut file = std::env::var("SLUICE_CONFIG").ok();
    if let Some(i) = args.iter().position(|a| a == "--config") {
        if i + 1 >= args.len() {
            eprintln!("sluice-ingress: --config needs a file\n{USAGE}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
        file = Some(args.remove(i + 1));
        args.remove(i);
    }
    let config = match Config::load(file.as_deref().map(std::path::Path::new), std::env::vars()) {
        Ok(c) => c,
        Err(error) => {
            eprintln!("sluice-ingress: bad configuration: {error}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    sluice_core::telemetry::init_logging(&config.log);
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let outcome = match words.as_slice() {
        [] | ["serve"] => serve(config).await,
        ["migrate"] => admin::migrate(&config).await.map_err(|e| e.to_string()),
        ["create-key", "--tenant", tenant] => admin::create_key(&config, tenant).await.map_err(|e| e.to_string()),
        ["set-webhook", "--tenant", tenant, "--url", url] => admin::set_webhook(&config, tenant, url).await.map(|_| ()),
        ["set-tenant", "--tenant", tenant, options @ ..] => admin::set_tenant(&config, tenant, options).await,
        ["revoke-key", id] => match id.parse() {
            Ok(id) => match admin::revoke_key(&config, id).await {
                Ok(true) => {
                    println!("revoked");
                    Ok(())
                }
                Ok(false) => Err(format!("no live key with id {id}")),
                Err(e) => Err(e.to_string()),
            },
            Err(_) => Err(format!("`{id}` is not a key id")),
        },
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("sluice-ingress: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), String> {
    let shutdown = sluice_core::shutdown::on_signal();
    let bind = |addr| async move {
        tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let http = bind(config.ingress.listen).await?;
    // (the config refuses admin.listen without admin.token)
    let admin = match config.admin.listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let ingress = Ingress::build(config).await.map_err(|e| e.to_string())?;
    let addr = http.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, "ingress listening");
    ingress.run(Listeners { http, admin }, shutdown).await.map_err(|e| e.to_string())?;
    tracing::info!("ingress stopped");
    Ok(())
}
