//! Fault scenarios: a steady stream of plays through the real pipeline, one
//! fault in the middle of it, then the proof: every played impression is in
//! PostgreSQL exactly once and every outbox is empty.
//!
//! Processes that a fault kills with SIGKILL (`kill -9`) run as real child
//! processes (`neopro-edge`, `neopro-ingestor`, `neopro-broker`, found next to
//! the running executable: `target/<profile>/`); the rest runs in-process.
//! Each scenario gets its own database (`neopro_fault_<random>`, dropped at
//! the end), its own broker on ephemeral ports and its own temp directory, so
//! scenarios run in parallel.
//!
//! **Recovery time** = from the end of the fault (process restarted, broker
//! back, connections allowed again, ingestor back, box online) until
//! PostgreSQL holds as many of this run's rows as had been handed to the
//! boxes at that moment.

use anyhow::{bail, Context};
use chrono::{SecondsFormat, Utc};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

use crate::catalogue::Catalogue;
use crate::fleet::{self, BrokerChoice, Edge, EdgeTuning, Ingestor};
use crate::pg;
use crate::plays::{generate, FleetSpec, SitePlays};
use crate::rogue::{self, Rogue};
use runtime::credentials::Role;
use runtime::mqtt::MqttUrl;

/// The attacking site of [`Fault::RogueSite`] (a site account like the others).
const ROGUE_SITE: &str = "rogue-00001";
/// The read-only account that checks, after the attack, what a fresh
/// subscriber receives.
const OBSERVER: &str = "fault-observer";

/// The faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of a `neopro-edge` process mid-stream, then restarted on its data dir.
    EdgeKill9,
    /// `kill -9` of the `neopro-ingestor` process mid-stream, then restarted.
    IngestorKill9,
    /// `kill -9` of the `neopro-broker` process (sessions and queues lost), then restarted.
    BrokerRestart,
    /// Every PostgreSQL connection of the database terminated in a loop for a while.
    PgTerminate,
    /// The ingestor away while the embedded broker's (tiny) log overflows.
    BrokerLogOverflow,
    /// A box offline with a long backlog, then back.
    EdgeOfflineBacklog,
    /// Envelopes delivered several times (replayed publishes, aggressive resends).
    DuplicateDeliveries,
    /// The broker checks accounts (one per box, the ingestor's, an
    /// attacker's) and one site account attacks the others all along the
    /// stream ([`crate::rogue`]): it subscribes to everything, forges
    /// receipts and envelopes in their names, sends oversized messages and
    /// retained spam. Exact only when, besides every play stored once, the
    /// attacker read nothing, nothing it made is stored under another site,
    /// and a fresh subscriber gets none of its retained messages.
    RogueSite,
    /// The PostgreSQL server itself stopped (fast shutdown: every session
    /// gets 57P01) and started again. Not in [`Fault::ALL`] but in
    /// [`Fault::OPT_IN`]: it restarts the
    /// machine's shared server, which would break whatever else runs against
    /// it (the CI suite runs tests in parallel); `neopro-sim soak --only
    /// pg_restart` runs it, as root on a Debian-style cluster.
    PgRestart,
}

impl Fault {
    pub const ALL: &'static [Fault] = &[
        Fault::EdgeKill9,
        Fault::IngestorKill9,
        Fault::BrokerRestart,
        Fault::PgTerminate,
        Fault::BrokerLogOverflow,
        Fault::EdgeOfflineBacklog,
        Fault::DuplicateDeliveries,
        Fault::RogueSite,
    ];

    /// Scenarios run only when named (`soak --only`).
    pub const OPT_IN: &'static [Fault] = &[Fault::PgRestart];

    /// Whether the scenario runs child processes of the workspace's other
    /// binaries (found by [`bin_dir`]).
    pub fn spawns_processes(self) -> bool {
        matches!(self, Fault::EdgeKill9 | Fault::IngestorKill9 | Fault::BrokerRestart)
    }

    pub fn name(self) -> &'static str {
        match self {
            Fault::EdgeKill9 => "edge_kill9",
            Fault::IngestorKill9 => "ingestor_kill9",
            Fault::BrokerRestart => "broker_restart",
            Fault::PgTerminate => "pg_terminate",
            Fault::BrokerLogOverflow => "broker_log_overflow",
            Fault::EdgeOfflineBacklog => "edge_offline_backlog",
            Fault::DuplicateDeliveries => "duplicate_deliveries",
            Fault::RogueSite => "rogue_site",
            Fault::PgRestart => "pg_restart",
        }
    }
}

/// `pg_ctlcluster <version> main <action>` for the newest installed cluster.
async fn pg_cluster(action: &[&str]) -> anyhow::Result<()> {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .context("PostgreSQL cluster configuration (/etc/postgresql)")?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    versions.sort_by_key(|v| v.parse::<u32>().unwrap_or(0));
    let v = versions.pop().context("no PostgreSQL cluster")?;
    let status = tokio::process::Command::new("pg_ctlcluster")
        .arg("--skip-systemctl-redirect")
        .arg(&v)
        .arg("main")
        .args(action)
        .status()
        .await
        .context("running pg_ctlcluster")?;
    anyhow::ensure!(status.success(), "pg_ctlcluster {v} main {action:?}: {status}");
    Ok(())
}

/// Sizes of a scenario.
#[derive(Clone, Debug)]
pub struct Scale {
    pub sites: usize,
    pub plays_per_site: usize,
    /// Plays per second handed to the boxes (all boxes together).
    pub rate: f64,
    /// Backlog of the offline box ([`Fault::EdgeOfflineBacklog`]).
    pub backlog: usize,
    /// How long the fault lasts where it has a duration.
    pub fault_secs: f64,
    /// Give up after this long.
    pub timeout: Duration,
}

impl Scale {
    /// CI sizes: each scenario takes some seconds.
    pub fn ci() -> Self {
        Self {
            sites: 4,
            plays_per_site: 600,
            rate: 600.0,
            backlog: 20_000,
            fault_secs: 2.0,
            timeout: Duration::from_secs(180),
        }
    }

    /// `k` times the CI sizes (plays, backlog, fault duration).
    pub fn times(k: usize) -> Self {
        let c = Self::ci();
        let k = k.max(1);
        Self {
            sites: c.sites * 2,
            plays_per_site: c.plays_per_site * k / 2,
            rate: c.rate * 2.0,
            backlog: (c.backlog * k).min(100_000 * k.div_ceil(5)),
            fault_secs: c.fault_secs * k as f64 / 2.0,
            timeout: Duration::from_secs(600),
        }
    }
}

/// What a scenario ended with.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub scenario: &'static str,
    pub played: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub outboxes_unconfirmed: u64,
    pub recovery: Duration,
    pub exact: bool,
    pub detail: String,
    /// A line the table prints under the row (what the attacker of
    /// `rogue_site` got), empty for the other scenarios.
    pub note: String,
}

impl Outcome {
    pub fn header() -> String {
        format!(
            "{:<22} {:>9} {:>9} {:>10} {:>6} {:>9} {:>12}  result",
            "scenario", "played", "stored", "duplicates", "lost", "outboxes", "recovery_s"
        )
    }

    pub fn row(&self) -> String {
        format!(
            "{:<22} {:>9} {:>9} {:>10} {:>6} {:>9} {:>12.2}  {}",
            self.scenario,
            self.played,
            self.stored,
            self.duplicates,
            self.lost,
            self.outboxes_unconfirmed,
            self.recovery.as_secs_f64(),
            if self.exact { "exact" } else { "MISMATCH" }
        )
    }
}

/// Directory of the workspace binaries: next to the running executable
/// (`target/<profile>/`, or its parent when running from `deps/`), or
/// `NEOPRO_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NEOPRO_BIN_DIR") {
        return d.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not found: build the workspace binaries first (cargo build --workspace, with --release for a release neopro-sim)",
            p.display()
        );
    }
    Ok(p)
}

/// A child process of ours, its output in a log file.
struct Proc {
    name: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn new(name: &str, args: Vec<String>, envs: Vec<(String, String)>, log: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            args,
            envs,
            log,
            child: None,
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut c = Command::new(bin(&self.name)?);
        c.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info,rumqttd=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        self.child = Some(c.spawn().with_context(|| format!("spawning {}", self.name))?);
        Ok(())
    }

    /// SIGKILL, no chance to flush or drain.
    async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.start_kill()?;
            c.wait().await?;
        }
        Ok(())
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let ok = fleet::wait_until(timeout, || async move {
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok())
    })
    .await?;
    anyhow::ensure!(ok, "nothing listens on 127.0.0.1:{port} after {timeout:?}");
    Ok(())
}

/// Where a feeder hands plays.
#[derive(Clone)]
enum Target {
    Outbox(edge_publisher::Outbox),
    Http(String),
}

/// Hands every site's plays to its box at `rate` plays/s overall, in chunks
/// of 25 round-robin; a refused hand-over (box down) is retried until
/// accepted, as the TV frontend keeps its buffer.
async fn feed(targets: Vec<Target>, sites: Vec<SitePlays>, rate: f64, delivered: Arc<AtomicU64>) -> anyhow::Result<()> {
    const CHUNK: usize = 25;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let start = Instant::now();
    let mut cursors = vec![0usize; sites.len()];
    let mut handed = 0u64;
    loop {
        let mut any = false;
        for (i, s) in sites.iter().enumerate() {
            let from = cursors[i];
            if from >= s.plays.len() {
                continue;
            }
            any = true;
            let to = (from + CHUNK).min(s.plays.len());
            let chunk = &s.plays[from..to];
            // Pace.
            let due = Duration::from_secs_f64(handed as f64 / rate.max(1.0));
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            loop {
                let ok = match &targets[i] {
                    Target::Outbox(o) => o.append(chunk.to_vec()).await.is_ok(),
                    Target::Http(url) => {
                        let body = json!({ "impressions": chunk.iter().map(|p| json!({
                            "video_filename": p.video_filename,
                            "played_at": p.played_at.to_rfc3339_opts(SecondsFormat::Micros, true),
                            "duration_played": p.duration_played,
                            "video_duration": p.video_duration,
                            "completed": p.completed,
                            "event_type": p.event_type,
                            "period": p.period,
                            "trigger_type": p.trigger_type,
                            "audience_estimate": p.audience_estimate,
                        })).collect::<Vec<_>>() });
                        matches!(http.post(url).json(&body).send().await, Ok(r) if r.status().is_success())
                    }
                };
                if ok {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            cursors[i] = to;
            handed += (to - from) as u64;
            delivered.store(handed, Ordering::Relaxed);
        }
        if !any {
            return Ok(());
        }
    }
}

/// A box as a child process.
struct ChildEdge {
    proc: Proc,
    http: u16,
}

impl ChildEdge {
    async fn unconfirmed(&self) -> Option<u64> {
        let url = format!("http://127.0.0.1:{}/api/sync/sponsor-impressions/stats", self.http);
        let v: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
        v["count"].as_u64()
    }
}

/// Runs one scenario against the PostgreSQL server of `server_url`.
pub async fn run(fault: Fault, server_url: &str, scale: &Scale) -> anyhow::Result<Outcome> {
    runtime::tls::install_crypto_provider();
    fleet::raise_fd_limit();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let db_url = pg::with_database(server_url, &format!("neopro_fault_{run_id}"))?;
    pg::recreate_database(&db_url).await?;
    let result = run_in(fault, &db_url, scale).await;
    // Drop the scenario's database (best effort), whatever happened.
    let _ = pg::drop_database(&db_url).await;
    result
}

async fn admin_connection(url: &str) -> anyhow::Result<sqlx::postgres::PgConnection> {
    use sqlx::Connection;
    Ok(sqlx::postgres::PgConnection::connect(url).await?)
}

async fn run_in(fault: Fault, db_url: &str, scale: &Scale) -> anyhow::Result<Outcome> {
    let pool = runtime::db::connect(db_url, 4).await?;
    runtime::db::migrate(&pool).await?;
    let catalogue = Catalogue::standard();
    let mut spec = FleetSpec::new(scale.sites, scale.plays_per_site, 7 + fault as u64);
    spec.site_prefix = "fault".into();
    let mut sites = generate(&spec, &catalogue);
    let backlog: Option<SitePlays> = (fault == Fault::EdgeOfflineBacklog).then(|| {
        let mut s = spec.clone();
        s.sites = 1;
        s.plays_per_site = scale.backlog;
        s.site_prefix = "offline".into();
        generate(&s, &catalogue).remove(0)
    });
    let mut all_sites = sites.clone();
    all_sites.extend(backlog.clone());
    pg::insert_catalogue(&pool, &catalogue, &all_sites).await?;
    let site_ids: Vec<String> = all_sites.iter().map(|s| s.site_id.clone()).collect();
    let played: u64 = all_sites.iter().map(|s| s.plays.len() as u64).sum();
    let dir = tempfile::Builder::new().prefix("neopro-fault-").tempdir()?;
    let prefix = schema::mqtt::DEFAULT_PREFIX;
    // With the rogue the broker checks accounts, so its topic ACL is on:
    // one per box, the ingestor's, the attacker's and an observer's.
    let accounts: Option<Vec<(String, Role)>> = (fault == Fault::RogueSite).then(|| {
        let mut a = fleet::fleet_accounts(site_ids.iter().map(String::as_str));
        a.push((ROGUE_SITE.to_owned(), Role::Site));
        a.push((OBSERVER.to_owned(), Role::Observer));
        a
    });
    // The attacker's own plays: templates of its forgeries, its sync points.
    let rogue_plays = {
        let mut s = spec.clone();
        s.sites = 1;
        s.plays_per_site = 20;
        s.site_prefix = "rogue".into();
        generate(&s, &catalogue).remove(0).plays
    };

    // Broker: a child process when it is the one killed, else in-process.
    let mut broker_proc = None;
    let mut embedded = None;
    let mqtt: runtime::mqtt::MqttUrl = if fault == Fault::BrokerRestart {
        let port = free_port()?;
        let mut p = Proc::new(
            "neopro-broker",
            vec![
                "run".into(),
                "--allow-anonymous".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--http-addr".into(),
                "127.0.0.1:0".into(),
            ],
            vec![],
            dir.path().join("broker.log"),
        );
        p.spawn()?;
        wait_port(port, Duration::from_secs(20)).await?;
        broker_proc = Some((p, port));
        format!("mqtt://127.0.0.1:{port}").parse().map_err(anyhow::Error::msg)?
    } else {
        let b = fleet::start_broker_with_accounts(&BrokerChoice::Embedded, prefix, accounts.as_deref(), |s| {
            if fault == Fault::BrokerLogOverflow {
                // A log of a few envelopes: it overflows while the ingestor is away.
                s.log.outage_messages = 8;
                s.log.avg_message_bytes = 4096;
                s.log.segments = 2;
            }
        })?;
        let u = b.url.clone();
        embedded = Some(b);
        u
    };
    // The URL an account connects with (its password when the broker checks them).
    let url_for = |user: &str| -> MqttUrl { embedded.as_ref().map_or_else(|| mqtt.clone(), |b| b.url_for(user)) };

    // Ingestor: a child process when it is the one killed, else in-process.
    let ingestor_args = vec![
        "--database-url".to_owned(),
        db_url.to_owned(),
        "--mqtt-url".into(),
        mqtt.to_string(),
        "--http-addr".into(),
        "127.0.0.1:0".into(),
        "--client-id".into(),
        "ingestor".into(),
        "run".into(),
    ];
    let mut ingestor_proc = None;
    let mut ingestor_inproc = None;
    let ingestor_settings = fleet::ingestor_settings(db_url, &url_for("ingestor"), prefix, "ingestor")?;
    if fault == Fault::IngestorKill9 {
        let mut p = Proc::new(
            "neopro-ingestor",
            ingestor_args,
            vec![],
            dir.path().join("ingestor.log"),
        );
        p.spawn()?;
        ingestor_proc = Some(p);
    } else {
        let i = Ingestor::start(ingestor_settings.clone()).await?;
        i.wait_connected(Duration::from_secs(30)).await?;
        ingestor_inproc = Some(i);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Boxes: child processes for the edge kill, in-process otherwise.
    let tuning = EdgeTuning {
        batch_delay_ms: 200,
        batch_max_impressions: if fault == Fault::BrokerLogOverflow { 20 } else { 200 },
        receipt_timeout_ms: match fault {
            Fault::DuplicateDeliveries => 150,
            Fault::BrokerLogOverflow | Fault::BrokerRestart => 3_000,
            _ => 10_000,
        },
        ..EdgeTuning::default()
    };
    let mut edges: Vec<Edge> = Vec::new();
    let mut child_edges: Vec<ChildEdge> = Vec::new();
    let mut targets = Vec::new();
    for s in &sites {
        if fault == Fault::EdgeKill9 {
            let http = free_port()?;
            let envs = vec![
                (
                    "NEOPRO_EDGE__BATCH_DELAY_MS".to_owned(),
                    tuning.batch_delay_ms.to_string(),
                ),
                (
                    "NEOPRO_EDGE__RECEIPT_TIMEOUT_MS".to_owned(),
                    tuning.receipt_timeout_ms.to_string(),
                ),
            ];
            let mut p = Proc::new(
                "neopro-edge",
                vec![
                    "--site-id".into(),
                    s.site_id.clone(),
                    "--mqtt-url".into(),
                    mqtt.to_string(),
                    "--data-dir".into(),
                    dir.path().join(&s.site_id).display().to_string(),
                    "--http-addr".into(),
                    format!("127.0.0.1:{http}"),
                    "run".into(),
                ],
                envs,
                dir.path().join(format!("{}.log", s.site_id)),
            );
            p.spawn()?;
            wait_port(http, Duration::from_secs(20)).await?;
            targets.push(Target::Http(format!(
                "http://127.0.0.1:{http}/api/sync/sponsor-impressions"
            )));
            child_edges.push(ChildEdge { proc: p, http });
        } else {
            let mut e = Edge::open(
                &s.site_id,
                dir.path().join(&s.site_id),
                &url_for(&s.site_id),
                prefix,
                &tuning,
            )
            .await?;
            e.start().await?;
            targets.push(Target::Outbox(e.outbox.clone()));
            edges.push(e);
        }
    }
    let mut offline = None;
    if let Some(b) = &backlog {
        let e = Edge::open(
            &b.site_id,
            dir.path().join(&b.site_id),
            &url_for(&b.site_id),
            prefix,
            &tuning,
        )
        .await?;
        for c in b.plays.chunks(1000) {
            e.outbox.append(c.to_vec()).await?;
        }
        offline = Some(e);
    }

    // The attacker reads (or tries to) from before the first play.
    let victims: Vec<String> = sites.iter().map(|s| s.site_id.clone()).collect();
    let mut rogue = None;
    if fault == Fault::RogueSite {
        let mut r = Rogue::connect(&url_for(ROGUE_SITE), ROGUE_SITE, prefix).await?;
        r.read_everything(&victims).await?;
        rogue = Some(r);
    }

    // The steady stream.
    let delivered = Arc::new(AtomicU64::new(0));
    let stream_total: u64 = sites.iter().map(|s| s.plays.len() as u64).sum();
    let feeder = tokio::spawn(feed(targets, std::mem::take(&mut sites), scale.rate, delivered.clone()));
    let third = stream_total / 3;
    fleet::wait_until(scale.timeout, || {
        let d = delivered.load(Ordering::Relaxed);
        async move { Ok(d >= third) }
    })
    .await?;

    // The fault.
    let fault_for = Duration::from_secs_f64(scale.fault_secs);
    match fault {
        Fault::EdgeKill9 => {
            let e = &mut child_edges[0];
            e.proc.kill9().await?;
            tokio::time::sleep(fault_for).await;
            e.proc.spawn()?;
            wait_port(e.http, Duration::from_secs(20)).await?;
        }
        Fault::IngestorKill9 => {
            let p = ingestor_proc.as_mut().context("ingestor process")?;
            p.kill9().await?;
            tokio::time::sleep(fault_for).await;
            p.spawn()?;
        }
        Fault::BrokerRestart => {
            let (p, port) = broker_proc.as_mut().context("broker process")?;
            p.kill9().await?;
            tokio::time::sleep(fault_for).await;
            p.spawn()?;
            wait_port(*port, Duration::from_secs(20)).await?;
        }
        Fault::PgTerminate => {
            let admin_url = pg::with_database(db_url, "postgres")?;
            let mut admin = admin_connection(&admin_url).await?;
            let db_name = db_url.rsplit('/').next().unwrap_or_default().to_owned();
            let until = Instant::now() + fault_for;
            while Instant::now() < until {
                sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
                    .bind(&db_name)
                    .execute(&mut admin)
                    .await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Fault::PgRestart => {
            pg_cluster(&["stop", "-m", "fast"]).await?;
            tokio::time::sleep(fault_for).await;
            pg_cluster(&["start"]).await?;
        }
        Fault::BrokerLogOverflow => {
            let i = ingestor_inproc.take().context("ingestor")?;
            i.stop().await?;
            tokio::time::sleep(fault_for).await;
            let i = Ingestor::start(ingestor_settings.clone()).await?;
            ingestor_inproc = Some(i);
        }
        Fault::EdgeOfflineBacklog => {
            if let Some(e) = offline.as_mut() {
                e.start().await?;
            }
        }
        Fault::DuplicateDeliveries => {
            // Replay envelopes of already handed plays 3 times from a foreign
            // outbox (their receipts are ignored by the box), while the boxes'
            // own 150 ms receipt timeout makes them resend too.
            let site = &all_sites[0];
            let n = (delivered.load(Ordering::Relaxed) as usize / scale.sites.max(1)).min(site.plays.len());
            let foreign = uuid::Uuid::now_v7();
            let mut opts = mqtt.options(&runtime::mqtt::ClientOptions {
                clean_session: true,
                ..runtime::mqtt::ClientOptions::new(format!("replayer-{}", &foreign.simple().to_string()[..8]))
            })?;
            opts.set_clean_session(true);
            let (client, mut el) = rumqttc::AsyncClient::new(opts, 64);
            let poll = tokio::spawn(async move { while el.poll().await.is_ok() {} });
            let topics = schema::Topics::default();
            for _ in 0..3 {
                for (k, chunk) in site.plays[..n].chunks(50).enumerate() {
                    let imps: Vec<_> = chunk
                        .iter()
                        .enumerate()
                        .map(|(j, p)| schema::Impression {
                            seq: Some((k * 50 + j + 1) as i64),
                            ..p.clone()
                        })
                        .collect();
                    let env = schema::BatchEnvelope::new(&site.site_id, foreign, imps, Utc::now());
                    client
                        .publish(
                            topics.impressions(&site.site_id),
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            env.encode(),
                        )
                        .await?;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = client.disconnect().await;
            poll.abort();
        }
        Fault::RogueSite => {
            let r = rogue.as_mut().context("the rogue")?;
            let outboxes: Vec<(String, uuid::Uuid)> = edges
                .iter()
                .map(|e| (e.site_id.clone(), e.outbox.outbox_id()))
                .collect();
            r.retained_spam(&victims).await?;
            // Rounds of every attack on every victim for the fault's duration
            // (at least one), while the stream goes on.
            let until = Instant::now() + fault_for;
            loop {
                for (v, outbox) in &outboxes {
                    r.forge_receipts(v, *outbox).await?;
                    r.forge_v2_envelope(v, *outbox).await?;
                    r.forge_plays(v, *outbox, &rogue_plays[..5]).await?;
                    r.oversized(v).await?;
                }
                if Instant::now() >= until {
                    break;
                }
            }
        }
    }
    let fault_end = Instant::now();
    let handed_at_end = delivered.load(Ordering::Relaxed)
        + if fault == Fault::EdgeOfflineBacklog {
            backlog.as_ref().map_or(0, |b| b.plays.len() as u64)
        } else {
            0
        };
    let mut recovery = None;

    // Settle: feeder done, every row committed, every outbox empty.
    let deadline = Instant::now() + scale.timeout;
    let mut settled = false;
    while Instant::now() < deadline {
        let committed = pg::committed_count(&pool, &site_ids).await.unwrap_or(0) as u64;
        if recovery.is_none() && committed >= handed_at_end {
            recovery = Some(fault_end.elapsed());
        }
        let mut unconfirmed = fleet::unconfirmed_total(&edges) + offline.as_ref().map_or(0, Edge::unconfirmed);
        for c in &child_edges {
            unconfirmed += c.unconfirmed().await.unwrap_or(u64::MAX / 4);
        }
        if feeder.is_finished() && committed >= played && unconfirmed == 0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let feed_result = if feeder.is_finished() {
        feeder.await.context("feeder task")?
    } else {
        feeder.abort();
        Err(anyhow::anyhow!("the feeder did not finish"))
    };
    let mut unconfirmed = fleet::unconfirmed_total(&edges) + offline.as_ref().map_or(0, Edge::unconfirmed);
    for c in &child_edges {
        unconfirmed += c.unconfirmed().await.unwrap_or(u64::MAX / 4);
    }

    // What the attacker got, while the ingestor still answers its sync play.
    let mut attack = None;
    if let Some(mut r) = rogue.take() {
        attack = Some(attack_report(&mut r, &pool, &url_for(OBSERVER), prefix, &victims, &rogue_plays[5]).await?);
        r.disconnect().await;
    }

    // Tear down.
    for e in edges.iter_mut().chain(offline.iter_mut()) {
        let _ = e.stop().await;
    }
    for c in &mut child_edges {
        let _ = c.proc.kill9().await;
    }
    if let Some(i) = ingestor_inproc.take() {
        let _ = i.stop().await;
    }
    if let Some(p) = ingestor_proc.as_mut() {
        let _ = p.kill9().await;
    }
    if let Some((p, _)) = broker_proc.as_mut() {
        let _ = p.kill9().await;
    }

    let rec = pg::reconcile(&pool, all_sites.iter().flat_map(|s| s.plays.iter())).await?;
    pool.close().await;
    let attack_clean = attack.as_ref().is_none_or(|a| a.clean());
    let exact = settled && feed_result.is_ok() && rec.is_exact() && unconfirmed == 0 && attack_clean;
    let mut detail = rec.diff(5);
    if let Some(a) = &attack {
        detail.push_str(&a.detail);
    }
    if let Err(e) = feed_result {
        detail.push_str(&format!("feeder: {e:#}\n"));
    }
    if !settled {
        detail.push_str(&format!("did not settle within {:?}\n", scale.timeout));
    }
    if !exact {
        detail.push_str(&format!("logs kept in {}\n", dir.keep().display()));
    }
    Ok(Outcome {
        scenario: fault.name(),
        played,
        stored: rec.stored,
        duplicates: rec.duplicate_rows(),
        lost: rec.missing.len() as u64,
        outboxes_unconfirmed: unconfirmed,
        recovery: recovery.unwrap_or_else(|| fault_end.elapsed()),
        exact,
        detail,
        note: attack.map(|a| a.line()).unwrap_or_default(),
    })
}

/// What the rogue of [`Fault::RogueSite`] got.
struct Attack {
    messages_read: u64,
    rows_stored_as_others: i64,
    forged_published: u64,
    /// Retained messages a fresh subscriber received other than a box's
    /// own genuine status.
    retained_delivered: usize,
    synced: bool,
    detail: String,
}

impl Attack {
    fn clean(&self) -> bool {
        self.synced && self.messages_read == 0 && self.rows_stored_as_others == 0 && self.retained_delivered == 0
    }

    fn line(&self) -> String {
        format!(
            "rogue_site attacker: messages_read={} rows_stored_as_others={} forged_published={} retained_delivered={}",
            self.messages_read, self.rows_stored_as_others, self.forged_published, self.retained_delivered
        )
    }
}

/// After the stream settled: one genuine play of the rogue's own, receipted
/// (so anything leaked to it has arrived), then what it read, what of its
/// forgeries the database holds under another site, and which retained
/// messages a fresh observer session receives under the prefix.
async fn attack_report(
    r: &mut Rogue,
    pool: &sqlx::PgPool,
    observer: &MqttUrl,
    prefix: &str,
    victims: &[String],
    own_play: &schema::Impression,
) -> anyhow::Result<Attack> {
    let mut detail = String::new();
    let synced = match r.sync(own_play, Duration::from_secs(30)).await {
        Ok(()) => true,
        Err(e) => {
            detail.push_str(&format!("rogue sync: {e:#}\n"));
            false
        }
    };
    let messages_read = r.messages_read();
    if messages_read > 0 {
        detail.push_str(&format!("the rogue read: {:?}\n", r.seen()));
    }
    let rows_stored_as_others = rogue::rows_stored_as_others(pool, r.site(), r.forged_ids()).await?;
    let topics = schema::Topics::new(prefix).map_err(anyhow::Error::msg)?;
    let retained = rogue::retained_seen(
        observer,
        &format!("{OBSERVER}:probe"),
        &[format!("{prefix}/#")],
        Duration::from_secs(1),
    )
    .await?;
    let genuine = |topic: &str, payload: &[u8]| {
        victims.iter().any(|v| {
            topic == topics.status(v)
                && serde_json::from_slice::<schema::mqtt::SiteStatus>(payload).is_ok_and(|s| s.site_id == *v)
        })
    };
    let mut retained_delivered = 0;
    for (topic, payload) in &retained {
        if !genuine(topic, payload) {
            retained_delivered += 1;
            detail.push_str(&format!("retained on {topic}: {} bytes\n", payload.len()));
        }
    }
    Ok(Attack {
        messages_read,
        rows_stored_as_others,
        forged_published: r.forged_published(),
        retained_delivered,
        synced,
        detail,
    })
}
