//! The database write path, shared by the MQTT pipeline and the HTTP endpoint.
//!
//! One call of [`write`] is one transaction (or, after a permanent error, a
//! few smaller ones, see below):
//!
//! 1. `SELECT lock_rollup_days_shared($days)`: the shared advisory locks of the
//!    rollup days touched, so that `calculate_sponsor_daily_stats(day)` never
//!    interleaves with an increment (protocol of migration `20261207000003_daily_rollup.sql`);
//! 2. dead letters (`impressions_rejected`), one `INSERT ... SELECT FROM UNNEST`;
//! 3. the rows: by default an optimistic binary `COPY` straight into the
//!    partitioned table ([`crate::copy`]; the bulk of the work, done
//!    concurrently by the pipelined writers), then the batch's aggregates per
//!    daily-rollup key appended to the queue `sponsor_daily_pending`, which
//!    [`fold_rollups`] (and every reader, before it reads) merges into
//!    `sponsor_daily_stats` and the per-sponsor rollups. If a row already
//!    exists the COPY fails as a whole (unique violation), the transaction is
//!    void, and it is redone with `INSERT ... SELECT FROM UNNEST(...) ON
//!    CONFLICT DO NOTHING RETURNING`, queueing the aggregates of exactly the
//!    rows that were new, in one statement;
//! 4. `sites.last_seen_at`, only for sites not seen in the last few seconds
//!    (a hot `sites` row would otherwise serialise the pipelined writers);
//! 5. `COMMIT`.
//!
//! Invariants:
//! * a row is in `sponsor_impressions` at most once (primary key), and the
//!   rollup counts it once: its aggregate is queued only for rows that were
//!   new (the whole COPY, or what `RETURNING` says), in the same transaction,
//!   so at every commit `sponsor_daily_stats` + `sponsor_daily_pending` equals
//!   the raw rows (migration `20261207000003_daily_rollup`);
//! * no statement of this transaction touches a row that another writer's
//!   transaction also touches (the queue is an append-only heap without
//!   index), so the pipelined writers never wait on each other's row locks
//!   and cannot deadlock;
//! * rows are de-duplicated inside the call first (the same key twice in one
//!   `INSERT ... ON CONFLICT` would fail with "cannot affect row a second time");
//! * nothing is dropped: a row or message the database refuses for good
//!   (a *permanent* error, see `runtime::db::classify`) is isolated by
//!   bisection (per message, then per row) and stored in
//!   `impressions_rejected` with the database's error text, while every other
//!   row commits. A *transient* error is returned to the caller, which retries
//!   the whole call (already committed parts are then absorbed as duplicates).

use std::sync::atomic::{AtomicU32, Ordering};

use chrono::{DateTime, NaiveDate, Utc};
use runtime::db::{classify, ErrorClass};
use schema::Impression;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Where a row or dead letter came from (`impressions_rejected.source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Mqtt,
    Http,
}

impl Source {
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::Http => "http",
        }
    }
}

/// One impression to insert. `origin` groups rows (and dead letters) by the
/// message they came from, so that a permanent error can be isolated per
/// message before per row.
#[derive(Clone, Debug)]
pub struct Row {
    pub imp: Impression,
    pub batch_id: Option<Uuid>,
    pub origin: usize,
}

/// One refused message or impression, for `impressions_rejected`.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub source: Source,
    pub topic: Option<String>,
    pub site_id: Option<String>,
    pub batch_id: Option<Uuid>,
    pub impression_id: Option<Uuid>,
    pub seq: Option<i64>,
    pub reason_code: String,
    pub reason: String,
    pub payload: Vec<u8>,
    pub origin: usize,
}

/// Everything one call writes.
#[derive(Clone, Debug, Default)]
pub struct WriteSet {
    pub rows: Vec<Row>,
    pub dead: Vec<DeadLetter>,
    /// Sites whose `last_seen_at` is refreshed.
    pub sites: Vec<String>,
}

/// What happened to each row of a [`WriteSet`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WriteOutcome {
    /// Per row of the set: `true` if it was new in the database.
    pub new: Vec<bool>,
    /// Rows the database refused for good (index in the set, error text);
    /// they were dead-lettered with reason_code `db_error`.
    pub refused: Vec<(usize, String)>,
    /// Dead letters written (those of the set plus one per refused row).
    pub dead_letters: usize,
    /// Transactions used (1 unless a permanent error was bisected).
    pub transactions: usize,
}

impl WriteOutcome {
    pub fn inserted(&self) -> usize {
        self.new.iter().filter(|n| **n).count()
    }
}

/// How rows are inserted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InsertMethod {
    /// Optimistic `COPY` straight into `sponsor_impressions` (PostgreSQL's
    /// multi-row insert path), rollup computed from the batch itself; if any
    /// row already exists (unique violation, a redelivery) the transaction is
    /// void and redone with [`InsertMethod::Unnest`]. Same guarantees, faster
    /// when duplicates are rare (the steady state). See README for figures.
    #[default]
    Copy,
    /// `INSERT ... SELECT FROM UNNEST(...) ON CONFLICT DO NOTHING RETURNING`,
    /// rollup of exactly the returned rows, in one statement.
    Unnest,
}

impl std::str::FromStr for InsertMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "copy" => Ok(InsertMethod::Copy),
            "unnest" => Ok(InsertMethod::Unnest),
            other => Err(format!("unknown insert method '{other}', expected copy|unnest")),
        }
    }
}

/// After a COPY hit a duplicate, this many following transactions go
/// straight to the ON CONFLICT path (a resending edge sends runs of them).
const SLOW_PATH_STREAK: u32 = 8;
static SLOW_PATH_BATCHES: AtomicU32 = AtomicU32::new(0);

/// Replaces NUL characters, which PostgreSQL text cannot hold (a reason may
/// quote hostile input; it must never make the dead letter itself fail).
pub fn sanitize(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_owned()
    }
}

const INSERT_ROWS: &str = r#"
WITH ins AS (
    INSERT INTO sponsor_impressions
        (impression_id, site_id, seq, video_id, video_filename, played_at, duration_played,
         video_duration, completed, event_type, period, trigger_type, audience_estimate, batch_id)
    SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::timestamptz[],
                         $7::float8[], $8::float8[], $9::bool[], $10::text[], $11::text[], $12::text[],
                         $13::int4[], $14::uuid[])
    ON CONFLICT DO NOTHING
    RETURNING impression_id, site_id, video_id, video_filename, played_at, duration_played, completed,
              event_type, period, audience_estimate
), agg AS (
    SELECT (played_at AT TIME ZONE 'UTC')::date AS day, site_id, coalesce(video_id, '') AS video_id,
           video_filename, period, event_type,
           count(*) AS impressions, sum(duration_played) AS seconds_played,
           count(*) FILTER (WHERE completed) AS completed_count,
           coalesce(sum(audience_estimate), 0) AS audience_sum
    FROM ins
    GROUP BY 1, 2, 3, 4, 5, 6
), up AS (
    INSERT INTO sponsor_daily_pending
        (day, site_id, video_id, video_filename, period, event_type,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT day, site_id, video_id, video_filename, period, event_type,
           impressions, seconds_played, completed_count, audience_sum
    FROM agg
)
SELECT impression_id FROM ins
"#;

const INSERT_DEAD: &str = r#"
INSERT INTO impressions_rejected
    (source, topic, site_id, batch_id, impression_id, seq, reason_code, reason, payload)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::uuid[], $5::uuid[], $6::int8[],
                     $7::text[], $8::text[], $9::bytea[])
"#;

const TOUCH_SITES: &str = r#"
INSERT INTO sites (site_id, last_seen_at)
SELECT s, now() FROM unnest($1::text[]) AS s
WHERE NOT EXISTS (SELECT 1 FROM sites WHERE site_id = s AND last_seen_at > now() - interval '10 seconds')
ORDER BY s
ON CONFLICT (site_id) DO UPDATE SET last_seen_at = greatest(sites.last_seen_at, excluded.last_seen_at)
"#;

/// Writes `set`: rows, dead letters, site heartbeats. Transient errors are
/// returned (retry the whole call); permanent ones are bisected away.
pub async fn write(pool: &PgPool, set: &WriteSet, method: InsertMethod) -> Result<WriteOutcome, sqlx::Error> {
    let all_rows: Vec<usize> = (0..set.rows.len()).collect();
    let all_dead: Vec<usize> = (0..set.dead.len()).collect();
    let mut out = WriteOutcome {
        new: vec![false; set.rows.len()],
        ..Default::default()
    };
    match write_part(pool, method, set, &all_rows, &all_dead, &set.sites, &[], &mut out).await {
        Ok(()) => return Ok(out),
        Err(e) if classify(&e) == ErrorClass::Transient => return Err(e),
        Err(e) => tracing::warn!(error = %e, "permanent database error; isolating the offending messages"),
    }
    // Per message (origin), in order.
    let mut origins: Vec<usize> = set
        .rows
        .iter()
        .map(|r| r.origin)
        .chain(set.dead.iter().map(|d| d.origin))
        .collect();
    origins.sort_unstable();
    origins.dedup();
    for origin in origins {
        let rows: Vec<usize> = all_rows
            .iter()
            .copied()
            .filter(|&i| set.rows[i].origin == origin)
            .collect();
        let dead: Vec<usize> = all_dead
            .iter()
            .copied()
            .filter(|&i| set.dead[i].origin == origin)
            .collect();
        match write_part(pool, method, set, &rows, &dead, &[], &[], &mut out).await {
            Ok(()) => continue,
            Err(e) if classify(&e) == ErrorClass::Transient => return Err(e),
            Err(e) => tracing::warn!(origin, error = %e, "permanent database error in one message; isolating rows"),
        }
        // Per row: the message's dead letters first, then each row alone.
        write_part(pool, method, set, &[], &dead, &[], &[], &mut out).await?;
        for i in rows {
            match write_part(pool, method, set, &[i], &[], &[], &[], &mut out).await {
                Ok(()) => {}
                Err(e) if classify(&e) == ErrorClass::Transient => return Err(e),
                Err(e) => {
                    let reason = format!("db_error: {e}");
                    tracing::warn!(row = i, error = %e, "row refused by the database; dead-lettered");
                    let r = &set.rows[i];
                    let dl = DeadLetter {
                        source: if r.batch_id.is_some() {
                            Source::Mqtt
                        } else {
                            Source::Http
                        },
                        topic: None,
                        site_id: Some(r.imp.site_id.clone()),
                        batch_id: r.batch_id,
                        impression_id: Some(r.imp.impression_id),
                        seq: r.imp.seq,
                        reason_code: "db_error".into(),
                        reason: reason.clone(),
                        payload: serde_json::to_vec(&r.imp).unwrap_or_default(),
                        origin: r.origin,
                    };
                    write_part(pool, method, set, &[], &[], &[], std::slice::from_ref(&dl), &mut out).await?;
                    out.refused.push((i, reason));
                }
            }
        }
    }
    // Site heartbeats last, on their own (they never carry user data).
    if !set.sites.is_empty() {
        write_part(pool, method, set, &[], &[], &set.sites, &[], &mut out).await?;
    }
    Ok(out)
}

/// One transaction over a subset of the set (`extra` are dead letters made
/// during bisection).
#[allow(clippy::too_many_arguments)] // the subset selectors of one bisection step
async fn write_part(
    pool: &PgPool,
    method: InsertMethod,
    set: &WriteSet,
    rows: &[usize],
    dead: &[usize],
    sites: &[String],
    extra: &[DeadLetter],
    out: &mut WriteOutcome,
) -> Result<(), sqlx::Error> {
    let mut method = method;
    if method == InsertMethod::Copy && SLOW_PATH_BATCHES.load(Ordering::Relaxed) > 0 {
        SLOW_PATH_BATCHES.fetch_sub(1, Ordering::Relaxed);
        method = InsertMethod::Unnest;
    }
    let new = loop {
        let t0 = std::time::Instant::now();
        let mut tx = pool.begin().await?;
        let t_begin = t0.elapsed();
        match write_in(&mut tx, method, set, rows, dead, sites, extra).await {
            Ok(new) => {
                let t_write = t0.elapsed();
                tx.commit().await?;
                tracing::debug!(
                    rows = rows.len(),
                    begin_ms = t_begin.as_secs_f64() * 1e3,
                    write_ms = (t_write - t_begin).as_secs_f64() * 1e3,
                    commit_ms = (t0.elapsed() - t_write).as_secs_f64() * 1e3,
                    "batch committed"
                );
                break new;
            }
            Err(sqlx::Error::Database(e)) if method == InsertMethod::Copy && e.code().as_deref() == Some("23505") => {
                // Some rows were already there (a redelivery): this
                // transaction is void; redo it with ON CONFLICT DO NOTHING,
                // and stay on that path for the next few batches.
                drop(tx);
                SLOW_PATH_BATCHES.store(SLOW_PATH_STREAK, Ordering::Relaxed);
                method = InsertMethod::Unnest;
                metrics::counter!("ingestor_copy_fallbacks_total").increment(1);
            }
            Err(e) => return Err(e),
        }
    };
    for i in new {
        out.new[i] = true;
    }
    out.dead_letters += dead.len() + extra.len();
    out.transactions += 1;
    Ok(())
}

/// An impression seen through its primary key `(site_id, played_at,
/// impression_id)`. Hashed on the id alone: a fresh UUID per play makes it
/// as good as the whole key, and hashing 16 bytes instead of the site's text
/// as well is measurably cheaper at tens of thousands of rows per batch.
/// Equality still compares the whole key, the instant at the database's
/// microsecond precision (what the COPY sends), so two plays that share an
/// id but not a site or an instant stay two rows, as in the database, and
/// two that the database would see as one are one here too.
struct PrimaryKey<'a>(&'a Impression);

impl PartialEq for PrimaryKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.impression_id == other.0.impression_id
            && self.0.played_at.timestamp_micros() == other.0.played_at.timestamp_micros()
            && self.0.site_id == other.0.site_id
    }
}

impl Eq for PrimaryKey<'_> {}

impl std::hash::Hash for PrimaryKey<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.impression_id.hash(state);
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_in(
    conn: &mut PgConnection,
    method: InsertMethod,
    set: &WriteSet,
    rows: &[usize],
    dead: &[usize],
    sites: &[String],
    extra: &[DeadLetter],
) -> Result<Vec<usize>, sqlx::Error> {
    // De-duplicate on the primary key; the first occurrence is the one sent
    // (foldhash: the keys are our own decoded rows; with SipHash this set
    // took about 4 % of the bench process's CPU in a profile, 2026-12-07).
    let mut seen: foldhash::HashSet<PrimaryKey<'_>> = foldhash::HashSetExt::with_capacity(rows.len());
    let mut sent: Vec<usize> = Vec::with_capacity(rows.len());
    for &i in rows {
        if seen.insert(PrimaryKey(&set.rows[i].imp)) {
            sent.push(i);
        }
    }
    let mut new_rows = Vec::new();
    if !sent.is_empty() {
        let mut days: Vec<NaiveDate> = sent.iter().map(|&i| set.rows[i].imp.played_at.date_naive()).collect();
        days.sort_unstable();
        days.dedup();
        sqlx::query("SELECT lock_rollup_days_shared($1::date[])")
            .bind(&days)
            .execute(&mut *conn)
            .await?;
    }
    let dls: Vec<&DeadLetter> = dead.iter().map(|&i| &set.dead[i]).chain(extra.iter()).collect();
    if !dls.is_empty() {
        insert_dead(conn, &dls).await?;
    }
    if !sent.is_empty() && method == InsertMethod::Copy {
        let t0 = std::time::Instant::now();
        copy_rows(conn, set, &sent).await?;
        let t_copy = t0.elapsed();
        queue_rollup(conn, set, &sent).await?;
        tracing::debug!(
            rows = sent.len(),
            copy_ms = t_copy.as_secs_f64() * 1e3,
            rollup_ms = (t0.elapsed() - t_copy).as_secs_f64() * 1e3,
            "copy and rollup"
        );
        new_rows = sent;
    } else if !sent.is_empty() {
        let n = sent.len();
        let mut ids = Vec::with_capacity(n);
        let mut site = Vec::with_capacity(n);
        let mut seq = Vec::with_capacity(n);
        let mut video_id = Vec::with_capacity(n);
        let mut file = Vec::with_capacity(n);
        let mut played: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut dur = Vec::with_capacity(n);
        let mut vdur = Vec::with_capacity(n);
        let mut completed = Vec::with_capacity(n);
        let mut event = Vec::with_capacity(n);
        let mut period = Vec::with_capacity(n);
        let mut trigger = Vec::with_capacity(n);
        let mut audience = Vec::with_capacity(n);
        let mut batch = Vec::with_capacity(n);
        for &i in &sent {
            let r = &set.rows[i];
            let imp = &r.imp;
            ids.push(imp.impression_id);
            site.push(imp.site_id.as_str());
            seq.push(imp.seq);
            video_id.push(imp.video_id.as_deref());
            file.push(imp.video_filename.as_str());
            played.push(imp.played_at);
            dur.push(imp.duration_played);
            vdur.push(imp.video_duration);
            completed.push(imp.completed);
            event.push(imp.event_type.as_str());
            period.push(imp.period.as_str());
            trigger.push(imp.trigger_type.as_str());
            audience.push(imp.audience_estimate);
            batch.push(r.batch_id);
        }
        let returned: Vec<Uuid> = sqlx::query_scalar(INSERT_ROWS)
            .bind(&ids)
            .bind(&site)
            .bind(&seq)
            .bind(&video_id)
            .bind(&file)
            .bind(&played)
            .bind(&dur)
            .bind(&vdur)
            .bind(&completed)
            .bind(&event)
            .bind(&period)
            .bind(&trigger)
            .bind(&audience)
            .bind(&batch)
            .fetch_all(&mut *conn)
            .await?;
        if returned.len() == sent.len() {
            new_rows = sent;
        } else if !returned.is_empty() {
            let returned: foldhash::HashSet<Uuid> = returned.into_iter().collect();
            new_rows = sent
                .into_iter()
                .filter(|&i| returned.contains(&set.rows[i].imp.impression_id))
                .collect();
        }
    }
    if !sites.is_empty() {
        let mut s: Vec<&str> = sites.iter().map(String::as_str).collect();
        s.sort_unstable();
        s.dedup();
        sqlx::query(TOUCH_SITES).bind(&s).execute(&mut *conn).await?;
    }
    Ok(new_rows)
}

/// Folds the rollups' queues of deltas (`sponsor_rollups_fold()`: the daily
/// queue of migration `20261207000003_daily_rollup`, then the per-sponsor one of
/// `20261207000004_sponsor_rollups`): outside any ingest transaction, so that the rollups
/// cost each batch only an append, and a second of batches touching the same
/// keys is upserted once. Readers fold before reading, so this only keeps
/// the queues short. Errors are logged; the next tick retries (nothing is
/// lost: the queues are durable).
pub async fn fold_rollups(pool: &PgPool) {
    let t0 = std::time::Instant::now();
    match sqlx::query_scalar::<_, i64>("SELECT sponsor_rollups_fold()")
        .fetch_one(pool)
        .await
    {
        Ok(0) => {}
        Ok(n) => {
            metrics::counter!("ingestor_rollup_folded_total").increment(n as u64);
            metrics::histogram!("ingestor_rollup_fold_seconds").record(t0.elapsed().as_secs_f64());
            tracing::debug!(deltas = n, ms = t0.elapsed().as_secs_f64() * 1e3, "rollups folded");
        }
        Err(e) => tracing::warn!(error = %e, "folding the analytics rollups failed; retried at the next tick"),
    }
}

async fn insert_dead(conn: &mut PgConnection, dls: &[&DeadLetter]) -> Result<(), sqlx::Error> {
    let source: Vec<&str> = dls.iter().map(|d| d.source.as_str()).collect();
    let topic: Vec<Option<String>> = dls.iter().map(|d| d.topic.as_deref().map(sanitize)).collect();
    let site: Vec<Option<String>> = dls.iter().map(|d| d.site_id.as_deref().map(sanitize)).collect();
    let batch: Vec<Option<Uuid>> = dls.iter().map(|d| d.batch_id).collect();
    let imp: Vec<Option<Uuid>> = dls.iter().map(|d| d.impression_id).collect();
    let seq: Vec<Option<i64>> = dls.iter().map(|d| d.seq).collect();
    let code: Vec<String> = dls.iter().map(|d| sanitize(&d.reason_code)).collect();
    let reason: Vec<String> = dls.iter().map(|d| sanitize(&d.reason)).collect();
    let payload: Vec<&[u8]> = dls.iter().map(|d| d.payload.as_slice()).collect();
    sqlx::query(INSERT_DEAD)
        .bind(&source)
        .bind(&topic)
        .bind(&site)
        .bind(&batch)
        .bind(&imp)
        .bind(&seq)
        .bind(&code)
        .bind(&reason)
        .bind(&payload)
        .execute(conn)
        .await?;
    Ok(())
}

/// Opens `connections` connections and runs the write path's statements
/// once on each, in a transaction that is rolled back, so that the first
/// batches after a start do not pay for it.
///
/// Why: a new PostgreSQL backend loads its catalog caches (the partitioned
/// table, the partitions a row is routed to, their indexes, the rollup
/// queue) and plans each statement the first time it runs, and the pool
/// opens a connection only when one is first wanted. Measured with
/// `neopro-sim bench` on 2026-12-07: the first batch of a burst took 330 ms
/// to write 200 rows (COPY 153 ms, rollup queue 104 ms) and the next two
/// writers waited 140-160 ms for their connections, about a tenth of the
/// burst's 2.5 s; after a restart with a backlog, that is the same stall at
/// the worst time. Nothing is written: the COPY sends no row, the queue
/// COPY sends none either, the partitions of recent plays are read
/// through each index with a key that matches nothing.
pub async fn warm_up(pool: &PgPool, connections: usize) -> Result<(), sqlx::Error> {
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(pool.acquire().await?);
    }
    futures::future::try_join_all(conns.iter_mut().map(|c| warm_one(c))).await?;
    Ok(())
}

async fn warm_one(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT lock_rollup_days_shared($1::date[])")
        .bind(Vec::<NaiveDate>::new())
        .execute(&mut *tx)
        .await?;
    let mut copy = tx.copy_in_raw(&crate::copy::copy_statement()).await?;
    copy.send(crate::copy::CopyBuffer::with_rows(0).finish()).await?;
    copy.finish().await?;
    queue_rollup(&mut tx, &WriteSet::default(), &[]).await?;
    for probe in [
        "SELECT count(*) FROM sponsor_impressions \
         WHERE site_id = '' AND played_at >= now() - interval '45 days' AND played_at < now() + interval '1 day'",
        "SELECT count(*) FROM sponsor_impressions \
         WHERE video_filename = '' AND played_at >= now() - interval '45 days' AND played_at < now() + interval '1 day'",
    ] {
        sqlx::query(probe).execute(&mut *tx).await?;
    }
    tx.rollback().await
}

/// Creates the monthly partitions of the current month and the next
/// `months - 1` (idempotent; run at start and daily).
pub async fn create_partitions_ahead(pool: &PgPool, months: i32) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT create_impression_partitions(date_trunc('month', now())::date, $1)")
        .bind(months)
        .fetch_one(pool)
        .await
}

async fn copy_rows(conn: &mut PgConnection, set: &WriteSet, rows: &[usize]) -> Result<(), sqlx::Error> {
    let mut buf = crate::copy::CopyBuffer::with_rows(rows.len());
    for &i in rows {
        buf.push(&set.rows[i].imp, set.rows[i].batch_id);
    }
    let mut copy = conn.copy_in_raw(&crate::copy::copy_statement()).await?;
    copy.send(buf.finish()).await?;
    copy.finish().await?;
    Ok(())
}

/// Days from 1970-01-01 to the UTC date of `t` (negative before it).
fn utc_day_number(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(86_400)
}

/// The UTC calendar date of a day number counted from 1970-01-01.
fn unix_day(day: i64) -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1)
        .and_then(|epoch| epoch.checked_add_signed(chrono::Duration::days(day)))
        .unwrap_or(NaiveDate::MAX)
}

/// Queues the aggregates of `rows` (all known to be new) for the daily
/// rollup: one row per key appended to `sponsor_daily_pending`, which
/// `sponsor_rollups_fold()` merges into `sponsor_daily_stats` (migration
/// `20261207000003_daily_rollup`). An append to a heap without index: no hot row, so
/// concurrent writers never wait on each other here.
async fn queue_rollup(conn: &mut PgConnection, set: &WriteSet, rows: &[usize]) -> Result<(), sqlx::Error> {
    #[derive(Default)]
    struct Agg {
        n: i64,
        secs: f64,
        completed: i64,
        audience: i64,
    }
    // Key: (UTC day, site_id, video_filename, video_id, period, event_type).
    // Aggregated in a hash map (a B-tree spent a tenth of the ingest CPU in
    // string comparisons, one search per row). The day is kept as a day
    // number and the enums as enums until the key is written: chrono's
    // calendar date and the enums' text cost a conversion and longer hashes
    // per row. Sized for one key per four rows, so that a batch of tens of
    // thousands of rows does not rehash its keys as the map grows (the map
    // was a third of the writers' CPU in the bench's profile, 2026-12-07).
    type Key<'a> = (i64, &'a str, &'a str, &'a str, schema::Period, schema::EventType);
    let mut index: foldhash::HashMap<Key<'_>, usize> = foldhash::HashMapExt::with_capacity(rows.len() / 4 + 16);
    let mut m: Vec<(Key<'_>, Agg)> = Vec::new();
    for &i in rows {
        let imp = &set.rows[i].imp;
        let key = (
            utc_day_number(imp.played_at),
            imp.site_id.as_str(),
            imp.video_filename.as_str(),
            imp.video_id.as_deref().unwrap_or(""),
            imp.period,
            imp.event_type,
        );
        let slot = *index.entry(key).or_insert_with(|| {
            m.push((key, Agg::default()));
            m.len() - 1
        });
        let a = &mut m[slot].1;
        a.n += 1;
        a.secs += imp.duration_played;
        a.completed += i64::from(imp.completed);
        a.audience += i64::from(imp.audience_estimate.unwrap_or(0));
    }
    drop(index);
    // A binary COPY rather than `INSERT ... SELECT FROM UNNEST`: the server
    // inserts the rows in batches (one WAL record per page, not per row)
    // and parses no arrays. A batch queues one row per five or six of its
    // impressions, so this was a tenth of the writers' database time.
    let mut buf = crate::copy::CopyBuffer::with_rows(m.len());
    for ((day, site_id, video_filename, video_id, period, event_type), a) in &m {
        buf.push_daily(&crate::copy::DailyDelta {
            day: unix_day(*day),
            site_id,
            video_filename,
            video_id,
            period: period.as_str(),
            event_type: event_type.as_str(),
            impressions: a.n,
            seconds_played: a.secs,
            completed_count: a.completed,
            audience_sum: a.audience,
        });
    }
    let mut copy = conn.copy_in_raw(&crate::copy::daily_pending_statement()).await?;
    copy.send(buf.finish()).await?;
    copy.finish().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_day_number_names_the_utc_date_of_the_instant() {
        for (y, m, d, h, min, s, us) in [
            (2026, 12, 7, 0, 0, 0, 0),
            (2026, 12, 6, 23, 59, 59, 999_999),
            (2024, 2, 29, 12, 0, 0, 0),
            (1970, 1, 1, 0, 0, 0, 0),
            (1969, 12, 31, 23, 59, 59, 999_999),
            (1960, 3, 1, 0, 0, 0, 1),
        ] {
            let t = Utc.with_ymd_and_hms(y, m, d, h, min, s).unwrap() + chrono::Duration::microseconds(us);
            assert_eq!(unix_day(utc_day_number(t)), t.date_naive(), "{t}");
        }
    }

    fn play(site: &str, at: DateTime<Utc>, id: Uuid) -> Impression {
        Impression {
            impression_id: id,
            site_id: site.to_owned(),
            seq: None,
            video_id: None,
            video_filename: "sponsor_a_30s.mp4".to_owned(),
            played_at: at,
            duration_played: 30.0,
            video_duration: 30.0,
            completed: true,
            event_type: schema::EventType::Match,
            period: schema::Period::Halftime,
            trigger_type: schema::TriggerType::Auto,
            audience_estimate: None,
        }
    }

    #[test]
    fn the_primary_key_is_the_whole_key_though_only_the_id_is_hashed() {
        let t = Utc.with_ymd_and_hms(2026, 12, 7, 15, 0, 0).unwrap();
        let id = Uuid::now_v7();
        let a = play("club-1", t, id);
        let same = play("club-1", t, id);
        let other_site = play("club-2", t, id);
        let other_time = play("club-1", t + chrono::Duration::microseconds(1), id);
        let other_id = play("club-1", t, Uuid::now_v7());
        let mut seen: foldhash::HashSet<PrimaryKey<'_>> = foldhash::HashSetExt::with_capacity(4);
        assert!(seen.insert(PrimaryKey(&a)));
        assert!(!seen.insert(PrimaryKey(&same)), "the same key twice is one row");
        assert!(seen.insert(PrimaryKey(&other_site)), "another site is another row");
        assert!(seen.insert(PrimaryKey(&other_time)), "another instant is another row");
        assert!(seen.insert(PrimaryKey(&other_id)), "another id is another row");
        assert_eq!(seen.len(), 4);
    }
}
