//! `neopro-analytics`: thin shell around the library (see `lib.rs`).

use analytics::settings::{Cli, Command};
use analytics::App;
use anyhow::Context;
use clap::Parser;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    runtime::tls::install_crypto_provider();
    let cli = Cli::parse();
    let settings = cli.common.settings()?;
    runtime::telemetry::init(settings.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                tracing::info!(settings = ?settings, "starting neopro-analytics");
                let shutdown = runtime::shutdown::on_signal(Duration::from_secs(30));
                App::build(settings).await?.run(shutdown).await
            }
            Command::Migrate => {
                let pool = runtime::db::connect(&settings.database_url, 2).await?;
                runtime::db::migrate(&pool).await?;
                println!("migrations applied");
                Ok(())
            }
            Command::ImportCatalogue { file } => {
                let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                let format = match file
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(|e| e.to_ascii_lowercase())
                {
                    Some(e) if e == "csv" => analytics::catalogue::CatalogueFormat::Csv,
                    Some(e) if e == "toml" => analytics::catalogue::CatalogueFormat::Toml,
                    _ => anyhow::bail!("{}: the catalogue must be a .csv or .toml file", file.display()),
                };
                let cat = analytics::catalogue::parse_catalogue(&text, format).map_err(|e| anyhow::anyhow!("{e}"))?;
                let pool = runtime::db::connect(&settings.database_url, 2).await?;
                if settings.migrate {
                    runtime::db::migrate(&pool).await?;
                }
                let r = analytics::catalogue::import(&pool, &cat)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                println!(
                    "imported {}: {} sponsors in file, {} sponsors created/renamed, {} rules created/moved",
                    file.display(),
                    cat.sponsors.len(),
                    r.sponsors,
                    r.rules
                );
                Ok(())
            }
        }
    })
}
