//! Sponsor statistics over a date range, answered from the rollups.
//!
//! Attribution happens at read time: the distinct videos ever played
//! (`analytics_videos`, a few hundred rows) go through `sponsor_of()` under
//! the current catalogue, and the sponsor's (video_id, video_filename) pairs
//! then select rows of
//!  * `analytics_video_day` (video, day) for the totals, the daily series and
//!    top videos; `analytics_video_monthly` (video, month, period, event type)
//!    plus `analytics_video_daily` for the edge days, for the breakdowns by
//!    period and event type (with a period/event filter, everything reads
//!    `analytics_video_daily`);
//!  * `analytics_site_video_monthly` for the whole months inside the range
//!    plus `sponsor_daily_stats` for the partial months at its edges, for the
//!    breakdown by site and the number of sites reached.
//!
//! With a `site_id` filter everything reads `sponsor_daily_stats` (one site is
//! small); with a `period`/`event_type` filter the by-site part reads
//! `sponsor_daily_stats` (the monthly rollup has no such dimension).
//! All rollups are exact at every commit (see the migration
//! `20261124000010_analytics_rollups.sql`), so late plays are included.
//!
//! Days are UTC days; `from` and `to` are inclusive.

use crate::catalogue::{get_sponsor, Sponsor};
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

/// Attribution of every played video under the current catalogue, cached
/// per process and revalidated on each request by a cheap fingerprint of the
/// catalogue (`videos`) and of the set of played videos (`analytics_videos`,
/// which only grows). A change by any process (API, CLI import, psql) is seen
/// by the next request.
/// (catalogue fingerprint, sponsor -> its played videos).
type CachedAttribution = ((i64, i64, i64), HashMap<String, Attributed>);

#[derive(Clone, Default)]
pub struct AttributionCache {
    inner: std::sync::Arc<tokio::sync::Mutex<Option<CachedAttribution>>>,
}

const FINGERPRINT_SQL: &str = "
SELECT (SELECT count(*) FROM analytics_videos)::int8,
       (SELECT count(*) FROM videos)::int8,
       (SELECT coalesce(sum(hashtext(concat_ws('|', id, sponsor_id, video_id, filename_pattern))::int8), 0) FROM videos)::int8";

impl AttributionCache {
    pub async fn get(&self, pool: &PgPool, sponsor_id: &str) -> ApiResult<Attributed> {
        let fp: (i64, i64, i64) = sqlx::query_as(FINGERPRINT_SQL).fetch_one(pool).await?;
        let mut guard = self.inner.lock().await;
        if let Some((cached_fp, map)) = guard.as_ref() {
            if *cached_fp == fp {
                return Ok(map.get(sponsor_id).cloned().unwrap_or_default());
            }
        }
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT video_filename, video_id, sponsor_of(nullif(video_id, ''), video_filename)
             FROM analytics_videos ORDER BY 1, 2",
        )
        .fetch_all(pool)
        .await?;
        let mut map: HashMap<String, Attributed> = HashMap::new();
        for (f, v, s) in rows {
            if let Some(s) = s {
                let a = map.entry(s).or_default();
                a.filenames.push(f);
                a.video_ids.push(v);
            }
        }
        let out = map.get(sponsor_id).cloned().unwrap_or_default();
        *guard = Some((fp, map));
        Ok(out)
    }
}

/// Uncached attribution of one sponsor's played videos.
pub async fn attributed_videos(pool: &PgPool, sponsor_id: &str) -> ApiResult<Attributed> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT video_filename, video_id FROM analytics_videos
         WHERE sponsor_of(nullif(video_id, ''), video_filename) = $1
         ORDER BY 1, 2",
    )
    .bind(sponsor_id)
    .fetch_all(pool)
    .await?;
    let (filenames, video_ids) = rows.into_iter().unzip();
    Ok(Attributed { filenames, video_ids })
}

type DayRow = (
    i32,
    i32,
    Option<NaiveDate>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<f64>,
    Option<i64>,
    Option<i64>,
);

type BreakdownRow = (
    i32,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<f64>,
    Option<i64>,
    Option<i64>,
);

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

const GROUPS_SQL: &str = "
SELECT GROUPING(t.period)::int4, GROUPING(t.event_type)::int4, GROUPING(t.day)::int4, GROUPING(t.video_filename)::int4,
       t.period, t.event_type, t.day, t.video_filename, t.video_id,
       sum(t.impressions)::int8, sum(t.seconds_played)::float8, sum(t.completed_count)::int8, sum(t.audience_sum)::int8
FROM unnest($1::text[], $2::text[]) AS v(video_filename, video_id)
JOIN {SRC} t ON t.video_filename = v.video_filename AND t.video_id = v.video_id
WHERE t.day >= $3 AND t.day <= $4
  AND ($5::text IS NULL OR t.period = $5)
  AND ($6::text IS NULL OR t.event_type = $6)
  {SITE}
GROUP BY GROUPING SETS ((), (t.period), (t.event_type), (t.day), (t.video_filename, t.video_id))";

/// Unfiltered: totals, daily series and per video from analytics_video_day.
const DAY_SQL: &str = "
SELECT GROUPING(t.day)::int4, GROUPING(t.video_filename)::int4, t.day, t.video_filename, t.video_id,
       sum(t.impressions)::int8, sum(t.seconds_played)::float8, sum(t.completed_count)::int8, sum(t.audience_sum)::int8
FROM unnest($1::text[], $2::text[]) AS v(video_filename, video_id)
JOIN analytics_video_day t ON t.video_filename = v.video_filename AND t.video_id = v.video_id
WHERE t.day >= $3 AND t.day <= $4
GROUP BY GROUPING SETS ((), (t.day), (t.video_filename, t.video_id))";

/// Unfiltered: by period and event type, whole months from
/// analytics_video_monthly plus the edge days from analytics_video_daily.
const BREAKDOWN_SQL: &str = "
WITH v AS (SELECT * FROM unnest($1::text[], $2::text[]) AS v(video_filename, video_id)),
x AS (
    SELECT m.period, m.event_type, m.impressions, m.seconds_played, m.completed_count, m.audience_sum
    FROM v JOIN analytics_video_monthly m
      ON m.video_filename = v.video_filename AND m.video_id = v.video_id AND m.month >= $3 AND m.month < $4
    UNION ALL
    SELECT d.period, d.event_type, d.impressions, d.seconds_played, d.completed_count, d.audience_sum
    FROM v JOIN analytics_video_daily d
      ON d.video_filename = v.video_filename AND d.video_id = v.video_id AND d.day >= $5 AND d.day < $3
    UNION ALL
    SELECT d.period, d.event_type, d.impressions, d.seconds_played, d.completed_count, d.audience_sum
    FROM v JOIN analytics_video_daily d
      ON d.video_filename = v.video_filename AND d.video_id = v.video_id AND d.day >= $4 AND d.day <= $6
)
SELECT GROUPING(period)::int4, period, event_type,
       sum(impressions)::int8, sum(seconds_played)::float8, sum(completed_count)::int8, sum(audience_sum)::int8
FROM x GROUP BY GROUPING SETS ((period), (event_type))";

const SITES_SQL: &str = "
WITH v AS (SELECT * FROM unnest($1::text[], $2::text[]) AS v(video_filename, video_id)),
x AS (
    SELECT m.site_id, m.impressions, m.seconds_played, m.completed_count, m.audience_sum
    FROM v JOIN analytics_site_video_monthly m
      ON m.video_filename = v.video_filename AND m.video_id = v.video_id AND m.month >= $3 AND m.month < $4
    UNION ALL
    {EDGE_LO}
    UNION ALL
    {EDGE_HI}
),
agg AS (
    SELECT site_id, sum(impressions)::int8 AS n, sum(seconds_played)::float8 AS secs,
           sum(completed_count)::int8 AS comp, sum(audience_sum)::int8 AS aud
    FROM x GROUP BY site_id HAVING sum(impressions) > 0
)
SELECT agg.site_id, si.name, agg.n, agg.secs, agg.comp, agg.aud
FROM agg LEFT JOIN sites si ON si.site_id = agg.site_id
ORDER BY 3 DESC, 1";

/// One edge of the by-site query: per video (lateral), a single day range so
/// the (video_filename, day) index of sponsor_daily_stats reads only the
/// sponsor's rows (an OR of two ranges made the planner scan the day index).
const SITES_EDGE_SQL: &str = "
    SELECT s.site_id, s.impressions, s.seconds_played, s.completed_count, s.audience_sum
    FROM v CROSS JOIN LATERAL (
        SELECT s.* FROM sponsor_daily_stats s
        WHERE s.video_filename = v.video_filename AND s.video_id = v.video_id
          AND s.day >= {LO} AND s.day {HI_OP} {HI}
          AND ($7::text IS NULL OR s.period = $7)
          AND ($8::text IS NULL OR s.event_type = $8)
          {SITE}
    ) s";

/// Splits [from, to] into whole months [mf, mt) served by the monthly rollup
/// and the day edges around them. Without a whole month, mf = mt = to + 1 so
/// that the first edge covers the whole range.
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

/// Computes the stats of `sponsor_id` (404 when unknown).
pub async fn compute(pool: &PgPool, cache: &AttributionCache, sponsor_id: &str, q: &StatsQuery) -> ApiResult<Stats> {
    let (sponsor, att) = tokio::try_join!(get_sponsor(pool, sponsor_id), cache.get(pool, sponsor_id))?;
    let period = q.period.map(|p| p.as_str().to_owned());
    let event_type = q.event_type.map(|e| e.as_str().to_owned());

    let unfiltered = q.site_id.is_none() && q.period.is_none() && q.event_type.is_none();
    let (mf, mt) = if unfiltered {
        month_split(q.from, q.to)
    } else {
        let after = q.to.succ_opt().unwrap_or(q.to);
        (after, after)
    };
    // With a site filter, the condition is written out so the planner reads
    // sponsor_daily_stats by its (site_id, day) index.
    let site_cond = if q.site_id.is_some() {
        "AND s.site_id = $9"
    } else {
        "AND $9::text IS NULL"
    };
    let edge = |lo: &str, op: &str, hi: &str| {
        SITES_EDGE_SQL
            .replace("{LO}", lo)
            .replace("{HI_OP}", op)
            .replace("{HI}", hi)
            .replace("{SITE}", site_cond)
    };
    let sites_sql = SITES_SQL
        .replace("{EDGE_LO}", &edge("$5", "<", "$3"))
        .replace("{EDGE_HI}", &edge("$4", "<=", "$6"));
    let sites_q = sqlx::query_as::<_, (String, Option<String>, i64, f64, i64, i64)>(&sites_sql)
        .bind(&att.filenames)
        .bind(&att.video_ids)
        .bind(mf)
        .bind(mt)
        .bind(q.from)
        .bind(q.to)
        .bind(&period)
        .bind(&event_type)
        .bind(&q.site_id);

    let mut total = Figures::default();
    let mut by_period: HashMap<String, Figures> = HashMap::new();
    let mut by_event: HashMap<String, Figures> = HashMap::new();
    let mut by_day: HashMap<NaiveDate, Figures> = HashMap::new();
    let mut videos = Vec::new();
    let fig = |n: Option<i64>, secs: Option<f64>, comp: Option<i64>, aud: Option<i64>| {
        Figures::new(n.unwrap_or(0), secs.unwrap_or(0.0), comp.unwrap_or(0), aud.unwrap_or(0))
    };
    let mut push_video = |vf: Option<String>, vid: Option<String>, f: Figures| {
        if f.impressions > 0 {
            videos.push(VideoFigures {
                video_id: vid.filter(|v| !v.is_empty()),
                video_filename: vf.unwrap_or_default(),
                figures: f,
            })
        }
    };
    let sites;
    if unfiltered {
        let day_q = sqlx::query_as::<_, DayRow>(DAY_SQL)
            .bind(&att.filenames)
            .bind(&att.video_ids)
            .bind(q.from)
            .bind(q.to);
        let breakdown_q = sqlx::query_as::<_, BreakdownRow>(BREAKDOWN_SQL)
            .bind(&att.filenames)
            .bind(&att.video_ids)
            .bind(mf)
            .bind(mt)
            .bind(q.from)
            .bind(q.to);
        let (days, breakdowns, s) = tokio::try_join!(
            day_q.fetch_all(pool),
            breakdown_q.fetch_all(pool),
            sites_q.fetch_all(pool)
        )?;
        sites = s;
        for (gd, gv, d, vf, vid, n, secs, comp, aud) in days {
            let f = fig(n, secs, comp, aud);
            match (gd, gv) {
                (1, 1) => total = f,
                (0, 1) => {
                    if let Some(d) = d {
                        by_day.insert(d, f);
                    }
                }
                (1, 0) => push_video(vf, vid, f),
                _ => {}
            }
        }
        for (gp, p, e, n, secs, comp, aud) in breakdowns {
            let f = fig(n, secs, comp, aud);
            if gp == 0 {
                by_period.insert(p.unwrap_or_default(), f);
            } else {
                by_event.insert(e.unwrap_or_default(), f);
            }
        }
    } else {
        let groups_sql = if q.site_id.is_some() {
            GROUPS_SQL
                .replace("{SRC}", "sponsor_daily_stats")
                .replace("{SITE}", "AND t.site_id = $7")
        } else {
            GROUPS_SQL
                .replace("{SRC}", "analytics_video_daily")
                .replace("{SITE}", "")
        };
        let mut groups_q = sqlx::query_as::<_, GroupRow>(&groups_sql)
            .bind(&att.filenames)
            .bind(&att.video_ids)
            .bind(q.from)
            .bind(q.to)
            .bind(&period)
            .bind(&event_type);
        if let Some(s) = &q.site_id {
            groups_q = groups_q.bind(s);
        }
        let (groups, s) = tokio::try_join!(groups_q.fetch_all(pool), sites_q.fetch_all(pool))?;
        sites = s;
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
                (1, 1, 1, 0) => push_video(vf, vid, f),
                _ => {}
            }
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
