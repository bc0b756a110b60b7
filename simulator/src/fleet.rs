//! The real pipeline in one process: a broker (our embedded rumqttd, or any
//! MQTT URL such as the local Mosquitto), the ingestor App against
//! PostgreSQL, and N TV boxes, each a real `edge_publisher` App with its own
//! SQLite outbox in a temporary directory.
//!
//! Why in-process and not mocks: every byte goes through the same code as in
//! production (outbox group commit, MQTT QoS 1 with persistent sessions, the
//! ingestor's batching, SQL and receipts), only the processes are folded into
//! one so that a newcomer runs the whole chain with one command. The boxes
//! are fed through the outbox's append API (what the edge's HTTP endpoint
//! calls once a POST is parsed), so the measured path starts where the TV's
//! `POST /api/sync/sponsor-impressions` ends.

use anyhow::Context;
use edge_publisher::Outbox;
use runtime::credentials::{Role, INGESTOR_USER};
use runtime::mqtt::MqttUrl;
use std::path::PathBuf;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::credentials::Accounts;

/// Which broker the fleet meets at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerChoice {
    /// Our rumqttd, in this process, on an ephemeral loopback port.
    Embedded,
    /// Any broker by URL (`mqtt://127.0.0.1:1883` for the local Mosquitto).
    Url(String),
}

impl std::str::FromStr for BrokerChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "embedded" {
            Ok(BrokerChoice::Embedded)
        } else {
            s.parse::<MqttUrl>()?;
            Ok(BrokerChoice::Url(s.to_owned()))
        }
    }
}

/// A started broker.
pub struct Broker {
    /// Where it listens (no credentials: [`Broker::url_for`] adds an account's).
    pub url: MqttUrl,
    /// Keeps the embedded broker referenced (it lives until the process exits).
    pub embedded: Option<broker::EmbeddedBroker>,
    /// The run's accounts when the embedded broker checks them (ACL on).
    pub accounts: Option<Accounts>,
    /// Accounts in the credentials file (0: anonymous or not ours).
    pub account_count: usize,
    /// Holds the credentials file while the broker runs.
    _dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.url)
            .field("accounts", &self.account_count)
            .finish()
    }
}

impl Broker {
    /// The URL `username` connects with: its account's password when the
    /// broker checks accounts, else the broker's URL as given.
    pub fn url_for(&self, username: &str) -> MqttUrl {
        match &self.accounts {
            Some(a) => a.url(&self.url, username),
            None => self.url.clone(),
        }
    }
}

/// Starts (embedded) or names (URL) the broker for topic prefix `prefix`,
/// anonymous (the ACL off).
pub fn start_broker(
    choice: &BrokerChoice,
    prefix: &str,
    tune: impl FnOnce(&mut broker::BrokerSettings),
) -> anyhow::Result<Broker> {
    start_broker_with_accounts(choice, prefix, None, tune)
}

/// As [`start_broker`]; with `accounts` (username, role) and an embedded
/// broker, the broker checks a credentials file holding them, so its topic
/// ACL is on: each box may use its own site's topics only. Their passwords
/// derive from a fresh secret ([`Accounts`]); [`Broker::url_for`] gives
/// each account's URL. A broker named by URL keeps its own accounts.
pub fn start_broker_with_accounts(
    choice: &BrokerChoice,
    prefix: &str,
    accounts: Option<&[(String, Role)]>,
    tune: impl FnOnce(&mut broker::BrokerSettings),
) -> anyhow::Result<Broker> {
    match choice {
        BrokerChoice::Embedded => {
            let mut s = broker::BrokerSettings::for_tests();
            s.topic_prefix = prefix.to_owned();
            let mut dir = None;
            let mut keys = None;
            let mut account_count = 0;
            if let Some(list) = accounts {
                let d = tempfile::Builder::new().prefix("neopro-sim-accounts-").tempdir()?;
                let a = Accounts::random();
                let path = d.path().join("credentials");
                account_count = a.write_file(&path, list, false)?.len();
                s.allow_anonymous = false;
                s.credentials = Some(path);
                dir = Some(d);
                keys = Some(a);
            }
            tune(&mut s);
            let b = broker::EmbeddedBroker::start(&s).context("starting the embedded broker")?;
            Ok(Broker {
                url: b.mqtt_url(None, None),
                embedded: Some(b),
                accounts: keys,
                account_count,
                _dir: dir,
            })
        }
        BrokerChoice::Url(u) => Ok(Broker {
            url: u.parse().map_err(anyhow::Error::msg)?,
            embedded: None,
            accounts: None,
            account_count: 0,
            _dir: None,
        }),
    }
}

/// The accounts of a fleet: one site account per box and the ingestor's.
pub fn fleet_accounts<'a>(sites: impl IntoIterator<Item = &'a str>) -> Vec<(String, Role)> {
    sites
        .into_iter()
        .map(|s| (s.to_owned(), Role::Site))
        .chain(std::iter::once((INGESTOR_USER.to_owned(), Role::Ingestor)))
        .collect()
}

/// A running in-process ingestor.
pub struct Ingestor {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
    pub http_addr: std::net::SocketAddr,
    pub health: std::sync::Arc<ingestor::Health>,
}

impl std::fmt::Debug for Ingestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingestor").field("http_addr", &self.http_addr).finish()
    }
}

impl Ingestor {
    /// Starts the ingestor App with `settings` (HTTP on an ephemeral port).
    pub async fn start(mut settings: ingestor::Settings) -> anyhow::Result<Self> {
        settings.http_addr = "127.0.0.1:0".parse().expect("static address");
        let app = ingestor::App::build(settings).await.context("building the ingestor")?;
        let http_addr = app.http_addr();
        let health = app.health();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run(shutdown.clone()));
        Ok(Self {
            shutdown,
            task,
            http_addr,
            health,
        })
    }

    /// Waits until the ingestor is connected to the broker (subscribed).
    pub async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        let h = self.health.clone();
        let ok = wait_until(timeout, || {
            let h = h.clone();
            async move { Ok(h.mqtt.load(std::sync::atomic::Ordering::Relaxed)) }
        })
        .await?;
        anyhow::ensure!(ok, "the ingestor did not connect to the broker within {timeout:?}");
        Ok(())
    }

    /// Graceful stop (drains the open batch).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        (&mut self.task).await.context("ingestor task")?
    }
}

/// A run that ends early (an error, a failed check) must not leave the
/// ingestor working against a database that is about to be dropped: its
/// shutdown is signalled, and it drains and stops on its own.
impl Drop for Ingestor {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Settings of the ingestor for a simulated fleet.
pub fn ingestor_settings(
    database_url: &str,
    mqtt: &MqttUrl,
    prefix: &str,
    client_id: &str,
) -> anyhow::Result<ingestor::Settings> {
    // The binary's defaults and its `NEOPRO_INGESTOR__*` variables (so the
    // embedded ingestor is tuned the same way, e.g.
    // `NEOPRO_INGESTOR__WRITERS=4 neopro-sim bench`); the run decides where
    // it connects.
    let base: ingestor::Settings = runtime::settings::load(None, None, ingestor::settings::ENV_PREFIX, &[])
        .context("NEOPRO_INGESTOR__* variables")?;
    Ok(ingestor::Settings {
        database_url: database_url.to_owned(),
        mqtt_url: mqtt.clone(),
        topic_prefix: prefix.to_owned(),
        client_id: client_id.to_owned(),
        ..base
    })
}

/// One simulated TV box.
pub struct Edge {
    pub site_id: String,
    pub data_dir: PathBuf,
    pub outbox: Outbox,
    settings: edge_publisher::Settings,
    app: Option<edge_publisher::App>,
    running: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    /// Broker session state of the running app.
    health: Option<std::sync::Arc<edge_publisher::BrokerHealth>>,
    /// Set by [`Edge::connect_held`] until [`Edge::release`].
    gate: Option<edge_publisher::PublishGate>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge").field("site_id", &self.site_id).finish()
    }
}

/// Tuning shared by the simulated boxes.
#[derive(Clone, Debug)]
pub struct EdgeTuning {
    pub batch_delay_ms: u64,
    pub batch_max_impressions: usize,
    pub max_inflight_batches: usize,
    pub receipt_timeout_ms: u64,
    pub sqlite_cache_kib: u32,
}

impl Default for EdgeTuning {
    fn default() -> Self {
        let d = edge_publisher::Settings::default();
        Self {
            batch_delay_ms: d.batch_delay_ms,
            batch_max_impressions: d.batch_max_impressions,
            max_inflight_batches: d.max_inflight_batches,
            receipt_timeout_ms: d.receipt_timeout_ms,
            sqlite_cache_kib: 256,
        }
    }
}

impl Edge {
    /// Opens the box's outbox in `data_dir` (HTTP off); not publishing yet.
    pub async fn open(
        site_id: &str,
        data_dir: PathBuf,
        mqtt: &MqttUrl,
        prefix: &str,
        tuning: &EdgeTuning,
    ) -> anyhow::Result<Self> {
        let mut s = edge_publisher::Settings::for_site(site_id, data_dir.clone());
        s.http_addr = None;
        s.mqtt_url = mqtt.clone();
        s.topic_prefix = prefix.to_owned();
        s.batch_delay_ms = tuning.batch_delay_ms;
        s.batch_max_impressions = tuning.batch_max_impressions;
        s.max_inflight_batches = tuning.max_inflight_batches;
        s.receipt_timeout_ms = tuning.receipt_timeout_ms;
        s.sqlite_cache_kib = tuning.sqlite_cache_kib;
        s.status_interval_ms = 60_000;
        let app = edge_publisher::App::build(s.clone())
            .await
            .with_context(|| format!("opening edge {site_id}"))?;
        Ok(Self {
            site_id: site_id.to_owned(),
            data_dir,
            outbox: app.outbox().clone(),
            settings: s,
            app: Some(app),
            running: None,
            health: None,
            gate: None,
        })
    }

    /// Starts publishing (connects to the broker).
    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.run(false).await
    }

    /// Connects to the broker and subscribes, but publishes nothing until
    /// [`Edge::release`] (see `edge_publisher::PublishGate`);
    /// [`Edge::ready`] tells when the session is up.
    pub async fn connect_held(&mut self) -> anyhow::Result<()> {
        self.run(true).await
    }

    /// Connected, receipts subscription acknowledged.
    pub fn ready(&self) -> bool {
        self.health.as_ref().is_some_and(|h| h.ready())
    }

    /// Lets a box started by [`Edge::connect_held`] publish.
    pub fn release(&mut self) {
        if let Some(g) = self.gate.take() {
            g.open();
        }
    }

    async fn run(&mut self, held: bool) -> anyhow::Result<()> {
        let mut app = match self.app.take() {
            Some(a) => a,
            None => {
                let app = edge_publisher::App::build(self.settings.clone()).await?;
                self.outbox = app.outbox().clone();
                app
            }
        };
        self.gate = held.then(|| app.hold_publishing());
        self.health = Some(app.health());
        let token = CancellationToken::new();
        let task = tokio::spawn(app.run(token.clone()));
        self.running = Some((token, task));
        Ok(())
    }

    /// Stops publishing and closes the outbox (a box switched off cleanly).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some((token, task)) = self.running.take() {
            token.cancel();
            task.await.context("edge task")??;
        }
        Ok(())
    }

    pub fn unconfirmed(&self) -> u64 {
        self.outbox.counts().unconfirmed
    }
}

/// A fleet's outboxes, summed.
pub fn unconfirmed_total(edges: &[Edge]) -> u64 {
    edges.iter().map(Edge::unconfirmed).sum()
}

/// Raises the open-file limit to its hard maximum (10,000 sessions need
/// 10,000 sockets plus one SQLite file set per box). Returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    // As root (containers, CI) the hard limit itself can be raised; each box
    // needs a socket and its SQLite files (database, WAL, shared memory).
    const WANT: u64 = 1 << 20;
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() {
        if hard < WANT && rlimit::Resource::NOFILE.set(WANT, WANT).is_ok() {
            return WANT;
        }
        if soft >= WANT {
            return soft;
        }
    }
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            0
        }
    }
}

/// Retires the persistent sessions `client_ids` hold on an external broker
/// (64 at a time, best effort): a run's ingestor id is unique, and every
/// run's boxes subscribe under a new topic prefix, so without this each run
/// would leave a session (or a subscription) on a shared Mosquitto that
/// never expires. The embedded broker dies with the process: nothing to do.
pub async fn forget_sessions(broker: &Broker, client_ids: impl IntoIterator<Item = String>) {
    use futures::StreamExt;
    if broker.embedded.is_some() {
        return;
    }
    futures::stream::iter(client_ids)
        .for_each_concurrent(64, |id| async move {
            if let Err(e) = runtime::mqtt::forget_session(&broker.url, &id).await {
                tracing::debug!(client_id = %id, error = %e, "could not retire a session");
            }
        })
        .await;
}

/// Polls `done` every 100 ms until it is true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut done: F) -> anyhow::Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if done().await? {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
