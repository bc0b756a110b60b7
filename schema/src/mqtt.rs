//! The MQTT contract: topics, the batch envelope, the receipt, the status.
//!
//! Everything that crosses the broker is defined here and nowhere else, so the
//! edge and the ingestor cannot drift apart. Payloads are JSON (readable with
//! `mosquitto_sub -v`) and carry a version `"v"`; a receiver refuses a version
//! it does not know (dead-letter) rather than guess.
//!
//! | topic | direction | QoS | retained | payload |
//! |---|---|---|---|---|
//! | `{prefix}/sites/{site}/impressions` | edge → ingestor | 1 | no | [`BatchEnvelope`] |
//! | `{prefix}/sites/{site}/receipts` | ingestor → edge | 1 | no | [`Receipt`] |
//! | `{prefix}/sites/{site}/status` | edge → anyone | 1 | yes | [`SiteStatus`] |
//!
//! The prefix is `neopro` in production; tests use their own prefix so they can
//! share one broker.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::impression::{parse_impression, rfc3339, Impression, ParseContext};
use crate::validate::{self, FieldError};

/// The payload version this build writes and reads.
pub const PAYLOAD_VERSION: u32 = 1;
/// Production topic prefix.
pub const DEFAULT_PREFIX: &str = "neopro";
/// Largest MQTT packet any of our clients or our broker accepts. rumqttc's
/// default (10 KiB) is far too small for a batch and breaks the connection
/// when exceeded, so every client sets this explicitly, both ways.
pub const MAX_PACKET_BYTES: usize = 1024 * 1024;
/// Default cap on one envelope's JSON size; well under [`MAX_PACKET_BYTES`]
/// so that a receipt or status never competes with a full envelope.
pub const DEFAULT_MAX_ENVELOPE_BYTES: usize = 256 * 1024;

/// What a topic carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicKind {
    Impressions,
    Receipts,
    Status,
}

impl TopicKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            TopicKind::Impressions => "impressions",
            TopicKind::Receipts => "receipts",
            TopicKind::Status => "status",
        }
    }
}

/// Builds and parses topic names under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl Topics {
    /// A prefix of one or more topic levels without wildcards, e.g. `neopro`
    /// or `test/3f2a`.
    pub fn new(prefix: impl Into<String>) -> Result<Self, String> {
        let prefix = prefix.into();
        if prefix.is_empty() || prefix.starts_with('/') || prefix.ends_with('/') {
            return Err(format!(
                "topic prefix '{prefix}' must be non-empty and not start or end with '/'"
            ));
        }
        if prefix.contains(['+', '#', '\0']) {
            return Err(format!("topic prefix '{prefix}' must not contain MQTT wildcards"));
        }
        Ok(Self { prefix })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn topic(&self, site_id: &str, kind: TopicKind) -> String {
        format!("{}/sites/{site_id}/{}", self.prefix, kind.as_str())
    }

    pub fn impressions(&self, site_id: &str) -> String {
        self.topic(site_id, TopicKind::Impressions)
    }

    pub fn receipts(&self, site_id: &str) -> String {
        self.topic(site_id, TopicKind::Receipts)
    }

    pub fn status(&self, site_id: &str) -> String {
        self.topic(site_id, TopicKind::Status)
    }

    /// Subscription filter for one kind across every site (`…/sites/+/impressions`).
    pub fn all_sites(&self, kind: TopicKind) -> String {
        format!("{}/sites/+/{}", self.prefix, kind.as_str())
    }

    /// Splits a concrete topic into (site id, kind); `None` for anything that
    /// is not one of ours or whose site id is not topic-safe.
    pub fn parse<'t>(&self, topic: &'t str) -> Option<(&'t str, TopicKind)> {
        let rest = topic.strip_prefix(self.prefix.as_str())?.strip_prefix("/sites/")?;
        let (site, kind) = rest.split_once('/')?;
        validate::site_id(site).ok()?;
        let kind = match kind {
            "impressions" => TopicKind::Impressions,
            "receipts" => TopicKind::Receipts,
            "status" => TopicKind::Status,
            _ => return None,
        };
        Some((site, kind))
    }
}

/// An inclusive range of per-site sequence numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeqRange {
    pub first: i64,
    pub last: i64,
}

impl SeqRange {
    pub fn contains(&self, seq: i64) -> bool {
        self.first <= seq && seq <= self.last
    }

    /// How many seqs the range spans (0 when `last < first`). Computed
    /// without overflow: a range from the network may be `i64::MIN..=i64::MAX`,
    /// whose size (2^64) saturates to `u64::MAX`.
    pub fn len(&self) -> u64 {
        let n = i128::from(self.last) - i128::from(self.first) + 1;
        u64::try_from(n.max(0)).unwrap_or(u64::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }

    /// Compresses sequence numbers (any order, duplicates allowed) into the
    /// fewest sorted, disjoint ranges.
    pub fn compress(seqs: impl IntoIterator<Item = i64>) -> Vec<SeqRange> {
        let mut v: Vec<i64> = seqs.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        let mut out: Vec<SeqRange> = Vec::new();
        for s in v {
            match out.last_mut() {
                Some(r) if r.last + 1 == s => r.last = s,
                _ => out.push(SeqRange { first: s, last: s }),
            }
        }
        out
    }
}

/// One MQTT message from an edge: a batch of impressions of one site.
///
/// ```json
/// {"v":1,"site_id":"club-42","outbox_id":"0193c1de-…","batch_id":"0193c1e0-…",
///  "seq":{"first":101,"last":150},"sent_at":"2025-12-14T21:30:05.120Z",
///  "impressions":[{"impression_id":"0193c1de-…","site_id":"club-42","seq":101,…}]}
/// ```
///
/// `outbox_id` names the edge's outbox (made once when the outbox is created);
/// the edge acts only on receipts that echo its own, so a stale receipt can
/// never delete impressions of a re-created outbox whose seqs restarted at 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchEnvelope<I = Impression> {
    pub v: u32,
    pub site_id: String,
    pub outbox_id: Uuid,
    pub batch_id: Uuid,
    /// First and last `seq` in this batch (it may have gaps: resends carry
    /// only what is still unconfirmed).
    pub seq: SeqRange,
    #[serde(with = "rfc3339")]
    pub sent_at: DateTime<Utc>,
    pub impressions: Vec<I>,
}

impl BatchEnvelope {
    /// Builds a version-1 envelope; `impressions` must be non-empty, of
    /// `site_id`, and carry seqs.
    pub fn new(site_id: &str, outbox_id: Uuid, impressions: Vec<Impression>, sent_at: DateTime<Utc>) -> Self {
        let seqs = impressions.iter().filter_map(|i| i.seq);
        let (first, last) = seqs.fold((i64::MAX, i64::MIN), |(lo, hi), s| (lo.min(s), hi.max(s)));
        Self {
            v: PAYLOAD_VERSION,
            site_id: site_id.to_owned(),
            outbox_id,
            batch_id: Uuid::now_v7(),
            seq: SeqRange { first, last },
            sent_at,
            impressions,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The header of an envelope as written: every field of [`BatchEnvelope`]
/// but its impressions, in the same order.
#[derive(Serialize)]
struct HeaderOut<'a> {
    v: u32,
    site_id: &'a str,
    outbox_id: Uuid,
    batch_id: Uuid,
    seq: SeqRange,
    #[serde(with = "rfc3339")]
    sent_at: DateTime<Utc>,
}

/// Encodes a version-1 [`BatchEnvelope`] whose `impressions` array is
/// `joined_bodies`: JSON objects of [`Impression`] (as serde_json writes
/// them, `seq` included) separated by commas, without brackets.
///
/// Why not [`BatchEnvelope::encode`]: the edge stores each impression as the
/// exact JSON an envelope carries, and parsing every body back into an
/// `Impression` only to write it again was a fifth of a box's CPU under the
/// fleet benchmark. The bodies are spliced in as they are; the header is
/// written here, where the wire format is defined, so no other crate
/// depends on its field order. The caller vouches for the bodies (they are
/// its own serialisations); the receiver validates every impression anyway.
pub fn encode_envelope_from_bodies(
    site_id: &str,
    outbox_id: Uuid,
    batch_id: Uuid,
    seq: SeqRange,
    joined_bodies: &[u8],
    sent_at: DateTime<Utc>,
) -> Vec<u8> {
    let header = HeaderOut {
        v: PAYLOAD_VERSION,
        site_id,
        outbox_id,
        batch_id,
        seq,
        sent_at,
    };
    let mut out = Vec::with_capacity(joined_bodies.len() + 256);
    // A struct of strings, UUIDs and integers always serialises.
    serde_json::to_writer(&mut out, &header).expect("an envelope header serialises");
    // `{…}` → `{…,"impressions":[bodies]}`
    out.pop();
    out.extend_from_slice(b",\"impressions\":[");
    out.extend_from_slice(joined_bodies);
    out.extend_from_slice(b"]}");
    out
}

/// Header fields of an envelope, parsed leniently so that even a message whose
/// body is broken can be answered with a receipt (and stop being resent).
#[derive(Clone, Debug, Deserialize)]
struct EnvelopeHeader {
    v: Option<Value>,
    site_id: Option<Value>,
    outbox_id: Option<Uuid>,
    batch_id: Option<Uuid>,
    seq: Option<SeqRange>,
}

/// Why a whole message is refused (it goes to the dead-letter table).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("unsupported payload version {0} (this build reads v{PAYLOAD_VERSION})")]
    UnsupportedVersion(String),
    #[error("payload site_id '{payload}' differs from topic site '{topic}'")]
    SiteMismatch { topic: String, payload: String },
    #[error("invalid envelope: {0}")]
    Invalid(String),
    #[error("payload of {size} bytes exceeds the {limit}-byte limit")]
    Oversized { size: usize, limit: usize },
}

impl EnvelopeError {
    /// Short stable code, used as a metrics label and the dead-letter reason prefix.
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::MalformedJson(_) => "malformed_json",
            EnvelopeError::UnsupportedVersion(_) => "unsupported_version",
            EnvelopeError::SiteMismatch { .. } => "site_mismatch",
            EnvelopeError::Invalid(_) => "invalid_envelope",
            EnvelopeError::Oversized { .. } => "oversized",
        }
    }
}

/// A message refused whole, with whatever of its header could be read so that
/// the sender can still be told.
#[derive(Clone, Debug, PartialEq)]
pub struct RejectedEnvelope {
    pub error: EnvelopeError,
    pub outbox_id: Option<Uuid>,
    pub batch_id: Option<Uuid>,
    pub seq: Option<SeqRange>,
}

/// One impression refused inside an otherwise good envelope.
#[derive(Clone, Debug, PartialEq)]
pub struct RejectedImpression {
    /// Position in the envelope.
    pub index: usize,
    pub impression_id: Option<Uuid>,
    pub seq: Option<i64>,
    /// The impression's JSON as received.
    pub raw: Value,
    pub errors: Vec<FieldError>,
}

impl RejectedImpression {
    pub fn reason(&self) -> String {
        format!("invalid_impression: {}", validate::join(&self.errors))
    }
}

/// A decoded envelope: its header, the impressions that passed validation, and
/// those that did not (each kept for the dead-letter table).
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedBatch {
    pub site_id: String,
    pub outbox_id: Uuid,
    pub batch_id: Uuid,
    pub seq: SeqRange,
    pub sent_at: DateTime<Utc>,
    pub valid: Vec<Impression>,
    pub rejected: Vec<RejectedImpression>,
}

/// Decodes and validates one message received on `topic_site`'s impressions
/// topic. The site is the one the topic names: a payload claiming another is
/// refused whole; an impression claiming another is refused alone.
///
/// Fast path: one typed `serde_json` pass (what our edges send). Only when it
/// fails is the payload re-read as loose JSON to find which impressions are
/// bad, so one bad impression never costs its batch.
pub fn decode_envelope(topic_site: &str, payload: &[u8], now: DateTime<Utc>) -> Result<DecodedBatch, RejectedEnvelope> {
    // Fast path, the steady state: one typed parse of a well-formed envelope
    // of our version and site (then each impression is validated). Anything
    // else takes the careful path below (serde_json), which reports the
    // precise reason. sonic-rs is serde_json's grammar with SIMD scanning:
    // decoding envelopes was a third of the ingestor's CPU, and it cut a
    // 200-impression envelope from 1.8 to 1.2 us per impression on this
    // machine (2026-12-07); every f64 that serde_json writes parses back to
    // the same bits in both (checked on two million values, and by the test
    // below).
    if let Ok(env) = sonic_rs::from_slice::<BatchEnvelope<Impression>>(payload) {
        if env.v == PAYLOAD_VERSION && env.site_id == topic_site {
            return Ok(split_typed(topic_site, env, now));
        }
    }
    let header: EnvelopeHeader = match serde_json::from_slice(payload) {
        Ok(h) => h,
        Err(e) => {
            return Err(RejectedEnvelope {
                error: EnvelopeError::MalformedJson(e.to_string()),
                outbox_id: None,
                batch_id: None,
                seq: None,
            })
        }
    };
    let reject = |error| RejectedEnvelope {
        error,
        outbox_id: header.outbox_id,
        batch_id: header.batch_id,
        seq: header.seq,
    };
    match &header.v {
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(PAYLOAD_VERSION)) => {}
        Some(v) => {
            return Err(reject(EnvelopeError::UnsupportedVersion(validate::truncate(
                &v.to_string(),
                20,
            ))))
        }
        None => return Err(reject(EnvelopeError::Invalid("missing field \"v\"".into()))),
    }
    match &header.site_id {
        Some(Value::String(s)) if s == topic_site => {}
        Some(Value::String(s)) => {
            return Err(reject(EnvelopeError::SiteMismatch {
                topic: topic_site.to_owned(),
                payload: validate::truncate(s, 64),
            }))
        }
        Some(_) => return Err(reject(EnvelopeError::Invalid("site_id is not a string".into()))),
        None => return Err(reject(EnvelopeError::Invalid("missing field \"site_id\"".into()))),
    }

    let split = |env: BatchEnvelope<Value>| -> DecodedBatch {
        let ctx = ParseContext {
            site_id: Some(topic_site),
            now,
            keep_seq: true,
        };
        let mut valid = Vec::with_capacity(env.impressions.len());
        let mut rejected = Vec::new();
        let mut push = |index: usize, raw: Value, res: Result<Impression, Vec<FieldError>>| match res {
            Ok(i) => valid.push(i),
            Err(errors) => rejected.push(RejectedImpression {
                index,
                impression_id: raw
                    .get("impression_id")
                    .and_then(Value::as_str)
                    .and_then(|s| Uuid::parse_str(s).ok()),
                seq: raw.get("seq").and_then(Value::as_i64),
                raw,
                errors: errors.into_iter().map(|e| e.at(index)).collect(),
            }),
        };
        for (index, raw) in env.impressions.into_iter().enumerate() {
            let res = parse_impression(&raw, &ctx).and_then(|i| match i.seq {
                Some(_) => Ok(i),
                None => Err(vec![FieldError::new("seq", "is required in an envelope")]),
            });
            push(index, raw, res);
        }
        DecodedBatch {
            site_id: topic_site.to_owned(),
            outbox_id: env.outbox_id,
            batch_id: env.batch_id,
            seq: env.seq,
            sent_at: env.sent_at,
            valid,
            rejected,
        }
    };

    // Version and site are right but the typed parse failed: some impression
    // is malformed; parse them one by one to refuse only the bad ones.
    match serde_json::from_slice::<BatchEnvelope<Value>>(payload) {
        Ok(env) => Ok(split(env)),
        Err(e) => Err(reject(EnvelopeError::Invalid(e.to_string()))),
    }
}

/// The checks of a typed impression of an envelope of `topic_site`.
fn check_typed(topic_site: &str, imp: &Impression, now: DateTime<Utc>) -> Result<(), Vec<FieldError>> {
    if imp.site_id != topic_site {
        return Err(vec![FieldError::new(
            "site_id",
            format!("'{}' differs from the topic's site '{topic_site}'", imp.site_id),
        )]);
    }
    imp.validate(now)
}

/// Splits a typed envelope (version and site already checked) into valid
/// and refused impressions, moving the valid ones.
fn split_typed(topic_site: &str, env: BatchEnvelope<Impression>, now: DateTime<Utc>) -> DecodedBatch {
    let mut valid = Vec::with_capacity(env.impressions.len());
    let mut rejected = Vec::new();
    for (index, imp) in env.impressions.into_iter().enumerate() {
        match check_typed(topic_site, &imp, now) {
            Ok(()) => valid.push(imp),
            Err(errors) => rejected.push(RejectedImpression {
                index,
                impression_id: Some(imp.impression_id),
                seq: imp.seq,
                raw: serde_json::to_value(&imp).unwrap_or(Value::Null),
                errors: errors.into_iter().map(|e| e.at(index)).collect(),
            }),
        }
    }
    DecodedBatch {
        site_id: topic_site.to_owned(),
        outbox_id: env.outbox_id,
        batch_id: env.batch_id,
        seq: env.seq,
        sent_at: env.sent_at,
        valid,
        rejected,
    }
}

/// One refused impression (or a refused range) as told back to the edge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptRejection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impression_id: Option<Uuid>,
    pub reason: String,
}

/// The ingestor's answer to one envelope, published on the site's receipts
/// topic **after** the database commit.
///
/// ```json
/// {"v":1,"site_id":"club-42","outbox_id":"0193c1de-…","batch_id":"0193c1e0-…",
///  "committed":[{"first":101,"last":149}],"inserted":47,"duplicates":2,
///  "rejected":[{"seq":150,"reason":"invalid_impression: impressions[49].period: …"}],
///  "committed_at":"2025-12-14T21:30:05.310Z"}
/// ```
///
/// `committed` names every seq now durably in PostgreSQL, duplicates included;
/// `rejected` names those kept in the dead-letter table instead. The edge
/// deletes both: either way the centre holds them, and resending cannot help.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub v: u32,
    pub site_id: String,
    pub outbox_id: Uuid,
    pub batch_id: Uuid,
    pub committed: Vec<SeqRange>,
    /// Rows that were new in the database.
    pub inserted: u64,
    /// Rows that were already there (a redelivery or a resend).
    pub duplicates: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<ReceiptRejection>,
    /// When the whole envelope was refused: the seq range it claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_range: Option<SeqRange>,
    #[serde(with = "rfc3339")]
    pub committed_at: DateTime<Utc>,
}

impl Receipt {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(payload: &[u8]) -> Result<Self, EnvelopeError> {
        let r: Self = serde_json::from_slice(payload).map_err(|e| EnvelopeError::MalformedJson(e.to_string()))?;
        if r.v != PAYLOAD_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(r.v.to_string()));
        }
        Ok(r)
    }

    /// Whether this receipt settles `seq` (committed or rejected).
    pub fn settles(&self, seq: i64) -> bool {
        self.committed.iter().any(|r| r.contains(seq))
            || self.rejected.iter().any(|r| r.seq == Some(seq))
            || self.rejected_range.is_some_and(|r| r.contains(seq))
    }
}

/// A box's retained status (also its last will, with `online: false`).
///
/// ```json
/// {"v":1,"site_id":"club-42","online":true,"queue_depth":12,"unsent":0,
///  "oldest_unconfirmed_age_s":3.2,"version":"0.1.0","clock_synced":true,
///  "at":"2025-12-14T21:30:05.000Z"}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteStatus {
    pub v: u32,
    pub site_id: String,
    pub online: bool,
    /// Impressions in the outbox not yet confirmed by a receipt.
    pub queue_depth: u64,
    /// Of those, how many were never published.
    #[serde(default)]
    pub unsent: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unconfirmed_age_s: Option<f64>,
    pub version: String,
    pub clock_synced: bool,
    #[serde(with = "rfc3339")]
    pub at: DateTime<Utc>,
}

impl SiteStatus {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The last-will payload: offline, nothing else known.
    pub fn offline(site_id: &str, version: &str, at: DateTime<Utc>) -> Self {
        Self {
            v: PAYLOAD_VERSION,
            site_id: site_id.to_owned(),
            online: false,
            queue_depth: 0,
            unsent: 0,
            oldest_unconfirmed_age_s: None,
            version: version.to_owned(),
            clock_synced: false,
            at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::derive_impression_id;
    use crate::impression::{parse_timestamp, EventType, Period, TriggerType};
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        parse_timestamp("2025-12-15T00:00:00Z").unwrap()
    }

    fn imp(site: &str, seq: i64) -> Impression {
        let played_at = parse_timestamp("2025-12-14T21:30:00Z").unwrap() + chrono::Duration::seconds(seq);
        Impression {
            impression_id: derive_impression_id(site, "sponsor_a.mp4", played_at),
            site_id: site.into(),
            seq: Some(seq),
            video_id: None,
            video_filename: "sponsor_a.mp4".into(),
            played_at,
            duration_played: 30.0,
            video_duration: 30.0,
            completed: true,
            event_type: EventType::Match,
            period: Period::Halftime,
            trigger_type: TriggerType::Auto,
            audience_estimate: Some(150),
        }
    }

    #[test]
    fn topics_build_and_parse() {
        let t = Topics::default();
        assert_eq!(t.impressions("club-42"), "neopro/sites/club-42/impressions");
        assert_eq!(t.receipts("club-42"), "neopro/sites/club-42/receipts");
        assert_eq!(t.status("club-42"), "neopro/sites/club-42/status");
        assert_eq!(t.all_sites(TopicKind::Impressions), "neopro/sites/+/impressions");
        assert_eq!(
            t.parse("neopro/sites/club-42/impressions"),
            Some(("club-42", TopicKind::Impressions))
        );
        assert_eq!(t.parse("neopro/sites/club-42/other"), None);
        assert_eq!(t.parse("neopro/sites/bad site/impressions"), None);
        assert_eq!(t.parse("other/sites/a/impressions"), None);
        let p = Topics::new("test/abc").unwrap();
        assert_eq!(p.parse(&p.receipts("s")), Some(("s", TopicKind::Receipts)));
        assert!(Topics::new("a/+").is_err());
        assert!(Topics::new("a/").is_err());
    }

    #[test]
    fn envelope_round_trip() {
        let env = BatchEnvelope::new("s1", Uuid::now_v7(), vec![imp("s1", 3), imp("s1", 5)], now());
        assert_eq!(env.seq, SeqRange { first: 3, last: 5 });
        let d = decode_envelope("s1", &env.encode(), now()).unwrap();
        assert_eq!(d.valid, env.impressions);
        assert!(d.rejected.is_empty());
        assert_eq!((d.batch_id, d.outbox_id, d.seq), (env.batch_id, env.outbox_id, env.seq));
    }

    #[test]
    fn envelope_from_bodies_decodes_to_the_same_impressions_and_header() {
        let plays = vec![imp("s1", 3), imp("s1", 4), imp("s1", 9)];
        let joined = plays
            .iter()
            .map(|i| serde_json::to_string(i).unwrap())
            .collect::<Vec<_>>()
            .join(",");
        let (outbox_id, batch_id) = (Uuid::now_v7(), Uuid::now_v7());
        let seq = SeqRange { first: 3, last: 9 };
        let bytes = encode_envelope_from_bodies("s1", outbox_id, batch_id, seq, joined.as_bytes(), now());
        let d = decode_envelope("s1", &bytes, now()).unwrap();
        assert_eq!(d.valid, plays);
        assert!(d.rejected.is_empty());
        assert_eq!(
            (d.outbox_id, d.batch_id, d.seq, d.sent_at),
            (outbox_id, batch_id, seq, now())
        );
        // The same bytes as the typed encoding of the same envelope.
        let typed = BatchEnvelope {
            v: PAYLOAD_VERSION,
            site_id: "s1".into(),
            outbox_id,
            batch_id,
            seq,
            sent_at: now(),
            impressions: plays,
        };
        assert_eq!(bytes, typed.encode());
        // An empty batch is still a well-formed envelope (the receiver refuses nothing but has nothing to store).
        let empty = encode_envelope_from_bodies("s1", outbox_id, batch_id, seq, b"", now());
        assert!(decode_envelope("s1", &empty, now()).unwrap().valid.is_empty());
    }

    #[test]
    fn one_bad_impression_rejects_only_itself() {
        let env = BatchEnvelope::new(
            "s1",
            Uuid::now_v7(),
            vec![imp("s1", 1), imp("s1", 2), imp("s1", 3)],
            now(),
        );
        let mut v = serde_json::to_value(&env).unwrap();
        v["impressions"][1]["period"] = json!("half");
        let d = decode_envelope("s1", &serde_json::to_vec(&v).unwrap(), now()).unwrap();
        assert_eq!(d.valid.len(), 2);
        assert_eq!(d.rejected.len(), 1);
        assert_eq!(d.rejected[0].seq, Some(2));
        assert!(
            d.rejected[0].reason().contains("impressions[1].period"),
            "{}",
            d.rejected[0].reason()
        );
    }

    #[test]
    fn typed_but_out_of_bounds_impression_is_rejected_alone() {
        let mut bad = imp("s1", 2);
        bad.played_at = parse_timestamp("2030-01-01T00:00:00Z").unwrap();
        let env = BatchEnvelope::new("s1", Uuid::now_v7(), vec![imp("s1", 1), bad], now());
        let d = decode_envelope("s1", &env.encode(), now()).unwrap();
        assert_eq!((d.valid.len(), d.rejected.len()), (1, 1));
        assert!(d.rejected[0].reason().contains("played_at"));
        assert_eq!(d.rejected[0].raw["seq"], 2);
    }

    #[test]
    fn impression_of_another_site_is_rejected_alone() {
        let env = BatchEnvelope::new("s1", Uuid::now_v7(), vec![imp("s1", 1), imp("s2", 2)], now());
        let d = decode_envelope("s1", &env.encode(), now()).unwrap();
        assert_eq!((d.valid.len(), d.rejected.len()), (1, 1));
        assert!(d.rejected[0].reason().contains("site_id"));
    }

    #[test]
    fn whole_envelope_rejections_have_codes() {
        let env = BatchEnvelope::new("s1", Uuid::now_v7(), vec![imp("s1", 1)], now());
        let e = decode_envelope("s2", &env.encode(), now()).unwrap_err();
        assert_eq!(e.error.code(), "site_mismatch");
        assert_eq!(e.batch_id, Some(env.batch_id), "header kept for the receipt");

        let mut v = serde_json::to_value(&env).unwrap();
        v["v"] = json!(2);
        let e = decode_envelope("s1", &serde_json::to_vec(&v).unwrap(), now()).unwrap_err();
        assert_eq!(e.error.code(), "unsupported_version");
        assert_eq!(e.seq, Some(env.seq));

        let e = decode_envelope("s1", b"{not json", now()).unwrap_err();
        assert_eq!(e.error.code(), "malformed_json");
        let e = decode_envelope("s1", b"[1,2]", now()).unwrap_err();
        assert_eq!(e.error.code(), "malformed_json");

        v["v"] = json!(1);
        v["impressions"] = json!("nope");
        let e = decode_envelope("s1", &serde_json::to_vec(&v).unwrap(), now()).unwrap_err();
        assert_eq!(e.error.code(), "invalid_envelope");
    }

    #[test]
    fn receipt_round_trip_and_settles() {
        let r = Receipt {
            v: 1,
            site_id: "s1".into(),
            outbox_id: Uuid::now_v7(),
            batch_id: Uuid::now_v7(),
            committed: SeqRange::compress([1, 2, 3, 5]),
            inserted: 3,
            duplicates: 1,
            rejected: vec![ReceiptRejection {
                seq: Some(4),
                impression_id: None,
                reason: "x".into(),
            }],
            rejected_range: None,
            committed_at: now(),
        };
        let back = Receipt::decode(&r.encode()).unwrap();
        assert_eq!(back, r);
        assert!((1..=5).all(|s| r.settles(s)));
        assert!(!r.settles(6));
    }

    #[test]
    fn range_len_never_overflows() {
        let r = |first, last| SeqRange { first, last };
        assert_eq!(r(1, 3).len(), 3);
        assert_eq!(r(3, 1).len(), 0);
        assert!(r(3, 1).is_empty());
        assert_eq!(r(i64::MIN, i64::MAX).len(), u64::MAX);
        assert_eq!(r(i64::MAX, i64::MIN).len(), 0);
        assert_eq!(r(0, i64::MAX).len(), 1 << 63);
    }

    #[test]
    fn compress_ranges() {
        assert_eq!(
            SeqRange::compress([5, 1, 2, 3, 3, 7, 8]),
            vec![
                SeqRange { first: 1, last: 3 },
                SeqRange { first: 5, last: 5 },
                SeqRange { first: 7, last: 8 }
            ]
        );
        assert!(SeqRange::compress([]).is_empty());
    }
}
