//! The impression record: one play of a sponsor video on one TV box.
//!
//! Two shapes live here:
//!
//! * [`Impression`] is the validated record, the only one that travels between
//!   our own processes (edge outbox, MQTT envelope, database row). Its JSON
//!   field names and enum spellings are exactly the seed's, plus
//!   `impression_id` and `seq`.
//! * [`parse_impression`] turns an untrusted JSON object (the TV frontend's
//!   POST body, a legacy buffer file, the legacy central endpoint) into an
//!   [`Impression`], reporting every problem as a [`FieldError`] that names the
//!   field. Unknown extra fields are ignored: the TV frontend may add some.
//!
//! Why a hand-written parser for untrusted input instead of `#[derive(Deserialize)]`
//! alone: serde stops at the first error and its messages do not always name
//! the field. An operator debugging a box needs "impressions[3].period: unknown
//! value 'half'", and a partially bad batch must keep its good rows.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use uuid::Uuid;

use crate::ids::derive_impression_id;
use crate::validate::{self, FieldError};

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $wire)] $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling used on the wire and in the database.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }

            /// The accepted spellings, joined with `|`, for error messages.
            pub fn expected() -> String {
                Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join("|")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    other => Err(format!("unknown value '{}', expected one of {}", validate::truncate(other, 40), Self::expected())),
                }
            }
        }
    };
}

wire_enum!(
    /// What is happening at the venue when the video plays.
    EventType { Match => "match", Training => "training", Tournament => "tournament", Other => "other" }
);
wire_enum!(
    /// When, relative to the event, the video plays.
    Period { PreMatch => "pre_match", Halftime => "halftime", PostMatch => "post_match", Loop => "loop" }
);
wire_enum!(
    /// Whether the play was scheduled (`auto`) or started from the remote (`manual`).
    TriggerType { Auto => "auto", Manual => "manual" }
);

/// A validated impression: what the edge stores, publishes, and the ingestor
/// inserts. Construct one with [`parse_impression`] (untrusted input) or check
/// one that was deserialized directly with [`Impression::validate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Impression {
    /// Stable id of this play, kept through every retry and resend.
    pub impression_id: Uuid,
    /// The site (club / box) that played the video. Topic-safe.
    pub site_id: String,
    /// Per-site sequence number in outbox order (assigned by the edge; absent
    /// for impressions that reached the centre over the legacy HTTP endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_id: Option<String>,
    pub video_filename: String,
    /// When the play started, UTC, microsecond precision (PostgreSQL's).
    #[serde(with = "rfc3339")]
    pub played_at: DateTime<Utc>,
    /// Seconds actually watched.
    pub duration_played: f64,
    /// Length of the video in seconds; 0 when the player did not know it.
    pub video_duration: f64,
    pub completed: bool,
    pub event_type: EventType,
    pub period: Period,
    pub trigger_type: TriggerType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience_estimate: Option<i32>,
}

impl Impression {
    /// Re-checks every bound on an impression that was deserialized directly
    /// (the typed fast path of the ingestor). `now` is the receiver's clock.
    pub fn validate(&self, now: DateTime<Utc>) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        push_err(
            &mut errors,
            validate::site_id(&self.site_id).map_err(|m| FieldError::new("site_id", m)),
        );
        if let Some(v) = &self.video_id {
            push_err(
                &mut errors,
                validate::bounded_text(v, validate::MAX_VIDEO_ID_LEN).map_err(|m| FieldError::new("video_id", m)),
            );
        }
        push_err(
            &mut errors,
            validate::bounded_text(&self.video_filename, validate::MAX_FILENAME_LEN)
                .map_err(|m| FieldError::new("video_filename", m)),
        );
        push_err(
            &mut errors,
            validate::played_at(self.played_at, now).map_err(|m| FieldError::new("played_at", m)),
        );
        push_err(
            &mut errors,
            validate::video_duration(self.video_duration).map_err(|m| FieldError::new("video_duration", m)),
        );
        push_err(
            &mut errors,
            validate::duration_played(self.duration_played, self.video_duration)
                .map_err(|m| FieldError::new("duration_played", m)),
        );
        if let Some(a) = self.audience_estimate {
            push_err(
                &mut errors,
                validate::audience(i64::from(a))
                    .map(|_| ())
                    .map_err(|m| FieldError::new("audience_estimate", m)),
            );
        }
        if let Some(s) = self.seq {
            if s < 1 {
                errors.push(FieldError::new("seq", format!("must be >= 1, got {s}")));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Serialized JSON size in bytes; used to keep envelopes under the packet limit.
    pub fn encoded_len(&self) -> usize {
        serde_json::to_vec(self).map(|v| v.len()).unwrap_or(0)
    }
}

fn take<T>(errors: &mut Vec<FieldError>, r: Result<T, FieldError>) -> Option<T> {
    r.map_err(|e| errors.push(e)).ok()
}

fn push_err(errors: &mut Vec<FieldError>, r: Result<(), FieldError>) {
    if let Err(e) = r {
        errors.push(e);
    }
}

/// Context for turning untrusted JSON into an [`Impression`].
#[derive(Clone, Debug)]
pub struct ParseContext<'a> {
    /// The site the input is known to come from (the box's own id, the MQTT
    /// topic's site, an HTTP header). When set, a record naming another site is
    /// refused; when a record names none, this one is used.
    pub site_id: Option<&'a str>,
    /// The receiver's clock, for the "not in the future" bound.
    pub now: DateTime<Utc>,
    /// Whether a `seq` in the input is kept (the centre keeps the edge's seq;
    /// the edge ignores any seq the TV sends and assigns its own).
    pub keep_seq: bool,
}

/// Parses and validates one untrusted impression object.
///
/// Every problem is reported, each naming its field; `impression_id` is kept
/// when given (any UUID), else derived with [`derive_impression_id`] so that a
/// retried POST of the same play maps to the same id.
pub fn parse_impression(value: &Value, ctx: &ParseContext<'_>) -> Result<Impression, Vec<FieldError>> {
    let Some(obj) = value.as_object() else {
        return Err(vec![FieldError::new(
            "",
            format!("expected a JSON object, got {}", kind(value)),
        )]);
    };
    let mut errors = Vec::new();

    let site_id = take(&mut errors, site_of(obj, ctx.site_id));
    let video_id = take(&mut errors, opt_text(obj, "video_id", validate::MAX_VIDEO_ID_LEN));
    let video_filename = take(&mut errors, req_text(obj, "video_filename", validate::MAX_FILENAME_LEN));
    let played_at = take(&mut errors, played_at_of(obj, ctx.now));
    let video_duration = take(
        &mut errors,
        number(obj, "video_duration").and_then(|d| {
            validate::video_duration(d)
                .map(|_| d)
                .map_err(|m| FieldError::new("video_duration", m))
        }),
    );
    let duration_played = take(&mut errors, number(obj, "duration_played"));
    let completed = take(&mut errors, boolean(obj, "completed"));
    let event_type = take(&mut errors, enum_field::<EventType>(obj, "event_type"));
    let period = take(&mut errors, enum_field::<Period>(obj, "period"));
    let trigger_type = take(&mut errors, enum_field::<TriggerType>(obj, "trigger_type"));
    let audience_estimate = take(&mut errors, audience_of(obj));
    let impression_id = take(&mut errors, opt_uuid(obj, "impression_id"));
    let seq = if ctx.keep_seq {
        take(&mut errors, opt_seq(obj))
    } else {
        Some(None)
    };

    if let (Some(dp), Some(vd)) = (duration_played, video_duration) {
        if let Err(m) = validate::duration_played(dp, vd) {
            errors.push(FieldError::new("duration_played", m));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    // All `Some` here: every `None` pushed an error above.
    let (site_id, video_filename, played_at) = (
        site_id.unwrap_or_default(),
        video_filename.unwrap_or_default(),
        played_at.unwrap_or_default(),
    );
    let impression_id = impression_id
        .flatten()
        .unwrap_or_else(|| derive_impression_id(&site_id, &video_filename, played_at));
    Ok(Impression {
        impression_id,
        site_id,
        seq: seq.flatten(),
        video_id: video_id.flatten(),
        video_filename,
        played_at,
        duration_played: duration_played.unwrap_or_default(),
        video_duration: video_duration.unwrap_or_default(),
        completed: completed.unwrap_or_default(),
        event_type: event_type.unwrap_or(EventType::Other),
        period: period.unwrap_or(Period::Loop),
        trigger_type: trigger_type.unwrap_or(TriggerType::Auto),
        audience_estimate: audience_estimate.flatten(),
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn present<'v>(obj: &'v Map<String, Value>, field: &str) -> Option<&'v Value> {
    obj.get(field).filter(|v| !v.is_null())
}

fn req<'v>(obj: &'v Map<String, Value>, field: &str) -> Result<&'v Value, FieldError> {
    present(obj, field).ok_or_else(|| FieldError::new(field, "is required"))
}

fn req_text(obj: &Map<String, Value>, field: &str, max: usize) -> Result<String, FieldError> {
    match req(obj, field)? {
        Value::String(s) => validate::bounded_text(s, max)
            .map(|_| s.clone())
            .map_err(|m| FieldError::new(field, m)),
        other => Err(FieldError::new(
            field,
            format!("expected a string, got {}", kind(other)),
        )),
    }
}

fn opt_text(obj: &Map<String, Value>, field: &str, max: usize) -> Result<Option<String>, FieldError> {
    match present(obj, field) {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(_) => req_text(obj, field, max).map(Some),
    }
}

fn site_of(obj: &Map<String, Value>, ctx_site: Option<&str>) -> Result<String, FieldError> {
    let given = match present(obj, "site_id") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => {
            return Err(FieldError::new(
                "site_id",
                format!("expected a string, got {}", kind(other)),
            ))
        }
    };
    let site = match (given, ctx_site) {
        (Some(g), Some(c)) if g != c => {
            return Err(FieldError::new(
                "site_id",
                format!("'{}' differs from the sender's site '{c}'", validate::truncate(g, 64)),
            ))
        }
        (Some(g), _) => g,
        (None, Some(c)) => c,
        (None, None) => {
            return Err(FieldError::new(
                "site_id",
                "is required (no site known for this sender)",
            ))
        }
    };
    validate::site_id(site).map_err(|m| FieldError::new("site_id", m))?;
    Ok(site.to_owned())
}

fn played_at_of(obj: &Map<String, Value>, now: DateTime<Utc>) -> Result<DateTime<Utc>, FieldError> {
    let t = match req(obj, "played_at")? {
        Value::String(s) => parse_timestamp(s).map_err(|m| FieldError::new("played_at", m))?,
        other => {
            return Err(FieldError::new(
                "played_at",
                format!("expected an ISO 8601 string, got {}", kind(other)),
            ))
        }
    };
    validate::played_at(t, now).map_err(|m| FieldError::new("played_at", m))?;
    Ok(t)
}

/// Parses an ISO 8601 / RFC 3339 timestamp (with offset; a naive one is taken
/// as UTC, as the seed's `new Date().toISOString()` always writes `Z`) and
/// truncates it to microseconds, PostgreSQL's precision, so that the value
/// stored and the value an id was derived from are the same instant.
pub fn parse_timestamp(s: &str) -> Result<DateTime<Utc>, String> {
    let t = DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").map(|n| Utc.from_utc_datetime(&n))
        })
        .map_err(|_| format!("'{}' is not an ISO 8601 timestamp", validate::truncate(s, 40)))?;
    Ok(truncate_to_micros(t))
}

/// Drops sub-microsecond precision.
pub fn truncate_to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

fn number(obj: &Map<String, Value>, field: &str) -> Result<f64, FieldError> {
    match req(obj, field)? {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| FieldError::new(field, "is not a finite number")),
        other => Err(FieldError::new(
            field,
            format!("expected a number, got {}", kind(other)),
        )),
    }
}

fn boolean(obj: &Map<String, Value>, field: &str) -> Result<bool, FieldError> {
    match req(obj, field)? {
        Value::Bool(b) => Ok(*b),
        other => Err(FieldError::new(
            field,
            format!("expected true or false, got {}", kind(other)),
        )),
    }
}

fn enum_field<T: std::str::FromStr<Err = String>>(obj: &Map<String, Value>, field: &str) -> Result<T, FieldError> {
    match req(obj, field)? {
        Value::String(s) => s.parse().map_err(|m| FieldError::new(field, m)),
        other => Err(FieldError::new(
            field,
            format!("expected a string, got {}", kind(other)),
        )),
    }
}

fn audience_of(obj: &Map<String, Value>) -> Result<Option<i32>, FieldError> {
    const F: &str = "audience_estimate";
    let n = match present(obj, F) {
        None => return Ok(None),
        Some(Value::Number(n)) => n,
        Some(other) => return Err(FieldError::new(F, format!("expected a number, got {}", kind(other)))),
    };
    let v = if let Some(i) = n.as_i64() {
        i
    } else {
        let f = n.as_f64().unwrap_or(f64::NAN);
        if !f.is_finite() || f.fract() != 0.0 || f.abs() > 1e12 {
            return Err(FieldError::new(F, format!("expected a whole number, got {f}")));
        }
        f as i64
    };
    validate::audience(v).map(Some).map_err(|m| FieldError::new(F, m))
}

fn opt_uuid(obj: &Map<String, Value>, field: &str) -> Result<Option<Uuid>, FieldError> {
    match present(obj, field) {
        None => Ok(None),
        Some(Value::String(s)) => Uuid::parse_str(s)
            .map(Some)
            .map_err(|_| FieldError::new(field, format!("'{}' is not a UUID", validate::truncate(s, 40)))),
        Some(other) => Err(FieldError::new(
            field,
            format!("expected a UUID string, got {}", kind(other)),
        )),
    }
}

fn opt_seq(obj: &Map<String, Value>) -> Result<Option<i64>, FieldError> {
    match present(obj, "seq") {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(s) if s >= 1 => Ok(Some(s)),
            _ => Err(FieldError::new("seq", format!("must be a whole number >= 1, got {n}"))),
        },
        Some(other) => Err(FieldError::new(
            "seq",
            format!("expected a number, got {}", kind(other)),
        )),
    }
}

/// Serde adapter writing timestamps as RFC 3339 UTC with `Z`, keeping all
/// (microsecond) precision, and reading any RFC 3339 offset.
pub mod rfc3339 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        parse_timestamp(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        parse_timestamp("2025-12-15T00:00:00Z").unwrap()
    }

    fn ctx(site: Option<&str>) -> ParseContext<'_> {
        ParseContext {
            site_id: site,
            now: now(),
            keep_seq: false,
        }
    }

    /// The seed's POST body example, verbatim.
    const SEED_EXAMPLE: &str = r#"{
      "video_filename": "sponsor_coca_cola_30s.mp4",
      "played_at": "2025-12-14T21:30:00.000Z",
      "duration_played": 30,
      "video_duration": 30,
      "completed": true,
      "event_type": "match",
      "period": "halftime",
      "trigger_type": "auto",
      "audience_estimate": 150
    }"#;

    #[test]
    fn seed_example_parses_with_all_fields() {
        let v: Value = serde_json::from_str(SEED_EXAMPLE).unwrap();
        let imp = parse_impression(&v, &ctx(Some("club-42"))).unwrap();
        assert_eq!(imp.site_id, "club-42");
        assert_eq!(imp.video_filename, "sponsor_coca_cola_30s.mp4");
        assert_eq!(imp.played_at, parse_timestamp("2025-12-14T21:30:00Z").unwrap());
        assert_eq!(imp.duration_played, 30.0);
        assert!(imp.completed);
        assert_eq!(imp.event_type, EventType::Match);
        assert_eq!(imp.period, Period::Halftime);
        assert_eq!(imp.trigger_type, TriggerType::Auto);
        assert_eq!(imp.audience_estimate, Some(150));
        assert_eq!(
            imp.impression_id,
            derive_impression_id("club-42", "sponsor_coca_cola_30s.mp4", imp.played_at)
        );
    }

    #[test]
    fn seed_troubleshooting_example_parses() {
        // From the seed's "Test manuel du endpoint central" curl.
        let body = r#"{"impressions":[{"video_filename":"test.mp4","played_at":"2025-12-14T21:00:00Z","duration_played":10,"video_duration":30,"completed":false,"event_type":"other","period":"loop","trigger_type":"manual"}]}"#;
        let v: Value = serde_json::from_str(body).unwrap();
        let imp = parse_impression(&v["impressions"][0], &ctx(Some("s1"))).unwrap();
        assert_eq!(imp.audience_estimate, None);
        assert_eq!(imp.trigger_type, TriggerType::Manual);
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let mut v: Value = serde_json::from_str(SEED_EXAMPLE).unwrap();
        v["player_version"] = json!("2.1");
        v["extra"] = json!({"nested": [1, 2]});
        assert!(parse_impression(&v, &ctx(Some("s1"))).is_ok());
    }

    #[test]
    fn every_bad_field_is_named() {
        let v = json!({
            "site_id": "bad site!",
            "video_filename": "",
            "played_at": "yesterday",
            "duration_played": -1,
            "video_duration": "30",
            "completed": "yes",
            "event_type": "party",
            "period": "half",
            "trigger_type": 3,
            "audience_estimate": -5,
            "impression_id": "nope"
        });
        let errs = parse_impression(&v, &ctx(None)).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "site_id",
            "video_filename",
            "played_at",
            "video_duration",
            "completed",
            "event_type",
            "period",
            "trigger_type",
            "audience_estimate",
            "impression_id",
        ] {
            assert!(fields.contains(&f), "missing error for {f}: {errs:?}");
        }
        let period = errs.iter().find(|e| e.field == "period").unwrap();
        assert!(
            period.message.contains("pre_match|halftime|post_match|loop"),
            "{period}"
        );
    }

    #[test]
    fn missing_required_fields_are_named() {
        let errs = parse_impression(&json!({}), &ctx(Some("s1"))).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "video_filename",
                "played_at",
                "video_duration",
                "duration_played",
                "completed",
                "event_type",
                "period",
                "trigger_type"
            ]
        );
        assert!(errs.iter().all(|e| e.message == "is required"));
    }

    #[test]
    fn site_mismatch_is_refused() {
        let mut v: Value = serde_json::from_str(SEED_EXAMPLE).unwrap();
        v["site_id"] = json!("other-club");
        let errs = parse_impression(&v, &ctx(Some("club-42"))).unwrap_err();
        assert_eq!(errs[0].field, "site_id");
        assert!(errs[0].message.contains("differs"));
    }

    #[test]
    fn non_object_is_refused() {
        let errs = parse_impression(&json!([1]), &ctx(Some("s"))).unwrap_err();
        assert!(errs[0].message.contains("expected a JSON object"));
    }

    #[test]
    fn integral_float_audience_is_accepted() {
        let mut v: Value = serde_json::from_str(SEED_EXAMPLE).unwrap();
        v["audience_estimate"] = json!(150.0);
        assert_eq!(
            parse_impression(&v, &ctx(Some("s"))).unwrap().audience_estimate,
            Some(150)
        );
        v["audience_estimate"] = json!(150.5);
        assert!(parse_impression(&v, &ctx(Some("s"))).is_err());
    }

    #[test]
    fn given_id_and_seq_are_kept_when_asked() {
        let mut v: Value = serde_json::from_str(SEED_EXAMPLE).unwrap();
        let id = Uuid::now_v7();
        v["impression_id"] = json!(id.to_string());
        v["seq"] = json!(7);
        let keep = ParseContext {
            keep_seq: true,
            ..ctx(Some("s"))
        };
        let imp = parse_impression(&v, &keep).unwrap();
        assert_eq!((imp.impression_id, imp.seq), (id, Some(7)));
        let imp = parse_impression(&v, &ctx(Some("s"))).unwrap();
        assert_eq!(imp.seq, None, "the edge assigns its own seq");
    }

    #[test]
    fn timestamps_with_offsets_normalise_to_utc_micros() {
        let a = parse_timestamp("2025-12-14T22:30:00.1234567+01:00").unwrap();
        let b = parse_timestamp("2025-12-14T21:30:00.123456Z").unwrap();
        assert_eq!(a, b);
        assert_eq!(
            parse_timestamp("2025-12-14T21:30:00").unwrap(),
            parse_timestamp("2025-12-14T21:30:00Z").unwrap()
        );
    }

    #[test]
    fn wire_json_keeps_seed_names() {
        let v: Value = serde_json::from_str(SEED_EXAMPLE).unwrap();
        let imp = parse_impression(&v, &ctx(Some("s"))).unwrap();
        let out = serde_json::to_value(&imp).unwrap();
        assert_eq!(out["played_at"], "2025-12-14T21:30:00Z");
        assert_eq!(out["event_type"], "match");
        assert_eq!(out["period"], "halftime");
        assert_eq!(out["trigger_type"], "auto");
        assert!(out.get("seq").is_none());
        let back: Impression = serde_json::from_value(out).unwrap();
        assert_eq!(back, imp);
    }
}
