//! # `simulator` (`neopro-sim`): the whole NeoPro chain, runnable, measurable, proven under faults
//!
//! * [`catalogue`] and [`plays`]: a seeded, realistic fleet of club TV boxes.
//! * [`pg`]: the bench/demo database, the raw COPY baseline, the per-sponsor
//!   summary and the exactly-once check, all read back from PostgreSQL.
//! * [`fleet`]: the real pipeline in-process (embedded broker or any MQTT URL,
//!   the ingestor App, N edge Apps with their SQLite outboxes).
//! * [`hosts`]: the boxes in this process, or in child processes when one
//!   process cannot hold their file descriptors (10,000 sessions).
//! * [`faults`]: the fault scenarios (CI suite and `soak`); [`rogue`]: a site
//!   account that attacks the others (`rogue_site`, the attack tests).
//! * [`credentials`]: a run's broker accounts, hashed at test cost.
//! * [`demo`], [`bench`], [`soak`], [`feed`]: the subcommands; [`cli`]: their flags.
//! * [`benches`]: each service's own benchmark (`bench-edge`, `bench-broker`,
//!   `bench-ingestor`, `bench-analytics`).
pub mod bench;
pub mod benches;
pub mod catalogue;
pub mod cli;
pub mod cpu;
pub mod credentials;
pub mod demo;
pub mod faults;
pub mod feed;
pub mod fleet;
pub mod hosts;
pub mod pg;
pub mod plays;
pub mod rogue;
pub mod soak;

/// Logs to stderr at `warn` (rumqttd off: it logs every client disconnect as
/// an error) unless `RUST_LOG` says otherwise: the simulator's
/// own output (progress, tables, the bench line) is on stdout.
pub fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,rumqttd=off"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        b.json().try_init()
    } else {
        b.try_init()
    };
}
