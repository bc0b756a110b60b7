//! Our own TLS listener in front of rumqttd's plain listener.
//!
//! Why not rumqttd's TLS: rumqttd 0.20 performs the TLS handshake inside its
//! accept loop, one connection at a time and without a timeout, so a single
//! client that opens a TCP connection and sends nothing stalls every later
//! TLS connection (10,000 boxes reconnecting after an outage would queue
//! behind it). Here each connection's handshake runs in its own task with a
//! deadline; the decrypted stream is then relayed to the plain listener over
//! loopback, where rumqttd authenticates it like any other client.
//!
//! The certificate and key are re-read when either file's modification time
//! changes (checked at each accept), so a renewed certificate is used
//! without restart; a renewal that does not parse is logged and the
//! previous certificate stays in use.

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A client must complete its TLS handshake within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let pem = std::fs::read(cert).with_context(|| format!("reading TLS certificate {}", cert.display()))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing TLS certificate {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", cert.display());
    let pem = std::fs::read(key).with_context(|| format!("reading TLS key {}", key.display()))?;
    let key_der: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("parsing TLS key {}", key.display()))?
        .with_context(|| format!("no private key in {}", key.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .context("TLS certificate and key do not match")?;
    Ok(Arc::new(cfg))
}

fn mtimes(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(cert), m(key))
}

/// Checks the files now (a bad certificate fails the start, not the first
/// client), binds `listen`, and relays to `upstream` on a thread of its own.
/// Returns the bound address.
pub fn spawn(listen: SocketAddr, upstream: SocketAddr, cert: PathBuf, key: PathBuf) -> anyhow::Result<SocketAddr> {
    let mut config = load(&cert, &key)?;
    let std_listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("binding the TLS listener {listen}"))?;
    std_listener.set_nonblocking(true)?;
    crate::backlog::widen_own(&std_listener, crate::backlog::OWN_BACKLOG);
    let addr = std_listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("neopro-tls")
        .enable_all()
        .build()
        .context("TLS runtime")?;
    std::thread::Builder::new()
        .name("neopro-tls-accept".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "TLS listener unusable");
                        return;
                    }
                };
                let mut stamp = mtimes(&cert, &key);
                loop {
                    let (tcp, peer) = match listener.accept().await {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "TLS accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let now = mtimes(&cert, &key);
                    if now != stamp {
                        stamp = now;
                        match load(&cert, &key) {
                            Ok(c) => {
                                config = c;
                                tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                            }
                            Err(e) => tracing::error!(
                                error = format!("{e:#}"),
                                "new TLS certificate refused; keeping the previous one"
                            ),
                        }
                    }
                    let acceptor = TlsAcceptor::from(Arc::clone(&config));
                    tokio::spawn(relay(acceptor, tcp, peer, upstream));
                }
            });
        })?;
    tracing::info!(%addr, %upstream, "TLS listener relaying to the plain listener");
    Ok(addr)
}

async fn relay(acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr, upstream: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics::counter!("neopro_broker_tls_handshake_failures_total", "reason" => "error").increment(1);
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics::counter!("neopro_broker_tls_handshake_failures_total", "reason" => "timeout").increment(1);
            tracing::info!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let mut plain = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%upstream, error = %e, "cannot reach the plain listener");
            return;
        }
    };
    let _ = plain.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
}
