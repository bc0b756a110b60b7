//! The writers: each sealed batch is committed by a task of its own, with a
//! database connection of its own, and comes back as a
//! [`super::machine::Committed`] with its receipts.
//!
//! Why a task per batch: up to `writers` transactions run at once, and the
//! subscriber goes on reading and decoding messages while they do.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use schema::Topics;
use sqlx::PgPool;
use tokio::sync::mpsc;

use super::machine::{Batch, Committed};
use crate::decode::{self, Decoded};
use crate::settings::Settings;
use crate::{store, Health};

/// What a writer needs; [`Writers::spawn`] starts one for a batch.
pub struct Writers {
    pub settings: Arc<Settings>,
    pub topics: Topics,
    pub pool: PgPool,
    pub health: Arc<Health>,
    pub done: mpsc::UnboundedSender<Committed>,
}

impl Writers {
    /// Commits `batch` in a task of its own (retrying until it commits),
    /// then sends back its messages' numbers and its receipts.
    pub fn spawn(&self, batch: Batch<Decoded>) {
        let pool = self.pool.clone();
        let topics = self.topics.clone();
        let health = self.health.clone();
        let settings = self.settings.clone();
        let done = self.done.clone();
        tokio::spawn(async move {
            let Batch { mut msgs, msg_nos, .. } = batch;
            let set = decode::build_set(&mut msgs);
            let outcome = commit_with_retry(&pool, &set, &health, &settings).await;
            let receipts = decode::receipts(&topics, &msgs, &set, &outcome, Utc::now())
                .into_iter()
                .map(|(t, r)| (t, r.encode()))
                .collect();
            let _ = done.send(Committed { msg_nos, receipts });
        });
    }
}

/// Commits a write set, retrying transient errors with backoff forever
/// (nothing is acked meanwhile, so nothing is lost if the process dies).
pub async fn commit_with_retry(
    pool: &PgPool,
    set: &store::WriteSet,
    health: &Health,
    settings: &Settings,
) -> store::WriteOutcome {
    let mut backoff = runtime::backoff(
        Duration::from_millis(settings.retry_min_ms),
        Duration::from_millis(settings.retry_max_ms),
    );
    let mut attempt = 0u32;
    loop {
        let t0 = Instant::now();
        match store::write(pool, set, settings.insert_method).await {
            Ok(out) => {
                health.db.store(true, Ordering::Relaxed);
                let took = t0.elapsed();
                metrics::histogram!("ingestor_commit_seconds").record(took.as_secs_f64());
                metrics::histogram!("ingestor_batch_messages")
                    .record(set.rows.iter().map(|r| r.origin).max().map_or(0, |m| m + 1) as f64);
                if let Ok(mut h) = commit_latency().lock() {
                    let _ = h.record(took.as_micros().max(1) as u64);
                }
                metrics::histogram!("ingestor_batch_rows").record(set.rows.len() as f64);
                let inserted = out.inserted();
                metrics::counter!("ingestor_impressions_inserted_total").increment(inserted as u64);
                metrics::counter!("ingestor_impressions_duplicate_total")
                    .increment((set.rows.len() - inserted - out.refused.len()) as u64);
                for d in &set.dead {
                    if d.reason_code == "invalid_impression" {
                        metrics::counter!("ingestor_rejected_total", "reason" => "invalid_impression").increment(1);
                    }
                }
                if !out.refused.is_empty() {
                    metrics::counter!("ingestor_rejected_total", "reason" => "db_error")
                        .increment(out.refused.len() as u64);
                }
                if attempt > 0 {
                    tracing::info!(attempt, "database write succeeded after retries");
                }
                return out;
            }
            Err(e) => {
                attempt += 1;
                let class = runtime::db::classify(&e);
                health.db.store(false, Ordering::Relaxed);
                metrics::counter!("ingestor_db_errors_total", "class" => if class == runtime::db::ErrorClass::Transient { "transient" } else { "permanent" }).increment(1);
                let delay = backoff.next().unwrap_or(Duration::from_secs(1));
                if class == runtime::db::ErrorClass::Transient {
                    tracing::warn!(error = %e, attempt, ?delay, "transient database error; retrying the batch");
                } else {
                    // Only reachable if storing a dead letter itself failed for good.
                    tracing::error!(error = %e, attempt, ?delay, "database error while dead-lettering; retrying (nothing is acked)");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Commit latencies (microseconds) of MQTT batches since start, for the
/// benchmark command (Prometheus has the same as `ingestor_commit_seconds`).
pub fn commit_latency() -> &'static std::sync::Mutex<hdrhistogram::Histogram<u64>> {
    static H: std::sync::OnceLock<std::sync::Mutex<hdrhistogram::Histogram<u64>>> = std::sync::OnceLock::new();
    H.get_or_init(|| {
        std::sync::Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid"),
        )
    })
}
