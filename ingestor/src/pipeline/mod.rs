//! The MQTT side: one client, batching, pipelined commits, receipts, and
//! acknowledgements in arrival order.
//!
//! ## Why one task drives the event loop
//!
//! rumqttc's `EventLoop::poll` is not cancel-safe (a request taken from the
//! channel can be lost if the future is dropped mid-write), so it is never
//! raced in a `select!` and dropped: the event loop is *moved into* a boxed
//! future that returns it, and that future is kept across loop iterations.
//! The same task also enqueues every PUBACK (receipts go out on a connection
//! of their own, see [`crate::receipts`]). That makes the
//! acknowledgement rule race-free:
//!
//! * each received message is tagged with the connection *generation*,
//!   bumped when `poll` returns an error (the machine's
//!   [`machine::Event::ConnectionLost`]);
//! * `poll`'s error path calls `EventLoop::clean`, which drops every PUBACK
//!   still queued, so an ack enqueued for the old connection is either written
//!   on it or dropped; it can never reach the new connection;
//! * a message of an older generation is never acked: the broker redelivers it
//!   (persistent session) and the database absorbs the duplicate.
//!
//! ## Batching and pipelining
//!
//! Messages are decoded on arrival and appended to the open batch. The batch
//! is sealed and handed to a writer ([`writer`]: a spawned task with its own
//! database connection) when it is full (messages or rows), or, with a
//! writer free, old enough (`batch_max_age`) or the pipeline idle (low load:
//! no added latency). Up to `writers` batches commit concurrently; their acks
//! are released strictly in arrival order through a reorder buffer
//! ([`acks::AckQueue`]).
//!
//! ## One state machine, one thin executor
//!
//! Every one of those decisions is taken by [`machine::Machine`], a
//! synchronous state machine with no I/O (its module doc names the states,
//! events and effects), tested alone. `run_subscriber` here is only the
//! executor: it turns what rumqttc, the writers and the timers report into
//! [`machine::Event`]s and carries out the [`machine::Effects`] on the
//! client, the receipts queue and the writers.
//!
//! ## No message wedges the session
//!
//! The subscription is `{prefix}/sites/+/impressions` only. Whatever arrives
//! that cannot be used takes its place in the reorder buffer like any other
//! message, so it is acknowledged in arrival order and never holds back what
//! follows: not JSON, an unknown version, oversized (above
//! `max_envelope_bytes`), retained, an impressions topic whose site is not
//! topic-safe: dead-lettered with its reason and counted
//! (`ingestor_rejected_total{reason}`); on a topic that is not an impressions
//! topic (another subscription of the persistent session): done at once,
//! acked in its turn and counted (`ingestor_messages_ignored_total`). What a refused message
//! gets as a receipt is decided in [`crate::decode`]. The connection itself
//! breaks only on a packet above `max_incoming_packet_bytes` (16 MiB), far
//! above what any broker we configure forwards (see
//! [`Settings::max_incoming_packet_bytes`]).
//!
//! The broker's own inflight window bounds how many unacked messages we hold
//! (Mosquitto: 20 by default, `max_inflight_messages`; our broker: 400,
//! `limits.max_outgoing_inflight`), so memory is bounded without
//! flow control of our own.

pub mod acks;
pub mod machine;
pub mod writer;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, Incoming, Outgoing, Publish, QoS};
use schema::{TopicKind, Topics};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::decode::{self, Decoded};
use crate::receipts::{EncodedReceipt, ReceiptTx};
use crate::settings::Settings;
use crate::Health;
use acks::Ack;
use machine::{Batch, Control, Effects, Limits, Machine, Unsent, Work};
pub use writer::{commit_latency, commit_with_retry};

type PollFuture = Pin<Box<dyn Future<Output = (EventLoop, Result<Event, ConnectionError>)> + Send>>;

fn poll_after(mut el: EventLoop, delay: Option<Duration>) -> PollFuture {
    Box::pin(async move {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let r = el.poll().await;
        (el, r)
    })
}

/// Runs the MQTT pipeline until `shutdown`, then drains: the open batch is
/// committed, its receipts published and its messages acked, within
/// `settings.drain_deadline`.
pub async fn run(
    settings: Arc<Settings>,
    pool: PgPool,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let receipts = crate::receipts::ReceiptPublisher::start(&settings)?;
    let result = run_subscriber(settings.clone(), pool, health, shutdown, receipts.sender()).await;
    receipts
        .finish(Duration::from_secs(settings.drain_deadline_secs.max(1)))
        .await;
    result
}

/// The subscribing connection; receipts are handed to `receipt_tx` (see
/// [`crate::receipts`] for why they have a connection of their own).
async fn run_subscriber(
    settings: Arc<Settings>,
    pool: PgPool,
    health: Arc<Health>,
    shutdown: CancellationToken,
    receipt_tx: ReceiptTx,
) -> anyhow::Result<()> {
    let topics = Topics::new(settings.topic_prefix.clone()).map_err(anyhow::Error::msg)?;
    let mut copts = runtime::mqtt::ClientOptions::new(settings.client_id.clone());
    copts.clean_session = false;
    copts.manual_acks = true;
    copts.keep_alive = Duration::from_secs(settings.mqtt_keep_alive_secs.max(5));
    copts.request_channel_capacity = 10_000;
    let (client, eventloop) = runtime::mqtt::client(&settings.mqtt_url, &copts, |opts| {
        // Accept messages larger than any valid envelope, so an oversized one
        // is dead-lettered instead of breaking the connection (and,
        // redelivered, wedging the persistent session).
        opts.set_max_packet_size(
            settings.max_incoming_packet_bytes,
            schema::mqtt::MAX_PACKET_BYTES + 1024,
        );
    })?;
    let filter = topics.all_sites(TopicKind::Impressions);
    tracing::info!(broker = %settings.mqtt_url, client_id = %settings.client_id, %filter, "MQTT pipeline starting");

    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut fx = Subscriber {
        client: &client,
        filter: &filter,
        receipt_tx: &receipt_tx,
        writers: writer::Writers {
            settings: settings.clone(),
            topics: topics.clone(),
            pool,
            health: health.clone(),
            done: done_tx,
        },
    };
    let mut machine = Machine::new(Limits::new(&settings));
    let mut poll_fut = poll_after(eventloop, None);
    let mut backoff = runtime::backoff(Duration::from_millis(200), Duration::from_secs(10));

    loop {
        let seal_at = machine.seal_at().map(tokio::time::Instant::from_std);
        let deadline = machine.deadline().map(tokio::time::Instant::from_std);
        let event = tokio::select! {
            (el, res) = &mut poll_fut => {
                let mut delay = None;
                let event = match res {
                    Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                        health.mqtt.store(true, Ordering::Relaxed);
                        backoff = runtime::backoff(Duration::from_millis(200), Duration::from_secs(10));
                        let generation = machine.generation();
                        if generation > 0 {
                            metrics::counter!("ingestor_mqtt_reconnects_total").increment(1);
                        }
                        tracing::info!(session_present = ack.session_present, generation, "connected to the broker");
                        machine::Event::Connected { session_present: ack.session_present }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if machine.takes_messages() {
                            machine::Event::Message { ack: Ack { pkid: p.pkid, qos: p.qos }, work: decode(&topics, &settings, &health, &p) }
                        } else {
                            // Not taken: stays unacked, redelivered to the next session.
                            machine::Event::Progress
                        }
                    }
                    Ok(Event::Incoming(Incoming::SubAck(s))) => {
                        if s.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                            tracing::error!(%filter, "the broker refused the subscription");
                        } else {
                            tracing::info!(%filter, "subscribed");
                        }
                        machine::Event::Progress
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                        tracing::info!("DISCONNECT sent; waiting for the broker to close");
                        health.mqtt.store(false, Ordering::Relaxed);
                        machine::Event::DisconnectWritten
                    }
                    Ok(_) => machine::Event::Progress,
                    Err(e) => {
                        if matches!(machine.phase(), machine::Phase::Disconnecting { .. }) {
                            tracing::info!("disconnected from the broker");
                        } else if machine.connected() {
                            tracing::warn!(error = %e, "MQTT connection lost; unacked messages will be redelivered");
                        } else {
                            tracing::warn!(error = %e, broker = %settings.mqtt_url, "MQTT connection failed");
                        }
                        health.mqtt.store(false, Ordering::Relaxed);
                        delay = backoff.next();
                        machine::Event::ConnectionLost
                    }
                };
                poll_fut = poll_after(el, delay);
                event
            }
            Some(done) = done_rx.recv() => machine::Event::Committed(done),
            () = async { tokio::time::sleep_until(seal_at.unwrap_or_else(tokio::time::Instant::now)).await }, if seal_at.is_some() => machine::Event::BatchAged,
            () = shutdown.cancelled(), if machine.takes_messages() => machine::Event::Shutdown,
            () = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => machine::Event::Deadline,
        };
        let control = machine.handle(event, Instant::now(), &mut fx);
        health.pipeline.observe(machine.in_flight());
        if control == Control::Stop {
            return Ok(());
        }
    }
}

/// Decodes a received message (counting what is refused) into what it asks
/// of the machine.
fn decode(topics: &Topics, settings: &Settings, health: &Health, p: &Publish) -> Work<Decoded> {
    metrics::counter!("ingestor_messages_received_total").increment(1);
    health.received.fetch_add(1, Ordering::Relaxed);
    let d = decode::decode_message(
        topics,
        &p.topic,
        &p.payload,
        p.retain,
        settings.max_envelope_bytes,
        Utc::now(),
    );
    if let Some(code) = d.refusal_code() {
        metrics::counter!("ingestor_rejected_total", "reason" => code).increment(1);
    }
    if let Some(reason) = d.withheld() {
        metrics::counter!("ingestor_receipts_withheld_total", "reason" => reason).increment(1);
    }
    if d.is_ignored() {
        metrics::counter!("ingestor_messages_ignored_total").increment(1);
        tracing::debug!(topic = %p.topic, "not an impressions topic; acked");
        Work::Nothing
    } else {
        Work::Write {
            rows: d.row_count(),
            msg: d,
        }
    }
}

/// The machine's effects on the subscribing client, the receipts queue and
/// the writers.
struct Subscriber<'a> {
    client: &'a AsyncClient,
    filter: &'a str,
    receipt_tx: &'a ReceiptTx,
    writers: writer::Writers,
}

impl Effects<Decoded> for Subscriber<'_> {
    fn subscribe(&mut self) {
        if let Err(e) = self.client.try_subscribe(self.filter, QoS::AtLeastOnce) {
            tracing::error!(error = %e, "could not queue the subscription");
        }
    }

    fn commit(&mut self, batch: Batch<Decoded>) {
        self.writers.spawn(batch);
    }

    fn publish(&mut self, receipt: EncodedReceipt) -> Result<(), Unsent> {
        self.receipt_tx.try_send(receipt).map_err(|e| match e {
            mpsc::error::TrySendError::Full(r) => Unsent::Busy(r),
            mpsc::error::TrySendError::Closed(_) => Unsent::Closed,
        })
    }

    fn ack(&mut self, ack: Ack) -> bool {
        let mut p = Publish::new("", ack.qos, Vec::<u8>::new());
        p.pkid = ack.pkid;
        self.client.try_ack(&p).is_ok()
    }

    fn disconnect(&mut self) -> bool {
        self.client.try_disconnect().is_ok()
    }
}
