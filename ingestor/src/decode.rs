//! From MQTT messages to a [`WriteSet`](crate::store::WriteSet), and from its
//! outcome back to one [`Receipt`] per message.
//!
//! Pure functions (no I/O) so that the accounting of a receipt (what is
//! committed, what is a duplicate, what was refused and why) is testable on
//! its own.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use schema::{decode_envelope, Receipt, ReceiptRejection, SeqRange, TopicKind, Topics, PAYLOAD_VERSION};
use serde::Deserialize;
use uuid::Uuid;

use crate::store::{DeadLetter, Row, Source, WriteOutcome, WriteSet};

/// What one message turned into.
#[derive(Clone, Debug)]
pub enum Kind {
    /// A readable envelope: its valid rows are in `Decoded::rows`; the
    /// impressions refused by validation are listed here (and dead-lettered).
    Envelope {
        site: String,
        outbox_id: Uuid,
        batch_id: Uuid,
        rejected: Vec<ReceiptRejection>,
    },
    /// Refused whole (dead-lettered); answered when the header named the outbox.
    Refused {
        site: String,
        outbox_id: Option<Uuid>,
        batch_id: Option<Uuid>,
        seq: Option<SeqRange>,
        code: &'static str,
        reason: String,
    },
    /// Not on one of our topics (cannot be answered); dead-lettered.
    Foreign,
}

/// One decoded message.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub topic: String,
    pub kind: Kind,
    /// Valid impressions (moved into the write set by [`build_set`]).
    pub rows: Vec<schema::Impression>,
    /// How many valid impressions the message held.
    pub n_rows: usize,
    pub dead: Vec<DeadLetter>,
}

impl Decoded {
    /// Rows this message contributes (valid impressions).
    pub fn row_count(&self) -> usize {
        self.n_rows
    }

    /// Metrics label of a whole-message refusal, if any.
    pub fn refusal_code(&self) -> Option<&'static str> {
        match &self.kind {
            Kind::Refused { code, .. } => Some(code),
            Kind::Foreign => Some("invalid_topic"),
            Kind::Envelope { .. } => None,
        }
    }
}

#[derive(Deserialize)]
struct LooseHeader {
    outbox_id: Option<Uuid>,
    batch_id: Option<Uuid>,
    seq: Option<SeqRange>,
}

/// Decodes one message received on `topic`.
pub fn decode_message(
    topics: &Topics,
    topic: &str,
    payload: &Bytes,
    max_envelope_bytes: usize,
    now: DateTime<Utc>,
) -> Decoded {
    let dead = |site: Option<&str>, batch_id, code: &str, reason: String| DeadLetter {
        source: Source::Mqtt,
        topic: Some(topic.to_owned()),
        site_id: site.map(str::to_owned),
        batch_id,
        impression_id: None,
        seq: None,
        reason_code: code.to_owned(),
        reason,
        payload: payload.to_vec(),
        origin: 0,
    };
    let site = match topics.parse(topic) {
        Some((site, TopicKind::Impressions)) => site.to_owned(),
        _ => {
            return Decoded {
                topic: topic.to_owned(),
                kind: Kind::Foreign,
                rows: Vec::new(),
                n_rows: 0,
                dead: vec![dead(
                    None,
                    None,
                    "invalid_topic",
                    format!("invalid_topic: '{topic}' is not a valid impressions topic"),
                )],
            }
        }
    };
    if payload.len() > max_envelope_bytes {
        let h: Option<LooseHeader> = serde_json::from_slice(payload).ok();
        let err = schema::EnvelopeError::Oversized {
            size: payload.len(),
            limit: max_envelope_bytes,
        };
        let reason = format!("{}: {err}", err.code());
        let (outbox_id, batch_id, seq) = h.map_or((None, None, None), |h| (h.outbox_id, h.batch_id, h.seq));
        return Decoded {
            topic: topic.to_owned(),
            dead: vec![dead(Some(&site), batch_id, err.code(), reason.clone())],
            kind: Kind::Refused {
                site,
                outbox_id,
                batch_id,
                seq,
                code: err.code(),
                reason,
            },
            rows: Vec::new(),
            n_rows: 0,
        };
    }
    match decode_envelope(&site, payload, now) {
        Ok(d) => {
            let mut dl = Vec::with_capacity(d.rejected.len());
            let mut rejected = Vec::with_capacity(d.rejected.len());
            for r in &d.rejected {
                let reason = r.reason();
                dl.push(DeadLetter {
                    source: Source::Mqtt,
                    topic: Some(topic.to_owned()),
                    site_id: Some(site.clone()),
                    batch_id: Some(d.batch_id),
                    impression_id: r.impression_id,
                    seq: r.seq,
                    reason_code: "invalid_impression".into(),
                    reason: reason.clone(),
                    payload: serde_json::to_vec(&r.raw).unwrap_or_default(),
                    origin: 0,
                });
                rejected.push(ReceiptRejection {
                    seq: r.seq,
                    impression_id: r.impression_id,
                    reason,
                });
            }
            Decoded {
                topic: topic.to_owned(),
                kind: Kind::Envelope {
                    site,
                    outbox_id: d.outbox_id,
                    batch_id: d.batch_id,
                    rejected,
                },
                n_rows: d.valid.len(),
                rows: d.valid,
                dead: dl,
            }
        }
        Err(rej) => {
            let code = rej.error.code();
            let reason = format!("{code}: {}", rej.error);
            Decoded {
                topic: topic.to_owned(),
                dead: vec![dead(Some(&site), rej.batch_id, code, reason.clone())],
                kind: Kind::Refused {
                    site,
                    outbox_id: rej.outbox_id,
                    batch_id: rej.batch_id,
                    seq: rej.seq,
                    code,
                    reason,
                },
                rows: Vec::new(),
                n_rows: 0,
            }
        }
    }
}

/// Concatenates messages into one write set; `origin` is the message's index.
pub fn build_set(msgs: &mut [Decoded]) -> WriteSet {
    let mut set = WriteSet {
        rows: Vec::with_capacity(msgs.iter().map(Decoded::row_count).sum()),
        ..Default::default()
    };
    for (origin, m) in msgs.iter_mut().enumerate() {
        let batch_id = match &m.kind {
            Kind::Envelope { batch_id, .. } => Some(*batch_id),
            _ => None,
        };
        set.rows.extend(
            std::mem::take(&mut m.rows)
                .into_iter()
                .map(|imp| Row { imp, batch_id, origin }),
        );
        set.dead
            .extend(m.dead.iter().map(|d| DeadLetter { origin, ..d.clone() }));
        match &m.kind {
            Kind::Envelope { site, .. } | Kind::Refused { site, .. } => set.sites.push(site.clone()),
            Kind::Foreign => {}
        }
    }
    set.sites.sort_unstable();
    set.sites.dedup();
    set
}

/// One receipt per answerable message: `(topic, receipt)`.
pub fn receipts(
    topics: &Topics,
    msgs: &[Decoded],
    set: &WriteSet,
    out: &WriteOutcome,
    now: DateTime<Utc>,
) -> Vec<(String, Receipt)> {
    let mut refused_by_db: std::collections::HashMap<usize, &str> = std::collections::HashMap::new();
    for (i, reason) in &out.refused {
        refused_by_db.insert(*i, reason.as_str());
    }
    let mut res = Vec::with_capacity(msgs.len());
    let mut row = 0usize;
    for m in msgs {
        let rows = row..row + m.n_rows;
        row = rows.end;
        match &m.kind {
            Kind::Envelope {
                site,
                outbox_id,
                batch_id,
                rejected,
            } => {
                let mut rejected = rejected.clone();
                let mut seqs = Vec::with_capacity(rows.len());
                let (mut inserted, mut duplicates) = (0u64, 0u64);
                for i in rows {
                    let imp = &set.rows[i].imp;
                    if let Some(reason) = refused_by_db.get(&i) {
                        rejected.push(ReceiptRejection {
                            seq: imp.seq,
                            impression_id: Some(imp.impression_id),
                            reason: (*reason).to_owned(),
                        });
                        continue;
                    }
                    if out.new[i] {
                        inserted += 1;
                    } else {
                        duplicates += 1;
                    }
                    if let Some(s) = imp.seq {
                        seqs.push(s);
                    }
                }
                res.push((
                    topics.receipts(site),
                    Receipt {
                        v: PAYLOAD_VERSION,
                        site_id: site.clone(),
                        outbox_id: *outbox_id,
                        batch_id: *batch_id,
                        committed: SeqRange::compress(seqs),
                        inserted,
                        duplicates,
                        rejected,
                        rejected_range: None,
                        committed_at: now,
                    },
                ));
            }
            Kind::Refused {
                site,
                outbox_id: Some(outbox_id),
                batch_id: Some(batch_id),
                seq,
                reason,
                ..
            } => res.push((
                topics.receipts(site),
                Receipt {
                    v: PAYLOAD_VERSION,
                    site_id: site.clone(),
                    outbox_id: *outbox_id,
                    batch_id: *batch_id,
                    committed: Vec::new(),
                    inserted: 0,
                    duplicates: 0,
                    rejected: vec![ReceiptRejection {
                        seq: None,
                        impression_id: None,
                        reason: reason.clone(),
                    }],
                    rejected_range: *seq,
                    committed_at: now,
                },
            )),
            Kind::Refused { .. } | Kind::Foreign => {}
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::{derive_impression_id, parse_timestamp, BatchEnvelope, EventType, Impression, Period, TriggerType};

    fn imp(site: &str, seq: i64) -> Impression {
        let played_at = parse_timestamp("2025-12-14T21:30:00Z").unwrap() + chrono::Duration::seconds(seq);
        Impression {
            impression_id: derive_impression_id(site, "a.mp4", played_at),
            site_id: site.into(),
            seq: Some(seq),
            video_id: None,
            video_filename: "a.mp4".into(),
            played_at,
            duration_played: 30.0,
            video_duration: 30.0,
            completed: true,
            event_type: EventType::Match,
            period: Period::Halftime,
            trigger_type: TriggerType::Auto,
            audience_estimate: Some(10),
        }
    }

    #[test]
    fn receipts_account_for_new_duplicate_and_refused_rows() {
        let topics = Topics::new("t").unwrap();
        let now = Utc::now();
        let env = BatchEnvelope::new(
            "s1",
            Uuid::now_v7(),
            vec![imp("s1", 1), imp("s1", 2), imp("s1", 3)],
            now,
        );
        let mut v = serde_json::to_value(&env).unwrap();
        v["impressions"][2]["period"] = serde_json::json!("half");
        let payload = Bytes::from(serde_json::to_vec(&v).unwrap());
        let d = decode_message(&topics, &topics.impressions("s1"), &payload, 1 << 20, now);
        assert_eq!((d.rows.len(), d.dead.len()), (2, 1));
        let bad = decode_message(&topics, &topics.impressions("s2"), &payload, 1 << 20, now);
        assert_eq!(bad.refusal_code(), Some("site_mismatch"));
        let big = decode_message(&topics, &topics.impressions("s1"), &payload, 10, now);
        assert_eq!(big.refusal_code(), Some("oversized"));
        let foreign = decode_message(&topics, "t/sites/a b/impressions", &payload, 1 << 20, now);
        assert_eq!(foreign.refusal_code(), Some("invalid_topic"));

        let mut msgs = vec![d, bad, big, foreign];
        let set = build_set(&mut msgs);
        assert_eq!((set.rows.len(), set.dead.len()), (2, 4));
        assert_eq!(set.sites, vec!["s1".to_string(), "s2".to_string()]);
        let out = WriteOutcome {
            new: vec![true, false],
            refused: Vec::new(),
            dead_letters: 4,
            transactions: 1,
        };
        let r = receipts(&topics, &msgs, &set, &out, now);
        assert_eq!(r.len(), 3, "the foreign message has nobody to answer");
        assert_eq!(r[0].0, "t/sites/s1/receipts");
        assert_eq!(r[0].1.committed, SeqRange::compress([1, 2]));
        assert_eq!((r[0].1.inserted, r[0].1.duplicates), (1, 1));
        assert_eq!(r[0].1.rejected[0].seq, Some(3));
        assert_eq!(r[1].0, "t/sites/s2/receipts");
        assert_eq!(r[1].1.rejected_range, Some(SeqRange { first: 1, last: 3 }));
        assert!(r[2].1.rejected[0].reason.starts_with("oversized"));
    }
}
