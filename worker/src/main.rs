//! `sluice-worker [--config FILE]`

use std::process::ExitCode;

use sluice_core::config::EXIT_BAD_CONFIG;
use sluice_worker::{Worker, startup::StartError};

const USAGE: &str = "usage: sluice-worker [--config FILE]

Runs the job executor and the ledger loop. Configuration: the TOML file named
by --config or SLUICE_CONFIG, then SLUICE__SECTION__KEY variables.";

#[tokio::main]
async fn main() -> ExitCode {
    let config = match sluice_core::config::cli::from_args("sluice-worker", USAGE) {
        Ok(c) => c,
        Err(code) => return code,
    };
    sluice_core::telemetry::init_logging(&config.log);
    let shutdown = sluice_core::shutdown::on_signal();
    let ops_addr = config.worker.ops_listen;
    let ops = match tokio::net::TcpListener::bind(ops_addr).await {
        Ok(l) => l,
        Err(error) => {
            eprintln!("sluice-worker: cannot listen on {ops_addr}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let worker = match Worker::build(config, |name| std::env::var(name).ok()).await {
        Ok(w) => w,
        Err(StartError::Config(error)) => {
            eprintln!("sluice-worker: bad configuration: {error}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
        Err(StartError::Keys(error)) => {
            eprintln!("sluice-worker: bad configuration: {error}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
        Err(error) => {
            eprintln!("sluice-worker: {error}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(ops = %ops_addr, "worker running");
    match worker.run(Some(ops), shutdown).await {
        Ok(()) => {
            tracing::info!("worker stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("sluice-worker: {error}");
            ExitCode::FAILURE
        }
    }
}
