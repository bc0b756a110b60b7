//! Settings: defaults < `--config FILE` (TOML) < `NEOPRO_INGESTOR__*`
//! environment variables < the named environment variables and flags
//! (`DATABASE_URL`, `NEOPRO_MQTT_URL`, `NEOPRO_HTTP_ADDR`, ...).
//!
//! Every field has a default so that `neopro-ingestor` runs with no
//! configuration on a machine of our kind.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use runtime::mqtt::MqttUrl;
use runtime::telemetry::LogFormat;
use serde::Deserialize;

/// Environment prefix for keys without a dedicated variable
/// (`NEOPRO_INGESTOR__BATCH_MAX_MESSAGES=32`).
pub const ENV_PREFIX: &str = "NEOPRO_INGESTOR";

/// The ingestor's settings. Build with [`Settings::default`] and adjust (tests,
/// the simulator) or load with [`Cli::load`] (the binary).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// PostgreSQL URL. The password is never logged (see the `Debug` impl).
    pub database_url: String,
    /// Broker URL (`mqtt://user:pass@host:port`, `mqtts://` for TLS).
    pub mqtt_url: MqttUrl,
    /// Broker URL of the receipts connection (`crate::receipts`), when it
    /// needs an account of its own: on a Mosquitto that binds client ids to
    /// usernames (`use_username_as_clientid`), two connections of one account
    /// take each other's session. Unset: `mqtt_url`, same credentials. With
    /// a username here, the connection's client id is `{username}:receipts`
    /// (the embedded broker's client-id rule); without, `{client_id}:receipts`.
    pub receipts_mqtt_url: Option<MqttUrl>,
    /// HTTP listen address (`/healthz`, `/readyz`, `/metrics`, the legacy API).
    pub http_addr: SocketAddr,
    pub log_format: LogFormat,
    /// MQTT client id: fixed, so the broker keeps our session across restarts.
    /// With the embedded broker's auth it must be the username or `<username>:<suffix>`.
    pub client_id: String,
    /// Topic prefix: we subscribe `{prefix}/sites/+/impressions`.
    pub topic_prefix: String,
    pub mqtt_keep_alive_secs: u64,
    /// Largest MQTT packet accepted from the broker (16 MiB). Above the
    /// envelope limit on purpose: an oversized envelope is dead-lettered, not
    /// a broken connection (which, the message being redelivered, would wedge
    /// the persistent session). It must stay above the largest packet any
    /// broker we run forwards: the embedded broker and the generated
    /// Mosquitto configuration accept `schema::mqtt::MAX_PACKET_BYTES` +
    /// 64 KiB (1,114,112 bytes); a Mosquitto left at its default (no limit)
    /// would forward up to 256 MiB, and a message above this limit would
    /// then break the connection at every redelivery.
    pub max_incoming_packet_bytes: usize,
    /// Largest envelope accepted; larger ones are dead-lettered (`oversized`).
    pub max_envelope_bytes: usize,
    /// A batch is sealed at this many messages... (128 since the broker's
    /// outbound window went from 100 to 400: at 64 the bench's batches held
    /// 12,800 rows and its ratio was 0.71-0.72 in runs where 128, capped by
    /// `batch_max_rows` at 20,000 rows, gave 0.76-0.88.)
    pub batch_max_messages: usize,
    /// ...or this many impressions...
    pub batch_max_rows: usize,
    /// ...or when its oldest message is this old (milliseconds). An idle
    /// pipeline seals at once, so low load adds no latency.
    pub batch_max_age_ms: u64,
    /// Seal at once when no batch is committing (no added latency at low load).
    pub seal_when_idle: bool,
    /// Batches committing concurrently (one database connection each).
    /// Two, not three: on the bench's two cores the writers' backends spent
    /// a quarter of their samples waiting on PostgreSQL's `WALWrite` lock
    /// (one backend writes or syncs the WAL, the others wait, the core
    /// idles), and a third writer added more of that wait than work. Six
    /// alternated `neopro-sim bench` runs, 2026-12-07: two writers beat three
    /// in five (e2e median 165k-175k rows/s against 154k-161k), the sixth
    /// tied; the steady p99 was unchanged.
    pub writers: usize,
    /// How rows are inserted: `copy` (optimistic COPY, falls back to
    /// `unnest` on a duplicate) or `unnest` (INSERT ... ON CONFLICT DO NOTHING).
    pub insert_method: crate::store::InsertMethod,
    /// Backoff between database retries.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// Apply migrations at start.
    pub migrate: bool,
    /// Monthly partitions created ahead (at start and daily).
    pub partitions_ahead_months: i32,
    /// Largest HTTP body accepted by `POST /api/analytics/impressions` (413
    /// above); 1 MiB, the MQTT packet limit (the seed's sync agent sends 100
    /// records per flush, about 30 KB).
    pub http_body_limit_bytes: usize,
    /// The accounts file (`runtime::credentials`, the broker's format):
    /// `POST /api/analytics/impressions` requires HTTP Basic `site:password`
    /// of a site account, the same password as its broker account. Re-read
    /// on SIGHUP and when its content changes.
    pub credentials: Option<PathBuf>,
    /// How often the credentials file is checked for changes, in seconds
    /// (0: only on SIGHUP).
    pub credentials_poll_secs: u64,
    /// Also accept `POST /api/analytics/impressions` without credentials, as
    /// the seed's sync agents send it (site from `X-Site-Id` or the body):
    /// an explicit opt-in for the migration, logged at WARN at start and
    /// shown as the gauge `ingestor_legacy_http_unauthenticated`. With
    /// neither this nor `credentials` the endpoint answers 401 to every POST.
    pub legacy_http_unauthenticated: bool,
    /// Seconds allowed for the drain at shutdown.
    pub drain_deadline_secs: u64,
    /// Run the MQTT pipeline (off: HTTP endpoint only).
    pub mqtt_enabled: bool,
    /// How often the daily and per-sponsor rollups are folded from their
    /// queues of deltas (`sponsor_rollups_fold()`), in milliseconds; 0 = never
    /// (readers still fold before they read).
    pub rollup_fold_interval_ms: u64,
    /// While the MQTT pipeline is saturated (messages wait behind a
    /// committing batch: a backlog draining), a fold is put off for at most
    /// this long since the previous one, in milliseconds; 0 = never put off
    /// (`crate::fold`).
    pub rollup_fold_defer_max_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: runtime::db::DEFAULT_DATABASE_URL.to_owned(),
            mqtt_url: "mqtt://127.0.0.1:1883".parse().expect("static URL"),
            receipts_mqtt_url: None,
            http_addr: "0.0.0.0:8080".parse().expect("static address"),
            log_format: LogFormat::Human,
            client_id: "ingestor".into(),
            topic_prefix: schema::mqtt::DEFAULT_PREFIX.into(),
            mqtt_keep_alive_secs: 30,
            max_incoming_packet_bytes: 16 * 1024 * 1024,
            max_envelope_bytes: schema::mqtt::DEFAULT_MAX_ENVELOPE_BYTES,
            batch_max_messages: 128,
            batch_max_rows: 20_000,
            batch_max_age_ms: 50,
            seal_when_idle: true,
            writers: 2,
            insert_method: crate::store::InsertMethod::Copy,
            retry_min_ms: 100,
            retry_max_ms: 10_000,
            migrate: true,
            partitions_ahead_months: 3,
            http_body_limit_bytes: 1024 * 1024,
            credentials: None,
            credentials_poll_secs: 2,
            legacy_http_unauthenticated: false,
            drain_deadline_secs: 20,
            mqtt_enabled: true,
            rollup_fold_interval_ms: 1000,
            rollup_fold_defer_max_ms: 5000,
        }
    }
}

/// `neopro-ingestor`: MQTT impression envelopes (and the seed's HTTP
/// endpoint) into PostgreSQL, every impression exactly once, with receipts.
#[derive(Debug, Parser)]
#[command(name = "neopro-ingestor", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Run,
    /// Apply the database migrations and create partitions ahead, then exit.
    Migrate,
}

/// Flags shared by every subcommand.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// TOML settings file (every key of the settings; see README).
    #[arg(long, global = true, env = "NEOPRO_INGESTOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL [default: postgres://postgres@127.0.0.1:5432/neopro].
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Broker URL, mqtt://user:pass@host:port or mqtts://... [default: mqtt://127.0.0.1:1883].
    #[arg(long, global = true, env = "NEOPRO_MQTT_URL", hide_env_values = true)]
    pub mqtt_url: Option<String>,
    /// Broker URL of the receipts connection, when it needs its own account
    /// [default: the --mqtt-url, same credentials].
    #[arg(long, global = true, env = "NEOPRO_RECEIPTS_MQTT_URL", hide_env_values = true)]
    pub receipts_mqtt_url: Option<String>,
    /// Accounts file (the broker's format): POST /api/analytics/impressions
    /// requires HTTP Basic site:password of a site account; reloaded on
    /// SIGHUP and when it changes.
    #[arg(long, global = true, env = "NEOPRO_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// Also accept POST /api/analytics/impressions without credentials (the
    /// seed's sync agents, during the migration; logged at WARN).
    #[arg(long, global = true, env = "NEOPRO_LEGACY_HTTP_UNAUTHENTICATED",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub legacy_http_unauthenticated: bool,
    /// HTTP listen address [default: 0.0.0.0:8080].
    #[arg(long, global = true, env = "NEOPRO_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Log format: human|json [default: human].
    #[arg(long, global = true, env = "NEOPRO_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// MQTT client id (fixed: the broker keeps our persistent session) [default: ingestor].
    #[arg(long, global = true, env = "NEOPRO_INGESTOR_CLIENT_ID")]
    pub client_id: Option<String>,
    /// Topic prefix; subscribes {prefix}/sites/+/impressions [default: neopro].
    #[arg(long, global = true, env = "NEOPRO_TOPIC_PREFIX")]
    pub topic_prefix: Option<String>,
    /// Seal a batch at this many messages [default: 128].
    #[arg(long, global = true, env = "NEOPRO_INGESTOR_BATCH_MAX_MESSAGES")]
    pub batch_max_messages: Option<usize>,
    /// Seal a batch at this many impressions [default: 20000].
    #[arg(long, global = true, env = "NEOPRO_INGESTOR_BATCH_MAX_ROWS")]
    pub batch_max_rows: Option<usize>,
    /// Seal a batch when its oldest message is this old, in ms [default: 50].
    #[arg(long, global = true, env = "NEOPRO_INGESTOR_BATCH_MAX_AGE_MS")]
    pub batch_max_age_ms: Option<u64>,
    /// Batches committing concurrently, one DB connection each [default: 2].
    #[arg(long, global = true, env = "NEOPRO_INGESTOR_WRITERS")]
    pub writers: Option<usize>,
    /// Insert method: copy|unnest [default: copy].
    #[arg(long, global = true, env = "NEOPRO_INGESTOR_INSERT_METHOD")]
    pub insert_method: Option<String>,
    /// Largest envelope accepted in bytes; larger ones are dead-lettered [default: 262144].
    #[arg(long, global = true, env = "NEOPRO_INGESTOR_MAX_ENVELOPE_BYTES")]
    pub max_envelope_bytes: Option<usize>,
    /// Seconds allowed to drain at shutdown [default: 20].
    #[arg(long, global = true, env = "NEOPRO_INGESTOR_DRAIN_DEADLINE_SECS")]
    pub drain_deadline_secs: Option<u64>,
    /// Do not apply migrations at start.
    #[arg(long, global = true)]
    pub no_migrate: bool,
}

impl Cli {
    /// Settings from the file, `NEOPRO_INGESTOR__*` variables, and flags.
    pub fn load(&self) -> anyhow::Result<Settings> {
        self.common.load()
    }
}

impl CommonArgs {
    /// Settings from the file, `NEOPRO_INGESTOR__*` variables, and these
    /// flags (what any command embedding the ingestor's flags runs).
    pub fn load(&self) -> anyhow::Result<Settings> {
        let c = self;
        let s = |v: &Option<usize>| v.map(|x| x.to_string());
        let overrides: Vec<(&str, Option<String>)> = vec![
            ("database_url", c.database_url.clone()),
            ("mqtt_url", c.mqtt_url.clone()),
            ("receipts_mqtt_url", c.receipts_mqtt_url.clone()),
            (
                "credentials",
                c.credentials.as_ref().map(|p| p.to_string_lossy().into_owned()),
            ),
            (
                "legacy_http_unauthenticated",
                c.legacy_http_unauthenticated.then(|| "true".to_owned()),
            ),
            ("http_addr", c.http_addr.clone()),
            ("log_format", c.log_format.clone()),
            ("client_id", c.client_id.clone()),
            ("topic_prefix", c.topic_prefix.clone()),
            ("batch_max_messages", s(&c.batch_max_messages)),
            ("batch_max_rows", s(&c.batch_max_rows)),
            ("batch_max_age_ms", c.batch_max_age_ms.map(|x| x.to_string())),
            ("writers", s(&c.writers)),
            ("insert_method", c.insert_method.clone()),
            ("max_envelope_bytes", s(&c.max_envelope_bytes)),
            ("drain_deadline_secs", c.drain_deadline_secs.map(|x| x.to_string())),
            ("migrate", c.no_migrate.then(|| "false".to_owned())),
        ];
        let settings: Settings = runtime::settings::load(
            c.config.as_deref(),
            Some(std::path::Path::new("/etc/neopro/ingestor.toml")),
            ENV_PREFIX,
            &overrides,
        )?;
        settings.validate()?;
        Ok(settings)
    }
}

impl Settings {
    /// Checks the values that would otherwise fail late.
    pub fn validate(&self) -> anyhow::Result<()> {
        schema::Topics::new(self.topic_prefix.clone()).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.writers >= 1, "writers must be >= 1");
        anyhow::ensure!(self.batch_max_messages >= 1, "batch_max_messages must be >= 1");
        anyhow::ensure!(self.batch_max_rows >= 1, "batch_max_rows must be >= 1");
        anyhow::ensure!(!self.client_id.is_empty(), "client_id must not be empty");
        Ok(())
    }
}

/// The database URL with its password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<invalid URL>".into(),
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &redact_url(&self.database_url))
            .field("mqtt_url", &self.mqtt_url)
            .field("receipts_mqtt_url", &self.receipts_mqtt_url)
            .field("credentials", &self.credentials)
            .field("legacy_http_unauthenticated", &self.legacy_http_unauthenticated)
            .field("http_addr", &self.http_addr)
            .field("log_format", &self.log_format)
            .field("client_id", &self.client_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("max_envelope_bytes", &self.max_envelope_bytes)
            .field("batch_max_messages", &self.batch_max_messages)
            .field("batch_max_rows", &self.batch_max_rows)
            .field("batch_max_age_ms", &self.batch_max_age_ms)
            .field("writers", &self.writers)
            .field("insert_method", &self.insert_method)
            .field("migrate", &self.migrate)
            .field("mqtt_enabled", &self.mqtt_enabled)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The flags' help states each default by hand (a flag left unset must
    /// not override the file or the environment, so clap cannot know it);
    /// this keeps those words equal to [`Settings::default`], which is what
    /// runs. `--writers` and `--batch-max-messages` once drifted.
    #[test]
    fn flag_help_states_the_defaults_that_run() {
        let d = Settings::default();
        let cmd = Cli::command();
        for (flag, default) in [
            ("database_url", d.database_url.clone()),
            ("mqtt_url", d.mqtt_url.to_string()),
            ("http_addr", d.http_addr.to_string()),
            ("client_id", d.client_id.clone()),
            ("topic_prefix", d.topic_prefix.clone()),
            ("batch_max_messages", d.batch_max_messages.to_string()),
            ("batch_max_rows", d.batch_max_rows.to_string()),
            ("batch_max_age_ms", d.batch_max_age_ms.to_string()),
            ("writers", d.writers.to_string()),
            ("max_envelope_bytes", d.max_envelope_bytes.to_string()),
            ("drain_deadline_secs", d.drain_deadline_secs.to_string()),
        ] {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == flag)
                .unwrap_or_else(|| panic!("no flag {flag}"));
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(
                help.contains(&format!("[default: {default}]")),
                "--{flag}: help '{help}' should say [default: {default}]"
            );
        }
        assert_eq!(
            d.insert_method,
            crate::store::InsertMethod::Copy,
            "--insert-method help says copy"
        );
    }
}
