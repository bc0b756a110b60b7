//! Helpers shared by the broker's integration tests: real rumqttc clients.
#![allow(dead_code)]

use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, Incoming, MqttOptions, Publish, QoS};
use std::time::Duration;

pub const WAIT: Duration = Duration::from_secs(30);

pub fn uid() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

pub fn prefix() -> schema::mqtt::Topics {
    schema::mqtt::Topics::new(format!("test/{}", uid())).unwrap()
}

/// Polls until CONNACK; returns (client, eventloop, session_present).
pub async fn connect(opts: MqttOptions) -> anyhow::Result<(AsyncClient, EventLoop, bool)> {
    let (client, mut el) = AsyncClient::new(opts, 256);
    let present = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    anyhow::ensure!(ack.code == ConnectReturnCode::Success, "connack {:?}", ack.code);
                    return Ok(ack.session_present);
                }
                Ok(_) => {}
                Err(e) => anyhow::bail!("connection failed: {e}"),
            }
        }
    })
    .await??;
    Ok((client, el, present))
}

/// Whether the broker refuses this client (no successful CONNACK).
pub async fn refused(opts: MqttOptions) -> bool {
    connect(opts).await.is_err()
}

/// Drives the event loop until `n` publishes arrived (or WAIT passes).
pub async fn recv_publishes(el: &mut EventLoop, n: usize) -> Vec<Publish> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, async {
        while got.len() < n {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::Publish(p))) => got.push(p),
                Ok(_) => {}
                Err(e) => panic!("subscriber connection failed: {e}"),
            }
        }
    })
    .await;
    got
}

/// Publishes QoS 1 and drives the loop until every PUBACK arrived.
pub async fn publish_acked(client: &AsyncClient, el: &mut EventLoop, topic: &str, payloads: &[Vec<u8>]) {
    for p in payloads {
        client.publish(topic, QoS::AtLeastOnce, false, p.clone()).await.unwrap();
    }
    let mut acks = 0;
    tokio::time::timeout(WAIT, async {
        while acks < payloads.len() {
            if let Event::Incoming(Incoming::PubAck(_)) = el.poll().await.expect("publisher connection") {
                acks += 1;
            }
        }
    })
    .await
    .expect("all PUBACKs within the wait ceiling");
}

/// Drives the loop until SUBACK.
pub async fn subscribe(client: &AsyncClient, el: &mut EventLoop, filter: &str) {
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Incoming::SubAck(_)) = el.poll().await.expect("subscriber connection") {
                return;
            }
        }
    })
    .await
    .expect("SUBACK");
}

pub fn opts(url: &runtime::mqtt::MqttUrl, client_id: &str, clean: bool) -> MqttOptions {
    let mut c = runtime::mqtt::ClientOptions::new(client_id);
    c.clean_session = clean;
    url.options(&c).unwrap()
}

/// Sends one SUBSCRIBE with these filters (QoS 1) and returns the SUBACK's
/// return codes, in order. A publish arriving before the SUBACK fails the
/// test (use [`subscribe_until`] where retained messages are expected).
pub async fn subscribe_codes(
    client: &AsyncClient,
    el: &mut EventLoop,
    filters: &[&str],
) -> Vec<rumqttc::SubscribeReasonCode> {
    let (codes, early) = subscribe_until(client, el, filters, None).await;
    assert!(early.is_empty(), "publishes before the SUBACK: {early:?}");
    codes
}

/// Sends one SUBSCRIBE with these filters (QoS 1) and drives the loop until
/// its SUBACK and, when given, a publish with payload `marker` (a retained
/// message may arrive before the SUBACK) have arrived. Returns the return
/// codes and every publish received, in order.
pub async fn subscribe_until(
    client: &AsyncClient,
    el: &mut EventLoop,
    filters: &[&str],
    marker: Option<&[u8]>,
) -> (Vec<rumqttc::SubscribeReasonCode>, Vec<Publish>) {
    let filters = filters
        .iter()
        .map(|f| rumqttc::SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce));
    client.subscribe_many(filters).await.unwrap();
    let mut codes = None;
    let mut got = Vec::new();
    let mut seen = marker.is_none();
    tokio::time::timeout(WAIT, async {
        while codes.is_none() || !seen {
            match el.poll().await.expect("subscriber connection") {
                Event::Incoming(Incoming::SubAck(ack)) => codes = Some(ack.return_codes),
                Event::Incoming(Incoming::Publish(p)) => {
                    seen |= marker.is_some_and(|m| p.payload[..] == *m);
                    got.push(p);
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("SUBACK and marker {marker:?} within the wait ceiling; got {got:?}"));
    (codes.unwrap_or_default(), got)
}

/// Publishes each `(topic, retain, payload)` at QoS 1 and drives the loop
/// until every PUBACK arrived; returns the PUBACKs' packet ids in arrival
/// order (they must be the publishes' ids, in order).
pub async fn publish_each_acked<T: AsRef<str>>(
    client: &AsyncClient,
    el: &mut EventLoop,
    msgs: &[(T, bool, Vec<u8>)],
) -> Vec<u16> {
    for (topic, retain, payload) in msgs {
        client
            .publish(topic.as_ref(), QoS::AtLeastOnce, *retain, payload.clone())
            .await
            .unwrap();
    }
    let mut acks = Vec::new();
    tokio::time::timeout(WAIT, async {
        while acks.len() < msgs.len() {
            if let Event::Incoming(Incoming::PubAck(a)) = el.poll().await.expect("publisher connection") {
                acks.push(a.pkid);
            }
        }
    })
    .await
    .expect("all PUBACKs within the wait ceiling");
    acks
}

/// Drives the loop until a publish with payload `marker` arrives; returns
/// every publish received, the marker last.
pub async fn recv_until(el: &mut EventLoop, marker: &[u8]) -> Vec<Publish> {
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let done = p.payload[..] == *marker;
                    got.push(p);
                    if done {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber connection failed: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("marker {:?} not received; got {got:?}", String::from_utf8_lossy(marker)));
    got
}

/// Publishes that arrive within `d` (a check that nothing more comes, after
/// the events that matter were observed; never used to wait for them).
pub async fn quiet(el: &mut EventLoop, d: Duration) -> Vec<Publish> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(d, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::Publish(p))) => got.push(p),
                Ok(_) => {}
                Err(e) => panic!("connection failed: {e}"),
            }
        }
    })
    .await;
    got
}

/// The CONNACK's return code, or `None` when the broker closed the
/// connection without one.
pub async fn connack_code(opts: MqttOptions) -> Option<ConnectReturnCode> {
    let (_client, mut el) = AsyncClient::new(opts, 16);
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => return Some(ack.code),
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Some(code),
                Err(_) => return None,
            }
        }
    })
    .await
    .expect("an answer to CONNECT within the wait ceiling")
}
