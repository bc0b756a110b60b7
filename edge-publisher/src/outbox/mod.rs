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
//! (`inflight.rs`), and the next claim reads only the gaps between
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

//!
//! # Layout
//!
//! * `file.rs`: the file itself: opening it (pragmas, schema, identity),
//!   reading its meta, counts and statistics, and what operator commands
//!   read from it without the service ([`file_stats`], [`export_rows`]);
//! * `handle.rs`: the async [`Outbox`] handle, which sends commands to the
//!   writer thread over a channel and reads the counters it publishes;
//! * `writer.rs`: the group-commit writer thread and what each command does
//!   to the file;
//! * `inflight.rs`: the in-flight runs (pure bookkeeping, no SQLite): which
//!   seqs are claimed under which batch, the gaps a claim reads, and what of
//!   a receipt lies in its batch.

mod file;
mod handle;
mod inflight;
#[cfg(test)]
pub(crate) mod tests;
mod writer;

pub use file::{export_rows, file_stats, open_connection, ExportRow};
pub use handle::Outbox;

use chrono::{DateTime, Utc};
use serde::Serialize;
use std::path::PathBuf;
use uuid::Uuid;

/// File name of the outbox inside the data directory.
pub const FILE_NAME: &str = "outbox.sqlite3";

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

/// Fill ratio of `rows` and `bytes` against the tighter of the two limits.
fn fill(cfg: &OutboxConfig, rows: u64, bytes: u64) -> f64 {
    let r = rows as f64 / cfg.max_rows.max(1) as f64;
    let b = bytes as f64 / cfg.max_bytes.max(1) as f64;
    r.max(b)
}
