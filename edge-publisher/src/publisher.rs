//! The publisher: outbox → MQTT envelopes, receipts → outbox deletions.
//!
//! A broker PUBACK proves nothing about the database (rumqttd and Mosquitto
//! both drop messages for lagging or offline subscribers after the PUBACK),
//! so an impression leaves the outbox only when the ingestor's [`Receipt`]
//! (published after its PostgreSQL commit) names its seq. Everything else is
//! about resending without ever needing to be exact.
//!
//! # What a receipt may settle
//!
//! Anyone who can publish on the box's receipts topic (a buggy tool, another
//! site's account on a broker without topic ACLs, a misconfigured bridge) can
//! put anything there, and the outbox id is in every envelope. So a receipt
//! is a *proposal*: [`Outbox::settle_batch`] deletes only the seqs it names
//! that are in flight in the batch it answers (claimed and published by this
//! process under that `batch_id`). Everything else is ignored, acknowledged
//! to the broker (a persistent session redelivers what it is not acked), one
//! log line per message, counted in `edge_receipts_ignored_total{reason}`:
//!
//! | reason | what arrived |
//! |---|---|
//! | `retained` | a retained message (the ingestor never retains a receipt: an attack or a misconfiguration, replayed to every new subscription) |
//! | `wrong_topic` | a message on another topic (a subscription the persistent session kept from another configuration) |
//! | `oversized` | above [`MAX_RECEIPT_BYTES`], not parsed |
//! | `unreadable` | not a version-1 receipt |
//! | `other_site` | a receipt of another site |
//! | `other_outbox` | a receipt of another outbox (this file re-created, a stale receipt) |
//! | `unknown_batch` | a batch not in flight: forged, late (its batch timed out and was republished under a new id, whose receipt settles it), or of a previous process |
//! | `outside_batch` | a receipt naming seqs outside its batch (those are ignored; the batch's own are settled) |
//!
//! Messages are acknowledged in arrival order after they were handled, and
//! the MQTT client accepts far larger packets than any broker we configure
//! ([`runtime::mqtt::MAX_INCOMING_PACKET_BYTES`]), so no message can break
//! the connection and, redelivered, every reconnect after it.
//!
//! # Resending
//!
//! * a batch with no receipt within `receipt_timeout_ms` goes back to pending
//!   and is published again under a new batch id (same impression ids and
//!   seqs; the centre's unique key absorbs the duplicate and still answers);
//! * a ConnAck with `session_present = false` means the broker forgot us
//!   (restart without persistence, expiry): rumqttc silently dropped its queue,
//!   so every published-but-unconfirmed row goes back to pending, and the
//!   receipts subscription is made again (it is made on every ConnAck anyway);
//! * a process restart does the same (the outbox requeues at open).
//!
//! Two tasks: one only polls the rumqttc event loop (it must never block), the
//! other owns the publishing state and talks to the outbox. Receipts are acked
//! manually, in arrival order, after they were applied, so a crash between
//! the two makes the broker redeliver the receipt rather than lose it.

use chrono::{Datelike, Utc};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, Outgoing, Packet, Publish, QoS};
use schema::{Receipt, SeqRange, SiteStatus, Topics, PAYLOAD_VERSION};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::outbox::{Claimed, Outbox};
use crate::settings::Settings;

/// Bytes reserved for the envelope header when sizing a batch.
const ENVELOPE_OVERHEAD: usize = 512;

/// Largest message on the receipts topic that is parsed; larger ones are
/// ignored unread (`oversized`). The largest receipt an honest ingestor
/// sends is bounded by what it may publish at all, one MQTT packet of
/// [`schema::mqtt::MAX_PACKET_BYTES`]: a whole envelope refused seq by seq
/// names up to 5,000 seqs (about 200 KB), and per-impression refusals carry
/// their reasons, so a tighter bound could refuse a genuine receipt and
/// leave its rows republished forever.
pub const MAX_RECEIPT_BYTES: usize = schema::mqtt::MAX_PACKET_BYTES;

/// Why a message on the receipts subscription was ignored (the `reason`
/// label of `edge_receipts_ignored_total`; the module doc has the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    Retained,
    WrongTopic,
    Oversized,
    Unreadable,
    OtherSite,
    OtherOutbox,
    UnknownBatch,
    OutsideBatch,
}

impl Ignored {
    pub const fn as_str(self) -> &'static str {
        match self {
            Ignored::Retained => "retained",
            Ignored::WrongTopic => "wrong_topic",
            Ignored::Oversized => "oversized",
            Ignored::Unreadable => "unreadable",
            Ignored::OtherSite => "other_site",
            Ignored::OtherOutbox => "other_outbox",
            Ignored::UnknownBatch => "unknown_batch",
            Ignored::OutsideBatch => "outside_batch",
        }
    }
}

/// Broker-side state, shared with the HTTP stats endpoint.
#[derive(Debug, Default)]
pub struct BrokerHealth {
    connected: AtomicBool,
    /// The broker acknowledged the receipts subscription on the current
    /// connection (a receipt for anything published from now on reaches us).
    subscribed: AtomicBool,
    connects: AtomicU64,
    sessions_lost: AtomicU64,
    last_receipt_ms: AtomicI64,
    last_change_ms: AtomicI64,
    last_error: Mutex<Option<String>>,
    published_batches: AtomicU64,
    republished_batches: AtomicU64,
    receipts: AtomicU64,
    /// Messages ignored on the receipts subscription, by reason.
    ignored: Mutex<BTreeMap<&'static str, u64>>,
}

/// A snapshot of [`BrokerHealth`] for the stats endpoint.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSnapshot {
    pub connected: bool,
    pub url: String,
    pub connects: u64,
    pub sessions_lost: u64,
    pub since: Option<chrono::DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_receipt_at: Option<chrono::DateTime<Utc>>,
    pub published_batches: u64,
    pub republished_batches: u64,
    pub receipts: u64,
    /// Messages on the receipts subscription ignored since start, by
    /// reason (`edge_receipts_ignored_total{reason}` of this edge).
    pub receipts_ignored: BTreeMap<String, u64>,
}

impl BrokerHealth {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Connected, and the receipts subscription of this connection is
    /// acknowledged: a session ready to publish and be answered.
    pub fn ready(&self) -> bool {
        self.connected() && self.subscribed.load(Ordering::Acquire)
    }

    pub fn snapshot(&self, url: String) -> BrokerSnapshot {
        let ms = |a: &AtomicI64| {
            let v = a.load(Ordering::Acquire);
            (v > 0)
                .then(|| chrono::TimeZone::timestamp_millis_opt(&Utc, v).single())
                .flatten()
        };
        BrokerSnapshot {
            connected: self.connected(),
            url,
            connects: self.connects.load(Ordering::Acquire),
            sessions_lost: self.sessions_lost.load(Ordering::Acquire),
            since: ms(&self.last_change_ms),
            last_error: self.last_error.lock().ok().and_then(|g| g.clone()),
            last_receipt_at: ms(&self.last_receipt_ms),
            published_batches: self.published_batches.load(Ordering::Acquire),
            republished_batches: self.republished_batches.load(Ordering::Acquire),
            receipts: self.receipts.load(Ordering::Acquire),
            receipts_ignored: self
                .ignored
                .lock()
                .map(|m| m.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
                .unwrap_or_default(),
        }
    }

    /// How many messages were ignored for `reason` since start.
    pub fn ignored(&self, reason: Ignored) -> u64 {
        self.ignored
            .lock()
            .map(|m| m.get(reason.as_str()).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn count_ignored(&self, reason: Ignored) {
        metrics::counter!("edge_receipts_ignored_total", "reason" => reason.as_str()).increment(1);
        if let Ok(mut m) = self.ignored.lock() {
            *m.entry(reason.as_str()).or_default() += 1;
        }
    }

    fn set_connected(&self, c: bool) {
        if !c {
            self.subscribed.store(false, Ordering::Release);
        }
        self.connected.store(c, Ordering::Release);
        self.last_change_ms
            .store(Utc::now().timestamp_millis(), Ordering::Release);
    }
}

/// Whether the system clock can be trusted for `played_at`: a Pi has no RTC
/// and boots in the past until NTP syncs. Honest and simple: the year must be
/// at least 2020, and when systemd-timesyncd is in use
/// (`/run/systemd/timesync` exists) its `synchronized` flag file must exist.
pub fn clock_synced() -> bool {
    let year_ok = Utc::now().year() >= 2020;
    let dir = std::path::Path::new("/run/systemd/timesync");
    if dir.is_dir() {
        year_ok && dir.join("synchronized").exists()
    } else {
        year_ok
    }
}

enum IoEvent {
    ConnAck { session_present: bool },
    Message(Publish),
    Disconnected,
}

struct InFlight {
    published: Instant,
    count: usize,
}

/// The publishing half of an edge.
pub struct Publisher {
    settings: Settings,
    outbox: Outbox,
    health: Arc<BrokerHealth>,
    topics: Topics,
    gate: Option<watch::Receiver<bool>>,
}

/// Holds a box's publishing back while its session is established
/// ([`crate::App::hold_publishing`]); [`PublishGate::open`] lets it go.
///
/// Why: the fleet simulator's benchmark times the flow of impressions
/// through sessions that are already up, as a fleet's are (a box connects
/// once per boot, then publishes for days). Without a gate a box publishes
/// as soon as it is connected, so a thousand connects would be timed with
/// the impressions. A box in production has no gate.
#[derive(Debug)]
pub struct PublishGate(watch::Sender<bool>);

impl PublishGate {
    /// A closed gate and the receiver the publisher watches.
    pub(crate) fn closed() -> (Self, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (Self(tx), rx)
    }

    /// Lets the box publish (idempotent).
    pub fn open(&self) {
        self.0.send_replace(true);
    }
}

impl Publisher {
    /// `gate`: when given, nothing is published before it is opened
    /// ([`PublishGate`]); the session is established meanwhile.
    pub fn new(
        settings: Settings,
        outbox: Outbox,
        health: Arc<BrokerHealth>,
        gate: Option<watch::Receiver<bool>>,
    ) -> anyhow::Result<Self> {
        let topics = Topics::new(settings.topic_prefix.clone()).map_err(anyhow::Error::msg)?;
        Ok(Self {
            settings,
            outbox,
            health,
            topics,
            gate,
        })
    }

    fn status(&self, online: bool) -> SiteStatus {
        let c = self.outbox.counts();
        SiteStatus {
            v: PAYLOAD_VERSION,
            site_id: self.settings.site_id.clone(),
            online,
            queue_depth: c.unconfirmed,
            unsent: c.unsent,
            oldest_unconfirmed_age_s: None,
            version: crate::VERSION.to_owned(),
            clock_synced: clock_synced(),
            at: Utc::now(),
        }
    }

    async fn status_with_age(&self, online: bool) -> SiteStatus {
        let mut s = self.status(online);
        if s.queue_depth > 0 {
            if let Ok(st) = self.outbox.stats().await {
                s.oldest_unconfirmed_age_s = st
                    .oldest_unconfirmed_enqueued_at
                    .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0);
            }
        }
        s
    }

    /// Runs until `shutdown`; then publishes an offline status and disconnects.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let s = &self.settings;
        let mut copts = runtime::mqtt::ClientOptions::new(s.client_id());
        copts.clean_session = false;
        copts.manual_acks = true;
        copts.keep_alive = Duration::from_secs(s.keep_alive_s.max(5));
        copts.inflight = (s.max_inflight_batches as u16).saturating_add(16).max(20);
        copts.request_channel_capacity = s.max_inflight_batches.saturating_mul(2).max(64);
        let status_topic = self.topics.status(&s.site_id);
        let (client, eventloop) = runtime::mqtt::client(&s.mqtt_url, &copts, |opts| {
            opts.set_last_will(LastWill::new(
                status_topic.clone(),
                SiteStatus::offline(&s.site_id, crate::VERSION, Utc::now()).encode(),
                QoS::AtLeastOnce,
                true,
            ));
        })?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let io_stop = CancellationToken::new();
        let io = tokio::spawn(io_loop(
            eventloop,
            tx,
            io_stop.clone(),
            Duration::from_millis(s.reconnect_min_ms.max(10)),
            Duration::from_millis(s.reconnect_max_ms.max(s.reconnect_min_ms.max(10))),
            self.health.clone(),
            s.mqtt_url.to_string(),
        ));

        let impressions_topic = self.topics.impressions(&s.site_id);
        let receipts_topic = self.topics.receipts(&s.site_id);
        let delay = s.batch_delay();
        let timeout = s.receipt_timeout();
        let mut inflight: HashMap<Uuid, InFlight> = HashMap::new();
        let mut connected = false;
        // When a partial batch is due: `batch_delay` after the first unsent
        // row was seen. Rows found at start (stored before this process, or
        // requeued at open) and rows requeued later (session lost, receipt
        // timeout) have waited long enough already: they are due at once.
        let mut due_at: Option<Instant> = (self.outbox.counts().unsent > 0).then(Instant::now);
        let mut stalled = false;
        let mut status_tick = tokio::time::interval(Duration::from_millis(s.status_interval_ms.max(1000)));
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check_tick =
            tokio::time::interval((timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)));
        check_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Rows another process appended (`neopro-edge import` while the
        // service runs) are found within two ticks ([`Outbox::refresh`]),
        // so within the batch delay, and published at once.
        let mut refresh_tick = tokio::time::interval((delay / 2).max(Duration::from_millis(50)));
        refresh_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gate = self.gate.clone();

        loop {
            let released = gate.as_ref().is_none_or(|g| *g.borrow());
            // Publish what is due, within the in-flight bound.
            let unsent = self.outbox.counts().unsent;
            if unsent == 0 {
                due_at = None;
            } else if due_at.is_none() {
                due_at = Some(Instant::now() + delay);
            }
            if connected && released && !stalled && inflight.len() < s.max_inflight_batches && unsent > 0 {
                let full = unsent >= s.batch_max_impressions as u64;
                if full || due_at.is_some_and(|d| Instant::now() >= d) {
                    match self.publish_batch(&client, &impressions_topic).await {
                        Ok(Some((id, n))) => {
                            inflight.insert(
                                id,
                                InFlight {
                                    published: Instant::now(),
                                    count: n,
                                },
                            );
                        }
                        Ok(None) => stalled = true,
                        Err(e) => {
                            tracing::warn!(error = %e, "publishing a batch failed");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    continue;
                }
            }
            let wake = match due_at {
                _ if stalled => Instant::now() + Duration::from_secs(1),
                Some(d) if connected && released && inflight.len() < s.max_inflight_batches => d,
                _ => Instant::now() + Duration::from_secs(3600),
            };
            stalled = false;
            tokio::select! {
                () = shutdown.cancelled() => break,
                ev = rx.recv() => match ev {
                    None => break,
                    Some(IoEvent::ConnAck { session_present }) => {
                        connected = true;
                        if let Err(e) = client.subscribe(receipts_topic.clone(), QoS::AtLeastOnce).await {
                            tracing::warn!(error = %e, "subscribing to receipts failed");
                        }
                        if session_present {
                            let now = Instant::now();
                            for b in inflight.values_mut() {
                                b.published = now;
                            }
                        } else {
                            inflight.clear();
                            match self.outbox.requeue(None).await {
                                Ok(n) if n > 0 => {
                                    due_at = Some(Instant::now());
                                    self.health.sessions_lost.fetch_add(1, Ordering::AcqRel);
                                    tracing::warn!(requeued = n, "broker has no session for us: unconfirmed impressions will be published again");
                                }
                                Ok(_) => {}
                                Err(e) => tracing::error!(error = %e, "requeue after session loss failed"),
                            }
                        }
                        let st = self.status_with_age(true).await;
                        let _ = client.publish(status_topic.clone(), QoS::AtLeastOnce, true, st.encode()).await;
                    }
                    Some(IoEvent::Disconnected) => connected = false,
                    Some(IoEvent::Message(p)) => {
                        self.on_message(&p, &receipts_topic, &mut inflight).await;
                        // Whatever it was: acknowledged, or the persistent
                        // session would deliver it again at every reconnect.
                        if let Err(e) = client.ack(&p).await {
                            tracing::debug!(error = %e, "ack failed");
                        }
                    }
                },
                () = self.outbox.pending_notified() => {}
                () = tokio::time::sleep_until(wake) => {}
                _ = refresh_tick.tick() => match self.outbox.refresh().await {
                    Ok(true) if self.outbox.counts().unsent > 0 => due_at = Some(Instant::now()),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "looking for other writers' commits failed"),
                },
                r = async { gate.as_mut().expect("guarded").changed().await }, if !released => {
                    // Opened (or the gate was dropped, which opens it too).
                    if r.is_err() {
                        gate = None;
                    }
                }
                _ = status_tick.tick() => {
                    if connected {
                        let st = self.status_with_age(true).await;
                        let _ = client.publish(status_topic.clone(), QoS::AtLeastOnce, true, st.encode()).await;
                    }
                }
                _ = check_tick.tick() => {
                    if connected {
                        let now = Instant::now();
                        let expired: Vec<Uuid> = inflight
                            .iter()
                            .filter(|(_, b)| now.duration_since(b.published) >= timeout)
                            .map(|(id, _)| *id)
                            .collect();
                        for id in expired {
                            let b = inflight.remove(&id);
                            match self.outbox.requeue(Some(id)).await {
                                Ok(n) => {
                                    if n > 0 {
                                        due_at = Some(Instant::now());
                                        self.health.republished_batches.fetch_add(1, Ordering::AcqRel);
                                        metrics::counter!("edge_batches_receipt_timeout_total").increment(1);
                                        tracing::info!(batch_id = %id, impressions = n, of = b.map(|b| b.count).unwrap_or(0), "no receipt in time: republishing");
                                    }
                                }
                                Err(e) => tracing::error!(error = %e, "requeue failed"),
                            }
                        }
                    }
                }
            }
        }

        // Graceful stop: tell the world we are offline (the will only fires on
        // an unclean disconnect), then disconnect.
        if connected {
            let st = self.status(false);
            let _ = client.publish(status_topic, QoS::AtLeastOnce, true, st.encode()).await;
            let _ = client.disconnect().await;
        }
        if tokio::time::timeout(Duration::from_secs(3), async {
            while let Some(ev) = rx.recv().await {
                if matches!(ev, IoEvent::Disconnected) {
                    break;
                }
            }
        })
        .await
        .is_err()
        {
            tracing::debug!("MQTT disconnect did not complete in 3 s");
        }
        io_stop.cancel();
        let _ = io.await;
        self.health.set_connected(false);
        Ok(())
    }

    async fn publish_batch(&self, client: &AsyncClient, topic: &str) -> anyhow::Result<Option<(Uuid, usize)>> {
        let s = &self.settings;
        let batch_id = Uuid::now_v7();
        let max_bytes = s.batch_max_bytes.saturating_sub(ENVELOPE_OVERHEAD).max(1024);
        let claimed = self.outbox.claim(s.batch_max_impressions, max_bytes, batch_id).await?;
        if claimed.is_empty() {
            return Ok(None);
        }
        let payload = encode_envelope(&s.site_id, self.outbox.outbox_id(), batch_id, &claimed);
        let n = claimed.len();
        if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, payload).await {
            self.outbox.requeue(Some(batch_id)).await?;
            anyhow::bail!("MQTT client closed: {e}");
        }
        self.health.published_batches.fetch_add(1, Ordering::AcqRel);
        metrics::counter!("edge_batches_published_total").increment(1);
        metrics::counter!("edge_impressions_published_total").increment(n as u64);
        tracing::debug!(%batch_id, impressions = n, "batch published");
        Ok(Some((batch_id, n)))
    }

    /// Handles one message of the receipts subscription (module doc, "What
    /// a receipt may settle"); the caller acknowledges it afterwards.
    async fn on_message(&self, p: &Publish, receipts_topic: &str, inflight: &mut HashMap<Uuid, InFlight>) {
        let ignored = if p.retain {
            Some(Ignored::Retained)
        } else if p.topic != receipts_topic {
            Some(Ignored::WrongTopic)
        } else if p.payload.len() > MAX_RECEIPT_BYTES {
            Some(Ignored::Oversized)
        } else {
            None
        };
        if let Some(reason) = ignored {
            tracing::warn!(topic = %p.topic, bytes = p.payload.len(), retained = p.retain, reason = reason.as_str(), "message on the receipts subscription ignored");
            self.health.count_ignored(reason);
            return;
        }
        self.apply_receipt(&p.payload, inflight).await;
    }

    async fn apply_receipt(&self, payload: &[u8], inflight: &mut HashMap<Uuid, InFlight>) {
        let ignore = |reason: Ignored, detail: &dyn std::fmt::Display| {
            tracing::warn!(
                reason = reason.as_str(),
                bytes = payload.len(),
                "receipt ignored: {detail}"
            );
            self.health.count_ignored(reason);
        };
        let r = match Receipt::decode(payload) {
            Ok(r) => r,
            Err(e) => return ignore(Ignored::Unreadable, &e),
        };
        if r.site_id != self.settings.site_id {
            return ignore(
                Ignored::OtherSite,
                &format_args!("site '{}', batch {}", r.site_id, r.batch_id),
            );
        }
        if r.outbox_id != self.outbox.outbox_id() {
            return ignore(
                Ignored::OtherOutbox,
                &format_args!("outbox {}, batch {}", r.outbox_id, r.batch_id),
            );
        }
        // What the receipt proposes to settle; the outbox keeps only what
        // lies in the batch's own runs.
        let mut proposed = r.committed.clone();
        proposed.extend(
            r.rejected
                .iter()
                .filter_map(|rej| rej.seq)
                .map(|seq| SeqRange { first: seq, last: seq }),
        );
        proposed.extend(r.rejected_range);
        let settled = match self.outbox.settle_batch(r.batch_id, proposed).await {
            Ok(s) => s,
            // The batch stays in flight: its timeout republishes it and a new receipt follows.
            Err(e) => return tracing::error!(error = %e, batch_id = %r.batch_id, "applying a receipt failed"),
        };
        if !settled.known_batch {
            return ignore(
                Ignored::UnknownBatch,
                &format_args!(
                    "batch {} is not in flight (late, forged, or of a previous process)",
                    r.batch_id
                ),
            );
        }
        if settled.outside {
            ignore(
                Ignored::OutsideBatch,
                &format_args!(
                    "batch {} named seqs outside its batch (ignored; {} of its own settled)",
                    r.batch_id, settled.settled
                ),
            );
        }
        if settled.remaining == 0 {
            inflight.remove(&r.batch_id);
        } else {
            tracing::warn!(batch_id = %r.batch_id, settled = settled.settled, remaining = settled.remaining, "a receipt settled part of its batch: the rest is published again after the receipt timeout");
        }
        if !r.rejected.is_empty() || r.rejected_range.is_some() {
            let first = r.rejected.first();
            tracing::warn!(
                batch_id = %r.batch_id, refused = r.rejected.len(), range = ?r.rejected_range,
                first_seq = ?first.and_then(|x| x.seq), first_reason = first.map(|x| x.reason.as_str()),
                "the centre refused impressions (kept in its dead-letter table)"
            );
        }
        self.health.receipts.fetch_add(1, Ordering::AcqRel);
        self.health
            .last_receipt_ms
            .store(Utc::now().timestamp_millis(), Ordering::Release);
        metrics::counter!("edge_receipts_total").increment(1);
        metrics::counter!("edge_impressions_confirmed_total").increment(settled.settled);
        tracing::debug!(batch_id = %r.batch_id, confirmed = settled.settled, inserted = r.inserted, duplicates = r.duplicates, "receipt applied");
    }
}

/// The envelope of a claim: its bodies spliced as they are stored (the
/// outbox keeps each impression as the exact JSON an envelope carries) by
/// `schema`, which owns the wire format.
pub fn encode_envelope(site_id: &str, outbox_id: Uuid, batch_id: Uuid, claimed: &Claimed) -> Vec<u8> {
    let seqs = claimed.seqs();
    let first = seqs.iter().copied().min().unwrap_or(0);
    let last = seqs.iter().copied().max().unwrap_or(0);
    schema::encode_envelope_from_bodies(
        site_id,
        outbox_id,
        batch_id,
        SeqRange { first, last },
        claimed.joined_bodies(),
        Utc::now(),
    )
}

async fn io_loop(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<IoEvent>,
    stop: CancellationToken,
    min: Duration,
    max: Duration,
    health: Arc<BrokerHealth>,
    url: String,
) {
    let mut backoff = runtime::backoff(min, max);
    let mut was_connected = false;
    loop {
        let ev = tokio::select! {
            () = stop.cancelled() => return,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(c))) => {
                backoff = runtime::backoff(min, max);
                health.set_connected(true);
                health.connects.fetch_add(1, Ordering::AcqRel);
                metrics::gauge!("edge_broker_connected").set(1.0);
                tracing::info!(broker = %url, session_present = c.session_present, "connected to the broker");
                was_connected = true;
                let _ = tx.send(IoEvent::ConnAck {
                    session_present: c.session_present,
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = tx.send(IoEvent::Message(p));
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                // The receipts topic is this client's only subscription.
                health.subscribed.store(true, Ordering::Release);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                health.set_connected(false);
                let _ = tx.send(IoEvent::Disconnected);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let msg = e.to_string();
                if was_connected {
                    tracing::warn!(broker = %url, error = %msg, "broker connection lost");
                } else {
                    tracing::debug!(broker = %url, error = %msg, "broker connection failed");
                }
                was_connected = false;
                health.set_connected(false);
                metrics::gauge!("edge_broker_connected").set(0.0);
                if let Ok(mut g) = health.last_error.lock() {
                    *g = Some(msg.clone());
                }
                let _ = tx.send(IoEvent::Disconnected);
                let wait = backoff.next().unwrap_or(max);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::tests::imp;
    use crate::outbox::Claimed;

    #[test]
    fn spliced_envelope_decodes_as_the_schema_envelope() {
        let mut claimed = Claimed::default();
        for seq in 1..=3 {
            let imp = schema::Impression {
                seq: Some(seq),
                ..imp("s1", seq)
            };
            claimed.push(seq, serde_json::to_string(&imp).unwrap().as_bytes());
        }
        let (outbox_id, batch_id) = (Uuid::now_v7(), Uuid::now_v7());
        let payload = encode_envelope("s1", outbox_id, batch_id, &claimed);
        let d = schema::decode_envelope("s1", &payload, Utc::now()).unwrap();
        assert_eq!((d.outbox_id, d.batch_id), (outbox_id, batch_id));
        assert_eq!(d.seq, SeqRange { first: 1, last: 3 });
        assert_eq!(d.valid.len(), 3);
        assert!(d.rejected.is_empty());
        assert_eq!(d.valid[2].seq, Some(3));
    }
}
