//! `neopro-ingestor`: thin shell around the `ingestor` library.

use std::time::Duration;

use clap::Parser;
use ingestor::settings::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::tls::install_crypto_provider();
    let cli = Cli::parse();
    let settings = cli.load()?;
    runtime::telemetry::init(settings.log_format);
    match cli.command {
        None | Some(Command::Run) => {
            let shutdown = runtime::shutdown::on_signal(Duration::from_secs(settings.drain_deadline_secs + 5));
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                mqtt_url = %settings.mqtt_url,
                http_addr = %settings.http_addr,
                client_id = %settings.client_id,
                topic_prefix = %settings.topic_prefix,
                receipts_mqtt_url = ?settings.receipts_mqtt_url.as_ref().map(ToString::to_string),
                credentials = ?settings.credentials,
                legacy_http_unauthenticated = settings.legacy_http_unauthenticated,
                writers = settings.writers,
                batch_max_messages = settings.batch_max_messages,
                batch_max_rows = settings.batch_max_rows,
                batch_max_age_ms = settings.batch_max_age_ms,
                "neopro-ingestor starting"
            );
            let app = ingestor::App::build(settings).await?;
            app.run(shutdown).await
        }
        Some(Command::Migrate) => ingestor::migrate_command(&settings).await,
    }
}
