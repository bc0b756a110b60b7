//! The edge against our embedded broker (rumqttd in-process, ephemeral port),
//! with lost receipts: everything lands once and the outbox ends empty.

mod common;
use common::*;
use std::collections::HashSet;
use testkit::ReceiptPeer;

/// Our broker on an ephemeral port, a receipt peer that drops its first
/// `drop_first` answers, and a directory for the edge's outbox.
/// (Fields drop in order: the peer first, the broker last.)
struct Rig {
    peer: ReceiptPeer,
    dir: tempfile::TempDir,
    url: String,
    prefix: String,
    _broker: broker::EmbeddedBroker,
}

impl Rig {
    async fn start(drop_first: u64) -> Rig {
        init();
        let broker = broker::EmbeddedBroker::start_for_tests().unwrap();
        let url = broker.url();
        let prefix = prefix();
        let peer = ReceiptPeer::start(&url.parse().unwrap(), &prefix, drop_first).unwrap();
        wait_peer_subscribed(&peer, &url, &prefix).await;
        Rig {
            peer,
            dir: tempfile::tempdir().unwrap(),
            url,
            prefix,
            _broker: broker,
        }
    }

    fn settings(&self) -> edge_publisher::Settings {
        settings(self.dir.path(), &self.url, &self.prefix)
    }
}

#[tokio::test]
async fn embedded_broker_delivers_everything_once_even_with_lost_receipts() {
    let rig = Rig::start(2).await;
    let (peer, mut s) = (&rig.peer, rig.settings());
    s.receipt_timeout_ms = 1500;
    s.batch_max_impressions = 50;
    let edge = start(s).await;
    let http = reqwest::Client::new();
    let recs = records("embedded", 0, 300);
    for chunk in recs.chunks(50) {
        let (status, _) = post(&http, &edge.base, body(chunk)).await;
        assert_eq!(status, 200);
    }
    let (status, _) = post(&http, &edge.base, SEED_BODY.to_owned()).await;
    assert_eq!(status, 200);
    wait_until("outbox empty", 60, || {
        let o = edge.outbox.clone();
        async move { o.counts().unconfirmed == 0 }
    })
    .await;
    {
        let p = peer.state.lock().unwrap();
        let mut want: HashSet<_> = recs.iter().map(|r| id_of(&edge.site, r)).collect();
        let seed: serde_json::Value = serde_json::from_str(SEED_BODY).unwrap();
        want.insert(id_of(&edge.site, &seed["impressions"][0]));
        let got: HashSet<_> = p.committed.keys().copied().collect();
        assert_eq!(got, want);
        assert_eq!(p.dropped, 2);
        let seqs: HashSet<i64> = p.committed.values().filter_map(|i| i.seq).collect();
        assert_eq!(seqs, (1..=301).collect::<HashSet<_>>());
    }
    edge.stop().await;
}

/// A held box connects and subscribes but publishes nothing until its gate
/// opens; then everything it stored is delivered and the outbox empties.
#[tokio::test]
async fn a_held_box_is_ready_but_publishes_only_once_released() {
    let rig = Rig::start(0).await;
    let (peer, mut s) = (&rig.peer, rig.settings());
    // One full batch: an open box publishes it at its first turn once
    // connected, without waiting for the batch delay.
    s.batch_max_impressions = 40;
    let site = s.site_id.clone();
    let mut app = edge_publisher::App::build(s).await.unwrap();
    let gate = app.hold_publishing();
    let base = format!("http://{}", app.http_addr().unwrap());
    let outbox = app.outbox().clone();
    let health = app.health();
    let token = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(app.run(token.clone()));
    let recs = records("held", 0, 40);
    let (status, _) = post(&reqwest::Client::new(), &base, body(&recs)).await;
    assert_eq!(status, 200);
    wait_until("session ready", 30, || {
        let h = health.clone();
        async move { h.ready() }
    })
    .await;
    // A marker on its receipts topic, sent once it is ready (unreadable, so
    // ignored and counted): the publisher handles it after the CONNACK, so
    // once it is counted the publisher has taken a turn connected with a
    // full batch pending. Still nothing claimed, nothing published.
    let marker = RawClient::connect(&rig.url, None, &[]).await;
    let receipts = schema::Topics::new(rig.prefix.clone()).unwrap().receipts(&site);
    marker.publish(&receipts, false, b"marker".to_vec()).await;
    wait_until("the held box handled the marker", 30, || {
        let h = health.clone();
        async move { h.ignored(edge_publisher::publisher::Ignored::Unreadable) == 1 }
    })
    .await;
    assert_eq!(outbox.counts().unsent, 40, "a held box published");
    assert_eq!(outbox.counts().unconfirmed, 40);
    assert_eq!(peer.state.lock().unwrap().received, 0, "a held box published");
    gate.open();
    wait_until("outbox empty", 30, || {
        let o = outbox.clone();
        async move { o.counts().unconfirmed == 0 }
    })
    .await;
    let got: HashSet<_> = peer.state.lock().unwrap().committed.keys().copied().collect();
    let want: HashSet<_> = recs.iter().map(|r| id_of(&site, r)).collect();
    assert_eq!(got, want);
    token.cancel();
    task.await.unwrap().unwrap();
}
