//! `neopro-sim bench` end to end at a small scale: boxes in this process, and
//! boxes spread over child `box-host` processes (how 10,000 sessions fit
//! under a 20,000-descriptor limit). Two rounds each (the second resumes
//! the first's broker sessions with new boxes and a new ingestor); every
//! round ends with the exactly-once check; figures are printed, never
//! asserted.

use clap::Parser;
use simulator::cli::{Cli, Command};
use uuid::Uuid;

async fn bench(broker: &str, extra: &[&str]) {
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| runtime::db::DEFAULT_DATABASE_URL.into());
    let database = format!("neopro_bench_test_{}", Uuid::new_v4().simple());
    let mut argv = vec![
        "neopro-sim",
        "bench",
        "--database-url",
        &server,
        "--database",
        &database,
        "--broker",
        broker,
        "--sites",
        "12",
        "--plays-per-site",
        "30",
        "--steady-secs",
        "1",
        "--timeout-secs",
        "120",
        "--rounds",
        "2",
        "--box-host-exe",
        env!("CARGO_BIN_EXE_neopro-sim"),
    ];
    argv.extend_from_slice(extra);
    let Command::Bench(args) = Cli::try_parse_from(argv).expect("flags parse").command else {
        panic!("not the bench subcommand");
    };
    let exact = simulator::bench::run(args).await.expect("bench ran");
    let url = simulator::pg::with_database(&server, &database).unwrap();
    let _ = simulator::pg::drop_database(&url).await;
    assert!(exact, "every played impression stored exactly once, every outbox empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boxes_in_this_process_on_the_embedded_broker() {
    bench("embedded", &["--box-processes", "0"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boxes_in_three_child_processes_on_mosquitto() {
    bench("mqtt://127.0.0.1:1883", &["--box-processes", "3"]).await;
}

/// The default bench's broker checks one account per box: boxes in child
/// processes derive their passwords from the secret the parent hands them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boxes_in_two_child_processes_on_the_embedded_broker_with_accounts() {
    bench("embedded", &["--box-processes", "2"]).await;
}
