//! A genuine MQTT protocol peer playing the ingestor's part: it subscribes to
//! every site's impressions, decodes each envelope with the schema's
//! `decode_envelope`, "commits" the valid impressions into an in-memory set
//! keyed by `impression_id` (the database's unique key, without the database),
//! and answers with a real [`Receipt`] on the site's receipts topic.
//!
//! Used by `neopro-sim bench-edge` (drain rate without PostgreSQL in the
//! loop) and by the edge's tests that need receipts without the real
//! ingestor. It can drop its first N answers to simulate lost receipts.

use chrono::Utc;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use runtime::mqtt::{ClientOptions, MqttUrl};
use schema::{Impression, Receipt, ReceiptRejection, SeqRange, TopicKind, Topics, PAYLOAD_VERSION};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What the peer has seen.
#[derive(Debug, Default)]
pub struct PeerState {
    /// Committed impressions by id (first copy kept).
    pub committed: HashMap<Uuid, Impression>,
    /// Envelopes received.
    pub envelopes: u64,
    /// Impressions received (duplicates included).
    pub received: u64,
    /// Impressions already committed when they arrived again.
    pub duplicates: u64,
    /// Receipts sent.
    pub receipts: u64,
    /// Answers still to drop (lost receipts).
    pub drop_remaining: u64,
    /// Envelopes whose receipt was dropped.
    pub dropped: u64,
}

/// A running peer; stops when dropped or [`ReceiptPeer::stop`]ped.
pub struct ReceiptPeer {
    pub state: Arc<Mutex<PeerState>>,
    stop: CancellationToken,
}

impl Drop for ReceiptPeer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ReceiptPeer {
    /// Connects to `url` and serves every site under `prefix`.
    pub fn start(url: &MqttUrl, prefix: &str, drop_first: u64) -> anyhow::Result<ReceiptPeer> {
        let topics = Topics::new(prefix.to_owned()).map_err(anyhow::Error::msg)?;
        let mut c = ClientOptions::new(format!("receipt-peer-{}", Uuid::new_v4().simple()));
        c.clean_session = true;
        c.request_channel_capacity = 100_000;
        let opts = url.options(&c)?;
        let (client, mut eventloop) = AsyncClient::new(opts, c.request_channel_capacity);
        let state = Arc::new(Mutex::new(PeerState {
            drop_remaining: drop_first,
            ..Default::default()
        }));
        let stop = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>)>();
        let pub_client = client.clone();
        let s2 = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = s2.cancelled() => return,
                    m = rx.recv() => match m {
                        Some((t, p)) => { let _ = pub_client.publish(t, QoS::AtLeastOnce, false, p).await; }
                        None => return,
                    }
                }
            }
        });
        let st = state.clone();
        let s3 = stop.clone();
        tokio::spawn(async move {
            let filter = topics.all_sites(TopicKind::Impressions);
            loop {
                let ev = tokio::select! {
                    () = s3.cancelled() => { let _ = client.try_disconnect(); return; }
                    ev = eventloop.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Some((site, TopicKind::Impressions)) = topics.parse(&p.topic) else {
                            continue;
                        };
                        if let Some(r) = answer(&st, site, &p.payload) {
                            let _ = tx.send((topics.receipts(site), r.encode()));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Ok(ReceiptPeer { state, stop })
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Number of distinct committed impressions.
    pub fn committed(&self) -> usize {
        self.state.lock().map(|s| s.committed.len()).unwrap_or(0)
    }
}

fn answer(st: &Mutex<PeerState>, site: &str, payload: &[u8]) -> Option<Receipt> {
    let mut st = st.lock().ok()?;
    st.envelopes += 1;
    let now = Utc::now();
    let receipt = match schema::decode_envelope(site, payload, now) {
        Ok(b) => {
            let mut inserted = 0;
            let mut duplicates = 0;
            let seqs: Vec<i64> = b.valid.iter().filter_map(|i| i.seq).collect();
            st.received += b.valid.len() as u64;
            for imp in b.valid {
                match st.committed.entry(imp.impression_id) {
                    std::collections::hash_map::Entry::Occupied(_) => duplicates += 1,
                    std::collections::hash_map::Entry::Vacant(v) => {
                        inserted += 1;
                        v.insert(imp);
                    }
                }
            }
            st.duplicates += duplicates;
            Receipt {
                v: PAYLOAD_VERSION,
                site_id: site.to_owned(),
                outbox_id: b.outbox_id,
                batch_id: b.batch_id,
                committed: SeqRange::compress(seqs),
                inserted,
                duplicates,
                rejected: b
                    .rejected
                    .iter()
                    .map(|r| ReceiptRejection {
                        seq: r.seq,
                        impression_id: r.impression_id,
                        reason: r.reason(),
                    })
                    .collect(),
                rejected_range: None,
                committed_at: now,
            }
        }
        Err(e) => Receipt {
            v: PAYLOAD_VERSION,
            site_id: site.to_owned(),
            outbox_id: e.outbox_id?,
            batch_id: e.batch_id?,
            committed: Vec::new(),
            inserted: 0,
            duplicates: 0,
            rejected: Vec::new(),
            rejected_range: e.seq,
            committed_at: now,
        },
    };
    if st.drop_remaining > 0 {
        st.drop_remaining -= 1;
        st.dropped += 1;
        return None;
    }
    st.receipts += 1;
    Some(receipt)
}
