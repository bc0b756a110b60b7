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
//!
//! # The loop
//!
//! When to publish and what to resend is decided by a state machine with
//! no I/O (`machine.rs`: its states are named in `machine::State`, its
//! transitions tested without a broker). [`Publisher::run`] is the thin
//! loop around it: it turns what happens into events, executes the actions
//! they return (subscribe, requeue, publish the status, disconnect), and
//! publishes a batch when the machine says one is due. `health.rs` holds
//! the counters the stats endpoint shows, `io.rs` the event loop task.

mod health;
mod io;
mod machine;

pub use health::{clock_synced, BrokerHealth, BrokerSnapshot, Ignored};

use chrono::Utc;
use rumqttc::{AsyncClient, LastWill, Publish, QoS};
use schema::{Receipt, SeqRange, SiteStatus, Topics, PAYLOAD_VERSION};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::outbox::{Claimed, Outbox};
use crate::settings::Settings;
use io::{io_loop, IoEvent};
use machine::{Action, Event, Limits, Machine, Next};

/// The shortest interval between two looks for another process's commits
/// to the outbox (`Outbox::refresh`).
pub const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(1);
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

/// The publishing half of an edge.
pub struct Publisher {
    settings: Settings,
    outbox: Outbox,
    health: Arc<BrokerHealth>,
    topics: Topics,
    gate: Option<watch::Receiver<bool>>,
}

/// The topics a session publishes and subscribes to besides the impressions.
struct SessionTopics {
    receipts: String,
    status: String,
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
        let topics = SessionTopics {
            receipts: self.topics.receipts(&s.site_id),
            status: status_topic,
        };
        let delay = s.batch_delay();
        let timeout = s.receipt_timeout();
        let mut gate = self.gate.clone();
        let held = gate.as_ref().is_some_and(|g| !*g.borrow());
        let limits = Limits {
            batch_delay: delay,
            receipt_timeout: timeout,
            max_inflight_batches: s.max_inflight_batches,
            batch_max_impressions: s.batch_max_impressions,
        };
        let mut machine = Machine::new(limits, held, self.outbox.counts().unsent, Instant::now());
        let mut status_tick = tokio::time::interval(Duration::from_millis(s.status_interval_ms.max(1000)));
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check_tick =
            tokio::time::interval((timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)));
        check_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Rows another process appended (`neopro-edge import` while the
        // service runs) are found within two ticks ([`Outbox::refresh`]) and
        // published at once: within the batch delay at the default (2 s).
        // Not more often than once a second: an idle box's tick wakes its
        // outbox thread, and a thousand boxes in one process (the fleet
        // bench) polling every 100 ms cost their host a core-µs per
        // impression delivered.
        let mut refresh_tick = tokio::time::interval((delay / 2).max(REFRESH_MIN_INTERVAL));
        refresh_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let wake = match machine.next(self.outbox.counts().unsent, Instant::now()) {
                Next::Publish => {
                    let published = match self.publish_batch(&client, &impressions_topic).await {
                        Ok(Some((batch_id, count))) => Event::Published { batch_id, count },
                        Ok(None) => Event::ClaimedNothing,
                        Err(e) => {
                            tracing::warn!(error = %e, "publishing a batch failed");
                            Event::PublishFailed
                        }
                    };
                    self.step(&mut machine, published, &client, &topics).await;
                    continue;
                }
                Next::Sleep(wake) => wake,
            };
            let event = tokio::select! {
                () = shutdown.cancelled() => Event::Shutdown,
                ev = rx.recv() => match ev {
                    None => Event::Shutdown,
                    Some(IoEvent::ConnAck { session_present }) => Event::ConnAck { session_present },
                    Some(IoEvent::Disconnected) => Event::Disconnected,
                    Some(IoEvent::Message(p)) => {
                        let settled = self.on_message(&p, &topics.receipts).await;
                        // Whatever it was: acknowledged, or the persistent
                        // session would deliver it again at every reconnect.
                        if let Err(e) = client.ack(&p).await {
                            tracing::debug!(error = %e, "ack failed");
                        }
                        match settled {
                            Some(batch_id) => Event::BatchSettled(batch_id),
                            None => continue,
                        }
                    }
                },
                () = self.outbox.pending_notified() => continue,
                () = tokio::time::sleep_until(wake) => continue,
                _ = refresh_tick.tick() => match self.outbox.refresh().await {
                    Ok(found) => Event::Refreshed { found, unsent: self.outbox.counts().unsent },
                    Err(e) => {
                        tracing::warn!(error = %e, "looking for other writers' commits failed");
                        continue;
                    }
                },
                r = async { gate.as_mut().expect("guarded").changed().await }, if gate.is_some() && machine.held() => {
                    match r {
                        Ok(()) => Event::Gate { open: *gate.as_ref().expect("guarded").borrow() },
                        // Dropped: that opens it too.
                        Err(_) => {
                            gate = None;
                            Event::Gate { open: true }
                        }
                    }
                }
                _ = status_tick.tick() => Event::StatusTick,
                _ = check_tick.tick() => Event::CheckTick,
            };
            let stop = event == Event::Shutdown;
            self.step(&mut machine, event, &client, &topics).await;
            if stop {
                break;
            }
        }

        // Graceful stop: the machine published the offline status and
        // disconnected if it was connected; wait for the event loop to say so.
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

    /// Feeds `event` to the machine and executes the actions it returns,
    /// feeding back what they report, until nothing is left.
    async fn step(&self, machine: &mut Machine, event: Event, client: &AsyncClient, topics: &SessionTopics) {
        let mut events = VecDeque::from([event]);
        while let Some(event) = events.pop_front() {
            for action in machine.on(event, Instant::now()) {
                events.extend(self.execute(action, client, topics).await);
            }
        }
    }

    /// Executes one action of the machine; returns what it needs to know
    /// of the outcome.
    async fn execute(&self, action: Action, client: &AsyncClient, topics: &SessionTopics) -> Option<Event> {
        match action {
            Action::Subscribe => {
                if let Err(e) = client.subscribe(topics.receipts.clone(), QoS::AtLeastOnce).await {
                    tracing::warn!(error = %e, "subscribing to receipts failed");
                }
                None
            }
            Action::RequeueAll => match self.outbox.requeue(None).await {
                Ok(n) if n > 0 => {
                    self.health.sessions_lost.fetch_add(1, Ordering::AcqRel);
                    tracing::warn!(
                        requeued = n,
                        "broker has no session for us: unconfirmed impressions will be published again"
                    );
                    Some(Event::Requeued { rows: n })
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(error = %e, "requeue after session loss failed");
                    None
                }
            },
            Action::RequeueBatch { batch_id, count } => match self.outbox.requeue(Some(batch_id)).await {
                Ok(n) if n > 0 => {
                    self.health.republished_batches.fetch_add(1, Ordering::AcqRel);
                    metrics::counter!("edge_batches_receipt_timeout_total").increment(1);
                    tracing::info!(%batch_id, impressions = n, of = count, "no receipt in time: republishing");
                    Some(Event::Requeued { rows: n })
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(error = %e, "requeue failed");
                    None
                }
            },
            Action::PublishStatus { online } => {
                let st = if online {
                    self.status_with_age(true).await
                } else {
                    self.status(false)
                };
                let _ = client
                    .publish(topics.status.clone(), QoS::AtLeastOnce, true, st.encode())
                    .await;
                None
            }
            Action::Disconnect => {
                let _ = client.disconnect().await;
                None
            }
            Action::Pause(d) => {
                tokio::time::sleep(d).await;
                None
            }
        }
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
    /// Returns the batch the receipt settled whole, if it did.
    async fn on_message(&self, p: &Publish, receipts_topic: &str) -> Option<Uuid> {
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
            return None;
        }
        self.apply_receipt(&p.payload).await
    }

    /// Applies one receipt; returns its batch when it settled the whole
    /// batch (no longer in flight).
    async fn apply_receipt(&self, payload: &[u8]) -> Option<Uuid> {
        let ignore = |reason: Ignored, detail: &dyn std::fmt::Display| -> Option<Uuid> {
            tracing::warn!(
                reason = reason.as_str(),
                bytes = payload.len(),
                "receipt ignored: {detail}"
            );
            self.health.count_ignored(reason);
            None
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
            Err(e) => {
                tracing::error!(error = %e, batch_id = %r.batch_id, "applying a receipt failed");
                return None;
            }
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
            let _ = ignore(
                Ignored::OutsideBatch,
                &format_args!(
                    "batch {} named seqs outside its batch (ignored; {} of its own settled)",
                    r.batch_id, settled.settled
                ),
            );
        }
        let settled_whole = (settled.remaining == 0).then_some(r.batch_id);
        if settled_whole.is_none() {
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
        settled_whole
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
