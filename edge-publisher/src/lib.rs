//! # `edge-publisher` (`neopro-edge`): the TV box's side of the pipeline
//!
//! Replaces both the seed's Express server (port 3000) and its sync agent:
//! the TV frontend posts plays exactly as before; each accepted impression is
//! durable in the [`outbox`] before the TV gets its 200, and stays there until
//! the ingestor's receipt says PostgreSQL holds it. The [`publisher`] moves it
//! over MQTT (persistent session, QoS 1, batched envelopes).
//!
//! Embedding (the fleet simulator runs hundreds of edges in one process):
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let mut s = edge_publisher::Settings::for_site("club-42", "/tmp/club-42");
//! s.http_addr = None; // no HTTP listener
//! let app = edge_publisher::App::build(s).await?;
//! let outbox = app.outbox().clone(); // append directly, read counts
//! let token = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(app.run(token.clone()));
//! # Ok(()) }
//! ```
//!
//! Modules: [`settings`] (config), [`outbox`] (SQLite, group commit, on-disk
//! format), [`http`] (seed-compatible API), [`publisher`] (MQTT), [`commands`]
//! (operator commands import/status/export). Its benchmark is `neopro-sim
//! bench-edge` (the simulator crate).

pub mod commands;
pub mod http;
pub mod outbox;
pub mod publisher;
pub mod settings;

use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use outbox::{AppendOutcome, Counts, Outbox, OutboxConfig, OutboxError};
pub use publisher::{BrokerHealth, PublishGate};
pub use settings::Settings;

/// This build's version, reported in the status message and stats.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One running edge: outbox open, HTTP listener bound (when enabled).
pub struct App {
    settings: Settings,
    outbox: Outbox,
    health: Arc<BrokerHealth>,
    listener: Option<TcpListener>,
    http_addr: Option<SocketAddr>,
    gate: Option<tokio::sync::watch::Receiver<bool>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("site_id", &self.settings.site_id)
            .field("http_addr", &self.http_addr)
            .finish()
    }
}

impl App {
    /// Validates settings, opens the outbox and binds the HTTP listener.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        settings.validate()?;
        let cfg = settings.outbox_config();
        let site = settings.site_id.clone();
        let outbox = tokio::task::spawn_blocking(move || Outbox::open(cfg, &site))
            .await
            .context("opening the outbox")?
            .with_context(|| format!("opening the outbox in {}", settings.data_dir.display()))?;
        let (listener, http_addr) = match settings.http_addr {
            Some(addr) => {
                let l = runtime::http::bind(addr).await?;
                let a = l.local_addr()?;
                (Some(l), Some(a))
            }
            None => (None, None),
        };
        Ok(App {
            settings,
            outbox,
            health: Arc::new(BrokerHealth::default()),
            listener,
            http_addr,
            gate: None,
        })
    }

    /// Makes [`App::run`] connect and subscribe but publish nothing until the
    /// returned gate is opened (see [`PublishGate`] for why; the fleet
    /// simulator's benchmark uses it). [`BrokerHealth::ready`] tells when the
    /// session is up.
    pub fn hold_publishing(&mut self) -> PublishGate {
        let (gate, rx) = PublishGate::closed();
        self.gate = Some(rx);
        gate
    }

    /// The bound HTTP address (port 0 resolved), if HTTP is enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The outbox, to append impressions without HTTP and read counts.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Broker connection state.
    pub fn health(&self) -> Arc<BrokerHealth> {
        self.health.clone()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Serves HTTP and publishes until `shutdown` is cancelled; then finishes
    /// in-flight requests, says offline, disconnects and closes the outbox.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App {
            settings,
            outbox,
            health,
            listener,
            gate,
            ..
        } = self;
        let publisher = publisher::Publisher::new(settings.clone(), outbox.clone(), health.clone(), gate)?;
        let pub_task = tokio::spawn(publisher.run(shutdown.clone()));
        let http_task = listener.map(|l| {
            let state = http::HttpState {
                outbox: outbox.clone(),
                health: health.clone(),
                mqtt_url: settings.mqtt_url.to_string(),
            };
            let router = http::router(state, settings.max_body_bytes, &settings.cors_origins);
            tokio::spawn(runtime::http::serve(l, router, shutdown.clone()))
        });
        tracing::info!(site_id = %settings.site_id, broker = %settings.mqtt_url, prefix = %settings.topic_prefix, "edge running");
        let mut result = Ok(());
        if let Some(h) = http_task {
            match h.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(anyhow::Error::from(e).context("HTTP server")),
                Err(e) => result = Err(anyhow::Error::from(e).context("HTTP task")),
            }
        }
        match pub_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = result.and(Err(e.context("publisher"))),
            Err(e) => result = result.and(Err(anyhow::Error::from(e).context("publisher task"))),
        }
        outbox.close().await;
        result
    }
}
