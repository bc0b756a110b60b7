//! Exports: the stats as CSV, and the playout log (one row per play) as a
//! CSV streamed straight from PostgreSQL.
//!
//! Playout log columns follow the out-of-home industry's proof-of-play /
//! playout reporting shape: a unique playout reference (our impression_id),
//! creative id and name, start and end in UTC with an explicit offset
//! (ISO 8601, `+00:00`), duration, player and site reference, then our own
//! fields. The rows come from a server-side query read as a stream (sqlx
//! `fetch`), serialised into ~64 KiB chunks and handed to the HTTP body
//! through a bounded channel: a slow client slows the query down (TCP
//! backpressure), so a year of plays exports in constant memory.

use crate::stats::{Attributed, Stats, StatsQuery};
use bytes::Bytes;
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use futures::{SinkExt, TryStreamExt};
use sqlx::PgPool;
use std::collections::HashMap;
use uuid::Uuid;

/// Header of the stats CSV.
pub const STATS_CSV_HEADER: [&str; 9] = [
    "section",
    "key",
    "name",
    "impressions",
    "screen_time_seconds",
    "completed",
    "completion_rate",
    "audience",
    "sites_reached",
];

/// The stats document as CSV: one row per figure set, `section` being
/// `total`, `period`, `event_type`, `site`, `video` or `day`.
pub fn stats_csv(s: &Stats) -> anyhow::Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(STATS_CSV_HEADER)?;
    let row = |w: &mut csv::Writer<Vec<u8>>,
               section: &str,
               key: &str,
               name: &str,
               f: &crate::stats::Figures,
               sites: Option<i64>|
     -> csv::Result<()> {
        w.write_record([
            section,
            key,
            name,
            &f.impressions.to_string(),
            &f.screen_time_seconds.to_string(),
            &f.completed.to_string(),
            &f.completion_rate.to_string(),
            &f.audience.to_string(),
            &sites.map(|n| n.to_string()).unwrap_or_default(),
        ])
    };
    let total = crate::stats::Figures {
        impressions: s.total_impressions,
        screen_time_seconds: s.screen_time_seconds,
        completed: s.completed,
        completion_rate: s.completion_rate,
        audience: s.audience_reached,
    };
    row(
        &mut w,
        "total",
        &s.sponsor.id,
        &format!("{} {}..{}", s.sponsor.name, s.from, s.to),
        &total,
        Some(s.sites_reached),
    )?;
    for k in &s.by_period {
        row(&mut w, "period", &k.key, &k.key, &k.figures, None)?;
    }
    for k in &s.by_event_type {
        row(&mut w, "event_type", &k.key, &k.key, &k.figures, None)?;
    }
    for v in &s.top_videos {
        row(
            &mut w,
            "video",
            v.video_id.as_deref().unwrap_or(""),
            &v.video_filename,
            &v.figures,
            None,
        )?;
    }
    for site in &s.by_site {
        row(
            &mut w,
            "site",
            &site.site_id,
            site.site_name.as_deref().unwrap_or(""),
            &site.figures,
            None,
        )?;
    }
    for d in &s.daily {
        let day = d.day.to_string();
        row(&mut w, "day", &day, &day, &d.figures, None)?;
    }
    w.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))
}

/// Header of the playout log.
pub const PLAYOUT_CSV_HEADER: [&str; 19] = [
    "playout_id",
    "creative_id",
    "creative_name",
    "start_utc",
    "end_utc",
    "duration_seconds",
    "player_id",
    "site_id",
    "site_name",
    "sponsor_id",
    "video_id",
    "video_filename",
    "video_duration_seconds",
    "completed",
    "event_type",
    "period",
    "trigger",
    "audience_estimate",
    "received_utc",
];

const PLAYOUTS_SQL: &str = "
SELECT i.impression_id, i.site_id, i.video_id, i.video_filename, i.played_at, i.duration_played,
       i.video_duration, i.completed, i.event_type, i.period, i.trigger_type, i.audience_estimate,
       i.received_at
FROM sponsor_impressions i
WHERE i.played_at >= $3 AND i.played_at < $4
  AND (i.video_filename, coalesce(i.video_id, '')) IN
      (SELECT f, v FROM unnest($1::text[], $2::text[]) AS u(f, v))
  AND ($5::text IS NULL OR i.site_id = $5)
  AND ($6::text IS NULL OR i.event_type = $6)
  AND ($7::text IS NULL OR i.period = $7)
ORDER BY i.played_at, i.site_id, i.impression_id";

type PlayoutRow = (
    Uuid,
    String,
    Option<String>,
    String,
    DateTime<Utc>,
    f64,
    f64,
    bool,
    String,
    String,
    String,
    Option<i32>,
    DateTime<Utc>,
);

/// ISO 8601 UTC with an explicit `+00:00` offset, microseconds as stored.
pub fn iso_utc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, false)
}

fn start_of_day(d: NaiveDate) -> DateTime<Utc> {
    d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
}

const CHUNK: usize = 64 * 1024;

/// Starts streaming the playout log; returns the body stream. The query runs
/// on its own pooled connection in a task; errors end the body abruptly (the
/// client sees a truncated transfer, never a silently short file with a
/// clean end) and are logged.
pub fn playouts_stream(
    pool: PgPool,
    sponsor_id: String,
    att: Attributed,
    q: StatsQuery,
    site_names: HashMap<String, String>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut conn = match pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Err(std::io::Error::other(e))).await;
                return;
            }
        };
        let new_writer = || csv::Writer::from_writer(Vec::with_capacity(CHUNK + 4096));
        let mut w = new_writer();
        let _ = w.write_record(PLAYOUT_CSV_HEADER);
        let from = start_of_day(q.from);
        let to = start_of_day(q.to.succ_opt().unwrap_or(q.to));
        let period = q.period.map(|p| p.as_str());
        let event_type = q.event_type.map(|e| e.as_str());
        let mut rows = sqlx::query_as::<_, PlayoutRow>(PLAYOUTS_SQL)
            .bind(&att.filenames)
            .bind(&att.video_ids)
            .bind(from)
            .bind(to)
            .bind(&q.site_id)
            .bind(event_type)
            .bind(period)
            .fetch(&mut *conn);
        let mut n: u64 = 0;
        loop {
            let next = rows.try_next().await;
            let row = match next {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, sponsor = %sponsor_id, "playout export failed");
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
            };
            let (id, site, vid, file, at, dur, vdur, completed, ev, per, trig, aud, recv) = row;
            let end = at + chrono::Duration::microseconds((dur * 1e6).round() as i64);
            let creative_id = vid.clone().unwrap_or_else(|| file.clone());
            let rec = [
                id.to_string(),
                creative_id,
                file.clone(),
                iso_utc(at),
                iso_utc(end),
                format!("{dur}"),
                site.clone(),
                site.clone(),
                site_names.get(&site).cloned().unwrap_or_default(),
                sponsor_id.clone(),
                vid.unwrap_or_default(),
                file,
                format!("{vdur}"),
                completed.to_string(),
                ev,
                per,
                trig,
                aud.map(|a| a.to_string()).unwrap_or_default(),
                iso_utc(recv),
            ];
            if w.write_record(&rec).is_err() {
                return;
            }
            n += 1;
            // The csv writer buffers internally: move its buffer into our
            // Vec every 128 rows, then ship the Vec when it is big enough.
            if n % 128 == 0 && w.flush().is_ok() && w.get_ref().len() >= CHUNK {
                let buf = match std::mem::replace(&mut w, new_writer()).into_inner() {
                    Ok(b) => b,
                    Err(_) => return,
                };
                if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                    tracing::info!(sponsor = %sponsor_id, rows = n, "playout export: client went away");
                    return;
                }
            }
        }
        let buf = w.into_inner().unwrap_or_default();
        if !buf.is_empty() {
            let _ = tx.send(Ok(Bytes::from(buf))).await;
        }
        metrics::counter!("analytics_playout_rows_exported_total").increment(n);
        tracing::info!(sponsor = %sponsor_id, rows = n, "playout export done");
    });
    rx
}
