//! Shutdown: SIGINT or SIGTERM (systemd's stop signal) cancels a token that
//! every task of a service watches. Servers take the token as an argument
//! (as mini-redis's `run(listener, shutdown)`), so tests stop them the same
//! way production does.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use tokio_util::sync::CancellationToken as Shutdown;

/// Resolves at the first SIGINT or SIGTERM.
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// A token cancelled by the first SIGINT/SIGTERM. A second signal, or the
/// drain deadline passing, exits the process at once.
pub fn on_signal(drain_deadline: Duration) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        signal().await;
        t.cancel();
        tokio::select! {
            () = signal() => tracing::warn!("second signal: exiting without draining"),
            () = tokio::time::sleep(drain_deadline) => tracing::error!(?drain_deadline, "drain deadline passed: exiting"),
        }
        std::process::exit(1);
    });
    token
}
