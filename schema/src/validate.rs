//! Bounds on every field, and the error type that names the field.
//!
//! The bounds are deliberately generous (a real play must never be refused)
//! but finite (a broken or hostile box must not be able to bill a sponsor for
//! a 10-year "play" or an audience of a billion).

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest site id; site ids appear in MQTT topics and client ids.
pub const MAX_SITE_ID_LEN: usize = 64;
/// Longest `video_id` accepted.
pub const MAX_VIDEO_ID_LEN: usize = 128;
/// Longest `video_filename` accepted (a common filesystem limit).
pub const MAX_FILENAME_LEN: usize = 255;
/// Longest video: 6 hours (a full match replay fits; anything longer is a bug).
pub const MAX_VIDEO_DURATION_S: f64 = 6.0 * 3600.0;
/// `duration_played` may exceed `video_duration` by this factor plus
/// [`PLAYED_SLACK_S`]: players report elapsed wall time, which includes
/// buffering and seek jitter.
pub const PLAYED_OVERRUN_FACTOR: f64 = 1.10;
/// Absolute slack added to the overrun bound, in seconds.
pub const PLAYED_SLACK_S: f64 = 5.0;
/// Largest audience estimate (the biggest stadiums hold ~150k; leave room).
pub const MAX_AUDIENCE: i64 = 1_000_000;
/// A play may be stamped at most this far ahead of the receiver's clock.
pub const MAX_FUTURE_SKEW: Duration = Duration::hours(24);

/// Earliest plausible play. A Raspberry Pi has no RTC: before NTP syncs it
/// believes it is 1970. Such plays are refused (kept in the dead-letter table
/// at the centre) rather than billed on the wrong day.
pub fn earliest_played_at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// One problem with one field of one record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Position in the submitted batch, when the record was part of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The field name as it appears on the wire (`""` for the record itself).
    pub field: String,
    /// What is wrong, for a human.
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            index: None,
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error, located at `index` in a batch.
    pub fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    /// `impressions[3].period` style path.
    pub fn path(&self) -> String {
        match (self.index, self.field.as_str()) {
            (Some(i), "") => format!("impressions[{i}]"),
            (Some(i), f) => format!("impressions[{i}].{f}"),
            (None, f) => f.to_owned(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path();
        if path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{path}: {}", self.message)
        }
    }
}

impl std::error::Error for FieldError {}

/// Joins several errors of one record into one line (the dead-letter reason).
pub fn join(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// `[A-Za-z0-9_-]{1,64}`: safe in an MQTT topic level and a client id.
pub fn site_id(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_SITE_ID_LEN {
        return Err(format!("longer than {MAX_SITE_ID_LEN} characters"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "'{}' contains {c:?}; allowed: A-Z a-z 0-9 _ -",
            truncate(s, MAX_SITE_ID_LEN)
        ));
    }
    Ok(())
}

/// Non-empty, at most `max` characters, no control characters.
pub fn bounded_text(s: &str, max: usize) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if s.chars().count() > max {
        return Err(format!("longer than {max} characters"));
    }
    if s.chars().any(char::is_control) {
        return Err("contains control characters".into());
    }
    Ok(())
}

pub fn played_at(t: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), String> {
    if t < earliest_played_at() {
        return Err(format!(
            "{} is before 2020 (box clock not synchronised?)",
            t.to_rfc3339()
        ));
    }
    if t > now + MAX_FUTURE_SKEW {
        return Err(format!(
            "{} is more than 24 h ahead of the receiver's clock ({})",
            t.to_rfc3339(),
            now.to_rfc3339()
        ));
    }
    Ok(())
}

pub fn video_duration(d: f64) -> Result<(), String> {
    if !d.is_finite() || d < 0.0 {
        return Err(format!("must be a finite number >= 0, got {d}"));
    }
    if d > MAX_VIDEO_DURATION_S {
        return Err(format!("{d} s is longer than the {MAX_VIDEO_DURATION_S} s maximum"));
    }
    Ok(())
}

/// `duration_played` against `video_duration`; a `video_duration` of 0 means
/// "unknown" (the seed's player passes `duration() || 0`), so only the absolute
/// bound applies then.
pub fn duration_played(played: f64, video: f64) -> Result<(), String> {
    if !played.is_finite() || played < 0.0 {
        return Err(format!("must be a finite number >= 0, got {played}"));
    }
    let limit = if video > 0.0 && video.is_finite() {
        video * PLAYED_OVERRUN_FACTOR + PLAYED_SLACK_S
    } else {
        MAX_VIDEO_DURATION_S
    };
    if played > limit {
        return Err(format!(
            "{played} s is far above the video's length ({video} s; at most {limit:.1} s accepted)"
        ));
    }
    Ok(())
}

pub fn audience(a: i64) -> Result<i32, String> {
    if !(0..=MAX_AUDIENCE).contains(&a) {
        return Err(format!("must be between 0 and {MAX_AUDIENCE}, got {a}"));
    }
    i32::try_from(a).map_err(|_| format!("out of range: {a}"))
}

/// Cuts `s` to at most `max` characters for inclusion in an error message.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_ids() {
        assert!(site_id("club-42_A").is_ok());
        assert!(site_id(&"a".repeat(64)).is_ok());
        assert!(site_id(&"a".repeat(65)).is_err());
        for bad in ["", "a/b", "a+b", "a#", "é", "a b"] {
            assert!(site_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert!(duration_played(30.0, 30.0).is_ok());
        assert!(duration_played(37.9, 30.0).is_ok());
        assert!(duration_played(40.0, 30.0).is_err());
        assert!(
            duration_played(600.0, 0.0).is_ok(),
            "unknown length: only the absolute bound"
        );
        assert!(duration_played(f64::NAN, 30.0).is_err());
        assert!(duration_played(-0.1, 30.0).is_err());
        assert!(video_duration(f64::INFINITY).is_err());
        assert!(video_duration(MAX_VIDEO_DURATION_S + 1.0).is_err());
    }

    #[test]
    fn error_paths() {
        let e = FieldError::new("period", "bad").at(3);
        assert_eq!(e.to_string(), "impressions[3].period: bad");
        assert_eq!(FieldError::new("", "not an object").at(1).path(), "impressions[1]");
    }
}
