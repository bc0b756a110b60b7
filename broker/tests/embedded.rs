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

/// MQTT over websocket: HTTP upgrade with subprotocol `mqtt`, then a CONNECT
/// in a binary frame is answered by a CONNACK (raw bytes: rumqttc is built
/// without its websocket feature).
#[tokio::test]
async fn websocket_listener_speaks_mqtt() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let settings = broker::BrokerSettings {
        websocket: Some(broker::settings::WebsocketSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
        }),
        ..broker::BrokerSettings::for_tests()
    };
    let b = EmbeddedBroker::start(&settings).unwrap();
    let ws = b.ws_addr.expect("websocket listener");
    let mut s = tokio::net::TcpStream::connect(ws).await.unwrap();
    s.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-protocol: mqtt"), "{head}");
    // CONNECT, MQTT 3.1.1, clean session, keep-alive 30 s, client id "ws1".
    let connect: [u8; 17] = [
        0x10, 0x0f, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x1e, 0x00, 0x03, b'w', b's', b'1',
    ];
    // Binary frame, masked with a zero key (payload unchanged).
    let mut frame = vec![0x82, 0x80 | connect.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(&connect);
    s.write_all(&frame).await.unwrap();
    let mut reply = [0u8; 6];
    tokio::time::timeout(WAIT, s.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        reply,
        [0x82, 0x04, 0x20, 0x02, 0x00, 0x00],
        "binary frame holding CONNACK accepted"
    );
}

/// A persistent subscriber away longer than its log holds loses the oldest
/// messages; the broker raises a cursor-jump alert (logged at ERROR and
/// counted), which is what operators watch for.
#[tokio::test]
async fn log_overflow_raises_cursor_jump_alert() {
    let mut settings = broker::BrokerSettings::for_tests();
    // Every non-ingestor filter: 4 segments of 4 KiB.
    settings.log.other_filter_bytes = 16 * 1024;
    settings.log.segments = 4;
    let b = EmbeddedBroker::start(&settings).unwrap();
    let url = b.mqtt_url(None, None);
    let t = prefix();
    let filter = t.receipts("club-slow");
    let sub_id = format!("slow-{}", uid());

    let (sub, mut sel, _) = connect(opts(&url, &sub_id, false)).await.unwrap();
    subscribe(&sub, &mut sel, &filter).await;
    sub.disconnect().await.unwrap();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while sel.poll().await.is_ok() {}
    })
    .await;
    drop(sel);

    let (publ, mut pel, _) = connect(opts(&url, &format!("pub-{}", uid()), true)).await.unwrap();
    let payloads: Vec<Vec<u8>> = (0..200)
        .map(|i| format!("{i:04}-{}", "x".repeat(1000)).into_bytes())
        .collect();
    publish_acked(&publ, &mut pel, &filter, &payloads).await;

    let (_sub2, mut sel2, present) = connect(opts(&url, &sub_id, false)).await.unwrap();
    assert!(present);
    // Read what is left (the newest messages), then the alert must show.
    let deadline = std::time::Instant::now() + WAIT;
    let mut got = Vec::new();
    while b.observer().cursor_jumps.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < deadline, "no cursor_jump alert");
        if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p)))) =
            tokio::time::timeout(std::time::Duration::from_millis(100), sel2.poll()).await
        {
            got.push(p.payload.to_vec());
        }
    }
    assert!(got.len() < payloads.len(), "some messages were dropped by the ring");
    if let Some(last) = got.last() {
        assert_eq!(last, payloads.last().unwrap(), "the newest survive");
    }
}
