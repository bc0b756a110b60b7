-- sponsor_rollups_fold() merges the deltas it takes before the six upserts.
--
-- Why: an updated sponsor_daily_stats key leaves two deltas in
-- sponsor_rollup_pending (+new, -old, see 20261201000030), and the batches
-- folded together touch mostly the same keys, so the pending rows are many
-- times the keys they change. The function of 20261201000030 grouped all of
-- them six times, once per rollup. Measured on this machine with psql, a fold
-- of 446,832 pending deltas (52,721 distinct keys): 4.4-4.8 s before, 3.9-4.1 s
-- with the merge below (hash aggregate under the fold's work_mem of 64 MB).
--
-- The invariant of 20261201000030 is unchanged: the merged rows carry the same
-- sums, each rollup receives the same totals per key, in the same statement.

CREATE OR REPLACE FUNCTION sponsor_rollups_fold() RETURNS bigint
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
    -- Merge first: an updated key left two deltas (+new, -old), and every
    -- batch folded here touched mostly the same keys; the six upserts then
    -- group the merged rows instead of all of them.
    d AS MATERIALIZED (
        SELECT sponsor_id, day, site_id, video_filename, video_id, period, event_type,
               sum(impressions) AS impressions, sum(seconds_played) AS seconds_played,
               sum(completed_count) AS completed_count, sum(audience_sum) AS audience_sum
        FROM taken WHERE sponsor_id IS NOT NULL
        GROUP BY 1, 2, 3, 4, 5, 6, 7),
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
