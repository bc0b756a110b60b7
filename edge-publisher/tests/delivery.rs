//! Delivery under failure: lost receipts, broker down, broker restarted
//! without its sessions, the edge killed with SIGKILL, legacy import.
//! Real brokers (shared Mosquitto with a unique prefix, or a private Mosquitto
//! child that we stop and start), a real receipt-answering MQTT peer.

mod common;
use common::*;
use std::collections::{BTreeSet, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;
use testkit::ReceiptPeer;

fn seqs_are_contiguous(peer: &ReceiptPeer) -> bool {
    let p = peer.state.lock().unwrap();
    let seqs: BTreeSet<i64> = p.committed.values().filter_map(|i| i.seq).collect();
    seqs.len() == p.committed.len() && seqs.first() == Some(&1) && seqs.last() == Some(&(seqs.len() as i64))
}

#[tokio::test]
async fn lost_receipts_are_republished_after_the_timeout_and_the_outbox_empties() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let peer = ReceiptPeer::start(&MOSQUITTO.parse().unwrap(), &prefix, 3).unwrap();
    wait_peer_subscribed(&peer, MOSQUITTO, &prefix).await;
    let mut s = settings(dir.path(), MOSQUITTO, &prefix);
    s.receipt_timeout_ms = 1500;
    s.batch_max_impressions = 10;
    let edge = start(s).await;
    let http = reqwest::Client::new();
    let recs = records("lost", 0, 40);
    let (status, _) = post(&http, &edge.base, body(&recs)).await;
    assert_eq!(status, 200);
    wait_until("outbox empty", 60, || {
        let o = edge.outbox.clone();
        async move { o.counts().unconfirmed == 0 }
    })
    .await;
    {
        let p = peer.state.lock().unwrap();
        assert_eq!(p.dropped, 3, "three receipts were lost");
        let want: HashSet<_> = recs.iter().map(|r| id_of(&edge.site, r)).collect();
        let got: HashSet<_> = p.committed.keys().copied().collect();
        assert_eq!(got, want);
        assert!(p.duplicates >= 1, "the lost batches came again: {}", p.duplicates);
    }
    assert!(edge.health.snapshot(String::new()).republished_batches >= 3);
    assert!(seqs_are_contiguous(&peer));
    edge.stop().await;
}

#[tokio::test]
async fn broker_down_then_up_then_restarted_without_sessions_delivers_everything_once() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = PrivateBroker::new(dir.path());
    let prefix = prefix();
    let mut s = settings(dir.path(), &broker.url(), &prefix);
    s.receipt_timeout_ms = 60_000; // the session-loss path must do the work, not the timeout
    s.batch_max_impressions = 25;
    let edge = start(s).await;
    let http = reqwest::Client::new();

    // Broker down: the TV is still answered, durably.
    let first = records("down", 0, 100);
    let (status, v) = post(&http, &edge.base, body(&first)).await;
    assert_eq!((status, v["queued"].as_u64()), (200, Some(100)));
    // The batch is due one batch delay (100 ms) after the POST. The marker is
    // the edge's next refused connection attempt after that (`since` moves
    // at every attempt): the batch was due, and nothing could leave.
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(100);
    wait_until("a connection attempt refused after the batch was due", 30, || {
        let h = edge.health.clone();
        async move {
            let b = h.snapshot(String::new());
            !b.connected && b.last_error.is_some() && b.since.is_some_and(|t| t >= due)
        }
    })
    .await;
    assert_eq!(edge.outbox.counts().unsent, 100);
    assert_eq!(stats(&http, &edge.base).await["broker"]["connected"], false);

    // Broker up, but nobody answers yet: published, unconfirmed.
    broker.start();
    wait_until("everything published", 60, || {
        let o = edge.outbox.clone();
        async move { o.counts().unsent == 0 }
    })
    .await;
    assert_eq!(edge.outbox.counts().unconfirmed, 100);

    // Broker restarted without persistence: our session and those messages are
    // gone. The edge must notice (session_present = false) and publish again.
    broker.stop();
    let second = records("down", 100, 50);
    let (status, _) = post(&http, &edge.base, body(&second)).await;
    assert_eq!(status, 200);
    broker.start();
    let peer = ReceiptPeer::start(&broker.url().parse().unwrap(), &prefix, 0).unwrap();
    wait_peer_subscribed(&peer, &broker.url(), &prefix).await;
    wait_until("outbox empty after the restart", 90, || {
        let o = edge.outbox.clone();
        async move { o.counts().unconfirmed == 0 }
    })
    .await;
    assert!(edge.health.snapshot(String::new()).sessions_lost >= 1);
    let want: HashSet<_> = first.iter().chain(&second).map(|r| id_of(&edge.site, r)).collect();
    let got: HashSet<_> = peer.state.lock().unwrap().committed.keys().copied().collect();
    assert_eq!(got, want);
    assert!(seqs_are_contiguous(&peer));
    edge.stop().await;
}

struct ChildEdge {
    child: std::process::Child,
    base: String,
}

fn spawn_edge(data: &std::path::Path, site: &str, prefix: &str) -> ChildEdge {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_neopro-edge"))
        .args([
            "run",
            "--site-id",
            site,
            "--topic-prefix",
            prefix,
            "--mqtt-url",
            MOSQUITTO,
        ])
        .arg("--data-dir")
        .arg(data)
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .env("NEOPRO_EDGE__BATCH_DELAY_MS", "200")
        .env("NEOPRO_EDGE__RECEIPT_TIMEOUT_MS", "3000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    ChildEdge {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

async fn ready(http: &reqwest::Client, base: &str) {
    let url = format!("{base}/healthz");
    wait_until("edge ready", 30, || {
        let r = http.get(&url).send();
        async move { r.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
}

#[tokio::test]
async fn kill_9_mid_stream_loses_no_acknowledged_impression_and_duplicates_none() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let prefix = prefix();
    let site = unique("kill");
    let peer = ReceiptPeer::start(&MOSQUITTO.parse().unwrap(), &prefix, 0).unwrap();
    wait_peer_subscribed(&peer, MOSQUITTO, &prefix).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut acked: HashSet<uuid::Uuid> = HashSet::new();
    let mut sent: HashSet<uuid::Uuid> = HashSet::new();
    let all = records("k9", 0, 1200);

    for round in 0..2 {
        let mut edge = spawn_edge(&data, &site, &prefix);
        ready(&http, &edge.base).await;
        let slice = &all[round * 600..round * 600 + 600];
        // 4 concurrent streams of 3-impression POSTs; SIGKILL mid-way in round 0.
        let url = format!("{}/api/sync/sponsor-impressions", edge.base);
        let chunks: Vec<Vec<serde_json::Value>> = slice.chunks(3).map(<[_]>::to_vec).collect();
        let mut results = Vec::new();
        let mut stream = futures::stream::iter(chunks.into_iter().map(|c| {
            let req = http
                .post(&url)
                .header("content-type", "application/json")
                .body(body(&c));
            async move { (c, req.send().await.map(|r| r.status().as_u16())) }
        }))
        .buffer_unordered(4);
        use futures::StreamExt;
        let mut n = 0;
        while let Some(r) = stream.next().await {
            n += 1;
            if round == 0 && n == 100 {
                edge.child.kill().unwrap(); // SIGKILL
                edge.child.wait().unwrap();
            }
            results.push(r);
        }
        for (c, r) in results {
            for rec in &c {
                sent.insert(id_of(&site, rec));
            }
            if matches!(r, Ok(200)) {
                for rec in &c {
                    acked.insert(id_of(&site, rec));
                }
            }
        }
        if round == 0 {
            assert!(
                acked.len() >= 100 * 3 - 12,
                "most POSTs before the kill were acknowledged: {}",
                acked.len()
            );
            assert!(acked.len() < 600, "the kill interrupted the stream");
        } else {
            // Drain with the restarted edge.
            let url = format!("{}/api/sync/sponsor-impressions/stats", edge.base);
            wait_until("restarted edge drains its outbox", 90, || {
                let r = http.get(&url).send();
                async move {
                    match r.await {
                        Ok(r) => r.json::<serde_json::Value>().await.is_ok_and(|v| v["count"] == 0),
                        Err(_) => false,
                    }
                }
            })
            .await;
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(edge.child.id().to_string())
                .status();
            let _ = edge.child.wait();
        }
    }
    let committed: HashSet<_> = peer.state.lock().unwrap().committed.keys().copied().collect();
    let missing: Vec<_> = acked.difference(&committed).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged impressions never committed",
        missing.len()
    );
    assert!(committed.is_subset(&sent), "nothing that was not sent");
    assert!(seqs_are_contiguous(&peer), "seqs 1..=n, each once, across the crash");
    forget_session(MOSQUITTO, &site).await;
}

#[tokio::test]
async fn legacy_buffer_import_is_idempotent_reports_refusals_and_is_delivered() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let s = settings(dir.path(), MOSQUITTO, &prefix);
    let site = s.site_id.clone();
    let data = dir.path().join("data");
    // The seed's file: a bare JSON array (what saveBuffer() wrote).
    let mut recs = records("legacy", 0, 3);
    recs[2]["trigger_type"] = serde_json::json!("remote");
    let file = dir.path().join("sponsor_impressions.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&recs).unwrap()).unwrap();

    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_neopro-edge"))
            .args(args)
            .args(["--site-id", &site])
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let file_s = file.to_str().unwrap();
    let r1: serde_json::Value = serde_json::from_str(&run(&["import", file_s, "--json"])).unwrap();
    assert_eq!(
        (r1["imported"].as_u64(), r1["already_present"].as_u64()),
        (Some(2), Some(0)),
        "{r1}"
    );
    assert_eq!(r1["refused"].as_array().unwrap().len(), 1);
    assert!(
        r1["refused"][0]
            .as_str()
            .unwrap()
            .starts_with("impressions[2].trigger_type"),
        "{r1}"
    );
    let r2: serde_json::Value = serde_json::from_str(&run(&["import", file_s, "--json"])).unwrap();
    assert_eq!(
        (r2["imported"].as_u64(), r2["already_present"].as_u64()),
        (Some(0), Some(2)),
        "{r2}"
    );

    // The operator commands see them.
    let st: serde_json::Value = serde_json::from_str(&run(&["status"])).unwrap();
    assert_eq!(st["count"], 2, "{st}");
    let exported: serde_json::Value = serde_json::from_str(&run(&["export", "--format", "json"])).unwrap();
    assert_eq!(exported["impressions"].as_array().unwrap().len(), 2);
    let csv = run(&["export", "--format", "csv"]);
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(csv.starts_with("seq,impression_id,site_id"));

    // Then the service delivers them.
    let peer = ReceiptPeer::start(&MOSQUITTO.parse().unwrap(), &prefix, 0).unwrap();
    wait_peer_subscribed(&peer, MOSQUITTO, &prefix).await;
    let edge = start(s).await;
    wait_until("imported impressions delivered", 60, || {
        let o = edge.outbox.clone();
        async move { o.counts().unconfirmed == 0 }
    })
    .await;
    {
        let p = peer.state.lock().unwrap();
        for r in &recs[..2] {
            let imp = p.committed.get(&id_of(&site, r)).expect("delivered");
            assert_eq!(imp.video_filename, r["video_filename"].as_str().unwrap());
            assert_eq!(imp.audience_estimate, Some(150));
        }
        assert_eq!(p.committed.len(), 2);
    }
    edge.stop().await;
}
