//! Shared start-up of the binaries: configuration loading, logging, and exit codes.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, LogFormat};

/// Exit code of a bad configuration or bad arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a failure at run time.
pub const EXIT_FAILURE: u8 = 1;

/// Loads the configuration from `path` (if any) and the process environment.
pub fn load_config(path: Option<&Path>) -> Result<Config, crate::config::ConfigError> {
    Config::load(path, std::env::vars())
}

/// Installs the `tracing` subscriber. `RUST_LOG`, when set, overrides `log.filter`.
pub fn init_logging(config: &Config) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.filter.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Plain => builder.try_init(),
    };
}

/// Prints an error with its whole chain of causes and returns `code`.
pub fn report(err: &(dyn std::error::Error + 'static), code: u8) -> ExitCode {
    let mut message = format!("error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    eprintln!("{message}");
    ExitCode::from(code)
}
