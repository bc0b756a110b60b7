-- Per-sponsor rollups folded from a queue of deltas, off the ingest path.
--
-- Why: the statement triggers of 20261201000020 folded every statement's
-- delta into six per-sponsor rollups inside the writer's transaction. On the
-- ingestor's path that tripled the cost of each batch's rollup upsert
-- (measured with psql on this machine, 9,600 attributed keys per statement:
-- 200 ms with those triggers, 68 ms with the queue below, 53 ms with no
-- trigger), and it ran inside the ingestor's serialised rollup section. A
-- batch touches the same sponsor-day-site keys as the batches before it, so
-- folding many batches' deltas at once merges them before the upserts: the
-- same work, done once instead of once per batch.
--
-- How:
--   * the triggers on sponsor_daily_stats now only append the statement's
--     signed delta (new rows +, old rows -) to sponsor_rollup_pending, in the
--     writer's transaction (append-only heap, no index: no conflict, no hot
--     row, nothing to lock);
--   * sponsor_rollups_fold() moves the pending deltas of mapped videos into
--     the six rollups in one statement (DELETE ... RETURNING feeding the same
--     grouped upserts as before), under an advisory lock so folds never
--     interleave; videos never seen are first added to video_attribution;
--   * readers call sponsor_rollups_fold() before reading (neopro-analytics
--     does, per request); the ingestor also folds in the background about
--     once a second so the queue stays short.
--
-- Invariant (replaces the one of 20261201000020): at every commit, for each
-- rollup, rollup + the pending deltas of attributed videos folded through
-- video_attribution = the aggregate of sponsor_daily_stats joined with
-- video_attribution. So a reader that folds and then reads (a new snapshot,
-- READ COMMITTED) sees every write committed before its fold began.
--   * a fold sees only committed pending rows; rows committed after its
--     DELETE's snapshot stay for the next fold; rows of videos not yet in the
--     map stay too (never deleted without being folded);
--   * catalogue changes: a BEFORE statement trigger on videos takes the SHARE
--     ROW EXCLUSIVE lock on sponsor_daily_stats (waits for in-flight writers,
--     holds new ones back), then folds, so the queue is empty when the AFTER
--     trigger of 20261201000020 moves aggregates between sponsors;
--   * sponsor_rollups_rebuild() and TRUNCATE also clear the queue.

CREATE TABLE sponsor_rollup_pending (
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
ALTER TABLE sponsor_rollup_pending SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);

CREATE OR REPLACE FUNCTION sponsor_rollups_on_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sponsor_rollup_pending
    SELECT day, site_id, video_filename, video_id, period, event_type,
           impressions, seconds_played, completed_count, audience_sum
    FROM new_rows;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION sponsor_rollups_on_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sponsor_rollup_pending
    SELECT day, site_id, video_filename, video_id, period, event_type,
           impressions, seconds_played, completed_count, audience_sum
    FROM new_rows
    UNION ALL
    SELECT day, site_id, video_filename, video_id, period, event_type,
           -impressions, -seconds_played, -completed_count, -audience_sum
    FROM old_rows;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION sponsor_rollups_on_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sponsor_rollup_pending
    SELECT day, site_id, video_filename, video_id, period, event_type,
           -impressions, -seconds_played, -completed_count, -audience_sum
    FROM old_rows;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION sponsor_rollups_on_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE sponsor_rollup_pending, video_attribution, sponsor_stats_daily, sponsor_video_daily,
             sponsor_site_monthly, sponsor_site_weekly, sponsor_site_daily, sponsor_site_daily_detail;
    RETURN NULL;
END
$$;

-- Advisory-lock key of folds ('nepq'; 'nepo' = rollup days, 'nepp' = the
-- ingestor's rollup section).
CREATE FUNCTION sponsor_rollups_fold_lock() RETURNS void
LANGUAGE sql AS $$ SELECT pg_advisory_xact_lock(1852143729, 0) $$;

-- Folds the pending deltas; returns how many pending rows it consumed.
-- Cheap when there is nothing to fold (no lock taken).
CREATE FUNCTION sponsor_rollups_fold() RETURNS bigint
LANGUAGE plpgsql AS $fold$
DECLARE
    consumed bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM sponsor_rollup_pending) THEN
        RETURN 0;
    END IF;
    PERFORM sponsor_rollups_fold_lock();
    -- A long backlog can leave many deltas: group them in memory (this
    -- transaction only).
    PERFORM set_config('work_mem', '64MB', true);
    INSERT INTO video_attribution (video_filename, video_id, sponsor_id)
    SELECT v.video_filename, v.video_id, sponsor_of(nullif(v.video_id, ''), v.video_filename)
    FROM (SELECT DISTINCT video_filename, video_id FROM sponsor_rollup_pending) v
    WHERE NOT EXISTS (SELECT 1 FROM video_attribution a
                      WHERE a.video_filename = v.video_filename AND a.video_id = v.video_id)
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING;

    WITH taken AS MATERIALIZED (
        DELETE FROM sponsor_rollup_pending p
        USING video_attribution a
        WHERE a.video_filename = p.video_filename AND a.video_id = p.video_id
        RETURNING a.sponsor_id, p.day, p.site_id, p.video_filename, p.video_id, p.period, p.event_type,
                  p.impressions, p.seconds_played, p.completed_count, p.audience_sum
    ),
    counted AS (SELECT count(*) AS n FROM taken),
    d AS MATERIALIZED (SELECT * FROM taken WHERE sponsor_id IS NOT NULL),
    u_stats AS (
        INSERT INTO sponsor_stats_daily AS t
            (sponsor_id, day, period, event_type, impressions, seconds_played, completed_count, audience_sum)
        SELECT sponsor_id, day, period, event_type,
               sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
        FROM d GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (sponsor_id, day, period, event_type) DO UPDATE SET
            impressions = t.impressions + excluded.impressions, seconds_played = t.seconds_played + excluded.seconds_played,
            completed_count = t.completed_count + excluded.completed_count, audience_sum = t.audience_sum + excluded.audience_sum),
    u_video AS (
        INSERT INTO sponsor_video_daily AS t
            (sponsor_id, day, video_filename, video_id, period, event_type,
             impressions, seconds_played, completed_count, audience_sum)
        SELECT sponsor_id, day, video_filename, video_id, period, event_type,
               sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
        FROM d GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
        ON CONFLICT (sponsor_id, day, video_filename, video_id, period, event_type) DO UPDATE SET
            impressions = t.impressions + excluded.impressions, seconds_played = t.seconds_played + excluded.seconds_played,
            completed_count = t.completed_count + excluded.completed_count, audience_sum = t.audience_sum + excluded.audience_sum),
    u_month AS (
        INSERT INTO sponsor_site_monthly AS t
            (sponsor_id, month, site_id, impressions, seconds_played, completed_count, audience_sum)
        SELECT sponsor_id, date_trunc('month', day::timestamp)::date, site_id,
               sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
        FROM d GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (sponsor_id, month, site_id) DO UPDATE SET
            impressions = t.impressions + excluded.impressions, seconds_played = t.seconds_played + excluded.seconds_played,
            completed_count = t.completed_count + excluded.completed_count, audience_sum = t.audience_sum + excluded.audience_sum),
    u_week AS (
        INSERT INTO sponsor_site_weekly AS t
            (sponsor_id, week, site_id, impressions, seconds_played, completed_count, audience_sum)
        SELECT sponsor_id, date_trunc('week', day::timestamp)::date, site_id,
               sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
        FROM d GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (sponsor_id, week, site_id) DO UPDATE SET
            impressions = t.impressions + excluded.impressions, seconds_played = t.seconds_played + excluded.seconds_played,
            completed_count = t.completed_count + excluded.completed_count, audience_sum = t.audience_sum + excluded.audience_sum),
    u_day AS (
        INSERT INTO sponsor_site_daily AS t
            (sponsor_id, day, site_id, impressions, seconds_played, completed_count, audience_sum)
        SELECT sponsor_id, day, site_id,
               sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
        FROM d GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (sponsor_id, day, site_id) DO UPDATE SET
            impressions = t.impressions + excluded.impressions, seconds_played = t.seconds_played + excluded.seconds_played,
            completed_count = t.completed_count + excluded.completed_count, audience_sum = t.audience_sum + excluded.audience_sum),
    u_detail AS (
        INSERT INTO sponsor_site_daily_detail AS t
            (sponsor_id, period, event_type, day, site_id, impressions, seconds_played, completed_count, audience_sum)
        SELECT sponsor_id, period, event_type, day, site_id,
               sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
        FROM d GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT (sponsor_id, period, event_type, day, site_id) DO UPDATE SET
            impressions = t.impressions + excluded.impressions, seconds_played = t.seconds_played + excluded.seconds_played,
            completed_count = t.completed_count + excluded.completed_count, audience_sum = t.audience_sum + excluded.audience_sum)
    SELECT counted.n INTO consumed FROM counted;
    RETURN consumed;
END
$fold$;

-- Before a catalogue change: hold writers back and empty the queue, so the
-- AFTER trigger's move works on complete rollups.
CREATE FUNCTION sponsor_rollups_before_catalogue() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE sponsor_daily_stats IN SHARE ROW EXCLUSIVE MODE;
    PERFORM sponsor_rollups_fold_lock();
    PERFORM sponsor_rollups_fold();
    RETURN NULL;
END
$$;
CREATE TRIGGER sponsor_rollups_catalogue_before BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON videos
    FOR EACH STATEMENT EXECUTE FUNCTION sponsor_rollups_before_catalogue();

-- Full rebuild: the previous one (recomputes the map and the rollups from
-- sponsor_daily_stats), with the queue emptied under the same locks.
ALTER FUNCTION sponsor_rollups_rebuild() RENAME TO sponsor_rollups_recompute;
CREATE FUNCTION sponsor_rollups_rebuild() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE sponsor_daily_stats IN SHARE ROW EXCLUSIVE MODE;
    PERFORM sponsor_rollups_fold_lock();
    DELETE FROM sponsor_rollup_pending;
    PERFORM sponsor_rollups_recompute();
END
$$;
