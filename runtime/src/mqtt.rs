//! Broker addresses as URLs, and rumqttc options built from them.
//!
//! `mqtt://[user[:password]@]host[:port]` (default port 1883) or
//! `mqtts://…` (TLS, default port 8883, system-independent webpki roots plus
//! an optional `?ca=/path/to/ca.pem`). The password is percent-decoded and
//! never appears in `Display`/`Debug` output, so a URL can be logged.

use anyhow::Context;
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// A parsed broker URL.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Extra CA certificate (PEM) to trust, for private brokers.
    pub ca_file: Option<PathBuf>,
}

impl FromStr for MqttUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let u = url::Url::parse(s).map_err(|e| format!("invalid MQTT URL: {e}"))?;
        let tls = match u.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" | "tls" => true,
            other => {
                return Err(format!(
                    "unsupported MQTT URL scheme '{other}' (use mqtt:// or mqtts://)"
                ))
            }
        };
        let host = u.host_str().filter(|h| !h.is_empty()).ok_or("MQTT URL has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = u.port().unwrap_or(if tls { 8883 } else { 1883 });
        let decode = |s: &str| percent_decode(s);
        let username = Some(u.username()).filter(|s| !s.is_empty()).map(decode);
        let password = u.password().map(decode);
        let ca_file = u
            .query_pairs()
            .find(|(k, _)| k == "ca")
            .map(|(_, v)| PathBuf::from(v.into_owned()));
        Ok(Self {
            tls,
            host,
            port,
            username,
            password,
            ca_file,
        })
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

impl fmt::Display for MqttUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://")?;
        if let Some(u) = &self.username {
            write!(f, "{u}")?;
            if self.password.is_some() {
                write!(f, ":***")?;
            }
            write!(f, "@")?;
        }
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl fmt::Debug for MqttUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for MqttUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for MqttUrl {
    /// Serialises without the password (settings dumps are logged).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Largest packet our clients accept from a broker by default: 16 MiB.
///
/// Deliberately far above anything a broker we configure accepts (the
/// embedded broker and the generated Mosquitto configuration both take
/// [`schema::mqtt::MAX_PACKET_BYTES`] + 64 KiB). rumqttc drops the
/// connection on an incoming packet above its limit, and a QoS 1 message on
/// a persistent session is redelivered at every reconnect: with a limit
/// below the broker's, one oversized message on a topic we subscribe would
/// break every connection from then on. Above it, the message arrives, and
/// the application decides (refuses it as oversized, acknowledges it).
/// What we send stays bounded by [`MAX_OUTGOING_PACKET_BYTES`].
pub const MAX_INCOMING_PACKET_BYTES: usize = 16 * 1024 * 1024;
// Comfortably above what our brokers accept (MAX_PACKET_BYTES + 64 KiB).
const _: () = assert!(MAX_INCOMING_PACKET_BYTES >= 4 * (schema::mqtt::MAX_PACKET_BYTES + 64 * 1024));

/// Largest packet our clients send: one envelope at its limit plus the
/// MQTT header.
pub const MAX_OUTGOING_PACKET_BYTES: usize = schema::mqtt::MAX_PACKET_BYTES + 1024;

/// Session and flow settings common to our clients.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub client_id: String,
    /// `false` = persistent session (what both the edge and the ingestor use).
    pub clean_session: bool,
    pub keep_alive: Duration,
    /// Outgoing QoS 1 messages in flight before rumqttc waits for PUBACKs.
    pub inflight: u16,
    pub manual_acks: bool,
    pub request_channel_capacity: usize,
    /// How long a CONNECT may wait for its CONNACK, and a write for the
    /// socket (rumqttc's default is 5 s). When thousands of boxes reconnect
    /// at once (a broker restart), a broker takes longer than that to answer
    /// them all; a client that gives up reconnects under the same client id,
    /// which makes the broker drop its half-open previous connection, and the
    /// storm feeds itself (measured with 10,000 boxes on rumqttd: 150 s to
    /// settle with 5 s, see the simulator README).
    pub connect_timeout: Duration,
    /// Largest packet accepted from the broker
    /// ([`MAX_INCOMING_PACKET_BYTES`] by default, and why).
    pub max_incoming_packet_bytes: usize,
}

impl ClientOptions {
    pub fn new(client_id: impl Into<String>) -> Self {
        Self {
            client_id: client_id.into(),
            clean_session: false,
            keep_alive: Duration::from_secs(30),
            inflight: 100,
            manual_acks: false,
            request_channel_capacity: 1024,
            connect_timeout: Duration::from_secs(30),
            max_incoming_packet_bytes: MAX_INCOMING_PACKET_BYTES,
        }
    }
}

/// A rumqttc client and event loop for `url` with `c` (including its
/// [`ClientOptions::connect_timeout`], which rumqttc keeps outside
/// `MqttOptions`); `adjust` may change the options first (last will,
/// packet limits).
pub fn client(
    url: &MqttUrl,
    c: &ClientOptions,
    adjust: impl FnOnce(&mut MqttOptions),
) -> anyhow::Result<(rumqttc::AsyncClient, rumqttc::EventLoop)> {
    let mut opts = url.options(c)?;
    adjust(&mut opts);
    let (client, mut el) = rumqttc::AsyncClient::new(opts, c.request_channel_capacity);
    el.network_options
        .set_connection_timeout(c.connect_timeout.as_secs().max(1));
    Ok((client, el))
}

impl MqttUrl {
    /// rumqttc options for this broker. Packet limits (rumqttc's 10 KiB
    /// default would break the connection on the first full batch):
    /// [`ClientOptions::max_incoming_packet_bytes`] in,
    /// [`MAX_OUTGOING_PACKET_BYTES`] out.
    pub fn options(&self, c: &ClientOptions) -> anyhow::Result<MqttOptions> {
        let mut o = MqttOptions::new(c.client_id.clone(), self.host.clone(), self.port);
        o.set_clean_session(c.clean_session)
            .set_keep_alive(c.keep_alive)
            .set_max_packet_size(c.max_incoming_packet_bytes, MAX_OUTGOING_PACKET_BYTES)
            .set_inflight(c.inflight)
            .set_manual_acks(c.manual_acks)
            .set_request_channel_capacity(c.request_channel_capacity);
        if let Some(u) = &self.username {
            o.set_credentials(u.clone(), self.password.clone().unwrap_or_default());
        }
        if self.tls {
            crate::tls::install_crypto_provider();
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            if let Some(ca) = &self.ca_file {
                let pem = std::fs::read(ca).with_context(|| format!("reading CA file {}", ca.display()))?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    roots
                        .add(cert.context("parsing CA PEM")?)
                        .context("adding CA certificate")?;
                }
            }
            let cfg = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(cfg))));
        }
        Ok(o)
    }
}

/// Ends the persistent session `client_id` holds on the broker at `url`:
/// connects with a clean session (which makes the broker discard the stored
/// one) and disconnects. Used to retire a site's session and by tests to
/// leave the shared Mosquitto as they found it. Best effort, bounded by 5 s.
pub async fn forget_session(url: &MqttUrl, client_id: &str) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, Incoming, Outgoing};
    let mut o = ClientOptions::new(client_id);
    o.clean_session = true;
    let (client, mut el) = AsyncClient::new(url.options(&o)?, 10);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    let _ = client.disconnect().await;
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_redacts() {
        let u: MqttUrl = "mqtt://ingestor:s3cr%40t@broker.example:1884".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("broker.example", 1884, false));
        assert_eq!(u.username.as_deref(), Some("ingestor"));
        assert_eq!(u.password.as_deref(), Some("s3cr@t"));
        assert_eq!(u.to_string(), "mqtt://ingestor:***@broker.example:1884");
        assert!(!format!("{u:?}").contains("s3cr"));
        let t: MqttUrl = "mqtts://h?ca=/tmp/ca.pem".parse().unwrap();
        assert_eq!((t.port, t.tls), (8883, true));
        assert_eq!(t.ca_file, Some(PathBuf::from("/tmp/ca.pem")));
        assert_eq!("mqtt://127.0.0.1".parse::<MqttUrl>().unwrap().port, 1883);
        assert!("http://h".parse::<MqttUrl>().is_err());
    }

    #[test]
    fn options_raise_packet_limit() {
        let u: MqttUrl = "mqtt://a:b@127.0.0.1:1883".parse().unwrap();
        let o = u.options(&ClientOptions::new("x")).unwrap();
        assert!(o.max_packet_size() > schema::mqtt::MAX_PACKET_BYTES);
        assert!(!o.clean_session());
        assert_eq!(o.max_packet_size(), MAX_INCOMING_PACKET_BYTES);
    }
}
