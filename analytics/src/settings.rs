//! Configuration of `neopro-analytics`: defaults < config file
//! (`--config`, else `/etc/neopro/analytics.toml` when present) <
//! `NEOPRO_ANALYTICS__*` environment variables < flags (which also read their
//! documented environment names such as `DATABASE_URL`, `NEOPRO_HTTP_ADDR`,
//! `NEOPRO_API_TOKENS`).

use clap::{Args, Parser, Subcommand};
use runtime::telemetry::LogFormat;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything the service needs. API tokens are secrets: `Debug` redacts them.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// PostgreSQL URL (the database the ingestor fills).
    pub database_url: String,
    /// HTTP listen address (port 0 picks a free port).
    pub http_addr: SocketAddr,
    /// Bearer tokens accepted on `/api/*` and the exports. At least one is
    /// required: sponsor data is confidential.
    #[serde(deserialize_with = "tokens")]
    pub api_tokens: Vec<String>,
    pub log_format: LogFormat,
    /// Connections in the pool (each running playout export holds one).
    pub db_max_connections: u32,
    /// Apply pending migrations at start (the schema crate's, shared by all
    /// binaries; idempotent).
    pub migrate: bool,
    /// Per-request timeout for the JSON/CSV/PDF endpoints, seconds
    /// (the streamed playout export is not bounded by it).
    pub request_timeout_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: runtime::db::DEFAULT_DATABASE_URL.to_owned(),
            http_addr: "0.0.0.0:8081".parse().expect("static address"),
            api_tokens: Vec::new(),
            log_format: LogFormat::Human,
            db_max_connections: 16,
            migrate: true,
            request_timeout_secs: 30,
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &redact_url(&self.database_url))
            .field("http_addr", &self.http_addr)
            .field("api_tokens", &format_args!("<{} set>", self.api_tokens.len()))
            .field("log_format", &self.log_format)
            .field("db_max_connections", &self.db_max_connections)
            .field("migrate", &self.migrate)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .finish()
    }
}

/// A database URL without its password, for logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Tokens from a TOML list or a comma-separated string (env/flag).
fn tokens<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum T {
        List(Vec<String>),
        One(String),
    }
    Ok(match T::deserialize(d)? {
        T::List(v) => v,
        T::One(s) => split_tokens(&s),
    })
    .map(|v: Vec<String>| {
        v.into_iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect()
    })
}

pub fn split_tokens(s: &str) -> Vec<String> {
    s.split(',')
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

/// `neopro-analytics` command line.
#[derive(Debug, Parser)]
#[command(
    name = "neopro-analytics",
    version,
    about = "NeoPro sponsor analytics: stats API, exports, dashboard"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// TOML configuration file (default /etc/neopro/analytics.toml when present).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// HTTP listen address (default 0.0.0.0:8081).
    #[arg(long, env = "NEOPRO_HTTP_ADDR", global = true)]
    pub http_addr: Option<String>,
    /// Comma-separated bearer tokens accepted by the API and the exports.
    #[arg(long, env = "NEOPRO_API_TOKENS", global = true, hide_env_values = true)]
    pub api_tokens: Option<String>,
    /// Log format: human|json.
    #[arg(long, env = "NEOPRO_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API, exports and dashboard (the default).
    Serve,
    /// Import a sponsor catalogue (CSV or TOML, by extension) into the database.
    ImportCatalogue {
        /// The catalogue file (`.csv` or `.toml`).
        file: PathBuf,
    },
    /// Apply pending database migrations and exit.
    Migrate,
}

impl CommonArgs {
    /// Loads the settings from file, environment and these flags.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let mut s: Settings = runtime::settings::load(
            self.config.as_deref(),
            Some(std::path::Path::new("/etc/neopro/analytics.toml")),
            "NEOPRO_ANALYTICS",
            &[
                ("database_url", self.database_url.clone()),
                ("http_addr", self.http_addr.clone()),
                ("log_format", self.log_format.clone()),
            ],
        )?;
        if let Some(t) = &self.api_tokens {
            s.api_tokens = split_tokens(t);
        }
        Ok(s)
    }
}
