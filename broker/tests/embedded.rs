//! The embedded broker with real rumqttc clients: QoS 1 through it, and a
//! persistent session that keeps its queued messages across a reconnect.

mod common;

use broker::EmbeddedBroker;
use common::*;
use rumqttc::QoS;

#[tokio::test]
async fn qos1_publish_subscribe_large_envelope() {
    let b = EmbeddedBroker::start_for_tests().unwrap();
    assert!(b.is_running());
    let url = b.mqtt_url(None, None);
    let t = prefix();
    let topic = t.impressions("club-1");

    let (sub, mut sel, _) = connect(opts(&url, &format!("sub-{}", uid()), true)).await.unwrap();
    subscribe(&sub, &mut sel, &t.all_sites(schema::mqtt::TopicKind::Impressions)).await;

    let (publ, mut pel, _) = connect(opts(&url, &format!("pub-{}", uid()), true)).await.unwrap();
    // Sizes from tiny to a 900 KiB envelope: far above rumqttc's default 10 KiB
    // and still under our packet limit.
    let payloads: Vec<Vec<u8>> = [10usize, 2048, 64 * 1024, 900 * 1024]
        .iter()
        .enumerate()
        .map(|(i, n)| vec![b'a' + i as u8; *n])
        .collect();
    publish_acked(&publ, &mut pel, &topic, &payloads).await;

    let got = recv_publishes(&mut sel, payloads.len()).await;
    assert_eq!(got.len(), payloads.len());
    for (g, p) in got.iter().zip(&payloads) {
        assert_eq!(g.topic, topic);
        assert_eq!(g.qos, QoS::AtLeastOnce);
        assert_eq!(&g.payload[..], &p[..]);
    }
}

#[tokio::test]
async fn persistent_session_survives_subscriber_reconnect() {
    let b = EmbeddedBroker::start_for_tests().unwrap();
    let url = b.mqtt_url(None, None);
    let t = prefix();
    let filter = t.all_sites(schema::mqtt::TopicKind::Impressions);
    let sub_id = format!("ingestor-{}", uid());

    // First connection: subscribe with a persistent session, then go away.
    let (sub, mut sel, present) = connect(opts(&url, &sub_id, false)).await.unwrap();
    assert!(!present, "fresh session");
    subscribe(&sub, &mut sel, &filter).await;
    sub.disconnect().await.unwrap();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while sel.poll().await.is_ok() {}
    })
    .await;
    drop(sel);

    // Published while the subscriber is away.
    let (publ, mut pel, _) = connect(opts(&url, &format!("pub-{}", uid()), true)).await.unwrap();
    let payloads: Vec<Vec<u8>> = (0..50).map(|i| format!("msg-{i}").into_bytes()).collect();
    publish_acked(&publ, &mut pel, &t.impressions("club-2"), &payloads).await;

    // Reconnect with the same client id, without subscribing again.
    let (_sub2, mut sel2, present) = connect(opts(&url, &sub_id, false)).await.unwrap();
    assert!(present, "broker kept the session");
    let got = recv_publishes(&mut sel2, payloads.len()).await;
    let got: Vec<Vec<u8>> = got.into_iter().map(|p| p.payload.to_vec()).collect();
    assert_eq!(got, payloads, "every message queued while away, in order");
}
