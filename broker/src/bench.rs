//! `neopro-broker bench`: QoS 1 messages per second through the embedded
//! broker and through Mosquitto, same clients, same payloads, same run.
//!
//! Each round, for each broker: one subscriber (QoS 1, the ingestor's
//! wildcard filter) and `publishers` publishers (one site topic each, QoS 1,
//! `inflight` unacknowledged messages each) send `messages` payloads of
//! `payload_bytes`; the rate is messages received by the subscriber divided
//! by the time from the first publish to the last message received. Rounds
//! alternate between the brokers; the median of each is reported.
//!
//! The embedded broker runs inside the benchmark process (sharing its CPU
//! with the clients); Mosquitto is its own process. On a 2-core machine
//! both compete with the clients for the same cores.

use crate::embedded::EmbeddedBroker;
use crate::settings::BrokerSettings;
use anyhow::Context;
use rumqttc::{AsyncClient, Event, Incoming, QoS};
use runtime::mqtt::{ClientOptions, MqttUrl};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub mosquitto_url: MqttUrl,
    pub messages: usize,
    pub payload_bytes: usize,
    pub publishers: usize,
    pub inflight: u16,
    pub rounds: usize,
}

/// One measurement.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub messages: usize,
    pub elapsed: Duration,
}

impl Rate {
    pub fn per_s(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A payload shaped like a batch envelope, `n` bytes of JSON.
pub fn payload(n: usize, i: usize) -> Vec<u8> {
    let head = format!(
        "{{\"v\":1,\"site_id\":\"bench\",\"outbox_id\":\"{}\",\"seq\":{{\"first\":{i},\"last\":{i}}},\"impressions\":[],\"pad\":\"",
        uuid::Uuid::nil()
    );
    let tail = "\"}";
    let pad = n.saturating_sub(head.len() + tail.len());
    let mut v = Vec::with_capacity(n);
    v.extend_from_slice(head.as_bytes());
    v.extend(std::iter::repeat_n(b'x', pad));
    v.extend_from_slice(tail.as_bytes());
    v
}

/// Measures one broker.
pub async fn measure(url: &MqttUrl, o: &BenchOptions) -> anyhow::Result<Rate> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topics = schema::mqtt::Topics::new(format!("bench/{}", &run[..12])).map_err(anyhow::Error::msg)?;
    let mut copts = ClientOptions::new(format!("bench-sub-{}", &run[..12]));
    copts.clean_session = true;
    copts.inflight = o.inflight;
    let (sub, mut sel) = AsyncClient::new(url.options(&copts)?, 1024);
    sub.subscribe(topics.all_sites(schema::mqtt::TopicKind::Impressions), QoS::AtLeastOnce)
        .await?;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Event::Incoming(Incoming::SubAck(_)) = sel.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .context("subscribing (is the broker reachable?)")??;

    let per = o.messages.div_ceil(o.publishers.max(1));
    let total = per * o.publishers.max(1);
    let payloads: Vec<Vec<u8>> = (0..64).map(|i| payload(o.payload_bytes, i)).collect();
    let expected = total;
    let receiver = tokio::spawn(async move {
        let mut n = 0usize;
        let mut last = Instant::now();
        while n < expected {
            match tokio::time::timeout(Duration::from_secs(60), sel.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::Publish(_)))) => {
                    n += 1;
                    last = Instant::now();
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => anyhow::bail!("subscriber: {e}"),
                Err(_) => anyhow::bail!("subscriber received {n} of {expected} and then nothing for 60 s"),
            }
        }
        let _ = sub.disconnect().await;
        Ok(last)
    });

    let start = Instant::now();
    let mut pubs = Vec::new();
    for p in 0..o.publishers.max(1) {
        let mut copts = ClientOptions::new(format!("bench-pub-{}-{p}", &run[..12]));
        copts.clean_session = true;
        copts.inflight = o.inflight;
        let (client, mut el) = AsyncClient::new(url.options(&copts)?, 1024);
        let topic = topics.impressions(&format!("site-{p}"));
        let payloads = payloads.clone();
        pubs.push(tokio::spawn(async move {
            let sender = {
                let client = client.clone();
                tokio::spawn(async move {
                    for i in 0..per {
                        client
                            .publish(
                                topic.as_str(),
                                QoS::AtLeastOnce,
                                false,
                                payloads[i % payloads.len()].clone(),
                            )
                            .await?;
                    }
                    anyhow::Ok(())
                })
            };
            let mut acked = 0usize;
            while acked < per {
                match tokio::time::timeout(Duration::from_secs(60), el.poll()).await {
                    Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => anyhow::bail!("publisher: {e}"),
                    Err(_) => anyhow::bail!("publisher: {acked} of {per} acknowledged, then nothing for 60 s"),
                }
            }
            sender.await??;
            let _ = client.disconnect().await;
            anyhow::Ok(())
        }));
    }
    for p in pubs {
        p.await??;
    }
    let last = receiver.await??;
    Ok(Rate {
        messages: total,
        elapsed: last.duration_since(start),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the comparison and prints the figures; the last line is
/// `neopro_broker_msgs_per_s=<n> mosquitto_msgs_per_s=<n> ratio=<x>`.
pub async fn run(o: BenchOptions) -> anyhow::Result<(f64, f64)> {
    runtime::tls::install_crypto_provider();
    let settings = BrokerSettings::for_tests();
    let broker = tokio::task::spawn_blocking(move || EmbeddedBroker::start(&settings)).await??;
    let ours = broker.mqtt_url(None, None);
    println!(
        "bench: {} QoS 1 messages of {} bytes per round, {} publishers (inflight {}), 1 subscriber, {} rounds; neopro-broker {} (in-process), mosquitto {}",
        o.messages, o.payload_bytes, o.publishers, o.inflight, o.rounds, ours, o.mosquitto_url
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 1..=o.rounds.max(1) {
        let r1 = measure(&ours, &o).await.context("neopro-broker round")?;
        let r2 = measure(&o.mosquitto_url, &o).await.context("mosquitto round")?;
        println!(
            "round {round}: neopro-broker {:.0} msgs/s ({} in {:.2?}), mosquitto {:.0} msgs/s ({} in {:.2?})",
            r1.per_s(),
            r1.messages,
            r1.elapsed,
            r2.per_s(),
            r2.messages,
            r2.elapsed
        );
        a.push(r1.per_s());
        b.push(r2.per_s());
    }
    let (a, b) = (median(a), median(b));
    println!(
        "neopro_broker_msgs_per_s={a:.0} mosquitto_msgs_per_s={b:.0} ratio={:.2}",
        a / b.max(1e-9)
    );
    Ok((a, b))
}
