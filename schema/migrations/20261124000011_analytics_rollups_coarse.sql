-- Two coarser analytics rollups, so that a sponsor's year is answered from
-- about a thousand rows (measured: the GROUPING SETS pass over
-- analytics_video_daily, ~16 rows per video-day, dominated the latency of
-- year-long requests):
--   * analytics_video_day    (video, day): totals, the daily series, top videos;
--   * analytics_video_monthly (video, month, period, event_type): the
--     breakdowns by period and event type for the whole months of a range
--     (the partial months at its edges come from analytics_video_daily).
-- Same invariant and mechanism as 20261124000010_analytics_rollups.sql:
-- statement-level triggers with transition tables on sponsor_daily_stats fold
-- each statement's delta (new - old), upserting in key order.

CREATE TABLE analytics_video_day (
    video_filename   text NOT NULL,
    video_id         text NOT NULL,
    day              date NOT NULL,
    impressions      bigint NOT NULL,
    seconds_played   double precision NOT NULL,
    completed_count  bigint NOT NULL,
    audience_sum     bigint NOT NULL,
    PRIMARY KEY (video_filename, video_id, day)
);

CREATE TABLE analytics_video_monthly (
    video_filename   text NOT NULL,
    video_id         text NOT NULL,
    month            date NOT NULL,   -- first day of the UTC month
    period           text NOT NULL,
    event_type       text NOT NULL,
    impressions      bigint NOT NULL,
    seconds_played   double precision NOT NULL,
    completed_count  bigint NOT NULL,
    audience_sum     bigint NOT NULL,
    PRIMARY KEY (video_filename, video_id, month, period, event_type)
);

-- One function per event (transition tables exist only on single-event
-- triggers). The source relation has sponsor_daily_stats' columns, signed.
CREATE FUNCTION analytics_coarse_on_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO analytics_video_day AS t
        (video_filename, video_id, day, impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, day,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM (SELECT video_filename, video_id, day, period, event_type, impressions, seconds_played, completed_count, audience_sum FROM new_rows) d
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (video_filename, video_id, day) DO UPDATE SET
        impressions     = t.impressions + excluded.impressions,
        seconds_played  = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count,
        audience_sum    = t.audience_sum + excluded.audience_sum;

    INSERT INTO analytics_video_monthly AS t
        (video_filename, video_id, month, period, event_type,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, date_trunc('month', day)::date, period, event_type,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM (SELECT video_filename, video_id, day, period, event_type, impressions, seconds_played, completed_count, audience_sum FROM new_rows) d
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (video_filename, video_id, month, period, event_type) DO UPDATE SET
        impressions     = t.impressions + excluded.impressions,
        seconds_played  = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count,
        audience_sum    = t.audience_sum + excluded.audience_sum;
    RETURN NULL;
END
$$;

CREATE FUNCTION analytics_coarse_on_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO analytics_video_day AS t
        (video_filename, video_id, day, impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, day,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM (SELECT video_filename, video_id, day, period, event_type, impressions, seconds_played, completed_count, audience_sum FROM new_rows
        UNION ALL
        SELECT video_filename, video_id, day, period, event_type, -impressions AS impressions, -seconds_played AS seconds_played, -completed_count AS completed_count, -audience_sum AS audience_sum FROM old_rows) d
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (video_filename, video_id, day) DO UPDATE SET
        impressions     = t.impressions + excluded.impressions,
        seconds_played  = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count,
        audience_sum    = t.audience_sum + excluded.audience_sum;

    INSERT INTO analytics_video_monthly AS t
        (video_filename, video_id, month, period, event_type,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, date_trunc('month', day)::date, period, event_type,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM (SELECT video_filename, video_id, day, period, event_type, impressions, seconds_played, completed_count, audience_sum FROM new_rows
        UNION ALL
        SELECT video_filename, video_id, day, period, event_type, -impressions AS impressions, -seconds_played AS seconds_played, -completed_count AS completed_count, -audience_sum AS audience_sum FROM old_rows) d
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (video_filename, video_id, month, period, event_type) DO UPDATE SET
        impressions     = t.impressions + excluded.impressions,
        seconds_played  = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count,
        audience_sum    = t.audience_sum + excluded.audience_sum;
    RETURN NULL;
END
$$;

CREATE FUNCTION analytics_coarse_on_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO analytics_video_day AS t
        (video_filename, video_id, day, impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, day,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM (SELECT video_filename, video_id, day, period, event_type, -impressions AS impressions, -seconds_played AS seconds_played, -completed_count AS completed_count, -audience_sum AS audience_sum FROM old_rows) d
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (video_filename, video_id, day) DO UPDATE SET
        impressions     = t.impressions + excluded.impressions,
        seconds_played  = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count,
        audience_sum    = t.audience_sum + excluded.audience_sum;

    INSERT INTO analytics_video_monthly AS t
        (video_filename, video_id, month, period, event_type,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, date_trunc('month', day)::date, period, event_type,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM (SELECT video_filename, video_id, day, period, event_type, -impressions AS impressions, -seconds_played AS seconds_played, -completed_count AS completed_count, -audience_sum AS audience_sum FROM old_rows) d
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (video_filename, video_id, month, period, event_type) DO UPDATE SET
        impressions     = t.impressions + excluded.impressions,
        seconds_played  = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count,
        audience_sum    = t.audience_sum + excluded.audience_sum;
    RETURN NULL;
END
$$;

CREATE FUNCTION analytics_coarse_on_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE analytics_video_day, analytics_video_monthly;
    RETURN NULL;
END
$$;

-- Rebuild from sponsor_daily_stats (repair/audit, and the rows that existed
-- before this migration). Also what analytics_rebuild_rollups() does for the
-- other three tables; call both for a full rebuild.
CREATE FUNCTION analytics_rebuild_coarse_rollups() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE sponsor_daily_stats IN SHARE MODE;
    DELETE FROM analytics_video_day;
    DELETE FROM analytics_video_monthly;
    INSERT INTO analytics_video_day
        (video_filename, video_id, day, impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, day,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM sponsor_daily_stats GROUP BY 1, 2, 3;
    INSERT INTO analytics_video_monthly
        (video_filename, video_id, month, period, event_type,
         impressions, seconds_played, completed_count, audience_sum)
    SELECT video_filename, video_id, date_trunc('month', day)::date, period, event_type,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM sponsor_daily_stats GROUP BY 1, 2, 3, 4, 5;
END
$$;

CREATE TRIGGER analytics_coarse_ins AFTER INSERT ON sponsor_daily_stats
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION analytics_coarse_on_insert();
CREATE TRIGGER analytics_coarse_upd AFTER UPDATE ON sponsor_daily_stats
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION analytics_coarse_on_update();
CREATE TRIGGER analytics_coarse_del AFTER DELETE ON sponsor_daily_stats
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION analytics_coarse_on_delete();
CREATE TRIGGER analytics_coarse_trunc AFTER TRUNCATE ON sponsor_daily_stats
    FOR EACH STATEMENT EXECUTE FUNCTION analytics_coarse_on_truncate();

SELECT analytics_rebuild_coarse_rollups();
