//! `sluice-ingress [--config FILE] [serve]`: the HTTP ingress. The older
//! administration subcommands are still accepted and run the same code as
//! `sluice-admin`, which is where they live now.

use std::process::ExitCode;

use sluice_core::config::{Config, EXIT_BAD_CONFIG};
use sluice_ingress::Ingress;
use sluice_ingress::admin::{self, AdminError, TenantOptions};
use sluice_ingress::startup::Listeners;

const USAGE: &str = "usage: sluice-ingress [--config FILE] [serve]

  serve      run the HTTP ingress (the default)

Administration is `sluice-admin` (see `sluice-admin --help`). Its older
forms here still work: migrate, create-key --tenant NAME, revoke-key KEY_ID,
set-webhook --tenant NAME --url URL, set-tenant --tenant NAME [--weight N]
[--tier T] [--max-queued N] [--max-in-flight N] [--rpm N] [--tpm N].

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
        // The older administration commands, as `sluice-admin` runs them.
        ["migrate"] => admin::migrate(&config).await.map_err(|e| e.to_string()),
        ["create-key", "--tenant", tenant] => admin::create_key(&config, tenant).await.map_err(|e| e.to_string()),
        ["set-webhook", "--tenant", tenant, "--url", url] => {
            admin::set_webhook(&config, tenant, url).await.map(|_| ()).map_err(|e| e.to_string())
        }
        ["set-tenant", "--tenant", tenant, options @ ..] => match TenantOptions::from_flags(options) {
            Ok(o) => admin::set_tenant(&config, tenant, o).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        ["revoke-key", id] => match id.parse() {
            Ok(id) => admin::revoke_key(&config, id).await.map_err(|e| match e {
                AdminError::NoKey(id) | AdminError::Revoked(id) => format!("no live key with id {id}"),
                other => other.to_string(),
            }),
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
    let ops = match config.ingress.ops_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let ingress = Ingress::build(config).await.map_err(|e| e.to_string())?;
    let addr = http.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, "ingress listening");
    ingress.run(Listeners { http, admin, ops }, shutdown).await.map_err(|e| e.to_string())?;
    tracing::info!("ingress stopped");
    Ok(())
}
