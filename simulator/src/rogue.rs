//! A rogue site: a box account, valid for its own site, that attacks the
//! others through the broker. The attack tests (`tests/attacks.rs`) and the
//! `rogue_site` soak scenario drive it; both then prove, play by play, that
//! the victims lost nothing and that the attacker got nothing.
//!
//! Why a real MQTT client and not a mocked broker: the threat is a
//! participant with a valid account on the real broker (a leaked box
//! password, a buggy tool), so every attack goes through the broker's
//! authentication and topic ACL exactly as it would in the field, on either
//! broker (our embedded rumqttd or Mosquitto with the generated ACL).
//!
//! What it tries (each publish QoS 1, waited for its PUBACK, counted in
//! [`Rogue::forged_published`]):
//! * **reads**: subscriptions to `#`, `{prefix}/#`, every site's topics by
//!   wildcard and each victim's by name; whatever arrives except its own
//!   receipts is counted in [`Rogue::messages_read`];
//! * **forged receipts** on a victim's receipts topic naming the victim's
//!   outbox id (assume it leaked) and every seq (`i64::MIN..=i64::MAX`,
//!   committed and refused whole), plain and retained;
//! * **foreign envelopes** on a victim's impressions topic: a version-2
//!   envelope with the victim's outbox id and an all-seqs range (which the
//!   ingestor would refuse whole, receipting that range), and plays forged
//!   in the victim's name (their ids kept in [`Rogue::forged_ids`]);
//! * **oversized** messages (above the 1 MiB packet limit of the clients)
//!   on a victim's receipts topic;
//! * **retained spam** on its own impressions and receipts topics and on
//!   the victims' topics, which a fresh subscriber must never receive
//!   ([`retained_seen`]).
//!
//! [`Rogue::sync`] publishes one genuine play of its own and waits for its
//! receipt: the ingestor publishes receipts in order, so anything leaked to
//! the attacker before that point has arrived by then.

use anyhow::Context;
use chrono::Utc;
use rumqttc::{AsyncClient, Event, Incoming, QoS, SubscribeReasonCode};
use runtime::mqtt::{ClientOptions, MqttUrl};
use schema::mqtt::{Receipt, SeqRange, TopicKind, Topics};
use schema::{BatchEnvelope, Impression};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Bytes of the oversized message: above the 1 MiB packet limit our clients
/// set, below the brokers' (so the broker takes it and must not relay it).
pub const OVERSIZED_BYTES: usize = 1_060_000;
/// Marks every payload the attacker makes, so a leak is recognised.
pub const MARK: &str = "neopro-rogue";
/// How long one publish or subscription may wait for its acknowledgement.
const ACK_WAIT: Duration = Duration::from_secs(15);
/// Delivered messages kept for the report (all are counted).
const KEEP: usize = 64;

/// One message the attacker received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub topic: String,
    pub retain: bool,
    pub bytes: usize,
}

#[derive(Default)]
struct State {
    /// Everything received, own receipts included (first [`KEEP`]).
    seen: Vec<Seen>,
    /// Received on another topic than its own receipts.
    read: u64,
    /// Batch ids of the receipts received on its own receipts topic.
    own_receipts: Vec<Uuid>,
    subacks: Vec<Vec<SubscribeReasonCode>>,
    pubacks: u64,
    disconnects: u64,
}

/// The attacker's connection and what it got.
pub struct Rogue {
    site: String,
    topics: Topics,
    client: AsyncClient,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
    outbox_id: Uuid,
    next_seq: i64,
    published: u64,
    forged: u64,
    forged_ids: Vec<Uuid>,
}

impl std::fmt::Debug for Rogue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rogue")
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Rogue {
    /// Connects as site `site` (`url` carries its account) under `prefix`,
    /// subscribed to its own receipts.
    pub async fn connect(url: &MqttUrl, site: &str, prefix: &str) -> anyhow::Result<Self> {
        let topics = Topics::new(prefix).map_err(anyhow::Error::msg)?;
        let mut c = ClientOptions::new(format!("{site}:rogue"));
        c.clean_session = true;
        let (client, mut el) = runtime::mqtt::client(url, &c, |o| {
            // Lets it send the oversized message (the broker's limit, not
            // its own, decides).
            o.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
        })?;
        let state = Arc::new(Mutex::new(State::default()));
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
        let st = Arc::clone(&state);
        let own_receipts = topics.receipts(site);
        let task = tokio::spawn(async move {
            let mut connected = Some(connected_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        if let Some(tx) = connected.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let mut s = st.lock().expect("rogue state");
                        if p.topic == own_receipts {
                            if let Ok(r) = Receipt::decode(&p.payload) {
                                s.own_receipts.push(r.batch_id);
                            }
                        } else {
                            s.read += 1;
                        }
                        if s.seen.len() < KEEP {
                            s.seen.push(Seen {
                                topic: p.topic.clone(),
                                retain: p.retain,
                                bytes: p.payload.len(),
                            });
                        }
                    }
                    Ok(Event::Incoming(Incoming::SubAck(a))) => {
                        st.lock().expect("rogue state").subacks.push(a.return_codes);
                    }
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        st.lock().expect("rogue state").pubacks += 1;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(tx) = connected.take() {
                            let _ = tx.send(Err(anyhow::anyhow!("rogue connection: {e}")));
                            return;
                        }
                        st.lock().expect("rogue state").disconnects += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        tokio::time::timeout(ACK_WAIT, connected_rx)
            .await
            .context("the rogue's CONNACK")?
            .context("rogue connection task")??;
        let mut me = Self {
            site: site.to_owned(),
            topics,
            client,
            state,
            task,
            outbox_id: Uuid::now_v7(),
            next_seq: 1,
            published: 0,
            forged: 0,
            forged_ids: Vec::new(),
        };
        let own = me.topics.receipts(site);
        let code = me.subscribe(&own).await?;
        anyhow::ensure!(
            matches!(code, SubscribeReasonCode::Success(_)),
            "{site} may not subscribe to its own receipts ({code:?})"
        );
        Ok(me)
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    /// Subscribes `filter` (QoS 1) and returns the broker's answer.
    pub async fn subscribe(&mut self, filter: &str) -> anyhow::Result<SubscribeReasonCode> {
        let before = self.state.lock().expect("rogue state").subacks.len();
        self.client.subscribe(filter, QoS::AtLeastOnce).await?;
        let st = Arc::clone(&self.state);
        let got = crate::fleet::wait_until(ACK_WAIT, || {
            let st = Arc::clone(&st);
            async move { Ok(st.lock().expect("rogue state").subacks.len() > before) }
        })
        .await?;
        anyhow::ensure!(got, "no SUBACK for {filter} within {ACK_WAIT:?}");
        let s = self.state.lock().expect("rogue state");
        Ok(s.subacks[before]
            .first()
            .copied()
            .unwrap_or(SubscribeReasonCode::Failure))
    }

    /// Subscribes to everything it could read of `victims`: `#`, the
    /// prefix, every site by wildcard, each victim by name. Returns each
    /// filter with the broker's answer (a broker that grants a filter may
    /// still deliver nothing through it: Mosquitto checks reads per message).
    pub async fn read_everything(&mut self, victims: &[String]) -> anyhow::Result<Vec<(String, SubscribeReasonCode)>> {
        let p = self.topics.prefix().to_owned();
        let mut filters = vec![
            "#".to_owned(),
            format!("{p}/#"),
            format!("{p}/sites/#"),
            self.topics.all_sites(TopicKind::Impressions),
            self.topics.all_sites(TopicKind::Receipts),
            self.topics.all_sites(TopicKind::Status),
        ];
        for v in victims {
            filters.push(self.topics.receipts(v));
            filters.push(self.topics.impressions(v));
            filters.push(self.topics.status(v));
            filters.push(format!("{p}/sites/{v}/#"));
        }
        let mut out = Vec::with_capacity(filters.len());
        for f in filters {
            let code = self.subscribe(&f).await?;
            out.push((f, code));
        }
        Ok(out)
    }

    /// Publishes QoS 1 and waits for the PUBACK (a broker that refuses a
    /// publish under MQTT 3.1.1 still acknowledges it, and drops it).
    async fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> anyhow::Result<()> {
        self.client.publish(topic, QoS::AtLeastOnce, retain, payload).await?;
        self.published += 1;
        let want = self.published;
        let st = Arc::clone(&self.state);
        let acked = crate::fleet::wait_until(ACK_WAIT, || {
            let st = Arc::clone(&st);
            async move { Ok(st.lock().expect("rogue state").pubacks >= want) }
        })
        .await?;
        anyhow::ensure!(acked, "no PUBACK for a publish on {topic} within {ACK_WAIT:?}");
        Ok(())
    }

    async fn forge(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> anyhow::Result<()> {
        self.publish(topic, payload, retain).await?;
        self.forged += 1;
        Ok(())
    }

    /// Receipts in `victim`'s name for its outbox `outbox_id`, settling every
    /// seq there is, plain and retained. Returns how many were published.
    pub async fn forge_receipts(&mut self, victim: &str, outbox_id: Uuid) -> anyhow::Result<u64> {
        let all = SeqRange {
            first: i64::MIN,
            last: i64::MAX,
        };
        let refused_whole = Receipt {
            v: schema::mqtt::PAYLOAD_VERSION,
            site_id: victim.to_owned(),
            outbox_id,
            batch_id: Uuid::now_v7(),
            committed: vec![],
            inserted: 0,
            duplicates: 0,
            rejected: vec![],
            rejected_range: Some(all),
            committed_at: Utc::now(),
        };
        let committed_all = Receipt {
            batch_id: Uuid::now_v7(),
            committed: vec![all],
            inserted: 1,
            rejected_range: None,
            ..refused_whole.clone()
        };
        let topic = self.topics.receipts(victim);
        let before = self.forged;
        for r in [&refused_whole, &committed_all] {
            self.forge(&topic, r.encode(), false).await?;
            self.forge(&topic, r.encode(), true).await?;
        }
        Ok(self.forged - before)
    }

    /// On `victim`'s impressions topic: a version-2 envelope with the
    /// victim's outbox id and an all-seqs range, which an ingestor refusing
    /// it whole would answer with a receipt for that range.
    pub async fn forge_v2_envelope(&mut self, victim: &str, outbox_id: Uuid) -> anyhow::Result<()> {
        let env = json!({
            "v": 2,
            "site_id": victim,
            "outbox_id": outbox_id,
            "batch_id": Uuid::now_v7(),
            "seq": {"first": i64::MIN, "last": i64::MAX},
            "sent_at": Utc::now(),
            "impressions": [],
            "mark": MARK,
        });
        let topic = self.topics.impressions(victim);
        self.forge(&topic, serde_json::to_vec(&env)?, false).await
    }

    /// On `victim`'s impressions topic: an envelope of plays in the victim's
    /// name, made from `template` (fresh ids, remembered in
    /// [`Rogue::forged_ids`]), once with `outbox_id` (the victim's, assume it
    /// leaked) and once with an outbox of the attacker's.
    pub async fn forge_plays(&mut self, victim: &str, outbox_id: Uuid, template: &[Impression]) -> anyhow::Result<()> {
        let topic = self.topics.impressions(victim);
        for outbox in [outbox_id, Uuid::now_v7()] {
            let plays: Vec<Impression> = template
                .iter()
                .enumerate()
                .map(|(i, p)| Impression {
                    impression_id: Uuid::now_v7(),
                    site_id: victim.to_owned(),
                    seq: Some(i as i64 + 1),
                    ..p.clone()
                })
                .collect();
            self.forged_ids.extend(plays.iter().map(|p| p.impression_id));
            let env = BatchEnvelope::new(victim, outbox, plays, Utc::now());
            self.forge(&topic, env.encode(), false).await?;
        }
        Ok(())
    }

    /// An [`OVERSIZED_BYTES`] message on `victim`'s receipts topic.
    pub async fn oversized(&mut self, victim: &str) -> anyhow::Result<()> {
        let mut payload = format!("{{\"mark\":\"{MARK}\",\"pad\":\"").into_bytes();
        payload.resize(OVERSIZED_BYTES - 2, b'x');
        payload.extend_from_slice(b"\"}");
        let topic = self.topics.receipts(victim);
        self.forge(&topic, payload, false).await
    }

    /// Retained messages on its own impressions and receipts topics and on
    /// every topic of each of `victims`.
    pub async fn retained_spam(&mut self, victims: &[String]) -> anyhow::Result<u64> {
        let mut topics = vec![self.topics.impressions(&self.site), self.topics.receipts(&self.site)];
        for v in victims {
            topics.push(self.topics.impressions(v));
            topics.push(self.topics.receipts(v));
            topics.push(self.topics.status(v));
        }
        let payload = format!("{{\"mark\":\"{MARK}\",\"retained\":true}}").into_bytes();
        for t in &topics {
            self.forge(t, payload.clone(), true).await?;
        }
        Ok(topics.len() as u64)
    }

    /// Publishes `play` (re-stamped as its own) genuinely on its own topic
    /// and waits for its receipt: anything the broker leaked to the attacker
    /// from the ingestor's earlier receipts has arrived by then.
    pub async fn sync(&mut self, play: &Impression, timeout: Duration) -> anyhow::Result<()> {
        let mine = Impression {
            impression_id: Uuid::now_v7(),
            site_id: self.site.clone(),
            seq: Some(self.next_seq),
            ..play.clone()
        };
        self.next_seq += 1;
        let env = BatchEnvelope::new(&self.site, self.outbox_id, vec![mine], Utc::now());
        let batch = env.batch_id;
        let topic = self.topics.impressions(&self.site);
        self.publish(&topic, env.encode(), false).await?;
        let st = Arc::clone(&self.state);
        let got = crate::fleet::wait_until(timeout, || {
            let st = Arc::clone(&st);
            async move { Ok(st.lock().expect("rogue state").own_receipts.contains(&batch)) }
        })
        .await?;
        anyhow::ensure!(got, "{}'s own play was not receipted within {timeout:?}", self.site);
        Ok(())
    }

    /// Messages received on any topic but its own receipts.
    pub fn messages_read(&self) -> u64 {
        self.state.lock().expect("rogue state").read
    }

    /// The first messages received (for a report).
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().expect("rogue state").seen.clone()
    }

    /// Times its connection dropped (an ACL that disconnects instead of
    /// dropping a publish, or a broker that could not take a message).
    pub fn disconnects(&self) -> u64 {
        self.state.lock().expect("rogue state").disconnects
    }

    /// Attack messages published (and acknowledged by the broker).
    pub fn forged_published(&self) -> u64 {
        self.forged
    }

    /// Ids of the plays it forged in other sites' names.
    pub fn forged_ids(&self) -> &[Uuid] {
        &self.forged_ids
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
    }
}

/// Rows the attacker made that the centre keeps under another site than
/// `attacker`: impressions with one of the `forged` ids, and dead letters
/// carrying the attacker's mark or one of those ids.
pub async fn rows_stored_as_others(pool: &sqlx::PgPool, attacker: &str, forged: &[Uuid]) -> anyhow::Result<i64> {
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sponsor_impressions WHERE impression_id = ANY($1) AND site_id <> $2")
            .bind(forged)
            .bind(attacker)
            .fetch_one(pool)
            .await?;
    let dead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM impressions_rejected
         WHERE (impression_id = ANY($1) OR position(convert_to($3, 'UTF8') IN payload) > 0)
           AND site_id IS DISTINCT FROM $2",
    )
    .bind(forged)
    .bind(attacker)
    .bind(MARK)
    .fetch_one(pool)
    .await?;
    Ok(rows + dead)
}

/// Connects a fresh clean session with `url`'s account as `client_id`,
/// subscribes `filters` and returns the retained messages delivered within
/// `window` after the last SUBACK, as (topic, payload).
pub async fn retained_seen(
    url: &MqttUrl,
    client_id: &str,
    filters: &[String],
    window: Duration,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut c = ClientOptions::new(client_id);
    c.clean_session = true;
    let (client, mut el) = runtime::mqtt::client(url, &c, |_| {})?;
    for f in filters {
        client.subscribe(f.clone(), QoS::AtLeastOnce).await?;
    }
    let mut subacks = 0usize;
    let mut retained = Vec::new();
    let mut until: Option<tokio::time::Instant> = None;
    let deadline = tokio::time::Instant::now() + ACK_WAIT + window;
    loop {
        let stop = until.unwrap_or(deadline).min(deadline);
        let ev = match tokio::time::timeout_at(stop, el.poll()).await {
            Err(_) => break,
            Ok(r) => r.with_context(|| format!("{client_id}'s connection"))?,
        };
        match ev {
            Event::Incoming(Incoming::SubAck(_)) => {
                subacks += 1;
                if subacks == filters.len() {
                    until = Some(tokio::time::Instant::now() + window);
                }
            }
            Event::Incoming(Incoming::Publish(p)) if p.retain => retained.push((p.topic.clone(), p.payload.to_vec())),
            _ => {}
        }
    }
    anyhow::ensure!(
        subacks == filters.len(),
        "{client_id}: {subacks} of {} SUBACKs",
        filters.len()
    );
    let _ = client.disconnect().await;
    // Sends the DISCONNECT (the loop writes what the client queued).
    let _ = tokio::time::timeout(Duration::from_millis(500), el.poll()).await;
    Ok(retained)
}
