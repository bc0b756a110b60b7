//! PostgreSQL for the simulator: a fresh database per run, the raw COPY
//! baseline, the per-sponsor summary and the exactly-once check.
//!
//! Why everything is read back from PostgreSQL: the demo and the benchmark
//! claim that what the boxes played is what sponsors are billed on. The only
//! honest proof is to compare the generated plays with the rows committed in
//! `sponsor_impressions`, id by id, field by field, and to show the summary
//! computed by the database itself (attribution through `sponsor_of()`, as
//! the analytics API does).
//!
//! The COPY baseline writes the same rows into the same table of the same
//! database in PostgreSQL's binary COPY format (no text parsing on the
//! server side, the fastest bulk path PostgreSQL offers), so the ratio
//! e2e / COPY compares our pipeline against the best a loader could do.

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use schema::Impression;
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{ConnectOptions, Connection, Row};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::catalogue::Catalogue;
use crate::plays::SitePlays;

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url).context("invalid database URL")?;
    u.set_path(&format!("/{name}"));
    Ok(u.to_string())
}

/// Empties the impressions and everything derived from them, keeping the
/// catalogue: what `bench --keep-database` does before each round, since a
/// round replays the same plays and rows left by the previous one would all
/// be duplicates. The rollup queues and every rollup below
/// `sponsor_daily_stats` are emptied by the schema's own `AFTER TRUNCATE`
/// triggers on that table (migrations `..._sponsor_rollups.sql`,
/// `..._daily_rollup.sql`), so they are not listed here.
pub async fn clear_impressions(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE sponsor_impressions, impressions_rejected, sponsor_daily_stats")
        .execute(pool)
        .await
        .context("emptying the impression and rollup tables")?;
    Ok(())
}

/// Drops (terminating its sessions) and re-creates the database of `url`,
/// empty: the demo's, bench's, fault scenarios' and tests' own databases, so
/// their counts are exact. The one implementation is the runtime's.
pub use runtime::db::{drop_database, recreate_database};

/// The server settings that decide the ingest path's speed, as one line for
/// the bench's output: a ratio means little without them. Read from the
/// maintenance database (the bench's own is re-created per round).
///
/// `wal_buffers` matters most: the chain's writers commit concurrently and
/// share the WAL buffers, where the baseline's single COPY never waits on
/// anyone. At the default 4 MB (1/32 of a 128 MB `shared_buffers`) a
/// quarter of the writers' samples waited on the `WALWrite` lock and the
/// bench's ratio was 0.70-0.78 on this machine; at 64 MB, 0.76-0.79
/// (2026-12-07; the ingestor README's "PostgreSQL settings").
pub async fn server_settings(url: &str) -> anyhow::Result<String> {
    let opts = PgConnectOptions::from_str(url).context("invalid database URL")?;
    let mut admin = connect_maintenance(url, &opts).await?;
    const NAMES: [&str; 7] = [
        "server_version",
        "shared_buffers",
        "wal_buffers",
        "synchronous_commit",
        "fsync",
        "full_page_writes",
        "max_wal_size",
    ];
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, current_setting(name) FROM unnest($1::text[]) WITH ORDINALITY AS s(name, i) ORDER BY i",
    )
    .bind(&NAMES[..])
    .fetch_all(&mut admin)
    .await
    .context("reading the server's settings")?;
    admin.close().await.ok();
    Ok(rows
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" "))
}

/// A connection to the server's maintenance database `postgres` (`opts`
/// parsed from `url`, which names the server in errors, password redacted).
async fn connect_maintenance(url: &str, opts: &PgConnectOptions) -> anyhow::Result<sqlx::PgConnection> {
    opts.clone()
        .database("postgres")
        .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redact(url)))
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<invalid url>".into(),
    }
}

/// Inserts the sites and the sponsor catalogue (sponsors and filename rules)
/// so that plays can be attributed with `sponsor_of()`. Idempotent.
pub async fn insert_catalogue(pool: &PgPool, catalogue: &Catalogue, sites: &[SitePlays]) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    for s in &catalogue.sponsors {
        sqlx::query(
            "INSERT INTO sponsors (id, name) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
        )
        .bind(s.id)
        .bind(s.name)
        .execute(&mut *tx)
        .await
        .context("inserting sponsors")?;
        sqlx::query(
            "INSERT INTO videos (sponsor_id, filename_pattern, title) VALUES ($1, $2, $3)
             ON CONFLICT (filename_pattern) DO NOTHING",
        )
        .bind(s.id)
        .bind(&s.pattern)
        .bind(format!("{} spots", s.name))
        .execute(&mut *tx)
        .await
        .context("inserting videos")?;
    }
    let ids: Vec<&str> = sites.iter().map(|s| s.site_id.as_str()).collect();
    let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
    sqlx::query("INSERT INTO sites (site_id, name) SELECT * FROM UNNEST($1::text[], $2::text[]) ON CONFLICT (site_id) DO NOTHING")
        .bind(&ids)
        .bind(&names)
        .execute(&mut *tx)
        .await
        .context("inserting sites")?;
    tx.commit().await?;
    Ok(())
}

/// Result of one COPY run.
#[derive(Clone, Copy, Debug)]
pub struct CopyRun {
    pub rows: u64,
    pub elapsed: Duration,
    /// CPU used over `elapsed` (see [`crate::cpu`]).
    pub cpu: crate::cpu::Usage,
}

impl CopyRun {
    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Truncates `sponsor_impressions`, then COPYs `rows` into it (binary format,
/// one COPY per `chunk` rows on one connection, each its own transaction, as
/// a loader would) and returns the rows/s. The clock covers encoding and the
/// server's work, until the last COPY is committed.
/// `postgres_local`: whether the server's CPU time can be read here.
pub async fn copy_baseline(
    pool: &PgPool,
    rows: &[&Impression],
    chunk: usize,
    postgres_local: bool,
) -> anyhow::Result<CopyRun> {
    sqlx::query("TRUNCATE sponsor_impressions").execute(pool).await?;
    settle(pool).await;
    let mut conn = pool.acquire().await?;
    let batch_id = Uuid::now_v7();
    let cpu0 = crate::cpu::Snapshot::take(postgres_local);
    let start = Instant::now();
    for part in rows.chunks(chunk.max(1)) {
        // The ingestor's own encoder: the same bytes it sends.
        let mut buf = ingestor::copy::CopyBuffer::with_rows(part.len());
        for r in part {
            buf.push(r, Some(batch_id));
        }
        let buf = buf.finish();
        let mut copy = conn
            .copy_in_raw(&ingestor::copy::copy_statement())
            .await
            .context("starting COPY")?;
        copy.send(buf).await.context("sending COPY data")?;
        copy.finish().await.context("finishing COPY")?;
    }
    let elapsed = start.elapsed();
    let cpu = cpu0.until(&crate::cpu::Snapshot::take(postgres_local));
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sponsor_impressions")
        .fetch_one(&mut *conn)
        .await?;
    if n as usize != rows.len() {
        bail!("COPY baseline stored {n} rows, expected {}", rows.len());
    }
    Ok(CopyRun {
        rows: rows.len() as u64,
        elapsed,
        cpu,
    })
}

/// Brings the server to a quiet state before a timed phase: a `CHECKPOINT`
/// writes out the dirty buffers and the WAL of what ran before (a steady
/// phase of half a million rows left the baseline COPY 40 % slower without
/// it, which flattered the ratio). Best effort: `CHECKPOINT` needs superuser
/// or `pg_checkpoint`; without them the phase runs as the server is.
pub async fn settle(pool: &PgPool) {
    if let Err(e) = sqlx::query("CHECKPOINT").execute(pool).await {
        tracing::warn!(error = %e, "CHECKPOINT before a timed phase failed; measuring anyway");
    }
}

/// One line of the per-sponsor summary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SponsorLine {
    pub sponsor_id: String,
    pub sponsor_name: String,
    pub impressions: i64,
    pub screen_time_s: f64,
    pub completed: i64,
    pub audience: i64,
    /// Impressions per period (`pre_match`, `halftime`, `post_match`, `loop`).
    pub by_period: BTreeMap<String, i64>,
}

impl SponsorLine {
    pub fn completion_rate(&self) -> f64 {
        if self.impressions == 0 {
            0.0
        } else {
            self.completed as f64 / self.impressions as f64
        }
    }
}

/// The per-sponsor summary of the given sites, computed by PostgreSQL from
/// the raw rows, attributed with `sponsor_of()` (unattributed plays under
/// `(none)`), most impressions first.
pub async fn sponsor_summary(pool: &PgPool, sites: &[String]) -> anyhow::Result<Vec<SponsorLine>> {
    let rows = sqlx::query(
        "WITH plays AS (
             SELECT video_id, video_filename, period, duration_played, completed, audience_estimate
             FROM sponsor_impressions WHERE site_id = ANY($1)
         ), videos_seen AS (
             SELECT DISTINCT video_id, video_filename FROM plays
         ), attribution AS (
             SELECT video_id, video_filename, sponsor_of(video_id, video_filename) AS sponsor_id FROM videos_seen
         )
         SELECT coalesce(a.sponsor_id, '(none)') AS sponsor_id,
                coalesce(sp.name, 'unattributed') AS sponsor_name,
                p.period,
                count(*) AS impressions,
                sum(p.duration_played) AS screen_time,
                count(*) FILTER (WHERE p.completed) AS completed,
                coalesce(sum(p.audience_estimate), 0)::bigint AS audience
         FROM plays p
         JOIN attribution a ON a.video_filename = p.video_filename AND a.video_id IS NOT DISTINCT FROM p.video_id
         LEFT JOIN sponsors sp ON sp.id = a.sponsor_id
         GROUP BY 1, 2, 3",
    )
    .bind(sites)
    .fetch_all(pool)
    .await
    .context("reading the per-sponsor summary")?;
    let mut by: HashMap<String, SponsorLine> = HashMap::new();
    for r in rows {
        let id: String = r.try_get("sponsor_id")?;
        let line = by.entry(id.clone()).or_insert_with(|| SponsorLine {
            sponsor_id: id,
            ..Default::default()
        });
        line.sponsor_name = r.try_get("sponsor_name")?;
        let n: i64 = r.try_get("impressions")?;
        line.impressions += n;
        line.screen_time_s += r.try_get::<f64, _>("screen_time")?;
        line.completed += r.try_get::<i64, _>("completed")?;
        line.audience += r.try_get::<i64, _>("audience")?;
        *line.by_period.entry(r.try_get("period")?).or_default() += n;
    }
    let mut v: Vec<SponsorLine> = by.into_values().collect();
    v.sort_by(|a, b| b.impressions.cmp(&a.impressions).then(a.sponsor_id.cmp(&b.sponsor_id)));
    Ok(v)
}

/// Renders the summary as a table.
pub fn format_summary(lines: &[SponsorLine]) -> String {
    let mut s = format!(
        "{:<22} {:>11} {:>12} {:>10} {:>9} {:>9} {:>10} {:>9} {:>12}\n",
        "sponsor", "impressions", "screen_time", "completed", "pre_match", "halftime", "post_match", "loop", "audience"
    );
    let mut total = SponsorLine {
        sponsor_name: "TOTAL".into(),
        ..Default::default()
    };
    for l in lines {
        s.push_str(&summary_row(l));
        total.impressions += l.impressions;
        total.screen_time_s += l.screen_time_s;
        total.completed += l.completed;
        total.audience += l.audience;
        for (k, v) in &l.by_period {
            *total.by_period.entry(k.clone()).or_default() += v;
        }
    }
    s.push_str(&summary_row(&total));
    s
}

fn summary_row(l: &SponsorLine) -> String {
    let p = |k: &str| l.by_period.get(k).copied().unwrap_or(0);
    format!(
        "{:<22} {:>11} {:>12} {:>9.1}% {:>9} {:>9} {:>10} {:>9} {:>12}\n",
        l.sponsor_name,
        l.impressions,
        format_duration(l.screen_time_s),
        l.completion_rate() * 100.0,
        p("pre_match"),
        p("halftime"),
        p("post_match"),
        p("loop"),
        l.audience
    )
}

/// `12h03m07s`.
pub fn format_duration(secs: f64) -> String {
    let s = secs.round() as i64;
    format!("{}h{:02}m{:02}s", s / 3600, (s / 60) % 60, s % 60)
}

/// What the exactly-once check found.
#[derive(Clone, Debug, Default)]
pub struct Reconciliation {
    pub played: u64,
    /// Played impressions found in `sponsor_impressions` (counted once each).
    pub stored: u64,
    /// Played impressions missing from the database.
    pub missing: Vec<(String, Uuid)>,
    /// Extra copies: (site, id, total copies) for every id stored more than once.
    pub duplicates: Vec<(String, Uuid, i64)>,
    /// Rows of these sites that nobody played in this run.
    pub unexpected: Vec<(String, Uuid)>,
    /// Stored rows whose fields differ from what was played.
    pub mismatched: Vec<(Uuid, String)>,
    /// Dead letters recorded for these sites.
    pub rejected: i64,
    /// Impressions counted by the daily rollup for these sites (must equal `stored`).
    pub rollup_impressions: i64,
}

impl Reconciliation {
    pub fn duplicate_rows(&self) -> u64 {
        self.duplicates.iter().map(|d| (d.2 - 1) as u64).sum()
    }

    pub fn is_exact(&self) -> bool {
        self.missing.is_empty()
            && self.duplicates.is_empty()
            && self.unexpected.is_empty()
            && self.mismatched.is_empty()
            && self.rejected == 0
            && self.stored == self.played
            && self.rollup_impressions == self.played as i64
    }

    /// A readable diff (at most `max` examples per kind).
    pub fn diff(&self, max: usize) -> String {
        let mut s = format!(
            "played={} stored={} missing={} duplicates={} unexpected={} mismatched={} rejected={} rollup={}\n",
            self.played,
            self.stored,
            self.missing.len(),
            self.duplicate_rows(),
            self.unexpected.len(),
            self.mismatched.len(),
            self.rejected,
            self.rollup_impressions
        );
        for (site, id) in self.missing.iter().take(max) {
            s.push_str(&format!("  missing    {site} {id}\n"));
        }
        for (site, id, n) in self.duplicates.iter().take(max) {
            s.push_str(&format!("  duplicate  {site} {id} stored {n} times\n"));
        }
        for (site, id) in self.unexpected.iter().take(max) {
            s.push_str(&format!("  unexpected {site} {id}\n"));
        }
        for (id, what) in self.mismatched.iter().take(max) {
            s.push_str(&format!("  mismatched {id}: {what}\n"));
        }
        s
    }
}

/// Compares what was played with what `sponsor_impressions` holds for the
/// same sites: every played id exactly once (by `(site_id, impression_id)`),
/// no row nobody played, every field equal, no dead letter, and the daily
/// rollup agreeing with the raw rows.
pub async fn reconcile<'a>(
    pool: &PgPool,
    played: impl IntoIterator<Item = &'a Impression>,
) -> anyhow::Result<Reconciliation> {
    let mut expected: HashMap<(String, Uuid), &Impression> = HashMap::new();
    for p in played {
        expected.insert((p.site_id.clone(), p.impression_id), p);
    }
    let mut sites: Vec<String> = expected.keys().map(|k| k.0.clone()).collect();
    sites.sort();
    sites.dedup();
    let mut rec = Reconciliation {
        played: expected.len() as u64,
        ..Default::default()
    };
    let rows = sqlx::query(
        "SELECT site_id, impression_id, count(*) AS copies,
                min(video_filename) AS video_filename, min(played_at) AS played_at,
                min(duration_played) AS duration_played, min(video_duration) AS video_duration,
                bool_and(completed) AS completed, min(event_type) AS event_type, min(period) AS period,
                min(trigger_type) AS trigger_type, min(audience_estimate) AS audience_estimate
         FROM sponsor_impressions WHERE site_id = ANY($1)
         GROUP BY site_id, impression_id",
    )
    .bind(&sites)
    .fetch_all(pool)
    .await
    .context("reading stored impressions")?;
    let mut seen = 0u64;
    for r in rows {
        let site: String = r.try_get("site_id")?;
        let id: Uuid = r.try_get("impression_id")?;
        let copies: i64 = r.try_get("copies")?;
        if copies > 1 {
            rec.duplicates.push((site.clone(), id, copies));
        }
        let Some(p) = expected.get(&(site.clone(), id)) else {
            rec.unexpected.push((site, id));
            continue;
        };
        seen += 1;
        let mut diffs = Vec::new();
        let filename: String = r.try_get("video_filename")?;
        if filename != p.video_filename {
            diffs.push(format!("video_filename {filename} != {}", p.video_filename));
        }
        let at: DateTime<Utc> = r.try_get("played_at")?;
        if at != p.played_at {
            diffs.push(format!("played_at {at} != {}", p.played_at));
        }
        let dp: f64 = r.try_get("duration_played")?;
        if dp != p.duration_played {
            diffs.push(format!("duration_played {dp} != {}", p.duration_played));
        }
        let vd: f64 = r.try_get("video_duration")?;
        if vd != p.video_duration {
            diffs.push(format!("video_duration {vd} != {}", p.video_duration));
        }
        let completed: bool = r.try_get("completed")?;
        if completed != p.completed {
            diffs.push(format!("completed {completed} != {}", p.completed));
        }
        for (col, want) in [
            ("event_type", p.event_type.as_str()),
            ("period", p.period.as_str()),
            ("trigger_type", p.trigger_type.as_str()),
        ] {
            let got: String = r.try_get(col)?;
            if got != want {
                diffs.push(format!("{col} {got} != {want}"));
            }
        }
        let aud: Option<i32> = r.try_get("audience_estimate")?;
        if aud != p.audience_estimate {
            diffs.push(format!("audience_estimate {aud:?} != {:?}", p.audience_estimate));
        }
        if !diffs.is_empty() {
            rec.mismatched.push((id, diffs.join(", ")));
        }
    }
    rec.stored = seen;
    if seen < rec.played {
        let stored: std::collections::HashSet<(String, Uuid)> = sqlx::query_as::<_, (String, Uuid)>(
            "SELECT DISTINCT site_id, impression_id FROM sponsor_impressions WHERE site_id = ANY($1)",
        )
        .bind(&sites)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        let mut missing: Vec<(String, Uuid)> = expected.keys().filter(|k| !stored.contains(*k)).cloned().collect();
        missing.sort();
        rec.missing = missing;
    }
    rec.rejected = sqlx::query_scalar("SELECT count(*) FROM impressions_rejected WHERE site_id = ANY($1)")
        .bind(&sites)
        .fetch_one(pool)
        .await?;
    // The daily rollup is exact once its queue is folded (what every reader does).
    sqlx::query("SELECT sponsor_rollups_fold()").execute(pool).await?;
    rec.rollup_impressions = sqlx::query_scalar(
        "SELECT coalesce(sum(impressions), 0)::bigint FROM sponsor_daily_stats WHERE site_id = ANY($1)",
    )
    .bind(&sites)
    .fetch_one(pool)
    .await?;
    Ok(rec)
}

/// Rows of `sites` committed so far (fast count for progress polling).
pub async fn committed_count(pool: &PgPool, sites: &[String]) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM sponsor_impressions WHERE site_id = ANY($1)")
            .bind(sites)
            .fetch_one(pool)
            .await?,
    )
}

/// Rows committed so far in the whole table (cheapest count for progress).
pub async fn total_count(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM sponsor_impressions")
        .fetch_one(pool)
        .await?)
}

/// Deltas waiting in the rollups' queues: the daily one
/// (`sponsor_daily_pending`, filled by the ingestor) and the per-sponsor one
/// (`sponsor_rollup_pending`, filled when the daily one is folded).
pub async fn rollup_pending(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT count(*) FROM sponsor_daily_pending), (SELECT count(*) FROM sponsor_rollup_pending)",
    )
    .fetch_one(pool)
    .await?)
}

/// Waits until both rollup queues are empty (the ingestor folds them in the
/// background, migrations `20261207000003_daily_rollup` and `20261207000004_sponsor_rollups`), polling
/// every 10 ms; false after `timeout`. Reads only: it never folds, so it
/// shows when the chain itself caught up.
pub async fn wait_rollups_folded(pool: &PgPool, timeout: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let empty: bool = sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM sponsor_daily_pending) AND NOT EXISTS (SELECT 1 FROM sponsor_rollup_pending)",
        )
        .fetch_one(pool)
        .await?;
        if empty {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
