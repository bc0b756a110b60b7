//! The seeded play generator: what a fleet of club TV boxes really plays.
//!
//! Why realistic rather than uniform random rows: the demo's summary is read
//! by people who know what a club's week looks like, and the pipeline must be
//! exercised with the shapes production sends (bursty halftimes, long quiet
//! loops, a late play cut short when the match resumes, boxes that never
//! estimate their audience).
//!
//! ## The model, per site and per day (days walk back from `end`)
//! * **Match days** (weekends, sometimes Wednesday; now and then a
//!   tournament): sponsor videos before kick-off (`pre_match`, 45 min), at
//!   `halftime` (15 min, more manual triggers from the remote) and after the
//!   final whistle (`post_match`, 30 min). Audience estimates scale with the
//!   club's capacity.
//! * **Training evenings** (Tuesday/Thursday): a `loop` with event `training`.
//! * **Clubhouse loops** most days: `loop` with event `other`, small or
//!   unknown audience.
//! * Within a block videos play back to back (skewed popularity, see
//!   [`crate::catalogue`]); about 6 % of plays are stopped early
//!   (`completed = false`, `duration_played < video_duration`), and the last
//!   play of a block is cut when the block ends (halftime is over).
//!
//! ## Determinism
//! Site `i` draws from `ChaCha8Rng::seed_from_u64(seed)` on stream `i`, so the
//! plays of a site depend only on (seed, site index, plays per site, end day),
//! not on how many other sites are simulated. Times have millisecond
//! precision (the seed's `toISOString()`), ids come from
//! [`schema::derive_impression_id`], and each site's plays are strictly
//! increasing in time, so ids are unique.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc, Weekday};
use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schema::{derive_impression_id, EventType, Impression, Period, TriggerType};

use crate::catalogue::Catalogue;

/// The default seed: fixed, so `neopro-sim demo` plays the same every time.
pub const DEFAULT_SEED: u64 = 20_251_214;

/// Plays per box in `neopro-sim demo`: about a week of a club's plays (a
/// clubhouse loop most days is 100-300 plays, a training evening about 240,
/// a match 150-200). Plays are the newest before the end day (today), so
/// with a day's worth (200) a demo run on a weekday showed nothing but loops;
/// a week always holds the last weekend's matches and their pre-match,
/// halftime and post-match periods.
pub const DEMO_PLAYS_PER_SITE: usize = 1_500;

/// What to generate.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    pub sites: usize,
    pub plays_per_site: usize,
    pub seed: u64,
    /// Plays end before this UTC day starts (default: today), so none is in
    /// the future.
    pub end_day: NaiveDate,
    /// Site ids are `{prefix}-{index:05}` (index from 1).
    pub site_prefix: String,
}

impl FleetSpec {
    pub fn new(sites: usize, plays_per_site: usize, seed: u64) -> Self {
        Self {
            sites,
            plays_per_site,
            seed,
            end_day: Utc::now().date_naive(),
            site_prefix: "club".into(),
        }
    }

    pub fn site_id(&self, index: usize) -> String {
        format!("{}-{:05}", self.site_prefix, index + 1)
    }
}

/// One simulated club and what its box played, oldest first.
#[derive(Clone, Debug)]
pub struct SitePlays {
    pub site_id: String,
    pub name: String,
    pub plays: Vec<Impression>,
}

const CLUB_KINDS: &[&str] = &["US", "FC", "AS", "Stade", "Olympique", "RC", "ES", "JS"];
const TOWNS: &[&str] = &[
    "Lyon-Est",
    "Villeurbanne",
    "Bron",
    "Vénissieux",
    "Caluire",
    "Écully",
    "Tassin",
    "Oullins",
    "Meyzieu",
    "Décines",
    "Rillieux",
    "Vaulx-en-Velin",
    "Saint-Priest",
    "Givors",
    "Mions",
    "Genas",
];

/// Generates every site's plays.
pub fn generate(spec: &FleetSpec, catalogue: &Catalogue) -> Vec<SitePlays> {
    (0..spec.sites).map(|i| generate_site(spec, catalogue, i)).collect()
}

/// Generates the plays of site `index` alone (same result as in [`generate`]).
pub fn generate_site(spec: &FleetSpec, catalogue: &Catalogue, index: usize) -> SitePlays {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    rng.set_stream(index as u64);
    let site_id = spec.site_id(index);
    let name = format!(
        "{} {}",
        CLUB_KINDS[rng.random_range(0..CLUB_KINDS.len())],
        TOWNS[rng.random_range(0..TOWNS.len())]
    );
    let profile = SiteProfile {
        capacity: rng.random_range(80..2_500),
        estimates_audience: rng.random_bool(0.9),
        match_prob: rng.random_range(0.35..0.8),
        trains: rng.random_bool(0.85),
    };
    let weights =
        WeightedIndex::new(catalogue.videos.iter().map(|v| v.weight)).expect("catalogue weights are positive");

    let mut days: Vec<Vec<Play>> = Vec::new();
    let mut total = 0usize;
    let mut day = spec.end_day;
    // Days walk back from the day before `end_day`; a bounded walk (no
    // infinite loop if a profile ever produced empty days).
    let max_days = 20 * 365;
    for _ in 0..max_days {
        if total >= spec.plays_per_site {
            break;
        }
        day = day.pred_opt().expect("date in range");
        let plays = day_plays(&mut rng, &profile, catalogue, &weights, day);
        total += plays.len();
        days.push(plays);
    }
    // Oldest first; drop the oldest surplus so exactly `plays_per_site` remain.
    let mut flat: Vec<Play> = days.into_iter().rev().flatten().collect();
    let surplus = flat.len().saturating_sub(spec.plays_per_site);
    flat.drain(..surplus);
    let plays = flat
        .into_iter()
        .map(|p| {
            let video = &catalogue.videos[p.video];
            Impression {
                impression_id: derive_impression_id(&site_id, &video.filename, p.played_at),
                site_id: site_id.clone(),
                seq: None,
                video_id: None,
                video_filename: video.filename.clone(),
                played_at: p.played_at,
                duration_played: p.duration_played,
                video_duration: video.duration_s,
                completed: p.completed,
                event_type: p.event_type,
                period: p.period,
                trigger_type: p.trigger_type,
                audience_estimate: p.audience,
            }
        })
        .collect();
    SitePlays { site_id, name, plays }
}

struct SiteProfile {
    capacity: u32,
    estimates_audience: bool,
    match_prob: f64,
    trains: bool,
}

struct Play {
    video: usize,
    played_at: DateTime<Utc>,
    duration_played: f64,
    completed: bool,
    event_type: EventType,
    period: Period,
    trigger_type: TriggerType,
    audience: Option<i32>,
}

/// One block of back-to-back plays.
struct Block {
    start_min: u32,
    len_min: u32,
    event_type: EventType,
    period: Period,
    /// Typical audience during the block (before per-play noise).
    audience: f64,
    manual_prob: f64,
}

fn day_plays(
    rng: &mut ChaCha8Rng,
    p: &SiteProfile,
    catalogue: &Catalogue,
    weights: &WeightedIndex<f64>,
    day: NaiveDate,
) -> Vec<Play> {
    let cap = f64::from(p.capacity);
    let mut blocks = Vec::new();
    let weekend = matches!(day.weekday(), Weekday::Sat | Weekday::Sun);
    let is_match =
        (weekend && rng.random_bool(p.match_prob)) || (day.weekday() == Weekday::Wed && rng.random_bool(0.15));
    if is_match {
        let event = if day.weekday() == Weekday::Sun && rng.random_bool(0.08) {
            EventType::Tournament
        } else {
            EventType::Match
        };
        let kickoff = [14 * 60, 15 * 60, 16 * 60, 18 * 60, 20 * 60][rng.random_range(0..5)];
        let crowd = cap * rng.random_range(0.4..1.0);
        blocks.push(Block {
            start_min: kickoff - 45,
            len_min: 45,
            event_type: event,
            period: Period::PreMatch,
            audience: crowd * 0.6,
            manual_prob: 0.02,
        });
        blocks.push(Block {
            start_min: kickoff + 45,
            len_min: 15,
            event_type: event,
            period: Period::Halftime,
            audience: crowd,
            manual_prob: 0.10,
        });
        blocks.push(Block {
            start_min: kickoff + 105,
            len_min: 30,
            event_type: event,
            period: Period::PostMatch,
            audience: crowd * 0.5,
            manual_prob: 0.03,
        });
    } else if p.trains && matches!(day.weekday(), Weekday::Tue | Weekday::Thu) && rng.random_bool(0.8) {
        blocks.push(Block {
            start_min: 18 * 60,
            len_min: 120,
            event_type: EventType::Training,
            period: Period::Loop,
            audience: rng.random_range(10.0..45.0),
            manual_prob: 0.03,
        });
    }
    if rng.random_bool(0.7) {
        // The clubhouse loop, late morning.
        blocks.push(Block {
            start_min: 10 * 60 + rng.random_range(0..60),
            len_min: rng.random_range(60..150),
            event_type: EventType::Other,
            period: Period::Loop,
            audience: rng.random_range(5.0..60.0),
            manual_prob: 0.02,
        });
    }
    blocks.sort_by_key(|b| b.start_min);

    let midnight = Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).expect("valid time"));
    let mut out = Vec::new();
    let mut not_before = midnight;
    for b in blocks {
        let start = (midnight + Duration::minutes(i64::from(b.start_min))).max(not_before);
        let end = midnight + Duration::minutes(i64::from(b.start_min + b.len_min));
        let mut t = start + Duration::milliseconds(rng.random_range(0..5_000));
        while t < end {
            let vi = weights.sample(rng);
            let len = catalogue.videos[vi].duration_s;
            let remaining = (end - t).num_milliseconds() as f64 / 1000.0;
            let (played, completed) = if rng.random_bool(0.06) {
                // Stopped early (remote, power, a goal celebration…).
                (ms(rng.random_range(1.0..(len - 0.5))), false)
            } else if remaining < len {
                // The block ends mid-video: the match resumes.
                (ms(remaining.max(0.5)), false)
            } else {
                // Elapsed wall time includes a little decoder latency.
                (ms(len + rng.random_range(0.0..0.3)), true)
            };
            let manual = rng.random_bool(b.manual_prob);
            let audience = p
                .estimates_audience
                .then(|| (b.audience * rng.random_range(0.9..1.1)).round().max(0.0) as i32);
            out.push(Play {
                video: vi,
                played_at: t,
                duration_played: played,
                completed,
                event_type: b.event_type,
                period: b.period,
                trigger_type: if manual { TriggerType::Manual } else { TriggerType::Auto },
                audience,
            });
            let gap_ms = rng.random_range(300..2_000);
            t += Duration::milliseconds((played * 1000.0) as i64 + gap_ms);
        }
        not_before = t;
    }
    out
}

/// Rounds to milliseconds (what a JavaScript player reports).
fn ms(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn spec(sites: usize, plays: usize, seed: u64) -> FleetSpec {
        FleetSpec {
            sites,
            plays_per_site: plays,
            seed,
            end_day: NaiveDate::from_ymd_opt(2025, 12, 15).unwrap(),
            site_prefix: "club".into(),
        }
    }

    #[test]
    fn same_seed_same_plays() {
        let c = Catalogue::standard();
        let a = generate(&spec(5, 300, 7), &c);
        let b = generate(&spec(5, 300, 7), &c);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.site_id, y.site_id);
            assert_eq!(x.plays, y.plays);
        }
        let other = generate(&spec(5, 300, 8), &c);
        assert_ne!(a[0].plays, other[0].plays, "another seed, other plays");
    }

    #[test]
    fn a_site_does_not_depend_on_fleet_size() {
        let c = Catalogue::standard();
        let small = generate(&spec(2, 100, 1), &c);
        let big = generate(&spec(10, 100, 1), &c);
        assert_eq!(small[1].plays, big[1].plays);
    }

    #[test]
    fn plays_are_valid_unique_ordered_and_varied() {
        let c = Catalogue::standard();
        let s = spec(20, 500, DEFAULT_SEED);
        let sites = generate(&s, &c);
        let now = Utc.with_ymd_and_hms(2025, 12, 15, 0, 0, 0).unwrap();
        let mut ids = HashSet::new();
        let (mut incomplete, mut manual, mut no_audience) = (0, 0, 0);
        let mut periods = HashSet::new();
        let mut events = HashSet::new();
        for site in &sites {
            assert_eq!(site.plays.len(), 500);
            for w in site.plays.windows(2) {
                assert!(w[0].played_at < w[1].played_at, "strictly increasing per site");
            }
            for p in &site.plays {
                p.validate(now).unwrap();
                assert!(p.played_at < now, "nothing in the future");
                assert!(ids.insert((p.site_id.clone(), p.impression_id)));
                assert_eq!(
                    p.impression_id,
                    derive_impression_id(&p.site_id, &p.video_filename, p.played_at)
                );
                if !p.completed {
                    incomplete += 1;
                    assert!(p.duration_played < p.video_duration);
                }
                manual += usize::from(p.trigger_type == TriggerType::Manual);
                no_audience += usize::from(p.audience_estimate.is_none());
                periods.insert(p.period);
                events.insert(p.event_type);
            }
        }
        let n = 20 * 500;
        assert!(incomplete > n / 50 && incomplete < n / 5, "incomplete {incomplete}");
        assert!(manual > 0 && manual < n / 10, "manual {manual}");
        assert!(no_audience > 0, "some boxes never estimate");
        assert_eq!(periods.len(), 4, "{periods:?}");
        assert!(events.contains(&EventType::Match) && events.contains(&EventType::Training));
    }

    /// The demo's summary shows every period and the club's kinds of events
    /// whatever the weekday it runs on (plays end before `end_day`).
    #[test]
    fn the_demo_fleet_shows_matches_and_trainings_on_any_weekday() {
        let c = Catalogue::standard();
        let monday = NaiveDate::from_ymd_opt(2026, 11, 30).unwrap();
        for offset in 0..7 {
            let end_day = monday + Duration::days(offset);
            let s = FleetSpec {
                end_day,
                ..spec(20, DEMO_PLAYS_PER_SITE, DEFAULT_SEED)
            };
            let mut periods = HashSet::new();
            let mut events = HashSet::new();
            for site in generate(&s, &c) {
                assert_eq!(site.plays.len(), DEMO_PLAYS_PER_SITE);
                for p in &site.plays {
                    periods.insert(p.period);
                    events.insert(p.event_type);
                }
            }
            assert_eq!(
                periods.len(),
                4,
                "end day {end_day} ({}): {periods:?}",
                end_day.weekday()
            );
            for e in [EventType::Match, EventType::Training, EventType::Other] {
                assert!(
                    events.contains(&e),
                    "end day {end_day} ({}): no {e:?}",
                    end_day.weekday()
                );
            }
        }
    }

    #[test]
    fn large_backlog_stays_in_the_past() {
        let c = Catalogue::standard();
        let s = spec(1, 20_000, 3);
        let site = generate_site(&s, &c, 0);
        assert_eq!(site.plays.len(), 20_000);
        assert!(site.plays[0].played_at > Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap());
    }
}
