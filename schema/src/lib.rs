//! # `schema`: the NeoPro impression contract
//!
//! Types, validation, MQTT topics and payloads, and the SQL migrations that
//! every other crate agrees on. **This crate does no I/O**: no sockets, no
//! files, no database. It can be read, tested and fuzzed on its own, and a
//! change to it is a change to the contract between the boxes and the centre.
//!
//! ## The impression (seed field names, unchanged)
//!
//! ```json
//! {"impression_id":"0193c1de-5d00-7a3c-9b1e-4f0e8d2c6a11","site_id":"club-42","seq":101,
//!  "video_filename":"sponsor_coca_cola_30s.mp4","played_at":"2025-12-14T21:30:00Z",
//!  "duration_played":30.0,"video_duration":30.0,"completed":true,
//!  "event_type":"match","period":"halftime","trigger_type":"auto","audience_estimate":150}
//! ```
//!
//! `impression_id` and `seq` are ours; everything else is the seed's. See
//! [`impression`] for the record, [`validate`] for the bounds, [`ids`] for how
//! ids are derived, [`body`] for the seed's HTTP bodies and [`mqtt`] for the
//! envelope (edge → ingestor), the receipt (ingestor → edge) and the status.
//!
//! ## Migrations
//!
//! `schema/migrations/*.sql` is the database schema, embedded by the binaries
//! that own a database connection (`runtime::db::MIGRATOR`).

pub mod body;
pub mod ids;
pub mod impression;
pub mod mqtt;
pub mod validate;

pub use body::{parse_body, parse_body_value, BodyShape, ParsedBody};
pub use ids::derive_impression_id;
pub use impression::{parse_impression, parse_timestamp, EventType, Impression, ParseContext, Period, TriggerType};
pub use mqtt::{
    decode_envelope, encode_envelope_from_bodies, BatchEnvelope, DecodedBatch, EnvelopeError, Receipt,
    ReceiptRejection, RejectedEnvelope, RejectedImpression, SeqRange, SiteStatus, TopicKind, Topics, PAYLOAD_VERSION,
};
pub use validate::FieldError;
