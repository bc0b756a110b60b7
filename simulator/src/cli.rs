//! `neopro-sim` command line. Every flag that has an environment name shows
//! it in `--help`; the compose file check reads these definitions.

use clap::{Args, Parser, Subcommand};

use crate::fleet::BrokerChoice;
use crate::plays::DEFAULT_SEED;

/// `neopro-sim`: the whole NeoPro chain in one command (demo), its
/// benchmark (bench) and its fault soak (soak).
#[derive(Debug, Parser)]
#[command(name = "neopro-sim", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Embedded broker + ingestor + N simulated TV boxes; prints the
    /// per-sponsor summary read back from PostgreSQL and checks that what was
    /// played is what is stored, exactly once. Exit code 0 only then.
    Demo(DemoArgs),
    /// End-to-end throughput and play-to-commit latency of the fleet, with a
    /// raw COPY of the same rows into the same table as the baseline.
    Bench(BenchArgs),
    /// Runs the fault scenarios (longer than the CI suite) and prints a table:
    /// scenario, played, stored, duplicates, lost, recovery time.
    Soak(SoakArgs),
    /// A TV frontend: posts seeded, realistic plays to a running neopro-edge's
    /// `POST /api/sync/sponsor-impressions`, stamped with the current time.
    Feed(FeedArgs),
    /// The edge's benchmark: a `neopro-edge` binary's POST throughput, drain
    /// rate, RSS and size, vs the seed's JSON file.
    BenchEdge(crate::benches::edge::BenchArgs),
    /// The broker's benchmark: QoS 1 messages/s through neopro-broker and
    /// through Mosquitto.
    BenchBroker(crate::benches::broker::BenchArgs),
    /// The ingestor's benchmark: publish N impressions through a broker,
    /// measure committed rows/s and commit latency, compare with a raw COPY
    /// of the same rows.
    BenchIngestor(crate::benches::ingestor::BenchIngestorArgs),
    /// The analytics' benchmark: load a realistic year into a bench database
    /// and measure the stats endpoint (cold/warm), a baseline, the playout
    /// export and the rollup fold.
    BenchAnalytics(crate::benches::analytics::BenchAnalyticsArgs),
    /// Internal: holds a range of `bench` boxes in a child process (the
    /// protocol is in `simulator::hosts`); not for operators.
    #[command(hide = true)]
    BoxHost,
}

#[derive(Debug, Args, Clone)]
pub struct FeedArgs {
    /// The box's base URL.
    #[arg(long, env = "NEOPRO_SIM_EDGE_URL", default_value = "http://127.0.0.1:3000")]
    pub edge_url: String,
    /// The box's site id (only used to vary the generated plays).
    #[arg(long, env = "SITE_ID", default_value = "club-demo-1")]
    pub site_id: String,
    /// Plays per second.
    #[arg(long, env = "NEOPRO_SIM_RATE", default_value_t = 2.0)]
    pub rate: f64,
    /// Plays per POST (the seed's frontend flushes in small batches).
    #[arg(long, default_value_t = 10)]
    pub chunk: usize,
    /// Stop after this many plays (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    pub plays: u64,
    /// Seed of the play generator.
    #[arg(long, env = "NEOPRO_SIM_SEED", default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Log format: human|json.
    #[arg(long, env = "NEOPRO_LOG_FORMAT", default_value = "human")]
    pub log_format: String,
}

/// Where and what to simulate (shared by every subcommand).
#[derive(Debug, Args, Clone)]
pub struct FleetArgs {
    /// PostgreSQL server URL; its database name is replaced by --database
    /// [default: postgres://postgres@127.0.0.1:5432/neopro].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Broker: `embedded` (our rumqttd in this process) or a URL such as
    /// mqtt://127.0.0.1:1883 (a unique topic prefix is used per run).
    #[arg(long, env = "NEOPRO_SIM_BROKER", default_value = "embedded")]
    pub broker: BrokerChoice,
    /// Seed of the play generator (same seed and end day: same plays).
    #[arg(long, env = "NEOPRO_SIM_SEED", default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Plays end before this UTC day (YYYY-MM-DD) [default: today].
    #[arg(long)]
    pub end_day: Option<chrono::NaiveDate>,
    /// Reuse the database instead of dropping and re-creating it (the check
    /// stays scoped to this run's sites; `bench` empties its impression and
    /// rollup tables before each round, since it replays the same plays).
    #[arg(long)]
    pub keep_database: bool,
    /// Log format of the embedded services: human|json.
    #[arg(long, env = "NEOPRO_LOG_FORMAT", default_value = "human")]
    pub log_format: String,
}

#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Simulated TV boxes.
    #[arg(long, default_value_t = 20)]
    pub sites: usize,
    /// Plays per box (the default is about a week of a club's plays, so the
    /// summary shows the last weekend's matches whatever day it runs).
    #[arg(long, default_value_t = crate::plays::DEMO_PLAYS_PER_SITE)]
    pub plays_per_site: usize,
    /// Database the demo (re)creates on the server of DATABASE_URL.
    #[arg(long, env = "NEOPRO_SIM_DATABASE", default_value = "neopro_demo")]
    pub database: String,
    /// The plays are handed to the boxes over this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub feed_secs: f64,
    /// Boxes publish a partial batch after this delay (ms).
    #[arg(long, default_value_t = 500)]
    pub batch_delay_ms: u64,
    /// Give up (exit 1 with the diff) after this many seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout_secs: u64,
}

#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Simulated TV boxes (connected sessions).
    #[arg(long, default_value_t = 1_000)]
    pub sites: usize,
    /// Plays per box in each box's outbox when the clock starts.
    #[arg(long, default_value_t = 200)]
    pub plays_per_site: usize,
    /// Database the bench (re)creates on the server of DATABASE_URL.
    #[arg(long, env = "NEOPRO_SIM_DATABASE", default_value = "neopro_bench")]
    pub database: String,
    /// Length of the steady-load phase that measures latency (seconds; 0 skips it).
    #[arg(long, default_value_t = 15.0)]
    pub steady_secs: f64,
    /// Steady-load rate in plays/s [default: a fifth of the measured e2e rate].
    #[arg(long)]
    pub steady_rate: Option<f64>,
    /// Boxes publish a partial batch after this delay (ms).
    #[arg(long, default_value_t = 200)]
    pub batch_delay_ms: u64,
    /// Impressions per envelope.
    #[arg(long, default_value_t = 500)]
    pub batch_max_impressions: usize,
    /// Rounds of burst and baseline, each on a re-created database; the
    /// last line reports the medians (the steady phase runs in the last).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Rows per COPY statement of the baseline.
    #[arg(long, default_value_t = 50_000)]
    pub copy_chunk: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    /// Child processes holding the boxes (0: in this process, beside the
    /// broker and the ingestor) [default: 1 while every box's file
    /// descriptors fit in one process under its open-file limit, else as
    /// many as needed].
    #[arg(long)]
    pub box_processes: Option<usize>,
    /// Run the embedded broker without accounts, its topic ACL off. By
    /// default it checks a credentials file with one account per box and
    /// the ingestor's, so every box connects as its own site, as in
    /// production (a broker named by URL keeps its own accounts).
    #[arg(long)]
    pub anonymous: bool,
    /// The `neopro-sim` executable the box processes run [default: this one].
    #[arg(long, hide = true)]
    pub box_host_exe: Option<std::path::PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub struct SoakArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Database the soak (re)creates on the server of DATABASE_URL.
    #[arg(long, env = "NEOPRO_SIM_DATABASE", default_value = "neopro_soak")]
    pub database: String,
    /// Scale of every scenario (1 = the CI sizes; 5 = five times the plays).
    #[arg(long, default_value_t = 5)]
    pub scale: usize,
    /// Only these scenarios (comma-separated names; default: all but the
    /// opt-in `pg_restart`, which restarts the local PostgreSQL server).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

impl FleetArgs {
    pub fn server_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| runtime::db::DEFAULT_DATABASE_URL.to_owned())
    }

    pub fn end_day(&self) -> chrono::NaiveDate {
        self.end_day.unwrap_or_else(|| chrono::Utc::now().date_naive())
    }
}
