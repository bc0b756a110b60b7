//! The writer thread: the only read-write connection of this process, and
//! group commit (module doc, "Why SQLite, and why one writer"). It takes
//! every command queued while the previous commit ran, executes them in one
//! `BEGIN IMMEDIATE` transaction (a savepoint each), commits, and only then
//! answers each caller and updates the counters.

use chrono::{SecondsFormat, Utc};
use rusqlite::{params, Connection};
use schema::{Impression, SeqRange};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::file::{data_version, exec_cached, meta_set, next_seq, read_counts, stats_with_counts};
use super::handle::{Cmd, Shared};
use super::inflight::InFlight;
use super::{fill, AppendOutcome, Claimed, Counts, FileStats, OutboxError, RefusedRecord, Settled};

/// Most refused records kept for the operator (oldest pruned first).
const MAX_REFUSED_KEPT: i64 = 10_000;
/// Most commands folded into one transaction.
const MAX_GROUP: usize = 4096;

/// Starts the writer thread on `conn` (opened by [`super::file::open_for_writer`],
/// whose counts `shared` holds, read at `data_version`).
pub(super) fn spawn(
    conn: Connection,
    shared: Arc<Shared>,
    data_version: i64,
    rx: mpsc::UnboundedReceiver<Cmd>,
) -> Result<(), OutboxError> {
    let writer = Writer {
        conn,
        shared,
        next_seq: None,
        synced: true,
        inflight: InFlight::default(),
        data_version,
    };
    writer.publish_gauges();
    std::thread::Builder::new()
        .name(format!("outbox-{}", writer.shared.site_id))
        .stack_size(1 << 20)
        .spawn(move || writer.run(rx))
        .map_err(|e| OutboxError::Storage(format!("spawning the outbox writer: {e}")))?;
    Ok(())
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
    inflight: InFlight,
    /// `PRAGMA data_version` when the counters were last exact: a
    /// different value means another process committed (module doc,
    /// "Other writers").
    data_version: i64,
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
        for run in self.inflight.runs() {
            in_flight += stmt.query_row(params![run.first, run.last], |r| r.get::<_, i64>(0))?;
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

    /// Takes the oldest pending rows. Read-only on the file: the claim is
    /// recorded in [`Writer::inflight`] (module doc, "In-flight rows").
    fn claim(&mut self, max_count: usize, max_bytes: usize, batch_id: Uuid) -> Result<Claimed, OutboxError> {
        let max_count = max_count.max(1);
        let gaps = self.inflight.gaps();
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
        self.inflight.record(runs, batch_id, published_at);
        Ok(out)
    }

    /// Puts the in-flight rows of `batch` (or of every batch) back to
    /// pending. This is the path of an unconfirmed publish, so it is where
    /// the file records it: `attempts`, `batch_id` and `published_at`.
    fn requeue(&mut self, batch: Option<Uuid>) -> Result<u64, OutboxError> {
        let runs = self.inflight.of(batch);
        let mut stmt = self.conn.prepare_cached(
            "UPDATE outbox SET attempts = attempts + 1, batch_id = ?1, published_at = ?2
             WHERE seq BETWEEN ?3 AND ?4",
        )?;
        let mut n = 0u64;
        for r in &runs {
            n += stmt.execute(params![
                r.batch_id.as_bytes().as_slice(),
                r.published_at,
                r.first,
                r.last
            ])? as u64;
        }
        drop(stmt);
        for r in runs {
            self.inflight.remove(r.first);
        }
        Ok(n)
    }

    /// Applies a receipt for `batch_id` ([`super::Outbox::settle_batch`]): deletes
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
        let mut d = Delta::default();
        let Some(plan) = self.inflight.settle_plan(batch_id, proposed) else {
            return Ok((Settled::default(), d));
        };
        let mut out = Settled {
            known_batch: true,
            outside: plan.outside,
            ..Default::default()
        };
        if plan.whole_batch() && self.only_rows_in(&plan.runs)? {
            let n = self.conn.prepare_cached("DELETE FROM outbox")?.execute([])? as u64;
            let s = &self.shared;
            let expected = s.unconfirmed.load(Ordering::Acquire) as i64 + so_far.rows;
            if n as i64 != expected {
                tracing::warn!(deleted = n, expected, "outbox counters disagreed with the file");
            }
            d.rows = -(n as i64);
            d.bytes = -(s.bytes.load(Ordering::Acquire) as i64 + so_far.bytes);
            d.unsent = -(s.unsent.load(Ordering::Acquire) as i64 + so_far.unsent);
            for &(f, _) in &plan.runs {
                self.inflight.remove(f);
            }
            out.settled = n;
            return Ok((out, d));
        }
        let mut stmt = self
            .conn
            .prepare_cached("DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2 RETURNING octet_length(body)")?;
        for &(first, last) in &plan.hits {
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
        for &(f, l) in &plan.runs {
            let left = if plan.settles_whole_run((f, l)) {
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
            self.inflight.remove(f);
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
