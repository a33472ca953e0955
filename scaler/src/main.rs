//! `sluice-scaler [--config FILE]`

use std::process::ExitCode;

const USAGE: &str = "usage: sluice-scaler [--config FILE]

Serves KEDA's external scaler protocol (gRPC, externalscaler.ExternalScaler)
on scaler.listen, with /healthz, /readyz and /metrics on scaler.ops_listen.
Configuration: the TOML file named by --config or SLUICE_CONFIG, then
SLUICE__SECTION__KEY variables.";

#[tokio::main]
async fn main() -> ExitCode {
    let config = match sluice_core::config::cli::from_args("sluice-scaler", USAGE) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(error) = config.scaler.check_transport() {
        eprintln!("sluice-scaler: {error}");
        return ExitCode::from(sluice_core::config::EXIT_BAD_CONFIG as u8);
    }
    sluice_core::telemetry::init_logging(&config.log);
    let shutdown = sluice_core::shutdown::on_signal();
    let (grpc, ops) = (config.scaler.listen, config.scaler.ops_listen);
    let listeners = match (tokio::net::TcpListener::bind(grpc).await, tokio::net::TcpListener::bind(ops).await) {
        (Ok(g), Ok(o)) => (g, o),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("sluice-scaler: cannot listen on {grpc} or {ops}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let server = match sluice_scaler::server::Server::build(config).await {
        Ok(s) => s,
        Err(error) => {
            eprintln!("sluice-scaler: {error}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(%grpc, %ops, "scaler running");
    let listeners = sluice_scaler::server::Listeners { grpc: listeners.0, ops: Some(listeners.1) };
    match server.run(listeners, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice-scaler: {error}");
            ExitCode::FAILURE
        }
    }
}
