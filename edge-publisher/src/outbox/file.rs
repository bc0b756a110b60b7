//! The file: opening it (pragmas, schema, identity), its meta, and what is
//! read from it (counts, statistics, exports). Operator commands use the
//! public functions here on a connection of their own, read-only, while the
//! service may be running.

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use schema::Impression;
use serde::Serialize;
use std::path::Path;
use uuid::Uuid;

use super::{Counts, FileStats, OutboxConfig, OutboxError};

/// Layout version of the file (`meta.format`).
const FORMAT: &str = "1";

/// Opens (creating if needed) the SQLite file with our pragmas and schema.
pub fn open_connection(path: &Path, cache_kib: u32) -> Result<Connection, OutboxError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -i64::from(cache_kib.max(64)))?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS outbox (
             seq           INTEGER PRIMARY KEY,
             impression_id BLOB NOT NULL UNIQUE,
             played_at     INTEGER NOT NULL,
             enqueued_at   INTEGER NOT NULL,
             state         TEXT NOT NULL CHECK (state = 'pending'),
             batch_id      BLOB,
             published_at  INTEGER,
             attempts      INTEGER NOT NULL DEFAULT 0,
             body          TEXT NOT NULL);
         CREATE INDEX IF NOT EXISTS outbox_played_at ON outbox (played_at);
         CREATE TABLE IF NOT EXISTS refused (
             id          INTEGER PRIMARY KEY,
             received_at INTEGER NOT NULL,
             raw         TEXT NOT NULL,
             reason      TEXT NOT NULL);",
    )?;
    Ok(conn)
}

/// What the service's writer connection found when it opened the file.
pub(super) struct Opened {
    pub conn: Connection,
    pub site_id: String,
    pub outbox_id: Uuid,
    /// Rows stored, and their bytes (UTF-8).
    pub rows: i64,
    pub bytes: i64,
    /// `PRAGMA data_version` the counts were read at.
    pub data_version: i64,
    pub next_seq: i64,
}

/// Opens (creating if needed) the outbox file of `site_id` for the writer
/// thread: the directory, the schema, the identity (checked against
/// `site_id`, made on first use) and the counts. One transaction: two
/// processes creating the file at once agree on its identity, and the
/// counts go with the data version they read.
pub(super) fn open_for_writer(cfg: &OutboxConfig, site_id: &str) -> Result<Opened, OutboxError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| OutboxError::Storage(format!("creating {}: {e}", cfg.data_dir.display())))?;
    let conn = open_connection(&cfg.path(), cfg.cache_kib)?;
    exec_cached(&conn, "BEGIN IMMEDIATE")?;
    let opened = (|| -> Result<_, OutboxError> {
        let (site, outbox_id) = identity(&conn, Some(site_id))?;
        let (rows, bytes) = read_counts(&conn)?;
        Ok((site, outbox_id, rows, bytes, data_version(&conn)?, next_seq(&conn)?))
    })();
    let (site_id, outbox_id, rows, bytes, data_version, next_seq) = match opened.and_then(|o| {
        exec_cached(&conn, "COMMIT")?;
        Ok(o)
    }) {
        Ok(o) => o,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
    };
    Ok(Opened {
        conn,
        site_id,
        outbox_id,
        rows,
        bytes,
        data_version,
        next_seq,
    })
}

fn meta_get(conn: &Connection, key: &str) -> Result<Option<String>, rusqlite::Error> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()
}

pub(super) fn meta_set(conn: &Connection, key: &str, value: &str) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// Runs one parameterless statement through the connection's statement
/// cache. Every group of commands runs `BEGIN IMMEDIATE`, a `SAVEPOINT` and
/// `RELEASE` per command, and `COMMIT`; parsed afresh each time
/// (`execute_batch`), SQLite's parser showed in about a seventh of the
/// outbox threads' samples in the fleet bench's profile (2026-12-07). The
/// saving is per group, so it matters most on a Pi under a steady trickle;
/// the bench's per-row box cost did not move beyond its noise.
pub(super) fn exec_cached(conn: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Reads or initialises the identity of the outbox. `site_id = None` reads an
/// existing file without claiming it (operator commands).
fn identity(conn: &Connection, site_id: Option<&str>) -> Result<(String, Uuid), OutboxError> {
    let stored_site = meta_get(conn, "site_id")?;
    let site = match (stored_site, site_id) {
        (Some(s), Some(want)) if s != want => {
            return Err(OutboxError::Storage(format!(
                "this outbox belongs to site '{s}', not '{want}'; move it aside (it may still hold unconfirmed impressions of '{s}')"
            )))
        }
        (Some(s), _) => s,
        (None, Some(want)) => {
            meta_set(conn, "site_id", want)?;
            want.to_owned()
        }
        (None, None) => return Err(OutboxError::Storage("outbox file has no site id (never used)".into())),
    };
    let outbox_id = match meta_get(conn, "outbox_id")? {
        Some(s) => Uuid::parse_str(&s).map_err(|e| OutboxError::Storage(format!("bad outbox_id in meta: {e}")))?,
        None => {
            let id = Uuid::now_v7();
            meta_set(conn, "outbox_id", &id.to_string())?;
            meta_set(conn, "format", FORMAT)?;
            meta_set(conn, "next_seq", "1")?;
            id
        }
    };
    if let Some(f) = meta_get(conn, "format")? {
        if f != FORMAT {
            return Err(OutboxError::Storage(format!(
                "outbox format {f} is not supported by this build (format {FORMAT})"
            )));
        }
    }
    Ok((site, outbox_id))
}

pub(super) fn next_seq(conn: &Connection) -> Result<i64, rusqlite::Error> {
    let meta: i64 = meta_get(conn, "next_seq")?.and_then(|s| s.parse().ok()).unwrap_or(1);
    let max: Option<i64> = conn
        .prepare_cached("SELECT MAX(seq) FROM outbox")?
        .query_row([], |r| r.get(0))?;
    Ok(meta.max(max.unwrap_or(0) + 1))
}

fn micros_to_time(us: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_micros(us).single()
}

fn millis_to_time(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// Rows and stored bytes (UTF-8: `octet_length`, what `max_bytes` limits),
/// counted from the file itself.
pub(super) fn read_counts(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.prepare_cached("SELECT COUNT(*), COALESCE(SUM(octet_length(body)), 0) FROM outbox")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// SQLite's `PRAGMA data_version`: changes when *another* connection
/// commits to the file, never for this connection's own commits.
pub(super) fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))
}

/// Reads statistics from an open connection (used by the writer thread and by
/// `neopro-edge status`, which opens the file itself while the service may run).
/// From the file alone nothing is in flight: every row counts as unsent.
pub fn file_stats(conn: &Connection) -> Result<FileStats, OutboxError> {
    let (unconfirmed, bytes) = read_counts(conn)?;
    stats_with_counts(
        conn,
        Counts {
            unconfirmed: unconfirmed as u64,
            unsent: unconfirmed as u64,
            bytes: bytes as u64,
        },
    )
}

/// Statistics whose counts are already known (only index lookups here).
pub(super) fn stats_with_counts(conn: &Connection, c: Counts) -> Result<FileStats, OutboxError> {
    let (site_id, outbox_id) = identity(conn, None)?;
    let (unconfirmed, unsent, bytes) = (c.unconfirmed as i64, c.unsent as i64, c.bytes as i64);
    let oldest: Option<i64> = conn.query_row("SELECT MIN(played_at) FROM outbox", [], |r| r.get(0))?;
    let newest: Option<i64> = conn.query_row("SELECT MAX(played_at) FROM outbox", [], |r| r.get(0))?;
    let oldest_enq: Option<i64> = conn
        .query_row("SELECT enqueued_at FROM outbox ORDER BY seq LIMIT 1", [], |r| r.get(0))
        .optional()?;
    let refused: i64 = conn.query_row("SELECT COUNT(*) FROM refused", [], |r| r.get(0))?;
    let last_receipt_at = meta_get(conn, "last_receipt_at")?
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc));
    Ok(FileStats {
        unconfirmed: unconfirmed as u64,
        unsent: unsent as u64,
        published: (unconfirmed - unsent).max(0) as u64,
        bytes: bytes as u64,
        oldest_played_at: oldest.and_then(micros_to_time),
        newest_played_at: newest.and_then(micros_to_time),
        oldest_unconfirmed_enqueued_at: oldest_enq.and_then(millis_to_time),
        last_receipt_at,
        refused_kept: refused as u64,
        next_seq: next_seq(conn)?,
        site_id,
        outbox_id,
    })
}

/// One stored row, for `neopro-edge export`.
#[derive(Clone, Debug, Serialize)]
pub struct ExportRow {
    pub state: String,
    pub attempts: i64,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub published_at: Option<DateTime<Utc>>,
    pub impression: Impression,
}

/// Streams every stored row in seq order to `f` (read-only; safe while the service runs).
pub fn export_rows(conn: &Connection, mut f: impl FnMut(ExportRow) -> anyhow::Result<()>) -> anyhow::Result<u64> {
    let mut stmt = conn.prepare("SELECT state, attempts, enqueued_at, published_at, body FROM outbox ORDER BY seq")?;
    let mut rows = stmt.query([])?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        let body: String = r.get(4)?;
        let impression: Impression = serde_json::from_str(&body)?;
        f(ExportRow {
            state: r.get(0)?,
            attempts: r.get(1)?,
            enqueued_at: r.get::<_, Option<i64>>(2)?.and_then(millis_to_time),
            published_at: r.get::<_, Option<i64>>(3)?.and_then(millis_to_time),
            impression,
        })?;
        n += 1;
    }
    Ok(n)
}
