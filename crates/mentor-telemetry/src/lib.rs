//! The one tracing initialiser of the project's binaries: `RUST_LOG` overrides the `info`
//! default, logs go to stderr, colours only on a terminal, JSON lines with `--log-format json`.

use std::io::IsTerminal;

/// Log output formats a binary accepts on `--log-format`.
pub const LOG_FORMATS: [&str; 2] = ["text", "json"];

/// Installs the global subscriber; `format` is `text` or `json`.
pub fn init(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
