//! When the background rollup fold runs: ingest first while a backlog drains.
//!
//! The ingestor folds the rollups' queues of deltas (`sponsor_rollups_fold()`,
//! see [`crate::store::fold_rollups`]) every `rollup_fold_interval_ms`. A fold
//! is derived-data maintenance: readers fold before they read, so the figures
//! they see are exact whether or not the background fold ran. The ingest
//! path is not: until a batch commits, its boxes keep the impressions in
//! their outboxes and the broker keeps them in its window. So while the MQTT
//! pipeline is *saturated* (a batch is committing and messages wait behind
//! it: a fleet draining its backlog after an outage), a fold is put off, for
//! at most `rollup_fold_defer_max_ms` since the last fold; the
//! PostgreSQL time it would take goes to the batches instead, and the deltas
//! that pile up meanwhile are merged per key before they are upserted (a
//! backlog's batches touch the same days, sites and videos again and again).
//!
//! Invariants:
//! * a fold is never put off for longer than `rollup_fold_defer_max_ms`
//!   after the previous one (0: never put off), so the queues stay bounded
//!   by that much ingest;
//! * under light or moderate load a free writer takes each batch as it is
//!   sealed, nothing waits, and the fold runs at every interval, as without
//!   this module;
//! * nothing here touches the database or the data: deferring a fold changes
//!   when the rollup tables catch up, never what they hold.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Whether the pipeline has more work than its writers take at once: a batch
/// is committing and messages wait for a writer behind it. Written by the
/// pipeline task after each event it handles, read by the fold scheduler.
#[derive(Debug, Default)]
pub struct Saturation {
    saturated: AtomicBool,
}

impl Saturation {
    /// Records the pipeline's state: `committing` batches in flight, and
    /// whether messages are waiting (an open or sealed batch) besides.
    pub fn observe(&self, committing: usize, waiting: bool) {
        self.saturated.store(committing > 0 && waiting, Ordering::Relaxed);
    }

    pub fn is_saturated(&self) -> bool {
        self.saturated.load(Ordering::Relaxed)
    }
}

/// Decides, at each fold tick, whether the fold runs now.
#[derive(Debug)]
pub struct Scheduler {
    defer_max: Duration,
    /// The last fold, or when the scheduler started (the deferral window
    /// counts from there).
    last_fold: Instant,
}

impl Scheduler {
    pub fn new(defer_max: Duration) -> Self {
        Self {
            defer_max,
            last_fold: Instant::now(),
        }
    }

    /// `true`: fold now (and the deferral window restarts from now).
    pub fn due(&mut self, pipeline: &Saturation) -> bool {
        self.decide(Instant::now(), pipeline.is_saturated())
    }

    /// [`Scheduler::due`] with the clock and the pipeline's state given.
    pub fn decide(&mut self, now: Instant, saturated: bool) -> bool {
        if saturated && now.saturating_duration_since(self.last_fold) < self.defer_max {
            return false;
        }
        self.last_fold = now;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_pipeline_that_keeps_up_folds_at_every_tick() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(5 * S);
        assert!((1..=10).all(|i| s.decide(t0 + i * S, false)));
    }

    #[test]
    fn a_saturated_pipeline_puts_the_fold_off_for_at_most_defer_max() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(5 * S);
        assert!(s.decide(t0, false));
        let folds: Vec<u32> = (1..=12).filter(|&i| s.decide(t0 + i * S, true)).collect();
        assert_eq!(folds, vec![5, 10], "one fold every defer_max while saturated");
        // The backlog is drained: the next tick folds.
        assert!(s.decide(t0 + 11 * S, false));
    }

    #[test]
    fn defer_max_zero_never_puts_a_fold_off() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::ZERO);
        assert!((1..=5).all(|i| s.decide(t0 + i * S, true)));
    }

    #[test]
    fn saturated_means_committing_with_messages_waiting() {
        let p = Saturation::default();
        assert!(!p.is_saturated(), "idle at start");
        p.observe(0, true);
        assert!(
            !p.is_saturated(),
            "waiting for the seal, no commit in flight: a writer is free"
        );
        p.observe(2, false);
        assert!(!p.is_saturated(), "committing, nothing behind");
        p.observe(3, true);
        assert!(p.is_saturated());
        p.observe(0, false);
        assert!(!p.is_saturated());
    }
}
