//! Operator commands that work on the outbox file directly, with or without
//! the service running (WAL lets a second connection read, and write through
//! SQLite's locking, while the service runs).
//!
//! * `import FILE`: the seed's legacy buffer (`~/neopro/data/sponsor_impressions.json`,
//!   a JSON array or `{"impressions":[…]}`), idempotent thanks to derived
//!   impression ids. It appends through an [`Outbox`] of its own, the
//!   service's code path: seqs come from the file under SQLite's write
//!   lock, so it never collides with a running service, which finds the
//!   commit and publishes the rows (`outbox` module doc, "Other writers").
//! * `status`: the stats of the outbox file.
//! * `export --format csv|json`: a local backup of what the outbox holds
//!   (the JSON form can be re-imported with `import`).

use anyhow::Context;
use chrono::{SecondsFormat, Utc};
use schema::BodyShape;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

use crate::outbox::{self, Outbox};
use crate::settings::Settings;

/// What `import` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportReport {
    pub records: usize,
    pub imported: u64,
    pub already_present: u64,
    pub refused: Vec<String>,
}

/// Imports a legacy buffer file into the outbox of `settings.site_id`.
pub async fn import(settings: &Settings, file: &Path, progress: bool) -> anyhow::Result<ImportReport> {
    settings.validate()?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let parsed = schema::parse_body(
        &bytes,
        BodyShape::ObjectOrArray,
        Some(&settings.site_id),
        Utc::now(),
        false,
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let cfg = settings.outbox_config();
    let site = settings.site_id.clone();
    let outbox = tokio::task::spawn_blocking(move || Outbox::open(cfg, &site)).await??;
    let mut report = ImportReport {
        records: parsed.received,
        refused: parsed.refused.iter().map(ToString::to_string).collect(),
        ..Default::default()
    };
    let bar = if progress {
        indicatif::ProgressBar::new(parsed.accepted.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} importing [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let imps: Vec<_> = parsed.accepted.into_iter().map(|(_, i)| i).collect();
    let mut result = Ok(());
    for chunk in imps.chunks(1000) {
        match outbox.append(chunk.to_vec()).await {
            Ok(o) => {
                report.imported += o.inserted;
                report.already_present += o.duplicates;
                bar.inc(chunk.len() as u64);
            }
            Err(e) => {
                result = Err(anyhow::Error::from(e).context(format!(
                    "stopped after {} imported; running import again is safe",
                    report.imported
                )));
                break;
            }
        }
    }
    bar.finish_and_clear();
    outbox.close().await;
    result.map(|()| report)
}

/// Reads the outbox statistics from the file: those of the HTTP endpoint
/// ([`crate::http::outbox_stats`]) plus the path, outbox id and next seq.
pub fn status(settings: &Settings) -> anyhow::Result<serde_json::Value> {
    let path = settings.outbox_config().path();
    if !path.exists() {
        anyhow::bail!("no outbox at {} (nothing was ever stored here)", path.display());
    }
    let conn = outbox::open_connection(&path, 256)?;
    let fs = outbox::file_stats(&conn)?;
    let mut v = crate::http::outbox_stats(&fs, &settings.outbox_config());
    v.insert("path".into(), path.display().to_string().into());
    // The operator's, on the box: what the unauthenticated endpoint hides.
    v.insert("outboxId".into(), fs.outbox_id.to_string().into());
    v.insert("nextSeq".into(), fs.next_seq.into());
    // In-flight rows live in the service's memory: from the file alone
    // every unconfirmed row counts as unsent.
    v.insert(
        "broker".into(),
        "unknown from the file alone (see GET /api/sync/sponsor-impressions/stats on the running service)".into(),
    );
    Ok(serde_json::Value::Object(v))
}

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Csv,
    Json,
}

#[derive(Serialize)]
struct CsvRow<'a> {
    seq: Option<i64>,
    impression_id: String,
    site_id: &'a str,
    video_id: Option<&'a str>,
    video_filename: &'a str,
    played_at: String,
    duration_played: f64,
    video_duration: f64,
    completed: bool,
    event_type: &'static str,
    period: &'static str,
    trigger_type: &'static str,
    audience_estimate: Option<i32>,
    state: &'a str,
    attempts: i64,
    enqueued_at: Option<String>,
    published_at: Option<String>,
}

/// Writes every stored (unconfirmed) impression to `out`. JSON is
/// `{"impressions":[…]}` (re-importable); CSV has one header line.
pub fn export(settings: &Settings, format: ExportFormat, out: &mut dyn Write) -> anyhow::Result<u64> {
    let path = settings.outbox_config().path();
    if !path.exists() {
        anyhow::bail!("no outbox at {}", path.display());
    }
    let conn = outbox::open_connection(&path, 256)?;
    let ts = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let n = match format {
        ExportFormat::Json => {
            out.write_all(b"{\"impressions\":[")?;
            let mut first = true;
            let n = outbox::export_rows(&conn, |r| {
                if !first {
                    out.write_all(b",\n")?;
                }
                first = false;
                serde_json::to_writer(&mut *out, &r.impression)?;
                Ok(())
            })?;
            out.write_all(b"]}\n")?;
            n
        }
        ExportFormat::Csv => {
            let mut w = csv::Writer::from_writer(&mut *out);
            let mut n = 0u64;
            outbox::export_rows(&conn, |r| {
                let i = &r.impression;
                w.serialize(CsvRow {
                    seq: i.seq,
                    impression_id: i.impression_id.to_string(),
                    site_id: &i.site_id,
                    video_id: i.video_id.as_deref(),
                    video_filename: &i.video_filename,
                    played_at: ts(i.played_at),
                    duration_played: i.duration_played,
                    video_duration: i.video_duration,
                    completed: i.completed,
                    event_type: i.event_type.as_str(),
                    period: i.period.as_str(),
                    trigger_type: i.trigger_type.as_str(),
                    audience_estimate: i.audience_estimate,
                    state: &r.state,
                    attempts: r.attempts,
                    enqueued_at: r.enqueued_at.map(ts),
                    published_at: r.published_at.map(ts),
                })?;
                n += 1;
                Ok(())
            })?;
            if n == 0 {
                // An empty export still gets its header line.
                w.write_record([
                    "seq",
                    "impression_id",
                    "site_id",
                    "video_id",
                    "video_filename",
                    "played_at",
                    "duration_played",
                    "video_duration",
                    "completed",
                    "event_type",
                    "period",
                    "trigger_type",
                    "audience_estimate",
                    "state",
                    "attempts",
                    "enqueued_at",
                    "published_at",
                ])?;
            }
            w.flush()?;
            n
        }
    };
    out.flush()?;
    Ok(n)
}
