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

/// The URL of the database `#[sqlx::test]` made for this test.
pub async fn db_url(pool: &sqlx::PgPool) -> String {
    let name: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut u = url::Url::parse(&base).unwrap();
    u.set_path(&format!("/{name}"));
    u.to_string()
}

/// A real ingestor (`ingestor::App`) writing into the test's database.
pub struct Ingestor {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    client_id: String,
    mqtt: String,
}

impl Ingestor {
    /// Starts it on `mqtt` under `prefix`. Its persistent session and
    /// subscription are made first, acknowledged to the test
    /// ([`ensure_session`]), as a long-running ingestor's exist: whatever is
    /// published once this returns (it waits until the ingestor is migrated
    /// and connected) is queued for it, whether or not its own SUBSCRIBE
    /// has reached the broker yet.
    pub async fn start(pool: &sqlx::PgPool, mqtt: &str, prefix: &str) -> Ingestor {
        use std::sync::atomic::Ordering;
        let client_id = unique("ingestor");
        ensure_session(mqtt, &client_id, prefix).await;
        let is = ingestor::Settings {
            database_url: db_url(pool).await,
            mqtt_url: mqtt.parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            topic_prefix: prefix.to_owned(),
            client_id: client_id.clone(),
            ..Default::default()
        };
        let ing = ingestor::App::build(is).await.unwrap();
        let health = ing.health();
        let stop = CancellationToken::new();
        let task = tokio::spawn(ing.run(stop.clone()));
        wait_until("ingestor ready", 60, || {
            let h = health.clone();
            async move { h.db.load(Ordering::Relaxed) && h.mqtt.load(Ordering::Relaxed) }
        })
        .await;
        Ingestor {
            stop,
            task,
            client_id,
            mqtt: mqtt.to_owned(),
        }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(60), self.task).await;
        if self.mqtt == MOSQUITTO {
            forget_session(&self.mqtt, &self.client_id).await;
        }
    }
}

/// Creates the persistent session of `client_id` with its subscription to
/// every site's impressions under `prefix`, and returns once the broker
/// acknowledged it (SUBACK): what is published from now on is queued for
/// that client, connected or not.
pub async fn ensure_session(mqtt: &str, client_id: &str, prefix: &str) {
    use rumqttc::{AsyncClient, Event, Packet, QoS, SubscribeReasonCode};
    let url: runtime::mqtt::MqttUrl = mqtt.parse().unwrap();
    let mut o = runtime::mqtt::ClientOptions::new(client_id);
    o.clean_session = false;
    o.manual_acks = true;
    let (client, mut el) = AsyncClient::new(url.options(&o).unwrap(), 10);
    let filter = schema::Topics::new(prefix.to_owned())
        .unwrap()
        .all_sites(schema::TopicKind::Impressions);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(a))) => {
                    assert!(
                        !a.return_codes.contains(&SubscribeReasonCode::Failure),
                        "the broker refused the session's subscription"
                    );
                    let _ = client.disconnect().await;
                }
                Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("session created");
}

/// Waits until `peer` gets what is published under `prefix`: it subscribes
/// after it connects, on a clean session, so what is published before its
/// SUBACK never reaches it. Publishes an unreadable probe on a probe site's
/// impressions topic until the peer has counted one in `envelopes`; it
/// answers nothing to it, so a probe settles nothing and spends none of the
/// answers it drops. (Only `envelopes` counts probes: late copies may add
/// to it.)
pub async fn wait_peer_subscribed(peer: &testkit::ReceiptPeer, mqtt: &str, prefix: &str) {
    let topic = schema::Topics::new(prefix.to_owned()).unwrap().impressions("probe");
    let probe = RawClient::connect(mqtt, None, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        probe.publish(&topic, false, b"probe".to_vec()).await;
        for _ in 0..10 {
            if peer.state.lock().unwrap().envelopes > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            Instant::now() < deadline,
            "the receipt peer did not subscribe within 30 s"
        );
    }
}

/// Checks, id by id, that PostgreSQL holds each of `want` exactly once for
/// `site`, and nothing else of that site.
pub async fn assert_stored_exactly_once(pool: &sqlx::PgPool, site: &str, want: &std::collections::HashSet<uuid::Uuid>) {
    let rows: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT impression_id, count(*) FROM sponsor_impressions WHERE site_id = $1 GROUP BY impression_id",
    )
    .bind(site)
    .fetch_all(pool)
    .await
    .unwrap();
    let got: std::collections::HashMap<uuid::Uuid, i64> = rows.into_iter().collect();
    let missing: Vec<_> = want.iter().filter(|id| !got.contains_key(id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged plays are not in PostgreSQL: {:?}",
        missing.len(),
        want.len(),
        &missing[..missing.len().min(5)]
    );
    let twice: Vec<_> = got.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    let extra: Vec<_> = got.keys().filter(|id| !want.contains(id)).collect();
    assert!(extra.is_empty(), "rows nobody played: {extra:?}");
}

/// The ids of every row the outbox file holds (read through its own connection).
pub fn outbox_ids(data_dir: &Path) -> std::collections::HashSet<uuid::Uuid> {
    let conn = edge_publisher::outbox::open_connection(&data_dir.join(edge_publisher::outbox::FILE_NAME), 64).unwrap();
    let mut ids = std::collections::HashSet::new();
    edge_publisher::outbox::export_rows(&conn, |r| {
        ids.insert(r.impression.impression_id);
        Ok(())
    })
    .unwrap();
    ids
}

/// A raw MQTT client for the attacker's part: publishes anything, and
/// collects what arrives on the topics it subscribed.
pub struct RawClient {
    pub client: rumqttc::AsyncClient,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<rumqttc::Publish>>>,
    stop: CancellationToken,
}

impl RawClient {
    /// Connects (a clean session, or the persistent session of `client_id`
    /// when given) and subscribes to `subscribe`.
    pub async fn connect(mqtt: &str, client_id: Option<&str>, subscribe: &[String]) -> RawClient {
        use rumqttc::{Event, Packet, QoS};
        let url: runtime::mqtt::MqttUrl = mqtt.parse().unwrap();
        let mut o = runtime::mqtt::ClientOptions::new(client_id.map_or_else(|| unique("raw"), str::to_owned));
        o.clean_session = client_id.is_none();
        let (client, mut el) = runtime::mqtt::client(&url, &o, |opts| {
            opts.set_max_packet_size(16 << 20, 16 << 20);
        })
        .unwrap();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let (c2, r2, s2) = (client.clone(), received.clone(), stop.clone());
        let subs = subscribe.to_vec();
        let mut wanted = subs.len();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    () = s2.cancelled() => { let _ = c2.try_disconnect(); return; }
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for t in &subs {
                            let _ = c2.subscribe(t.clone(), QoS::AtLeastOnce).await;
                        }
                        if wanted == 0 {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        wanted = wanted.saturating_sub(1);
                        if wanted == 0 {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => r2.lock().unwrap().push(p),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("raw MQTT client connected and subscribed")
            .unwrap();
        RawClient { client, received, stop }
    }

    /// Queues a QoS 1 publish (the caller waits on what the receiver does).
    pub async fn publish(&self, topic: &str, retain: bool, payload: Vec<u8>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
    }

    /// Waits for the first message received on `topic`.
    pub async fn first_on(&self, topic: &str, secs: u64) -> rumqttc::Publish {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(p) = self.received.lock().unwrap().iter().find(|p| p.topic == topic) {
                return p.clone();
            }
            assert!(Instant::now() < deadline, "nothing received on {topic} in {secs} s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for RawClient {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
