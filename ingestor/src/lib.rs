//! # `ingestor`: MQTT impression envelopes into PostgreSQL, exactly once
//!
//! The cloud worker sponsors are billed on. It subscribes
//! `{prefix}/sites/+/impressions` (QoS 1, persistent session, manual acks),
//! commits each batch of envelopes in one transaction (idempotent insert,
//! rollup of exactly the new rows, dead letters for what is refused),
//! publishes a [`schema::Receipt`] per envelope after the commit, and only
//! then acknowledges the messages, in arrival order. It also serves the seed's
//! central `POST /api/analytics/impressions` through the same write path,
//! authenticated with the broker's accounts file (`--credentials`, HTTP
//! Basic `site:password`; see [`http`]).
//!
//! Library shape (the binary and the simulator embed the same thing):
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use tokio_util::sync::CancellationToken;
//! let mut settings = ingestor::Settings::default();
//! settings.http_addr = "127.0.0.1:0".parse()?;
//! let app = ingestor::App::build(settings).await?;
//! println!("HTTP on {}", app.http_addr());
//! let shutdown = CancellationToken::new();
//! app.run(shutdown.clone()).await?; // returns after shutdown.cancel() and the drain
//! # Ok(()) }
//! ```
//!
//! Modules: [`settings`] (config + CLI), [`decode`] (messages to rows and
//! receipts, no I/O), [`store`] (the SQL write path), [`pipeline`] (MQTT,
//! batching, acks), [`http`] (endpoints). Its benchmark is `neopro-sim
//! bench-ingestor` (the simulator crate).

pub mod copy;
pub mod decode;
pub mod fold;
pub mod http;
pub mod pipeline;
pub mod receipts;
pub mod settings;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use settings::Settings;

/// Readiness flags shown by `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    /// The last database operation succeeded.
    pub db: AtomicBool,
    /// Connected to the broker.
    pub mqtt: AtomicBool,
    /// MQTT messages taken into a batch since start.
    pub received: AtomicU64,
    /// How much of the time the MQTT pipeline has a batch committing: what
    /// [`fold::Scheduler`] reads to put a rollup fold off while a backlog
    /// drains.
    pub pipeline: fold::Saturation,
}

/// A built ingestor: HTTP listener bound, database pool created (lazily: the
/// service starts while PostgreSQL is down and becomes ready when it is up).
pub struct App {
    settings: Arc<Settings>,
    listener: TcpListener,
    http_addr: SocketAddr,
    pool: PgPool,
    health: Arc<Health>,
    auth: http::LegacyAuth,
}

impl App {
    /// Binds the HTTP address (port 0 picks a free one) and prepares the pool.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        runtime::tls::install_crypto_provider();
        settings.validate()?;
        let listener = runtime::http::bind(settings.http_addr).await?;
        let http_addr = listener.local_addr()?;
        // One connection per writer, plus the HTTP endpoint and maintenance.
        let pool = runtime::db::connect_lazy(&settings.database_url, (settings.writers + 3) as u32)?;
        let accounts = match &settings.credentials {
            Some(path) => Some(
                runtime::auth::Authenticator::load(path)
                    .with_context(|| format!("loading the credentials file {}", path.display()))?,
            ),
            None => None,
        };
        Ok(App {
            auth: http::LegacyAuth {
                accounts,
                unauthenticated: settings.legacy_http_unauthenticated,
            },
            settings: Arc::new(settings),
            listener,
            http_addr,
            pool,
            health: Arc::new(Health::default()),
        })
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The database pool (shared with the caller, e.g. a simulator's checks).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Readiness flags.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs until `shutdown` is cancelled, then drains (commits and acks the
    /// open batch, publishes its receipts, disconnects) and returns.
    ///
    /// At start: migrations (unless `migrate = false`) and partitions ahead,
    /// retried with backoff while PostgreSQL is unavailable.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App {
            settings,
            listener,
            http_addr,
            pool,
            health,
            auth,
        } = self;
        tracing::info!(%http_addr, "HTTP listening");
        let watcher = auth.accounts.clone().map(|a| {
            tokio::spawn(runtime::auth::watch_credentials(
                a,
                settings.credentials_poll_secs,
                shutdown.clone(),
            ))
        });
        let router = http::router(
            pool.clone(),
            health.clone(),
            settings.http_body_limit_bytes,
            settings.mqtt_enabled,
            settings.insert_method,
            auth.clone(),
        );
        auth.announce();
        let http_stop = CancellationToken::new();
        let http = tokio::spawn(runtime::http::serve(listener, router, http_stop.clone()));

        if !prepare_database(&pool, &settings, &health, &shutdown).await {
            http_stop.cancel();
            let _ = http.await;
            return Ok(());
        }
        let maintenance = tokio::spawn(maintenance(
            pool.clone(),
            settings.clone(),
            health.clone(),
            shutdown.clone(),
        ));

        let result = if settings.mqtt_enabled {
            // One connection per writer, warm before the first batch (a
            // restart with a backlog waiting is when it matters most).
            tokio::select! {
                () = shutdown.cancelled() => {}
                r = store::warm_up(&pool, settings.writers) => match r {
                    Ok(()) => tracing::debug!(connections = settings.writers, "writers' connections warmed up"),
                    Err(e) => tracing::warn!(error = %e, "warming up the writers' connections failed; the first batches open them"),
                },
            }
            pipeline::run(settings.clone(), pool.clone(), health.clone(), shutdown.clone()).await
        } else {
            shutdown.cancelled().await;
            Ok(())
        };
        maintenance.abort();
        if let Some(w) = watcher {
            w.abort();
        }
        http_stop.cancel();
        match http.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server error"),
            Err(e) => tracing::warn!(error = %e, "HTTP task failed"),
        }
        pool.close().await;
        result
    }
}

/// Migrations and partitions, retried until they succeed or shutdown
/// (returns `false` then).
async fn prepare_database(pool: &PgPool, settings: &Settings, health: &Health, shutdown: &CancellationToken) -> bool {
    let mut backoff = runtime::backoff(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let attempt = async {
            if settings.migrate {
                runtime::db::migrate(pool).await?;
            }
            let n = store::create_partitions_ahead(pool, settings.partitions_ahead_months)
                .await
                .context("creating partitions")?;
            anyhow::Ok(n)
        };
        match attempt.await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(created = n, "impression partitions created");
                }
                health.db.store(true, Ordering::Relaxed);
                return true;
            }
            Err(e) => {
                health.db.store(false, Ordering::Relaxed);
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = format!("{e:#}"), ?delay, "database not ready; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return false,
                }
            }
        }
    }
}

/// Daily partitions ahead, and a database probe every few seconds so
/// `/readyz` is right when no traffic flows.
async fn maintenance(pool: PgPool, settings: Arc<Settings>, health: Arc<Health>, shutdown: CancellationToken) {
    let mut probe = tokio::time::interval(Duration::from_secs(5));
    let mut daily = tokio::time::interval(Duration::from_secs(24 * 3600));
    daily.tick().await;
    let fold_every = Duration::from_millis(settings.rollup_fold_interval_ms.max(1));
    let mut fold = tokio::time::interval(fold_every);
    fold.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scheduler = fold::Scheduler::new(Duration::from_millis(settings.rollup_fold_defer_max_ms));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = fold.tick(), if settings.rollup_fold_interval_ms > 0 => {
                if scheduler.due(&health.pipeline) {
                    store::fold_rollups(&pool).await;
                } else {
                    metrics::counter!("ingestor_rollup_folds_deferred_total").increment(1);
                }
            }
            _ = probe.tick() => {
                let ok = sqlx::query("SELECT 1").execute(&pool).await.is_ok();
                health.db.store(ok, Ordering::Relaxed);
            }
            _ = daily.tick() => {
                match store::create_partitions_ahead(&pool, settings.partitions_ahead_months).await {
                    Ok(n) => tracing::info!(created = n, "daily partition maintenance"),
                    Err(e) => tracing::warn!(error = %e, "daily partition maintenance failed; retried tomorrow"),
                }
            }
        }
    }
}

/// `neopro-ingestor migrate`: creates the database if missing, applies the
/// migrations and creates partitions ahead.
pub async fn migrate_command(settings: &Settings) -> anyhow::Result<()> {
    runtime::db::create_database_if_missing(&settings.database_url).await?;
    let pool = runtime::db::connect(&settings.database_url, 2).await?;
    runtime::db::migrate(&pool).await?;
    let n = store::create_partitions_ahead(&pool, settings.partitions_ahead_months).await?;
    tracing::info!(partitions_created = n, "migrations applied");
    pool.close().await;
    Ok(())
}
