//! The `neopro-broker` service: the embedded broker, its HTTP endpoints
//! (`/metrics`, `/healthz`), and reloading the credentials file (SIGHUP, or
//! when its modification time changes).
//!
//! rumqttd cannot be stopped, so [`App::run`] returns when the shutdown
//! token fires and `main` exits the process (exit code 0). Sessions and
//! queued messages held by the broker are lost then, exactly as on a crash:
//! edges resend whatever has no receipt yet.

use crate::auth::Authenticator;
use crate::embedded::EmbeddedBroker;
use crate::settings::BrokerSettings;
use anyhow::Context;
use axum::{http::StatusCode, routing::get, Router};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub struct App {
    broker: Arc<EmbeddedBroker>,
    http: tokio::net::TcpListener,
    http_addr: SocketAddr,
    auth: Option<Arc<Authenticator>>,
    settings: BrokerSettings,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("broker", &self.broker)
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Loads credentials, starts the broker (listening when this returns)
    /// and binds the HTTP address.
    pub async fn build(settings: BrokerSettings) -> anyhow::Result<Self> {
        settings.validate()?;
        // Install the recorder before anything records (gauges set at start).
        let _ = runtime::http::prometheus();
        let auth = match &settings.credentials {
            Some(p) => Some(Authenticator::load(p)?),
            None => {
                tracing::warn!("anonymous clients allowed: no authentication at all on this broker");
                None
            }
        };
        let s = settings.clone();
        let a = auth.clone();
        let broker = tokio::task::spawn_blocking(move || EmbeddedBroker::start_with_auth(&s, a))
            .await
            .context("broker start task")??;
        let http = runtime::http::bind(settings.http_addr).await?;
        let http_addr = http.local_addr()?;
        tracing::info!(%http_addr, "HTTP endpoints /metrics and /healthz");
        Ok(Self {
            broker: Arc::new(broker),
            http,
            http_addr,
            auth,
            settings,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn broker(&self) -> &Arc<EmbeddedBroker> {
        &self.broker
    }

    pub fn authenticator(&self) -> Option<&Arc<Authenticator>> {
        self.auth.as_ref()
    }

    /// Serves HTTP and watches the credentials file until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let broker = Arc::clone(&self.broker);
        let prom = runtime::http::prometheus();
        let router = Router::new()
            .route(
                "/healthz",
                get(move || {
                    let running = broker.is_running();
                    async move {
                        if running {
                            (StatusCode::OK, "ok")
                        } else {
                            (StatusCode::SERVICE_UNAVAILABLE, "broker listeners stopped")
                        }
                    }
                }),
            )
            .route("/metrics", get(move || std::future::ready(prom.render())));
        if let Some(auth) = &self.auth {
            tokio::spawn(runtime::auth::watch_credentials(
                Arc::clone(auth),
                self.settings.credentials_poll_secs,
                shutdown.clone(),
            ));
        }
        runtime::http::serve(self.http, router, shutdown)
            .await
            .context("HTTP server")?;
        Ok(())
    }
}
