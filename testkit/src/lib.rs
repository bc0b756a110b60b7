//! # `testkit`: test doubles that speak the real protocols
//!
//! A service's tests (and the simulator's benchmarks) sometimes need the
//! party on the other side of the wire without running it: an edge's tests
//! need receipts without PostgreSQL. What stands in here is a genuine
//! protocol peer (a real MQTT client on a real broker, the schema's own
//! encoders and decoders), never a mock of the database or the broker.
//!
//! This crate depends only on `schema`, `runtime` and third-party crates,
//! never on a service crate, so that any service may dev-depend on it.
//!
//! * [`receipt_peer`]: plays the ingestor's part for edges (envelopes in,
//!   receipts out, an in-memory "database").

pub mod receipt_peer;

pub use receipt_peer::ReceiptPeer;
