//! Topic isolation on the embedded broker, attacked with real rumqttc
//! clients: sites `club-a` (the attacker) and `club-b` (the victim), the
//! `ingestor`, and the observer `ops`, each with its own password, one
//! broker per test (prefix `neopro`). Every attack checks what the victim
//! and the attacker got, message by message, and what the broker counted.
//!
//! "Got nothing" is checked against a marker: a message published after
//! the attack that the same subscriber may receive. Once the marker is in,
//! everything routed earlier to that subscriber would have been too; a
//! short quiet period after it catches a stray late delivery.

mod common;

use broker::acl::{Reason, STATUS_MAX_BYTES};
use broker::credentials::{Credentials, Role};
use broker::EmbeddedBroker;
use common::*;
use rumqttc::{AsyncClient, ConnectReturnCode, EventLoop, LastWill, QoS, SubscribeReasonCode};
use std::path::PathBuf;
use std::time::Duration;

const QUIET: Duration = Duration::from_millis(400);
const GRANTED: SubscribeReasonCode = SubscribeReasonCode::Success(QoS::AtLeastOnce);

struct Fleet {
    broker: EmbeddedBroker,
    creds: PathBuf,
    _dir: tempfile::TempDir,
}

fn fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    let mut c = Credentials::default();
    c.set_password("club-a", "pw-a").unwrap();
    c.set_password("club-b", "pw-b").unwrap();
    c.set_password("ingestor", "pw-ing").unwrap();
    c.set_password_with_role("ops", "pw-ops", Role::Observer).unwrap();
    c.save(&creds).unwrap();
    let broker = EmbeddedBroker::start_for_tests_with_credentials(&creds).unwrap();
    Fleet {
        broker,
        creds,
        _dir: dir,
    }
}

fn password(user: &str) -> &'static str {
    match user {
        "club-a" => "pw-a",
        "club-b" => "pw-b",
        "ingestor" => "pw-ing",
        "ops" => "pw-ops",
        "club-c" => "pw-c",
        _ => "unknown",
    }
}

impl Fleet {
    fn opts(&self, user: &str, client_id: &str) -> rumqttc::MqttOptions {
        let url = self.broker.mqtt_url(Some(user), Some(password(user)));
        opts(&url, client_id, true)
    }

    async fn client(&self, user: &str, client_id: &str) -> (AsyncClient, EventLoop) {
        let (c, el, _) = connect(self.opts(user, client_id))
            .await
            .unwrap_or_else(|e| panic!("{user} connects: {e}"));
        (c, el)
    }

    fn denied(&self, r: Reason) -> u64 {
        self.broker.observer().acl_denied.get(r)
    }

    fn denials(&self) -> [u64; 5] {
        Reason::ALL.map(|r| self.denied(r))
    }
}

fn t(site: &str, kind: &str) -> String {
    format!("neopro/sites/{site}/{kind}")
}

fn payloads(got: &[rumqttc::Publish]) -> Vec<String> {
    got.iter()
        .map(|p| format!("{} {}", p.topic, String::from_utf8_lossy(&p.payload)))
        .collect()
}

fn msg(topic: &str, payload: &str) -> String {
    format!("{topic} {payload}")
}

#[tokio::test]
async fn a_site_subscribes_to_nothing_but_its_own_receipts() {
    let f = fleet();
    let (a, mut ael) = f.client("club-a", "club-a").await;
    let codes = subscribe_codes(
        &a,
        &mut ael,
        &[
            "neopro/#",
            "neopro/sites/+/impressions",
            &t("club-b", "receipts"),
            "#",
            &t("club-a", "receipts"),
        ],
    )
    .await;
    use SubscribeReasonCode::Failure;
    assert_eq!(
        codes,
        [Failure, Failure, Failure, Failure, GRANTED],
        "each forbidden filter 0x80, its own receipts granted in the same SUBSCRIBE"
    );
    assert_eq!(f.denials(), [0, 0, 0, 4, 0]);

    // The legitimate traffic of club-b, seen by its legitimate readers.
    let (ing, mut iel) = f.client("ingestor", "ingestor").await;
    subscribe(&ing, &mut iel, "neopro/sites/+/impressions").await;
    let (b, mut bel) = f.client("club-b", "club-b").await;
    subscribe(&b, &mut bel, &t("club-b", "receipts")).await;
    let envelopes: Vec<Vec<u8>> = (0..3).map(|i| format!("b-envelope-{i}").into_bytes()).collect();
    publish_acked(&b, &mut bel, &t("club-b", "impressions"), &envelopes).await;
    let got = recv_publishes(&mut iel, 3).await;
    assert_eq!(
        payloads(&got),
        (0..3)
            .map(|i| msg(&t("club-b", "impressions"), &format!("b-envelope-{i}")))
            .collect::<Vec<_>>()
    );
    let receipts: Vec<Vec<u8>> = (0..3).map(|i| format!("b-receipt-{i}").into_bytes()).collect();
    publish_acked(&ing, &mut iel, &t("club-b", "receipts"), &receipts).await;
    let got = recv_publishes(&mut bel, 3).await;
    assert_eq!(
        payloads(&got),
        (0..3)
            .map(|i| msg(&t("club-b", "receipts"), &format!("b-receipt-{i}")))
            .collect::<Vec<_>>(),
        "the victim got every one of its receipts"
    );

    // club-a got none of it: only its own receipt, published last.
    publish_acked(&ing, &mut iel, &t("club-a", "receipts"), &[b"a-marker".to_vec()]).await;
    let mut got = recv_until(&mut ael, b"a-marker").await;
    got.extend(quiet(&mut ael, QUIET).await);
    assert_eq!(payloads(&got), [msg(&t("club-a", "receipts"), "a-marker")]);
}

#[tokio::test]
async fn a_sites_forged_publishes_are_acked_dropped_and_never_stored() {
    let f = fleet();
    // The victim's retained status, before the attack.
    let (b, mut bel) = f.client("club-b", "club-b").await;
    subscribe(&b, &mut bel, &t("club-b", "receipts")).await;
    publish_each_acked(&b, &mut bel, &[(&t("club-b", "status"), true, b"b-online".to_vec())]).await;
    let (ing, mut iel) = f.client("ingestor", "ingestor").await;
    let (codes, got) = subscribe_until(
        &ing,
        &mut iel,
        &["neopro/sites/+/impressions", "neopro/sites/+/status"],
        Some(b"b-online"),
    )
    .await;
    assert_eq!(codes, [GRANTED, GRANTED]);
    assert_eq!(payloads(&got), [msg(&t("club-b", "status"), "b-online")]);

    let (a, mut ael) = f.client("club-a", "club-a").await;
    let oversized = vec![b'x'; STATUS_MAX_BYTES + 1];
    let attack = [
        (t("club-b", "receipts"), false, b"forged-receipt".to_vec()),
        (t("club-b", "impressions"), false, b"forged-plays".to_vec()),
        (t("club-b", "status"), true, b"forged-status".to_vec()),
        // An empty retained payload would erase the victim's status.
        (t("club-b", "status"), true, Vec::new()),
        ("other/x".to_owned(), true, b"outside-the-prefix".to_vec()),
        (t("club-a", "impressions"), true, b"retained-plays".to_vec()),
        (t("club-a", "status"), true, oversized),
    ];
    let acks = publish_each_acked(&a, &mut ael, &attack).await;
    let mut sorted = acks.clone();
    sorted.sort_unstable();
    assert_eq!(acks, sorted, "PUBACKs in arrival order");
    assert_eq!(acks.len(), attack.len(), "every forged publish acknowledged");
    assert_eq!(
        f.denials(),
        [5, 1, 1, 0, 0],
        "publish_topic (4 on club-b, other/x), publish_retain, publish_size"
    );

    // The connection stays up: club-a's genuine envelope is its marker at
    // the ingestor; the ingestor saw nothing forged.
    publish_acked(&a, &mut ael, &t("club-a", "impressions"), &[b"a-genuine".to_vec()]).await;
    let mut got = recv_until(&mut iel, b"a-genuine").await;
    got.extend(quiet(&mut iel, QUIET).await);
    assert_eq!(payloads(&got), [msg(&t("club-a", "impressions"), "a-genuine")]);

    // The victim got no forged receipt: only the ingestor's genuine one.
    publish_acked(&ing, &mut iel, &t("club-b", "receipts"), &[b"b-genuine".to_vec()]).await;
    let mut got = recv_until(&mut bel, b"b-genuine").await;
    got.extend(quiet(&mut bel, QUIET).await);
    assert_eq!(payloads(&got), [msg(&t("club-b", "receipts"), "b-genuine")]);

    // Nothing forged was retained, and the victim's status is intact: a
    // fresh reader of everything gets exactly that one retained message.
    let (ops, mut oel) = f.client("ops", "ops").await;
    let (codes, mut got) = subscribe_until(&ops, &mut oel, &["neopro/#"], Some(b"b-online")).await;
    assert_eq!(codes, [GRANTED]);
    got.extend(quiet(&mut oel, QUIET).await);
    assert!(got.iter().all(|p| p.retain));
    assert_eq!(payloads(&got), [msg(&t("club-b", "status"), "b-online")]);
    let (late, mut lel) = f.client("ingestor", "ingestor:late").await;
    let (_, mut got) = subscribe_until(
        &late,
        &mut lel,
        &["neopro/sites/+/status", "neopro/sites/+/impressions"],
        Some(b"b-online"),
    )
    .await;
    got.extend(quiet(&mut lel, QUIET).await);
    assert_eq!(payloads(&got), [msg(&t("club-b", "status"), "b-online")]);
    assert_eq!(f.denials(), [5, 1, 1, 0, 0], "the legitimate traffic refused nothing");
}

#[tokio::test]
async fn a_sites_own_traffic_still_flows() {
    let f = fleet();
    let (ing, mut iel) = f.client("ingestor", "ingestor").await;
    subscribe(&ing, &mut iel, "neopro/sites/+/impressions").await;
    // As a box connects: its own status as the offline will.
    let mut o = f.opts("club-a", "club-a");
    o.set_last_will(LastWill::new(
        t("club-a", "status"),
        "a-offline",
        QoS::AtLeastOnce,
        true,
    ));
    let (a, mut ael, _) = connect(o).await.expect("a will on its own status is allowed");
    assert_eq!(
        subscribe_codes(&a, &mut ael, &[&t("club-a", "receipts")]).await,
        [GRANTED]
    );

    let envelopes: Vec<Vec<u8>> = (0..5).map(|i| format!("a-envelope-{i}").into_bytes()).collect();
    publish_acked(&a, &mut ael, &t("club-a", "impressions"), &envelopes).await;
    let got = recv_publishes(&mut iel, 5).await;
    assert_eq!(
        payloads(&got),
        (0..5)
            .map(|i| msg(&t("club-a", "impressions"), &format!("a-envelope-{i}")))
            .collect::<Vec<_>>()
    );
    let status = vec![b's'; STATUS_MAX_BYTES];
    publish_each_acked(&a, &mut ael, &[(&t("club-a", "status"), true, status.clone())]).await;
    let receipts: Vec<Vec<u8>> = (0..5).map(|i| format!("a-receipt-{i}").into_bytes()).collect();
    publish_acked(&ing, &mut iel, &t("club-a", "receipts"), &receipts).await;
    let got = recv_publishes(&mut ael, 5).await;
    assert_eq!(
        payloads(&got),
        (0..5)
            .map(|i| msg(&t("club-a", "receipts"), &format!("a-receipt-{i}")))
            .collect::<Vec<_>>()
    );

    // The retained status reaches an ingestor subscriber that comes later.
    let (late, mut lel) = f.client("ingestor", "ingestor:status").await;
    let (_, mut got) = subscribe_until(&late, &mut lel, &["neopro/sites/+/status"], Some(&status)).await;
    got.extend(quiet(&mut lel, QUIET).await);
    assert_eq!(got.len(), 1);
    assert!(got[0].retain);
    assert_eq!(
        (got[0].topic.as_str(), &got[0].payload[..]),
        (t("club-a", "status").as_str(), &status[..])
    );
    assert_eq!(f.denials(), [0; 5], "nothing refused");
}

#[tokio::test]
async fn a_will_the_account_may_not_publish_refuses_the_connect() {
    let f = fleet();
    let will = |topic: &str, retain: bool| {
        let mut o = f.opts("club-a", "club-a");
        o.set_last_will(LastWill::new(topic, "offline", QoS::AtLeastOnce, retain));
        o
    };
    for (topic, retain) in [
        (t("club-b", "status"), true),
        (t("club-b", "receipts"), false),
        (t("club-a", "impressions"), true),
        ("other/x".to_owned(), false),
    ] {
        assert_eq!(
            connack_code(will(&topic, retain)).await,
            Some(ConnectReturnCode::NotAuthorized),
            "will on {topic} (retain {retain})"
        );
    }
    assert_eq!(f.denials(), [0, 0, 0, 0, 4]);
    assert_eq!(
        connack_code(will(&t("club-a", "status"), true)).await,
        Some(ConnectReturnCode::Success)
    );

    // The refused CONNECTs left club-b's retained status untouched (no
    // will was ever registered): a reader finds none.
    let (ing, mut iel) = f.client("ingestor", "ingestor").await;
    subscribe(&ing, &mut iel, "neopro/sites/club-b/status").await;
    let (b, mut bel) = f.client("club-b", "club-b").await;
    publish_each_acked(&b, &mut bel, &[(&t("club-b", "status"), true, b"b-marker".to_vec())]).await;
    let mut got = recv_until(&mut iel, b"b-marker").await;
    got.extend(quiet(&mut iel, QUIET).await);
    assert_eq!(payloads(&got), [msg(&t("club-b", "status"), "b-marker")]);
}

#[tokio::test]
async fn the_observer_reads_everything_and_writes_nothing_the_ingestor_forges_no_plays() {
    let f = fleet();
    let (ops, mut oel) = f.client("ops", "ops:debug").await;
    use SubscribeReasonCode::Failure;
    assert_eq!(
        subscribe_codes(&ops, &mut oel, &["#", "$SYS/#", "other/#", "neopro/#"]).await,
        [Failure, Failure, Failure, GRANTED]
    );
    let (ing, mut iel) = f.client("ingestor", "ingestor").await;
    assert_eq!(
        subscribe_codes(
            &ing,
            &mut iel,
            &["neopro/#", "neopro/sites/+/receipts", "neopro/sites/+/impressions"]
        )
        .await,
        [Failure, Failure, GRANTED]
    );
    let (b, mut bel) = f.client("club-b", "club-b").await;
    subscribe(&b, &mut bel, &t("club-b", "receipts")).await;
    assert_eq!(f.denials(), [0, 0, 0, 5, 0]);

    // Neither the observer nor the ingestor can write plays or receipts
    // they are not meant to.
    let forged = [
        (t("club-b", "receipts"), false, b"ops-receipt".to_vec()),
        (t("club-b", "impressions"), false, b"ops-plays".to_vec()),
        (t("club-b", "status"), true, b"ops-status".to_vec()),
    ];
    assert_eq!(publish_each_acked(&ops, &mut oel, &forged).await.len(), 3);
    let forged_by_ingestor = [
        (t("club-b", "impressions"), false, b"ingestor-plays".to_vec()),
        (t("club-b", "receipts"), true, b"ingestor-retained-receipt".to_vec()),
    ];
    assert_eq!(publish_each_acked(&ing, &mut iel, &forged_by_ingestor).await.len(), 2);
    assert_eq!(f.denials(), [4, 1, 0, 5, 0]);

    // The genuine traffic: the observer reads all of it, in order per topic.
    publish_acked(&b, &mut bel, &t("club-b", "impressions"), &[b"b-envelope".to_vec()]).await;
    let got = recv_until(&mut iel, b"b-envelope").await;
    assert_eq!(
        payloads(&got),
        [msg(&t("club-b", "impressions"), "b-envelope")],
        "no forged plays"
    );
    publish_acked(&ing, &mut iel, &t("club-b", "receipts"), &[b"b-receipt".to_vec()]).await;
    let mut got = recv_until(&mut bel, b"b-receipt").await;
    got.extend(quiet(&mut bel, QUIET).await);
    assert_eq!(
        payloads(&got),
        [msg(&t("club-b", "receipts"), "b-receipt")],
        "no forged receipt"
    );
    let mut seen = recv_until(&mut oel, b"b-receipt").await;
    seen.extend(quiet(&mut oel, QUIET).await);
    assert_eq!(
        payloads(&seen),
        [
            msg(&t("club-b", "impressions"), "b-envelope"),
            msg(&t("club-b", "receipts"), "b-receipt")
        ]
    );
}

#[tokio::test]
async fn a_role_change_applies_to_new_connections() {
    let f = fleet();
    let mut c = Credentials::load(&f.creds).unwrap();
    c.set_password("club-c", "pw-c").unwrap();
    c.save(&f.creds).unwrap();
    f.broker.authenticator().unwrap().reload().unwrap();
    let (old, mut old_el) = f.client("club-c", "club-c:old").await;
    assert_eq!(
        subscribe_codes(&old, &mut old_el, &["neopro/#"]).await,
        [SubscribeReasonCode::Failure]
    );

    c.set_password_with_role("club-c", "pw-c", Role::Observer).unwrap();
    c.save(&f.creds).unwrap();
    f.broker.authenticator().unwrap().reload().unwrap();
    let (new, mut new_el) = f.client("club-c", "club-c:new").await;
    assert_eq!(subscribe_codes(&new, &mut new_el, &["neopro/#"]).await, [GRANTED]);
    assert_eq!(
        subscribe_codes(&old, &mut old_el, &["neopro/#"]).await,
        [SubscribeReasonCode::Failure],
        "an established connection keeps the rules it connected with"
    );
    // And the observer may no longer write its old site's plays.
    let acks = publish_each_acked(
        &new,
        &mut new_el,
        &[(&t("club-c", "impressions"), false, b"x".to_vec())],
    )
    .await;
    assert_eq!(acks.len(), 1);
    assert_eq!(f.denials(), [1, 0, 0, 2, 0]);
}

/// The refusals reach `/metrics` under their documented names (the
/// service, `broker::app::App`, as the binary runs it).
#[tokio::test]
async fn refusals_are_exported_to_prometheus_by_reason() {
    runtime::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    let mut c = Credentials::default();
    c.set_password("club-a", "pw-a").unwrap();
    c.save(&creds).unwrap();
    let settings = broker::BrokerSettings {
        allow_anonymous: false,
        credentials: Some(creds),
        ..broker::BrokerSettings::for_tests()
    };
    let app = broker::app::App::build(settings).await.unwrap();
    let http = app.http_addr();
    let b = std::sync::Arc::clone(app.broker());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));

    let url = b.mqtt_url(Some("club-a"), Some("pw-a"));
    let (a, mut ael, _) = connect(opts(&url, "club-a", true)).await.unwrap();
    subscribe_codes(&a, &mut ael, &["#"]).await;
    let oversized = vec![b'x'; STATUS_MAX_BYTES + 1];
    publish_each_acked(
        &a,
        &mut ael,
        &[
            ("other/x".to_owned(), false, b"x".to_vec()),
            (t("club-a", "impressions"), true, b"x".to_vec()),
            (t("club-a", "status"), false, oversized),
        ],
    )
    .await;
    let mut o = opts(&url, "club-a", true);
    o.set_last_will(LastWill::new("other/will", "x", QoS::AtLeastOnce, false));
    assert_eq!(connack_code(o).await, Some(ConnectReturnCode::NotAuthorized));

    let body = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in Reason::ALL {
        let line = format!("neopro_broker_acl_denied_total{{reason=\"{}\"}} ", reason.as_str());
        let value: f64 = body
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("{line} in {body}"))
            .parse()
            .unwrap();
        assert!(value >= 1.0, "{line}{value}");
        assert_eq!(b.observer().acl_denied.get(reason), 1, "{reason:?}");
    }
    shutdown.cancel();
    server.await.unwrap().unwrap();
}
