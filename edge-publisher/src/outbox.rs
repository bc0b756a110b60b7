//! The outbox: every impression the box accepted, on disk, until the centre
//! confirms it is committed in PostgreSQL.
//!
//! # Why SQLite, and why one writer
//!
//! The seed rewrote a whole JSON file per POST and lost everything in the
//! window between "received" and "file flushed". We need (a) nothing
//! acknowledged to the TV before it is durable, (b) a burst of POSTs to cost
//! one fsync rather than one each, (c) survival of `kill -9` and power loss at
//! any instant, (d) a format an operator can open with `sqlite3`. SQLite in WAL
//! mode with `synchronous=FULL` gives (a), (c) and (d); (b) is *group commit*:
//! a single writer thread owns the only read-write connection, takes every
//! command queued while the previous commit was running, executes them all in
//! one transaction (each in its own savepoint, so one failure does not fail the
//! others), commits (one fsync of the WAL), and only then answers each caller.
//!
//! # Which commits are synced
//!
//! Only a transaction that holds something the box promised to keep is
//! synced: an append (the TV was or will be told "stored") and a refused
//! record (the operator's evidence). A group of only requeues and
//! settlements (a claim writes nothing) commits with `synchronous=NORMAL`
//! instead: in WAL mode that
//! cannot corrupt the file, and what a power cut can take back is a suffix of
//! such transactions (the WAL is replayed as a prefix). Losing them is
//! harmless by construction: a lost requeue only loses its diagnostic
//! columns, a lost settlement brings confirmed rows back (they are
//! published again, the centre's unique key absorbs them and its receipt
//! settles them again). The next synced commit fsyncs the WAL, and so every
//! frame before it. This halves the fsyncs of a delivery cycle.
//!
//! # In-flight rows live in memory
//!
//! A claim (rows taken into an envelope) writes nothing to the file: the
//! writer thread records it as runs of seqs under the envelope's batch id
//! ([`Writer::inflight`]), and the next claim reads only the gaps between
//! those runs. A row costs the file one insert and one delete. Nothing is
//! lost by keeping the claim in memory: in-flight state never survives a
//! restart (invariant 4), and a requeue, the path of a publish that went
//! unconfirmed, is where the file records it (`attempts`, `batch_id`,
//! `published_at`), so rows that keep failing are visible to an operator.
//!
//! # Receipts settle runs of their own batch
//!
//! A receipt comes from the network, and anyone able to publish on the
//! box's receipts topic can write one (the outbox id is in every envelope).
//! So the only way to delete rows is [`Outbox::settle_batch`]: the receipt
//! names its batch, and of the seqs it proposes only those inside that
//! batch's in-flight runs are deleted. A batch not in flight (forged, late
//! after a timeout requeued it, of a previous process) settles nothing; seqs
//! outside the batch are ignored and reported. No range from the network
//! ever reaches a `DELETE` except intersected with runs this writer made.
//!
//! When the receipt settles its whole batch and that batch holds every
//! stored row (a caught-up box, the usual case), the table is emptied with
//! a bare `DELETE`, which SQLite executes by releasing pages instead of
//! rewriting them: on a Pi's SD card, half the writes per impression or
//! less. Whether that holds is decided from the batch's runs and the file
//! (lowest and highest seq, one probe per gap between runs), inside the
//! write transaction, never from the receipt's ranges.
//!
//! # Other writers
//!
//! `neopro-edge import` appends to the file of a running service through
//! its own [`Outbox`] (another connection, another process), and SQLite's
//! locking serialises the two: every group runs in `BEGIN IMMEDIATE`. So
//! nothing that another writer may change is cached across groups:
//!
//! * a seq is assigned from the file, `max(meta.next_seq, MAX(seq) + 1)`,
//!   read by the group's first append after `BEGIN IMMEDIATE`;
//! * the counters ([`Counts`]) are recounted from the file when
//!   `PRAGMA data_version` (which changes only when *another* connection
//!   commits) differs from the last value seen, at the start of every group
//!   and on [`Outbox::refresh`], which the publisher calls at half its
//!   batch delay so that rows another process appended are published
//!   without a restart, within that delay. Unchanged, that check costs one
//!   pragma, and nothing on a box whose writer is busy anyway.
//!
//! An external writer never touches in-flight runs: it appends rows with
//! seqs above every existing one, and never settles.
//!
//! # On-disk format (`{data_dir}/outbox.sqlite3`, plus `-wal` and `-shm`)
//!
//! ```sql
//! meta(key TEXT PRIMARY KEY, value TEXT)
//!   -- 'format' = '1'            layout version of this file
//!   -- 'site_id'                 the site this outbox belongs to (checked at open)
//!   -- 'outbox_id'               UUID made once at creation, echoed by receipts
//!   -- 'next_seq'                next per-site sequence number to assign
//!   -- 'last_receipt_at'         RFC 3339 time of the last receipt applied
//! outbox(
//!   seq           INTEGER PRIMARY KEY,   -- per-site seq, 1, 2, 3… never reused
//!   impression_id BLOB NOT NULL UNIQUE,  -- 16-byte UUID
//!   played_at     INTEGER NOT NULL,      -- Unix microseconds (UTC), indexed
//!   enqueued_at   INTEGER NOT NULL,      -- Unix milliseconds when the box stored it
//!   state         TEXT NOT NULL,         -- always 'pending' (in flight is in memory)
//!   batch_id      BLOB,                  -- envelope of its last unconfirmed publish
//!   published_at  INTEGER,               -- Unix milliseconds of that publish
//!   attempts      INTEGER NOT NULL,      -- publishes that went unconfirmed (requeued)
//!   body          TEXT NOT NULL)         -- the schema::Impression JSON, seq included
//! refused(id INTEGER PRIMARY KEY, received_at INTEGER, raw TEXT, reason TEXT)
//! ```
//!
//! `confirmed` is not a stored state: the transaction that applies a receipt
//! deletes the rows it settles, so "in the outbox" means "not yet confirmed".
//!
//! # Invariants
//!
//! 1. A row exists from the commit that acknowledged it to the commit that
//!    applied a receipt for the batch it was in flight in, naming its seq
//!    (committed or rejected by the centre). Nothing else deletes a row: not
//!    a limit, not an error, not a restart, not a receipt for another batch.
//! 2. `seq` values are assigned contiguously, in the same transaction as the
//!    insert and under SQLite's write lock, from what the file holds
//!    (`meta.next_seq`, `MAX(seq)`), whichever process writes; they are never
//!    reused, even after the table empties (the centre's `site_seq_gaps()`
//!    relies on this). A seq already taken fails the append; it is never
//!    counted as a duplicate.
//! 3. `impression_id` is unique, and it alone makes a duplicate: a retried
//!    POST of the same play is a no-op while the first copy is still
//!    unconfirmed (after confirmation the centre's unique key absorbs it).
//! 4. "In flight" is a hint, not a promise, and lives only in the writer's
//!    memory: at open every row is pending (the MQTT client's in-flight state
//!    died with the process), and a run goes back to pending when the broker
//!    lost our session or its receipt did not come within the timeout. A run
//!    changes only with a command that succeeded, and the whole map is
//!    restored when a group's commit fails, so it never claims more than the
//!    file holds nor hides a row from the next claim.
//! 5. Receipts carry the `outbox_id` and the `batch_id`; the publisher
//!    ignores a receipt for another outbox (a file that was deleted and
//!    re-created, whose seqs restarted), and the outbox settles a receipt
//!    only within its batch's runs.
//! 6. The limits (rows, bytes) refuse *new* impressions (HTTP 507); the TV then
//!    keeps them in its own buffer. They never evict stored ones.
//! 7. The counters are exact when each command runs: only the writer thread
//!    stores into them, and it recounts from the file whenever another
//!    process has committed.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use schema::{Impression, SeqRange};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, Notify};
use uuid::Uuid;

/// File name of the outbox inside the data directory.
pub const FILE_NAME: &str = "outbox.sqlite3";
const FORMAT: &str = "1";
/// Most refused records kept for the operator (oldest pruned first).
const MAX_REFUSED_KEPT: i64 = 10_000;
/// Most commands folded into one transaction.
const MAX_GROUP: usize = 4096;

/// Size limits and tuning of the outbox.
#[derive(Clone, Debug)]
pub struct OutboxConfig {
    pub data_dir: PathBuf,
    pub max_rows: u64,
    pub max_bytes: u64,
    /// Fraction of either limit above which the box warns.
    pub warn_ratio: f64,
    /// SQLite page cache of the writer connection, KiB.
    pub cache_kib: u32,
}

impl OutboxConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            max_rows: 2_000_000,
            max_bytes: 1 << 30,
            warn_ratio: 0.8,
            cache_kib: 2048,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.data_dir.join(FILE_NAME)
    }
}

/// Why an outbox operation failed; callers branch on [`OutboxError::Full`].
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox full: {rows} impressions / {bytes} bytes stored, limits {max_rows} / {max_bytes}")]
    Full {
        rows: u64,
        bytes: u64,
        max_rows: u64,
        max_bytes: u64,
    },
    #[error("outbox is closed")]
    Closed,
    #[error("outbox storage error: {0}")]
    Storage(String),
}

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        OutboxError::Storage(e.to_string())
    }
}

/// Result of one append.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AppendOutcome {
    /// New rows stored.
    pub inserted: u64,
    /// Impressions already in the outbox (same `impression_id`).
    pub duplicates: u64,
    /// Unconfirmed impressions in the outbox after this append.
    pub queued: u64,
}

/// The impressions one claim took for publishing: their seqs, in order,
/// and their stored JSON joined by commas, ready to be spliced into an
/// envelope's `impressions` array.
///
/// Why joined here rather than one `String` per row: the box host of the
/// fleet benchmark spent a fifth of its CPU in claims, mostly copying each
/// body out of SQLite into its own allocation (and checking it as UTF-8)
/// only for the envelope to copy it once more (profile, 2026-12-07). The
/// bodies are the JSON this outbox wrote itself (an append serialises
/// each validated impression), so they are appended as bytes, unchecked.
/// Only a hand edit of the file can break one; its envelope is then
/// unreadable JSON, which the centre dead-letters without a receipt, so
/// those rows are published again until an operator removes the row. The
/// UTF-8 check this replaced caught only a subset of such edits, and
/// failed the whole claim on them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claimed {
    seqs: Vec<i64>,
    bodies: Vec<u8>,
}

impl Claimed {
    /// Appends one impression (its seq and its JSON).
    pub fn push(&mut self, seq: i64, body: &[u8]) {
        if !self.seqs.is_empty() {
            self.bodies.push(b',');
        }
        self.bodies.extend_from_slice(body);
        self.seqs.push(seq);
    }

    /// How many impressions were claimed.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Their seqs, in increasing order.
    pub fn seqs(&self) -> &[i64] {
        &self.seqs
    }

    /// Their JSON objects separated by commas (no brackets).
    pub fn joined_bodies(&self) -> &[u8] {
        &self.bodies
    }
}

/// What a receipt did to the batch it names ([`Outbox::settle_batch`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// The batch was in flight: claimed by this process, and neither
    /// settled nor requeued since. When false nothing was done.
    pub known_batch: bool,
    /// Rows deleted: the seqs proposed that lie in the batch's runs.
    pub settled: u64,
    /// Some proposed seqs lay outside the batch's runs (those were ignored).
    pub outside: bool,
    /// Rows of the batch the receipt did not name: still in flight, so the
    /// receipt timeout publishes them again.
    pub remaining: u64,
}

/// A record the HTTP endpoint refused, kept for the operator.
#[derive(Clone, Debug)]
pub struct RefusedRecord {
    pub raw: String,
    pub reason: String,
}

/// Counters kept in memory by the writer thread: exact after each of its
/// commands, since every group begins by recounting from the file when
/// another process committed to it (module doc, "Other writers").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Rows not yet confirmed by a receipt (pending + in flight).
    pub unconfirmed: u64,
    /// Of those, not currently in flight (never sent, or to be resent).
    pub unsent: u64,
    /// Total size of the stored impression JSON, in UTF-8 bytes (what
    /// `max_bytes` limits; SQLite's `octet_length`, not `length`, which
    /// counts characters).
    pub bytes: u64,
}

/// Statistics read from the file.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FileStats {
    pub unconfirmed: u64,
    pub unsent: u64,
    pub published: u64,
    pub bytes: u64,
    pub oldest_played_at: Option<DateTime<Utc>>,
    pub newest_played_at: Option<DateTime<Utc>>,
    pub oldest_unconfirmed_enqueued_at: Option<DateTime<Utc>>,
    pub last_receipt_at: Option<DateTime<Utc>>,
    pub refused_kept: u64,
    pub next_seq: i64,
    pub site_id: String,
    pub outbox_id: Uuid,
}

enum Cmd {
    Append(Vec<Impression>, oneshot::Sender<Result<AppendOutcome, OutboxError>>),
    Claim {
        max_count: usize,
        max_bytes: usize,
        batch_id: Uuid,
        reply: oneshot::Sender<Result<Claimed, OutboxError>>,
    },
    Requeue(Option<Uuid>, oneshot::Sender<Result<u64, OutboxError>>),
    SettleBatch {
        batch_id: Uuid,
        proposed: Vec<SeqRange>,
        reply: oneshot::Sender<Result<Settled, OutboxError>>,
    },
    Refresh(oneshot::Sender<Result<bool, OutboxError>>),
    Refused(Vec<RefusedRecord>, oneshot::Sender<Result<u64, OutboxError>>),
    Stats(oneshot::Sender<Result<FileStats, OutboxError>>),
    Close(oneshot::Sender<()>),
}

struct Shared {
    site_id: String,
    outbox_id: Uuid,
    cfg: OutboxConfig,
    unconfirmed: AtomicU64,
    unsent: AtomicU64,
    bytes: AtomicU64,
    near_full: AtomicBool,
    /// Signalled when rows become pending (new, or requeued).
    pending: Notify,
    /// How many times the writer compared `PRAGMA data_version` (every
    /// group does): [`Outbox::refresh`] skips its round trip when the
    /// writer looked since the last call.
    version_checks: AtomicU64,
    /// `version_checks` at the last [`Outbox::refresh`].
    version_checks_seen: AtomicU64,
    /// Another process committed and no [`Outbox::refresh`] has said so yet.
    external_commits: AtomicBool,
}

/// Handle to an open outbox; cheap to clone, usable from any task.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Cmd>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("site_id", &self.shared.site_id)
            .field("outbox_id", &self.shared.outbox_id)
            .field("counts", &self.counts())
            .finish()
    }
}

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

fn meta_get(conn: &Connection, key: &str) -> Result<Option<String>, rusqlite::Error> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()
}

fn meta_set(conn: &Connection, key: &str, value: &str) -> Result<(), rusqlite::Error> {
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
fn exec_cached(conn: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
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

fn next_seq(conn: &Connection) -> Result<i64, rusqlite::Error> {
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
fn read_counts(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.prepare_cached("SELECT COUNT(*), COALESCE(SUM(octet_length(body)), 0) FROM outbox")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// SQLite's `PRAGMA data_version`: changes when *another* connection
/// commits to the file, never for this connection's own commits.
fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
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
fn stats_with_counts(conn: &Connection, c: Counts) -> Result<FileStats, OutboxError> {
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

impl Outbox {
    /// Opens the outbox of `site_id` in `cfg.data_dir` (created if missing)
    /// and starts the writer thread. Every row starts pending (in-flight
    /// state lives in the writer's memory). Another process may hold the
    /// same file open and append to it (module doc, "Other writers").
    pub fn open(cfg: OutboxConfig, site_id: &str) -> Result<Outbox, OutboxError> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| OutboxError::Storage(format!("creating {}: {e}", cfg.data_dir.display())))?;
        let conn = open_connection(&cfg.path(), cfg.cache_kib)?;
        // One transaction: two processes creating the file at once agree on
        // its identity, and the counts go with the data version they read.
        exec_cached(&conn, "BEGIN IMMEDIATE")?;
        let opened = (|| -> Result<_, OutboxError> {
            let (site, outbox_id) = identity(&conn, Some(site_id))?;
            let (rows, bytes) = read_counts(&conn)?;
            Ok((site, outbox_id, rows, bytes, data_version(&conn)?, next_seq(&conn)?))
        })();
        let (site, outbox_id, rows, bytes, version, next) = match opened.and_then(|o| {
            exec_cached(&conn, "COMMIT")?;
            Ok(o)
        }) {
            Ok(o) => o,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        tracing::info!(
            path = %cfg.path().display(), site_id = %site, %outbox_id, unconfirmed = rows, next_seq = next,
            "outbox open"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            site_id: site,
            outbox_id,
            cfg,
            unconfirmed: AtomicU64::new(rows as u64),
            unsent: AtomicU64::new(rows as u64),
            bytes: AtomicU64::new(bytes as u64),
            near_full: AtomicBool::new(false),
            pending: Notify::new(),
            version_checks: AtomicU64::new(0),
            version_checks_seen: AtomicU64::new(0),
            external_commits: AtomicBool::new(false),
        });
        let writer = Writer {
            conn,
            shared: shared.clone(),
            next_seq: None,
            synced: true,
            inflight: BTreeMap::new(),
            data_version: version,
        };
        writer.publish_gauges();
        std::thread::Builder::new()
            .name(format!("outbox-{}", shared.site_id))
            .stack_size(1 << 20)
            .spawn(move || writer.run(rx))
            .map_err(|e| OutboxError::Storage(format!("spawning the outbox writer: {e}")))?;
        Ok(Outbox { shared, tx })
    }

    pub fn site_id(&self) -> &str {
        &self.shared.site_id
    }

    pub fn outbox_id(&self) -> Uuid {
        self.shared.outbox_id
    }

    pub fn config(&self) -> &OutboxConfig {
        &self.shared.cfg
    }

    /// Current counts, from memory (no I/O).
    pub fn counts(&self) -> Counts {
        Counts {
            unconfirmed: self.shared.unconfirmed.load(Ordering::Acquire),
            unsent: self.shared.unsent.load(Ordering::Acquire),
            bytes: self.shared.bytes.load(Ordering::Acquire),
        }
    }

    /// Fill ratio against the tighter of the two limits.
    pub fn fill_ratio(&self) -> f64 {
        let c = self.counts();
        fill(&self.shared.cfg, c.unconfirmed, c.bytes)
    }

    /// Whether the outbox is above the warning threshold.
    pub fn near_full(&self) -> bool {
        self.shared.near_full.load(Ordering::Acquire)
    }

    /// Resolves when rows may have become pending since the last call.
    pub async fn pending_notified(&self) {
        self.shared.pending.notified().await;
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, OutboxError>>) -> Cmd,
    ) -> Result<T, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Stores impressions (their `site_id` must be this outbox's; any `seq`
    /// they carry is replaced). Resolves once they are durable on disk.
    pub async fn append(&self, impressions: Vec<Impression>) -> Result<AppendOutcome, OutboxError> {
        if let Some(bad) = impressions.iter().find(|i| i.site_id != self.shared.site_id) {
            return Err(OutboxError::Storage(format!(
                "impression {} is of site '{}', this outbox is '{}'",
                bad.impression_id, bad.site_id, self.shared.site_id
            )));
        }
        if impressions.is_empty() {
            return Ok(AppendOutcome {
                queued: self.counts().unconfirmed,
                ..Default::default()
            });
        }
        self.call(|tx| Cmd::Append(impressions, tx)).await
    }

    /// Marks up to `max_count` pending rows (lowest seq first, at most
    /// `max_bytes` of JSON, at least one) as published in `batch_id`.
    pub async fn claim(&self, max_count: usize, max_bytes: usize, batch_id: Uuid) -> Result<Claimed, OutboxError> {
        self.call(|reply| Cmd::Claim {
            max_count,
            max_bytes,
            batch_id,
            reply,
        })
        .await
    }

    /// Puts the still-unconfirmed rows of `batch_id` (or of every batch) back to pending.
    pub async fn requeue(&self, batch_id: Option<Uuid>) -> Result<u64, OutboxError> {
        self.call(|tx| Cmd::Requeue(batch_id, tx)).await
    }

    /// Applies a receipt for `batch_id`: deletes the rows whose seqs it
    /// proposes *and* that are in flight in that batch (claimed by this
    /// process under `batch_id`, neither settled nor requeued since).
    /// Anything else it names is ignored and reported in [`Settled`]; a
    /// batch that is not in flight settles nothing. So whatever arrives on
    /// the network, a receipt can only remove rows this outbox published
    /// in the batch it answers.
    pub async fn settle_batch(&self, batch_id: Uuid, proposed: Vec<SeqRange>) -> Result<Settled, OutboxError> {
        self.call(|reply| Cmd::SettleBatch {
            batch_id,
            proposed,
            reply,
        })
        .await
    }

    /// Looks for commits another process made to the file (an `import`
    /// while the service runs): when there are, recounts the counters from
    /// the file and wakes [`Outbox::pending_notified`] if rows are pending.
    /// Cheap when nothing changed: one `PRAGMA data_version`, and not even
    /// that when the writer ran a group since the last call (every group
    /// looks itself), so a busy box pays nothing. Returns whether another
    /// process's commit was found since the last call; a commit made just
    /// after the writer's last look is found by the next call (or the next
    /// command), so a caller polling at an interval finds it within two.
    pub async fn refresh(&self) -> Result<bool, OutboxError> {
        let s = &self.shared;
        let found = s.external_commits.swap(false, Ordering::AcqRel);
        let checks = s.version_checks.load(Ordering::Acquire);
        let looked = s.version_checks_seen.swap(checks, Ordering::AcqRel) != checks;
        if found || looked {
            return Ok(found);
        }
        self.call(Cmd::Refresh).await
    }

    /// Keeps refused records for the operator.
    pub async fn store_refused(&self, records: Vec<RefusedRecord>) -> Result<u64, OutboxError> {
        self.call(|tx| Cmd::Refused(records, tx)).await
    }

    /// Statistics read from the file through the writer.
    pub async fn stats(&self) -> Result<FileStats, OutboxError> {
        self.call(Cmd::Stats).await
    }

    /// Finishes queued commands, checkpoints the WAL and stops the writer.
    /// Later calls on any clone fail with [`OutboxError::Closed`].
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

fn fill(cfg: &OutboxConfig, rows: u64, bytes: u64) -> f64 {
    let r = rows as f64 / cfg.max_rows.max(1) as f64;
    let b = bytes as f64 / cfg.max_bytes.max(1) as f64;
    r.max(b)
}

/// What one command did, applied to the counters after the commit.
#[derive(Default)]
struct Delta {
    rows: i64,
    unsent: i64,
    bytes: i64,
    notify: bool,
}

enum Reply {
    Append(
        oneshot::Sender<Result<AppendOutcome, OutboxError>>,
        Result<AppendOutcome, OutboxError>,
    ),
    Claim(
        oneshot::Sender<Result<Claimed, OutboxError>>,
        Result<Claimed, OutboxError>,
    ),
    Count(oneshot::Sender<Result<u64, OutboxError>>, Result<u64, OutboxError>),
    Settled(
        oneshot::Sender<Result<Settled, OutboxError>>,
        Result<Settled, OutboxError>,
    ),
    Stats(
        oneshot::Sender<Result<FileStats, OutboxError>>,
        Result<FileStats, OutboxError>,
    ),
}

impl Reply {
    fn fail(self, e: &str) {
        match self {
            Reply::Append(tx, _) => drop(tx.send(storage_err(e))),
            Reply::Claim(tx, _) => drop(tx.send(storage_err(e))),
            Reply::Count(tx, _) => drop(tx.send(storage_err(e))),
            Reply::Settled(tx, _) => drop(tx.send(storage_err(e))),
            Reply::Stats(tx, _) => drop(tx.send(storage_err(e))),
        }
    }

    fn send(self, queued: u64) {
        match self {
            Reply::Append(tx, r) => drop(tx.send(r.map(|mut o| {
                o.queued = queued;
                o
            }))),
            Reply::Claim(tx, r) => drop(tx.send(r)),
            Reply::Count(tx, r) => drop(tx.send(r)),
            Reply::Settled(tx, r) => drop(tx.send(r)),
            Reply::Stats(tx, r) => drop(tx.send(r)),
        }
    }
}

struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    /// The next seq to assign in the current group: read from the file
    /// (`meta.next_seq`, `MAX(seq)`) by the group's first append, after
    /// `BEGIN IMMEDIATE`, never carried from one group to the next (another
    /// process may have appended in between).
    next_seq: Option<i64>,
    /// The connection's current `synchronous` setting: FULL (true) for
    /// groups that must survive a power cut, NORMAL otherwise (module doc).
    synced: bool,
    /// Rows published and awaiting a receipt, as runs of contiguous seqs
    /// keyed by their first seq (module doc, "In-flight rows").
    inflight: BTreeMap<i64, Run>,
    /// `PRAGMA data_version` when the counters were last exact: a
    /// different value means another process committed (module doc,
    /// "Other writers").
    data_version: i64,
}

/// A run of rows claimed together (one envelope may hold several runs when
/// it skipped rows already in flight).
#[derive(Clone, Copy, Debug)]
struct Run {
    last: i64,
    batch_id: Uuid,
    /// Unix milliseconds of the claim.
    published_at: i64,
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

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let site = self.shared.site_id.clone();
        while let Some(first) = rx.blocking_recv() {
            let mut cmds = vec![first];
            while cmds.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            let mut close = None;
            let mut refresh = Vec::new();
            let mut work = Vec::with_capacity(cmds.len());
            for c in cmds {
                match c {
                    Cmd::Close(tx) => close = Some(tx),
                    Cmd::Refresh(tx) => refresh.push(tx),
                    other => work.push(other),
                }
            }
            if !work.is_empty() {
                // The group looks for other writers' commits itself.
                self.group(work);
            } else if !refresh.is_empty() {
                if let Err(e) = self.refresh_outside_group() {
                    let msg = format!("refresh: {e}");
                    for tx in refresh.drain(..) {
                        let _ = tx.send(storage_err(&msg));
                    }
                }
            }
            if !refresh.is_empty() {
                let seen = self.shared.external_commits.swap(false, Ordering::AcqRel);
                for tx in refresh {
                    let _ = tx.send(Ok(seen));
                }
            }
            if let Some(tx) = close {
                // Drain whatever raced with the close, then stop.
                let mut rest = Vec::new();
                while let Ok(c) = rx.try_recv() {
                    match c {
                        Cmd::Close(_) => {}
                        Cmd::Refresh(tx) => drop(tx.send(Err(OutboxError::Closed))),
                        other => rest.push(other),
                    }
                }
                if !rest.is_empty() {
                    self.group(rest);
                }
                if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
                    tracing::warn!(error = %e, "outbox checkpoint at close failed");
                }
                tracing::info!(site_id = %site, "outbox closed");
                let _ = tx.send(());
                return;
            }
        }
    }

    /// When another connection committed to the file since the counters
    /// were last exact, recounts them from the file. Called inside a
    /// transaction (the count and the data version are then of one
    /// snapshot). Only the writer thread stores into the counters, so they
    /// are overwritten here, not adjusted.
    fn absorb_external_commits(&mut self) -> rusqlite::Result<()> {
        let version = data_version(&self.conn)?;
        self.shared.version_checks.fetch_add(1, Ordering::AcqRel);
        if version == self.data_version {
            return Ok(());
        }
        let (rows, bytes) = read_counts(&self.conn)?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM outbox WHERE seq BETWEEN ?1 AND ?2")?;
        let mut in_flight = 0i64;
        for (&first, run) in &self.inflight {
            in_flight += stmt.query_row(params![first, run.last], |r| r.get::<_, i64>(0))?;
        }
        drop(stmt);
        let s = &self.shared;
        let before = s.unconfirmed.load(Ordering::Acquire);
        let unsent = (rows - in_flight).max(0) as u64;
        s.unconfirmed.store(rows as u64, Ordering::Release);
        s.unsent.store(unsent, Ordering::Release);
        s.bytes.store(bytes as u64, Ordering::Release);
        self.data_version = version;
        s.external_commits.store(true, Ordering::Release);
        tracing::info!(
            site_id = %s.site_id, unconfirmed = rows, before, unsent,
            "outbox: another process committed to the file; counters recounted"
        );
        if unsent > 0 {
            s.pending.notify_one();
        }
        Ok(())
    }

    /// [`Writer::absorb_external_commits`] for a refresh that came alone:
    /// a read transaction, no write lock taken.
    fn refresh_outside_group(&mut self) -> Result<(), OutboxError> {
        if data_version(&self.conn)? == self.data_version {
            self.shared.version_checks.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        }
        exec_cached(&self.conn, "BEGIN")?;
        let r = self.absorb_external_commits();
        let r = r.and_then(|()| exec_cached(&self.conn, "COMMIT"));
        if r.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        r?;
        self.publish_gauges();
        Ok(())
    }

    /// Executes a group of commands in one transaction, then answers them.
    fn group(&mut self, cmds: Vec<Cmd>) {
        let started = Instant::now();
        let n = cmds.len();
        let inflight_before = self.inflight.clone();
        self.next_seq = None;
        // Set outside the transaction (SQLite reads it at commit).
        let durable = cmds.iter().any(|c| matches!(c, Cmd::Append(..) | Cmd::Refused(..)));
        if durable != self.synced {
            let mode = if durable { "FULL" } else { "NORMAL" };
            match self.conn.pragma_update(None, "synchronous", mode) {
                Ok(()) => self.synced = durable,
                // Staying FULL is only slower.
                Err(e) if !durable => tracing::warn!(error = %e, "outbox: synchronous=NORMAL not set"),
                Err(e) => {
                    let msg = format!("setting synchronous={mode}: {e}");
                    for c in cmds {
                        fail_cmd(c, &msg);
                    }
                    return;
                }
            }
        }
        let begun = exec_cached(&self.conn, "BEGIN IMMEDIATE").and_then(|()| {
            // Holding the write lock: what another process committed is
            // counted before any command relies on the counters.
            self.absorb_external_commits().inspect_err(|_| {
                let _ = self.conn.execute_batch("ROLLBACK");
            })
        });
        if let Err(e) = begun {
            let msg = format!("begin: {e}");
            for c in cmds {
                fail_cmd(c, &msg);
            }
            return;
        }
        let mut replies = Vec::with_capacity(n);
        let mut total = Delta::default();
        let mut receipt = false;
        for cmd in cmds {
            let _ = exec_cached(&self.conn, "SAVEPOINT cmd");
            let (reply, delta, ok) = self.exec(cmd, &total);
            if ok {
                let _ = exec_cached(&self.conn, "RELEASE cmd");
                total.rows += delta.rows;
                total.unsent += delta.unsent;
                total.bytes += delta.bytes;
                total.notify |= delta.notify;
                receipt |= matches!(reply, Reply::Settled(..)) && delta.rows < 0;
            } else {
                let _ = self.conn.execute_batch("ROLLBACK TO cmd; RELEASE cmd");
            }
            replies.push(reply);
        }
        let mut commit = Ok(());
        if let Some(next) = self.next_seq {
            commit = meta_set(&self.conn, "next_seq", &next.to_string());
        }
        if receipt && commit.is_ok() {
            commit = meta_set(
                &self.conn,
                "last_receipt_at",
                &Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            );
        }
        let commit = commit.and_then(|()| exec_cached(&self.conn, "COMMIT"));
        self.next_seq = None;
        if let Err(e) = commit {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.inflight = inflight_before;
            tracing::error!(error = %e, "outbox commit failed; nothing of this group was acknowledged");
            let msg = format!("commit: {e}");
            for r in replies {
                r.fail(&msg);
            }
            return;
        }
        let s = &self.shared;
        let add = |a: &AtomicU64, d: i64| {
            if d >= 0 {
                a.fetch_add(d as u64, Ordering::AcqRel);
            } else {
                a.fetch_sub((-d) as u64, Ordering::AcqRel);
            }
        };
        add(&s.unconfirmed, total.rows);
        add(&s.unsent, total.unsent);
        add(&s.bytes, total.bytes);
        let queued = s.unconfirmed.load(Ordering::Acquire);
        for r in replies {
            r.send(queued);
        }
        if total.notify {
            s.pending.notify_one();
        }
        metrics::histogram!("edge_outbox_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("edge_outbox_group_commands").record(n as f64);
        self.publish_gauges();
    }

    fn publish_gauges(&self) {
        let s = &self.shared;
        let site = s.site_id.clone();
        let rows = s.unconfirmed.load(Ordering::Acquire);
        let bytes = s.bytes.load(Ordering::Acquire);
        let ratio = fill(&s.cfg, rows, bytes);
        metrics::gauge!("edge_outbox_unconfirmed", "site" => site.clone()).set(rows as f64);
        metrics::gauge!("edge_outbox_unsent", "site" => site.clone()).set(s.unsent.load(Ordering::Acquire) as f64);
        metrics::gauge!("edge_outbox_bytes", "site" => site.clone()).set(bytes as f64);
        metrics::gauge!("edge_outbox_fill_ratio", "site" => site.clone()).set(ratio);
        let near = ratio >= s.cfg.warn_ratio;
        let was = s.near_full.swap(near, Ordering::AcqRel);
        if near && !was {
            tracing::warn!(
                site_id = %site, unconfirmed = rows, bytes, max_rows = s.cfg.max_rows, max_bytes = s.cfg.max_bytes,
                fill = format!("{:.0}%", ratio * 100.0),
                "outbox is nearly full: the box has been unable to deliver for a long time; at the limit new impressions are refused (HTTP 507)"
            );
        } else if !near && was {
            tracing::info!(site_id = %site, unconfirmed = rows, "outbox back below the warning threshold");
        }
    }

    fn exec(&mut self, cmd: Cmd, so_far: &Delta) -> (Reply, Delta, bool) {
        match cmd {
            Cmd::Append(imps, tx) => match self.append(&imps, so_far) {
                Ok((o, d)) => (Reply::Append(tx, Ok(o)), d, true),
                Err(e) => (Reply::Append(tx, Err(e)), Delta::default(), false),
            },
            Cmd::Claim {
                max_count,
                max_bytes,
                batch_id,
                reply,
            } => match self.claim(max_count, max_bytes, batch_id) {
                Ok(v) => {
                    let d = Delta {
                        unsent: -(v.len() as i64),
                        ..Default::default()
                    };
                    (Reply::Claim(reply, Ok(v)), d, true)
                }
                Err(e) => (Reply::Claim(reply, Err(e)), Delta::default(), false),
            },
            Cmd::Requeue(batch, tx) => match self.requeue(batch) {
                Ok(n) => (
                    Reply::Count(tx, Ok(n)),
                    Delta {
                        unsent: n as i64,
                        notify: n > 0,
                        ..Default::default()
                    },
                    true,
                ),
                Err(e) => (Reply::Count(tx, Err(e)), Delta::default(), false),
            },
            Cmd::SettleBatch {
                batch_id,
                proposed,
                reply,
            } => match self.settle_batch(batch_id, &proposed, so_far) {
                Ok((n, d)) => (Reply::Settled(reply, Ok(n)), d, true),
                Err(e) => (Reply::Settled(reply, Err(e)), Delta::default(), false),
            },
            Cmd::Refused(recs, tx) => match self.refused(&recs) {
                Ok(n) => (Reply::Count(tx, Ok(n)), Delta::default(), true),
                Err(e) => (Reply::Count(tx, Err(e)), Delta::default(), false),
            },
            Cmd::Stats(tx) => {
                let c = Counts {
                    unconfirmed: (self.shared.unconfirmed.load(Ordering::Acquire) as i64 + so_far.rows) as u64,
                    unsent: (self.shared.unsent.load(Ordering::Acquire) as i64 + so_far.unsent) as u64,
                    bytes: (self.shared.bytes.load(Ordering::Acquire) as i64 + so_far.bytes) as u64,
                };
                (
                    Reply::Stats(tx, stats_with_counts(&self.conn, c)),
                    Delta::default(),
                    true,
                )
            }
            Cmd::Close(_) | Cmd::Refresh(_) => unreachable!("filtered before"),
        }
    }

    fn append(&mut self, imps: &[Impression], so_far: &Delta) -> Result<(AppendOutcome, Delta), OutboxError> {
        let cfg = &self.shared.cfg;
        let mut rows = (self.shared.unconfirmed.load(Ordering::Acquire) as i64 + so_far.rows) as u64;
        let mut bytes = (self.shared.bytes.load(Ordering::Acquire) as i64 + so_far.bytes) as u64;
        let start_seq = match self.next_seq {
            Some(seq) => seq,
            None => next_seq(&self.conn)?,
        };
        let now_ms = Utc::now().timestamp_millis();
        let mut out = AppendOutcome::default();
        let mut d = Delta::default();
        // A duplicate is the same impression_id and nothing else: a seq
        // that is taken fails the append (it would be a bug, never a play
        // already stored).
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO outbox (seq, impression_id, played_at, enqueued_at, state, attempts, body)
             VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5)
             ON CONFLICT (impression_id) DO NOTHING",
        )?;
        let mut seq = start_seq;
        for imp in imps {
            let mut imp = imp.clone();
            imp.seq = Some(seq);
            let body = serde_json::to_string(&imp).map_err(|e| OutboxError::Storage(e.to_string()))?;
            if rows + 1 > cfg.max_rows || bytes + body.len() as u64 > cfg.max_bytes {
                // At the limit, a retry of something already stored is still fine.
                let present: bool = self.conn.query_row(
                    "SELECT EXISTS (SELECT 1 FROM outbox WHERE impression_id = ?1)",
                    [imp.impression_id.as_bytes().as_slice()],
                    |r| r.get(0),
                )?;
                if present {
                    out.duplicates += 1;
                    continue;
                }
                metrics::counter!("edge_outbox_full_refusals_total").increment(1);
                return Err(OutboxError::Full {
                    rows,
                    bytes,
                    max_rows: cfg.max_rows,
                    max_bytes: cfg.max_bytes,
                });
            }
            let n = stmt.execute(params![
                seq,
                imp.impression_id.as_bytes().as_slice(),
                imp.played_at.timestamp_micros(),
                now_ms,
                body
            ])?;
            if n == 1 {
                seq += 1;
                rows += 1;
                bytes += body.len() as u64;
                out.inserted += 1;
                d.bytes += body.len() as i64;
            } else {
                out.duplicates += 1;
            }
        }
        drop(stmt);
        if seq != start_seq {
            self.next_seq = Some(seq);
        }
        d.rows = out.inserted as i64;
        d.unsent = out.inserted as i64;
        d.notify = out.inserted > 0;
        metrics::counter!("edge_impressions_stored_total").increment(out.inserted);
        metrics::counter!("edge_impressions_duplicate_total").increment(out.duplicates);
        Ok((out, d))
    }

    /// The seq intervals not covered by an in-flight run, in order: where
    /// pending rows are.
    fn pending_gaps(&self) -> Vec<(i64, i64)> {
        let mut gaps = Vec::with_capacity(self.inflight.len() + 1);
        let mut from = i64::MIN;
        for (&first, run) in &self.inflight {
            if first > from {
                gaps.push((from, first - 1));
            }
            from = from.max(run.last.saturating_add(1));
        }
        gaps.push((from, i64::MAX));
        gaps
    }

    /// Takes the oldest pending rows. Read-only on the file: the claim is
    /// recorded in [`Writer::inflight`] (module doc, "In-flight rows").
    fn claim(&mut self, max_count: usize, max_bytes: usize, batch_id: Uuid) -> Result<Claimed, OutboxError> {
        let max_count = max_count.max(1);
        let gaps = self.pending_gaps();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, body FROM outbox WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq LIMIT ?3")?;
        let mut out = Claimed::default();
        let mut runs: Vec<(i64, i64)> = Vec::new();
        let mut size = 0usize;
        'gaps: for (from, to) in gaps {
            let mut rows = stmt.query(params![from, to, (max_count - out.len()) as i64])?;
            let mut run: Option<(i64, i64)> = None;
            let mut full = false;
            while let Some(r) = rows.next()? {
                // Borrowed from SQLite's row: copied once, into the batch.
                let body = r
                    .get_ref(1)?
                    .as_bytes()
                    .map_err(|e| OutboxError::Storage(format!("outbox body is neither text nor blob: {e}")))?;
                if !out.is_empty() && size + body.len() + 1 > max_bytes {
                    full = true;
                    break;
                }
                let seq: i64 = r.get(0)?;
                size += body.len() + 1;
                out.push(seq, body);
                run = Some((run.map_or(seq, |(first, _)| first), seq));
            }
            runs.extend(run);
            if full || out.len() >= max_count {
                break 'gaps;
            }
        }
        drop(stmt);
        let published_at = Utc::now().timestamp_millis();
        for (first, last) in runs {
            self.inflight.insert(
                first,
                Run {
                    last,
                    batch_id,
                    published_at,
                },
            );
        }
        Ok(out)
    }

    /// Puts the in-flight rows of `batch` (or of every batch) back to
    /// pending. This is the path of an unconfirmed publish, so it is where
    /// the file records it: `attempts`, `batch_id` and `published_at`.
    fn requeue(&mut self, batch: Option<Uuid>) -> Result<u64, OutboxError> {
        let runs: Vec<(i64, Run)> = self
            .inflight
            .iter()
            .filter(|(_, r)| batch.is_none_or(|b| r.batch_id == b))
            .map(|(f, r)| (*f, *r))
            .collect();
        let mut stmt = self.conn.prepare_cached(
            "UPDATE outbox SET attempts = attempts + 1, batch_id = ?1, published_at = ?2
             WHERE seq BETWEEN ?3 AND ?4",
        )?;
        let mut n = 0u64;
        for (first, r) in &runs {
            n += stmt.execute(params![r.batch_id.as_bytes().as_slice(), r.published_at, first, r.last])? as u64;
        }
        drop(stmt);
        for (first, _) in runs {
            self.inflight.remove(&first);
        }
        Ok(n)
    }

    /// Applies a receipt for `batch_id` ([`Outbox::settle_batch`]): deletes
    /// the proposed seqs that lie in that batch's runs, nothing else. When
    /// the receipt settles the whole batch and the batch holds every stored
    /// row (a box that is caught up: the usual case), the table is emptied
    /// with a bare `DELETE`, which SQLite executes by releasing the pages
    /// instead of rewriting each one. That decision is made from the
    /// batch's runs and the file, never from the receipt's ranges.
    fn settle_batch(
        &mut self,
        batch_id: Uuid,
        proposed: &[SeqRange],
        so_far: &Delta,
    ) -> Result<(Settled, Delta), OutboxError> {
        let runs: Vec<(i64, i64)> = self
            .inflight
            .iter()
            .filter(|(_, r)| r.batch_id == batch_id)
            .map(|(&f, r)| (f, r.last))
            .collect();
        let mut d = Delta::default();
        if runs.is_empty() {
            return Ok((Settled::default(), d));
        }
        let proposed = merge_ranges(proposed.iter().map(|r| (r.first, r.last)).collect());
        let (hits, outside) = intersect(&proposed, &runs);
        let mut out = Settled {
            known_batch: true,
            outside,
            ..Default::default()
        };
        if hits == runs && self.only_rows_in(&runs)? {
            let n = self.conn.prepare_cached("DELETE FROM outbox")?.execute([])? as u64;
            let s = &self.shared;
            let expected = s.unconfirmed.load(Ordering::Acquire) as i64 + so_far.rows;
            if n as i64 != expected {
                tracing::warn!(deleted = n, expected, "outbox counters disagreed with the file");
            }
            d.rows = -(n as i64);
            d.bytes = -(s.bytes.load(Ordering::Acquire) as i64 + so_far.bytes);
            d.unsent = -(s.unsent.load(Ordering::Acquire) as i64 + so_far.unsent);
            for (f, _) in &runs {
                self.inflight.remove(f);
            }
            out.settled = n;
            return Ok((out, d));
        }
        let mut stmt = self
            .conn
            .prepare_cached("DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2 RETURNING octet_length(body)")?;
        for &(first, last) in &hits {
            let mut rows = stmt.query(params![first, last])?;
            while let Some(row) = rows.next()? {
                let len: i64 = row.get(0)?;
                out.settled += 1;
                d.rows -= 1;
                d.bytes -= len;
            }
        }
        drop(stmt);
        // Every deleted row was in flight: `unsent` does not change. Runs
        // wholly settled are done; a run settled in part keeps its other
        // rows in flight (the receipt timeout requeues them) while it holds
        // any, so that no run outlives its rows.
        let mut count = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM outbox WHERE seq BETWEEN ?1 AND ?2")?;
        let mut done = Vec::new();
        for &(f, l) in &runs {
            let wholly = hits.iter().any(|&(a, b)| a <= f && l <= b);
            let left = if wholly {
                0
            } else {
                count.query_row(params![f, l], |r| r.get::<_, i64>(0))? as u64
            };
            out.remaining += left;
            if left == 0 {
                done.push(f);
            }
        }
        drop(count);
        for f in done {
            self.inflight.remove(&f);
        }
        Ok((out, d))
    }

    /// Whether every stored row lies in `runs` (sorted, disjoint): index
    /// lookups only (the lowest and highest seq, one probe per gap).
    fn only_rows_in(&self, runs: &[(i64, i64)]) -> Result<bool, OutboxError> {
        let (Some(&(lo_run, _)), Some(&(_, hi_run))) = (runs.first(), runs.last()) else {
            return Ok(false);
        };
        let (lo, hi): (Option<i64>, Option<i64>) = self
            .conn
            .prepare_cached("SELECT (SELECT MIN(seq) FROM outbox), (SELECT MAX(seq) FROM outbox)")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let (Some(lo), Some(hi)) = (lo, hi) else {
            return Ok(false);
        };
        if lo < lo_run || hi > hi_run {
            return Ok(false);
        }
        let mut probe = self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM outbox WHERE seq BETWEEN ?1 AND ?2)")?;
        for w in runs.windows(2) {
            let (gap_lo, gap_hi) = (w[0].1 + 1, w[1].0 - 1);
            if gap_lo <= gap_hi && probe.query_row(params![gap_lo, gap_hi], |r| r.get::<_, bool>(0))? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn refused(&mut self, recs: &[RefusedRecord]) -> Result<u64, OutboxError> {
        let now = Utc::now().timestamp_millis();
        let mut stmt = self
            .conn
            .prepare_cached("INSERT INTO refused (received_at, raw, reason) VALUES (?1, ?2, ?3)")?;
        for r in recs {
            stmt.execute(params![now, r.raw, r.reason])?;
        }
        drop(stmt);
        self.conn.execute(
            "DELETE FROM refused WHERE id <= (SELECT MAX(id) FROM refused) - ?1",
            [MAX_REFUSED_KEPT],
        )?;
        Ok(recs.len() as u64)
    }
}

fn fail_cmd(c: Cmd, msg: &str) {
    let e = msg;
    match c {
        Cmd::Append(_, tx) => drop(tx.send(storage_err(e))),
        Cmd::Claim { reply, .. } => drop(reply.send(storage_err(e))),
        Cmd::Requeue(_, tx) | Cmd::Refused(_, tx) => drop(tx.send(storage_err(e))),
        Cmd::SettleBatch { reply, .. } => drop(reply.send(storage_err(e))),
        Cmd::Refresh(tx) => drop(tx.send(storage_err(e))),
        Cmd::Stats(tx) => drop(tx.send(storage_err(e))),
        Cmd::Close(tx) => drop(tx.send(())),
    }
}

fn storage_err<T>(msg: &str) -> Result<T, OutboxError> {
    Err(OutboxError::Storage(msg.to_owned()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use schema::{EventType, Period, TriggerType};

    /// A play of `a.mp4` at `site`, `k` seconds after a fixed instant (shared
    /// with the publisher's tests).
    pub(crate) fn imp(site: &str, k: i64) -> Impression {
        let played_at = Utc.with_ymd_and_hms(2025, 12, 14, 21, 0, 0).unwrap() + chrono::Duration::seconds(k);
        Impression {
            impression_id: schema::derive_impression_id(site, "a.mp4", played_at),
            site_id: site.into(),
            seq: None,
            video_id: None,
            video_filename: "a.mp4".into(),
            played_at,
            duration_played: 30.0,
            video_duration: 30.0,
            completed: true,
            event_type: EventType::Match,
            period: Period::Loop,
            trigger_type: TriggerType::Auto,
            audience_estimate: None,
        }
    }

    #[tokio::test]
    async fn seqs_are_contiguous_never_reused_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
        let id = ob.outbox_id();
        let o = ob.append((0..5).map(|k| imp("s1", k)).collect()).await.unwrap();
        assert_eq!((o.inserted, o.duplicates, o.queued), (5, 0, 5));
        let o = ob.append((3..8).map(|k| imp("s1", k)).collect()).await.unwrap();
        assert_eq!((o.inserted, o.duplicates, o.queued), (3, 2, 8));
        let b = Uuid::now_v7();
        let c = ob.claim(100, 1 << 20, b).await.unwrap();
        assert_eq!(c.seqs().to_vec(), (1..=8).collect::<Vec<_>>());
        // The joined bodies are the stored impressions, in seq order.
        let mut array = b"[".to_vec();
        array.extend_from_slice(c.joined_bodies());
        array.push(b']');
        let bodies: Vec<Impression> = serde_json::from_slice(&array).unwrap();
        assert_eq!(
            bodies.iter().map(|i| i.seq.unwrap()).collect::<Vec<_>>(),
            (1..=8).collect::<Vec<_>>()
        );
        assert_eq!(bodies[0].impression_id, imp("s1", 0).impression_id);
        assert_eq!(ob.counts().unsent, 0);
        // Settle everything: the table empties, the next seq is still 9.
        let s = ob.settle_batch(b, vec![SeqRange { first: 1, last: 8 }]).await.unwrap();
        assert_eq!((s.known_batch, s.settled, s.outside, s.remaining), (true, 8, false, 0));
        assert_eq!(ob.counts(), Counts::default());
        ob.append(vec![imp("s1", 100)]).await.unwrap();
        ob.close().await;
        let ob = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
        assert_eq!(ob.outbox_id(), id, "outbox id made once");
        let c = ob.claim(100, 1 << 20, Uuid::now_v7()).await.unwrap();
        assert_eq!(c.seqs().to_vec(), vec![9]);
        let st = ob.stats().await.unwrap();
        assert_eq!((st.unconfirmed, st.unsent, st.next_seq), (1, 0, 10));
        assert!(st.last_receipt_at.is_some());
        ob.close().await;
        assert!(matches!(
            ob.append(vec![imp("s1", 200)]).await,
            Err(OutboxError::Closed)
        ));
        // Another site's outbox is refused.
        assert!(Outbox::open(OutboxConfig::new(dir.path()), "s2").is_err());
    }

    #[tokio::test]
    async fn published_rows_are_requeued_at_open_and_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
        ob.append((0..10).map(|k| imp("s1", k)).collect()).await.unwrap();
        let b1 = Uuid::now_v7();
        let c1 = ob.claim(4, 1 << 20, b1).await.unwrap();
        let c2 = ob.claim(4, 1 << 20, Uuid::now_v7()).await.unwrap();
        assert_eq!((c1.len(), c2.len(), ob.counts().unsent), (4, 4, 2));
        assert_eq!(ob.requeue(Some(b1)).await.unwrap(), 4);
        assert_eq!(ob.counts().unsent, 6);
        let b3 = Uuid::now_v7();
        let again = ob.claim(100, 1 << 20, b3).await.unwrap();
        assert_eq!(again.seqs().to_vec(), vec![1, 2, 3, 4, 9, 10]);
        // Only what a receipt names goes.
        assert_eq!(
            ob.settle_batch(b3, vec![SeqRange { first: 2, last: 3 }])
                .await
                .unwrap()
                .settled,
            2
        );
        ob.close().await;
        let ob = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
        assert_eq!(ob.counts().unconfirmed, 8);
        assert_eq!(
            ob.counts().unsent,
            8,
            "every published row is pending again after a restart"
        );
        ob.close().await;
    }

    #[tokio::test]
    async fn claims_stay_in_memory_requeues_are_recorded_and_a_full_receipt_empties_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OutboxConfig::new(dir.path());
        let path = cfg.path();
        let ob = Outbox::open(cfg, "s1").unwrap();
        ob.append((0..10).map(|k| imp("s1", k)).collect()).await.unwrap();
        let file = open_connection(&path, 64).unwrap();
        let untouched = |file: &Connection| -> i64 {
            file.query_row(
                "SELECT COUNT(*) FROM outbox WHERE state = 'pending' AND attempts = 0 AND published_at IS NULL",
                [],
                |r| r.get(0),
            )
            .unwrap()
        };

        let b1 = Uuid::now_v7();
        let c1 = ob.claim(4, 1 << 20, b1).await.unwrap();
        assert_eq!(c1.seqs().to_vec(), vec![1, 2, 3, 4]);
        assert_eq!(ob.counts().unsent, 6);
        assert_eq!(untouched(&file), 10, "a claim writes nothing to the file");

        // An unconfirmed publish is what the file records.
        assert_eq!(ob.requeue(Some(b1)).await.unwrap(), 4);
        assert_eq!(ob.counts().unsent, 10);
        let (attempts, batch): (i64, Vec<u8>) = file
            .query_row("SELECT attempts, batch_id FROM outbox WHERE seq = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((attempts, batch.as_slice()), (1, b1.as_bytes().as_slice()));
        assert_eq!(untouched(&file), 6);

        let b2 = Uuid::now_v7();
        let all = ob.claim(100, 1 << 20, b2).await.unwrap();
        assert_eq!(all.len(), 10);
        // A partial receipt leaves the rest of the run in flight: not claimed again.
        let s = ob.settle_batch(b2, vec![SeqRange { first: 3, last: 5 }]).await.unwrap();
        assert_eq!((s.settled, s.remaining), (3, 7));
        assert_eq!((ob.counts().unconfirmed, ob.counts().unsent), (7, 0));
        assert!(ob.claim(100, 1 << 20, Uuid::now_v7()).await.unwrap().is_empty());
        assert_eq!(
            ob.requeue(Some(b2)).await.unwrap(),
            7,
            "the run's remaining rows are still in flight"
        );
        let b3 = Uuid::now_v7();
        let again = ob.claim(100, 1 << 20, b3).await.unwrap();
        assert_eq!(again.seqs().to_vec(), vec![1, 2, 6, 7, 8, 9, 10]);

        // Rows never published are not the batch's: a receipt naming them
        // settles none of them.
        ob.append((10..12).map(|k| imp("s1", k)).collect()).await.unwrap();
        assert_eq!(ob.counts().unsent, 2);
        let s = ob
            .settle_batch(b3, vec![SeqRange { first: 11, last: 11 }])
            .await
            .unwrap();
        assert_eq!((s.known_batch, s.settled, s.outside), (true, 0, true));
        assert_eq!((ob.counts().unconfirmed, ob.counts().unsent), (9, 2));
        let b4 = Uuid::now_v7();
        assert_eq!(ob.claim(100, 1 << 20, b4).await.unwrap().seqs().to_vec(), vec![11, 12]);

        // A receipt settling its whole batch, when the batch holds every
        // stored row, empties the table (the bare DELETE); here b3 does not
        // hold 11 and 12, so it deletes its own rows only.
        let s = ob
            .settle_batch(
                b3,
                vec![SeqRange { first: 7, last: 20 }, SeqRange { first: 1, last: 6 }],
            )
            .await
            .unwrap();
        assert_eq!((s.settled, s.outside, s.remaining), (7, true, 0));
        assert_eq!(ob.counts().unconfirmed, 2);
        let s = ob
            .settle_batch(b4, vec![SeqRange { first: 11, last: 12 }])
            .await
            .unwrap();
        assert_eq!((s.settled, s.outside), (2, false));
        assert_eq!(ob.counts(), Counts::default());
        let left: i64 = file.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)).unwrap();
        assert_eq!(left, 0);
        let st = ob.stats().await.unwrap();
        assert_eq!((st.unconfirmed, st.unsent, st.next_seq), (0, 0, 13));
        // A settled batch is no longer in flight: its receipt again is ignored.
        let s = ob
            .settle_batch(b4, vec![SeqRange { first: 11, last: 12 }])
            .await
            .unwrap();
        assert_eq!(s, Settled::default());
        ob.close().await;
    }

    /// A forged receipt (any batch id, any ranges) can remove only rows in
    /// flight in the batch it names; with a made-up batch, nothing.
    #[tokio::test]
    async fn a_receipt_settles_only_the_runs_of_its_own_batch() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OutboxConfig::new(dir.path());
        let path = cfg.path();
        let ob = Outbox::open(cfg, "s1").unwrap();
        ob.append((0..30).map(|k| imp("s1", k)).collect()).await.unwrap();
        let everything = vec![SeqRange {
            first: i64::MIN,
            last: i64::MAX,
        }];
        // No batch in flight at all.
        assert_eq!(
            ob.settle_batch(Uuid::now_v7(), everything.clone()).await.unwrap(),
            Settled::default()
        );
        let (b1, b2) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(
            ob.claim(10, 1 << 20, b1).await.unwrap().seqs(),
            (1..=10).collect::<Vec<_>>()
        );
        assert_eq!(
            ob.claim(10, 1 << 20, b2).await.unwrap().seqs(),
            (11..=20).collect::<Vec<_>>()
        );
        // A made-up batch id with the whole seq space: nothing.
        let s = ob.settle_batch(Uuid::now_v7(), everything.clone()).await.unwrap();
        assert!(!s.known_batch);
        let stored = |path: &Path| -> i64 {
            let c = open_connection(path, 64).unwrap();
            c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)).unwrap()
        };
        assert_eq!(stored(&path), 30);
        // b1's id with the whole seq space: b1's rows only, the rest flagged.
        let s = ob.settle_batch(b1, everything.clone()).await.unwrap();
        assert_eq!((s.known_batch, s.settled, s.outside, s.remaining), (true, 10, true, 0));
        assert_eq!(stored(&path), 20);
        assert_eq!((ob.counts().unconfirmed, ob.counts().unsent), (20, 10));
        // b2 requeued (its receipt timed out): its late receipt settles nothing.
        assert_eq!(ob.requeue(Some(b2)).await.unwrap(), 10);
        assert!(!ob.settle_batch(b2, everything.clone()).await.unwrap().known_batch);
        assert_eq!(stored(&path), 20);
        // Degenerate ranges (last < first) settle nothing either.
        let b3 = Uuid::now_v7();
        ob.claim(100, 1 << 20, b3).await.unwrap();
        let s = ob
            .settle_batch(b3, vec![SeqRange { first: 25, last: 12 }])
            .await
            .unwrap();
        assert_eq!((s.settled, s.remaining), (0, 20));
        assert_eq!(stored(&path), 20);
        // The genuine receipt of the batch holding every row empties the file.
        let s = ob.settle_batch(b3, SeqRange::compress(11..=30)).await.unwrap();
        assert_eq!((s.settled, s.outside, s.remaining), (20, false, 0));
        assert_eq!(stored(&path), 0);
        assert_eq!(ob.counts(), Counts::default());
        ob.close().await;
    }

    /// Two handles on one file (two processes: the service and `import`)
    /// appending at once: distinct seqs, nothing lost, no play reported as
    /// a duplicate it was not, and each side's counters follow the other's
    /// commits.
    #[tokio::test]
    async fn two_outboxes_on_one_file_append_concurrently_without_colliding() {
        let dir = tempfile::tempdir().unwrap();
        let a = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
        let b = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
        assert_eq!(a.outbox_id(), b.outbox_id());
        let writers: Vec<_> = [(a.clone(), 0i64), (b.clone(), 1_000_000)]
            .into_iter()
            .flat_map(|(ob, base)| {
                (0..8).map(move |t| {
                    let ob = ob.clone();
                    tokio::spawn(async move {
                        let mut inserted = 0;
                        for round in 0..10 {
                            let k0 = base + t * 1000 + round * 10;
                            let o = ob.append((k0..k0 + 10).map(|k| imp("s1", k)).collect()).await.unwrap();
                            assert_eq!(o.duplicates, 0, "new plays answered as duplicates");
                            inserted += o.inserted;
                        }
                        inserted
                    })
                })
            })
            .collect();
        let mut total = 0;
        for w in writers {
            total += w.await.unwrap();
        }
        assert_eq!(total, 1600);
        // Each handle sees the other's rows once it looks (a second call,
        // if the first was answered by the writer's last group).
        for ob in [&a, &b] {
            ob.refresh().await.unwrap();
            ob.refresh().await.unwrap();
        }
        assert_eq!(a.counts().unconfirmed, 1600);
        assert_eq!(b.counts().unconfirmed, 1600);
        let batch = Uuid::now_v7();
        let c = a.claim(10_000, 1 << 30, batch).await.unwrap();
        assert_eq!(
            c.seqs().to_vec(),
            (1..=1600).collect::<Vec<_>>(),
            "one seq per play, none skipped"
        );
        let mut array = b"[".to_vec();
        array.extend_from_slice(c.joined_bodies());
        array.push(b']');
        let bodies: Vec<Impression> = serde_json::from_slice(&array).unwrap();
        let ids: std::collections::HashSet<Uuid> = bodies.iter().map(|i| i.impression_id).collect();
        assert_eq!(ids.len(), 1600);
        // A retry through the other handle is a duplicate by impression id.
        let o = b.append(vec![imp("s1", 0)]).await.unwrap();
        assert_eq!((o.inserted, o.duplicates), (0, 1));
        let s = a.settle_batch(batch, SeqRange::compress(1..=1600)).await.unwrap();
        assert_eq!(s.settled, 1600);
        b.append(vec![imp("s1", 5_000_000)]).await.unwrap();
        let first = a.refresh().await.unwrap();
        let second = a.refresh().await.unwrap();
        assert!(first || second, "b's commit found within two calls");
        assert!(!a.refresh().await.unwrap(), "nothing new since");
        assert_eq!((a.counts().unconfirmed, a.counts().unsent), (1, 1));
        assert_eq!(a.stats().await.unwrap().next_seq, 1602);
        a.close().await;
        b.close().await;
    }

    /// `bytes` counts UTF-8 bytes everywhere (the limit is in bytes): an
    /// append adds `body.len()`, so a settle and a reopen must take away and
    /// recount bytes too, not characters (SQLite's `length()` of TEXT).
    #[tokio::test]
    async fn byte_counter_stays_in_bytes_for_non_ascii_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OutboxConfig::new(dir.path());
        let path = cfg.path();
        let ob = Outbox::open(cfg.clone(), "s1").unwrap();
        let plays: Vec<Impression> = (0..6)
            .map(|k| {
                let mut i = imp("s1", k);
                i.video_filename = "sponsor_café_été_ü.mp4".into();
                i.impression_id = schema::derive_impression_id("s1", &i.video_filename, i.played_at);
                i
            })
            .collect();
        ob.append(plays).await.unwrap();
        let file = open_connection(&path, 64).unwrap();
        let stored_bytes = |file: &Connection| -> u64 {
            let bodies: Vec<String> = file
                .prepare("SELECT body FROM outbox")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            bodies.iter().map(|b| b.len() as u64).sum()
        };
        assert!(file
            .query_row("SELECT body FROM outbox LIMIT 1", [], |r| r.get::<_, String>(0))
            .unwrap()
            .contains("café"));
        assert_eq!(ob.counts().bytes, stored_bytes(&file));
        let b = Uuid::now_v7();
        ob.claim(100, 1 << 20, b).await.unwrap();
        // A partial receipt takes its rows' bytes away.
        assert_eq!(
            ob.settle_batch(b, vec![SeqRange { first: 2, last: 3 }])
                .await
                .unwrap()
                .settled,
            2
        );
        assert_eq!(ob.counts().bytes, stored_bytes(&file));
        assert_eq!(ob.stats().await.unwrap().bytes, stored_bytes(&file));
        ob.close().await;
        // A reopen recounts bytes.
        let ob = Outbox::open(cfg, "s1").unwrap();
        assert_eq!(ob.counts().bytes, stored_bytes(&file));
        ob.close().await;
    }

    #[tokio::test]
    async fn concurrent_appends_are_group_committed_with_distinct_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
        let tasks: Vec<_> = (0..50)
            .map(|t| {
                let ob = ob.clone();
                tokio::spawn(async move { ob.append((0..20).map(|k| imp("s1", t * 1000 + k)).collect()).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().inserted, 20);
        }
        let c = ob.claim(10_000, 1 << 30, Uuid::now_v7()).await.unwrap();
        assert_eq!(c.seqs().to_vec(), (1..=1000).collect::<Vec<_>>());
        ob.close().await;
    }

    #[tokio::test]
    async fn byte_limit_refuses_without_evicting() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = OutboxConfig::new(dir.path());
        cfg.max_bytes = 560; // two rows (~230 bytes each) fit, above the 80 % warning line
        let ob = Outbox::open(cfg, "s1").unwrap();
        ob.append(vec![imp("s1", 0), imp("s1", 1)]).await.unwrap();
        let e = ob.append((2..10).map(|k| imp("s1", k)).collect()).await.unwrap_err();
        assert!(matches!(e, OutboxError::Full { .. }), "{e}");
        assert_eq!(
            ob.counts().unconfirmed,
            2,
            "nothing of the refused append, nothing evicted"
        );
        assert!(ob.near_full());
        ob.close().await;
    }
}
