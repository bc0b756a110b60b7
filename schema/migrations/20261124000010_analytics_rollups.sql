-- Analytics rollups: coarser aggregates of sponsor_daily_stats that make the
-- sponsor stats API answer from a few thousand rows instead of millions.
--
-- sponsor_daily_stats has about 20 rows per site-day (one per video, period
-- and event type), i.e. millions of rows a year for 1,000 sites. A sponsor's
-- stats need, over a date range:
--   * totals, by period, by event type, the daily series and top videos:
--     no site dimension   -> analytics_video_daily
--       (day, video_id, video_filename, period, event_type)
--   * by site and sites reached: no period/event dimension, and whole months
--     are enough for the inner part of a range (the partial months at the
--     edges are read from sponsor_daily_stats)
--                         -> analytics_site_video_monthly
--       (month, site_id, video_id, video_filename)
--   * the distinct videos ever played, to attribute them with sponsor_of()
--     at read time (the current catalogue, so a changed rule re-attributes
--     the past)          -> analytics_videos (video_id, video_filename)
--
-- Invariant: at every commit each table equals the aggregate of
-- sponsor_daily_stats (which itself equals the aggregate of the raw plays).
-- It is kept by statement-level triggers with transition tables on
-- sponsor_daily_stats: whatever the writer does (the ingestor's
-- INSERT ... ON CONFLICT DO UPDATE increments, a late play updating a past
-- day, calculate_sponsor_daily_stats() deleting and re-inserting a day, a
-- TRUNCATE), the delta new - old is folded into the rollups in the same
-- transaction. The triggers are set-based (one grouped upsert per rollup per
-- statement), and upsert rows in primary-key order so that concurrent
-- writers take row locks in the same order.

CREATE TABLE analytics_video_daily (
    video_filename   text NOT NULL,
    video_id         text NOT NULL,
    day              date NOT NULL,
    period           text NOT NULL,
    event_type       text NOT NULL,
    impressions      bigint NOT NULL,
    seconds_played   double precision NOT NULL,
    completed_count  bigint NOT NULL,
    audience_sum     bigint NOT NULL,
    PRIMARY KEY (video_filename, video_id, day, period, event_type)
);

CREATE TABLE analytics_site_video_monthly (
    video_filename   text NOT NULL,
    video_id         text NOT NULL,
    month            date NOT NULL,   -- first day of the UTC month
    site_id          text NOT NULL,
    impressions      bigint NOT NULL,
    seconds_played   double precision NOT NULL,
    completed_count  bigint NOT NULL,
    audience_sum     bigint NOT NULL,
    PRIMARY KEY (video_filename, video_id, month, site_id)
);

CREATE TABLE analytics_videos (
    video_filename  text NOT NULL,
    video_id        text NOT NULL,
    PRIMARY KEY (video_filename, video_id)
);

-- INSERT (new keys, and the rows calculate_sponsor_daily_stats() re-adds).
-- One function per event: PostgreSQL allows transition tables only on
-- single-event triggers.
CREATE FUNCTION analytics_rollup_on_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO analytics_videos (video_filename, video_id)
    SELECT DISTINCT video_filename, video_id FROM new_rows
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING;

    INSERT INTO analytics_video_daily AS t
        (video_filename, video_id, day, period, event_type,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, day, period, event_type,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM new_rows
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (video_filename, video_id, day, period, event_type) DO UPDATE SET
        impressions     = t.impressions + excluded.impressions,
        seconds_played  = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count,
        audience_sum    = t.audience_sum + excluded.audience_sum;

    INSERT INTO analytics_site_video_monthly AS t
        (video_filename, video_id, month, site_id,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, date_trunc('month', day)::date, site_id,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM new_rows
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (video_filename, video_id, month, site_id) DO UPDATE SET
        impressions     = t.impressions + excluded.impressions,
        seconds_played  = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count,
        audience_sum    = t.audience_sum + excluded.audience_sum;
    RETURN NULL;
END
$$;

-- UPDATE (the ingestor's ON CONFLICT DO UPDATE increments, late plays):
-- fold new - old. Grouping the union (rather than joining old to new) stays
-- correct even if a key column were updated.
CREATE FUNCTION analytics_rollup_on_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO analytics_videos (video_filename, video_id)
    SELECT DISTINCT video_filename, video_id FROM new_rows
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING;

    INSERT INTO analytics_video_daily AS t
        (video_filename, video_id, day, period, event_type,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, day, period, event_type,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM (
        SELECT video_filename, video_id, day, period, event_type,
               impressions, seconds_played, completed_count, audience_sum FROM new_rows
        UNION ALL
        SELECT video_filename, video_id, day, period, event_type,
               -impressions, -seconds_played, -completed_count, -audience_sum FROM old_rows
    ) d
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (video_filename, video_id, day, period, event_type) DO UPDATE SET
        impressions     = t.impressions + excluded.impressions,
        seconds_played  = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count,
        audience_sum    = t.audience_sum + excluded.audience_sum;

    INSERT INTO analytics_site_video_monthly AS t
        (video_filename, video_id, month, site_id,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, date_trunc('month', day)::date, site_id,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM (
        SELECT video_filename, video_id, day, site_id,
               impressions, seconds_played, completed_count, audience_sum FROM new_rows
        UNION ALL
        SELECT video_filename, video_id, day, site_id,
               -impressions, -seconds_played, -completed_count, -audience_sum FROM old_rows
    ) d
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (video_filename, video_id, month, site_id) DO UPDATE SET
        impressions     = t.impressions + excluded.impressions,
        seconds_played  = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count,
        audience_sum    = t.audience_sum + excluded.audience_sum;
    RETURN NULL;
END
$$;

-- DELETE (calculate_sponsor_daily_stats() clearing a day before re-adding
-- it): subtract the old rows.
CREATE FUNCTION analytics_rollup_on_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO analytics_video_daily AS t
        (video_filename, video_id, day, period, event_type,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, day, period, event_type,
           -sum(impressions), -sum(seconds_played), -sum(completed_count), -sum(audience_sum)
    FROM old_rows
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (video_filename, video_id, day, period, event_type) DO UPDATE SET
        impressions     = t.impressions + excluded.impressions,
        seconds_played  = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count,
        audience_sum    = t.audience_sum + excluded.audience_sum;

    INSERT INTO analytics_site_video_monthly AS t
        (video_filename, video_id, month, site_id,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, date_trunc('month', day)::date, site_id,
           -sum(impressions), -sum(seconds_played), -sum(completed_count), -sum(audience_sum)
    FROM old_rows
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (video_filename, video_id, month, site_id) DO UPDATE SET
        impressions     = t.impressions + excluded.impressions,
        seconds_played  = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count,
        audience_sum    = t.audience_sum + excluded.audience_sum;
    RETURN NULL;
END
$$;

CREATE FUNCTION analytics_rollup_on_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE analytics_video_daily, analytics_site_video_monthly, analytics_videos;
    RETURN NULL;
END
$$;

-- Rebuilds every rollup from sponsor_daily_stats (repair/audit; also what
-- this migration does for rows that existed before it). Takes a SHARE lock
-- on sponsor_daily_stats so no increment interleaves.
CREATE FUNCTION analytics_rebuild_rollups() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE sponsor_daily_stats IN SHARE MODE;
    DELETE FROM analytics_video_daily;
    DELETE FROM analytics_site_video_monthly;
    DELETE FROM analytics_videos;
    INSERT INTO analytics_videos (video_filename, video_id)
    SELECT DISTINCT video_filename, video_id FROM sponsor_daily_stats;
    INSERT INTO analytics_video_daily
        (video_filename, video_id, day, period, event_type,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, day, period, event_type,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM sponsor_daily_stats
    GROUP BY 1, 2, 3, 4, 5;
    INSERT INTO analytics_site_video_monthly
        (video_filename, video_id, month, site_id,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, date_trunc('month', day)::date, site_id,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM sponsor_daily_stats
    GROUP BY 1, 2, 3, 4;
END
$$;

CREATE TRIGGER analytics_rollup_ins AFTER INSERT ON sponsor_daily_stats
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION analytics_rollup_on_insert();
CREATE TRIGGER analytics_rollup_upd AFTER UPDATE ON sponsor_daily_stats
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION analytics_rollup_on_update();
CREATE TRIGGER analytics_rollup_del AFTER DELETE ON sponsor_daily_stats
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION analytics_rollup_on_delete();
CREATE TRIGGER analytics_rollup_trunc AFTER TRUNCATE ON sponsor_daily_stats
    FOR EACH STATEMENT EXECUTE FUNCTION analytics_rollup_on_truncate();

SELECT analytics_rebuild_rollups();
