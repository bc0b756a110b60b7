//! The seed's HTTP bodies: `{"impressions": [...]}` (TV frontend → box,
//! legacy sync agent → centre) and the legacy buffer file (the same object, or
//! a bare JSON array).
//!
//! A body is accepted record by record: the good ones are kept, each bad one
//! is reported with its index and field. Only a body that is not JSON, or has
//! no `impressions` array, is refused whole.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::impression::{parse_impression, Impression, ParseContext};
use crate::validate::FieldError;

/// Most impressions in one HTTP body (the seed's frontend flushes at 50; the
/// legacy sync agent at 100; a box back from a long outage may send more).
pub const MAX_BODY_IMPRESSIONS: usize = 10_000;

/// The result of reading one body.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedBody {
    /// Valid impressions with their index in the body.
    pub accepted: Vec<(usize, Impression)>,
    /// One entry per problem, each with its index and field.
    pub refused: Vec<FieldError>,
    /// How many records the body held.
    pub received: usize,
}

impl ParsedBody {
    /// Indexes that were refused (each counted once).
    pub fn refused_indexes(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.refused.iter().filter_map(|e| e.index).collect();
        v.dedup();
        v
    }
}

/// Where a body's records come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyShape {
    /// Only `{"impressions": [...]}` (the HTTP endpoints).
    Object,
    /// That, or a bare array (the legacy buffer file).
    ObjectOrArray,
}

/// Parses a body. `site_id` is the site known from the transport (the box's
/// own id, a header); a top-level `"site_id"` in the body is used when that is
/// absent and must agree when it is present.
pub fn parse_body(
    bytes: &[u8],
    shape: BodyShape,
    site_id: Option<&str>,
    now: DateTime<Utc>,
    keep_seq: bool,
) -> Result<ParsedBody, FieldError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| FieldError::new("", format!("body is not valid JSON: {e}")))?;
    parse_body_value(value, shape, site_id, now, keep_seq)
}

/// [`parse_body`] on an already parsed value.
pub fn parse_body_value(
    value: Value,
    shape: BodyShape,
    site_id: Option<&str>,
    now: DateTime<Utc>,
    keep_seq: bool,
) -> Result<ParsedBody, FieldError> {
    let (records, body_site) = match value {
        Value::Array(a) if shape == BodyShape::ObjectOrArray => (a, None),
        Value::Object(mut o) => {
            let body_site = match o.remove("site_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s),
                Some(_) => return Err(FieldError::new("site_id", "expected a string")),
            };
            match o.remove("impressions") {
                Some(Value::Array(a)) => (a, body_site),
                Some(_) => return Err(FieldError::new("impressions", "expected an array")),
                None => return Err(FieldError::new("impressions", "is required")),
            }
        }
        _ => {
            let expected = if shape == BodyShape::Object {
                "an object {\"impressions\": [...]}"
            } else {
                "an object or an array"
            };
            return Err(FieldError::new("", format!("body must be {expected}")));
        }
    };
    if records.len() > MAX_BODY_IMPRESSIONS {
        return Err(FieldError::new(
            "impressions",
            format!("{} records; at most {MAX_BODY_IMPRESSIONS} per body", records.len()),
        ));
    }
    let site = match (site_id, body_site.as_deref()) {
        (Some(t), Some(b)) if t != b => {
            return Err(FieldError::new(
                "site_id",
                format!("'{b}' differs from the sender's site '{t}'"),
            ));
        }
        (Some(t), _) => Some(t),
        (None, b) => b,
    };
    let ctx = ParseContext {
        site_id: site,
        now,
        keep_seq,
    };
    let mut out = ParsedBody {
        received: records.len(),
        ..Default::default()
    };
    for (i, rec) in records.iter().enumerate() {
        match parse_impression(rec, &ctx) {
            Ok(imp) => out.accepted.push((i, imp)),
            Err(errs) => out.refused.extend(errs.into_iter().map(|e| e.at(i))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::impression::parse_timestamp;

    const SEED_BODY: &str = r#"{
      "impressions": [
        {
          "video_filename": "sponsor_coca_cola_30s.mp4",
          "played_at": "2025-12-14T21:30:00.000Z",
          "duration_played": 30,
          "video_duration": 30,
          "completed": true,
          "event_type": "match",
          "period": "halftime",
          "trigger_type": "auto",
          "audience_estimate": 150
        }
      ]
    }"#;

    fn now() -> DateTime<Utc> {
        parse_timestamp("2025-12-15T00:00:00Z").unwrap()
    }

    #[test]
    fn seed_body_parses() {
        let p = parse_body(SEED_BODY.as_bytes(), BodyShape::Object, Some("club-42"), now(), false).unwrap();
        assert_eq!((p.received, p.accepted.len(), p.refused.len()), (1, 1, 0));
    }

    #[test]
    fn partially_bad_body_keeps_good_records() {
        let body = r#"{"impressions":[
            {"video_filename":"a.mp4","played_at":"2025-12-14T21:00:00Z","duration_played":10,"video_duration":30,"completed":false,"event_type":"other","period":"loop","trigger_type":"manual"},
            {"video_filename":"b.mp4","played_at":"2025-12-14T21:00:00Z","duration_played":10,"video_duration":30,"completed":false,"event_type":"gala","period":"loop","trigger_type":"manual"}
        ]}"#;
        let p = parse_body(body.as_bytes(), BodyShape::Object, Some("s"), now(), false).unwrap();
        assert_eq!(p.accepted.len(), 1);
        assert_eq!(p.refused_indexes(), vec![1]);
        assert_eq!(p.refused[0].path(), "impressions[1].event_type");
    }

    #[test]
    fn top_level_site_is_used_and_checked() {
        let body = SEED_BODY.replacen('{', r#"{"site_id":"club-7","#, 1);
        let p = parse_body(body.as_bytes(), BodyShape::Object, None, now(), false).unwrap();
        assert_eq!(p.accepted[0].1.site_id, "club-7");
        let e = parse_body(body.as_bytes(), BodyShape::Object, Some("club-8"), now(), false).unwrap_err();
        assert_eq!(e.field, "site_id");
        let e = parse_body(SEED_BODY.as_bytes(), BodyShape::Object, None, now(), false).unwrap();
        assert_eq!(e.refused[0].path(), "impressions[0].site_id");
    }

    #[test]
    fn shapes() {
        let arr = r#"[{"video_filename":"a.mp4","played_at":"2025-12-14T21:00:00Z","duration_played":10,"video_duration":30,"completed":false,"event_type":"other","period":"loop","trigger_type":"manual"}]"#;
        assert_eq!(
            parse_body(arr.as_bytes(), BodyShape::ObjectOrArray, Some("s"), now(), false)
                .unwrap()
                .accepted
                .len(),
            1
        );
        assert!(parse_body(arr.as_bytes(), BodyShape::Object, Some("s"), now(), false).is_err());
        assert_eq!(
            parse_body(b"{}", BodyShape::Object, Some("s"), now(), false)
                .unwrap_err()
                .field,
            "impressions"
        );
        assert!(parse_body(b"{nope", BodyShape::Object, Some("s"), now(), false)
            .unwrap_err()
            .message
            .contains("not valid JSON"));
    }
}
