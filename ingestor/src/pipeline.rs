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
//! * each received message is tagged with the connection *generation*, which
//!   this task bumps when `poll` returns an error;
//! * `poll`'s error path calls `EventLoop::clean`, which drops every PUBACK
//!   still queued, so an ack enqueued for the old connection is either written
//!   on it or dropped; it can never reach the new connection;
//! * a message of an older generation is never acked: the broker redelivers it
//!   (persistent session) and the database absorbs the duplicate.
//!
//! ## Batching and pipelining
//!
//! Messages are decoded on arrival and appended to the open batch. The batch
//! is sealed and handed to a writer (a spawned task with its own database
//! connection) when a writer is free and the batch is full (messages or rows),
//! old enough (`batch_max_age`), or the pipeline is idle (low load: no added
//! latency). Up to `writers` batches commit concurrently; their acks are
//! released strictly in arrival order through a reorder buffer
//! (`pending`, a queue of messages in arrival order, each marked done when its
//! batch commits).
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
//! topic (another subscription of the persistent session): acked at once
//! and counted (`ingestor_messages_ignored_total`). What a refused message
//! gets as a receipt is decided in [`crate::decode`]. The connection itself
//! breaks only on a packet above `max_incoming_packet_bytes` (16 MiB), far
//! above what any broker we configure forwards (see
//! [`Settings::max_incoming_packet_bytes`]).
//!
//! The broker's own inflight window bounds how many unacked messages we hold
//! (Mosquitto: 20 by default, `max_inflight_messages`; our broker: 400,
//! `limits.max_outgoing_inflight`), so memory is bounded without
//! flow control of our own.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rumqttc::{ConnectionError, Event, EventLoop, Incoming, Outgoing, Publish, QoS};
use schema::{TopicKind, Topics};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::decode::{self, Decoded};
use crate::settings::Settings;
use crate::{store, Health};

/// A message waiting for its ack, in arrival order.
struct PendingAck {
    msg_no: u64,
    generation: u64,
    pkid: u16,
    qos: QoS,
    done: bool,
}

/// A committed batch, back from its writer.
struct Done {
    msg_nos: Vec<u64>,
    receipts: Vec<(String, Vec<u8>)>,
}

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

struct OpenBatch {
    msgs: Vec<Decoded>,
    msg_nos: Vec<u64>,
    rows: usize,
    opened: Instant,
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
    receipt_tx: crate::receipts::ReceiptTx,
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

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut poll_fut = poll_after(eventloop, None);
    let mut backoff = runtime::backoff(Duration::from_millis(200), Duration::from_secs(10));
    let mut generation: u64 = 0;
    let mut connected = false;
    let mut subscribed_once = false;
    let mut msg_no: u64 = 0;
    let mut pending: VecDeque<PendingAck> = VecDeque::new();
    let mut open: Option<OpenBatch> = None;
    let mut sealed: VecDeque<OpenBatch> = VecDeque::new();
    let mut in_flight: usize = 0;
    let mut receipts_out: VecDeque<(String, Vec<u8>)> = VecDeque::new();
    let mut draining = false;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut disconnect_sent = false;
    let max_age = Duration::from_millis(settings.batch_max_age_ms);

    loop {
        let seal_at = open
            .as_ref()
            .map(|b| tokio::time::Instant::from_std(b.opened + max_age));
        tokio::select! {
            (el, res) = &mut poll_fut => {
                let mut delay = None;
                match res {
                    Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                        connected = true;
                        health.mqtt.store(true, Ordering::Relaxed);
                        backoff = runtime::backoff(Duration::from_millis(200), Duration::from_secs(10));
                        if generation > 0 {
                            metrics::counter!("ingestor_mqtt_reconnects_total").increment(1);
                        }
                        tracing::info!(session_present = ack.session_present, generation, "connected to the broker");
                        if !ack.session_present || !subscribed_once {
                            if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                                tracing::error!(error = %e, "could not queue the subscription");
                            }
                            subscribed_once = true;
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if draining {
                            // Not taken: stays unacked, redelivered to the next session.
                        } else {
                            msg_no += 1;
                            metrics::counter!("ingestor_messages_received_total").increment(1);
                            health.received.fetch_add(1, Ordering::Relaxed);
                            let d = decode::decode_message(&topics, &p.topic, &p.payload, p.retain, settings.max_envelope_bytes, Utc::now());
                            if let Some(code) = d.refusal_code() {
                                metrics::counter!("ingestor_rejected_total", "reason" => code).increment(1);
                            }
                            if let Some(reason) = d.withheld() {
                                metrics::counter!("ingestor_receipts_withheld_total", "reason" => reason).increment(1);
                            }
                            // A message with nothing to write is done at
                            // once: acked in its turn, without a batch.
                            let ignored = d.is_ignored();
                            pending.push_back(PendingAck { msg_no, generation, pkid: p.pkid, qos: p.qos, done: ignored });
                            if ignored {
                                metrics::counter!("ingestor_messages_ignored_total").increment(1);
                                tracing::debug!(topic = %p.topic, "not an impressions topic; acked");
                            } else {
                                let n = d.row_count();
                                let b = open.get_or_insert_with(|| OpenBatch { msgs: Vec::new(), msg_nos: Vec::new(), rows: 0, opened: Instant::now() });
                                b.msgs.push(d);
                                b.msg_nos.push(msg_no);
                                b.rows += n;
                            }
                        }
                    }
                    Ok(Event::Incoming(Incoming::SubAck(s))) => {
                        if s.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                            tracing::error!(%filter, "the broker refused the subscription");
                        } else {
                            tracing::info!(%filter, "subscribed");
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                        // Keep reading until the broker closes the socket:
                        // closing ours with unread input (PUBACKs of the
                        // receipts) would send a TCP RST, and the broker could
                        // discard our last acks and receipts still in its
                        // receive buffer.
                        tracing::info!("DISCONNECT sent; waiting for the broker to close");
                        health.mqtt.store(false, Ordering::Relaxed);
                        let linger = tokio::time::Instant::now() + Duration::from_secs(3);
                        drain_deadline = Some(drain_deadline.map_or(linger, |d| d.min(linger)));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if disconnect_sent {
                            tracing::info!("disconnected from the broker");
                            health.mqtt.store(false, Ordering::Relaxed);
                            return Ok(());
                        }
                        if connected {
                            tracing::warn!(error = %e, "MQTT connection lost; unacked messages will be redelivered");
                        } else {
                            tracing::warn!(error = %e, broker = %settings.mqtt_url, "MQTT connection failed");
                        }
                        connected = false;
                        health.mqtt.store(false, Ordering::Relaxed);
                        generation += 1;
                        delay = backoff.next();
                    }
                }
                poll_fut = poll_after(el, delay);
            }
            Some(done) = done_rx.recv() => {
                in_flight -= 1;
                receipts_out.extend(done.receipts);
                if let Some(front) = pending.front() {
                    let base = front.msg_no;
                    for m in done.msg_nos {
                        if m >= base {
                            if let Some(p) = pending.get_mut((m - base) as usize) {
                                p.done = true;
                            }
                        }
                    }
                }
            }
            () = async { tokio::time::sleep_until(seal_at.unwrap_or_else(tokio::time::Instant::now)).await }, if seal_at.is_some() && in_flight + sealed.len() < settings.writers => {}
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(settings.drain_deadline_secs));
                tracing::info!(open_messages = open.as_ref().map_or(0, |b| b.msgs.len()), in_flight, "draining: no new messages taken");
            }
            () = async { tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if drain_deadline.is_some() => {
                if !disconnect_sent {
                    tracing::error!("drain deadline passed; unacked messages will be redelivered");
                }
                return Ok(());
            }
        }

        // Seal the open batch when it is full (whether or not a writer is
        // free: batches stay bounded, so the writers alternate on similar
        // sizes and the last one of a burst is small), or, when a writer is
        // free, when it is old or the pipeline is idle. Sealed batches wait
        // in arrival order for a writer.
        if let Some(b) = &open {
            let full = b.msgs.len() >= settings.batch_max_messages || b.rows >= settings.batch_max_rows;
            let free = in_flight + sealed.len() < settings.writers;
            let old = b.opened.elapsed() >= max_age;
            if full || (free && (old || (in_flight == 0 && settings.seal_when_idle) || draining)) {
                sealed.push_back(open.take().expect("checked"));
            }
        }
        while in_flight < settings.writers {
            let Some(b) = sealed.pop_front() else { break };
            in_flight += 1;
            spawn_batch(&settings, &topics, &pool, &health, b, done_tx.clone());
        }
        health.pipeline.observe(in_flight);

        // Receipts (they follow the commit) to their own connection, then
        // acks in arrival order; neither waits for the other.
        while let Some(r) = receipts_out.pop_front() {
            if let Err(e) = receipt_tx.try_send(r) {
                match e {
                    mpsc::error::TrySendError::Full(r) => receipts_out.push_front(r),
                    mpsc::error::TrySendError::Closed(_) => receipts_out.clear(),
                }
                break;
            }
        }
        while let Some(front) = pending.front() {
            if front.generation != generation {
                pending.pop_front();
                continue;
            }
            if !front.done || !connected {
                break;
            }
            if front.qos != QoS::AtMostOnce {
                let mut p = Publish::new("", front.qos, Vec::<u8>::new());
                p.pkid = front.pkid;
                if client.try_ack(&p).is_err() {
                    break;
                }
            }
            pending.pop_front();
        }

        if draining
            && !disconnect_sent
            && open.is_none()
            && sealed.is_empty()
            && in_flight == 0
            && pending.iter().all(|p| p.generation != generation)
            && receipts_out.is_empty()
        {
            tracing::info!("drained; disconnecting");
            if client.try_disconnect().is_ok() {
                disconnect_sent = true;
            }
            if !connected {
                return Ok(());
            }
        }
    }
}

fn spawn_batch(
    settings: &Arc<Settings>,
    topics: &Topics,
    pool: &PgPool,
    health: &Arc<Health>,
    b: OpenBatch,
    done: mpsc::UnboundedSender<Done>,
) {
    let pool = pool.clone();
    let topics = topics.clone();
    let health = health.clone();
    let settings = settings.clone();
    tokio::spawn(async move {
        let OpenBatch { mut msgs, msg_nos, .. } = b;
        let set = decode::build_set(&mut msgs);
        let outcome = commit_with_retry(&pool, &set, &health, &settings).await;
        let receipts = decode::receipts(&topics, &msgs, &set, &outcome, Utc::now())
            .into_iter()
            .map(|(t, r)| (t, r.encode()))
            .collect();
        let _ = done.send(Done { msg_nos, receipts });
    });
}

/// Commits a write set, retrying transient errors with backoff forever
/// (nothing is acked meanwhile, so nothing is lost if the process dies).
pub async fn commit_with_retry(
    pool: &PgPool,
    set: &store::WriteSet,
    health: &Health,
    settings: &Settings,
) -> store::WriteOutcome {
    let mut backoff = runtime::backoff(
        Duration::from_millis(settings.retry_min_ms),
        Duration::from_millis(settings.retry_max_ms),
    );
    let mut attempt = 0u32;
    loop {
        let t0 = Instant::now();
        match store::write(pool, set, settings.insert_method).await {
            Ok(out) => {
                health.db.store(true, Ordering::Relaxed);
                let took = t0.elapsed();
                metrics::histogram!("ingestor_commit_seconds").record(took.as_secs_f64());
                metrics::histogram!("ingestor_batch_messages")
                    .record(set.rows.iter().map(|r| r.origin).max().map_or(0, |m| m + 1) as f64);
                if let Ok(mut h) = commit_latency().lock() {
                    let _ = h.record(took.as_micros().max(1) as u64);
                }
                metrics::histogram!("ingestor_batch_rows").record(set.rows.len() as f64);
                let inserted = out.inserted();
                metrics::counter!("ingestor_impressions_inserted_total").increment(inserted as u64);
                metrics::counter!("ingestor_impressions_duplicate_total")
                    .increment((set.rows.len() - inserted - out.refused.len()) as u64);
                for d in &set.dead {
                    if d.reason_code == "invalid_impression" {
                        metrics::counter!("ingestor_rejected_total", "reason" => "invalid_impression").increment(1);
                    }
                }
                if !out.refused.is_empty() {
                    metrics::counter!("ingestor_rejected_total", "reason" => "db_error")
                        .increment(out.refused.len() as u64);
                }
                if attempt > 0 {
                    tracing::info!(attempt, "database write succeeded after retries");
                }
                return out;
            }
            Err(e) => {
                attempt += 1;
                let class = runtime::db::classify(&e);
                health.db.store(false, Ordering::Relaxed);
                metrics::counter!("ingestor_db_errors_total", "class" => if class == runtime::db::ErrorClass::Transient { "transient" } else { "permanent" }).increment(1);
                let delay = backoff.next().unwrap_or(Duration::from_secs(1));
                if class == runtime::db::ErrorClass::Transient {
                    tracing::warn!(error = %e, attempt, ?delay, "transient database error; retrying the batch");
                } else {
                    // Only reachable if storing a dead letter itself failed for good.
                    tracing::error!(error = %e, attempt, ?delay, "database error while dead-lettering; retrying (nothing is acked)");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Commit latencies (microseconds) of MQTT batches since start, for the
/// benchmark command (Prometheus has the same as `ingestor_commit_seconds`).
pub fn commit_latency() -> &'static std::sync::Mutex<hdrhistogram::Histogram<u64>> {
    static H: std::sync::OnceLock<std::sync::Mutex<hdrhistogram::Histogram<u64>>> = std::sync::OnceLock::new();
    H.get_or_init(|| {
        std::sync::Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid"),
        )
    })
}
