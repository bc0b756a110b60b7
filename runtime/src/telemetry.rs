//! Logging through `tracing`: human-readable by default, JSON on request.
//!
//! The filter comes from `RUST_LOG` when set (e.g. `RUST_LOG=ingestor=debug`),
//! else `info`. Logs go to stderr so that commands whose stdout is data
//! (`export`, benchmarks) stay pipeable.

use serde::Deserialize;
use tracing_subscriber::{fmt, EnvFilter};

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "human" | "text" | "pretty" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format '{other}', expected human|json")),
        }
    }
}

/// Installs the global subscriber. Safe to call more than once (tests): later
/// calls are ignored.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
