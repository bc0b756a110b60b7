//! PostgreSQL's binary `COPY` format for `sponsor_impressions` rows and the
//! daily rollup's queue `sponsor_daily_pending`.
//!
//! Why binary: PostgreSQL then reads uuids, timestamps, floats and integers
//! as fixed-width big-endian values instead of parsing their text, which is
//! a good part of what a `COPY` costs the server (measured with psql on this
//! machine, 200,000 rows: binary 1.63 s, text 1.87 s). The server's CPU is
//! what the ingestor shares with every other writer, so it is what we save.
//!
//! ## Format (PostgreSQL docs, "COPY ... Binary Format")
//! ```text
//! header   "PGCOPY\n\xff\r\n\0" | flags i32 = 0 | extension length i32 = 0
//! tuple    field count i16 (= COPY_COLUMNS.len()) then per field:
//!            length i32 (-1 = NULL) | the value in the type's binary send format
//! trailer  i16 = -1
//! ```
//! All integers are big-endian. Values used here:
//! `uuid` 16 bytes; `text` its UTF-8 bytes; `int8`/`int4` two's complement;
//! `float8` IEEE 754 bits; `bool` one byte; `timestamptz` microseconds since
//! 2000-01-01 00:00:00 UTC as i64; `date` days since 2000-01-01 as i32.
//!
//! Two streams are written this way: the impressions ([`CopyBuffer::push`])
//! and the daily rollup's queue of deltas ([`CopyBuffer::push_daily`]).
//!
//! Invariant: the column order of [`COPY_COLUMNS`] and of [`CopyBuffer::push`]
//! are the same; a test round-trips rows through PostgreSQL and compares them
//! field by field (`tests/mqtt.rs` and the simulator's exactness checks read
//! back what was written this way).

use schema::Impression;
use uuid::Uuid;

/// The columns of `sponsor_impressions` written, in order.
pub const COPY_COLUMNS: &str = "impression_id, site_id, seq, video_id, video_filename, played_at, \
     duration_played, video_duration, completed, event_type, period, trigger_type, audience_estimate, batch_id";

/// `COPY sponsor_impressions (...) FROM STDIN (FORMAT binary)`.
pub fn copy_statement() -> String {
    format!("COPY sponsor_impressions ({COPY_COLUMNS}) FROM STDIN (FORMAT binary)")
}

const FIELDS: i16 = 14;

/// The columns of the daily rollup's queue `sponsor_daily_pending` written
/// by [`CopyBuffer::push_daily`], in order.
pub const DAILY_PENDING_COLUMNS: &str = "day, site_id, video_filename, video_id, period, event_type, \
     impressions, seconds_played, completed_count, audience_sum";

/// `COPY sponsor_daily_pending (...) FROM STDIN (FORMAT binary)`.
pub fn daily_pending_statement() -> String {
    format!("COPY sponsor_daily_pending ({DAILY_PENDING_COLUMNS}) FROM STDIN (FORMAT binary)")
}

const DAILY_FIELDS: i16 = 10;

/// 2000-01-01 (PostgreSQL's epoch for `date`: days since it, as i32).
const PG_EPOCH_DATE: chrono::NaiveDate = match chrono::NaiveDate::from_ymd_opt(2000, 1, 1) {
    Some(d) => d,
    None => panic!("2000-01-01 is a date"),
};

/// One queued aggregate of the daily rollup: the key, then the sums.
#[derive(Clone, Copy, Debug)]
pub struct DailyDelta<'a> {
    pub day: chrono::NaiveDate,
    pub site_id: &'a str,
    pub video_filename: &'a str,
    pub video_id: &'a str,
    pub period: &'a str,
    pub event_type: &'a str,
    pub impressions: i64,
    pub seconds_played: f64,
    pub completed_count: i64,
    pub audience_sum: i64,
}
/// Bytes of the stream header (signature, flags, extension length): what a
/// caller skips to append the rows of another buffer to an open stream.
pub const HEADER_LEN: usize = 19;
/// Bytes of the trailer.
pub const TRAILER_LEN: usize = 2;
/// 2000-01-01T00:00:00Z in Unix microseconds (PostgreSQL's epoch).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// One binary COPY stream being built: header on creation, trailer on
/// [`CopyBuffer::finish`].
pub struct CopyBuffer {
    buf: Vec<u8>,
    rows: usize,
}

impl CopyBuffer {
    /// A stream sized for about `rows` rows.
    pub fn with_rows(rows: usize) -> Self {
        let mut buf = Vec::with_capacity(rows * 190 + 32);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&0i32.to_be_bytes());
        Self { buf, rows: 0 }
    }

    fn field(&mut self, bytes: &[u8]) {
        // Field lengths are bounded by validation (ids, names ≤ a few hundred bytes).
        self.buf
            .extend_from_slice(&i32::try_from(bytes.len()).unwrap_or(i32::MAX).to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }

    fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    /// Appends one row.
    pub fn push(&mut self, imp: &Impression, batch_id: Option<Uuid>) {
        self.buf.extend_from_slice(&FIELDS.to_be_bytes());
        self.field(imp.impression_id.as_bytes());
        self.field(imp.site_id.as_bytes());
        match imp.seq {
            Some(s) => self.field(&s.to_be_bytes()),
            None => self.null(),
        }
        match &imp.video_id {
            Some(v) => self.field(v.as_bytes()),
            None => self.null(),
        }
        self.field(imp.video_filename.as_bytes());
        self.field(&(imp.played_at.timestamp_micros() - PG_EPOCH_UNIX_MICROS).to_be_bytes());
        self.field(&imp.duration_played.to_bits().to_be_bytes());
        self.field(&imp.video_duration.to_bits().to_be_bytes());
        self.field(&[u8::from(imp.completed)]);
        self.field(imp.event_type.as_str().as_bytes());
        self.field(imp.period.as_str().as_bytes());
        self.field(imp.trigger_type.as_str().as_bytes());
        match imp.audience_estimate {
            Some(a) => self.field(&a.to_be_bytes()),
            None => self.null(),
        }
        match batch_id {
            Some(b) => self.field(b.as_bytes()),
            None => self.null(),
        }
        self.rows += 1;
    }

    /// Appends one row of `sponsor_daily_pending` (a stream of those rows
    /// only: see [`daily_pending_statement`]).
    pub fn push_daily(&mut self, d: &DailyDelta<'_>) {
        self.buf.extend_from_slice(&DAILY_FIELDS.to_be_bytes());
        let days = i32::try_from(d.day.signed_duration_since(PG_EPOCH_DATE).num_days()).unwrap_or(i32::MAX);
        self.field(&days.to_be_bytes());
        self.field(d.site_id.as_bytes());
        self.field(d.video_filename.as_bytes());
        self.field(d.video_id.as_bytes());
        self.field(d.period.as_bytes());
        self.field(d.event_type.as_bytes());
        self.field(&d.impressions.to_be_bytes());
        self.field(&d.seconds_played.to_bits().to_be_bytes());
        self.field(&d.completed_count.to_be_bytes());
        self.field(&d.audience_sum.to_be_bytes());
        self.rows += 1;
    }

    /// Rows appended so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The complete stream (header, rows, trailer).
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn header_row_and_trailer_layout() {
        let imp = Impression {
            impression_id: Uuid::from_u128(1),
            site_id: "club-1".into(),
            seq: Some(7),
            video_id: None,
            video_filename: "a.mp4".into(),
            played_at: chrono::Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 1).unwrap(),
            duration_played: 1.5,
            video_duration: 30.0,
            completed: false,
            event_type: schema::EventType::Match,
            period: schema::Period::Loop,
            trigger_type: schema::TriggerType::Auto,
            audience_estimate: None,
        };
        let mut c = CopyBuffer::with_rows(1);
        c.push(&imp, None);
        assert_eq!(c.rows(), 1);
        let b = c.finish();
        assert_eq!(&b[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(&b[HEADER_LEN..HEADER_LEN + 2], &14i16.to_be_bytes());
        // uuid: length 16 then the bytes.
        assert_eq!(&b[21..25], &16i32.to_be_bytes());
        assert_eq!(&b[25..41], Uuid::from_u128(1).as_bytes());
        // played_at one second after PostgreSQL's epoch.
        let ts = 1_000_000i64.to_be_bytes();
        assert!(b.windows(12).any(|w| w[..4] == 8i32.to_be_bytes() && w[4..] == ts));
        assert_eq!(&b[b.len() - 2..], &(-1i16).to_be_bytes());
        // Two NULLs (audience, batch) just before the trailer.
        assert_eq!(&b[b.len() - 10..b.len() - 2], &[0xff; 8]);
    }

    #[test]
    fn daily_delta_layout() {
        let mut c = CopyBuffer::with_rows(1);
        c.push_daily(&DailyDelta {
            day: chrono::NaiveDate::from_ymd_opt(2000, 1, 3).unwrap(),
            site_id: "s",
            video_filename: "f.mp4",
            video_id: "",
            period: "loop",
            event_type: "match",
            impressions: 2,
            seconds_played: 1.5,
            completed_count: 1,
            audience_sum: 7,
        });
        assert_eq!(c.rows(), 1);
        let b = c.finish();
        let row = &b[HEADER_LEN..b.len() - TRAILER_LEN];
        let mut want = Vec::new();
        want.extend_from_slice(&10i16.to_be_bytes());
        for f in [
            &2i32.to_be_bytes()[..],
            b"s",
            b"f.mp4",
            b"",
            b"loop",
            b"match",
            &2i64.to_be_bytes(),
            &1.5f64.to_bits().to_be_bytes(),
            &1i64.to_be_bytes(),
            &7i64.to_be_bytes(),
        ] {
            want.extend_from_slice(&(f.len() as i32).to_be_bytes());
            want.extend_from_slice(f);
        }
        assert_eq!(
            row,
            &want[..],
            "two days after PostgreSQL's epoch, then the key and the sums"
        );
    }
}
