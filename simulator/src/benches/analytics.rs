//! `neopro-sim bench-analytics`: loads a realistic year into a bench database
//! and measures what sponsors and operators feel, against the real
//! `analytics::App` in this process.
//!
//! Data: `--plays` (default 10,000,000) over `--sites` (1,000) and
//! `--days` (365, ending yesterday), `--videos` (200) attributed to
//! `--sponsors` (40) — 70 % by explicit video_id, 30 % by filename rule —
//! with Zipf-skewed video popularity, loaded with COPY, then rolled up with
//! an upsert of the daily fold's shape (`INSERT INTO sponsor_daily_stats ...
//! ON CONFLICT`) so the analytics triggers build their rollups.
//!
//! Figures printed:
//! * stats endpoint latency, warm (p50/p95/p99 over a mix of sponsors, ranges
//!   and filters) and cold (first request after restarting the App with a new
//!   pool and, as root, dropping the OS page cache; PostgreSQL's shared
//!   buffers cannot be dropped without restarting the server, which the bench
//!   does not do on a shared machine);
//! * the baseline: the seed's approach (aggregating the raw plays for the
//!   same query) measured in the same run, and the ratio;
//! * the playout export of the biggest sponsor's year: rows/s and the process
//!   RSS before and at peak during the export;
//! * what the ingestor's background fold of one batch's queued deltas costs,
//!   and the analytics triggers' share of it.

use analytics::{App, Settings};
use chrono::{Datelike, Days, NaiveDate, Utc};
use clap::Args;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};
use std::str::FromStr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Options of `neopro-sim bench-analytics`: the benchmark's own, and the
/// flags of `neopro-analytics` (`--database-url` names the server).
#[derive(Debug, Args)]
pub struct BenchAnalyticsArgs {
    #[command(flatten)]
    pub bench: BenchArgs,
    #[command(flatten)]
    pub analytics: analytics::settings::CommonArgs,
}

/// The benchmark's own options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Plays to load.
    #[arg(long, default_value_t = 10_000_000)]
    pub plays: u64,
    /// Sites (venues).
    #[arg(long, default_value_t = 1000)]
    pub sites: u32,
    /// Distinct videos.
    #[arg(long, default_value_t = 200)]
    pub videos: u32,
    /// Sponsors.
    #[arg(long, default_value_t = 40)]
    pub sponsors: u32,
    /// Days of data, ending yesterday (UTC).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Bench database (created on the server of --database-url; dropped and
    /// recreated unless --reuse finds it loaded with the same --plays).
    #[arg(long, default_value = "neopro_analytics_bench")]
    pub bench_db: String,
    /// Reuse an already loaded bench database.
    #[arg(long)]
    pub reuse: bool,
    /// Warm stats requests.
    #[arg(long, default_value_t = 400)]
    pub warm_requests: usize,
    /// Cold runs (App restart + cache drop before each).
    #[arg(long, default_value_t = 12)]
    pub cold_runs: usize,
    /// Baseline (raw-table) runs.
    #[arg(long, default_value_t = 5)]
    pub baseline_runs: usize,
    /// RNG seed (the dataset is deterministic for a seed).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

const TOKEN: &str = "bench-token";
const PERIODS: [(&str, f64); 4] = [
    ("loop", 0.55),
    ("pre_match", 0.15),
    ("halftime", 0.15),
    ("post_match", 0.15),
];
const EVENTS: [(&str, f64); 4] = [("match", 0.5), ("training", 0.3), ("tournament", 0.1), ("other", 0.1)];

fn pick<'a>(r: f64, table: &[(&'a str, f64)]) -> &'a str {
    let mut acc = 0.0;
    for (k, w) in table {
        acc += w;
        if r < acc {
            return k;
        }
    }
    table[table.len() - 1].0
}

struct Video {
    filename: String,
    video_id: Option<String>,
    duration: f64,
}

fn catalogue(args: &BenchArgs) -> (Vec<Video>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
    let mut videos = Vec::new();
    for k in 0..args.videos {
        let sponsor = k % args.sponsors;
        let explicit = k % 10 < 7;
        videos.push(Video {
            filename: if explicit {
                format!("clip_{k:04}.mp4")
            } else {
                format!("sponsor_s{sponsor:02}_clip{k:04}.mp4")
            },
            video_id: explicit.then(|| format!("vid-{k:04}")),
            duration: [15.0, 20.0, 30.0, 45.0][rng.random_range(0..4)],
        });
    }
    // Zipf(1.0) popularity over a random permutation of the videos.
    let mut ranks: Vec<usize> = (0..videos.len()).collect();
    for i in (1..ranks.len()).rev() {
        let j = rng.random_range(0..=i);
        ranks.swap(i, j);
    }
    let weights: Vec<f64> = ranks.iter().map(|r| 1.0 / (*r as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    let cdf = weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect();
    (videos, cdf)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn loaded_plays(url: &str) -> Option<i64> {
    let mut c = sqlx::PgConnection::connect(url).await.ok()?;
    sqlx::query_scalar("SELECT coalesce(sum(impressions), 0)::int8 FROM sponsor_daily_stats")
        .fetch_one(&mut c)
        .await
        .ok()
}

async fn load(args: &BenchArgs, url: &str, first_day: NaiveDate) -> anyhow::Result<()> {
    runtime::db::recreate_database(url).await?;
    let pool = runtime::db::connect(url, 4).await?;
    runtime::db::migrate(&pool).await?;
    sqlx::query("SELECT create_impression_partitions($1, $2)")
        .bind(first_day)
        .bind((args.days / 28 + 3) as i32)
        .execute(&pool)
        .await?;

    let (videos, cdf) = catalogue(args);
    let mut tx = pool.begin().await?;
    for s in 0..args.sponsors {
        sqlx::query("INSERT INTO sponsors (id, name) VALUES ($1, $2)")
            .bind(format!("s{s:02}"))
            .bind(format!("Sponsor {s:02}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO videos (sponsor_id, filename_pattern) VALUES ($1, $2)")
            .bind(format!("s{s:02}"))
            .bind(format!("sponsor_s{s:02}_*"))
            .execute(&mut *tx)
            .await?;
    }
    for (k, v) in videos.iter().enumerate() {
        if let Some(id) = &v.video_id {
            sqlx::query("INSERT INTO videos (sponsor_id, video_id, title) VALUES ($1, $2, $3)")
                .bind(format!("s{:02}", k as u32 % args.sponsors))
                .bind(id)
                .bind(format!("Clip {k}"))
                .execute(&mut *tx)
                .await?;
        }
    }
    sqlx::query("INSERT INTO sites (site_id, name) SELECT 'site-' || lpad(i::text, 4, '0'), 'Club ' || i FROM generate_series(0, $1 - 1) i")
        .bind(args.sites as i32)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;

    eprintln!("bench: loading {} plays with COPY ...", args.plays);
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    let mut copy = conn
        .copy_in_raw(
            "COPY sponsor_impressions (impression_id, site_id, seq, video_id, video_filename, played_at, \
             duration_played, video_duration, completed, event_type, period, trigger_type, audience_estimate) FROM STDIN",
        )
        .await?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut buf = String::with_capacity(8 << 20);
    let start_ts = first_day.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp();
    let span = args.days as i64 * 86400;
    use std::fmt::Write;
    for i in 0..args.plays {
        let site = rng.random_range(0..args.sites);
        let r: f64 = rng.random();
        let v = cdf.partition_point(|c| *c < r).min(videos.len() - 1);
        let video = &videos[v];
        let at = start_ts + rng.random_range(0..span);
        let micros: u32 = rng.random_range(0..1_000_000);
        let ts = chrono::DateTime::from_timestamp(at, micros * 1000).expect("valid time");
        let completed = rng.random::<f64>() < 0.85;
        let played = if completed {
            video.duration
        } else {
            (video.duration * rng.random::<f64>() * 1000.0).round() / 1000.0
        };
        let audience = if rng.random::<f64>() < 0.9 {
            rng.random_range(0..400).to_string()
        } else {
            "\\N".to_owned()
        };
        let _ = writeln!(
            buf,
            "{}\tsite-{:04}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            uuid::Uuid::from_u128(rng.random()),
            site,
            i + 1,
            video.video_id.as_deref().unwrap_or("\\N"),
            video.filename,
            ts.format("%Y-%m-%d %H:%M:%S%.6f+00"),
            played,
            video.duration,
            completed,
            pick(rng.random(), &EVENTS),
            pick(rng.random(), &PERIODS),
            if rng.random::<f64>() < 0.9 { "auto" } else { "manual" },
            audience
        );
        if buf.len() >= (8 << 20) - 512 {
            copy.send(buf.as_bytes()).await?;
            buf.clear();
        }
        if (i + 1) % 1_000_000 == 0 {
            eprintln!(
                "bench:   {} plays sent ({:.0} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    if !buf.is_empty() {
        copy.send(buf.as_bytes()).await?;
    }
    copy.finish().await?;
    drop(conn);
    let load_s = started.elapsed().as_secs_f64();

    // Roll up month by month with the daily fold's upsert shape; the
    // analytics triggers queue each statement's delta, folded after it.
    let started = Instant::now();
    let last = first_day + Days::new(args.days as u64);
    let mut m = first_day;
    while m < last {
        let next = (m + chrono::Months::new(1)).min(last);
        sqlx::query(
            "INSERT INTO sponsor_daily_stats (day, site_id, video_id, video_filename, period, event_type,
                 impressions, seconds_played, completed_count, audience_sum)
             SELECT (played_at AT TIME ZONE 'UTC')::date, site_id, coalesce(video_id, ''), video_filename, period, event_type,
                    count(*), sum(duration_played), count(*) FILTER (WHERE completed), coalesce(sum(audience_estimate), 0)
             FROM sponsor_impressions
             WHERE played_at >= $1::date::timestamp AT TIME ZONE 'UTC' AND played_at < $2::date::timestamp AT TIME ZONE 'UTC'
             GROUP BY 1, 2, 3, 4, 5, 6
             ON CONFLICT (day, site_id, video_filename, video_id, period, event_type) DO UPDATE SET
                 impressions = sponsor_daily_stats.impressions + excluded.impressions,
                 seconds_played = sponsor_daily_stats.seconds_played + excluded.seconds_played,
                 completed_count = sponsor_daily_stats.completed_count + excluded.completed_count,
                 audience_sum = sponsor_daily_stats.audience_sum + excluded.audience_sum",
        )
        .bind(m)
        .bind(next)
        .execute(&pool)
        .await?;
        // The triggers queued the month's deltas; fold them into the
        // per-sponsor rollups (the ingestor does this about once a second).
        sqlx::query("SELECT sponsor_rollups_fold()").execute(&pool).await?;
        m = next;
    }
    sqlx::query("ANALYZE").execute(&pool).await?;
    let rollup_s = started.elapsed().as_secs_f64();
    let counts: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM sponsor_daily_stats), (SELECT count(*) FROM sponsor_site_daily),
                (SELECT count(*) FROM sponsor_site_daily_detail), (SELECT count(*) FROM sponsor_video_daily)",
    )
    .fetch_one(&pool)
    .await?;
    println!(
        "bench load: plays={} sites={} videos={} sponsors={} days={} copy_s={:.1} ({:.0} rows/s) rollup_s={:.1} rows: sponsor_daily_stats={} sponsor_site_daily={} sponsor_site_daily_detail={} sponsor_video_daily={}",
        args.plays,
        args.sites,
        args.videos,
        args.sponsors,
        args.days,
        load_s,
        args.plays as f64 / load_s,
        rollup_s,
        counts.0,
        counts.1,
        counts.2,
        counts.3
    );
    pool.close().await;
    Ok(())
}

fn drop_os_caches() -> Result<(), String> {
    // SAFETY-free: plain file writes; needs root.
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").map_err(|e| e.to_string())
}

async fn start_app(
    url: &str,
) -> anyhow::Result<(String, CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let settings = Settings {
        database_url: url.to_owned(),
        http_addr: "127.0.0.1:0".parse()?,
        api_tokens: vec![TOKEN.to_owned()],
        migrate: false,
        ..Settings::default()
    };
    let app = App::build(settings).await?;
    let base = format!("http://{}", app.addr());
    let token = CancellationToken::new();
    let t = token.clone();
    let h = tokio::spawn(async move { app.run(t).await });
    Ok((base, token, h))
}

fn summary(h: &Histogram<u64>) -> String {
    format!(
        "n={} p50={:.1}ms p95={:.1}ms p99={:.1}ms max={:.1}ms",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.95) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    )
}

async fn timed_get(client: &reqwest::Client, url: &str) -> anyhow::Result<(u64, serde_json::Value)> {
    let t = Instant::now();
    let r = client.get(url).bearer_auth(TOKEN).send().await?;
    let status = r.status();
    let body = r.bytes().await?;
    let us = t.elapsed().as_micros() as u64;
    anyhow::ensure!(
        status.is_success(),
        "{url}: HTTP {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok((us, serde_json::from_slice(&body)?))
}

/// The seed's approach: aggregate the raw plays for the query.
async fn baseline(pool: &PgPool, sponsor: &str, from: NaiveDate, to: NaiveDate) -> anyhow::Result<(i64, i64)> {
    // Same attribution list as ours (attributing each raw row with
    // sponsor_of would cost seconds more and measure the catalogue, not the
    // aggregation).
    let att = analytics::stats::attributed_videos(pool, sponsor)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (files, ids) = (att.filenames, att.video_ids);
    let lo = from.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let hi = (to + Days::new(1)).and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let sel = "FROM sponsor_impressions i WHERE i.played_at >= $3 AND i.played_at < $4
               AND (i.video_filename, coalesce(i.video_id, '')) IN (SELECT * FROM unnest($1::text[], $2::text[]))";
    let groups_sql = format!(
        "SELECT count(*) {sel} GROUP BY GROUPING SETS ((), (period), (event_type), ((played_at AT TIME ZONE 'UTC')::date), (video_filename, video_id))"
    );
    let sites_sql = format!("SELECT count(DISTINCT site_id) {sel}");
    let groups = sqlx::query_as::<_, (Option<i64>,)>(&groups_sql)
        .bind(&files)
        .bind(&ids)
        .bind(lo)
        .bind(hi)
        .fetch_all(pool);
    let sites = sqlx::query_as::<_, (i64,)>(&sites_sql)
        .bind(&files)
        .bind(&ids)
        .bind(lo)
        .bind(hi)
        .fetch_one(pool);
    let (g, s) = tokio::try_join!(groups, sites)?;
    // The first grouping set row with the largest count is the grand total.
    let total = g.iter().filter_map(|r| r.0).max().unwrap_or(0);
    Ok((total, s.0))
}

/// Runs the benchmark on the server of the analytics settings (file <
/// environment < flags, as `neopro-analytics` loads them).
pub async fn run(args: BenchAnalyticsArgs) -> anyhow::Result<()> {
    let settings = args.analytics.settings()?;
    run_with(settings, args.bench).await
}

/// Runs the benchmark and prints its figures.
pub async fn run_with(settings: Settings, args: BenchArgs) -> anyhow::Result<()> {
    runtime::tls::install_crypto_provider();
    let url = crate::pg::with_database(&settings.database_url, &args.bench_db)?;
    let today = Utc::now().date_naive();
    let first_day = today - Days::new(args.days as u64);
    let last_day = today - Days::new(1);
    match loaded_plays(&url).await {
        Some(n) if args.reuse && n == args.plays as i64 => {
            // A database loaded by an earlier version gets the newer
            // migrations (and their backfill) first.
            let pool = runtime::db::connect(&url, 2).await?;
            let t = Instant::now();
            runtime::db::migrate(&pool).await?;
            pool.close().await;
            println!(
                "bench load: reusing {} ({} plays); migrations applied in {:.1}s",
                args.bench_db,
                n,
                t.elapsed().as_secs_f64()
            )
        }
        _ => load(&args, &url, first_day).await?,
    }
    // The data's own range (a reused database may be from an earlier day).
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(sqlx::postgres::PgConnectOptions::from_str(&url)?)
        .await?;
    // Nothing left over from an earlier run in the queues (dead rows of
    // rolled-back batches would make each fold scan them).
    sqlx::raw_sql("VACUUM sponsor_daily_pending, sponsor_rollup_pending")
        .execute(&pool)
        .await?;
    let (d0, d1): (NaiveDate, NaiveDate) = sqlx::query_as("SELECT min(day), max(day) FROM sponsor_stats_daily")
        .fetch_one(&pool)
        .await?;
    let _ = (first_day, last_day);
    let ranked: Vec<(String, i64)> =
        sqlx::query_as("SELECT sponsor_id, sum(impressions)::int8 FROM sponsor_stats_daily GROUP BY 1 ORDER BY 2 DESC")
            .fetch_all(&pool)
            .await?;
    anyhow::ensure!(!ranked.is_empty(), "no attributed plays in the bench database");
    let top = ranked[0].0.clone();
    let mid = ranked[ranked.len() / 2].0.clone();
    let small = ranked[ranked.len() - 1].0.clone();
    println!(
        "bench sponsors: top={} ({} plays) median={} ({}) smallest={} ({}) data {}..{}",
        top,
        ranked[0].1,
        mid,
        ranked[ranked.len() / 2].1,
        small,
        ranked[ranked.len() - 1].1,
        d0,
        d1
    );

    // Calendar-aligned: the last 12 whole months (the monthly rollups answer
    // all of it); the 365-day range ending yesterday has partial months at
    // both ends (edge days read sponsor_daily_stats for the by-site part).
    let m_end = d1.with_day(1).expect("first of month");
    let m_end = if d1.succ_opt().map(|d| d.day() == 1).unwrap_or(false) {
        d1.succ_opt().expect("next day")
    } else {
        m_end
    };
    let m_start = m_end - chrono::Months::new(12);
    let m_last = m_end.pred_opt().expect("previous day");
    let mid_from = d0 + Days::new(((d1 - d0).num_days() / 4) as u64);
    let mid_to = d1 - Days::new(((d1 - d0).num_days() / 5) as u64);
    let m30 = d1 - Days::new(29);
    let w7 = d1 - Days::new(6);
    let queries: Vec<(String, String)> = [&top, &mid, &small]
        .iter()
        .flat_map(|s| {
            vec![
                (
                    format!("{s} 12 whole months"),
                    format!("{s}/stats?from={m_start}&to={m_last}"),
                ),
                (format!("{s} 365 days"), format!("{s}/stats?from={d0}&to={d1}")),
                (
                    format!("{s} mid-month range"),
                    format!("{s}/stats?from={mid_from}&to={mid_to}"),
                ),
                (format!("{s} 30 days"), format!("{s}/stats?from={m30}&to={d1}")),
                (format!("{s} 7 days"), format!("{s}/stats?from={w7}&to={d1}")),
                (
                    format!("{s} 30 days halftime"),
                    format!("{s}/stats?from={m30}&to={d1}&period=halftime"),
                ),
                (
                    format!("{s} year one site"),
                    format!("{s}/stats?from={d0}&to={d1}&site_id=site-0007"),
                ),
            ]
        })
        .collect();

    let client = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;

    // Cold: a fresh App (new pool, new backends) and dropped OS caches before each.
    let mut cold = Histogram::<u64>::new(3)?;
    let mut cold_each = Vec::new();
    let mut drop_note = String::new();
    for i in 0..args.cold_runs {
        drop_note = match drop_os_caches() {
            Ok(()) => "OS page cache dropped (echo 3 > /proc/sys/vm/drop_caches)".into(),
            Err(e) => format!("OS page cache NOT dropped ({e})"),
        };
        let (base, token, h) = start_app(&url).await?;
        let (name, q) = &queries[i % queries.len()];
        let (us, _) = timed_get(&client, &format!("{base}/api/analytics/sponsors/{q}")).await?;
        cold.record(us)?;
        cold_each.push(format!("{name}: {:.0}ms", us as f64 / 1000.0));
        token.cancel();
        h.await??;
    }

    // Warm.
    let (base, token, h) = start_app(&url).await?;
    for (_, q) in &queries {
        timed_get(&client, &format!("{base}/api/analytics/sponsors/{q}")).await?;
    }
    let mut warm = Histogram::<u64>::new(3)?;
    let mut per: Vec<Histogram<u64>> = queries.iter().map(|_| Histogram::new(3).expect("histogram")).collect();
    for i in 0..args.warm_requests {
        let k = i % queries.len();
        let (us, _) = timed_get(&client, &format!("{base}/api/analytics/sponsors/{}", queries[k].1)).await?;
        warm.record(us)?;
        per[k].record(us)?;
    }
    println!(
        "stats cold ({drop_note}; new App + pool; PostgreSQL shared_buffers stay warm): {}",
        summary(&cold)
    );
    println!("  cold samples: {}", cold_each.join(", "));
    println!("stats warm (mix of {} queries): {}", queries.len(), summary(&warm));
    for ((name, _), h) in queries.iter().zip(&per) {
        println!("  warm {:<28} {}", name, summary(h));
    }

    // Baseline: the seed's approach for the top sponsor's year, vs ours.
    let (_, ours) = timed_get(
        &client,
        &format!("{base}/api/analytics/sponsors/{top}/stats?from={d0}&to={d1}"),
    )
    .await?;
    let mut base_h = Histogram::<u64>::new(3)?;
    let mut base_res = (0, 0);
    for _ in 0..args.baseline_runs.max(1) {
        let t = Instant::now();
        base_res = baseline(&pool, &top, d0, d1).await?;
        base_h.record(t.elapsed().as_micros() as u64)?;
    }
    let ours_p50 = per[1].value_at_quantile(0.5) as f64;
    let same =
        ours["total_impressions"].as_i64() == Some(base_res.0) && ours["sites_reached"].as_i64() == Some(base_res.1);
    println!(
        "baseline (seed approach: aggregate raw plays) {top} 365 days: {} ; rollups (same query, warm) p50={:.1}ms ; ratio baseline/rollups p50 = {:.1}x ; figures equal: {} (impressions {} vs {}, sites {} vs {})",
        summary(&base_h),
        ours_p50 / 1000.0,
        base_h.value_at_quantile(0.5) as f64 / ours_p50.max(1.0),
        same,
        base_res.0,
        ours["total_impressions"],
        base_res.1,
        ours["sites_reached"]
    );

    // Playout export of the top sponsor's year, RSS sampled meanwhile.
    let rss_before = rss_kib();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let stop = CancellationToken::new();
    let sampler = {
        let peak = peak.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let t = Instant::now();
    let mut resp = client
        .get(format!(
            "{base}/api/analytics/sponsors/{top}/playouts.csv?from={d0}&to={d1}"
        ))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "playouts: HTTP {}", resp.status());
    let (mut bytes, mut lines) = (0u64, 0u64);
    let mut first_byte = None;
    while let Some(chunk) = resp.chunk().await? {
        first_byte.get_or_insert_with(|| t.elapsed());
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    stop.cancel();
    sampler.await?;
    let rows = lines.saturating_sub(1);
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "playouts export {top} year: rows={} (rollup says {}) bytes={} secs={:.1} rate={:.0} rows/s first_byte={:.2}s ; RSS before={:.1}MiB peak={:.1}MiB (+{:.1}MiB)",
        rows,
        ours["total_impressions"],
        bytes,
        secs,
        rows as f64 / secs,
        first_byte.unwrap_or_default().as_secs_f64(),
        rss_before as f64 / 1024.0,
        peak as f64 / 1024.0,
        (peak.saturating_sub(rss_before)) as f64 / 1024.0
    );
    token.cancel();
    h.await??;

    fold_cost(&pool, d1).await?;
    // The rolled-back batches left dead rows in the queues: every fold (so
    // every request) would scan them until autovacuum comes by.
    sqlx::raw_sql("VACUUM sponsor_daily_pending, sponsor_rollup_pending")
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(())
}

/// What the ingestor's background fold costs, and the analytics triggers'
/// share of it. The ingest transaction only appends a batch's per-key deltas
/// to `sponsor_daily_pending`; about once a second the ingestor runs
/// `sponsor_rollups_fold()`, which upserts the queued deltas into
/// `sponsor_daily_stats` (whose triggers queue the per-sponsor deltas) and
/// folds those into the per-sponsor rollups. Measured here: that fold for one
/// batch's queued keys, with the triggers and without (the daily upsert
/// alone), each in a transaction that is rolled back (so the bench data is
/// unchanged; commit cost, identical for both, is excluded; the append
/// itself is not timed). A batch of `keys` keys over as many sites, half
/// increments of existing keys (the last day), half new keys (the next
/// day), all of known videos except `new_videos` never seen before (the
/// per-sponsor fold then runs `sponsor_of()` for them).
async fn fold_cost(pool: &PgPool, day: NaiveDate) -> anyhow::Result<()> {
    const QUEUE: &str = "
        INSERT INTO sponsor_daily_pending (day, site_id, video_id, video_filename, period, event_type,
            impressions, seconds_played, completed_count, audience_sum)
        SELECT CASE WHEN i % 2 = 0 THEN $1::date ELSE $1::date + 1 END,
               'site-' || lpad((($2 * 7 + i) % 1000)::text, 4, '0'),
               CASE WHEN i <= $4 THEN '' ELSE 'vid-' || lpad(k::text, 4, '0') END,
               CASE WHEN i <= $4 THEN 'new_' || $2 || '_' || i || '.mp4' ELSE 'clip_' || lpad(k::text, 4, '0') || '.mp4' END,
               (ARRAY['loop', 'pre_match', 'halftime', 'post_match'])[1 + i % 4],
               (ARRAY['match', 'training'])[1 + (i / 4) % 2], 3, 45.0, 2, 30
        FROM generate_series(1, $3) i,
             -- the catalogue's explicit videos: k % 10 < 7 (see catalogue())
             LATERAL (SELECT ((i % 98) / 7) * 10 + i % 7 AS k) v";
    let mut conn = pool.acquire().await?;
    for (keys, new_videos) in [(50i32, 0i32), (500, 0), (500, 10)] {
        let mut results = Vec::new();
        for with_triggers in [true, false, true, false] {
            let mut h = Histogram::<u64>::new(3)?;
            for b in 0..200i32 {
                let mut tx = conn.begin().await?;
                if !with_triggers {
                    // Session-local: user triggers do not fire (replica role).
                    sqlx::query("SET LOCAL session_replication_role = replica")
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(QUEUE)
                    .bind(day)
                    .bind(b)
                    .bind(keys)
                    .bind(new_videos)
                    .execute(&mut *tx)
                    .await?;
                let t = Instant::now();
                let folded: i64 = sqlx::query_scalar("SELECT sponsor_rollups_fold()")
                    .fetch_one(&mut *tx)
                    .await?;
                h.record(t.elapsed().as_micros() as u64)?;
                anyhow::ensure!(
                    folded >= i64::from(keys),
                    "the fold consumed {folded} of {keys} queued keys"
                );
                tx.rollback().await?;
            }
            results.push((with_triggers, h));
        }
        let with = &results[2].1;
        let without = &results[3].1;
        println!(
            "rollup fold of one batch's queued deltas (sponsor_rollups_fold(), {keys} keys in sponsor_daily_pending, {new_videos} new videos, rolled back): with the per-sponsor triggers p50={:.2}ms p95={:.2}ms ; daily upsert only (triggers off) p50={:.2}ms p95={:.2}ms ; ratio p50 = {:.2}x",
            with.value_at_quantile(0.5) as f64 / 1000.0,
            with.value_at_quantile(0.95) as f64 / 1000.0,
            without.value_at_quantile(0.5) as f64 / 1000.0,
            without.value_at_quantile(0.95) as f64 / 1000.0,
            with.value_at_quantile(0.5) as f64 / (without.value_at_quantile(0.5) as f64).max(1.0)
        );
    }
    Ok(())
}
