-- The daily rollup is folded from a queue too, off the ingest path.
--
-- Why: every ingest transaction upserted its batch's aggregates into
-- sponsor_daily_stats (one B-tree descent of the six-column text key and one
-- HOT update per key, plus the statement triggers appending the change to
-- sponsor_rollup_pending). A batch holds a few rows per key, so that was
-- close to one upsert per row, and the ingestor's batches of the same second
-- touch the same keys again and again. Measured with `neopro-sim bench` on
-- this machine (2026-12-06): the chain without that upsert spent 7.2-9.1
-- PostgreSQL core-us per row instead of 12.0-12.2. Appending the same
-- aggregates to a heap without index costs a fraction of the upsert, and a
-- fold about once a second merges all the batches of that second before
-- upserting, so each key is upserted once per fold instead of once per batch.
--
-- How:
--   * the ingestor appends each transaction's aggregates of the rows that
--     were new to sponsor_daily_pending (same columns as the rollup key and
--     sums; append-only heap, no index, no conflict, no hot row);
--   * sponsor_daily_fold() moves the committed pending rows into
--     sponsor_daily_stats in one statement (DELETE ... RETURNING feeding a
--     grouped upsert in key order), under the same advisory lock as
--     sponsor_rollups_fold(); the upsert fires the triggers of
--     20261201000030, which queue the per-sponsor deltas;
--   * sponsor_rollups_fold() (the name every reader and the ingestor already
--     call) now folds the daily queue first, then the per-sponsor one, so one
--     call makes every rollup exact;
--   * sponsor_analytics_summary reads sponsor_daily_stats and the queue
--     together, so the seed's view is exact without a fold.
--
-- Invariant (replaces "sponsor_daily_stats is exact at every commit" of
-- 20261124000002): at every commit, sponsor_daily_stats + the rows of
-- sponsor_daily_pending, summed per key, = the aggregate of
-- sponsor_impressions per key. A reader that calls sponsor_rollups_fold()
-- and then reads (a new snapshot, READ COMMITTED) sees every write committed
-- before its fold began, exactly as with the per-sponsor queue:
--   * a fold sees only committed pending rows; rows committed after its
--     DELETE's snapshot stay for the next fold;
--   * calculate_sponsor_daily_stats(day) takes the day's exclusive lock
--     (waits for the writers of that day, which hold the shared one until
--     they commit) and then the fold lock, and drops that day's pending rows
--     before recomputing it from the raw rows, which already hold them;
--   * lock order: the fold lock is always taken before any lock on
--     sponsor_daily_stats (a fold writes sponsor_daily_stats now), so the
--     catalogue trigger and sponsor_rollups_rebuild() take it first too;
--   * TRUNCATE of sponsor_daily_stats also empties the queue.

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
);
-- Short-lived rows: vacuum it eagerly.
ALTER TABLE sponsor_daily_pending SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);

-- Folds the daily queue into sponsor_daily_stats; returns how many pending
-- rows it consumed. Cheap when there is nothing to fold (no lock taken).
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

-- The per-sponsor fold keeps its body under a new name; the public name folds
-- both queues, daily first (its upsert queues per-sponsor deltas).
ALTER FUNCTION sponsor_rollups_fold() RENAME TO sponsor_rollups_fold_sponsors;
CREATE FUNCTION sponsor_rollups_fold() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    daily bigint;
    sponsors bigint;
BEGIN
    daily := sponsor_daily_fold();
    sponsors := sponsor_rollups_fold_sponsors();
    RETURN daily + sponsors;
END
$$;

-- Recompute of one day: the day's writers first (exclusive day lock), then
-- no fold in between (fold lock), then the day's queued rows go: the raw rows
-- the recompute reads already hold them.
CREATE OR REPLACE FUNCTION calculate_sponsor_daily_stats(p_day date) RETURNS integer
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

-- Fold lock before the table lock (a fold now writes sponsor_daily_stats:
-- the other order could deadlock with a reader's fold).
CREATE OR REPLACE FUNCTION sponsor_rollups_before_catalogue() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sponsor_rollups_fold_lock();
    LOCK TABLE sponsor_daily_stats IN SHARE ROW EXCLUSIVE MODE;
    PERFORM sponsor_rollups_fold();
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION sponsor_rollups_rebuild() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sponsor_rollups_fold_lock();
    LOCK TABLE sponsor_daily_stats IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM sponsor_rollup_pending;
    PERFORM sponsor_rollups_recompute();
END
$$;

CREATE OR REPLACE FUNCTION sponsor_rollups_on_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE sponsor_daily_pending, sponsor_rollup_pending, video_attribution, sponsor_stats_daily,
             sponsor_video_daily, sponsor_site_monthly, sponsor_site_weekly, sponsor_site_daily,
             sponsor_site_daily_detail;
    RETURN NULL;
END
$$;

-- The seed's per-sponsor view, exact without a fold: the rollup and its
-- queue read together (queued rows are positive deltas of whole keys).
CREATE OR REPLACE VIEW sponsor_analytics_summary AS
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
