//! # `runtime`: what every NeoPro binary does the same way
//!
//! One job per module, so that each binary's `main.rs` stays a thin shell
//! around its library (`App::build(settings)` then `run(shutdown)`), and tests
//! run exactly what production runs:
//!
//! * [`tls`]: install the one rustls `CryptoProvider` (ring). rumqttc, rumqttd
//!   and sqlx together pull rustls 0.23 with both ring and aws-lc-rs; without an
//!   explicit default, rustls panics at the first TLS handshake.
//! * [`telemetry`]: `tracing` to stderr, human-readable or JSON.
//! * [`shutdown`]: SIGINT/SIGTERM to a `CancellationToken`.
//! * [`settings`]: config file + environment + flags, in that order of
//!   precedence (lowest first), with the `config` crate.
//! * [`mqtt`]: `mqtt://user:pass@host:port` / `mqtts://` URLs to rumqttc options,
//!   with our packet-size limits; passwords never printed.
//! * [`http`]: the Prometheus recorder and an axum server bound to a listener.
//! * [`credentials`]: the accounts file shared by the broker and the
//!   ingestor's HTTP endpoint (argon2 + Mosquitto `$7$` hashes, roles).
//! * [`auth`]: checking a username/password against it (cached), reload.
//! * [`db`] (feature `db`): PostgreSQL pool, create-if-missing, the embedded
//!   migrations, and transient-vs-permanent error classification.

pub mod auth;
pub mod credentials;
#[cfg(feature = "db")]
pub mod db;
pub mod http;
pub mod mqtt;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

/// Exponential backoff with full jitter, the same policy for every reconnect
/// loop: starts at `min`, doubles up to `max`, never gives up.
pub fn backoff(min: std::time::Duration, max: std::time::Duration) -> impl Iterator<Item = std::time::Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}
