//! The fault suite (bounded for CI): under a steady stream of plays, one
//! fault each, then every played impression is in PostgreSQL exactly once
//! and every outbox is empty. `neopro-sim soak` runs the same, larger.

use simulator::faults::{self, Fault, Scale};
use std::sync::Once;

static BUILD: Once = Once::new();

/// The scenarios kill real `neopro-edge` / `neopro-ingestor` / `neopro-broker`
/// processes: make sure this profile has them (`cargo test -p simulator`
/// alone does not build other packages' binaries; build them when missing).
fn ensure_binaries() {
    BUILD.call_once(|| {
        // `cargo test --workspace` (CI) has built them already; building again
        // with another package selection would rebuild dependencies with other
        // features, so only build what is missing.
        let dir = faults::bin_dir();
        if ["neopro-edge", "neopro-ingestor", "neopro-broker"]
            .iter()
            .all(|b| dir.join(b).exists())
        {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut c = std::process::Command::new(cargo);
        c.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).args([
            "build",
            "-p",
            "edge-publisher",
            "-p",
            "ingestor",
            "-p",
            "broker",
            "--bins",
        ]);
        if faults::bin_dir().file_name().is_some_and(|n| n == "release") {
            c.arg("--release");
        }
        assert!(c.status().expect("cargo build").success(), "building the binaries");
    });
}

async fn scenario(f: Fault) {
    ensure_binaries();
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| runtime::db::DEFAULT_DATABASE_URL.into());
    let o = faults::run(f, &server, &Scale::ci()).await.expect("scenario ran");
    println!("{}\n{}", faults::Outcome::header(), o.row());
    assert_eq!(o.lost, 0, "{}", o.detail);
    assert_eq!(o.duplicates, 0, "{}", o.detail);
    assert_eq!(o.stored, o.played, "{}", o.detail);
    assert_eq!(o.outboxes_unconfirmed, 0, "{}", o.detail);
    assert!(o.exact, "{}", o.detail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_kill9_mid_stream() {
    scenario(Fault::EdgeKill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingestor_kill9_mid_stream() {
    scenario(Fault::IngestorKill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_sessions() {
    scenario(Fault::BrokerRestart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_terminated() {
    scenario(Fault::PgTerminate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_log_overflow_while_ingestor_away() {
    scenario(Fault::BrokerLogOverflow).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_offline_with_long_backlog() {
    scenario(Fault::EdgeOfflineBacklog).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_deliveries() {
    scenario(Fault::DuplicateDeliveries).await;
}
