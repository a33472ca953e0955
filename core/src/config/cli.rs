//! The command line every Sluice server binary shares:
//! `[--config FILE] | --help`, then the config loaded from that file (or
//! `SLUICE_CONFIG`) and `SLUICE__…` variables.

use std::process::ExitCode;

use super::{Config, EXIT_BAD_CONFIG};

/// Reads the arguments of `program`; `Err` carries the exit code after the
/// usage or the configuration error was printed (`--help` exits 0).
pub fn from_args(program: &str, usage: &str) -> Result<Config, ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let file = match args.as_slice() {
        [] => std::env::var("SLUICE_CONFIG").ok(),
        [flag, file] if flag == "--config" => Some(file.clone()),
        [flag] if flag == "--help" || flag == "-h" => {
            println!("{usage}");
            return Err(ExitCode::SUCCESS);
        }
        _ => {
            eprintln!("{usage}");
            return Err(ExitCode::from(EXIT_BAD_CONFIG as u8));
        }
    };
    Config::load(file.as_deref().map(std::path::Path::new), std::env::vars()).map_err(|error| {
        eprintln!("{program}: bad configuration: {error}");
        ExitCode::from(EXIT_BAD_CONFIG as u8)
    })
}
