//! # `broker`: `neopro-broker`, rumqttd embedded, and the hosted-broker path
//!
//! * [`settings`]: what an operator configures, and how the in-memory log is sized.
//! * [`embedded`]: rumqttd in-process ([`EmbeddedBroker`]), for production, tests and the simulator.
//! * [`acl`]: who may publish and subscribe to what, enforced by rumqttd's router.
//! * [`credentials`], [`auth`]: re-exported from `runtime` (the accounts file, CONNECT checks).
//! * [`mosquitto`]: the hosted path, a Mosquitto configuration with per-site ACLs.
//! * [`app`]: the service (`/metrics`, `/healthz`, credentials reload).
//! * [`tls_front`]: the TLS listener (handshake deadline) relaying to rumqttd.
//! * [`observe`]: router meters and alerts to Prometheus and logs.

pub mod acl;
pub mod app;
pub mod backlog;
pub mod embedded;
pub mod mosquitto;
pub mod observe;
pub mod settings;
pub mod tls_front;

pub use embedded::EmbeddedBroker;
/// The accounts file and its checks live in `runtime`, shared with the
/// ingestor's HTTP endpoint.
pub use runtime::{auth, credentials};
pub use settings::BrokerSettings;
