//! Helpers shared by the integration tests: real brokers, a real edge.
#![allow(dead_code)]

use edge_publisher::{App, Outbox, Settings};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const SEED_BODY: &str = r#"{
  "impressions": [
    {
      "video_filename": "sponsor_coca_cola_30s.mp4",
      "played_at": "2025-12-14T21:30:00.000Z",
      "duration_played": 30,
      "video_duration": 30,
      "completed": true,
      "event_type": "match",
      "period": "halftime",
      "trigger_type": "auto",
      "audience_estimate": 150
    }
  ]
}"#;

pub const MOSQUITTO: &str = "mqtt://127.0.0.1:1883";

pub fn unique(tag: &str) -> String {
    format!("{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

pub fn prefix() -> String {
    format!("test/{}", uuid::Uuid::new_v4().simple())
}

pub fn init() {
    runtime::tls::install_crypto_provider();
    runtime::telemetry::init(runtime::telemetry::LogFormat::Human);
}

/// Settings for a test edge: own site, own prefix, own dir, HTTP on port 0.
pub fn settings(dir: &Path, mqtt: &str, prefix: &str) -> Settings {
    let mut s = Settings::for_site(unique("site"), dir.join("data"));
    s.mqtt_url = mqtt.parse().unwrap();
    s.topic_prefix = prefix.to_owned();
    s.http_addr = Some("127.0.0.1:0".parse().unwrap());
    s.batch_delay_ms = 100;
    s.reconnect_min_ms = 100;
    s.reconnect_max_ms = 1000;
    s
}

pub struct Running {
    pub base: String,
    pub outbox: Outbox,
    pub health: std::sync::Arc<edge_publisher::BrokerHealth>,
    pub token: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub site: String,
    pub mqtt: String,
    pub status_topic: String,
}

impl Running {
    /// Stops the edge; on the shared Mosquitto, also drops its persistent session.
    pub async fn stop(self) {
        self.token.cancel();
        self.task.await.unwrap().unwrap();
        if self.mqtt == MOSQUITTO {
            forget_session(&self.mqtt, &self.site).await;
            clear_retained(&self.mqtt, &self.status_topic).await;
        }
    }
}

pub async fn start(s: Settings) -> Running {
    let site = s.site_id.clone();
    let mqtt = format!("mqtt://{}:{}", s.mqtt_url.host, s.mqtt_url.port);
    let status_topic = schema::Topics::new(s.topic_prefix.clone()).unwrap().status(&site);
    let app = App::build(s).await.unwrap();
    let addr: SocketAddr = app.http_addr().unwrap();
    let outbox = app.outbox().clone();
    let health = app.health();
    let token = CancellationToken::new();
    let task = tokio::spawn(app.run(token.clone()));
    Running {
        base: format!("http://{addr}"),
        outbox,
        health,
        token,
        task,
        site,
        mqtt,
        status_topic,
    }
}

/// Polls `f` until it returns true; panics after `secs`.
pub async fn wait_until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {secs} s waiting for: {what}");
}

/// `n` distinct seed-shaped records starting at index `from`.
pub fn records(tag: &str, from: usize, n: usize) -> Vec<serde_json::Value> {
    (from..from + n)
        .map(|k| {
            serde_json::json!({
                "video_filename": format!("sponsor_{tag}_{k}.mp4"),
                "played_at": format!("2025-12-14T21:{:02}:{:02}.{:03}Z", (k / 60000) % 60, (k / 1000) % 60, k % 1000),
                "duration_played": 30, "video_duration": 30, "completed": true,
                "event_type": "match", "period": "halftime", "trigger_type": "auto", "audience_estimate": 150
            })
        })
        .collect()
}

/// The id the edge derives for `record` of `site`.
pub fn id_of(site: &str, record: &serde_json::Value) -> uuid::Uuid {
    let t = schema::parse_timestamp(record["played_at"].as_str().unwrap()).unwrap();
    schema::derive_impression_id(site, record["video_filename"].as_str().unwrap(), t)
}

pub fn body(records: &[serde_json::Value]) -> String {
    serde_json::json!({ "impressions": records }).to_string()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private Mosquitto on a free loopback port, persistence off (a restart
/// loses every session, like a rumqttd restart).
pub struct PrivateBroker {
    pub port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

impl PrivateBroker {
    pub fn new(dir: &Path) -> Self {
        let port = free_port();
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_packet_size 2000000\n"),
        )
        .unwrap();
        Self {
            port,
            conf,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "private mosquitto did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

pub async fn post(http: &reqwest::Client, base: &str, body: String) -> (u16, serde_json::Value) {
    let r = http
        .post(format!("{base}/api/sync/sponsor-impressions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, v)
}

pub async fn stats(http: &reqwest::Client, base: &str) -> serde_json::Value {
    http.get(format!("{base}/api/sync/sponsor-impressions/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Removes a persistent session from a broker (test hygiene on the shared Mosquitto).
pub async fn forget_session(broker: &str, client_id: &str) {
    let url: runtime::mqtt::MqttUrl = broker.parse().unwrap();
    runtime::mqtt::forget_session(&url, client_id).await.unwrap();
}

/// Clears a retained message (the edge's status) on a shared broker.
pub async fn clear_retained(broker: &str, topic: &str) {
    use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
    let url: runtime::mqtt::MqttUrl = broker.parse().unwrap();
    let mut o = runtime::mqtt::ClientOptions::new(unique("clear"));
    o.clean_session = true;
    let (client, mut el) = AsyncClient::new(url.options(&o).unwrap(), 10);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.publish(topic, QoS::AtLeastOnce, true, Vec::new()).await;
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    let _ = client.disconnect().await;
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}
