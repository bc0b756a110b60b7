//! When the background rollup fold runs: ingest first while a backlog drains.
//!
//! The ingestor folds the rollups' queues of deltas (`sponsor_rollups_fold()`,
//! see [`crate::store::fold_rollups`]) every `rollup_fold_interval_ms`. A fold
//! is derived-data maintenance: readers fold before they read, so the figures
//! they see are exact whether or not the background fold ran. The ingest
//! path is not: until a batch commits, its boxes keep the impressions in
//! their outboxes and the broker keeps them in its window. So while the MQTT
//! pipeline is *saturated* (a batch was committing for at least
//! [`SATURATED_BUSY_FRACTION`] of the last interval: a fleet draining its
//! backlog after an outage), a fold is put off, for
//! at most `rollup_fold_defer_max_ms` since the last fold; the
//! PostgreSQL time it would take goes to the batches instead, and the deltas
//! that pile up meanwhile are merged per key before they are upserted (a
//! backlog's batches touch the same days, sites and videos again and again).
//!
//! Invariants:
//! * a fold is never put off for longer than `rollup_fold_defer_max_ms`
//!   after the previous one (0: never put off), so the queues stay bounded
//!   by that much ingest;
//! * under light or moderate load the writers are idle most of the
//!   interval and the fold runs at every interval, as without this module;
//! * nothing here touches the database or the data: deferring a fold changes
//!   when the rollup tables catch up, never what they hold.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Busy fraction at and above which the pipeline counts as saturated.
///
/// Why a fraction of the interval, not the state at the tick: the instant a
/// tick lands says little. Draining a backlog through rumqttd, whose window
/// is 100 unacknowledged messages, the pipeline alternates a batch of 64 and
/// one of 36 and waits for the broker between them, so "messages wait behind
/// a committing batch" was false at about half the ticks, and a fold (1-2 s
/// of PostgreSQL time for a burst's 36,000 daily keys) ran inside the burst
/// anyway: measured with `neopro-sim bench` on 2026-12-07, PostgreSQL spent
/// 18.8 core-us per row in such a run instead of 12.7. Over a whole interval
/// the difference is plain: a backlog keeps a batch committing nearly all the
/// time, a fleet at its usual rate (a play every few seconds per box) a few
/// percent of it.
pub const SATURATED_BUSY_FRACTION: f64 = 0.9;

/// The recent past that is judged too, besides the whole interval: a backlog
/// that arrived in the middle of the interval leaves a low fraction at its
/// first tick, yet its writers have hardly paused since. (Measured: the
/// first tick of a burst saw 0.29-0.77 of its interval busy, and the fold it
/// let through took a second's worth of deltas into the burst. A commit
/// lasts tens of milliseconds when the database keeps up, so one commit
/// fills a small part of this window.)
pub const RECENT: Duration = Duration::from_millis(250);

/// What [`Saturation::take`] reports about the interval just ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Busy {
    /// Share of the interval with a batch committing, in `[0, 1]`.
    pub fraction: f64,
    /// Share of the last [`RECENT`] (or of the interval, if shorter).
    pub recent: f64,
}

impl Busy {
    pub fn saturated(&self) -> bool {
        self.fraction >= SATURATED_BUSY_FRACTION || self.recent >= SATURATED_BUSY_FRACTION
    }
}

/// How busy the writers have been: the time during which at least one batch
/// was committing, accumulated by the pipeline task after each event it
/// handles and taken (and reset) by the fold scheduler at each tick.
#[derive(Debug)]
pub struct Saturation {
    clock: Mutex<BusyClock>,
}

#[derive(Debug)]
struct BusyClock {
    /// Start of the current busy stretch (a batch is committing), if any.
    busy_since: Option<Instant>,
    /// Busy time accumulated since `window_start`, current stretch excluded.
    busy: Duration,
    window_start: Instant,
    /// Finished busy stretches (start, end) that overlap the last
    /// [`RECENT`]; older ones are dropped at each transition.
    recent: VecDeque<(Instant, Instant)>,
}

impl Default for Saturation {
    fn default() -> Self {
        Self {
            clock: Mutex::new(BusyClock {
                busy_since: None,
                busy: Duration::ZERO,
                window_start: Instant::now(),
                recent: VecDeque::new(),
            }),
        }
    }
}

impl Saturation {
    /// Records how many batches are committing. Reads the clock only when
    /// the pipeline goes from idle to busy or back, so calling this after
    /// every event costs an uncontended lock.
    pub fn observe(&self, committing: usize) {
        self.observe_with(committing, Instant::now);
    }

    /// [`Saturation::observe`] with the clock given (tests).
    pub fn observe_at(&self, now: Instant, committing: usize) {
        self.observe_with(committing, || now);
    }

    fn observe_with(&self, committing: usize, now: impl FnOnce() -> Instant) {
        let mut c = self.clock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if (committing > 0) != c.busy_since.is_some() {
            c.transition(now());
        }
    }

    /// The interval since the previous call (or since creation): the share
    /// of it during which a batch was committing, and that of its last
    /// [`RECENT`]; starts a new interval.
    pub fn take(&self, now: Instant) -> Busy {
        let mut c = self.clock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let share = |busy: Duration, span: Duration| {
            if span.is_zero() {
                0.0
            } else {
                (busy.as_secs_f64() / span.as_secs_f64()).min(1.0)
            }
        };
        let span = now.saturating_duration_since(c.window_start);
        let recent_from = now.checked_sub(RECENT).unwrap_or(c.window_start).max(c.window_start);
        let ongoing = c.busy_since.map(|t| (t, now));
        let recent_busy: Duration = c
            .recent
            .iter()
            .copied()
            .chain(ongoing)
            .map(|(a, b)| b.saturating_duration_since(a.max(recent_from)))
            .sum();
        let mut busy = c.busy;
        if let Some(t) = c.busy_since {
            busy += now.saturating_duration_since(t);
            c.busy_since = Some(now);
        }
        let out = Busy {
            fraction: share(busy, span),
            recent: share(recent_busy, now.saturating_duration_since(recent_from)),
        };
        c.busy = Duration::ZERO;
        c.window_start = now;
        c.recent.clear();
        out
    }
}

impl BusyClock {
    /// Idle to busy, or busy to idle, at `now`.
    fn transition(&mut self, now: Instant) {
        match self.busy_since.take() {
            None => self.busy_since = Some(now),
            Some(t) => {
                self.busy += now.saturating_duration_since(t);
                self.recent.push_back((t, now));
                while let Some(&(_, end)) = self.recent.front() {
                    if now.saturating_duration_since(end) < RECENT {
                        break;
                    }
                    self.recent.pop_front();
                }
            }
        }
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

    /// `true`: fold now (and the deferral window restarts from now). The
    /// pipeline is saturated when a batch was committing for at least
    /// [`SATURATED_BUSY_FRACTION`] of the time since the previous tick, or
    /// of its last [`RECENT`].
    pub fn due(&mut self, pipeline: &Saturation) -> bool {
        let now = Instant::now();
        let busy = pipeline.take(now);
        tracing::trace!(fraction = busy.fraction, recent = busy.recent, "fold tick");
        self.decide(now, busy.saturated())
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

    /// Feeds `p` the commits in flight at each `(milliseconds after t0, count)`.
    fn timeline(p: &Saturation, t0: Instant, steps: &[(u64, usize)]) {
        for &(ms, in_flight) in steps {
            p.observe_at(t0 + Duration::from_millis(ms), in_flight);
        }
    }

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
    fn busy_is_the_share_of_the_interval_with_a_commit_in_flight() {
        let p = Saturation::default();
        let t0 = Instant::now();
        assert_eq!(p.take(t0).fraction, 0.0, "a new interval");
        let ms = Duration::from_millis;
        // Light load: two commits of 20 ms in a second.
        timeline(&p, t0, &[(100, 1), (110, 1), (120, 0), (800, 2), (820, 0)]);
        let light = p.take(t0 + ms(1000));
        assert!((light.fraction - 0.04).abs() < 1e-9, "{light:?}");
        assert!(
            (light.recent - 0.08).abs() < 1e-9,
            "one commit in the last 250 ms: {light:?}"
        );
        assert!(!light.saturated());
        // A backlog: committing all along but for two short gaps (the
        // pipeline waiting for the broker between two batches).
        timeline(&p, t0, &[(1000, 1), (1400, 0), (1420, 1), (1800, 0), (1830, 2)]);
        let backlog = p.take(t0 + ms(2000));
        assert!((backlog.fraction - 0.95).abs() < 1e-9, "{backlog:?}");
        assert!((backlog.recent - 0.88).abs() < 1e-9, "{backlog:?}");
        assert!(backlog.saturated());
        // The stretch still running at the tick counts in the next interval.
        let next = p.take(t0 + ms(2500));
        assert!(
            (next.fraction - 1.0).abs() < 1e-9 && (next.recent - 1.0).abs() < 1e-9,
            "{next:?}"
        );
        p.observe_at(t0 + ms(2500), 0);
        let idle = p.take(t0 + ms(3000));
        assert_eq!((idle.fraction, idle.recent), (0.0, 0.0), "idle");
    }

    #[test]
    fn a_backlog_arriving_mid_interval_is_saturated_by_its_recent_share() {
        let p = Saturation::default();
        let t0 = Instant::now();
        p.take(t0);
        let ms = Duration::from_millis;
        // Busy from 600 ms on, with the short pauses of a broker's window.
        timeline(
            &p,
            t0,
            &[(600, 1), (700, 0), (705, 1), (800, 0), (805, 1), (900, 0), (905, 1)],
        );
        let b = p.take(t0 + ms(1000));
        assert!((b.fraction - 0.385).abs() < 1e-9, "{b:?}");
        assert!((b.recent - 0.96).abs() < 1e-9, "{b:?}");
        assert!(b.saturated(), "busy but for short pauses since it arrived");
        // A lone commit of 200 ms does not count.
        p.observe_at(t0 + ms(1000), 0);
        p.take(t0 + ms(2000));
        p.observe_at(t0 + ms(2800), 1);
        assert!(!p.take(t0 + ms(3000)).saturated());
    }
}
