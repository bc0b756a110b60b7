//! # `analytics`: the read side sponsors are billed from
//!
//! `neopro-analytics` serves, from the database the ingestor fills:
//! * the sponsor catalogue (sponsors, video attribution rules, bulk import),
//! * the stats API (`/api/analytics/sponsors/:id/stats`) answered from
//!   trigger-maintained rollups, exact when plays arrive late,
//! * exports: stats CSV, a PDF report, and the per-play playout log streamed
//!   in constant memory,
//! * the dashboard page (`/sponsors/:id/analytics`) with its embedded chart
//!   library.
//!
//! One job per module: [`settings`] (config), [`auth`] (bearer tokens),
//! [`catalogue`] (sponsors and rules), [`stats`] (the figures), [`export`]
//! (CSV, playouts), [`pdf`] (the report), [`dashboard`] (page and assets),
//! [`app`] (routes and serving). Its benchmark, measuring all that on a
//! realistic year, is `neopro-sim bench-analytics` (the simulator crate).

pub mod app;
pub mod auth;
pub mod catalogue;
pub mod dashboard;
pub mod error;
pub mod export;
pub mod pdf;
pub mod settings;
pub mod stats;

pub use app::App;
pub use settings::Settings;
