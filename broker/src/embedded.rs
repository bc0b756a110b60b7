//! rumqttd embedded in our process: the production broker, and the broker
//! that tests and the fleet simulator start in-process on ephemeral ports.
//!
//! Why a dedicated thread and no stop: `rumqttd::Broker::start()` blocks
//! forever (one OS thread per listener, each with its own single-threaded
//! tokio runtime, plus a router thread) and has no shutdown API. So
//! [`EmbeddedBroker::start`] runs it on its own thread and returns once every
//! listener accepts TCP connections; the broker lives until the process
//! exits (the binary exits on SIGTERM; a test process simply ends).
//!
//! Port 0 means "any free port": rumqttd binds its listeners itself and does
//! not report the port, so we bind `127.0.0.1:0` (or the requested IP) with
//! a std listener, read the port, close it, and hand that port to rumqttd.
//! Should another process grab the port in between, rumqttd's listener
//! thread ends and we retry with new ports.
//!
//! The router is configured from [`BrokerSettings`]: packet limit above
//! `schema::mqtt::MAX_PACKET_BYTES`, 10k+ connections, the outbound window
//! `limits.max_outgoing_inflight` (vendored patch 3), and
//! in-memory logs sized per [`crate::settings::LogSettings`]. The wildcard
//! filters of our three topic kinds are created at start
//! (`initialized_filters`) so that a publish made before the ingestor
//! subscribes (after a broker restart) lands in the one shared wildcard log
//! instead of creating a log per site topic (`dynamic_filters`, which must
//! stay on: without a matching filter rumqttd disconnects the publisher).
//!
//! With a credentials file, every connection gets the topic ACL of its
//! account's role ([`crate::acl`], enforced by rumqttd's router: vendored
//! patch 4), the role read from the [`Authenticator`] when the connection is
//! set up, so a reload that changes a role applies to new connections.
//! Anonymous mode (tests and the simulator, on loopback only: see
//! [`BrokerSettings::validate`]) has no ACL at all.

use crate::acl::Policy;
use crate::auth::Authenticator;
use crate::observe::{self, Observer};
use crate::settings::{BrokerSettings, SegmentPlan};
use anyhow::Context;
use rumqttd::{Config, ConnectionSettings, RouterConfig, SegmentConfig, ServerSettings};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running rumqttd. Dropping it does not stop the broker (rumqttd cannot
/// be stopped); the threads end with the process.
pub struct EmbeddedBroker {
    /// Plain MQTT listener, as bound (port resolved).
    pub mqtt_addr: SocketAddr,
    /// TLS listener, when configured.
    pub tls_addr: Option<SocketAddr>,
    /// Websocket listener, when configured.
    pub ws_addr: Option<SocketAddr>,
    auth: Option<Arc<Authenticator>>,
    observer: Arc<Observer>,
    thread: JoinHandle<()>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("mqtt_addr", &self.mqtt_addr)
            .field("tls_addr", &self.tls_addr)
            .field("ws_addr", &self.ws_addr)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// How long [`EmbeddedBroker::start`] waits for the listeners.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const PORT_ATTEMPTS: usize = 5;

impl EmbeddedBroker {
    /// Starts rumqttd as `settings` say and returns once every listener
    /// accepts connections. Loads the credentials file (unless anonymous).
    pub fn start(settings: &BrokerSettings) -> anyhow::Result<Self> {
        settings.validate()?;
        let auth = match &settings.credentials {
            Some(path) => Some(Authenticator::load(path)?),
            None => None,
        };
        Self::start_with_auth(settings, auth)
    }

    /// As [`start`](Self::start), with an already loaded authenticator (the
    /// binary keeps it to reload it on SIGHUP).
    pub fn start_with_auth(settings: &BrokerSettings, auth: Option<Arc<Authenticator>>) -> anyhow::Result<Self> {
        settings.validate()?;
        if let Some(tls) = &settings.tls {
            crate::tls_front::load(&tls.cert, &tls.key)?;
        }
        let mut last_err = None;
        for attempt in 1..=PORT_ATTEMPTS {
            let mqtt_addr = resolve_port(settings.listen)?;
            let ws_addr = settings
                .websocket
                .as_ref()
                .map(|w| resolve_port(w.listen))
                .transpose()?;
            let observer = Observer::new(settings);
            let config = build_config(settings, auth.as_ref(), &observer, mqtt_addr, ws_addr);
            let mut broker = rumqttd::Broker::new(config);
            let meters = broker.meters().context("rumqttd meters link")?;
            let alerts = broker.alerts().context("rumqttd alerts link")?;
            observe::spawn(Arc::clone(&observer), meters, alerts)?;
            let thread = std::thread::Builder::new()
                .name("rumqttd".into())
                .spawn(move || {
                    if let Err(e) = broker.start() {
                        tracing::error!(error = %e, "rumqttd stopped");
                    }
                })
                .context("spawning the rumqttd thread")?;
            let addrs: Vec<SocketAddr> = std::iter::once(mqtt_addr).chain(ws_addr).collect();
            match wait_listening(&addrs, &thread) {
                Ok(()) => {
                    let backlog = listen_backlog(settings);
                    for a in &addrs {
                        match crate::backlog::widen(*a, backlog) {
                            crate::backlog::Widened::To(n) => {
                                tracing::debug!(listener = %a, backlog = n, "listen backlog widened")
                            }
                            crate::backlog::Widened::Unchanged(why) => tracing::warn!(
                                listener = %a,
                                why,
                                "listen backlog left at rumqttd's 128: a fleet reconnecting at once will see dropped SYNs"
                            ),
                        }
                    }
                    let tls_addr = match &settings.tls {
                        Some(t) => Some(crate::tls_front::spawn(
                            t.listen,
                            connectable(mqtt_addr),
                            t.cert.clone(),
                            t.key.clone(),
                        )?),
                        None => None,
                    };
                    tracing::info!(
                        mqtt = %mqtt_addr,
                        tls = ?tls_addr,
                        websocket = ?ws_addr,
                        anonymous = auth.is_none(),
                        ingestor_log_bytes = settings.log.ingestor_plan().capacity_bytes(),
                        other_log_bytes = settings.log.other_plan().capacity_bytes(),
                        max_connections = settings.limits.max_connections,
                        "embedded broker listening"
                    );
                    return Ok(Self {
                        mqtt_addr,
                        tls_addr,
                        ws_addr,
                        auth,
                        observer,
                        thread,
                    });
                }
                Err(e) => {
                    let retry = thread.is_finished()
                        && (settings.listen.port() == 0
                            || settings.websocket.as_ref().is_some_and(|w| w.listen.port() == 0));
                    if !retry {
                        return Err(e);
                    }
                    tracing::warn!(attempt, error = %e, "a picked port was taken meanwhile; retrying");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("broker did not start")))
    }

    /// Loopback, ephemeral port, anonymous clients: for tests and the
    /// simulator.
    pub fn start_for_tests() -> anyhow::Result<Self> {
        Self::start(&BrokerSettings::for_tests())
    }

    /// Loopback, ephemeral port, accounts from `credentials`.
    pub fn start_for_tests_with_credentials(credentials: &std::path::Path) -> anyhow::Result<Self> {
        let settings = BrokerSettings {
            allow_anonymous: false,
            credentials: Some(credentials.to_owned()),
            ..BrokerSettings::for_tests()
        };
        Self::start(&settings)
    }

    /// `mqtt://HOST:PORT` (loopback when the listener is on all interfaces).
    pub fn url(&self) -> String {
        let a = connectable(self.mqtt_addr);
        format!("mqtt://{a}")
    }

    /// The plain listener as a [`runtime::mqtt::MqttUrl`] with these
    /// credentials.
    pub fn mqtt_url(&self, username: Option<&str>, password: Option<&str>) -> runtime::mqtt::MqttUrl {
        let a = connectable(self.mqtt_addr);
        runtime::mqtt::MqttUrl {
            tls: false,
            host: a.ip().to_string(),
            port: a.port(),
            username: username.map(str::to_owned),
            password: password.map(str::to_owned),
            ca_file: None,
        }
    }

    /// A loopback address to reach the plain listener.
    pub fn connect_addr(&self) -> SocketAddr {
        connectable(self.mqtt_addr)
    }

    pub fn authenticator(&self) -> Option<&Arc<Authenticator>> {
        self.auth.as_ref()
    }

    pub fn observer(&self) -> &Arc<Observer> {
        &self.observer
    }

    /// False if rumqttd's thread ended (every listener failed).
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }
}

fn connectable(a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        let ip = match a.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(ip, a.port())
    } else {
        a
    }
}

/// Port 0 → a port that was free a moment ago on that IP.
fn resolve_port(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = TcpListener::bind(addr).with_context(|| format!("finding a free port on {}", addr.ip()))?;
    let a = l.local_addr()?;
    drop(l);
    Ok(a)
}

fn segment(p: SegmentPlan) -> SegmentConfig {
    SegmentConfig {
        max_segment_size: p.max_segment_size,
        max_segment_count: p.max_segment_count,
    }
}

/// The rumqttd configuration for these settings (ports resolved); with
/// `auth`, each connection's topic ACL counts its refusals in `observer`.
pub fn build_config(
    s: &BrokerSettings,
    auth: Option<&Arc<Authenticator>>,
    observer: &Observer,
    mqtt: SocketAddr,
    ws: Option<SocketAddr>,
) -> Config {
    let topics = schema::mqtt::Topics::new(s.topic_prefix.clone()).expect("validated prefix");
    let ingestor_filter = topics.all_sites(schema::mqtt::TopicKind::Impressions);
    let other = s.log.other_plan();
    let router = RouterConfig {
        max_connections: s.limits.max_connections,
        max_outgoing_packet_count: s.limits.max_outgoing_packet_count,
        max_outgoing_inflight: Some(s.limits.max_outgoing_inflight),
        max_segment_size: other.max_segment_size,
        max_segment_count: other.max_segment_count,
        custom_segment: Some(HashMap::from([(
            ingestor_filter.clone(),
            segment(s.log.ingestor_plan()),
        )])),
        initialized_filters: Some(vec![
            ingestor_filter,
            topics.all_sites(schema::mqtt::TopicKind::Receipts),
            topics.all_sites(schema::mqtt::TopicKind::Status),
        ]),
        ..RouterConfig::default()
    };
    let max_payload_size = s.limits.max_payload_size.max(schema::mqtt::MAX_PACKET_BYTES + 1024);
    let mut connections = ConnectionSettings {
        connection_timeout_ms: s.limits.connection_timeout_ms,
        max_payload_size,
        max_inflight_count: s.limits.max_inflight_count,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
        authorizer: None,
    };
    if let Some(a) = auth {
        connections.set_auth_handler(a.handler());
        let policy = Policy::new(&topics, max_payload_size, Arc::clone(&observer.acl_denied));
        let a = Arc::clone(a);
        connections.set_authorizer(move |client_id, username| {
            let acl: Arc<dyn rumqttd::ConnectionAcl> =
                Arc::new(policy.connection(client_id, username, a.role(username)));
            Some(acl)
        });
    }
    let server = |name: &str, listen: SocketAddr| ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: s.limits.next_connection_delay_ms,
        connections: connections.clone(),
    };
    // TLS is terminated by `tls_front` (handshakes with a deadline, in
    // parallel) and relayed to this listener; rumqttd's own TLS is not used.
    let v4 = HashMap::from([("plain".to_owned(), server("mqtt", mqtt))]);
    let ws = ws.map(|addr| HashMap::from([("ws".to_owned(), server("ws", addr))]));
    // Meters and alerts are pushed by rumqttd's timer thread every second
    // to the links `observe.rs` reads.
    let metrics = serde_json::from_value(serde_json::json!({
        "meters": { "push_interval": 1 },
        "alerts": { "push_interval": 1 },
    }))
    .expect("static metrics settings");
    Config {
        id: 0,
        router,
        v4: Some(v4),
        v5: None,
        ws,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: Some(metrics),
    }
}

/// The accept queue asked for: room for every allowed connection to arrive
/// at once (the kernel caps it at `net.core.somaxconn`).
fn listen_backlog(settings: &BrokerSettings) -> i32 {
    i32::try_from(settings.limits.max_connections.clamp(1024, 65_535)).unwrap_or(65_535)
}

/// Waits until every address is in LISTEN state (Linux: read from
/// `/proc/net/tcp*`, which does not disturb rumqttd; elsewhere: a TCP
/// connect, which rumqttd logs as a failed CONNECT).
fn wait_listening(addrs: &[SocketAddr], thread: &JoinHandle<()>) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if thread.is_finished() {
            anyhow::bail!("rumqttd stopped while starting (a listener could not bind {addrs:?}?)");
        }
        let ready = addrs.iter().all(|a| match proc_listening(a.port()) {
            Some(l) => l,
            None => TcpStream::connect_timeout(&connectable(*a), Duration::from_millis(200)).is_ok(),
        });
        if ready {
            // rumqttd binds each listener before accepting; give a thread
            // that failed its bind (port taken by someone else) a moment to
            // show it.
            std::thread::sleep(Duration::from_millis(20));
            if !thread.is_finished() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("rumqttd did not listen on {addrs:?} within {READY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `Some(true)` if a socket listens on `port` (any address), `None` when
/// `/proc` is not available.
fn proc_listening(port: u16) -> Option<bool> {
    crate::backlog::listening_inodes(port).map(|inodes| !inodes.is_empty())
}
