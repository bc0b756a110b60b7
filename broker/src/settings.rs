//! `neopro-broker` settings: defaults < `--config FILE` (TOML) <
//! `NEOPRO_BROKER__*` environment variables < flags (which also have their
//! own environment names, e.g. `--listen` / `NEOPRO_BROKER_LISTEN`).
//!
//! The one sizing decision an operator must make is [`LogSettings`]: rumqttd
//! keeps every message in an in-memory ring per subscription filter, and a
//! subscriber that falls further behind than that ring silently loses
//! messages (the publisher already had its PUBACK). The ring for the
//! ingestor's filter (`{prefix}/sites/+/impressions`) is therefore sized
//! from "how many messages may pile up while the ingestor is away".

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything the embedded broker needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSettings {
    /// Plain MQTT (3.1.1) listener. Port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Credentials file (see `credentials.rs`); required unless
    /// `allow_anonymous`.
    pub credentials: Option<PathBuf>,
    /// Accept clients without checking any credentials. rumqttd cannot mix
    /// anonymous and authenticated clients on one listener, so this turns
    /// authentication, and with it the topic ACL (`acl.rs`), off entirely;
    /// it is refused together with `credentials`, and with any listener
    /// (plain, TLS, websocket) outside loopback: anonymous mode is for tests
    /// and the simulator on one host.
    pub allow_anonymous: bool,
    /// Prometheus `/metrics` and `/healthz`.
    pub http_addr: SocketAddr,
    /// Optional MQTT-over-TLS listener.
    pub tls: Option<TlsSettings>,
    /// Optional MQTT-over-websocket listener (plain ws; put a TLS-terminating
    /// proxy in front for wss).
    pub websocket: Option<WebsocketSettings>,
    /// Topic prefix of our traffic (`neopro`); the broker pre-creates the
    /// per-kind wildcard filters under it and sizes the ingestor's log.
    pub topic_prefix: String,
    /// Router and connection limits.
    pub limits: Limits,
    /// In-memory log sizing.
    pub log: LogSettings,
    /// How often the credentials file's modification time is checked (a
    /// SIGHUP reloads at once). 0 disables the file watch.
    pub credentials_poll_secs: u64,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1883".parse().expect("static address"),
            credentials: None,
            allow_anonymous: false,
            http_addr: "0.0.0.0:9883".parse().expect("static address"),
            tls: None,
            websocket: None,
            topic_prefix: schema::mqtt::DEFAULT_PREFIX.to_owned(),
            limits: Limits::default(),
            log: LogSettings::default(),
            credentials_poll_secs: 2,
        }
    }
}

impl BrokerSettings {
    /// Loopback, ephemeral ports, anonymous clients, logs sized generously
    /// (memory is only used by messages actually published). What
    /// [`crate::EmbeddedBroker::start_for_tests`] uses.
    pub fn for_tests() -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("static address"),
            http_addr: "127.0.0.1:0".parse().expect("static address"),
            allow_anonymous: true,
            log: LogSettings {
                outage_messages: 1_000_000,
                avg_message_bytes: 2048,
                other_filter_bytes: 256 * 1024 * 1024,
                segments: 8,
            },
            ..Self::default()
        }
    }

    /// Refuses contradictory or unsafe settings before anything is bound.
    pub fn validate(&self) -> anyhow::Result<()> {
        match (&self.credentials, self.allow_anonymous) {
            (Some(_), true) => anyhow::bail!(
                "--allow-anonymous and --credentials are mutually exclusive: rumqttd either checks \
                 every client or none"
            ),
            (None, false) => anyhow::bail!(
                "no credentials file: pass --credentials FILE (NEOPRO_BROKER_CREDENTIALS), or \
                 --allow-anonymous for a closed test network"
            ),
            _ => {}
        }
        if self.allow_anonymous {
            let listeners = std::iter::once(("listen", self.listen))
                .chain(self.tls.as_ref().map(|t| ("tls.listen", t.listen)))
                .chain(self.websocket.as_ref().map(|w| ("websocket.listen", w.listen)));
            for (name, addr) in listeners {
                anyhow::ensure!(
                    addr.ip().is_loopback(),
                    "--allow-anonymous needs every listener on loopback, but {name} is {addr}: anonymous \
                     mode has no authentication and no topic ACL (any client could read and forge every \
                     site's traffic); pass --credentials FILE, or listen on 127.0.0.1"
                );
            }
        }
        schema::mqtt::Topics::new(self.topic_prefix.clone()).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.log.segments >= 1, "log.segments must be at least 1");
        anyhow::ensure!(
            self.log.outage_messages >= 1 && self.log.avg_message_bytes >= 64,
            "log.outage_messages must be >= 1 and log.avg_message_bytes >= 64"
        );
        anyhow::ensure!(self.limits.max_connections >= 1, "limits.max_connections must be >= 1");
        anyhow::ensure!(
            self.limits.max_outgoing_inflight >= 1,
            "limits.max_outgoing_inflight must be >= 1"
        );
        anyhow::ensure!(
            self.limits.connection_timeout_ms >= 100,
            "limits.connection_timeout_ms must be >= 100"
        );
        Ok(())
    }
}

/// TLS listener (rustls). The certificate and key are re-read by rumqttd
/// for every new connection, so a renewed certificate needs no restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Default `0.0.0.0:8883`.
    #[serde(default = "default_tls_listen")]
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

pub fn default_tls_listen() -> SocketAddr {
    "0.0.0.0:8883".parse().expect("static address")
}

/// Websocket listener (MQTT over `ws://`, subprotocol `mqtt`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebsocketSettings {
    /// Default `0.0.0.0:8080`.
    #[serde(default = "default_ws_listen")]
    pub listen: SocketAddr,
}

pub fn default_ws_listen() -> SocketAddr {
    "0.0.0.0:8080".parse().expect("static address")
}

/// Connection and router limits.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Simultaneous MQTT connections (the fleet simulator holds 10,000
    /// sessions, plus the ingestor and operators).
    pub max_connections: usize,
    /// Largest MQTT packet accepted. At least `schema::mqtt::MAX_PACKET_BYTES`
    /// plus room for the fixed header and topic.
    pub max_payload_size: usize,
    /// QoS 1 messages a client may have in flight towards the broker (the
    /// inbound window).
    pub max_inflight_count: usize,
    /// QoS 1 messages the broker may have in flight towards one client,
    /// unacknowledged (the outbound window; upstream rumqttd fixes it at 100,
    /// our vendored patch 3 reads it from here). The ingestor acknowledges
    /// only after its rows commit, so this bounds how many envelopes wait in
    /// its open and committing batches: at 100 its writers starve between
    /// commits. The window's buffer grows on demand, so a TV box that reads
    /// one receipt at a time pays nothing for it.
    pub max_outgoing_inflight: u16,
    /// A TCP connection must send CONNECT within this time.
    pub connection_timeout_ms: u16,
    /// Pause between two accepted connections (rumqttd's accept-loop throttle;
    /// 0 = accept as fast as possible, which a 10k-box reconnect storm needs).
    pub next_connection_delay_ms: u64,
    /// QoS 0 messages read per scheduling round for one subscriber.
    pub max_outgoing_packet_count: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_240,
            max_payload_size: schema::mqtt::MAX_PACKET_BYTES + 64 * 1024,
            max_inflight_count: 100,
            max_outgoing_inflight: 400,
            connection_timeout_ms: 30_000,
            next_connection_delay_ms: 0,
            max_outgoing_packet_count: 200,
        }
    }
}

/// Sizing of rumqttd's in-memory logs (one ring per subscription filter).
///
/// The ingestor's filter (`{prefix}/sites/+/impressions`) gets
/// `outage_messages × avg_message_bytes` bytes: at a fleet-wide publish rate
/// of R envelopes/s, the ingestor may be away `outage_messages / R` seconds
/// before the oldest undelivered envelopes are overwritten (a `cursor_jump`
/// alert). The memory is used as traffic flows (the ring is not trimmed by
/// acknowledgements), so budget it as resident memory.
///
/// Every other filter (one per site for receipts, status, debugging
/// subscriptions) gets `other_filter_bytes`; a site offline long enough to
/// overflow it loses old receipts, which only makes its edge resend those
/// impressions (the database absorbs the duplicates).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// Envelopes that may pile up for the ingestor while it is away.
    pub outage_messages: u64,
    /// Average envelope size on the wire (payload + topic), bytes.
    pub avg_message_bytes: u64,
    /// Log budget of every other filter, bytes.
    pub other_filter_bytes: u64,
    /// Segments per log (the ring drops a whole segment at a time, so more
    /// segments drop less at once; rumqttd keeps one extra active segment).
    pub segments: usize,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            // 200k envelopes × 2 KiB ≈ 400 MiB: at 300 envelopes/s (10k boxes,
            // one envelope each per ~30 s) the ingestor may be away ~11 min; at
            // 30/s (1k boxes) ~1 h 50 min.
            outage_messages: 200_000,
            avg_message_bytes: 2048,
            other_filter_bytes: 512 * 1024,
            segments: 10,
        }
    }
}

/// How one log is cut into rumqttd segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentPlan {
    pub max_segment_size: usize,
    pub max_segment_count: usize,
}

impl SegmentPlan {
    /// `total` bytes in `segments` segments (each at least 4 KiB; rumqttd
    /// refuses segments under 1 KiB).
    pub fn for_bytes(total: u64, segments: usize) -> Self {
        let segments = segments.max(1);
        let size = (total / segments as u64).max(4096);
        Self {
            max_segment_size: usize::try_from(size).unwrap_or(usize::MAX),
            max_segment_count: segments,
        }
    }

    /// Most bytes this log holds before it drops its oldest segment.
    pub fn capacity_bytes(&self) -> u64 {
        self.max_segment_size as u64 * self.max_segment_count as u64
    }
}

impl LogSettings {
    pub fn ingestor_plan(&self) -> SegmentPlan {
        SegmentPlan::for_bytes(
            self.outage_messages.saturating_mul(self.avg_message_bytes),
            self.segments,
        )
    }

    pub fn other_plan(&self) -> SegmentPlan {
        SegmentPlan::for_bytes(self.other_filter_bytes, self.segments.min(4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plans() {
        let l = LogSettings::default();
        let p = l.ingestor_plan();
        assert_eq!(p.max_segment_count, 10);
        assert_eq!(p.capacity_bytes(), 200_000 * 2048);
        assert!(l.other_plan().capacity_bytes() <= 512 * 1024);
        assert_eq!(SegmentPlan::for_bytes(10, 3).max_segment_size, 4096);
    }

    #[test]
    fn validation() {
        let mut s = BrokerSettings::default();
        assert!(s.validate().is_err(), "no credentials and no anonymous");
        s.allow_anonymous = true;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("listen is 0.0.0.0:1883"), "anonymous off loopback: {e}");
        s.listen = "127.0.0.1:1883".parse().unwrap();
        s.validate().unwrap();
        s.websocket = Some(WebsocketSettings {
            listen: default_ws_listen(),
        });
        assert!(s.validate().is_err(), "anonymous websocket off loopback");
        s.websocket = Some(WebsocketSettings {
            listen: "[::1]:8080".parse().unwrap(),
        });
        s.validate().unwrap();
        s.tls = Some(TlsSettings {
            listen: default_tls_listen(),
            cert: "/c".into(),
            key: "/k".into(),
        });
        assert!(s.validate().is_err(), "anonymous TLS off loopback");
        s.tls = None;
        s.credentials = Some("/x".into());
        assert!(s.validate().is_err(), "both");
        assert!(BrokerSettings::default().limits.max_payload_size > schema::mqtt::MAX_PACKET_BYTES);
        BrokerSettings::for_tests().validate().unwrap();
    }

    #[test]
    fn example_config_parses_to_defaults() {
        let s: BrokerSettings = toml::from_str(include_str!("../deploy/broker.toml.example")).unwrap();
        s.validate().unwrap();
        let d = BrokerSettings::default();
        assert_eq!(s.listen, d.listen);
        assert_eq!(s.limits.max_payload_size, d.limits.max_payload_size);
        assert_eq!(s.log.ingestor_plan(), d.log.ingestor_plan());
        assert_eq!(s.log.other_plan(), d.log.other_plan());
    }
}
