//! From MQTT messages to a [`WriteSet`](crate::store::WriteSet), and from its
//! outcome back to one [`Receipt`] per message.
//!
//! Pure functions (no I/O) so that the accounting of a receipt (what is
//! committed, what is a duplicate, what was refused and why) is testable on
//! its own.
//!
//! # A receipt settles only what the message carried
//!
//! The edge deletes every seq a receipt names, so a receipt is a proof, never
//! an echo of what a sender claims. The envelope's header range
//! (`"seq":{"first":…,"last":…}`) is a claim anyone able to publish on a
//! site's topic can forge (`i64::MIN..=i64::MAX` would erase a whole outbox).
//!
//! * A readable envelope: `committed` = the seqs of the impressions stored or
//!   found already stored; `rejected[].seq` = those of the impressions
//!   dead-lettered (validation, or refused by the database). The header
//!   range is never used.
//! * An envelope refused whole (malformed, unsupported version, site
//!   mismatch, invalid, oversized) is read again as loose JSON
//!   ([`LooseEnvelope`]: its `impressions` array is counted and each
//!   element's integer `seq` read, nothing else validated), and answered by
//!   [`answer_refused`]:
//!   - `rejected_range` = the header range when it spans exactly as many
//!     seqs as the array has elements (> 0), and every `seq` that can be read
//!     is distinct and inside it: an honest batch without gaps;
//!   - otherwise, when every element has an integer `seq`: those seqs, each
//!     as one `rejected` entry (a resend with gaps, duplicated seqs, a
//!     forged range);
//!   - otherwise no receipt (nobody to answer, nothing provable, or more
//!     seqs than [`MAX_RECEIPT_SEQS`]).
//!
//!   Whatever is not answered with its header range is counted in
//!   `ingestor_receipts_withheld_total{reason}` ([`RefusalAnswer::withheld`]).
//!   Every refused message is dead-lettered with its raw bytes either way,
//!   and acknowledged to the broker.
//! * Oversized envelopes follow the same rule: the loose read costs one
//!   streaming pass without building a document, bounded by the MQTT packet
//!   limit. Honest edges never produce one (their batch limit is below the
//!   envelope limit), so this only matters for a misconfigured pair.
//! * A message delivered with the retain flag is a replay of an earlier
//!   publish, sent because a subscription was made (MQTT 3.1.1 §3.3.1.3;
//!   edges never publish retained envelopes): dead-lettered (`retained`),
//!   never receipted. The live delivery of that publish to an existing
//!   subscription carries no flag and is handled like any other.
//! * A message on a topic that is not an impressions topic (another
//!   subscription of the persistent session) is acknowledged and counted,
//!   nothing else; on an impressions topic whose site is not topic-safe it is
//!   dead-lettered (`invalid_topic`): there is nobody to answer.

use std::fmt;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use schema::{decode_envelope, validate, Receipt, ReceiptRejection, SeqRange, TopicKind, Topics, PAYLOAD_VERSION};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use uuid::Uuid;

use crate::store::{DeadLetter, Row, Source, WriteOutcome, WriteSet};

/// Most individual seqs one receipt of a refused envelope names (each is a
/// short `rejected` entry, about 40 bytes: the receipt stays far below the
/// MQTT packet limit). An honest edge sends at most 500 impressions per
/// envelope by default.
pub const MAX_RECEIPT_SEQS: usize = 5_000;
/// Most elements of a refused envelope's array whose seqs are kept while it
/// is read loosely (an oversized message could hold millions of `{}`).
const MAX_LOOSE_ELEMENTS: usize = 100_000;

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
    /// Refused whole (dead-lettered); answered as [`answer_refused`] decides.
    Refused {
        site: String,
        outbox_id: Option<Uuid>,
        batch_id: Option<Uuid>,
        answer: RefusalAnswer,
        code: &'static str,
        reason: String,
    },
    /// On an impressions topic whose site is not topic-safe (nobody to
    /// answer); dead-lettered.
    Foreign,
    /// Not on an impressions topic: acknowledged, counted, nothing written.
    Ignored,
}

/// How an envelope refused whole is answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusalAnswer {
    /// `rejected_range` = the header's range, which spans exactly the
    /// impressions the envelope carried.
    Range(SeqRange),
    /// One `rejected` entry per seq the impressions carry (sorted, distinct).
    Seqs(Vec<i64>),
    /// No receipt; why (the label of `ingestor_receipts_withheld_total`).
    NoReceipt(&'static str),
}

impl RefusalAnswer {
    /// The `reason` label of `ingestor_receipts_withheld_total` when the
    /// header's range is not what the receipt settles.
    pub fn withheld(&self) -> Option<&'static str> {
        match self {
            RefusalAnswer::Range(_) => None,
            RefusalAnswer::Seqs(_) => Some("range_mismatch"),
            RefusalAnswer::NoReceipt(reason) => Some(reason),
        }
    }
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
            Kind::Envelope { .. } | Kind::Ignored => None,
        }
    }

    /// Why a refused message's receipt does not settle its header range
    /// (`ingestor_receipts_withheld_total{reason}`), if it was refused.
    pub fn withheld(&self) -> Option<&'static str> {
        match &self.kind {
            Kind::Refused { answer, .. } => answer.withheld(),
            _ => None,
        }
    }

    /// Whether there is nothing to write (the message can be acked at once,
    /// in its turn).
    pub fn is_ignored(&self) -> bool {
        matches!(self.kind, Kind::Ignored)
    }
}

/// The seq range's size, without overflowing on a forged one
/// (`SeqRange::len` computes `last - first + 1` in `i64`).
fn span(r: SeqRange) -> Option<u64> {
    if r.last < r.first {
        return None;
    }
    u64::try_from(i128::from(r.last) - i128::from(r.first) + 1).ok()
}

/// Decides how an envelope refused whole is answered, from its header range
/// and its impressions array read loosely (see the module doc).
pub fn answer_refused(header: Option<SeqRange>, impressions: Option<&LooseArray>) -> RefusalAnswer {
    let Some(a) = impressions else {
        return RefusalAnswer::NoReceipt("no_impressions");
    };
    if a.count == 0 {
        return RefusalAnswer::NoReceipt("no_impressions");
    }
    if a.seqs.len() < a.count {
        return RefusalAnswer::NoReceipt("too_many_impressions");
    }
    let readable: Vec<i64> = a.seqs.iter().flatten().copied().collect();
    let mut distinct = readable.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if let Some(r) = header {
        let exact = span(r) == Some(a.count as u64)
            && distinct.len() == readable.len()
            && readable.iter().all(|s| r.contains(*s));
        if exact {
            return RefusalAnswer::Range(r);
        }
    }
    if readable.len() < a.count {
        RefusalAnswer::NoReceipt("unreadable_seqs")
    } else if distinct.len() > MAX_RECEIPT_SEQS {
        RefusalAnswer::NoReceipt("too_many_seqs")
    } else {
        RefusalAnswer::Seqs(distinct)
    }
}

/// A value that is `Some` when it has the expected shape, `None` otherwise
/// (never an error: a loose read must not fail on a wrong header field).
struct Lenient<T>(Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Lenient(None)
    }
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Ok(Lenient(serde_json::from_value(v).ok()))
    }
}

/// A refused envelope read as loose JSON: the header fields a receipt
/// needs, and its `impressions` array counted.
#[derive(Default, Deserialize)]
#[serde(default)]
pub struct LooseEnvelope {
    outbox_id: Lenient<Uuid>,
    batch_id: Lenient<Uuid>,
    seq: Lenient<SeqRange>,
    impressions: Option<LooseArray>,
}

impl LooseEnvelope {
    /// `None` when the bytes are not a JSON object with (if present) an
    /// `impressions` array.
    pub fn read(payload: &[u8]) -> Option<Self> {
        // An array would otherwise be read as the struct's fields in order.
        if payload.trim_ascii_start().first() != Some(&b'{') {
            return None;
        }
        serde_json::from_slice(payload).ok()
    }
}

/// An `impressions` array read loosely: how many elements, and each one's
/// integer `seq` when it has exactly one (kept for the first
/// `MAX_LOOSE_ELEMENTS` elements).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LooseArray {
    pub count: usize,
    pub seqs: Vec<Option<i64>>,
}

impl<'de> Deserialize<'de> for LooseArray {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LooseArray;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LooseArray, A::Error> {
                let mut a = LooseArray::default();
                while let Some(LooseElement(s)) = seq.next_element()? {
                    a.count += 1;
                    if a.seqs.len() < MAX_LOOSE_ELEMENTS {
                        a.seqs.push(s);
                    }
                }
                Ok(a)
            }
        }
        d.deserialize_seq(V)
    }
}

/// One element of a loosely read array: any JSON value, of which only an
/// object's single integer `seq` is kept.
struct LooseElement(Option<i64>);

/// An object key, compared with `"seq"` without allocating.
struct IsSeq(bool);

impl<'de> Deserialize<'de> for IsSeq {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IsSeq;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IsSeq, E> {
                Ok(IsSeq(v == "seq"))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for LooseElement {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LooseElement;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LooseElement, A::Error> {
                let mut seq = None;
                let mut seen = 0u32;
                while let Some(IsSeq(is_seq)) = map.next_key()? {
                    if is_seq {
                        seen += 1;
                        seq = map.next_value::<serde_json::Value>()?.as_i64();
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                // A key given twice is ambiguous: which one did the sender mean?
                Ok(LooseElement(if seen == 1 { seq } else { None }))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LooseElement, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(LooseElement(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<LooseElement, E> {
                Ok(LooseElement(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<LooseElement, E> {
                Ok(LooseElement(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<LooseElement, E> {
                Ok(LooseElement(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<LooseElement, E> {
                Ok(LooseElement(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<LooseElement, E> {
                Ok(LooseElement(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<LooseElement, E> {
                Ok(LooseElement(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether `topic` is `{prefix}/sites/…/impressions` (whatever its site).
fn is_impressions_topic(topics: &Topics, topic: &str) -> bool {
    topic
        .strip_prefix(topics.prefix())
        .and_then(|r| r.strip_prefix("/sites/"))
        .is_some_and(|r| r.ends_with("/impressions"))
}

/// Decodes one message received on `topic` (`retain`: the broker's retain
/// flag on delivery).
pub fn decode_message(
    topics: &Topics,
    topic: &str,
    payload: &Bytes,
    retain: bool,
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
        _ if is_impressions_topic(topics, topic) => {
            return Decoded {
                topic: topic.to_owned(),
                kind: Kind::Foreign,
                rows: Vec::new(),
                n_rows: 0,
                dead: vec![dead(
                    None,
                    None,
                    "invalid_topic",
                    format!(
                        "invalid_topic: '{}' does not name a valid site",
                        validate::truncate(topic, 200)
                    ),
                )],
            }
        }
        _ => {
            return Decoded {
                topic: topic.to_owned(),
                kind: Kind::Ignored,
                rows: Vec::new(),
                n_rows: 0,
                dead: Vec::new(),
            }
        }
    };
    let refused = |code: &'static str, reason: String, answer: Option<RefusalAnswer>| {
        let loose = LooseEnvelope::read(payload);
        let (outbox_id, batch_id) = loose.as_ref().map_or((None, None), |l| (l.outbox_id.0, l.batch_id.0));
        let answer = answer.unwrap_or_else(|| match &loose {
            None => RefusalAnswer::NoReceipt("unreadable"),
            Some(_) if outbox_id.is_none() || batch_id.is_none() => RefusalAnswer::NoReceipt("no_header"),
            Some(l) => answer_refused(l.seq.0, l.impressions.as_ref()),
        });
        Decoded {
            topic: topic.to_owned(),
            dead: vec![dead(Some(&site), batch_id, code, reason.clone())],
            kind: Kind::Refused {
                site: site.clone(),
                outbox_id,
                batch_id,
                answer,
                code,
                reason,
            },
            rows: Vec::new(),
            n_rows: 0,
        }
    };
    if retain {
        return refused(
            "retained",
            "retained: a retained message is a replay of an earlier publish, not a delivery \
             (edges never publish retained envelopes)"
                .to_owned(),
            Some(RefusalAnswer::NoReceipt("retained")),
        );
    }
    if payload.len() > max_envelope_bytes {
        let err = schema::EnvelopeError::Oversized {
            size: payload.len(),
            limit: max_envelope_bytes,
        };
        return refused(err.code(), format!("{}: {err}", err.code()), None);
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
            refused(code, format!("{code}: {}", rej.error), None)
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
            Kind::Foreign | Kind::Ignored => {}
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
                answer,
                code,
                reason,
            } => {
                let (rejected, rejected_range) = match answer {
                    RefusalAnswer::NoReceipt(_) => continue,
                    RefusalAnswer::Range(r) => (Vec::new(), Some(*r)),
                    // One short entry per seq: the full reason is given once.
                    RefusalAnswer::Seqs(seqs) => (
                        seqs.iter()
                            .map(|s| ReceiptRejection {
                                seq: Some(*s),
                                impression_id: None,
                                reason: (*code).to_owned(),
                            })
                            .collect(),
                        None,
                    ),
                };
                let mut all = Vec::with_capacity(rejected.len() + 1);
                all.push(ReceiptRejection {
                    seq: None,
                    impression_id: None,
                    reason: reason.clone(),
                });
                all.extend(rejected);
                res.push((
                    topics.receipts(site),
                    Receipt {
                        v: PAYLOAD_VERSION,
                        site_id: site.clone(),
                        outbox_id: *outbox_id,
                        batch_id: *batch_id,
                        committed: Vec::new(),
                        inserted: 0,
                        duplicates: 0,
                        rejected: all,
                        rejected_range,
                        committed_at: now,
                    },
                ));
            }
            Kind::Refused { .. } | Kind::Foreign | Kind::Ignored => {}
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::{derive_impression_id, parse_timestamp, BatchEnvelope, EventType, Impression, Period, TriggerType};
    use serde_json::{json, Value};

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

    fn topics() -> Topics {
        Topics::new("t").unwrap()
    }

    /// An envelope of `site` carrying impressions with these seqs, as JSON
    /// to be tampered with.
    fn envelope_value(site: &str, seqs: &[i64]) -> Value {
        let env = BatchEnvelope::new(
            site,
            Uuid::now_v7(),
            seqs.iter().map(|s| imp(site, *s)).collect(),
            Utc::now(),
        );
        serde_json::to_value(&env).unwrap()
    }

    fn bytes(v: &Value) -> Bytes {
        Bytes::from(serde_json::to_vec(v).unwrap())
    }

    /// Decodes `payload` on `site`'s topic and returns it with the receipts
    /// it gets (a refused message commits nothing).
    fn decode_on(site: &str, payload: &Bytes, max: usize) -> (Decoded, Vec<Receipt>) {
        let t = topics();
        let mut msgs = vec![decode_message(
            &t,
            &t.impressions(site),
            payload,
            false,
            max,
            Utc::now(),
        )];
        let set = build_set(&mut msgs);
        let out = WriteOutcome {
            new: vec![true; set.rows.len()],
            ..Default::default()
        };
        let r = receipts(&t, &msgs, &set, &out, Utc::now())
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        (msgs.pop().unwrap(), r)
    }

    /// Every seq the receipts settle among `candidates`.
    fn settled(rs: &[Receipt], candidates: impl IntoIterator<Item = i64>) -> Vec<i64> {
        candidates
            .into_iter()
            .filter(|s| rs.iter().any(|r| r.settles(*s)))
            .collect()
    }

    #[test]
    fn forged_v2_with_the_whole_seq_space_and_one_impression_settles_no_range() {
        let mut v = envelope_value("club-b", &[7]);
        v["v"] = json!(2);
        v["seq"] = json!({"first": i64::MIN, "last": i64::MAX});
        let (d, rs) = decode_on("club-b", &bytes(&v), 1 << 20);
        assert_eq!(d.refusal_code(), Some("unsupported_version"));
        assert_eq!(d.dead.len(), 1, "dead-lettered");
        assert_eq!(d.withheld(), Some("range_mismatch"));
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].rejected_range, None, "the claimed range is never echoed");
        assert_eq!(settled(&rs, [i64::MIN, 1, 6, 8, i64::MAX]), Vec::<i64>::new());
        assert_eq!(settled(&rs, [7]), vec![7], "only the seq it carried");

        // The same without a readable seq in its one impression: no receipt.
        v["impressions"][0].as_object_mut().unwrap().remove("seq");
        let (d, rs) = decode_on("club-b", &bytes(&v), 1 << 20);
        assert_eq!(d.withheld(), Some("unreadable_seqs"));
        assert!(rs.is_empty(), "{rs:?}");
    }

    #[test]
    fn honest_v2_with_three_impressions_is_answered_with_its_range() {
        let mut v = envelope_value("s1", &[1, 2, 3]);
        v["v"] = json!(2);
        let (d, rs) = decode_on("s1", &bytes(&v), 1 << 20);
        assert_eq!(d.withheld(), None);
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].rejected_range, Some(SeqRange { first: 1, last: 3 }));
        assert!(rs[0].rejected[0].reason.starts_with("unsupported_version"));
        assert!(rs[0].committed.is_empty());
        // Elements are counted, not validated: garbage impressions of an
        // unknown version still count.
        v["impressions"] = json!([{"seq": 1, "x": [1, {"seq": 99}]}, {"seq": 2}, "garbage"]);
        let (_, rs) = decode_on("s1", &bytes(&v), 1 << 20);
        assert_eq!(rs[0].rejected_range, Some(SeqRange { first: 1, last: 3 }));
    }

    #[test]
    fn site_mismatch_is_answered_on_the_topics_site_within_what_it_carried() {
        let v = envelope_value("club-9", &[4, 5, 6]);
        let (d, rs) = decode_on("club-1", &bytes(&v), 1 << 20);
        assert_eq!(d.refusal_code(), Some("site_mismatch"));
        assert_eq!(rs[0].site_id, "club-1");
        assert_eq!(rs[0].rejected_range, Some(SeqRange { first: 4, last: 6 }));

        let mut wide = v.clone();
        wide["seq"] = json!({"first": 1, "last": 1000});
        let (d, rs) = decode_on("club-1", &bytes(&wide), 1 << 20);
        assert_eq!(d.withheld(), Some("range_mismatch"));
        assert_eq!(rs[0].rejected_range, None);
        assert_eq!(settled(&rs, 1..=1000), vec![4, 5, 6]);
    }

    #[test]
    fn gaps_between_the_header_range_and_the_array_settle_only_the_carried_seqs() {
        // A resend with gaps: header 1..=5, seqs 1, 2, 5.
        let mut v = envelope_value("s1", &[1, 2, 5]);
        v["v"] = json!(2);
        assert_eq!(v["seq"], json!({"first": 1, "last": 5}));
        let (d, rs) = decode_on("s1", &bytes(&v), 1 << 20);
        assert_eq!(d.withheld(), Some("range_mismatch"));
        assert_eq!(rs[0].rejected_range, None);
        assert_eq!(settled(&rs, 0..=6), vec![1, 2, 5]);
        assert!(rs[0].rejected.iter().skip(1).all(|r| r.reason == "unsupported_version"));

        // A range of the right size that does not hold the seqs carried.
        v["seq"] = json!({"first": 10, "last": 12});
        let (_, rs) = decode_on("s1", &bytes(&v), 1 << 20);
        assert_eq!(rs[0].rejected_range, None);
        assert_eq!(settled(&rs, 0..=12), vec![1, 2, 5]);

        // Fewer elements than the range and one without a seq: nothing provable.
        v["seq"] = json!({"first": 1, "last": 5});
        v["impressions"][1].as_object_mut().unwrap().remove("seq");
        let (d, rs) = decode_on("s1", &bytes(&v), 1 << 20);
        assert_eq!(d.withheld(), Some("unreadable_seqs"));
        assert!(rs.is_empty());

        // An empty array settles nothing, whatever its header says.
        v["impressions"] = json!([]);
        let (d, rs) = decode_on("s1", &bytes(&v), 1 << 20);
        assert_eq!(d.withheld(), Some("no_impressions"));
        assert!(rs.is_empty());
    }

    #[test]
    fn duplicated_seqs_never_stretch_to_the_header_range() {
        // Three elements, header 1..=3, but seqs 1, 1, 2: seq 3 was not carried.
        let mut v = envelope_value("s1", &[1, 2, 3]);
        v["v"] = json!(2);
        v["impressions"][1]["seq"] = json!(1);
        v["impressions"][2]["seq"] = json!(2);
        let (d, rs) = decode_on("s1", &bytes(&v), 1 << 20);
        assert_eq!(d.withheld(), Some("range_mismatch"));
        assert_eq!(rs[0].rejected_range, None);
        assert_eq!(settled(&rs, 0..=4), vec![1, 2]);
        assert_eq!(rs[0].rejected.len(), 3, "the reason, then seqs 1 and 2 once each");

        // A "seq" key given twice in one element is unreadable: neither
        // value, nor both.
        let raw = br#"{"v":2,"site_id":"s1","outbox_id":"0193c1de-0000-7000-8000-000000000001",
            "batch_id":"0193c1de-0000-7000-8000-000000000002","seq":{"first":1,"last":2},
            "impressions":[{"seq":1,"seq":2}]}"#;
        let (d, rs) = decode_on("s1", &Bytes::from_static(raw), 1 << 20);
        assert_eq!(d.withheld(), Some("unreadable_seqs"));
        assert!(rs.is_empty());
    }

    #[test]
    fn oversized_envelopes_follow_the_same_rule() {
        let v = envelope_value("s1", &[1, 2, 3]);
        let (d, rs) = decode_on("s1", &bytes(&v), 10);
        assert_eq!(d.refusal_code(), Some("oversized"));
        assert_eq!(rs[0].rejected_range, Some(SeqRange { first: 1, last: 3 }));
        assert!(rs[0].rejected[0].reason.starts_with("oversized"));

        let mut forged = v;
        forged["seq"] = json!({"first": i64::MIN, "last": i64::MAX});
        let (_, rs) = decode_on("s1", &bytes(&forged), 10);
        assert_eq!(rs[0].rejected_range, None);
        assert_eq!(settled(&rs, [i64::MIN, 0, 1, 2, 3, 4, i64::MAX]), vec![1, 2, 3]);

        // Too big to read as JSON at all: dead-lettered, no receipt.
        let (d, rs) = decode_on("s1", &Bytes::from(vec![b'x'; 100]), 10);
        assert_eq!(
            (d.refusal_code(), d.withheld()),
            (Some("oversized"), Some("unreadable"))
        );
        assert!(rs.is_empty());
    }

    #[test]
    fn unanswerable_refusals_are_dead_lettered_without_a_receipt() {
        for (payload, withheld) in [
            (&b"{not json"[..], "unreadable"),
            (&b"[1,2]"[..], "unreadable"),
            (&br#"{"v":1,"site_id":"s1","impressions":"nope"}"#[..], "unreadable"),
            (
                &br#"{"v":2,"site_id":"s1","seq":{"first":1,"last":1},"impressions":[{"seq":1}]}"#[..],
                "no_header",
            ),
        ] {
            let (d, rs) = decode_on("s1", &Bytes::copy_from_slice(payload), 1 << 20);
            assert!(d.refusal_code().is_some());
            assert_eq!(d.dead.len(), 1);
            assert_eq!(d.dead[0].payload, payload, "raw bytes kept");
            assert_eq!(d.withheld(), Some(withheld), "{}", String::from_utf8_lossy(payload));
            assert!(rs.is_empty());
        }
    }

    #[test]
    fn more_seqs_than_a_receipt_carries_get_no_receipt() {
        let items: Vec<Value> = (0..=MAX_RECEIPT_SEQS as i64).map(|s| json!({"seq": s * 2})).collect();
        let v = json!({"v": 2, "site_id": "s1", "outbox_id": Uuid::now_v7(), "batch_id": Uuid::now_v7(),
                       "seq": {"first": 0, "last": 1}, "impressions": items});
        let (d, rs) = decode_on("s1", &bytes(&v), 1 << 30);
        assert_eq!(d.withheld(), Some("too_many_seqs"));
        assert!(rs.is_empty());
    }

    #[test]
    fn answer_refused_never_overflows_on_a_forged_range() {
        let a = LooseArray {
            count: 1,
            seqs: vec![None],
        };
        let full = SeqRange {
            first: i64::MIN,
            last: i64::MAX,
        };
        assert_eq!(
            answer_refused(Some(full), Some(&a)),
            RefusalAnswer::NoReceipt("unreadable_seqs")
        );
        let backwards = SeqRange { first: 5, last: 4 };
        assert_eq!(
            answer_refused(Some(backwards), Some(&a)),
            RefusalAnswer::NoReceipt("unreadable_seqs")
        );
        let one = SeqRange { first: 9, last: 9 };
        assert_eq!(answer_refused(Some(one), Some(&a)), RefusalAnswer::Range(one));
    }

    #[test]
    fn a_readable_envelope_is_receipted_with_its_stored_seqs_never_its_header() {
        let mut v = envelope_value("s1", &[3, 8]);
        v["seq"] = json!({"first": i64::MIN, "last": i64::MAX});
        let (d, rs) = decode_on("s1", &bytes(&v), 1 << 20);
        assert_eq!(d.row_count(), 2);
        assert_eq!(rs[0].committed, SeqRange::compress([3, 8]));
        assert_eq!(rs[0].rejected_range, None);
        assert_eq!(settled(&rs, [i64::MIN, 0, 3, 4, 8, i64::MAX]), vec![3, 8]);
    }

    #[test]
    fn retained_and_foreign_topics_are_never_answered() {
        let t = topics();
        let payload = bytes(&envelope_value("s1", &[1]));
        let now = Utc::now();
        let retained = decode_message(&t, &t.impressions("s1"), &payload, true, 1 << 20, now);
        assert_eq!(retained.refusal_code(), Some("retained"));
        assert_eq!((retained.row_count(), retained.dead.len()), (0, 1));
        assert_eq!(retained.withheld(), Some("retained"));

        let bad_site = decode_message(&t, "t/sites/a b/impressions", &payload, false, 1 << 20, now);
        assert_eq!(bad_site.refusal_code(), Some("invalid_topic"));
        assert_eq!(bad_site.dead.len(), 1);

        for topic in ["t/sites/s1/status", "t/sites/s1/receipts", "elsewhere/x"] {
            let d = decode_message(&t, topic, &payload, false, 1 << 20, now);
            assert!(d.is_ignored(), "{topic}");
            assert!(d.dead.is_empty() && d.refusal_code().is_none());
        }
        let mut msgs = vec![retained, bad_site];
        let set = build_set(&mut msgs);
        assert_eq!(set.dead.len(), 2);
        assert!(receipts(&t, &msgs, &set, &WriteOutcome::default(), now).is_empty());
    }

    #[test]
    fn receipts_account_for_new_duplicate_and_refused_rows() {
        let topics = topics();
        let now = Utc::now();
        let env = BatchEnvelope::new(
            "s1",
            Uuid::now_v7(),
            vec![imp("s1", 1), imp("s1", 2), imp("s1", 3)],
            now,
        );
        let mut v = serde_json::to_value(&env).unwrap();
        v["impressions"][2]["period"] = json!("half");
        let payload = bytes(&v);
        let d = decode_message(&topics, &topics.impressions("s1"), &payload, false, 1 << 20, now);
        assert_eq!((d.rows.len(), d.dead.len()), (2, 1));
        let bad = decode_message(&topics, &topics.impressions("s2"), &payload, false, 1 << 20, now);
        assert_eq!(bad.refusal_code(), Some("site_mismatch"));
        let big = decode_message(&topics, &topics.impressions("s1"), &payload, false, 10, now);
        assert_eq!(big.refusal_code(), Some("oversized"));
        let foreign = decode_message(&topics, "t/sites/a b/impressions", &payload, false, 1 << 20, now);
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
