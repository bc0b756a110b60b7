//! # `simulator`: the whole NeoPro chain, runnable, measurable, proven under faults
//!
//! * [`catalogue`] and [`plays`]: a seeded, realistic fleet of club TV boxes.
//! * [`pg`]: the bench/demo database, the raw COPY baseline, the per-sponsor
//!   summary and the exactly-once check, all read back from PostgreSQL.
pub mod catalogue;
pub mod pg;
pub mod plays;
