//! The services' own benchmarks, one module per service, each the same
//! measurement (flags and output lines) its service's binary once carried:
//! benchmarks belong beside the simulator, which already depends on every
//! service crate, so that the production crates hold production code only.
//!
//! * [`edge`]: `neopro-sim bench-edge`, the `neopro-edge` binary's POST
//!   throughput, drain rate, RSS and size, against the seed's JSON file;
//! * [`broker`]: `neopro-sim bench-broker`, QoS 1 messages/s through the
//!   embedded broker and through Mosquitto;
//! * [`ingestor`]: `neopro-sim bench-ingestor`, rows/s through the ingestor
//!   against a raw `COPY`, and its commit latency;
//! * [`analytics`]: `neopro-sim bench-analytics`, the stats API, the
//!   playout export and the rollup fold on a realistic year.
//!
//! The whole chain's benchmark is [`crate::bench`] (`neopro-sim bench`).

pub mod analytics;
pub mod broker;
pub mod edge;
pub mod ingestor;
