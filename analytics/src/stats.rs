//! Sponsor statistics over a date range, answered from the per-sponsor
//! rollups of the migration `20261207000004_sponsor_rollups.sql`.
//!
//! Attribution happens at write time and follows the catalogue: the map
//! `video_attribution` (video -> sponsor under the current catalogue) is kept
//! exact by triggers on `sponsor_daily_stats` (new videos) and on `videos`
//! (a rule change moves the affected videos' past aggregates from the old
//! sponsor to the new one in the catalogue's transaction), so every read sees
//! the current catalogue and needs no attribution step of its own.
//!
//! Without a `site_id` filter, three queries run in parallel:
//!  * `sponsor_stats_daily` (sponsor, day, period, event): totals, by period,
//!    by event type and the daily series, aggregated here (at most 16 rows a
//!    day);
//!  * `sponsor_video_daily`: top videos;
//!  * by site: `sponsor_site_monthly` for the whole months of the range,
//!    `sponsor_site_weekly` for the whole ISO weeks of what is left, and
//!    `sponsor_site_daily` for the remaining days (at most 6 at each end of
//!    each partial month), each read by bucket lists (`= ANY`); with a
//!    period/event filter, `sponsor_site_daily_detail` (its key starts with
//!    period and event type, so a filter is a few index ranges).
//!
//! With a `site_id` filter everything reads `sponsor_daily_stats` through its
//! `(site_id, day)` index, restricted to the sponsor's videos (one site is
//! small). All rollups are exact at every commit, so late plays are included.
//!
//! Days are UTC days; `from` and `to` are inclusive.

use crate::catalogue::Sponsor;
use crate::error::{ApiError, ApiResult};
use chrono::{Datelike, Days, NaiveDate};
use schema::impression::{EventType, Period};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::collections::HashMap;

/// Longest range accepted (ten years of days).
pub const MAX_RANGE_DAYS: i64 = 3660;
/// Default range when `from`/`to` are omitted: the last 30 days.
pub const DEFAULT_RANGE_DAYS: u64 = 30;
/// Entries in `top_videos`.
pub const TOP_VIDEOS: usize = 20;

/// Validated query parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatsQuery {
    pub from: NaiveDate,
    pub to: NaiveDate,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<EventType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
}

fn parse_date(name: &str, v: &str) -> ApiResult<NaiveDate> {
    NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .map_err(|_| ApiError::bad(name, format!("'{}' is not a date YYYY-MM-DD", truncate(v, 40))))
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

impl StatsQuery {
    /// Parses `from`, `to` (YYYY-MM-DD, inclusive), `site_id`, `event_type`,
    /// `period`. Unknown parameters are ignored. Errors name the parameter.
    pub fn parse(params: &HashMap<String, String>, today: NaiveDate) -> ApiResult<Self> {
        let get = |k: &str| params.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        let to = match get("to") {
            Some(v) => parse_date("to", v)?,
            None => today,
        };
        let from = match get("from") {
            Some(v) => parse_date("from", v)?,
            None => to
                .checked_sub_days(Days::new(DEFAULT_RANGE_DAYS - 1))
                .ok_or_else(|| ApiError::bad("to", "out of range"))?,
        };
        if from > to {
            return Err(ApiError::bad("from", format!("{from} is after to={to}")));
        }
        if (to - from).num_days() >= MAX_RANGE_DAYS {
            return Err(ApiError::bad(
                "from",
                format!("range longer than {MAX_RANGE_DAYS} days"),
            ));
        }
        let site_id = match get("site_id") {
            Some(s) => {
                let ok = s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !ok {
                    return Err(ApiError::bad(
                        "site_id",
                        "must be 1-64 characters among A-Z a-z 0-9 _ -",
                    ));
                }
                Some(s.to_owned())
            }
            None => None,
        };
        let event_type = get("event_type")
            .map(|v| v.parse::<EventType>().map_err(|e| ApiError::bad("event_type", e)))
            .transpose()?;
        let period = get("period")
            .map(|v| v.parse::<Period>().map_err(|e| ApiError::bad("period", e)))
            .transpose()?;
        Ok(Self {
            from,
            to,
            site_id,
            event_type,
            period,
        })
    }

    pub fn days(&self) -> impl Iterator<Item = NaiveDate> + '_ {
        self.from.iter_days().take_while(move |d| *d <= self.to)
    }
}

/// Counters of one slice.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub impressions: i64,
    pub screen_time_seconds: f64,
    pub completed: i64,
    pub completion_rate: f64,
    pub audience: i64,
}

impl Figures {
    fn new(impressions: i64, seconds: f64, completed: i64, audience: i64) -> Self {
        Figures {
            impressions,
            screen_time_seconds: round3(seconds),
            completed,
            completion_rate: rate(completed, impressions),
            audience,
        }
    }
}

/// Seconds are sums of doubles whose order depends on the plan; three
/// decimals (milliseconds) are what is meaningful and stable.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// completed / impressions, 0 when there is no impression; 6 decimals.
pub fn rate(completed: i64, impressions: i64) -> f64 {
    if impressions == 0 {
        0.0
    } else {
        (completed as f64 / impressions as f64 * 1e6).round() / 1e6
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyedFigures {
    pub key: String,
    #[serde(flatten)]
    pub figures: Figures,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteFigures {
    pub site_id: String,
    pub site_name: Option<String>,
    #[serde(flatten)]
    pub figures: Figures,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VideoFigures {
    pub video_id: Option<String>,
    pub video_filename: String,
    #[serde(flatten)]
    pub figures: Figures,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DayFigures {
    pub day: NaiveDate,
    #[serde(flatten)]
    pub figures: Figures,
}

/// The stats document (`GET /api/analytics/sponsors/:id/stats`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub sponsor: Sponsor,
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub filters: serde_json::Value,
    pub total_impressions: i64,
    pub screen_time_seconds: f64,
    pub completed: i64,
    pub completion_rate: f64,
    pub sites_reached: i64,
    pub audience_reached: i64,
    pub average_seconds_per_play: f64,
    /// Videos attributed to the sponsor that have ever been played.
    pub videos_attributed: usize,
    pub by_period: Vec<KeyedFigures>,
    pub by_event_type: Vec<KeyedFigures>,
    pub by_site: Vec<SiteFigures>,
    pub top_videos: Vec<VideoFigures>,
    pub daily: Vec<DayFigures>,
}

/// The sponsor's videos under the current catalogue, as parallel arrays
/// (video_filename, video_id with '' for none) ready to bind.
#[derive(Clone, Debug, Default)]
pub struct Attributed {
    pub filenames: Vec<String>,
    pub video_ids: Vec<String>,
}

/// The sponsor's played videos under the current catalogue, from the map
/// `video_attribution` (exact at every commit, whoever changed the
/// catalogue).
pub async fn attributed_videos(pool: &PgPool, sponsor_id: &str) -> ApiResult<Attributed> {
    fold_pending(pool).await?;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT video_filename, video_id FROM video_attribution WHERE sponsor_id = $1 ORDER BY 1, 2")
            .bind(sponsor_id)
            .fetch_all(pool)
            .await?;
    let (filenames, video_ids) = rows.into_iter().unzip();
    Ok(Attributed { filenames, video_ids })
}

/// Folds the rollups' queues of deltas (the daily one of migration
/// `20261207000003_daily_rollup`, then the per-sponsor one of `20261207000004_sponsor_rollups`) so that
/// what is read next includes every write committed before this call.
/// Writers only append deltas (cheap on the ingest path); the ingestor folds
/// about once a second, so there is little or nothing left here (no lock is
/// taken when the queues are empty).
pub async fn fold_pending(pool: &PgPool) -> ApiResult<()> {
    sqlx::query("SELECT sponsor_rollups_fold()").execute(pool).await?;
    Ok(())
}

/// The sponsor (404 when unknown) and its played videos, in one round trip
/// (a cold request opens fewer connections).
async fn sponsor_and_videos(pool: &PgPool, sponsor_id: &str) -> ApiResult<(Sponsor, Attributed)> {
    fold_pending(pool).await?;
    let row: Option<(String, String, Vec<String>, Vec<String>)> = sqlx::query_as(
        "SELECT s.id, s.name,
                coalesce(array_agg(a.video_filename ORDER BY a.video_filename, a.video_id)
                         FILTER (WHERE a.video_filename IS NOT NULL), '{}'),
                coalesce(array_agg(a.video_id ORDER BY a.video_filename, a.video_id)
                         FILTER (WHERE a.video_filename IS NOT NULL), '{}')
         FROM sponsors s LEFT JOIN video_attribution a ON a.sponsor_id = s.id
         WHERE s.id = $1 GROUP BY s.id, s.name",
    )
    .bind(sponsor_id)
    .fetch_optional(pool)
    .await?;
    let (id, name, filenames, video_ids) =
        row.ok_or_else(|| ApiError::NotFound(format!("unknown sponsor '{sponsor_id}'")))?;
    Ok((Sponsor { id, name }, Attributed { filenames, video_ids }))
}

/// Totals, breakdowns and the daily series: one row per (day, period, event).
const DAY_SQL: &str = "
SELECT day, period, event_type, impressions, seconds_played, completed_count, audience_sum
FROM sponsor_stats_daily
WHERE sponsor_id = $1 AND day >= $2 AND day <= $3
  AND ($4::text IS NULL OR period = $4) AND ($5::text IS NULL OR event_type = $5)
ORDER BY day, period, event_type";

const VIDEOS_SQL: &str = "
SELECT video_filename, video_id,
       sum(impressions)::int8, sum(seconds_played)::float8, sum(completed_count)::int8, sum(audience_sum)::int8
FROM sponsor_video_daily
WHERE sponsor_id = $1 AND day >= $2 AND day <= $3
  AND ($4::text IS NULL OR period = $4) AND ($5::text IS NULL OR event_type = $5)
GROUP BY 1, 2
HAVING sum(impressions) > 0";

/// By site, unfiltered: whole months + whole weeks + days.
const SITES_SQL: &str = "
WITH x AS (
    SELECT site_id, impressions, seconds_played, completed_count, audience_sum
    FROM sponsor_site_monthly WHERE sponsor_id = $1 AND month = ANY($2::date[])
    UNION ALL
    SELECT site_id, impressions, seconds_played, completed_count, audience_sum
    FROM sponsor_site_weekly WHERE sponsor_id = $1 AND week = ANY($3::date[])
    UNION ALL
    SELECT site_id, impressions, seconds_played, completed_count, audience_sum
    FROM sponsor_site_daily WHERE sponsor_id = $1 AND day = ANY($4::date[])
),
agg AS (
    SELECT site_id, sum(impressions)::int8 AS n, sum(seconds_played)::float8 AS secs,
           sum(completed_count)::int8 AS comp, sum(audience_sum)::int8 AS aud
    FROM x GROUP BY site_id HAVING sum(impressions) > 0
)
SELECT agg.site_id, si.name, agg.n, agg.secs, agg.comp, agg.aud
FROM agg LEFT JOIN sites si ON si.site_id = agg.site_id
ORDER BY 3 DESC, 1";

/// By site with a period/event filter: the detail table, whose key starts
/// with (sponsor, period, event_type), so the filter is a few index ranges.
const SITES_DETAIL_SQL: &str = "
WITH agg AS (
    SELECT site_id, sum(impressions)::int8 AS n, sum(seconds_played)::float8 AS secs,
           sum(completed_count)::int8 AS comp, sum(audience_sum)::int8 AS aud
    FROM sponsor_site_daily_detail
    WHERE sponsor_id = $1 AND period = ANY($2::text[]) AND event_type = ANY($3::text[])
      AND day >= $4 AND day <= $5
    GROUP BY site_id HAVING sum(impressions) > 0
)
SELECT agg.site_id, si.name, agg.n, agg.secs, agg.comp, agg.aud
FROM agg LEFT JOIN sites si ON si.site_id = agg.site_id
ORDER BY 3 DESC, 1";

type GroupRow = (
    i32,
    i32,
    i32,
    i32,
    Option<String>,
    Option<String>,
    Option<NaiveDate>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<f64>,
    Option<i64>,
    Option<i64>,
);

/// With a site filter: everything from sponsor_daily_stats through its
/// (site_id, day) index, restricted to the sponsor's videos.
const SITE_GROUPS_SQL: &str = "
SELECT GROUPING(t.period)::int4, GROUPING(t.event_type)::int4, GROUPING(t.day)::int4, GROUPING(t.video_filename)::int4,
       t.period, t.event_type, t.day, t.video_filename, t.video_id,
       sum(t.impressions)::int8, sum(t.seconds_played)::float8, sum(t.completed_count)::int8, sum(t.audience_sum)::int8
FROM unnest($1::text[], $2::text[]) AS v(video_filename, video_id)
JOIN sponsor_daily_stats t ON t.video_filename = v.video_filename AND t.video_id = v.video_id
WHERE t.site_id = $7 AND t.day >= $3 AND t.day <= $4
  AND ($5::text IS NULL OR t.period = $5)
  AND ($6::text IS NULL OR t.event_type = $6)
GROUP BY GROUPING SETS ((), (t.period), (t.event_type), (t.day), (t.video_filename, t.video_id))";

/// The by-site buckets of [from, to]: whole months, then whole ISO weeks
/// (Monday starts) of what is left at each end, then the remaining days (at
/// most 6 before and 6 after the weeks of each partial span).
#[derive(Debug, Default, PartialEq)]
pub struct SiteBuckets {
    pub months: Vec<NaiveDate>,
    pub weeks: Vec<NaiveDate>,
    pub days: Vec<NaiveDate>,
}

pub fn site_buckets(from: NaiveDate, to: NaiveDate) -> SiteBuckets {
    let mut b = SiteBuckets::default();
    let after = to.succ_opt().unwrap_or(to);
    let (mf, mt) = month_split(from, to);
    let mut m = mf;
    while m < mt {
        b.months.push(m);
        m = m.checked_add_months(chrono::Months::new(1)).unwrap_or(mt);
    }
    let mut span = |lo: NaiveDate, hi: NaiveDate| {
        let mut d = lo;
        while d < hi {
            match d.checked_add_days(Days::new(7)) {
                Some(next) if d.weekday() == chrono::Weekday::Mon && next <= hi => {
                    b.weeks.push(d);
                    d = next;
                }
                _ => {
                    b.days.push(d);
                    d = d.succ_opt().unwrap_or(hi);
                }
            }
        }
    };
    if mf < mt {
        span(from, mf);
        span(mt, after);
    } else {
        span(from, after);
    }
    b
}

/// Splits [from, to] into whole months [mf, mt) and the days around them.
/// Without a whole month, mf = mt = to + 1.
fn month_split(from: NaiveDate, to: NaiveDate) -> (NaiveDate, NaiveDate) {
    let after = to.succ_opt().unwrap_or(to);
    let first_of = |d: NaiveDate| d.with_day(1).unwrap_or(d);
    let mf = if from.day() == 1 {
        from
    } else {
        first_of(from)
            .checked_add_months(chrono::Months::new(1))
            .unwrap_or(after)
    };
    let mt = first_of(after);
    if mf < mt {
        (mf, mt)
    } else {
        (after, after)
    }
}

type SiteRow = (String, Option<String>, i64, f64, i64, i64);

#[derive(Default)]
struct Acc {
    n: i64,
    secs: f64,
    comp: i64,
    aud: i64,
}

impl Acc {
    fn add(&mut self, n: i64, secs: f64, comp: i64, aud: i64) {
        self.n += n;
        self.secs += secs;
        self.comp += comp;
        self.aud += aud;
    }
    fn figures(&self) -> Figures {
        Figures::new(self.n, self.secs, self.comp, self.aud)
    }
}

/// Computes the stats of `sponsor_id` (404 when unknown).
pub async fn compute(pool: &PgPool, sponsor_id: &str, q: &StatsQuery) -> ApiResult<Stats> {
    let (sponsor, att) = sponsor_and_videos(pool, sponsor_id).await?;
    let period = q.period.map(|p| p.as_str().to_owned());
    let event_type = q.event_type.map(|e| e.as_str().to_owned());

    let mut total = Figures::default();
    let mut by_period: HashMap<String, Figures> = HashMap::new();
    let mut by_event: HashMap<String, Figures> = HashMap::new();
    let mut by_day: HashMap<NaiveDate, Figures> = HashMap::new();
    let mut videos = Vec::new();
    let fig = |n: Option<i64>, secs: Option<f64>, comp: Option<i64>, aud: Option<i64>| {
        Figures::new(n.unwrap_or(0), secs.unwrap_or(0.0), comp.unwrap_or(0), aud.unwrap_or(0))
    };
    let mut push_video = |vf: String, vid: String, f: Figures| {
        if f.impressions > 0 {
            videos.push(VideoFigures {
                video_id: Some(vid).filter(|v| !v.is_empty()),
                video_filename: vf,
                figures: f,
            })
        }
    };
    let sites: Vec<SiteRow>;
    if let Some(site) = &q.site_id {
        let groups = sqlx::query_as::<_, GroupRow>(SITE_GROUPS_SQL)
            .bind(&att.filenames)
            .bind(&att.video_ids)
            .bind(q.from)
            .bind(q.to)
            .bind(&period)
            .bind(&event_type)
            .bind(site);
        let name = sqlx::query_scalar::<_, Option<String>>("SELECT name FROM sites WHERE site_id = $1").bind(site);
        let (groups, name) = tokio::try_join!(groups.fetch_all(pool), name.fetch_optional(pool))?;
        for (gp, ge, gd, gv, p, e, d, vf, vid, n, secs, comp, aud) in groups {
            let f = fig(n, secs, comp, aud);
            match (gp, ge, gd, gv) {
                (1, 1, 1, 1) => total = f,
                (0, 1, 1, 1) => {
                    by_period.insert(p.unwrap_or_default(), f);
                }
                (1, 0, 1, 1) => {
                    by_event.insert(e.unwrap_or_default(), f);
                }
                (1, 1, 0, 1) => {
                    if let Some(d) = d {
                        by_day.insert(d, f);
                    }
                }
                (1, 1, 1, 0) => push_video(vf.unwrap_or_default(), vid.unwrap_or_default(), f),
                _ => {}
            }
        }
        sites = if total.impressions > 0 {
            vec![(
                site.clone(),
                name.flatten(),
                total.impressions,
                total.screen_time_seconds,
                total.completed,
                total.audience,
            )]
        } else {
            Vec::new()
        };
    } else {
        let day_q = sqlx::query_as::<_, (NaiveDate, String, String, i64, f64, i64, i64)>(DAY_SQL)
            .bind(sponsor_id)
            .bind(q.from)
            .bind(q.to)
            .bind(&period)
            .bind(&event_type);
        let videos_q = sqlx::query_as::<_, (String, String, i64, f64, i64, i64)>(VIDEOS_SQL)
            .bind(sponsor_id)
            .bind(q.from)
            .bind(q.to)
            .bind(&period)
            .bind(&event_type);
        let sites_q = if period.is_none() && event_type.is_none() {
            let b = site_buckets(q.from, q.to);
            sqlx::query_as::<_, SiteRow>(SITES_SQL)
                .bind(sponsor_id)
                .bind(b.months)
                .bind(b.weeks)
                .bind(b.days)
        } else {
            let all = |v: &Option<String>, every: Vec<&str>| match v {
                Some(v) => vec![v.clone()],
                None => every.into_iter().map(str::to_owned).collect::<Vec<_>>(),
            };
            sqlx::query_as::<_, SiteRow>(SITES_DETAIL_SQL)
                .bind(sponsor_id)
                .bind(all(&period, Period::ALL.iter().map(|p| p.as_str()).collect()))
                .bind(all(&event_type, EventType::ALL.iter().map(|e| e.as_str()).collect()))
                .bind(q.from)
                .bind(q.to)
        };
        let (days, vids, s) =
            tokio::try_join!(day_q.fetch_all(pool), videos_q.fetch_all(pool), sites_q.fetch_all(pool))?;
        sites = s;
        let (mut t, mut per, mut ev, mut dy) = (
            Acc::default(),
            HashMap::<String, Acc>::new(),
            HashMap::<String, Acc>::new(),
            HashMap::<NaiveDate, Acc>::new(),
        );
        for (d, p, e, n, secs, comp, aud) in days {
            t.add(n, secs, comp, aud);
            per.entry(p).or_default().add(n, secs, comp, aud);
            ev.entry(e).or_default().add(n, secs, comp, aud);
            dy.entry(d).or_default().add(n, secs, comp, aud);
        }
        total = t.figures();
        by_period = per.into_iter().map(|(k, a)| (k, a.figures())).collect();
        by_event = ev.into_iter().map(|(k, a)| (k, a.figures())).collect();
        by_day = dy.into_iter().map(|(k, a)| (k, a.figures())).collect();
        for (vf, vid, n, secs, comp, aud) in vids {
            push_video(vf, vid, Figures::new(n, secs, comp, aud));
        }
    }
    videos.sort_by(|a, b| {
        b.figures
            .impressions
            .cmp(&a.figures.impressions)
            .then_with(|| a.video_filename.cmp(&b.video_filename))
            .then_with(|| a.video_id.cmp(&b.video_id))
    });
    videos.truncate(TOP_VIDEOS);

    let by_site: Vec<SiteFigures> = sites
        .into_iter()
        .map(|(site_id, site_name, n, secs, comp, aud)| SiteFigures {
            site_id,
            site_name,
            figures: Figures::new(n, secs, comp, aud),
        })
        .collect();

    let mut filters = serde_json::Map::new();
    if let Some(s) = &q.site_id {
        filters.insert("site_id".into(), s.clone().into());
    }
    if let Some(e) = &event_type {
        filters.insert("event_type".into(), e.clone().into());
    }
    if let Some(p) = &period {
        filters.insert("period".into(), p.clone().into());
    }

    Ok(Stats {
        sponsor,
        from: q.from,
        to: q.to,
        filters: filters.into(),
        total_impressions: total.impressions,
        screen_time_seconds: total.screen_time_seconds,
        completed: total.completed,
        completion_rate: total.completion_rate,
        sites_reached: by_site.len() as i64,
        audience_reached: total.audience,
        average_seconds_per_play: if total.impressions == 0 {
            0.0
        } else {
            round3(total.screen_time_seconds / total.impressions as f64)
        },
        videos_attributed: att.filenames.len(),
        by_period: Period::ALL
            .iter()
            .map(|p| KeyedFigures {
                key: p.as_str().to_owned(),
                figures: by_period.remove(p.as_str()).unwrap_or_default(),
            })
            .collect(),
        by_event_type: EventType::ALL
            .iter()
            .map(|e| KeyedFigures {
                key: e.as_str().to_owned(),
                figures: by_event.remove(e.as_str()).unwrap_or_default(),
            })
            .collect(),
        by_site,
        top_videos: videos,
        daily: q
            .days()
            .map(|d| DayFigures {
                day: d,
                figures: by_day.remove(&d).unwrap_or_default(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn month_split_cases() {
        assert_eq!(
            month_split(d("2026-01-01"), d("2026-12-31")),
            (d("2026-01-01"), d("2027-01-01"))
        );
        assert_eq!(
            month_split(d("2026-01-15"), d("2026-03-10")),
            (d("2026-02-01"), d("2026-03-01"))
        );
        // No whole month: everything from the daily table.
        assert_eq!(
            month_split(d("2026-01-15"), d("2026-02-10")),
            (d("2026-02-11"), d("2026-02-11"))
        );
        assert_eq!(
            month_split(d("2026-02-01"), d("2026-02-27")),
            (d("2026-02-28"), d("2026-02-28"))
        );
        assert_eq!(
            month_split(d("2026-02-01"), d("2026-02-28")),
            (d("2026-02-01"), d("2026-03-01"))
        );
    }

    #[test]
    fn site_buckets_cover_the_range_once() {
        // 2026-01-01 is a Thursday.
        let b = site_buckets(d("2026-01-01"), d("2026-12-31"));
        assert_eq!(b.months.len(), 12);
        assert!(b.weeks.is_empty() && b.days.is_empty());
        let b = site_buckets(d("2026-01-15"), d("2026-03-10"));
        assert_eq!(b.months, [d("2026-02-01")]);
        // 15..18 Jan days (Thu..Sun), the week of 19 Jan, 26..31 Jan days (the
        // week of 26 Jan ends in February); then 1..10 March: 2 Mar is a
        // Monday: day 1, the week of 2 Mar, days 9, 10.
        assert_eq!(b.weeks, [d("2026-01-19"), d("2026-03-02")]);
        let days: Vec<String> = b.days.iter().map(|x| x.format("%m-%d").to_string()).collect();
        assert_eq!(
            days,
            [
                "01-15", "01-16", "01-17", "01-18", "01-26", "01-27", "01-28", "01-29", "01-30", "01-31", "03-01",
                "03-09", "03-10"
            ]
        );
        // Every day of many ranges covered exactly once; few days left.
        for (a, len) in [
            ("2025-11-24", 365),
            ("2026-02-07", 40),
            ("2026-05-31", 1),
            ("2026-06-03", 6),
        ] {
            let from = d(a);
            let to = from + Days::new(len - 1);
            let b = site_buckets(from, to);
            let mut covered = std::collections::BTreeMap::new();
            for m in &b.months {
                let mut x = *m;
                while x.month() == m.month() {
                    *covered.entry(x).or_insert(0) += 1;
                    x = x.succ_opt().unwrap();
                }
            }
            for w in &b.weeks {
                assert_eq!(w.weekday(), chrono::Weekday::Mon);
                for i in 0..7 {
                    *covered.entry(*w + Days::new(i)).or_insert(0) += 1;
                }
            }
            for x in &b.days {
                *covered.entry(*x).or_insert(0) += 1;
            }
            let want: std::collections::BTreeMap<_, _> =
                from.iter_days().take_while(|x| *x <= to).map(|x| (x, 1)).collect();
            assert_eq!(covered, want, "{a} +{len}");
            assert!(b.days.len() <= 24, "{a} +{len}: {} days", b.days.len());
        }
    }

    #[test]
    fn parse_names_bad_parameter() {
        let today = d("2026-11-24");
        let p = |kv: &[(&str, &str)]| {
            StatsQuery::parse(&kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), today)
        };
        let q = p(&[]).unwrap();
        assert_eq!((q.from, q.to), (d("2026-10-26"), today));
        for (kv, name) in [
            (vec![("from", "2026-13-01")], "from"),
            (vec![("to", "yesterday")], "to"),
            (vec![("from", "2026-02-01"), ("to", "2026-01-01")], "from"),
            (vec![("period", "overtime")], "period"),
            (vec![("event_type", "gala")], "event_type"),
            (vec![("site_id", "a b")], "site_id"),
        ] {
            match p(&kv) {
                Err(ApiError::BadRequest { parameter, .. }) => assert_eq!(parameter, name),
                other => panic!("{kv:?}: {other:?}"),
            }
        }
    }
}
