//! Shared test helpers: the real App in-process, a publisher that plays the
//! edge (publishes envelopes, collects receipts), impressions, and bounded
//! waits on database counts.
#![allow(dead_code)]

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rumqttc::{AsyncClient, Event, Incoming, QoS};
use schema::{
    derive_impression_id, BatchEnvelope, EventType, Impression, Period, Receipt, TopicKind, Topics, TriggerType,
};
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const MOSQUITTO: &str = "mqtt://127.0.0.1:1883";

/// The embedded rumqttd of this test process (started once: it cannot be
/// stopped; tests share it with their own topic prefixes and client ids).
pub fn embedded_broker_url() -> String {
    static BROKER: std::sync::OnceLock<broker::EmbeddedBroker> = std::sync::OnceLock::new();
    BROKER
        .get_or_init(|| broker::EmbeddedBroker::start_for_tests().expect("embedded broker starts"))
        .url()
}

/// Generates `<case>::mosquitto` and `<case>::embedded` tests from
/// `async fn <case>(pool: PgPool, broker: String)`.
#[allow(unused_macros)]
macro_rules! on_both_brokers {
    ($($case:ident),+ $(,)?) => {$(
        mod $case {
            #[sqlx::test(migrator = "runtime::db::MIGRATOR")]
            async fn mosquitto(pool: sqlx::PgPool) {
                super::$case(pool, $crate::common::MOSQUITTO.to_owned()).await
            }
            #[sqlx::test(migrator = "runtime::db::MIGRATOR")]
            async fn embedded(pool: sqlx::PgPool) {
                super::$case(pool, $crate::common::embedded_broker_url()).await
            }
        }
    )+};
}

/// URL of the database `pool` is connected to (the `#[sqlx::test]` one).
pub async fn db_url(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut u = url::Url::parse(&base).unwrap();
    u.set_path(&format!("/{name}"));
    // Sanity: parseable by sqlx.
    PgConnectOptions::from_str(u.as_str()).unwrap();
    u.to_string()
}

pub fn unique_topics() -> Topics {
    Topics::new(format!("test/{}", Uuid::new_v4().simple())).unwrap()
}

pub fn unique_client_id() -> String {
    format!("ingestor-test-{}", Uuid::new_v4().simple())
}

/// Settings for a test App: own prefix, own client id, port 0.
pub async fn settings(pool: &PgPool, broker: &str, topics: &Topics, client_id: &str) -> ingestor::Settings {
    ingestor::Settings {
        database_url: db_url(pool).await,
        mqtt_url: broker.parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        topic_prefix: topics.prefix().to_owned(),
        client_id: client_id.to_owned(),
        retry_min_ms: 50,
        retry_max_ms: 1000,
        ..Default::default()
    }
}

pub struct Running {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
    pub http: std::net::SocketAddr,
    pub health: std::sync::Arc<ingestor::Health>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("app stops within 60 s")
            .expect("app task")
            .expect("app result");
    }
}

/// Starts a fresh ingestor (a client id no session exists for). Its
/// persistent session and subscription are created first and acknowledged
/// to the test (a SUBACK in [`ensure_session`]), as a long-running
/// ingestor's exist: everything published once this returns is queued for
/// it, whether or not its own SUBSCRIBE has reached the broker yet
/// (`Health::mqtt` says connected, not subscribed).
pub async fn start(settings: ingestor::Settings) -> Running {
    if settings.mqtt_enabled {
        let topics = Topics::new(settings.topic_prefix.clone()).unwrap();
        ensure_session_on(&settings.mqtt_url, &settings.client_id, &topics).await;
    }
    resume(settings).await
}

/// Starts an ingestor whose persistent session exists (made by [`start`],
/// [`ensure_session`] or an earlier run under the same client id) and
/// returns once it is migrated and connected: the session holds its
/// subscription, so nothing published from now on is missed.
pub async fn resume(settings: ingestor::Settings) -> Running {
    runtime::tls::install_crypto_provider();
    if std::env::var_os("RUST_LOG").is_some() {
        runtime::telemetry::init(runtime::telemetry::LogFormat::Human);
    }
    let app = ingestor::App::build(settings).await.unwrap();
    let http = app.http_addr();
    let health = app.health();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run(shutdown.clone()));
    wait_until(|| {
        let h = health.clone();
        async move {
            h.db.load(std::sync::atomic::Ordering::Relaxed) && h.mqtt.load(std::sync::atomic::Ordering::Relaxed)
        }
    })
    .await;
    Running {
        shutdown,
        task,
        http,
        health,
    }
}

/// Polls `f` every 50 ms until it is true (panics after 60 s).
pub async fn wait_until<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "condition not met within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Waits until `sql` (a count) reaches at least `expected`, then returns its value.
pub async fn wait_count(pool: &PgPool, sql: &str, expected: i64) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(-1);
        if n >= expected || tokio::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn now() -> DateTime<Utc> {
    Utc::now()
}

/// `n` valid impressions of `site` with seqs `first..first+n`.
pub fn impressions(site: &str, first: i64, n: usize) -> Vec<Impression> {
    let base = schema::parse_timestamp("2025-12-14T20:00:00Z").unwrap();
    (0..n as i64)
        .map(|k| {
            let seq = first + k;
            let played_at = base + chrono::Duration::seconds(seq * 40);
            Impression {
                impression_id: derive_impression_id(site, "sponsor_coca_cola_30s.mp4", played_at),
                site_id: site.into(),
                seq: Some(seq),
                video_id: None,
                video_filename: "sponsor_coca_cola_30s.mp4".into(),
                played_at,
                duration_played: 30.0,
                video_duration: 30.0,
                completed: true,
                event_type: EventType::Match,
                period: if seq % 2 == 0 { Period::Halftime } else { Period::Loop },
                trigger_type: TriggerType::Auto,
                audience_estimate: Some(100),
            }
        })
        .collect()
}

pub fn envelope(site: &str, outbox: Uuid, first: i64, n: usize) -> BatchEnvelope {
    BatchEnvelope::new(site, outbox, impressions(site, first, n), now())
}

/// Plays the edge: publishes at QoS 1 and collects receipts.
pub struct Edge {
    pub client: AsyncClient,
    pub receipts: mpsc::UnboundedReceiver<Receipt>,
    pub topics: Topics,
    task: JoinHandle<()>,
}

impl Edge {
    pub async fn connect(broker: &str, topics: &Topics) -> Edge {
        runtime::tls::install_crypto_provider();
        let url: runtime::mqtt::MqttUrl = broker.parse().unwrap();
        let mut o = runtime::mqtt::ClientOptions::new(format!("edge-test-{}", Uuid::new_v4().simple()));
        o.clean_session = true;
        let (client, mut el) = AsyncClient::new(url.options(&o).unwrap(), 1000);
        client
            .subscribe(topics.all_sites(TopicKind::Receipts), QoS::AtLeastOnce)
            .await
            .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if let Ok(r) = Receipt::decode(&p.payload) {
                            let _ = tx.send(r);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .expect("edge subscribed")
            .unwrap();
        Edge {
            client,
            receipts: rx,
            topics: topics.clone(),
            task,
        }
    }

    pub async fn publish_raw(&self, site: &str, payload: Vec<u8>) {
        self.client
            .publish(self.topics.impressions(site), QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    pub async fn publish(&self, env: &BatchEnvelope) {
        self.publish_raw(&env.site_id, env.encode()).await;
    }

    /// Collects `n` receipts (panics after 60 s).
    pub async fn receipts(&mut self, n: usize) -> Vec<Receipt> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match tokio::time::timeout(Duration::from_secs(60), self.receipts.recv()).await {
                Ok(Some(r)) => out.push(r),
                _ => panic!("only {} of {n} receipts within 60 s", out.len()),
            }
        }
        out
    }

    /// Receipts by batch id until every id of `ids` has one (panics after 60 s).
    pub async fn receipts_for(&mut self, ids: &[Uuid]) -> HashMap<Uuid, Vec<Receipt>> {
        let mut out: HashMap<Uuid, Vec<Receipt>> = HashMap::new();
        while !ids.iter().all(|i| out.contains_key(i)) {
            match tokio::time::timeout(Duration::from_secs(60), self.receipts.recv()).await {
                Ok(Some(r)) => out.entry(r.batch_id).or_default().push(r),
                _ => panic!(
                    "receipts missing for {} envelopes",
                    ids.iter().filter(|i| !out.contains_key(i)).count()
                ),
            }
        }
        out
    }

    /// Receipts until every envelope of `envs` has one, republishing those
    /// still unconfirmed after 5 s of silence, as the real edge does after
    /// its receipt timeout (a receipt in flight when the ingestor is
    /// SIGKILLed is lost by design; the resend gets a duplicate receipt).
    /// Panics after 12 rounds without every receipt.
    pub async fn receipts_resending(&mut self, envs: &[BatchEnvelope]) -> HashMap<Uuid, Vec<Receipt>> {
        let mut out: HashMap<Uuid, Vec<Receipt>> = HashMap::new();
        for _round in 0..12 {
            loop {
                if envs.iter().all(|e| out.contains_key(&e.batch_id)) {
                    return out;
                }
                match tokio::time::timeout(Duration::from_secs(5), self.receipts.recv()).await {
                    Ok(Some(r)) => out.entry(r.batch_id).or_default().push(r),
                    _ => break,
                }
            }
            for e in envs.iter().filter(|e| !out.contains_key(&e.batch_id)) {
                self.publish(e).await;
            }
        }
        panic!(
            "receipts missing for {} envelopes after 12 resends",
            envs.iter().filter(|e| !out.contains_key(&e.batch_id)).count()
        );
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Creates the persistent session (with its subscription) of `client_id`, as
/// a long-running ingestor has: messages published from now on are queued
/// for it even while no process is connected.
pub async fn ensure_session(broker: &str, client_id: &str, topics: &Topics) {
    ensure_session_on(&broker.parse().unwrap(), client_id, topics).await;
}

/// [`ensure_session`] on a parsed broker URL.
pub async fn ensure_session_on(url: &runtime::mqtt::MqttUrl, client_id: &str, topics: &Topics) {
    let mut o = runtime::mqtt::ClientOptions::new(client_id);
    o.clean_session = false;
    o.manual_acks = true;
    let (client, mut el) = AsyncClient::new(url.options(&o).unwrap(), 10);
    client
        .subscribe(topics.all_sites(TopicKind::Impressions), QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::SubAck(_))) => {
                    let _ = client.disconnect().await;
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {}
                Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("session created");
}

/// Removes the persistent session a test created on the shared broker.
pub async fn forget_session(broker: &str, client_id: &str) {
    let url: runtime::mqtt::MqttUrl = broker.parse().unwrap();
    runtime::mqtt::forget_session(&url, client_id).await.unwrap();
}

/// The rollup must equal the raw rows (sum of impressions): at every commit
/// the daily rollup plus its queue, and after a fold the rollup alone with
/// the queue empty (migration `20261206000010`).
pub async fn assert_rollup_matches(pool: &PgPool) {
    let rows = count(pool, "SELECT count(*) FROM sponsor_impressions").await;
    let unfolded = count(
        pool,
        "SELECT (SELECT coalesce(sum(impressions), 0) FROM sponsor_daily_stats)::int8
              + (SELECT coalesce(sum(impressions), 0) FROM sponsor_daily_pending)::int8",
    )
    .await;
    assert_eq!(
        unfolded, rows,
        "sponsor_daily_stats + its queue must count every row exactly once"
    );
    sqlx::query("SELECT sponsor_rollups_fold()")
        .execute(pool)
        .await
        .unwrap();
    let rollup = count(
        pool,
        "SELECT coalesce(sum(impressions), 0)::int8 FROM sponsor_daily_stats",
    )
    .await;
    assert_eq!(rollup, rows, "sponsor_daily_stats must count every row exactly once");
    let queued = count(pool, "SELECT count(*) FROM sponsor_daily_pending").await;
    assert_eq!(queued, 0, "a fold empties the daily queue");
}

/// Ends the backends a killed child process left behind on the test
/// database, so that `#[sqlx::test]` can drop it.
pub async fn end_foreign_backends(pool: &PgPool) {
    let sql = "SELECT count(pg_terminate_backend(pid))::int8 FROM pg_stat_activity \
               WHERE datname = current_database() AND application_name = 'neopro' AND pid <> pg_backend_pid()";
    wait_until(|| async { count(pool, sql).await == 0 }).await;
}
