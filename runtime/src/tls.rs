//! The process-wide rustls crypto provider.
//!
//! rustls 0.23 refuses to guess when more than one provider is compiled in
//! (ring via sqlx/rumqttc, aws-lc-rs via other paths) and panics at the first
//! handshake. Every binary and every test calls [`install_crypto_provider`]
//! before any TLS; it is idempotent.

use std::sync::Once;

static INSTALL: Once = Once::new();

/// Installs ring as the default rustls provider (once per process).
pub fn install_crypto_provider() {
    INSTALL.call_once(|| {
        // Err means another provider was installed first; that one is then the
        // process default, which is all we need.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
