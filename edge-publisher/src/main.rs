//! `neopro-edge`: thin shell around the `edge_publisher` library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_publisher::commands::{self, ExportFormat};
use edge_publisher::{App, Settings};
use runtime::telemetry::LogFormat;
use std::path::PathBuf;
use std::time::Duration;

/// The NeoPro edge publisher: receives the TV's plays on :3000, keeps them on
/// disk until the centre confirms them, publishes them over MQTT.
#[derive(Debug, Parser)]
#[command(name = "neopro-edge", version, about)]
struct Cli {
    /// Configuration file (TOML); the default is read only when present.
    #[arg(long, global = true, env = "NEOPRO_EDGE_CONFIG")]
    config: Option<PathBuf>,
    /// This box's site id (the seed's SITE_ID).
    #[arg(long, global = true, env = "SITE_ID")]
    site_id: Option<String>,
    /// Broker URL: mqtt://[user[:password]@]host[:port] or mqtts://…
    #[arg(long, global = true, env = "NEOPRO_MQTT_URL")]
    mqtt_url: Option<String>,
    /// Directory of the outbox (default ~/neopro/data).
    #[arg(long, global = true, env = "NEOPRO_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP listen address (default 0.0.0.0:3000; "off" disables HTTP).
    #[arg(long, global = true, env = "NEOPRO_HTTP_ADDR")]
    http_addr: Option<String>,
    /// MQTT topic prefix (default neopro).
    #[arg(long, global = true, env = "NEOPRO_TOPIC_PREFIX")]
    topic_prefix: Option<String>,
    /// Origins allowed to call the HTTP API from a browser, comma-separated:
    /// scheme://host, scheme://host:port, or scheme://host:* for any port
    /// (default http://localhost:*,http://neopro.local:*).
    #[arg(long, global = true, env = "NEOPRO_EDGE_CORS_ORIGINS")]
    cors_origins: Option<String>,
    /// Log format: human or json.
    #[arg(long, global = true, env = "NEOPRO_LOG_FORMAT")]
    log_format: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the service (the default).
    Run,
    /// Import the seed's legacy buffer file (JSON array or {"impressions":[…]}).
    Import {
        file: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Outbox statistics, read from the file (works with or without the service).
    Status,
    /// Dump the outbox (unconfirmed impressions) as CSV or JSON.
    Export {
        #[arg(long, value_enum, default_value = "json")]
        format: ExportFormat,
        /// Output file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

const DEFAULT_CONFIG: &str = "/etc/neopro/edge.toml";

fn load_settings(cli: &Cli) -> anyhow::Result<Settings> {
    let data_dir = cli.data_dir.as_ref().map(|p| p.display().to_string());
    runtime::settings::load(
        cli.config.as_deref(),
        Some(std::path::Path::new(DEFAULT_CONFIG)),
        "NEOPRO_EDGE",
        &[
            ("site_id", cli.site_id.clone()),
            ("mqtt_url", cli.mqtt_url.clone()),
            ("data_dir", data_dir),
            ("http_addr", cli.http_addr.clone()),
            ("topic_prefix", cli.topic_prefix.clone()),
            ("cors_origins", cli.cors_origins.clone()),
            ("log_format", cli.log_format.clone()),
        ],
    )
}

fn main() -> anyhow::Result<()> {
    runtime::tls::install_crypto_provider();
    let cli = Cli::parse();
    let format: LogFormat = cli
        .log_format
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?
        .unwrap_or_default();
    runtime::telemetry::init(format);
    // A small runtime: the box has 4 cores at most and the work is I/O-bound.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(real_main(cli))
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        None | Some(Cmd::Run) => {
            let settings = load_settings(&cli)?;
            let drain = Duration::from_secs(settings.shutdown_drain_s);
            let shutdown = runtime::shutdown::on_signal(drain);
            let app = App::build(settings).await?;
            if let Some(a) = app.http_addr() {
                tracing::info!(http = %a, "listening");
            }
            app.run(shutdown).await
        }
        Some(Cmd::Import { file, json }) => {
            let settings = load_settings(&cli)?;
            let r = commands::import(&settings, file, !json).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("records in file:  {}", r.records);
                println!("imported:         {}", r.imported);
                println!("already present:  {}", r.already_present);
                println!("refused:          {}", r.refused.len());
                for reason in &r.refused {
                    println!("  {reason}");
                }
            }
            Ok(())
        }
        Some(Cmd::Status) => {
            let mut settings = load_settings(&cli)?;
            settings.site_id = String::new();
            let v = commands::status(&settings)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Some(Cmd::Export { format, out }) => {
            let settings = load_settings(&cli)?;
            let n = match out {
                Some(p) => {
                    let tmp = p.with_extension("partial");
                    let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
                    let mut w = std::io::BufWriter::new(f);
                    let n = commands::export(&settings, *format, &mut w)?;
                    let f = w.into_inner().map_err(|e| e.into_error())?;
                    f.sync_all()?;
                    std::fs::rename(&tmp, p)?;
                    n
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut w = std::io::BufWriter::new(stdout.lock());
                    commands::export(&settings, *format, &mut w)?
                }
            };
            eprintln!("exported {n} impressions");
            Ok(())
        }
    }
}
