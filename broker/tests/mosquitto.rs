//! The hosted-broker path against the real Mosquitto 2.0 binary: each test
//! starts its own `mosquitto` with the configuration `mosquitto-config`
//! generates (on a free loopback port), then attacks it with real clients.
//!
//! Accounts: sites `club-a` (the attacker) and `club-b` (the victim), the
//! ingestor's two accounts (`ingestor` for impressions, `ingestor-receipts`
//! for its receipts connection), the observer `ops`.
//!
//! How "received nothing" is checked: Mosquitto is single-threaded and
//! queues a message to every matching subscriber when it processes the
//! PUBLISH; one subscriber's queue is delivered in order. So once the
//! legitimate subscriber got message X, a marker published afterwards and
//! allowed to the attacker lands behind anything X could have left in the
//! attacker's queue: everything the attacker receives up to the marker is
//! everything it could have received, and it must be the marker alone.
//!
//! What Mosquitto 2.0 does, as these tests observe it: a SUBSCRIBE to a
//! forbidden filter is granted (SUBACK with the requested QoS) and the read
//! ACL then filters every message it would deliver; a forbidden PUBLISH is
//! acknowledged (PUBACK, MQTT 3.1.1 has no refusal code) and dropped, not
//! retained; a last will on a forbidden topic is accepted at CONNECT and
//! never delivered.

mod common;

use broker::credentials::{mosquitto_hash_with, parse_mosquitto_hash, Credentials, Role};
use broker::mosquitto::{write_config, MosquittoOptions};
use common::*;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, LastWill, Outgoing, QoS, SubscribeReasonCode};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const IMPRESSIONS: schema::mqtt::TopicKind = schema::mqtt::TopicKind::Impressions;
const STATUS: schema::mqtt::TopicKind = schema::mqtt::TopicKind::Status;

/// The accounts every test uses: (username, password, role).
const ACCOUNTS: [(&str, &str, Role); 5] = [
    ("club-a", "pw-a", Role::Site),
    ("club-b", "pw-b", Role::Site),
    ("ingestor", "pw-ing", Role::Ingestor),
    ("ingestor-receipts", "pw-ing-r", Role::Ingestor),
    ("ops", "pw-ops", Role::Observer),
];

/// Hashed once per test binary (argon2 and 100,000 PBKDF2 iterations each).
fn fleet() -> &'static Credentials {
    static FLEET: OnceLock<Credentials> = OnceLock::new();
    FLEET.get_or_init(|| {
        let mut c = Credentials::default();
        for (u, p, r) in ACCOUNTS {
            c.set_password_with_role(u, p, r).unwrap();
        }
        c
    })
}

fn password(user: &str) -> &'static str {
    ACCOUNTS
        .iter()
        .find(|(u, _, _)| *u == user)
        .map(|(_, p, _)| *p)
        .unwrap_or("no-such-password")
}

/// A tool the test needs, from `PATH` or the Debian locations; panics with
/// what to install when it is missing (a missing tool fails, never skips).
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed: the hosted-broker tests need the real Mosquitto 2.0 (apt-get install mosquitto mosquitto-clients)")
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A Mosquitto child process, killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    tls_port: Option<u16>,
    log: PathBuf,
    conf: String,
    _dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mosquitto {
    fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// Generates the configuration with [`write_config`] (after `adjust`,
    /// which may add TLS), starts `mosquitto -c` on it and waits until every
    /// listener accepts connections.
    fn start_with(adjust: impl FnOnce(&mut MosquittoOptions)) -> Self {
        let bin = tool("mosquitto");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let pers = dir.path().join("persistence");
        std::fs::create_dir_all(&pers).unwrap();
        let mut o = MosquittoOptions {
            listen: Some(format!("127.0.0.1:{port}").parse().unwrap()),
            persistence_dir: pers,
            // The test runs as whoever runs it; Mosquitto must not drop to a
            // user that cannot read the 0600 files.
            run_as: whoami(),
            ..MosquittoOptions::default()
        };
        adjust(&mut o);
        let tls_port = o.tls.as_ref().map(|(a, _, _)| a.port());
        let generated = write_config(fleet(), &o, &dir.path().join("conf")).unwrap();
        assert!(generated.warnings.is_empty(), "{:?}", generated.warnings);
        let conf = std::fs::read_to_string(&generated.conf).unwrap();
        let log = dir.path().join("mosquitto.log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&generated.conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting mosquitto");
        let mut m = Mosquitto {
            child,
            port,
            tls_port,
            log,
            conf,
            _dir: dir,
        };
        let ports = [Some(port), m.tls_port];
        let deadline = Instant::now() + WAIT;
        for p in ports.into_iter().flatten() {
            while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
                let exited = m.child.try_wait().unwrap();
                assert!(
                    exited.is_none() && Instant::now() < deadline,
                    "mosquitto did not listen on {p} ({exited:?}): {}\n{}",
                    m.log_text(),
                    m.conf
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        m
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, user: &str, pass: &str) -> runtime::mqtt::MqttUrl {
        format!("mqtt://{user}:{pass}@127.0.0.1:{}", self.port).parse().unwrap()
    }

    fn tls_url(&self, user: &str, ca: Option<&Path>) -> runtime::mqtt::MqttUrl {
        let port = self.tls_port.expect("TLS listener");
        let ca = ca.map(|c| format!("?ca={}", c.display())).unwrap_or_default();
        format!("mqtts://{user}:{}@localhost:{port}{ca}", password(user))
            .parse()
            .unwrap()
    }

    /// Connects `user` (its own password) with `client_id`.
    async fn connect(&self, user: &str, client_id: &str, clean: bool) -> Peer {
        self.connect_with(user, client_id, clean, |_| {}).await
    }

    async fn connect_with(
        &self,
        user: &str,
        client_id: &str,
        clean: bool,
        adjust: impl FnOnce(&mut rumqttc::MqttOptions),
    ) -> Peer {
        let mut o = opts(&self.url(user, password(user)), client_id, clean);
        adjust(&mut o);
        Peer::connect(o).await
    }
}

/// One connected client: its handle, event loop and CONNACK's session flag.
/// Every message it receives lands in `inbox`, whatever the test was waiting
/// for at the time (a PUBACK, a SUBACK): nothing received is ever discarded
/// unexamined.
struct Peer {
    client: AsyncClient,
    el: EventLoop,
    session_present: bool,
    inbox: Vec<(String, String)>,
}

impl Peer {
    async fn connect(o: rumqttc::MqttOptions) -> Self {
        let who = o.client_id();
        let (client, el, session_present) = connect(o).await.unwrap_or_else(|e| panic!("{who} connects: {e}"));
        Self {
            client,
            el,
            session_present,
            inbox: Vec::new(),
        }
    }

    /// Polls the event loop once, keeping a received message in the inbox.
    async fn next_event(&mut self, what: &str) -> Event {
        let ev = self
            .el
            .poll()
            .await
            .unwrap_or_else(|e| panic!("connection failed while waiting for {what}: {e}"));
        if let Event::Incoming(Incoming::Publish(p)) = &ev {
            self.inbox
                .push((p.topic.clone(), String::from_utf8_lossy(&p.payload).into_owned()));
        }
        ev
    }

    /// Subscribes `filters` (QoS 1) in one SUBSCRIBE; returns the SUBACK codes.
    async fn subscribe(&mut self, filters: &[&str]) -> Vec<SubscribeReasonCode> {
        let subs = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce));
        self.client.subscribe_many(subs).await.unwrap();
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Incoming::SubAck(a)) = self.next_event("SUBACK").await {
                    return a.return_codes;
                }
            }
        })
        .await
        .expect("SUBACK")
    }

    /// Publishes QoS 1 and waits for the PUBACK.
    async fn publish(&mut self, topic: &str, retain: bool, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.as_bytes().to_vec())
            .await
            .unwrap();
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Incoming::PubAck(_)) = self.next_event("PUBACK").await {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("PUBACK for {topic}"));
    }

    /// Everything received until (and including) a message whose payload is
    /// `marker`, as (topic, payload) pairs, in order of arrival.
    async fn until(&mut self, marker: &str) -> Vec<(String, String)> {
        let done = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(at) = self.inbox.iter().position(|(_, p)| p == marker) {
                    return self.inbox.drain(..=at).collect::<Vec<_>>();
                }
                self.next_event(marker).await;
            }
        })
        .await;
        done.unwrap_or_else(|_| panic!("no {marker} within {WAIT:?}; got {:?}", self.inbox))
    }

    /// Disconnects cleanly (no last will) and waits until it is sent. Every
    /// message received must have been examined by then.
    async fn disconnect(mut self) {
        assert!(self.inbox.is_empty(), "unexamined messages: {:?}", self.inbox);
        self.client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(WAIT, async {
            loop {
                match self.el.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }

    /// Polls until the broker closes this connection.
    async fn closed_by_broker(&mut self) -> bool {
        let el = &mut self.el;
        tokio::time::timeout(WAIT, async {
            loop {
                if el.poll().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }
}

fn one(topic: String, payload: &str) -> Vec<(String, String)> {
    vec![(topic, payload.to_owned())]
}

/// Our `$7$` hash is bit-for-bit what `mosquitto_passwd` computes.
#[test]
fn hash_matches_mosquitto_passwd() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pw");
    let st = Command::new(tool("mosquitto_passwd"))
        .args(["-b", "-c"])
        .arg(&f)
        .args(["club-1", "s3cret pass"])
        .status()
        .unwrap();
    assert!(st.success());
    let line = std::fs::read_to_string(&f).unwrap();
    let hash = line.trim().strip_prefix("club-1:").unwrap();
    let (it, salt, _) = parse_mosquitto_hash(hash).unwrap();
    assert_eq!(mosquitto_hash_with("s3cret pass", &salt, it), hash);
}

#[tokio::test]
async fn refuses_wrong_passwords_unknown_users_and_anonymous() {
    let m = Mosquitto::start();
    assert!(
        refused(opts(&m.url("club-a", "nope"), "club-a", true)).await,
        "wrong password"
    );
    assert!(
        refused(opts(&m.url("club-z", "pw-a"), "club-z", true)).await,
        "unknown user"
    );
    assert!(
        refused(opts(&m.url("club-b", "pw-a"), "club-b", true)).await,
        "another account's password"
    );
    let anon: runtime::mqtt::MqttUrl = format!("mqtt://127.0.0.1:{}", m.port).parse().unwrap();
    assert!(refused(opts(&anon, "club-a", true)).await, "anonymous");
    // Every generated password verifies in Mosquitto (100,000 iterations).
    for (u, _, _) in ACCOUNTS {
        m.connect(u, u, true).await.disconnect().await;
    }
    assert!(
        m.log_text().contains("not authorised"),
        "refusals logged: {}",
        m.log_text()
    );
}

/// club-a subscribes to everything it can name; it gets its own receipt and
/// nothing of club-b's envelopes, status or receipts.
#[tokio::test]
async fn a_site_reads_nothing_of_another_site() {
    let m = Mosquitto::start();
    let t = schema::mqtt::Topics::default();
    let mut ing = m.connect("ingestor", "ingestor", false).await;
    ing.subscribe(&[&t.all_sites(IMPRESSIONS), &t.all_sites(STATUS)]).await;
    let mut receipts = m.connect("ingestor-receipts", "ingestor:receipts", true).await;
    let mut b = m.connect("club-b", "club-b", false).await;
    b.subscribe(&[&t.receipts("club-b")]).await;

    let mut a = m.connect("club-a", "club-a", false).await;
    let filters = [
        "neopro/#".to_owned(),
        "#".to_owned(),
        t.all_sites(IMPRESSIONS),
        t.receipts("club-b"),
        t.status("club-b"),
        format!("$share/g/{}", t.all_sites(IMPRESSIONS)),
        t.receipts("club-a"),
    ];
    let codes = a
        .subscribe(&filters.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    // Observed: Mosquitto 2.0 grants every filter; the read ACL applies per message.
    assert_eq!(
        codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce); filters.len()],
        "SUBACK"
    );

    b.publish(&t.impressions("club-b"), false, "b-envelope-1").await;
    b.publish(&t.status("club-b"), true, "b-status-1").await;
    receipts.publish(&t.receipts("club-b"), false, "b-receipt-1").await;
    assert_eq!(
        ing.until("b-status-1").await,
        [
            one(t.impressions("club-b"), "b-envelope-1"),
            one(t.status("club-b"), "b-status-1")
        ]
        .concat(),
        "the ingestor got club-b's envelope and status"
    );
    assert_eq!(b.until("b-receipt-1").await, one(t.receipts("club-b"), "b-receipt-1"));

    receipts.publish(&t.receipts("club-a"), false, "a-marker").await;
    assert_eq!(
        a.until("a-marker").await,
        one(t.receipts("club-a"), "a-marker"),
        "club-a received nothing of club-b's"
    );
    // club-b's retained status is not delivered to club-a on a new subscription either.
    a.subscribe(&[&t.status("club-b")]).await;
    receipts.publish(&t.receipts("club-a"), false, "a-marker-2").await;
    assert_eq!(a.until("a-marker-2").await, one(t.receipts("club-a"), "a-marker-2"));
}

/// club-a publishes on club-b's receipts, impressions and status (retained),
/// and leaves a last will on club-b's status: all acknowledged, none
/// delivered, nothing retained.
#[tokio::test]
async fn a_site_cannot_publish_as_another_site() {
    let m = Mosquitto::start();
    let t = schema::mqtt::Topics::default();
    let mut ing = m.connect("ingestor", "ingestor", false).await;
    ing.subscribe(&[&t.all_sites(IMPRESSIONS), &t.all_sites(STATUS)]).await;
    let mut receipts = m.connect("ingestor-receipts", "ingestor:receipts", true).await;
    let mut b = m.connect("club-b", "club-b", false).await;
    b.subscribe(&[&t.receipts("club-b")]).await;

    let mut a = m.connect("club-a", "club-a", false).await;
    a.subscribe(&[&t.receipts("club-a")]).await;
    a.publish(&t.receipts("club-b"), false, "forged-receipt").await;
    a.publish(&t.impressions("club-b"), false, "forged-envelope").await;
    a.publish(&t.status("club-b"), true, "forged-retained-status").await;
    a.publish(&t.receipts("club-a"), false, "forged-own-receipt").await;
    receipts
        .publish(&t.receipts("club-a"), false, "a-receipt-genuine")
        .await;
    assert_eq!(
        a.until("a-receipt-genuine").await,
        one(t.receipts("club-a"), "a-receipt-genuine"),
        "a site cannot write receipts, not even its own"
    );
    a.disconnect().await;
    // A last will on club-b's status, fired by an abrupt close.
    let will = m
        .connect_with("club-a", "club-a", true, |o| {
            o.set_last_will(LastWill::new(t.status("club-b"), "forged-will", QoS::AtLeastOnce, true));
        })
        .await;
    drop(will);
    // Once club-a is connected again, its previous connection (and its
    // will) has been dealt with.
    let _a = m.connect("club-a", "club-a", false).await;

    // A fresh subscriber finds nothing retained on club-b's status.
    let mut ops = m.connect("ops", "ops", true).await;
    ops.subscribe(&[&t.status("club-b")]).await;
    b.publish(&t.status("club-b"), false, "b-status-genuine").await;
    assert_eq!(
        ops.until("b-status-genuine").await,
        one(t.status("club-b"), "b-status-genuine")
    );

    b.publish(&t.impressions("club-b"), false, "b-envelope-genuine").await;
    assert_eq!(
        ing.until("b-envelope-genuine").await,
        [
            one(t.status("club-b"), "b-status-genuine"),
            one(t.impressions("club-b"), "b-envelope-genuine")
        ]
        .concat(),
        "the ingestor got no forged envelope, status or will"
    );
    receipts
        .publish(&t.receipts("club-b"), false, "b-receipt-genuine")
        .await;
    assert_eq!(
        b.until("b-receipt-genuine").await,
        one(t.receipts("club-b"), "b-receipt-genuine"),
        "club-b got no forged receipt"
    );
}

/// club-a presents club-b's client id (and `club-b:x`): Mosquitto replaces
/// it by `club-a`, so club-b's persistent session keeps its queued receipts
/// and club-a gets none of them.
#[tokio::test]
async fn a_site_cannot_take_over_another_sites_session() {
    let m = Mosquitto::start();
    let t = schema::mqtt::Topics::default();
    let mut receipts = m.connect("ingestor-receipts", "ingestor:receipts", true).await;
    let mut b = m.connect("club-b", "club-b", false).await;
    b.subscribe(&[&t.receipts("club-b")]).await;
    b.disconnect().await;
    receipts
        .publish(&t.receipts("club-b"), false, "b-receipt-queued-1")
        .await;

    // With club-b's id and a persistent session, a takeover would resume
    // club-b's session and receive its queued receipt at once.
    let mut a = m.connect("club-a", "club-b", false).await;
    assert!(!a.session_present, "club-a did not get club-b's session");
    a.subscribe(&["neopro/#", &t.receipts("club-b"), &t.receipts("club-a")])
        .await;
    receipts
        .publish(&t.receipts("club-b"), false, "b-receipt-queued-2")
        .await;
    receipts.publish(&t.receipts("club-a"), false, "a-marker-1").await;
    assert_eq!(a.until("a-marker-1").await, one(t.receipts("club-a"), "a-marker-1"));
    a.disconnect().await;

    // `club-b:x` with a clean session: would wipe club-b's session.
    let mut a = m.connect("club-a", "club-b:x", true).await;
    a.subscribe(&["neopro/#"]).await;
    receipts.publish(&t.receipts("club-a"), false, "a-marker-2").await;
    assert_eq!(a.until("a-marker-2").await, one(t.receipts("club-a"), "a-marker-2"));
    a.disconnect().await;

    let mut b = m.connect("club-b", "club-b", false).await;
    assert!(b.session_present, "club-b's session survived");
    assert_eq!(
        b.until("b-receipt-queued-2").await,
        [
            one(t.receipts("club-b"), "b-receipt-queued-1"),
            one(t.receipts("club-b"), "b-receipt-queued-2")
        ]
        .concat(),
        "club-b got every receipt queued while it was away"
    );
    let log = m.log_text();
    assert!(
        log.contains("as club-a (") && !log.contains("as club-b:x"),
        "Mosquitto used the username as client id: {log}"
    );
}

/// The ingestor's two accounts at once: impressions through a shared
/// subscription, receipts through the second account; the same account
/// twice takes its own session over.
#[tokio::test]
async fn the_ingestors_two_accounts_work_together() {
    let m = Mosquitto::start();
    let t = schema::mqtt::Topics::default();
    let mut ing = m.connect("ingestor", "ingestor", false).await;
    let shared = format!("$share/ingestors/{}", t.all_sites(IMPRESSIONS));
    ing.subscribe(&[&shared]).await;
    let mut receipts = m.connect("ingestor-receipts", "ingestor:receipts", true).await;
    let mut a = m.connect("club-a", "club-a", false).await;
    a.subscribe(&[&t.receipts("club-a")]).await;
    let mut b = m.connect("club-b", "club-b", false).await;
    b.subscribe(&[&t.receipts("club-b")]).await;

    for round in 1..=3 {
        a.publish(&t.impressions("club-a"), false, &format!("a-envelope-{round}"))
            .await;
        b.publish(&t.impressions("club-b"), false, &format!("b-envelope-{round}"))
            .await;
        let mut got = ing.until(&format!("b-envelope-{round}")).await;
        got.sort();
        assert_eq!(
            got,
            [
                one(t.impressions("club-a"), &format!("a-envelope-{round}")),
                one(t.impressions("club-b"), &format!("b-envelope-{round}"))
            ]
            .concat(),
            "round {round}: the shared subscription delivers both sites"
        );
        receipts
            .publish(&t.receipts("club-a"), false, &format!("a-receipt-{round}"))
            .await;
        receipts
            .publish(&t.receipts("club-b"), false, &format!("b-receipt-{round}"))
            .await;
        let ra = format!("a-receipt-{round}");
        let rb = format!("b-receipt-{round}");
        assert_eq!(a.until(&ra).await, one(t.receipts("club-a"), &ra));
        assert_eq!(b.until(&rb).await, one(t.receipts("club-b"), &rb));
    }

    // One account = one session: a second connection with the `ingestor`
    // account (whatever its client id) closes the first.
    let _second = m.connect("ingestor", "ingestor:receipts", true).await;
    assert!(
        ing.closed_by_broker().await,
        "the first ingestor connection was taken over"
    );
}

/// The observer reads every site's traffic and nothing it publishes
/// reaches anyone or is retained.
#[tokio::test]
async fn the_observer_reads_everything_and_publishes_nothing() {
    let m = Mosquitto::start();
    let t = schema::mqtt::Topics::default();
    let mut ops = m.connect("ops", "ops", true).await;
    ops.subscribe(&["neopro/#"]).await;
    let mut ing = m.connect("ingestor", "ingestor", false).await;
    ing.subscribe(&[&t.all_sites(IMPRESSIONS), &t.all_sites(STATUS)]).await;
    let mut receipts = m.connect("ingestor-receipts", "ingestor:receipts", true).await;
    let mut a = m.connect("club-a", "club-a", false).await;
    a.subscribe(&[&t.receipts("club-a")]).await;

    a.publish(&t.impressions("club-a"), false, "a-envelope-1").await;
    a.publish(&t.status("club-a"), false, "a-status-1").await;
    assert_eq!(
        ops.until("a-status-1").await,
        [
            one(t.impressions("club-a"), "a-envelope-1"),
            one(t.status("club-a"), "a-status-1")
        ]
        .concat()
    );
    receipts.publish(&t.receipts("club-a"), false, "a-receipt-1").await;
    assert_eq!(ops.until("a-receipt-1").await, one(t.receipts("club-a"), "a-receipt-1"));
    assert_eq!(a.until("a-receipt-1").await, one(t.receipts("club-a"), "a-receipt-1"));
    assert_eq!(
        ing.until("a-status-1").await,
        [
            one(t.impressions("club-a"), "a-envelope-1"),
            one(t.status("club-a"), "a-status-1")
        ]
        .concat()
    );

    ops.publish(&t.receipts("club-a"), false, "ops-receipt").await;
    ops.publish(&t.impressions("club-b"), false, "ops-envelope").await;
    ops.publish(&t.status("club-b"), true, "ops-retained-status").await;
    // The observer itself is a subscriber of neopro/#: its own publishes
    // would come back to it first.
    a.publish(&t.status("club-a"), false, "a-status-2").await;
    assert_eq!(ops.until("a-status-2").await, one(t.status("club-a"), "a-status-2"));
    assert_eq!(ing.until("a-status-2").await, one(t.status("club-a"), "a-status-2"));
    receipts.publish(&t.receipts("club-a"), false, "a-receipt-2").await;
    assert_eq!(a.until("a-receipt-2").await, one(t.receipts("club-a"), "a-receipt-2"));
    let mut fresh = m.connect("ingestor", "ingestor", true).await;
    fresh.subscribe(&[&t.status("club-b")]).await;
    let mut b = m.connect("club-b", "club-b", true).await;
    b.publish(&t.status("club-b"), false, "b-status-1").await;
    assert_eq!(
        fresh.until("b-status-1").await,
        one(t.status("club-b"), "b-status-1"),
        "nothing retained from the observer"
    );
}

/// With TLS the plain listener stays on loopback; clients connect over TLS
/// with our CA (an rcgen certificate), not without it.
#[tokio::test]
async fn tls_listener_and_loopback_plain_listener() {
    runtime::tls::install_crypto_provider();
    let certs = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = certs.path().join("cert.pem");
    let key_path = certs.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();

    // The default plain listener with TLS: loopback only; anything else refused.
    let tls = |addr: &str| Some((addr.parse().unwrap(), cert_path.clone(), key_path.clone()));
    let mut o = MosquittoOptions {
        tls: tls("0.0.0.0:8883"),
        ..MosquittoOptions::default()
    };
    let out = tempfile::tempdir().unwrap();
    let g = write_config(fleet(), &o, out.path()).unwrap();
    let conf = std::fs::read_to_string(&g.conf).unwrap();
    let listeners: Vec<&str> = conf.lines().filter(|l| l.starts_with("listener ")).collect();
    assert_eq!(
        listeners,
        ["listener 1883 127.0.0.1", "listener 8883 0.0.0.0"],
        "{conf}"
    );
    o.listen = Some("0.0.0.0:1883".parse().unwrap());
    let e = write_config(fleet(), &o, out.path()).unwrap_err();
    assert!(e.to_string().contains("must be on loopback"), "{e}");

    let tls_port = free_port();
    let m = Mosquitto::start_with(|o| o.tls = tls(&format!("127.0.0.1:{tls_port}")));
    assert!(m.conf.contains(&format!("listener {} 127.0.0.1\n", m.port)));
    let t = schema::mqtt::Topics::default();
    let mut ing = Peer::connect(opts(&m.tls_url("ingestor", Some(&cert_path)), "ingestor", false)).await;
    ing.subscribe(&[&t.all_sites(IMPRESSIONS)]).await;
    let mut a = Peer::connect(opts(&m.tls_url("club-a", Some(&cert_path)), "club-a", false)).await;
    a.publish(&t.impressions("club-a"), false, "a-envelope-tls").await;
    a.publish(&t.impressions("club-b"), false, "a-forged-tls").await;
    a.publish(&t.impressions("club-a"), false, "a-envelope-tls-2").await;
    assert_eq!(
        ing.until("a-envelope-tls-2").await,
        [
            one(t.impressions("club-a"), "a-envelope-tls"),
            one(t.impressions("club-a"), "a-envelope-tls-2")
        ]
        .concat(),
        "the ACL holds over TLS"
    );
    assert!(
        refused(opts(&m.tls_url("club-b", None), "club-b", true)).await,
        "a server certificate outside the client's roots is refused"
    );
}
