//! The attack suite, end to end, on both brokers: our embedded rumqttd with
//! a credentials file (its topic ACL on), and a real Mosquitto started here
//! with the configuration `broker::mosquitto` generates.
//!
//! Cast: `club-a` is the attacker, a site account valid for its own site
//! (a leaked box password, a buggy tool); `club-b` is the victim, a real
//! `edge_publisher` App whose plays are acknowledged by its outbox; a real
//! `ingestor::App` on a fresh database; the accounts `ingestor` (and, on
//! Mosquitto, `ingestor-receipts` for its receipts connection) and an
//! observer. Every case performs one attack while the victim delivers, and
//! ends the same way ([`Harness::finish`]): the victim's acknowledged plays
//! are in PostgreSQL exactly once, id by id and field by field, nothing the
//! attacker made is stored under another site, and the attacker read
//! nothing (its own receipt, published after everything else, arrived
//! first, so anything leaked would have too).
//!
//! `mosquitto` missing fails the Mosquitto half: it is installed by
//! `.ci/setup`.

use anyhow::Context;
use runtime::credentials::Role;
use runtime::mqtt::MqttUrl;
use schema::Impression;
use simulator::catalogue::Catalogue;
use simulator::credentials::Accounts;
use simulator::fleet::{self, Edge, EdgeTuning, Ingestor};
use simulator::pg;
use simulator::plays::{generate_site, FleetSpec, SitePlays};
use simulator::rogue::{self, Rogue};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ATTACKER: &str = "club-a";
const VICTIM: &str = "club-b";
const OBSERVER: &str = "ops-observer";
const INGESTOR: &str = "ingestor";
const INGESTOR_RECEIPTS: &str = "ingestor-receipts";
const PREFIX: &str = "neopro";
const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// Ceiling of every wait on an observable event.
const WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BrokerKind {
    Embedded,
    Mosquitto,
}

/// A Mosquitto child process on a free loopback port, killed on drop.
struct MosquittoProc {
    child: Child,
    log: PathBuf,
}

impl Drop for MosquittoProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl MosquittoProc {
    fn start(creds: &runtime::credentials::Credentials, dir: &Path) -> anyhow::Result<(Self, u16)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let pers = dir.join("persistence");
        std::fs::create_dir_all(&pers)?;
        let whoami = Command::new("id").arg("-un").output().context("id -un")?;
        let o = broker::mosquitto::MosquittoOptions {
            listen: Some(format!("127.0.0.1:{port}").parse()?),
            persistence_dir: pers,
            // Mosquitto must not drop to a user that cannot read the 0600 files.
            run_as: String::from_utf8(whoami.stdout)?.trim().to_owned(),
            // The run's hashes are made cheap on purpose (simulator::credentials).
            allow_weak_hashes: true,
            ..broker::mosquitto::MosquittoOptions::default()
        };
        let generated = broker::mosquitto::write_config(creds, &o, &dir.join("conf"))?;
        let log = dir.join("mosquitto.log");
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&generated.conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {MOSQUITTO} (is mosquitto installed?)"))?;
        let m = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "mosquitto did not listen: {}",
                std::fs::read_to_string(&m.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((m, port))
    }
}

/// The case's database, dropped when the case ends (passed or not).
struct TestDb {
    url: String,
}

impl TestDb {
    async fn create() -> anyhow::Result<Self> {
        let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| runtime::db::DEFAULT_DATABASE_URL.into());
        let name = format!("neopro_attack_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let url = pg::with_database(&server, &name)?;
        pg::recreate_database(&url).await?;
        Ok(Self { url })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let url = self.url.clone();
        // Drop may run inside the test's runtime: a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(pg::drop_database(&url))
        })
        .join();
    }
}

/// One case's world.
struct Harness {
    kind: BrokerKind,
    accounts: Accounts,
    base: MqttUrl,
    ingestor_settings: ingestor::Settings,
    ingestor: Option<Ingestor>,
    victim: Edge,
    /// Plays the victim's outbox acknowledged (what the TV was told is safe).
    acknowledged: Vec<Impression>,
    /// Plays not handed to the victim yet.
    supply: std::vec::IntoIter<Impression>,
    /// Genuine plays of the attacker's own site (its sync points).
    own_plays: std::vec::IntoIter<Impression>,
    rogue: Rogue,
    pool: sqlx::PgPool,
    // Dropped last, in this order: the database, then the broker and files.
    _db: TestDb,
    /// rumqttd cannot be stopped: it lives until the test process ends.
    _embedded: Option<broker::EmbeddedBroker>,
    _mosquitto: Option<MosquittoProc>,
    _dir: tempfile::TempDir,
}

fn plays_of(site: &str, index: usize, n: usize) -> SitePlays {
    let spec = FleetSpec {
        sites: 2,
        plays_per_site: n,
        seed: 4242,
        end_day: chrono::Utc::now().date_naive(),
        site_prefix: "club".into(),
    };
    let mut s = generate_site(&spec, &Catalogue::standard(), index);
    s.site_id = site.to_owned();
    for p in &mut s.plays {
        p.site_id = site.to_owned();
    }
    s
}

impl Harness {
    /// Broker with the accounts, database, ingestor, victim edge, and the
    /// attacker connected and subscribed to everything it could read.
    async fn start(kind: BrokerKind) -> anyhow::Result<Self> {
        runtime::tls::install_crypto_provider();
        let dir = tempfile::Builder::new().prefix("neopro-attacks-").tempdir()?;
        let accounts = Accounts::random();
        let creds_path = dir.path().join("credentials");
        let list = vec![
            (ATTACKER.to_owned(), Role::Site),
            (VICTIM.to_owned(), Role::Site),
            (INGESTOR.to_owned(), Role::Ingestor),
            (INGESTOR_RECEIPTS.to_owned(), Role::Ingestor),
            (OBSERVER.to_owned(), Role::Observer),
        ];
        let creds = accounts.write_file(&creds_path, &list, kind == BrokerKind::Mosquitto)?;
        let (embedded, mosquitto, base) = match kind {
            BrokerKind::Embedded => {
                let b = broker::EmbeddedBroker::start_for_tests_with_credentials(&creds_path)?;
                let u = b.mqtt_url(None, None);
                (Some(b), None, u)
            }
            BrokerKind::Mosquitto => {
                let (m, port) = MosquittoProc::start(&creds, dir.path())?;
                let u: MqttUrl = format!("mqtt://127.0.0.1:{port}").parse().map_err(anyhow::Error::msg)?;
                (None, Some(m), u)
            }
        };

        let db = TestDb::create().await?;
        let pool = runtime::db::connect(&db.url, 2).await?;
        runtime::db::migrate(&pool).await?;
        let victim_plays = plays_of(VICTIM, 1, 300);
        let own = plays_of(ATTACKER, 0, 50);
        pg::insert_catalogue(&pool, &Catalogue::standard(), &[own.clone(), victim_plays.clone()]).await?;

        let mut settings = fleet::ingestor_settings(&db.url, &accounts.url(&base, INGESTOR), PREFIX, INGESTOR)?;
        // The legacy HTTP endpoint checks the same accounts.
        settings.credentials = Some(creds_path.clone());
        if kind == BrokerKind::Mosquitto {
            // One session per account on Mosquitto: the receipts connection
            // has its own account.
            settings.receipts_mqtt_url = Some(accounts.url(&base, INGESTOR_RECEIPTS));
        }
        let ingestor = Ingestor::start(settings.clone()).await?;
        ingestor.wait_connected(WAIT).await?;

        let tuning = EdgeTuning {
            batch_delay_ms: 50,
            batch_max_impressions: 20,
            receipt_timeout_ms: 5_000,
            ..EdgeTuning::default()
        };
        let mut victim = Edge::open(
            VICTIM,
            dir.path().join(VICTIM),
            &accounts.url(&base, VICTIM),
            PREFIX,
            &tuning,
        )
        .await?;
        victim.start().await?;
        let ready = fleet::wait_until(WAIT, || {
            let r = victim.ready();
            async move { Ok(r) }
        })
        .await?;
        anyhow::ensure!(ready, "the victim's edge did not connect");

        let mut rogue = Rogue::connect(&accounts.url(&base, ATTACKER), ATTACKER, PREFIX).await?;
        let codes = rogue.read_everything(&[VICTIM.to_owned()]).await?;
        if kind == BrokerKind::Embedded {
            // The embedded broker refuses at SUBSCRIBE time (Mosquitto
            // grants and then filters every message: checked by what arrives).
            for (filter, code) in &codes {
                anyhow::ensure!(
                    *code == rumqttc::SubscribeReasonCode::Failure,
                    "the embedded broker granted {ATTACKER} the filter {filter} ({code:?})"
                );
            }
        }
        Ok(Self {
            kind,
            accounts,
            base,
            ingestor_settings: settings,
            ingestor: Some(ingestor),
            victim,
            acknowledged: Vec::new(),
            supply: victim_plays.plays.into_iter(),
            own_plays: own.plays.into_iter(),
            rogue,
            pool,
            _db: db,
            _embedded: embedded,
            _mosquitto: mosquitto,
            _dir: dir,
        })
    }

    fn url(&self, user: &str) -> MqttUrl {
        self.accounts.url(&self.base, user)
    }

    fn outbox_id(&self) -> uuid::Uuid {
        self.victim.outbox.outbox_id()
    }

    /// Hands `n` plays to the victim's outbox; the append's success is the
    /// acknowledgement the TV gets.
    async fn play(&mut self, n: usize) -> anyhow::Result<()> {
        let chunk: Vec<Impression> = self.supply.by_ref().take(n).collect();
        anyhow::ensure!(chunk.len() == n, "the case asked for more plays than were generated");
        for c in chunk.chunks(10) {
            self.victim.outbox.append(c.to_vec()).await?;
            self.acknowledged.extend_from_slice(c);
        }
        Ok(())
    }

    /// Until every acknowledged play is committed and the outbox is empty.
    async fn wait_delivered(&self) -> anyhow::Result<()> {
        let want = self.acknowledged.len() as i64;
        let sites = vec![VICTIM.to_owned()];
        let ok = fleet::wait_until(WAIT, || {
            let (pool, sites, left) = (self.pool.clone(), sites.clone(), self.victim.unconfirmed());
            async move { Ok(left == 0 && pg::committed_count(&pool, &sites).await? >= want) }
        })
        .await?;
        anyhow::ensure!(
            ok,
            "not delivered within {WAIT:?}: {} acknowledged, {} committed, {} still in the outbox",
            want,
            pg::committed_count(&self.pool, &sites).await?,
            self.victim.unconfirmed()
        );
        Ok(())
    }

    async fn stop_ingestor(&mut self) -> anyhow::Result<()> {
        if let Some(i) = self.ingestor.take() {
            i.stop().await?;
        }
        Ok(())
    }

    async fn start_ingestor(&mut self) -> anyhow::Result<()> {
        let i = Ingestor::start(self.ingestor_settings.clone()).await?;
        i.wait_connected(WAIT).await?;
        self.ingestor = Some(i);
        Ok(())
    }

    /// The victim's outbox keeps `n` plays for `window` (a forged receipt,
    /// acknowledged by the broker, would have reached the edge by then).
    async fn outbox_holds(&self, n: u64, window: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + window;
        while Instant::now() < until {
            let left = self.victim.unconfirmed();
            anyhow::ensure!(
                left == n,
                "the victim's outbox went from {n} to {left} plays without the ingestor"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The proof every case ends with.
    async fn finish(mut self) -> anyhow::Result<()> {
        self.wait_delivered().await?;
        let mine = self.own_plays.next().context("no own play left for the attacker")?;
        self.rogue.sync(&mine, WAIT).await?;
        let rec = pg::reconcile(&self.pool, self.acknowledged.iter()).await?;
        anyhow::ensure!(
            rec.is_exact() && rec.played > 0,
            "{:?}: the victim's plays are not exactly once:\n{}",
            self.kind,
            rec.diff(10)
        );
        let read = self.rogue.messages_read();
        anyhow::ensure!(
            read == 0,
            "{:?}: the attacker read {read} messages: {:?}",
            self.kind,
            self.rogue.seen()
        );
        let as_others = rogue::rows_stored_as_others(&self.pool, ATTACKER, self.rogue.forged_ids()).await?;
        anyhow::ensure!(
            as_others == 0,
            "{:?}: {as_others} of the attacker's rows stored as another site",
            self.kind
        );
        let strangers: i64 =
            sqlx::query_scalar("SELECT count(*) FROM sponsor_impressions WHERE site_id NOT IN ($1, $2)")
                .bind(ATTACKER)
                .bind(VICTIM)
                .fetch_one(&self.pool)
                .await?;
        anyhow::ensure!(strangers == 0, "{strangers} rows of sites that do not exist");
        println!(
            "{:?}: {} acknowledged = {} stored, duplicates 0, lost 0; attacker: messages_read=0 rows_stored_as_others=0 forged_published={} disconnects={}",
            self.kind,
            rec.played,
            rec.stored,
            self.rogue.forged_published(),
            self.rogue.disconnects()
        );
        self.victim.stop().await?;
        self.stop_ingestor().await?;
        self.pool.close().await;
        Ok(())
    }
}

/// Runs `case` as `module::embedded` and `module::mosquitto`.
macro_rules! on_both_brokers {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$case(super::BrokerKind::Embedded).await.unwrap();
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                super::$case(super::BrokerKind::Mosquitto).await.unwrap();
            }
        }
    )*};
}

on_both_brokers!(
    reads_nothing_of_others,
    forged_receipt_while_ingestor_down,
    forged_v2_envelope_settles_nothing,
    oversized_receipt_does_not_stop_the_victim,
    forged_plays_not_stored_as_the_victim,
    legacy_http_requires_the_site_account,
    retained_spam_reaches_no_fresh_subscriber,
);

/// Case 1: the attacker subscribes to `#`, `neopro/#`, every site's topics by
/// wildcard and the victim's by name (done by [`Harness::start`]) while the
/// victim delivers: it receives nothing. The observer, subscribed the same
/// way, does receive the victim's traffic: the filters match.
async fn reads_nothing_of_others(kind: BrokerKind) -> anyhow::Result<()> {
    let mut h = Harness::start(kind).await?;
    let mut observer = Rogue::connect(&h.url(OBSERVER), OBSERVER, PREFIX).await?;
    observer.subscribe(&format!("{PREFIX}/#")).await?;
    h.play(40).await?;
    h.wait_delivered().await?;
    let seen = fleet::wait_until(WAIT, || {
        let n = observer.messages_read();
        async move { Ok(n > 0) }
    })
    .await?;
    anyhow::ensure!(
        seen,
        "the observer saw none of the victim's traffic: the case proves nothing"
    );
    observer.disconnect().await;
    h.finish().await
}

/// Case 2: with the ingestor down and 40 plays waiting in the victim's outbox,
/// the attacker publishes receipts in the victim's name, with its outbox id
/// and every seq: the outbox keeps all 40, and once the ingestor is back
/// all 40 are stored exactly once.
async fn forged_receipt_while_ingestor_down(kind: BrokerKind) -> anyhow::Result<()> {
    let mut h = Harness::start(kind).await?;
    h.stop_ingestor().await?;
    h.play(40).await?;
    let outbox = h.outbox_id();
    let n = h.rogue.forge_receipts(VICTIM, outbox).await?;
    anyhow::ensure!(n == 4);
    h.outbox_holds(40, Duration::from_secs(1)).await?;
    h.start_ingestor().await?;
    h.finish().await
}

/// Case 3: a version-2 envelope on the victim's topic with its outbox id and an
/// all-seqs range, queued for the ingestor among the victim's 40 plays: no
/// dead letter or row as the victim, and no receipt the ingestor publishes
/// settles the victim's plays (all 40 stored).
async fn forged_v2_envelope_settles_nothing(kind: BrokerKind) -> anyhow::Result<()> {
    let mut h = Harness::start(kind).await?;
    h.stop_ingestor().await?;
    h.play(20).await?;
    let outbox = h.outbox_id();
    h.rogue.forge_v2_envelope(VICTIM, outbox).await?;
    h.play(20).await?;
    h.start_ingestor().await?;
    h.finish().await
}

/// Case 4: a 1,060,000-byte message on the victim's receipts topic (above the
/// clients' 1 MiB packet limit): the victim keeps delivering, 50
/// acknowledged, 50 stored.
async fn oversized_receipt_does_not_stop_the_victim(kind: BrokerKind) -> anyhow::Result<()> {
    let mut h = Harness::start(kind).await?;
    h.play(25).await?;
    h.rogue.oversized(VICTIM).await?;
    h.play(25).await?;
    h.wait_delivered().await?;
    anyhow::ensure!(h.acknowledged.len() == 50);
    h.finish().await
}

/// Case 5: plays forged in the victim's name, on the victim's topic (with its
/// outbox id, and with one of the attacker's): none is stored, as the
/// victim or at all.
async fn forged_plays_not_stored_as_the_victim(kind: BrokerKind) -> anyhow::Result<()> {
    let mut h = Harness::start(kind).await?;
    h.play(20).await?;
    let template: Vec<Impression> = h.own_plays.by_ref().take(10).collect();
    let outbox = h.outbox_id();
    h.rogue.forge_plays(VICTIM, outbox, &template).await?;
    h.play(20).await?;
    h.wait_delivered().await?;
    let forged = h.rogue.forged_ids().to_vec();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM sponsor_impressions WHERE impression_id = ANY($1)")
        .bind(&forged)
        .fetch_one(&h.pool)
        .await?;
    anyhow::ensure!(stored == 0, "{stored} forged plays stored");
    h.finish().await
}

/// The seed's HTTP body for `plays` of `site`.
fn http_body(site: &str, plays: &[Impression]) -> serde_json::Value {
    serde_json::json!({ "site_id": site, "impressions": plays })
}

/// Case 6: the ingestor's legacy `POST /api/analytics/impressions`: without
/// credentials 401; as the attacker with a record of the victim 403;
/// nothing stored. Each site with its own account and records: 200, stored.
async fn legacy_http_requires_the_site_account(kind: BrokerKind) -> anyhow::Result<()> {
    let mut h = Harness::start(kind).await?;
    let addr = h.ingestor.as_ref().context("ingestor")?.http_addr;
    let url = format!("http://{addr}/api/analytics/impressions");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let victims: Vec<Impression> = h.supply.by_ref().take(3).collect();
    let body = http_body(VICTIM, &victims);

    let r = http.post(&url).json(&body).send().await?;
    anyhow::ensure!(r.status() == 401, "no credentials: {}", r.status());
    let r = http
        .post(&url)
        .basic_auth(ATTACKER, Some(h.accounts.password(ATTACKER)))
        .json(&body)
        .send()
        .await?;
    anyhow::ensure!(
        r.status() == 403,
        "{ATTACKER} posting {VICTIM}'s records: {}",
        r.status()
    );
    let r = http
        .post(&url)
        .basic_auth(ATTACKER, Some(h.accounts.password(VICTIM)))
        .json(&body)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 401, "a wrong password: {}", r.status());
    let ids: Vec<uuid::Uuid> = victims.iter().map(|p| p.impression_id).collect();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM sponsor_impressions WHERE impression_id = ANY($1)")
        .bind(&ids)
        .fetch_one(&h.pool)
        .await?;
    anyhow::ensure!(stored == 0, "{stored} rows stored by refused requests");

    // The legitimate uses still work: the victim's own legacy agent...
    let r = http
        .post(&url)
        .basic_auth(VICTIM, Some(h.accounts.password(VICTIM)))
        .json(&body)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "{VICTIM} posting its own records: {}", r.status());
    h.acknowledged.extend(victims);
    // ...and the attacker's own records, stored as its own.
    let own: Vec<Impression> = h.own_plays.by_ref().take(2).collect();
    let r = http
        .post(&url)
        .basic_auth(ATTACKER, Some(h.accounts.password(ATTACKER)))
        .json(&http_body(ATTACKER, &own))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "{ATTACKER} posting its own records: {}", r.status());
    h.play(20).await?;
    h.finish().await
}

/// Case 7: retained messages on the attacker's own impressions and receipts
/// topics and on every topic of the victim: a fresh ingestor session and
/// the observer receive no retained message but the victim's genuine
/// status (which shows that retained delivery works).
///
/// One exception on Mosquitto, which cannot refuse retain per topic (its
/// ACL grants a topic for writing, retained or not; `broker::mosquitto`):
/// the attacker's retained message on its *own* impressions topic is kept
/// and delivered. Nothing of another site's is; what the ingestor does with
/// the attacker's own message is covered by [`Harness::finish`] (nothing
/// stored as another site).
async fn retained_spam_reaches_no_fresh_subscriber(kind: BrokerKind) -> anyhow::Result<()> {
    let mut h = Harness::start(kind).await?;
    h.play(20).await?;
    h.wait_delivered().await?;
    // The fresh ingestor session replaces the running one's on Mosquitto
    // (client id = username), so the ingestor steps aside meanwhile.
    h.stop_ingestor().await?;
    let spam = h.rogue.retained_spam(&[VICTIM.to_owned()]).await?;
    anyhow::ensure!(spam == 5);
    let t = schema::mqtt::Topics::default();
    let window = Duration::from_secs(1);
    let ingestor_filters = vec![
        t.all_sites(schema::mqtt::TopicKind::Impressions),
        t.all_sites(schema::mqtt::TopicKind::Status),
    ];
    let fresh_ingestor = rogue::retained_seen(
        &h.url(INGESTOR),
        &format!("{INGESTOR}:probe"),
        &ingestor_filters,
        window,
    )
    .await?;
    let observer = rogue::retained_seen(
        &h.url(OBSERVER),
        &format!("{OBSERVER}:probe"),
        &[format!("{PREFIX}/#")],
        window,
    )
    .await?;
    let own_impressions = t.impressions(ATTACKER);
    for (who, got) in [
        ("a fresh ingestor session", &fresh_ingestor),
        ("the observer", &observer),
    ] {
        for (topic, payload) in got.iter() {
            if kind == BrokerKind::Mosquitto && *topic == own_impressions {
                println!(
                    "Mosquitto: {who} received the attacker's retained message on its own {topic} (no per-topic retain ACL)"
                );
                continue;
            }
            anyhow::ensure!(
                *topic == t.status(VICTIM) && !String::from_utf8_lossy(payload).contains(rogue::MARK),
                "{who} received a retained message on {topic}: {}",
                String::from_utf8_lossy(&payload[..payload.len().min(200)])
            );
        }
    }
    anyhow::ensure!(
        observer.iter().any(|(topic, _)| *topic == t.status(VICTIM)),
        "the observer did not get the victim's retained status: the case proves nothing"
    );
    h.start_ingestor().await?;
    h.play(20).await?;
    h.finish().await
}
