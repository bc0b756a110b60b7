//! The in-flight runs: which seqs this process claimed under which batch
//! (module doc, "In-flight rows live in memory" and "Receipts settle runs of
//! their own batch"). Pure bookkeeping, no SQLite: the writer asks here
//! where pending rows may be (the gaps between runs) and what of a receipt
//! lies in its batch, and changes the runs only after the command that
//! touched the file succeeded.

use schema::SeqRange;
use std::collections::BTreeMap;
use uuid::Uuid;

/// A run of rows claimed together (one envelope may hold several runs when
/// it skipped rows already in flight).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub first: i64,
    pub last: i64,
    pub batch_id: Uuid,
    /// Unix milliseconds of the claim.
    pub published_at: i64,
}

/// Every run in flight, keyed by its first seq; runs never overlap.
#[derive(Clone, Debug, Default)]
pub(super) struct InFlight {
    runs: BTreeMap<i64, Run>,
}

/// What a receipt for a batch in flight may settle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SettlePlan {
    /// The batch's runs, `(first, last)`, sorted.
    pub runs: Vec<(i64, i64)>,
    /// The parts of the receipt's ranges inside those runs, sorted: the
    /// only seqs the receipt may delete.
    pub hits: Vec<(i64, i64)>,
    /// Some proposed seqs lay outside the batch's runs.
    pub outside: bool,
}

impl SettlePlan {
    /// The receipt names every seq of every run of its batch.
    pub fn whole_batch(&self) -> bool {
        self.hits == self.runs
    }

    /// The receipt names every seq of the run `(first, last)`.
    pub fn settles_whole_run(&self, (first, last): (i64, i64)) -> bool {
        self.hits.iter().any(|&(a, b)| a <= first && last <= b)
    }
}

impl InFlight {
    /// Every run, in seq order.
    pub fn runs(&self) -> impl Iterator<Item = &Run> {
        self.runs.values()
    }

    /// The seq intervals not covered by an in-flight run, in order: where
    /// pending rows are.
    pub fn gaps(&self) -> Vec<(i64, i64)> {
        let mut gaps = Vec::with_capacity(self.runs.len() + 1);
        let mut from = i64::MIN;
        for (&first, run) in &self.runs {
            if first > from {
                gaps.push((from, first - 1));
            }
            from = from.max(run.last.saturating_add(1));
        }
        gaps.push((from, i64::MAX));
        gaps
    }

    /// Records the runs `(first, last)` of one claim, all under `batch_id`.
    pub fn record(&mut self, runs: impl IntoIterator<Item = (i64, i64)>, batch_id: Uuid, published_at: i64) {
        for (first, last) in runs {
            self.runs.insert(
                first,
                Run {
                    first,
                    last,
                    batch_id,
                    published_at,
                },
            );
        }
    }

    /// The runs of `batch` (of every batch when `None`), in seq order.
    pub fn of(&self, batch: Option<Uuid>) -> Vec<Run> {
        self.runs
            .values()
            .filter(|r| batch.is_none_or(|b| r.batch_id == b))
            .copied()
            .collect()
    }

    /// Forgets the run that starts at `first` (settled or requeued).
    pub fn remove(&mut self, first: i64) {
        self.runs.remove(&first);
    }

    /// What a receipt for `batch_id` proposing `proposed` may settle; `None`
    /// when the batch is not in flight (forged, late, of another process).
    pub fn settle_plan(&self, batch_id: Uuid, proposed: &[SeqRange]) -> Option<SettlePlan> {
        let runs: Vec<(i64, i64)> = self
            .runs
            .values()
            .filter(|r| r.batch_id == batch_id)
            .map(|r| (r.first, r.last))
            .collect();
        if runs.is_empty() {
            return None;
        }
        let proposed = merge_ranges(proposed.iter().map(|r| (r.first, r.last)).collect());
        let (hits, outside) = intersect(&proposed, &runs);
        Some(SettlePlan { runs, hits, outside })
    }
}

/// Sorts inclusive ranges and merges the overlapping and adjacent ones.
fn merge_ranges(mut v: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    v.retain(|(f, l)| f <= l);
    v.sort_unstable();
    v.dedup_by(|next, prev| {
        if next.0 <= prev.1.saturating_add(1) {
            prev.1 = prev.1.max(next.1);
            true
        } else {
            false
        }
    });
    v
}

/// The parts of `proposed` inside `runs` (both sorted and disjoint), and
/// whether anything of `proposed` lay outside them.
fn intersect(proposed: &[(i64, i64)], runs: &[(i64, i64)]) -> (Vec<(i64, i64)>, bool) {
    let len = |(f, l): (i64, i64)| i128::from(l) - i128::from(f) + 1;
    let mut hits = Vec::new();
    let mut outside = false;
    for &(a, b) in proposed {
        let mut covered = 0i128;
        for &(f, l) in runs {
            let (lo, hi) = (a.max(f), b.min(l));
            if lo <= hi {
                hits.push((lo, hi));
                covered += len((lo, hi));
            }
        }
        outside |= covered < len((a, b));
    }
    hits.sort_unstable();
    (hits, outside)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: i64, last: i64) -> SeqRange {
        SeqRange { first, last }
    }

    #[test]
    fn ranges_merge_when_they_overlap_or_touch_and_degenerate_ones_vanish() {
        assert_eq!(
            merge_ranges(vec![(7, 9), (1, 3), (4, 5), (2, 2), (12, 11), (20, 30), (25, 40)]),
            vec![(1, 5), (7, 9), (20, 40)]
        );
        assert_eq!(
            merge_ranges(vec![(i64::MAX, i64::MAX), (i64::MIN, i64::MAX)]),
            vec![(i64::MIN, i64::MAX)]
        );
        assert!(merge_ranges(vec![(5, 4)]).is_empty());
    }

    #[test]
    fn intersection_keeps_what_lies_in_the_runs_and_flags_the_rest() {
        let runs = [(1, 4), (9, 10)];
        assert_eq!(intersect(&[(1, 4), (9, 10)], &runs), (vec![(1, 4), (9, 10)], false));
        assert_eq!(intersect(&[(2, 3)], &runs), (vec![(2, 3)], false));
        assert_eq!(intersect(&[(3, 9)], &runs), (vec![(3, 4), (9, 9)], true));
        assert_eq!(intersect(&[(5, 8)], &runs), (vec![], true));
        // The whole seq space (a forged receipt): no overflow, everything flagged.
        assert_eq!(intersect(&[(i64::MIN, i64::MAX)], &runs), (vec![(1, 4), (9, 10)], true));
    }

    #[test]
    fn gaps_are_what_no_run_covers() {
        let mut f = InFlight::default();
        assert_eq!(f.gaps(), vec![(i64::MIN, i64::MAX)]);
        let (b1, b2) = (Uuid::now_v7(), Uuid::now_v7());
        f.record([(1, 4)], b1, 10);
        f.record([(5, 8), (11, 12)], b2, 20);
        assert_eq!(f.gaps(), vec![(i64::MIN, 0), (9, 10), (13, i64::MAX)]);
        f.remove(5);
        assert_eq!(f.gaps(), vec![(i64::MIN, 0), (5, 10), (13, i64::MAX)]);
        f.remove(1);
        f.remove(11);
        assert_eq!(f.gaps(), vec![(i64::MIN, i64::MAX)]);
    }

    #[test]
    fn runs_are_found_by_batch_and_all_together() {
        let mut f = InFlight::default();
        let (b1, b2) = (Uuid::now_v7(), Uuid::now_v7());
        f.record([(1, 4), (9, 10)], b1, 10);
        f.record([(5, 8)], b2, 20);
        let firsts = |v: Vec<Run>| v.iter().map(|r| (r.first, r.last)).collect::<Vec<_>>();
        assert_eq!(firsts(f.of(Some(b1))), vec![(1, 4), (9, 10)]);
        assert_eq!(
            f.of(Some(b2)),
            vec![Run {
                first: 5,
                last: 8,
                batch_id: b2,
                published_at: 20
            }]
        );
        assert_eq!(firsts(f.of(None)), vec![(1, 4), (5, 8), (9, 10)]);
        assert!(f.of(Some(Uuid::now_v7())).is_empty());
        assert_eq!(f.runs().count(), 3);
    }

    #[test]
    fn a_receipt_is_planned_only_within_its_own_batch() {
        let mut f = InFlight::default();
        let (b1, b2) = (Uuid::now_v7(), Uuid::now_v7());
        f.record([(1, 4), (9, 10)], b1, 10);
        f.record([(5, 8)], b2, 20);
        // A batch not in flight: nothing, whatever it proposes.
        assert_eq!(f.settle_plan(Uuid::now_v7(), &[r(i64::MIN, i64::MAX)]), None);

        // The genuine receipt, ranges in any order and split anyhow.
        let p = f.settle_plan(b1, &[r(9, 10), r(3, 4), r(1, 2)]).unwrap();
        assert_eq!(
            (p.runs.clone(), p.hits.clone(), p.outside),
            (vec![(1, 4), (9, 10)], vec![(1, 4), (9, 10)], false)
        );
        assert!(p.whole_batch());
        assert!(p.settles_whole_run((1, 4)) && p.settles_whole_run((9, 10)));

        // The whole seq space under b1's id: b1's seqs only, flagged.
        let p = f.settle_plan(b1, &[r(i64::MIN, i64::MAX)]).unwrap();
        assert_eq!((p.hits.clone(), p.outside), (vec![(1, 4), (9, 10)], true));
        assert!(p.whole_batch());

        // b2's seqs under b1's id: nothing of b2, flagged.
        let p = f.settle_plan(b1, &[r(5, 8)]).unwrap();
        assert_eq!((p.hits.clone(), p.outside), (vec![], true));
        assert!(!p.whole_batch());

        // Part of the batch: the rest stays in flight.
        let p = f.settle_plan(b1, &[r(2, 4)]).unwrap();
        assert_eq!((p.hits.clone(), p.outside), (vec![(2, 4)], false));
        assert!(!p.whole_batch());
        assert!(!p.settles_whole_run((1, 4)) && !p.settles_whole_run((9, 10)));

        // Degenerate ranges propose nothing.
        let p = f.settle_plan(b1, &[r(4, 1)]).unwrap();
        assert_eq!((p.hits.clone(), p.outside), (vec![], false));
        assert!(!p.whole_batch());
    }

    #[test]
    fn a_snapshot_restores_the_runs() {
        let mut f = InFlight::default();
        let b = Uuid::now_v7();
        f.record([(1, 4)], b, 10);
        let before = f.clone();
        f.remove(1);
        f.record([(5, 6)], Uuid::now_v7(), 20);
        f = before;
        assert_eq!(
            f.of(None),
            vec![Run {
                first: 1,
                last: 4,
                batch_id: b,
                published_at: 10
            }]
        );
        assert_eq!(f.gaps(), vec![(i64::MIN, 0), (5, i64::MAX)]);
    }
}
