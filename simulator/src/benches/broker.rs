//! `neopro-sim bench-broker`: QoS 1 messages per second through the embedded
//! broker and through Mosquitto, same clients, same payloads, same run.
//!
//! Each round, for each broker: one subscriber (QoS 1, the ingestor's
//! wildcard filter) and `publishers` publishers (one site topic each, QoS 1,
//! `inflight` unacknowledged messages each) send `messages` payloads of
//! `payload_bytes`, with at most `window` messages published and not yet
//! received end to end (as edges wait for receipts; without it Mosquitto
//! drops beyond its queue limit); the rate is messages received by the
//! subscriber divided by the time from the first publish to the last
//! message received. Messages acknowledged but never delivered are
//! reported as lost. Rounds
//! alternate between the brokers; the median of each is reported.
//!
//! The embedded broker runs inside the benchmark process (sharing its CPU
//! with the clients); Mosquitto is its own process. On a 2-core machine
//! both compete with the clients for the same cores.

use anyhow::Context;
use broker::{BrokerSettings, EmbeddedBroker};
use rumqttc::{AsyncClient, Event, Incoming, QoS};
use runtime::mqtt::{ClientOptions, MqttUrl};
use std::time::{Duration, Instant};

/// Options of `neopro-sim bench-broker`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// The Mosquitto to compare with.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub mosquitto_url: MqttUrl,
    /// Messages per round and broker.
    #[arg(long, default_value_t = 50_000)]
    pub messages: usize,
    /// Payload size (a typical batch envelope).
    #[arg(long, default_value_t = 2048)]
    pub payload_bytes: usize,
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Unacknowledged QoS 1 messages per client.
    #[arg(long, default_value_t = 100)]
    pub inflight: u16,
    /// Messages published but not yet received, all publishers together
    /// (keep it under Mosquitto's max_queued_messages, default 1000).
    #[arg(long, default_value_t = 500)]
    pub window: usize,
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// One measurement.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    /// Messages the subscriber received.
    pub messages: usize,
    /// Published (and acknowledged) but never delivered.
    pub lost: usize,
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
pub async fn measure(url: &MqttUrl, o: &BenchArgs) -> anyhow::Result<Rate> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
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

    let publishers = o.publishers.max(1);
    let per = o.messages.div_ceil(publishers);
    let total = per * publishers;
    let payloads: Vec<Vec<u8>> = (0..64).map(|i| payload(o.payload_bytes, i)).collect();
    // End-to-end window: a publisher may only have `window` messages
    // published and not yet received by the subscriber (as the edge waits
    // for receipts). Without it a fast publisher overruns the subscriber's
    // queue and Mosquitto drops beyond max_queued_messages (default 1000).
    let window = Arc::new(tokio::sync::Semaphore::new(o.window.max(1)));
    let w = Arc::clone(&window);
    let receiver = tokio::spawn(async move {
        let mut n = 0usize;
        let mut last = Instant::now();
        while n < total {
            match tokio::time::timeout(Duration::from_secs(10), sel.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::Publish(_)))) => {
                    n += 1;
                    last = Instant::now();
                    w.add_permits(1);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => anyhow::bail!("subscriber: {e}"),
                // Nothing for 10 s: the rest was lost by the broker.
                Err(_) => break,
            }
        }
        w.close();
        let _ = sub.disconnect().await;
        Ok((n, last))
    });

    let start = Instant::now();
    let mut pubs = Vec::new();
    for p in 0..publishers {
        let mut copts = ClientOptions::new(format!("bench-pub-{}-{p}", &run[..12]));
        copts.clean_session = true;
        copts.inflight = o.inflight;
        let (client, mut el) = AsyncClient::new(url.options(&copts)?, 1024);
        let topic = topics.impressions(&format!("site-{p}"));
        let payloads = payloads.clone();
        let window = Arc::clone(&window);
        pubs.push(tokio::spawn(async move {
            let sent = Arc::new(AtomicUsize::new(0));
            let done = Arc::new(AtomicBool::new(false));
            let sender = {
                let (client, sent, done) = (client.clone(), Arc::clone(&sent), Arc::clone(&done));
                tokio::spawn(async move {
                    for i in 0..per {
                        let Ok(permit) = window.acquire().await else { break };
                        permit.forget();
                        client
                            .publish(
                                topic.as_str(),
                                QoS::AtLeastOnce,
                                false,
                                payloads[i % payloads.len()].clone(),
                            )
                            .await?;
                        sent.fetch_add(1, Ordering::Release);
                    }
                    done.store(true, Ordering::Release);
                    anyhow::Ok(())
                })
            };
            let mut acked = 0usize;
            while !(done.load(Ordering::Acquire) && acked >= sent.load(Ordering::Acquire)) {
                match tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
                    Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) | Err(_) => {}
                    Ok(Err(e)) => anyhow::bail!("publisher: {e}"),
                }
            }
            sender.await??;
            let _ = client.disconnect().await;
            anyhow::Ok(())
        }));
    }
    let (received, last) = receiver.await??;
    for p in pubs {
        p.await??;
    }
    Ok(Rate {
        messages: received,
        lost: total - received,
        elapsed: last.duration_since(start),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the comparison and prints the figures; the last line is
/// `neopro_broker_msgs_per_s=<n> mosquitto_msgs_per_s=<n> ratio=<x>`.
pub async fn run(o: BenchArgs) -> anyhow::Result<(f64, f64)> {
    runtime::tls::install_crypto_provider();
    let settings = BrokerSettings::for_tests();
    let broker = tokio::task::spawn_blocking(move || EmbeddedBroker::start(&settings)).await??;
    let ours = broker.mqtt_url(None, None);
    println!(
        "bench: {} QoS 1 messages of {} bytes per round, {} publishers (inflight {}), 1 subscriber, end-to-end window {}, {} rounds; neopro-broker {} (in-process), mosquitto {}",
        o.messages, o.payload_bytes, o.publishers, o.inflight, o.window, o.rounds, ours, o.mosquitto_url
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 1..=o.rounds.max(1) {
        let r1 = measure(&ours, &o).await.context("neopro-broker round")?;
        let r2 = measure(&o.mosquitto_url, &o).await.context("mosquitto round")?;
        println!(
            "round {round}: neopro-broker {:.0} msgs/s ({} in {:.2?}, lost {}), mosquitto {:.0} msgs/s ({} in {:.2?}, lost {})",
            r1.per_s(),
            r1.messages,
            r1.elapsed,
            r1.lost,
            r2.per_s(),
            r2.messages,
            r2.elapsed,
            r2.lost
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
