//! `neopro-sim`: thin shell around the `simulator` library.

use clap::Parser;
use simulator::cli::{Cli, Command};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    runtime::tls::install_crypto_provider();
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Demo(a) => a.fleet.log_format.clone(),
        Command::Bench(a) => a.fleet.log_format.clone(),
        Command::Soak(a) => a.fleet.log_format.clone(),
        Command::Feed(a) => a.log_format.clone(),
        Command::BenchEdge(_) | Command::BenchBroker(_) => "human".to_owned(),
        Command::BenchIngestor(a) => a.ingestor.log_format.clone().unwrap_or_else(|| "human".to_owned()),
        Command::BenchAnalytics(a) => a.analytics.log_format.clone().unwrap_or_else(|| "human".to_owned()),
        Command::BoxHost => "human".to_owned(),
    };
    simulator::init_logging(&log_format);
    let result = match cli.command {
        Command::Demo(a) => simulator::demo::run(a).await,
        Command::Bench(a) => simulator::bench::run(a).await,
        Command::Soak(a) => simulator::soak::run(a).await,
        Command::Feed(a) => simulator::feed::run(a).await,
        Command::BenchEdge(a) => simulator::benches::edge::run(a).await.map(|()| true),
        Command::BenchBroker(a) => simulator::benches::broker::run(a).await.map(|_| true),
        Command::BenchIngestor(a) => simulator::benches::ingestor::run(a).await.map(|()| true),
        Command::BenchAnalytics(a) => simulator::benches::analytics::run(a).await.map(|()| true),
        Command::BoxHost => simulator::hosts::serve().await.map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("neopro-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}
