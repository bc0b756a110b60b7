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
