//! The hosted-broker path against the real Mosquitto 2.0 binary: the
//! configuration generated from our credentials file, on a private loopback
//! port, enforces passwords and per-site topic ACLs.

mod common;

use broker::credentials::{mosquitto_hash_with, parse_mosquitto_hash, Credentials};
use broker::mosquitto::{write_config, MosquittoOptions};
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

fn installed(bin: &str) -> bool {
    Path::new(bin).exists()
}

/// A Mosquitto child process, killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mosquitto {
    fn start(creds: &Credentials, dir: &Path) -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let pers = dir.join("persistence");
        std::fs::create_dir_all(&pers).unwrap();
        let o = MosquittoOptions {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            persistence_dir: pers,
            // The test runs as whoever runs it; Mosquitto must not drop to a
            // user that cannot read the 0600 files.
            run_as: whoami(),
            ..MosquittoOptions::default()
        };
        let conf = write_config(creds, &o, &dir.join("conf")).unwrap();
        let log = dir.join("mosquitto.log");
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting mosquitto");
        let m = Mosquitto { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen: {}",
                std::fs::read_to_string(&m.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    fn url(&self, user: &str, pass: &str) -> runtime::mqtt::MqttUrl {
        format!("mqtt://{user}:{pass}@127.0.0.1:{}", self.port).parse().unwrap()
    }
}

fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Our `$7$` hash is bit-for-bit what `mosquitto_passwd` computes.
#[test]
fn hash_matches_mosquitto_passwd() {
    if !installed("/usr/bin/mosquitto_passwd") {
        eprintln!("mosquitto_passwd not installed; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pw");
    let st = Command::new("/usr/bin/mosquitto_passwd")
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
async fn mosquitto_enforces_generated_acl_and_passwords() {
    if !installed(MOSQUITTO) {
        eprintln!("{MOSQUITTO} not installed; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut creds = Credentials::default();
    creds.set_password("club-a", "pw-a").unwrap();
    creds.set_password("club-b", "pw-b").unwrap();
    creds.set_password("ingestor", "pw-ing").unwrap();
    let m = Mosquitto::start(&creds, dir.path());
    let t = schema::mqtt::Topics::default();

    // Wrong password, unknown user, anonymous: refused.
    assert!(
        refused(opts(&m.url("club-a", "nope"), "club-a", true)).await,
        "wrong password"
    );
    assert!(
        refused(opts(&m.url("club-z", "pw-a"), "club-z", true)).await,
        "unknown user"
    );
    let anon: runtime::mqtt::MqttUrl = format!("mqtt://127.0.0.1:{}", m.port).parse().unwrap();
    assert!(refused(opts(&anon, "anon", true)).await, "anonymous");

    // The ingestor reads every site's impressions.
    let (ing, mut iel, _) = connect(opts(&m.url("ingestor", "pw-ing"), "ingestor", false))
        .await
        .expect("ingestor account works");
    subscribe(&ing, &mut iel, &t.all_sites(schema::mqtt::TopicKind::Impressions)).await;

    // Site A publishes into site B's topic first, then into its own. With
    // MQTT 3.1.1 Mosquitto acknowledges and silently drops an unauthorised
    // publish; the ingestor must see only the authorised one.
    let (a, mut ael, _) = connect(opts(&m.url("club-a", "pw-a"), "club-a", false)).await.unwrap();
    publish_acked(&a, &mut ael, &t.impressions("club-b"), &[b"forged-by-a".to_vec()]).await;
    publish_acked(&a, &mut ael, &t.impressions("club-a"), &[b"genuine-a".to_vec()]).await;
    let (bc, mut bel, _) = connect(opts(&m.url("club-b", "pw-b"), "club-b", false)).await.unwrap();
    publish_acked(&bc, &mut bel, &t.impressions("club-b"), &[b"genuine-b".to_vec()]).await;
    let got = recv_publishes(&mut iel, 2).await;
    let got: Vec<(String, Vec<u8>)> = got.into_iter().map(|p| (p.topic, p.payload.to_vec())).collect();
    assert_eq!(
        got,
        vec![
            (t.impressions("club-a"), b"genuine-a".to_vec()),
            (t.impressions("club-b"), b"genuine-b".to_vec()),
        ],
        "the forged message never reached the ingestor"
    );

    // Receipts: the ingestor writes them; each site reads only its own.
    subscribe(&a, &mut ael, &t.receipts("club-a")).await;
    // Subscribing to B's receipts is granted by Mosquitto at SUBACK time but
    // nothing is delivered (read ACL checked per message).
    subscribe(&a, &mut ael, &t.receipts("club-b")).await;
    publish_acked(&ing, &mut iel, &t.receipts("club-b"), &[b"receipt-for-b".to_vec()]).await;
    publish_acked(&ing, &mut iel, &t.receipts("club-a"), &[b"receipt-for-a".to_vec()]).await;
    // Mosquitto delivers one publisher's messages in order: had B's receipt
    // reached A, it would come first.
    let got = recv_publishes(&mut ael, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].topic.as_str(), &got[0].payload[..]),
        (t.receipts("club-a").as_str(), &b"receipt-for-a"[..]),
        "site A received only its own receipt"
    );

    // A site may not write receipts (only the ingestor may): A's forged
    // receipt (PUBACKed, dropped) is followed by a real one, which is the
    // next message A sees.
    publish_acked(&a, &mut ael, &t.receipts("club-a"), &[b"self-receipt".to_vec()]).await;
    publish_acked(&ing, &mut iel, &t.receipts("club-a"), &[b"receipt-2-for-a".to_vec()]).await;
    let got = recv_publishes(&mut ael, 1).await;
    assert_eq!(&got[0].payload[..], b"receipt-2-for-a", "a site cannot write receipts");

    // A site may publish its own status, the ingestor reads it.
    subscribe(&ing, &mut iel, &t.all_sites(schema::mqtt::TopicKind::Status)).await;
    publish_acked(&bc, &mut bel, &t.status("club-a"), &[b"forged-status".to_vec()]).await;
    publish_acked(&a, &mut ael, &t.status("club-a"), &[b"status-a".to_vec()]).await;
    let st = recv_publishes(&mut iel, 1).await;
    assert_eq!(&st[0].payload[..], b"status-a", "B cannot write A's status");

    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
    assert!(log.contains("not authorised"), "mosquitto logged the refusals: {log}");
}
