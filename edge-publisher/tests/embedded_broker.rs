//! The edge against our embedded broker (rumqttd in-process, ephemeral port),
//! with lost receipts: everything lands once and the outbox ends empty.

mod common;
use common::*;
use edge_publisher::receipt_peer::ReceiptPeer;
use std::collections::HashSet;

#[tokio::test]
async fn embedded_broker_delivers_everything_once_even_with_lost_receipts() {
    init();
    let broker = broker::EmbeddedBroker::start_for_tests().unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let peer = ReceiptPeer::start(&url.parse().unwrap(), &prefix, 2).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut s = settings(dir.path(), &url, &prefix);
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
