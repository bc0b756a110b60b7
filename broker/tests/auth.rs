//! Authentication through the embedded broker with real rumqttc clients:
//! accounts from a credentials file, anonymous / wrong password / unknown
//! user / client-id takeover refused, reload without restart, and TLS with
//! a certificate generated here.

mod common;

use broker::credentials::Credentials;
use broker::settings::{BrokerSettings, TlsSettings};
use broker::EmbeddedBroker;
use common::*;
use std::path::Path;
use std::time::Duration;

fn write_creds(path: &Path, accounts: &[(&str, &str)]) {
    let mut c = Credentials::load_or_empty(path).unwrap();
    for (u, p) in accounts {
        c.set_password(u, p).unwrap();
    }
    c.save(path).unwrap();
}

#[tokio::test]
async fn accounts_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    let site_a = format!("club-a-{}", uid());
    let site_b = format!("club-b-{}", uid());
    write_creds(&creds, &[(&site_a, "pw-a"), (&site_b, "pw-b"), ("ingestor", "pw-ing")]);
    let b = EmbeddedBroker::start_for_tests_with_credentials(&creds).unwrap();
    // The broker's own prefix: with accounts, the topic ACL (tests/acl.rs)
    // allows nothing outside it.
    let t = schema::mqtt::Topics::new(schema::mqtt::DEFAULT_PREFIX).unwrap();

    // The right account with its own client id, or `<user>:…`.
    let a_url = b.mqtt_url(Some(&site_a), Some("pw-a"));
    let (a, mut ael, _) = connect(opts(&a_url, &site_a, false)).await.expect("site A connects");
    let (_, _, _) = connect(opts(&a_url, &format!("{site_a}:debug"), true))
        .await
        .expect("site A with a suffixed client id");

    // Refusals.
    let anon = b.mqtt_url(None, None);
    assert!(
        refused(opts(&anon, &format!("anon-{}", uid()), true)).await,
        "anonymous"
    );
    let wrong = b.mqtt_url(Some(&site_a), Some("not-the-password"));
    assert!(refused(opts(&wrong, &site_a, true)).await, "wrong password");
    let unknown = b.mqtt_url(Some("club-nobody"), Some("pw-a"));
    assert!(refused(opts(&unknown, "club-nobody", true)).await, "unknown user");
    // Site A's valid credentials, site B's client id: refused, so B's
    // session cannot be taken over.
    assert!(refused(opts(&a_url, &site_b, false)).await, "client-id takeover");
    assert!(
        refused(opts(&a_url, &format!("{site_a}x"), false)).await,
        "prefix without ':'"
    );

    // Site A's connection survived all of that: QoS 1 round trip through
    // the ingestor account.
    let ing_url = b.mqtt_url(Some("ingestor"), Some("pw-ing"));
    let (ing, mut iel, _) = connect(opts(&ing_url, "ingestor", false))
        .await
        .expect("ingestor connects");
    subscribe(&ing, &mut iel, &t.all_sites(schema::mqtt::TopicKind::Impressions)).await;
    publish_acked(&a, &mut ael, &t.impressions(&site_a), &[b"from-a".to_vec()]).await;
    let got = recv_publishes(&mut iel, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"from-a");

    let obs = b.authenticator().unwrap();
    assert_eq!(obs.len(), 3);
}

#[tokio::test]
async fn credentials_reload_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    let site = format!("club-r-{}", uid());
    write_creds(&creds, &[("ingestor", "pw-ing")]);
    let b = EmbeddedBroker::start_for_tests_with_credentials(&creds).unwrap();
    let url = b.mqtt_url(Some(&site), Some("pw-new"));
    assert!(refused(opts(&url, &site, true)).await, "not yet an account");

    write_creds(&creds, &[(&site, "pw-new")]);
    assert!(b.authenticator().unwrap().reload_if_changed(), "the change is seen");
    connect(opts(&url, &site, true))
        .await
        .expect("account added without restart");

    // A changed password takes effect at once (the verified-password cache
    // is bound to the hash).
    write_creds(&creds, &[(&site, "pw-newer")]);
    b.authenticator().unwrap().reload().unwrap();
    assert!(
        refused(opts(&url, &site, true)).await,
        "old password refused after change"
    );
}

#[tokio::test]
async fn tls_listener_with_generated_certificate() {
    runtime::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let creds = dir.path().join("credentials");
    let site = format!("club-t-{}", uid());
    write_creds(&creds, &[(&site, "pw-tls"), ("ingestor", "pw-ing")]);

    let settings = BrokerSettings {
        credentials: Some(creds),
        allow_anonymous: false,
        tls: Some(TlsSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert: cert_path.clone(),
            key: key_path,
        }),
        ..BrokerSettings::for_tests()
    };
    let b = EmbeddedBroker::start(&settings).unwrap();
    let tls = b.tls_addr.expect("TLS listener");
    let url: runtime::mqtt::MqttUrl = format!(
        "mqtts://{site}:pw-tls@localhost:{}?ca={}",
        tls.port(),
        cert_path.display()
    )
    .parse()
    .unwrap();
    let t = schema::mqtt::Topics::new(schema::mqtt::DEFAULT_PREFIX).unwrap();
    // A client that opens a TCP connection to the TLS port and never starts
    // its handshake must not hold up the others (rumqttd's own TLS listener
    // would: it handshakes inside its accept loop).
    let _stalled = tokio::net::TcpStream::connect(("127.0.0.1", tls.port())).await.unwrap();
    let (c, mut el, _) = connect(opts(&url, &site, true)).await.expect("TLS connect");
    subscribe(&c, &mut el, &t.receipts(&site)).await;
    // A receipt from the ingestor, over TLS too.
    let ing_url: runtime::mqtt::MqttUrl = format!(
        "mqtts://ingestor:pw-ing@localhost:{}?ca={}",
        tls.port(),
        cert_path.display()
    )
    .parse()
    .unwrap();
    let (ing, mut iel, _) = connect(opts(&ing_url, "ingestor", true)).await.expect("TLS connect");
    publish_acked(&ing, &mut iel, &t.receipts(&site), &[b"over-tls".to_vec()]).await;
    let got = recv_publishes(&mut el, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"over-tls");

    // Without our CA the handshake fails (the server is not trusted).
    let untrusted: runtime::mqtt::MqttUrl = format!("mqtts://{site}:pw-tls@localhost:{}", tls.port())
        .parse()
        .unwrap();
    assert!(refused(opts(&untrusted, &site, true)).await);
    // And the wrong password is refused over TLS too.
    let wrong: runtime::mqtt::MqttUrl = format!(
        "mqtts://{site}:nope@localhost:{}?ca={}",
        tls.port(),
        cert_path.display()
    )
    .parse()
    .unwrap();
    assert!(refused(opts(&wrong, &site, true)).await);
    tokio::time::sleep(Duration::from_millis(10)).await;
}
