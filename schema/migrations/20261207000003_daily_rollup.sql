-- The daily rollup of plays (the billing history), its queue, the locks that
-- keep it exact, its repair, and the seed's summary view.
--
-- sponsor_daily_stats aggregates sponsor_impressions per UTC day, site,
-- video, period and event type. The ingestor does not upsert into it: each
-- ingest transaction appends the aggregates of exactly the rows that were new
-- (INSERT ... ON CONFLICT DO NOTHING ... RETURNING) to sponsor_daily_pending,
-- an append-only heap without index (no conflict, no hot row, nothing another
-- writer waits on). sponsor_daily_fold() moves the committed queue into the
-- rollup in one statement, merging every batch since the last fold, so each
-- key is upserted once per fold instead of once per batch; the public
-- sponsor_rollups_fold() (next migration) calls it, the ingestor about once a
-- second, readers before they read. A late play (a box back after a week
-- offline) updates its own past day; a replay adds nothing.
--
-- Invariant: at every commit, sponsor_daily_stats + the rows of
-- sponsor_daily_pending, summed per key, = the aggregate of
-- sponsor_impressions per key. A reader that calls sponsor_rollups_fold() and
-- then reads (a new snapshot, READ COMMITTED) sees every write committed
-- before its fold began:
--   * a fold sees only committed pending rows; rows committed after its
--     DELETE's snapshot stay for the next fold;
--   * writers take lock_rollup_days_shared(days) (shared advisory locks, which
--     do not block each other); calculate_sponsor_daily_stats(day) takes the
--     day's exclusive one (waits for that day's writers, which hold the shared
--     one until they commit), then the fold lock, and drops that day's pending
--     rows before recomputing it from the raw rows, which already hold them;
--   * lock order: the fold lock is always taken before any lock on
--     sponsor_daily_stats (a fold writes it), by the catalogue trigger and
--     sponsor_rollups_rebuild() too;
--   * TRUNCATE of sponsor_daily_stats also empties the queue (its trigger is
--     with the per-sponsor rollups').
--
-- fillfactor 70: every fold increments existing rows and no updated column is
-- indexed, so with free space on the page PostgreSQL updates in place (HOT: no
-- new index entry, dead versions pruned on the page).

CREATE TABLE sponsor_daily_stats (
    day              date NOT NULL,
    site_id          text NOT NULL,
    video_id         text NOT NULL DEFAULT '',   -- '' when the play had none
    video_filename   text NOT NULL,
    period           text NOT NULL,
    event_type       text NOT NULL,
    impressions      bigint NOT NULL DEFAULT 0,
    seconds_played   double precision NOT NULL DEFAULT 0,
    completed_count  bigint NOT NULL DEFAULT 0,
    audience_sum     bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, site_id, video_filename, video_id, period, event_type)
) WITH (fillfactor = 70);
CREATE INDEX sponsor_daily_stats_video_idx ON sponsor_daily_stats (video_filename, day);
CREATE INDEX sponsor_daily_stats_site_idx ON sponsor_daily_stats (site_id, day);

-- The ingestor's deltas: the rollup's key and sums, positive, not yet folded.
-- Short-lived rows: vacuum it eagerly.
CREATE TABLE sponsor_daily_pending (
    day              date NOT NULL,
    site_id          text NOT NULL,
    video_filename   text NOT NULL,
    video_id         text NOT NULL,
    period           text NOT NULL,
    event_type       text NOT NULL,
    impressions      bigint NOT NULL,
    seconds_played   double precision NOT NULL,
    completed_count  bigint NOT NULL,
    audience_sum     bigint NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);

-- Advisory-lock key space for rollup days (class id 'nepo' in ASCII).
CREATE FUNCTION rollup_day_key(d date) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT (d - date '2000-01-01')::integer $$;

-- Shared locks on the given days, in sorted order (no deadlocks between
-- writers and a recompute). Transaction-scoped.
CREATE FUNCTION lock_rollup_days_shared(days date[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    d date;
BEGIN
    FOR d IN SELECT DISTINCT x FROM unnest(days) AS x ORDER BY x LOOP
        PERFORM pg_advisory_xact_lock_shared(1852143727, rollup_day_key(d));
    END LOOP;
END
$$;

-- Advisory-lock key of folds ('nepq'; 'nepo' is the rollup days'): folds of
-- either queue never interleave.
CREATE FUNCTION sponsor_rollups_fold_lock() RETURNS void
LANGUAGE sql AS $$ SELECT pg_advisory_xact_lock(1852143729, 0) $$;

-- Folds the daily queue into sponsor_daily_stats (DELETE ... RETURNING feeding
-- one grouped upsert in key order); returns how many pending rows it
-- consumed. Cheap when there is nothing to fold (no lock taken). Its upsert
-- fires the triggers that queue the per-sponsor deltas.
CREATE FUNCTION sponsor_daily_fold() RETURNS bigint
LANGUAGE plpgsql AS $fold$
DECLARE
    consumed bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM sponsor_daily_pending) THEN
        RETURN 0;
    END IF;
    PERFORM sponsor_rollups_fold_lock();
    PERFORM set_config('work_mem', '64MB', true);
    WITH taken AS MATERIALIZED (
        DELETE FROM sponsor_daily_pending
        RETURNING day, site_id, video_filename, video_id, period, event_type,
                  impressions, seconds_played, completed_count, audience_sum
    ),
    counted AS (SELECT count(*) AS n FROM taken),
    up AS (
        INSERT INTO sponsor_daily_stats AS t
            (day, site_id, video_filename, video_id, period, event_type,
             impressions, seconds_played, completed_count, audience_sum)
        SELECT day, site_id, video_filename, video_id, period, event_type,
               sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
        FROM taken
        GROUP BY day, site_id, video_filename, video_id, period, event_type
        ORDER BY day, site_id, video_filename, video_id, period, event_type
        ON CONFLICT (day, site_id, video_filename, video_id, period, event_type) DO UPDATE SET
            impressions     = t.impressions + excluded.impressions,
            seconds_played  = t.seconds_played + excluded.seconds_played,
            completed_count = t.completed_count + excluded.completed_count,
            audience_sum    = t.audience_sum + excluded.audience_sum,
            updated_at      = now()
    )
    SELECT counted.n INTO consumed FROM counted;
    RETURN consumed;
END
$fold$;

-- Recomputes one UTC day of the rollup from the raw rows (repair, audit, or
-- after a manual correction of raw rows). Returns the number of rollup rows.
-- The day's writers first (exclusive day lock), then no fold in between (fold
-- lock), then the day's queued rows go: the raw rows the recompute reads
-- already hold them.
CREATE FUNCTION calculate_sponsor_daily_stats(p_day date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    PERFORM pg_advisory_xact_lock(1852143727, rollup_day_key(p_day));
    PERFORM sponsor_rollups_fold_lock();
    DELETE FROM sponsor_daily_pending WHERE day = p_day;
    DELETE FROM sponsor_daily_stats WHERE day = p_day;
    INSERT INTO sponsor_daily_stats
        (day, site_id, video_id, video_filename, period, event_type,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT p_day, site_id, coalesce(video_id, ''), video_filename, period, event_type,
           count(*), sum(duration_played), count(*) FILTER (WHERE completed),
           coalesce(sum(audience_estimate), 0)
    FROM sponsor_impressions
    WHERE played_at >= (p_day::timestamp AT TIME ZONE 'UTC')
      AND played_at <  ((p_day + 1)::timestamp AT TIME ZONE 'UTC')
    GROUP BY site_id, coalesce(video_id, ''), video_filename, period, event_type;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Per-sponsor totals over all time, attributed with the current catalogue
-- (the seed's dashboard headline figures), exact without a fold: the rollup
-- and its queue read together (queued rows are positive deltas of whole keys).
CREATE VIEW sponsor_analytics_summary AS
WITH daily AS (
    SELECT day, site_id, video_id, video_filename, impressions, seconds_played, completed_count, audience_sum
    FROM sponsor_daily_stats
    UNION ALL
    SELECT day, site_id, video_id, video_filename, impressions, seconds_played, completed_count, audience_sum
    FROM sponsor_daily_pending
), videos_seen AS (
    SELECT DISTINCT video_id, video_filename FROM daily
), attribution AS (
    SELECT video_id, video_filename, sponsor_of(nullif(video_id, ''), video_filename) AS sponsor_id
    FROM videos_seen
)
SELECT sp.id                                    AS sponsor_id,
       sp.name                                  AS sponsor_name,
       coalesce(sum(s.impressions), 0)::bigint  AS total_impressions,
       coalesce(sum(s.seconds_played), 0)       AS screen_time_seconds,
       coalesce(sum(s.completed_count), 0)::bigint AS completed,
       CASE WHEN coalesce(sum(s.impressions), 0) = 0 THEN 0
            ELSE sum(s.completed_count)::double precision / sum(s.impressions) END AS completion_rate,
       count(DISTINCT s.site_id)                AS sites_reached,
       coalesce(sum(s.audience_sum), 0)::bigint AS audience_reached,
       min(s.day)                               AS first_day,
       max(s.day)                               AS last_day
FROM sponsors sp
LEFT JOIN attribution a ON a.sponsor_id = sp.id
LEFT JOIN daily s ON s.video_id = a.video_id AND s.video_filename = a.video_filename
GROUP BY sp.id, sp.name;
