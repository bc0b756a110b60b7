//! `neopro-broker`: the embedded MQTT broker for the NeoPro cloud host, and
//! the tools around it (`passwd`, `mosquitto-config`).

use anyhow::Context;
use broker::app::App;
use broker::credentials::{Credentials, Role};
use broker::mosquitto::{self, MosquittoOptions};
use broker::settings::{default_tls_listen, BrokerSettings};
use clap::{Parser, Subcommand};
use runtime::telemetry::LogFormat;
use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "neopro-broker",
    version,
    about = "NeoPro MQTT broker (embedded rumqttd) and hosted-broker tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
    /// Log format: human or json.
    #[arg(long, env = "NEOPRO_LOG_FORMAT", default_value = "human", global = true)]
    log_format: LogFormat,
}

/// Flags of the broker itself (no subcommand, or `run`).
#[derive(clap::Args, Debug, Clone, Default)]
struct RunArgs {
    /// TOML configuration file (default: /etc/neopro/broker.toml when present).
    #[arg(long, env = "NEOPRO_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Plain MQTT listener [default: 0.0.0.0:1883].
    #[arg(long, env = "NEOPRO_BROKER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Credentials file (username:argon2-hash:mosquitto-hash lines).
    #[arg(long, env = "NEOPRO_BROKER_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// Address of /metrics and /healthz [default: 0.0.0.0:9883].
    #[arg(long, env = "NEOPRO_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// Accept clients without credentials (disables authentication entirely).
    #[arg(long, env = "NEOPRO_BROKER_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
    /// TLS listener address [default: 0.0.0.0:8883 when a certificate is given].
    #[arg(long, env = "NEOPRO_BROKER_TLS_LISTEN")]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for the TLS listener.
    #[arg(long, env = "NEOPRO_BROKER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS listener.
    #[arg(long, env = "NEOPRO_BROKER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// MQTT-over-websocket listener (off unless given), e.g. 0.0.0.0:8080.
    #[arg(long, env = "NEOPRO_BROKER_WS_LISTEN")]
    ws_listen: Option<SocketAddr>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the broker (the default).
    Run(RunArgs),
    /// Add or change an account; the password is read from stdin when it is
    /// not a terminal (one line), else prompted twice.
    Passwd {
        /// Credentials file (created if missing).
        file: PathBuf,
        /// Username: a site id, or `ingestor`.
        user: String,
        /// Remove the account instead.
        #[arg(long)]
        delete: bool,
        /// What the account may do on the broker: `site` (its own site's
        /// topics), `ingestor` (every site's impressions and status, writes
        /// receipts) or `observer` (reads everything under the prefix,
        /// writes nothing). Default: the account's current role; for a new
        /// account `site`, or `ingestor` for the account named `ingestor`.
        #[arg(long, value_parser = parse_role, conflicts_with = "delete")]
        role: Option<Role>,
    },
    /// Write a Mosquitto 2.0 configuration (passwd, acl, mosquitto.conf)
    /// from the credentials file.
    MosquittoConfig {
        #[arg(long, env = "NEOPRO_BROKER_CREDENTIALS")]
        credentials: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Mosquitto's plain listener [default: 0.0.0.0:1883; 127.0.0.1:1883
        /// with TLS, where an address off loopback is refused].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Optional TLS listener (needs --tls-cert and --tls-key).
        #[arg(long, requires = "tls_cert")]
        tls_listen: Option<SocketAddr>,
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Topic prefix.
        #[arg(long, default_value = schema::mqtt::DEFAULT_PREFIX)]
        topic_prefix: String,
        /// The ingestor's account.
        #[arg(long, default_value = "ingestor")]
        ingestor_user: String,
        /// The account of the ingestor's receipts connection (role ingestor):
        /// Mosquitto gives each account one session.
        #[arg(long, default_value = mosquitto::INGESTOR_RECEIPTS_USER)]
        ingestor_receipts_user: String,
        /// Generate even if some Mosquitto hashes have fewer than 100000
        /// PBKDF2 iterations (they are named in a warning).
        #[arg(long)]
        allow_weak_hashes: bool,
        /// Mosquitto's persistence directory.
        #[arg(long, default_value = "/var/lib/mosquitto")]
        persistence_dir: PathBuf,
        /// Messages queued per offline persistent client (size it for the
        /// longest ingestor outage: fleet envelopes/s × seconds).
        #[arg(long, default_value_t = 200_000)]
        max_queued_messages: u64,
        /// QoS 1 messages in flight per client (the ingestor's envelopes per
        /// commit: it acks after committing).
        #[arg(long, default_value_t = 1000)]
        max_inflight_messages: u32,
        /// User Mosquitto runs as after dropping root.
        #[arg(long, default_value = "mosquitto")]
        run_as: String,
        /// Mosquitto `log_dest` (stderr, syslog, "file /var/log/mosquitto/mosquitto.log").
        #[arg(long, default_value = "stderr")]
        log_dest: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::tls::install_crypto_provider();
    runtime::telemetry::init(cli.log_format);
    match cli.command {
        None => serve(cli.run),
        Some(Command::Run(args)) => serve(args),
        Some(Command::Passwd {
            file,
            user,
            delete,
            role,
        }) => passwd(&file, &user, delete, role),
        Some(Command::MosquittoConfig {
            credentials,
            out,
            listen,
            tls_listen,
            tls_cert,
            tls_key,
            topic_prefix,
            ingestor_user,
            ingestor_receipts_user,
            allow_weak_hashes,
            persistence_dir,
            max_queued_messages,
            max_inflight_messages,
            run_as,
            log_dest,
        }) => {
            let creds = Credentials::load(&credentials)?;
            let o = MosquittoOptions {
                listen,
                tls: tls_cert
                    .zip(tls_key)
                    .map(|(c, k)| (tls_listen.unwrap_or_else(default_tls_listen), c, k)),
                topic_prefix,
                ingestor_user,
                ingestor_receipts_user,
                allow_weak_hashes,
                persistence_dir,
                max_queued_messages,
                max_inflight_messages,
                run_as,
                log_dest,
                ..MosquittoOptions::default()
            };
            let generated = mosquitto::write_config(&creds, &o, &out)?;
            for w in &generated.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "wrote {} ({} accounts); run: mosquitto -c {}",
                generated.conf.display(),
                creds.len(),
                generated.conf.display()
            );
            Ok(())
        }
    }
}

fn load_settings(a: &RunArgs) -> anyhow::Result<BrokerSettings> {
    let s = |v: &Option<SocketAddr>| v.map(|x| x.to_string());
    let p = |v: &Option<PathBuf>| v.as_ref().map(|x| x.display().to_string());
    let mut settings: BrokerSettings = runtime::settings::load(
        a.config.as_deref(),
        Some(std::path::Path::new("/etc/neopro/broker.toml")),
        "NEOPRO_BROKER",
        &[
            ("listen", s(&a.listen)),
            ("credentials", p(&a.credentials)),
            ("http_addr", s(&a.http_addr)),
            ("allow_anonymous", a.allow_anonymous.then(|| "true".to_owned())),
            ("websocket.listen", s(&a.ws_listen)),
        ],
    )?;
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        settings.tls = Some(broker::settings::TlsSettings {
            listen: a.tls_listen.unwrap_or_else(default_tls_listen),
            cert: cert.clone(),
            key: key.clone(),
        });
    } else if let (Some(t), Some(l)) = (settings.tls.as_mut(), a.tls_listen) {
        t.listen = l;
    }
    Ok(settings)
}

fn serve(args: RunArgs) -> anyhow::Result<()> {
    let settings = load_settings(&args)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        // rumqttd cannot drain: the deadline only bounds our HTTP server.
        let shutdown = runtime::shutdown::on_signal(Duration::from_secs(5));
        let app = App::build(settings).await?;
        app.run(shutdown).await
    })?;
    tracing::info!(
        "neopro-broker exiting: sessions and queued messages held in memory are dropped; \
         edges resend whatever has no receipt"
    );
    std::process::exit(0);
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s)
}

fn passwd(file: &std::path::Path, user: &str, delete: bool, role: Option<Role>) -> anyhow::Result<()> {
    let mut creds = Credentials::load_or_empty(file)?;
    if delete {
        anyhow::ensure!(creds.remove(user), "no account '{user}' in {}", file.display());
        creds.save(file)?;
        eprintln!("removed '{user}' from {}", file.display());
        return Ok(());
    }
    broker::credentials::validate_username(user)?;
    let password = if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password(format!("password for {user}: "))?;
        let b = rpassword::prompt_password("again: ")?;
        anyhow::ensure!(a == b, "the two passwords differ");
        a
    } else {
        let mut s = String::new();
        std::io::stdin()
            .take(4096)
            .read_to_string(&mut s)
            .context("reading the password from stdin")?;
        let line = s.lines().next().unwrap_or_default().to_owned();
        line
    };
    let existed = match role {
        Some(r) => creds.set_password_with_role(user, &password, r)?,
        None => creds.set_password(user, &password)?,
    };
    creds.save(file)?;
    let role = creds.get(user).map_or(Role::Site, |e| e.role);
    eprintln!(
        "{} '{user}' (role {role}) in {} (reload: SIGHUP or wait for the file watch)",
        if existed { "changed" } else { "added" },
        file.display()
    );
    Ok(())
}
