//! The fault suite (bounded for CI): under a steady stream of plays, one
//! fault each, then every played impression is in PostgreSQL exactly once
//! and every outbox is empty. `neopro-sim soak` runs the same, larger.

use simulator::faults::{self, Fault, Scale};

/// The scenarios kill real `neopro-edge` / `neopro-ingestor` /
/// `neopro-broker` processes. Those are other packages' binaries, which
/// Cargo does not build for this package's tests (no `CARGO_BIN_EXE_` for
/// them), and a test must not run Cargo itself: they come prebuilt, from
/// `NEOPRO_BIN_DIR` or next to this test's profile directory
/// (`target/<profile>/`), which `cargo build --workspace --bins` (run by
/// `scripts/test.sh` before the tests) fills. Missing ones fail the test.
fn require_binaries() {
    let dir = faults::bin_dir();
    let missing: Vec<&str> = ["neopro-edge", "neopro-ingestor", "neopro-broker"]
        .into_iter()
        .filter(|b| !dir.join(b).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "{missing:?} not in {}: build them first (`cargo build --workspace --bins`, as scripts/test.sh does), or set NEOPRO_BIN_DIR",
        dir.display()
    );
}

async fn scenario(f: Fault) {
    if f.spawns_processes() {
        require_binaries();
    }
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| runtime::db::DEFAULT_DATABASE_URL.into());
    let o = faults::run(f, &server, &Scale::ci()).await.expect("scenario ran");
    println!("{}\n{}\n{}", faults::Outcome::header(), o.row(), o.note);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_site_attacks_the_others_mid_stream() {
    scenario(Fault::RogueSite).await;
}
