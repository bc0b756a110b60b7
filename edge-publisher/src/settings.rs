//! Settings of one edge: defaults < `/etc/neopro/edge.toml` (or `--config`)
//! < `NEOPRO_EDGE__*` environment < flags (`--site-id`/`SITE_ID`, …).
//!
//! Durations are plain integers with their unit in the name (`batch_delay_ms`)
//! so that a TOML file, an environment variable and a flag all read the same.

use runtime::mqtt::MqttUrl;
use runtime::telemetry::LogFormat;
use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::outbox::OutboxConfig;

/// Everything an edge needs; see the README for each key.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// This box's site id (`[A-Za-z0-9_-]{1,64}`); MQTT client id and topic level.
    pub site_id: String,
    pub mqtt_url: MqttUrl,
    /// MQTT client id; defaults to the site id.
    pub mqtt_client_id: Option<String>,
    pub topic_prefix: String,
    pub data_dir: PathBuf,
    /// `None` disables HTTP (embedded use); `"off"` in files and env.
    #[serde(deserialize_with = "opt_addr")]
    pub http_addr: Option<SocketAddr>,
    pub max_body_bytes: usize,
    /// Origins whose pages may call the HTTP API from a browser (CORS):
    /// `scheme://host[:port]` exactly, or `scheme://host:*` for any port. A
    /// list in TOML, comma-separated in `NEOPRO_EDGE_CORS_ORIGINS`.
    #[serde(deserialize_with = "list_or_commas")]
    pub cors_origins: Vec<String>,
    pub outbox_max_rows: u64,
    pub outbox_max_bytes: u64,
    pub outbox_warn_ratio: f64,
    pub sqlite_cache_kib: u32,
    pub batch_max_impressions: usize,
    pub batch_max_bytes: usize,
    pub batch_delay_ms: u64,
    pub max_inflight_batches: usize,
    pub receipt_timeout_ms: u64,
    pub status_interval_ms: u64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub keep_alive_s: u64,
    pub shutdown_drain_s: u64,
    pub log_format: LogFormat,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            site_id: String::new(),
            mqtt_url: "mqtt://127.0.0.1:1883".parse().expect("static URL"),
            mqtt_client_id: None,
            topic_prefix: schema::mqtt::DEFAULT_PREFIX.to_owned(),
            data_dir: default_data_dir(),
            http_addr: Some(SocketAddr::from(([0, 0, 0, 0], 3000))),
            max_body_bytes: 8 << 20,
            cors_origins: default_cors_origins(),
            outbox_max_rows: 2_000_000,
            outbox_max_bytes: 1 << 30,
            outbox_warn_ratio: 0.8,
            sqlite_cache_kib: 2048,
            batch_max_impressions: 500,
            batch_max_bytes: schema::mqtt::DEFAULT_MAX_ENVELOPE_BYTES,
            batch_delay_ms: 2000,
            max_inflight_batches: 8,
            receipt_timeout_ms: 30_000,
            status_interval_ms: 60_000,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
            keep_alive_s: 30,
            shutdown_drain_s: 10,
            log_format: LogFormat::Human,
        }
    }
}

/// `~/neopro/data`, where the seed kept its buffer.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/neopro"))
        .join("neopro")
        .join("data")
}

/// The box's own pages: the TV frontend is served from the box itself.
pub fn default_cors_origins() -> Vec<String> {
    vec!["http://localhost:*".to_owned(), "http://neopro.local:*".to_owned()]
}

/// A list, or one string of comma-separated items (environment, flags).
fn list_or_commas<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        String(String),
    }
    let items = match ListOrString::deserialize(d)? {
        ListOrString::List(v) => v,
        ListOrString::String(s) => s.split(',').map(str::to_owned).collect(),
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect())
}

fn opt_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    match s.as_deref().map(str::trim) {
        None | Some("" | "off" | "none" | "disabled") => Ok(None),
        Some(a) => a.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

impl Settings {
    /// Settings for a site with everything else at its default.
    pub fn for_site(site_id: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            site_id: site_id.into(),
            data_dir: data_dir.into(),
            ..Self::default()
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.site_id.is_empty() {
            anyhow::bail!("site_id is required (--site-id or SITE_ID)");
        }
        schema::validate::site_id(&self.site_id).map_err(|m| anyhow::anyhow!("site_id: {m}"))?;
        schema::Topics::new(self.topic_prefix.clone()).map_err(|m| anyhow::anyhow!("topic_prefix: {m}"))?;
        if self.batch_max_bytes > schema::mqtt::MAX_PACKET_BYTES - 4096 {
            anyhow::bail!(
                "batch_max_bytes {} exceeds the MQTT packet limit {}",
                self.batch_max_bytes,
                schema::mqtt::MAX_PACKET_BYTES
            );
        }
        if self.batch_max_impressions == 0 || self.max_inflight_batches == 0 {
            anyhow::bail!("batch_max_impressions and max_inflight_batches must be >= 1");
        }
        for o in &self.cors_origins {
            OriginPattern::parse(o).map_err(|m| anyhow::anyhow!("cors_origins: {m}"))?;
        }
        if !(0.0..=1.0).contains(&self.outbox_warn_ratio) {
            anyhow::bail!("outbox_warn_ratio must be between 0 and 1");
        }
        Ok(())
    }

    pub fn outbox_config(&self) -> OutboxConfig {
        OutboxConfig {
            data_dir: self.data_dir.clone(),
            max_rows: self.outbox_max_rows,
            max_bytes: self.outbox_max_bytes,
            warn_ratio: self.outbox_warn_ratio,
            cache_kib: self.sqlite_cache_kib,
        }
    }

    pub fn client_id(&self) -> String {
        self.mqtt_client_id.clone().unwrap_or_else(|| self.site_id.clone())
    }

    pub fn batch_delay(&self) -> Duration {
        Duration::from_millis(self.batch_delay_ms)
    }

    pub fn receipt_timeout(&self) -> Duration {
        Duration::from_millis(self.receipt_timeout_ms.max(100))
    }
}

/// An allowed browser origin: `scheme://host[:port]` exactly, or
/// `scheme://host:*` for that scheme and host on any port (or none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginPattern {
    Exact(String),
    AnyPort(String),
}

impl OriginPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim().trim_end_matches('/').to_ascii_lowercase();
        let (base, any_port) = match t.strip_suffix(":*") {
            Some(b) => (b.to_owned(), true),
            None => (t.clone(), false),
        };
        let rest = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"))
            .ok_or_else(|| format!("'{s}': an origin is http://host[:port] or https://host[:port] (port may be *)"))?;
        if rest.is_empty() || rest.contains(['/', '*', '?', '#', '@']) {
            return Err(format!(
                "'{s}': an origin is scheme://host[:port], without path or wildcard host"
            ));
        }
        Ok(if any_port {
            OriginPattern::AnyPort(base)
        } else {
            OriginPattern::Exact(base)
        })
    }

    pub fn matches(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        match self {
            OriginPattern::Exact(e) => origin == *e,
            OriginPattern::AnyPort(base) => {
                origin == *base
                    || origin
                        .strip_prefix(base.as_str())
                        .and_then(|r| r.strip_prefix(':'))
                        .is_some_and(|port| {
                            !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
                        })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_come_as_a_list_or_comma_separated() {
        let s: Settings = runtime::settings::load(
            None,
            None,
            "NEOPRO_EDGE_TEST_UNSET",
            &[
                ("site_id", Some("club-1".into())),
                ("cors_origins", Some(" https://tv.example , http://10.0.0.5:* ,".into())),
            ],
        )
        .unwrap();
        assert_eq!(s.cors_origins, ["https://tv.example", "http://10.0.0.5:*"]);
        s.validate().unwrap();
        let toml: Settings = config::Config::builder()
            .add_source(config::File::from_str(
                "site_id = 'club-1'\ncors_origins = ['http://a.example:8080']",
                config::FileFormat::Toml,
            ))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(toml.cors_origins, ["http://a.example:8080"]);
        assert_eq!(Settings::default().cors_origins, default_cors_origins());
        let wildcard = Settings {
            cors_origins: vec!["*".into()],
            ..Settings::for_site("club-1", "/tmp/x")
        };
        assert!(wildcard.validate().is_err(), "'*' is refused, not allowed");
    }
}
