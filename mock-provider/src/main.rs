//! `sluice-mock-provider [--listen ADDR] [--latency-ms N] [--completion-tokens N] [--rpm N] [--tpm N] [--error-rate F] [--hang-rate F]`

use sluice_mock_provider::{Settings, run};

const USAGE: &str = "usage: sluice-mock-provider [--listen ADDR] [--latency-ms N] [--completion-tokens N] [--rpm N] [--tpm N] [--error-rate F] [--hang-rate F]";

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let listen = args.windows(2).find(|w| w[0] == "--listen").map_or("127.0.0.1:8090", |w| w[1].as_str());
    let settings = match Settings::from_args(&args) {
        Ok(s) => s,
        Err(message) => {
            eprintln!("sluice-mock-provider: {message}\n{USAGE}");
            std::process::exit(64);
        }
    };
    tracing_subscriber::fmt().with_env_filter("info").init();
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(error) => {
            eprintln!("sluice-mock-provider: cannot listen on {listen}: {error}");
            std::process::exit(1);
        }
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let trigger = shutdown.clone();
    #[allow(
        clippy::disallowed_methods,
        reason = "the mock stands in for a provider, not a Sluice service: its one task is this signal listener"
    )]
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => t.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        trigger.cancel();
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, ?settings, "mock provider listening");
    }
    if let Err(error) = run(listener, settings, shutdown).await {
        eprintln!("sluice-mock-provider: {error}");
        std::process::exit(1);
    }
}
