//! Test fixtures: plays inserted with SQL into the tables the ingestor fills,
//! rollups built the ingestor's way, the real App on 127.0.0.1:0, and an
//! independent computation of the figures from the raw rows.
#![allow(dead_code)]

use analytics::{App, Settings};
use chrono::{DateTime, NaiveDate, Utc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet};
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "test-token-1";

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub pool: PgPool,
}

impl TestApp {
    pub async fn start(pool: PgPool) -> TestApp {
        runtime::tls::install_crypto_provider();
        runtime::telemetry::init(runtime::telemetry::LogFormat::Human);
        let settings = Settings {
            http_addr: "127.0.0.1:0".parse().unwrap(),
            api_tokens: vec!["other-token".into(), TOKEN.into()],
            migrate: false,
            ..Settings::default()
        };
        let app = App::build_with_pool(settings, pool.clone()).await.unwrap();
        let base = format!("http://{}", app.addr());
        let shutdown = CancellationToken::new();
        tokio::spawn(app.run(shutdown.clone()));
        TestApp {
            base,
            client: reqwest::Client::new(),
            shutdown,
            pool,
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{}", self.base, path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
    }

    pub async fn json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }

    pub async fn post_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(format!("{}{}", self.base, path))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs a CSV body (the catalogue import).
    pub async fn post_csv(&self, path: &str, body: impl Into<String>) -> reqwest::Response {
        self.client
            .post(format!("{}{}", self.base, path))
            .bearer_auth(TOKEN)
            .header("content-type", "text/csv")
            .body(body.into())
            .send()
            .await
            .unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Clone, Debug)]
pub struct Play {
    pub impression_id: uuid::Uuid,
    pub site_id: String,
    pub video_id: Option<String>,
    pub video_filename: String,
    pub played_at: DateTime<Utc>,
    pub duration_played: f64,
    pub video_duration: f64,
    pub completed: bool,
    pub event_type: String,
    pub period: String,
    pub audience: Option<i32>,
}

pub const PERIODS: [&str; 4] = ["pre_match", "halftime", "post_match", "loop"];
pub const EVENTS: [&str; 4] = ["match", "training", "tournament", "other"];

/// Catalogue videos (video_id, filename) played in the fixtures.
pub const VIDEOS: [(Option<&str>, &str); 7] = [
    (Some("cc-1"), "coke_summer.mp4"),           // coca-cola by video_id
    (Some("cc-2"), "coke_winter.mp4"),           // coca-cola by video_id
    (None, "sponsor_coca_cola_goal.mp4"),        // coca-cola by filename rule
    (None, "sponsor_coca_cola_halftime_v2.mp4"), // coca-cola by filename rule
    (Some("ad-1"), "adidas_run.mp4"),            // adidas by video_id
    (None, "sponsor_adidas_boots.mp4"),          // adidas by filename rule
    (None, "club_intro.mp4"),                    // nobody
];

pub fn random_plays(seed: u64, n: usize, from: NaiveDate, days: i64, sites: usize) -> Vec<Play> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = from.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp();
    (0..n)
        .map(|_| {
            let (vid, file) = VIDEOS[rng.random_range(0..VIDEOS.len())];
            let vdur = [15.0, 30.0][rng.random_range(0..2)];
            let completed = rng.random_bool(0.8);
            Play {
                impression_id: uuid::Uuid::new_v4(),
                site_id: format!("site-{}", rng.random_range(0..sites)),
                video_id: vid.map(str::to_owned),
                video_filename: file.to_owned(),
                played_at: DateTime::from_timestamp(
                    start + rng.random_range(0..days * 86400),
                    rng.random_range(0..1_000_000u32) * 1000,
                )
                .unwrap(),
                duration_played: if completed {
                    vdur
                } else {
                    (rng.random_range(0.0..vdur) * 1000.0f64).round() / 1000.0
                },
                video_duration: vdur,
                completed,
                event_type: EVENTS[rng.random_range(0..4)].to_owned(),
                period: PERIODS[rng.random_range(0..4)].to_owned(),
                audience: if rng.random_bool(0.9) {
                    Some(rng.random_range(0..300))
                } else {
                    None
                },
            }
        })
        .collect()
}

/// Inserts raw plays (the columns the ingestor writes).
pub async fn insert_plays(pool: &PgPool, plays: &[Play]) {
    let mut tx = pool.begin().await.unwrap();
    insert_plays_tx(&mut tx, plays).await;
    tx.commit().await.unwrap();
}

/// [`insert_plays`] inside the caller's transaction.
pub async fn insert_plays_tx(tx: &mut sqlx::PgConnection, plays: &[Play]) {
    for chunk in plays.chunks(500) {
        let mut qb = sqlx::QueryBuilder::new(
            "INSERT INTO sponsor_impressions (impression_id, site_id, video_id, video_filename, played_at, \
             duration_played, video_duration, completed, event_type, period, trigger_type, audience_estimate) ",
        );
        qb.push_values(chunk, |mut b, p| {
            b.push_bind(p.impression_id)
                .push_bind(&p.site_id)
                .push_bind(&p.video_id)
                .push_bind(&p.video_filename)
                .push_bind(p.played_at)
                .push_bind(p.duration_played)
                .push_bind(p.video_duration)
                .push_bind(p.completed)
                .push_bind(&p.event_type)
                .push_bind(&p.period)
                .push_bind("auto")
                .push_bind(p.audience);
        });
        qb.build().execute(&mut *tx).await.unwrap();
    }
}

/// Recomputes the rollup of every day the plays touch.
pub async fn recompute_days(pool: &PgPool, plays: &[Play]) {
    let days: BTreeSet<NaiveDate> = plays.iter().map(|p| p.played_at.date_naive()).collect();
    for d in days {
        sqlx::query("SELECT calculate_sponsor_daily_stats($1)")
            .bind(d)
            .execute(pool)
            .await
            .unwrap();
    }
}

/// The ingestor's way for new plays: insert them and, in the same
/// transaction, queue their aggregates per daily-rollup key in
/// sponsor_daily_pending (readers fold the queue before they read).
pub async fn ingest_like_ingestor(pool: &PgPool, plays: &[Play]) {
    let mut tx = pool.begin().await.unwrap();
    insert_plays_tx(&mut tx, plays).await;
    queue_rollup_tx(&mut tx, plays).await;
    tx.commit().await.unwrap();
}

/// The ingestor's rollup delta of `plays` (already inserted in `tx`).
pub async fn queue_rollup_tx(tx: &mut sqlx::PgConnection, plays: &[Play]) {
    let ids: Vec<uuid::Uuid> = plays.iter().map(|p| p.impression_id).collect();
    sqlx::query(
        "INSERT INTO sponsor_daily_pending (day, site_id, video_id, video_filename, period, event_type,
             impressions, seconds_played, completed_count, audience_sum)
         SELECT (played_at AT TIME ZONE 'UTC')::date, site_id, coalesce(video_id, ''), video_filename, period, event_type,
                count(*), sum(duration_played), count(*) FILTER (WHERE completed), coalesce(sum(audience_estimate), 0)
         FROM sponsor_impressions WHERE impression_id = ANY($1)
         GROUP BY 1, 2, 3, 4, 5, 6",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await
    .unwrap();
}

pub async fn seed_catalogue(app: &TestApp) {
    for (id, name) in [("coca-cola", "Coca-Cola"), ("adidas", "Adidas")] {
        let r = app
            .post_json("/api/sponsors", serde_json::json!({"id": id, "name": name}))
            .await;
        assert_eq!(r.status(), 201);
    }
    for (s, body) in [
        ("coca-cola", serde_json::json!({"video_id": "cc-1"})),
        ("coca-cola", serde_json::json!({"video_id": "cc-2"})),
        (
            "coca-cola",
            serde_json::json!({"filename_pattern": "sponsor_coca_cola_*"}),
        ),
        ("adidas", serde_json::json!({"video_id": "ad-1"})),
        ("adidas", serde_json::json!({"filename_pattern": "sponsor_adidas_*"})),
    ] {
        let r = app.post_json(&format!("/api/sponsors/{s}/videos"), body).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
}

/// Glob (`*`, `?`) match, written independently of the SQL LIKE translation.
pub fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// The catalogue as rules: (sponsor, video_id, pattern).
pub async fn rules(pool: &PgPool) -> Vec<(String, Option<String>, Option<String>)> {
    sqlx::query_as("SELECT sponsor_id, video_id, filename_pattern FROM videos")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Attribution in Rust: explicit video_id first, else the longest pattern.
pub fn attribute(rules: &[(String, Option<String>, Option<String>)], p: &Play) -> Option<String> {
    if let Some(v) = &p.video_id {
        if let Some(r) = rules.iter().find(|r| r.1.as_deref() == Some(v.as_str())) {
            return Some(r.0.clone());
        }
    }
    rules
        .iter()
        .filter_map(|r| r.2.as_ref().map(|pat| (r, pat)))
        .filter(|(_, pat)| glob(pat.as_bytes(), p.video_filename.as_bytes()))
        .max_by_key(|(_, pat)| pat.len())
        .map(|(r, _)| r.0.clone())
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Agg {
    pub impressions: i64,
    pub seconds: f64,
    pub completed: i64,
    pub audience: i64,
}

impl Agg {
    fn add(&mut self, p: &Play) {
        self.impressions += 1;
        self.seconds += p.duration_played;
        self.completed += p.completed as i64;
        self.audience += p.audience.unwrap_or(0) as i64;
    }
}

#[derive(Debug, Default)]
pub struct Expected {
    pub total: Agg,
    pub by_period: BTreeMap<String, Agg>,
    pub by_event: BTreeMap<String, Agg>,
    pub by_site: BTreeMap<String, Agg>,
    pub by_day: BTreeMap<NaiveDate, Agg>,
    pub by_video: BTreeMap<(String, String), Agg>,
}

pub struct Filter<'a> {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub site_id: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub period: Option<&'a str>,
}

impl Filter<'_> {
    pub fn query(&self) -> String {
        let mut q = format!("from={}&to={}", self.from, self.to);
        for (k, v) in [
            ("site_id", self.site_id),
            ("event_type", self.event_type),
            ("period", self.period),
        ] {
            if let Some(v) = v {
                q.push_str(&format!("&{k}={v}"));
            }
        }
        q
    }
}

pub fn expected(
    plays: &[Play],
    rules: &[(String, Option<String>, Option<String>)],
    sponsor: &str,
    f: &Filter<'_>,
) -> Expected {
    let mut e = Expected::default();
    for p in plays {
        let d = p.played_at.date_naive();
        if d < f.from || d > f.to {
            continue;
        }
        if f.site_id.is_some_and(|s| s != p.site_id)
            || f.event_type.is_some_and(|s| s != p.event_type)
            || f.period.is_some_and(|s| s != p.period)
        {
            continue;
        }
        if attribute(rules, p).as_deref() != Some(sponsor) {
            continue;
        }
        e.total.add(p);
        e.by_period.entry(p.period.clone()).or_default().add(p);
        e.by_event.entry(p.event_type.clone()).or_default().add(p);
        e.by_site.entry(p.site_id.clone()).or_default().add(p);
        e.by_day.entry(d).or_default().add(p);
        e.by_video
            .entry((p.video_filename.clone(), p.video_id.clone().unwrap_or_default()))
            .or_default()
            .add(p);
    }
    e
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 0.01
}

fn check_fig(ctx: &str, v: &Value, a: &Agg) {
    assert_eq!(v["impressions"].as_i64().unwrap(), a.impressions, "{ctx} impressions");
    assert_eq!(v["completed"].as_i64().unwrap(), a.completed, "{ctx} completed");
    assert_eq!(v["audience"].as_i64().unwrap(), a.audience, "{ctx} audience");
    assert!(
        close(v["screen_time_seconds"].as_f64().unwrap(), a.seconds),
        "{ctx} seconds {v} vs {a:?}"
    );
}

/// Asserts that the API's stats document equals the independent figures.
pub fn assert_stats(ctx: &str, s: &Value, e: &Expected, f: &Filter<'_>) {
    assert_eq!(
        s["total_impressions"].as_i64().unwrap(),
        e.total.impressions,
        "{ctx}: total_impressions"
    );
    assert_eq!(s["completed"].as_i64().unwrap(), e.total.completed, "{ctx}: completed");
    assert_eq!(
        s["audience_reached"].as_i64().unwrap(),
        e.total.audience,
        "{ctx}: audience"
    );
    assert!(
        close(s["screen_time_seconds"].as_f64().unwrap(), e.total.seconds),
        "{ctx}: screen time"
    );
    let rate = if e.total.impressions == 0 {
        0.0
    } else {
        e.total.completed as f64 / e.total.impressions as f64
    };
    assert!(
        (s["completion_rate"].as_f64().unwrap() - rate).abs() < 1e-5,
        "{ctx}: rate"
    );
    assert_eq!(
        s["sites_reached"].as_i64().unwrap(),
        e.by_site.len() as i64,
        "{ctx}: sites_reached"
    );
    for (key, list, map) in [
        ("period", &s["by_period"], &e.by_period),
        ("event", &s["by_event_type"], &e.by_event),
    ] {
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 4, "{ctx}: {key} lists every value");
        for item in list {
            let k = item["key"].as_str().unwrap();
            check_fig(
                &format!("{ctx} {key}={k}"),
                item,
                &map.get(k).cloned().unwrap_or_default(),
            );
        }
    }
    let sites = s["by_site"].as_array().unwrap();
    assert_eq!(sites.len(), e.by_site.len(), "{ctx}: by_site length");
    for item in sites {
        let k = item["site_id"].as_str().unwrap();
        check_fig(&format!("{ctx} site={k}"), item, &e.by_site[k]);
    }
    let daily = s["daily"].as_array().unwrap();
    assert_eq!(
        daily.len() as i64,
        (f.to - f.from).num_days() + 1,
        "{ctx}: one entry per day"
    );
    for item in daily {
        let d: NaiveDate = item["day"].as_str().unwrap().parse().unwrap();
        check_fig(
            &format!("{ctx} day={d}"),
            item,
            &e.by_day.get(&d).cloned().unwrap_or_default(),
        );
    }
    let videos = s["top_videos"].as_array().unwrap();
    assert_eq!(videos.len(), e.by_video.len().min(20), "{ctx}: top_videos length");
    let mut prev = i64::MAX;
    for item in videos {
        let k = (
            item["video_filename"].as_str().unwrap().to_owned(),
            item["video_id"].as_str().unwrap_or("").to_owned(),
        );
        check_fig(&format!("{ctx} video={k:?}"), item, &e.by_video[&k]);
        let n = item["impressions"].as_i64().unwrap();
        assert!(n <= prev, "{ctx}: top_videos sorted");
        prev = n;
    }
}

pub fn day(s: &str) -> NaiveDate {
    s.parse().unwrap()
}
