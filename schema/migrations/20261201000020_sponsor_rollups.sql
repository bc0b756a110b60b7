-- Per-sponsor rollups, attributed at write time (issue 7: latency targets).
--
-- Replaces the per-video rollups of 20261124000010/11 (analytics_*), which
-- attributed videos at read time and made a big sponsor's by-site breakdown
-- read per-video monthly rows x 1,000 sites plus sponsor_daily_stats for the
-- edge days.
--
-- video_attribution maps every video ever played (video_filename, video_id;
-- '' when the plays had none, as in sponsor_daily_stats) to its sponsor under
-- the current catalogue (sponsor_of(); NULL when no rule matches). The
-- rollups are keyed by sponsor:
--   sponsor_stats_daily       (sponsor, day, period, event_type)
--       totals, by period, by event type, the daily series (any period/event filter)
--   sponsor_video_daily       (sponsor, day, video, period, event_type)
--       top videos
--   sponsor_site_monthly      (sponsor, month, site)
--   sponsor_site_weekly       (sponsor, ISO week (its Monday), site)
--   sponsor_site_daily        (sponsor, day, site)
--       by site, unfiltered: whole months + whole weeks + the remaining days
--   sponsor_site_daily_detail (sponsor, period, event_type, day, site)
--       by site with a period/event filter
-- Unattributed plays are not rolled up (they are in sponsor_daily_stats).
--
-- Invariants, at every commit:
--   * video_attribution holds every (video_filename, video_id) of
--     sponsor_daily_stats, with sponsor_id = sponsor_of(nullif(video_id, ''), video_filename);
--   * each rollup equals the aggregate of sponsor_daily_stats joined with
--     video_attribution (zero rows may remain after a re-attribution).
-- Kept by:
--   * statement-level triggers with transition tables on sponsor_daily_stats
--     (INSERT, UPDATE, DELETE, TRUNCATE): new videos are added to the map
--     (sponsor_of() runs only for videos never seen), then the statement's
--     delta (new - old) joined with the map is folded into all six rollups by
--     ONE statement (data-modifying CTEs: one grouped upsert per table, rows
--     in primary-key order, tables always in the same order);
--   * a statement-level trigger on videos (INSERT, UPDATE, DELETE, TRUNCATE;
--     also fired by the cascade of a sponsor deletion): it locks
--     sponsor_daily_stats in SHARE ROW EXCLUSIVE mode (waits for in-flight
--     rollup writers to commit, holds new ones back until the catalogue
--     transaction ends, serialises catalogue changes), recomputes the map, and
--     for each video whose sponsor changed moves its aggregates (read from
--     sponsor_daily_stats through its (video_filename, day) index) from the old
--     sponsor to the new one, in the catalogue's own transaction. So an
--     unattributed video becomes attributed when a matching rule is added, and
--     past plays follow every catalogue change, whoever makes it (API, CSV/TOML
--     import, psql).

DROP TRIGGER IF EXISTS analytics_rollup_ins ON sponsor_daily_stats;
DROP TRIGGER IF EXISTS analytics_rollup_upd ON sponsor_daily_stats;
DROP TRIGGER IF EXISTS analytics_rollup_del ON sponsor_daily_stats;
DROP TRIGGER IF EXISTS analytics_rollup_trunc ON sponsor_daily_stats;
DROP TRIGGER IF EXISTS analytics_coarse_ins ON sponsor_daily_stats;
DROP TRIGGER IF EXISTS analytics_coarse_upd ON sponsor_daily_stats;
DROP TRIGGER IF EXISTS analytics_coarse_del ON sponsor_daily_stats;
DROP TRIGGER IF EXISTS analytics_coarse_trunc ON sponsor_daily_stats;
DROP FUNCTION IF EXISTS analytics_rollup_on_insert(), analytics_rollup_on_update(),
    analytics_rollup_on_delete(), analytics_rollup_on_truncate(), analytics_rebuild_rollups(),
    analytics_coarse_on_insert(), analytics_coarse_on_update(), analytics_coarse_on_delete(),
    analytics_coarse_on_truncate(), analytics_rebuild_coarse_rollups();
DROP TABLE IF EXISTS analytics_video_daily, analytics_site_video_monthly, analytics_videos,
    analytics_video_day, analytics_video_monthly;

CREATE TABLE video_attribution (
    video_filename  text NOT NULL,
    video_id        text NOT NULL,
    sponsor_id      text,
    PRIMARY KEY (video_filename, video_id)
);
CREATE INDEX video_attribution_sponsor_idx ON video_attribution (sponsor_id);

CREATE TABLE sponsor_stats_daily (
    sponsor_id text NOT NULL, day date NOT NULL, period text NOT NULL, event_type text NOT NULL,
    impressions bigint NOT NULL, seconds_played double precision NOT NULL,
    completed_count bigint NOT NULL, audience_sum bigint NOT NULL,
    PRIMARY KEY (sponsor_id, day, period, event_type)
) WITH (fillfactor = 70);
CREATE TABLE sponsor_video_daily (
    sponsor_id text NOT NULL, day date NOT NULL, video_filename text NOT NULL, video_id text NOT NULL,
    period text NOT NULL, event_type text NOT NULL,
    impressions bigint NOT NULL, seconds_played double precision NOT NULL,
    completed_count bigint NOT NULL, audience_sum bigint NOT NULL,
    PRIMARY KEY (sponsor_id, day, video_filename, video_id, period, event_type)
) WITH (fillfactor = 70);
CREATE TABLE sponsor_site_monthly (
    sponsor_id text NOT NULL, month date NOT NULL, site_id text NOT NULL,
    impressions bigint NOT NULL, seconds_played double precision NOT NULL,
    completed_count bigint NOT NULL, audience_sum bigint NOT NULL,
    PRIMARY KEY (sponsor_id, month, site_id)
) WITH (fillfactor = 70);
CREATE TABLE sponsor_site_weekly (
    sponsor_id text NOT NULL, week date NOT NULL, site_id text NOT NULL,
    impressions bigint NOT NULL, seconds_played double precision NOT NULL,
    completed_count bigint NOT NULL, audience_sum bigint NOT NULL,
    PRIMARY KEY (sponsor_id, week, site_id)
) WITH (fillfactor = 70);
CREATE TABLE sponsor_site_daily (
    sponsor_id text NOT NULL, day date NOT NULL, site_id text NOT NULL,
    impressions bigint NOT NULL, seconds_played double precision NOT NULL,
    completed_count bigint NOT NULL, audience_sum bigint NOT NULL,
    PRIMARY KEY (sponsor_id, day, site_id)
) WITH (fillfactor = 70);
-- period/event first: a filter on either is a set of contiguous index ranges
-- (period = ANY(..) AND event_type = ANY(..) AND day BETWEEN ..).
CREATE TABLE sponsor_site_daily_detail (
    sponsor_id text NOT NULL, period text NOT NULL, event_type text NOT NULL, day date NOT NULL,
    site_id text NOT NULL,
    impressions bigint NOT NULL, seconds_played double precision NOT NULL,
    completed_count bigint NOT NULL, audience_sum bigint NOT NULL,
    PRIMARY KEY (sponsor_id, period, event_type, day, site_id)
) WITH (fillfactor = 70);

-- fillfactor 70 (tables above): every batch increments existing rows and no updated column
-- is indexed, so with free space on the page PostgreSQL updates in place
-- (HOT: no new index entry, dead versions pruned on the page).

-- The fold: one statement that adds a signed delta relation `d` (sponsor_id,
-- day, site_id, video_filename, video_id, period, event_type, impressions,
-- seconds_played, completed_count, audience_sum) to every rollup. Written
-- once here and instantiated (static SQL, plans cached) in each function.
CREATE FUNCTION pg_temp.sponsor_fold_sql(p_prefix text, p_delta text) RETURNS text
LANGUAGE sql IMMUTABLE AS $f$
SELECT format($q$
    WITH %s d AS MATERIALIZED (%s),
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
            completed_count = t.completed_count + excluded.completed_count, audience_sum = t.audience_sum + excluded.audience_sum)
    INSERT INTO sponsor_site_daily_detail AS t
        (sponsor_id, period, event_type, day, site_id, impressions, seconds_played, completed_count, audience_sum)
    SELECT sponsor_id, period, event_type, day, site_id,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM d GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (sponsor_id, period, event_type, day, site_id) DO UPDATE SET
        impressions = t.impressions + excluded.impressions, seconds_played = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count, audience_sum = t.audience_sum + excluded.audience_sum
$q$, p_prefix, p_delta)
$f$;

-- Adds the videos of `rel` never seen before to the map (sponsor_of() only for them).
CREATE FUNCTION pg_temp.sponsor_map_new_sql(p_rel text) RETURNS text
LANGUAGE sql IMMUTABLE AS $f$
SELECT format($q$
    INSERT INTO video_attribution (video_filename, video_id, sponsor_id)
    SELECT v.video_filename, v.video_id, sponsor_of(nullif(v.video_id, ''), v.video_filename)
    FROM (SELECT DISTINCT video_filename, video_id FROM %1$s) v
    WHERE NOT EXISTS (SELECT 1 FROM video_attribution a
                      WHERE a.video_filename = v.video_filename AND a.video_id = v.video_id)
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING
$q$, p_rel)
$f$;

-- Rows of `rel` joined with the map, signed.
CREATE FUNCTION pg_temp.sponsor_delta_sql(p_rel text, p_sign text) RETURNS text
LANGUAGE sql IMMUTABLE AS $f$
SELECT format($q$
        SELECT a.sponsor_id, r.day, r.site_id, r.video_filename, r.video_id, r.period, r.event_type,
               %2$s r.impressions AS impressions, %2$s r.seconds_played AS seconds_played,
               %2$s r.completed_count AS completed_count, %2$s r.audience_sum AS audience_sum
        FROM %1$s r JOIN video_attribution a ON a.video_filename = r.video_filename AND a.video_id = r.video_id
        WHERE a.sponsor_id IS NOT NULL
$q$, p_rel, p_sign)
$f$;

DO $do$
BEGIN
    EXECUTE format($fn$
        CREATE FUNCTION sponsor_rollups_on_insert() RETURNS trigger LANGUAGE plpgsql AS $body$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM new_rows) THEN RETURN NULL; END IF;
            %s;
            %s;
            RETURN NULL;
        END
        $body$ $fn$,
        pg_temp.sponsor_map_new_sql('new_rows'),
        pg_temp.sponsor_fold_sql('', pg_temp.sponsor_delta_sql('new_rows', '')));

    -- Grouping the union of new and -old (rather than joining old to new)
    -- stays correct even if a key column were updated.
    EXECUTE format($fn$
        CREATE FUNCTION sponsor_rollups_on_update() RETURNS trigger LANGUAGE plpgsql AS $body$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM new_rows) THEN RETURN NULL; END IF;
            %s;
            %s;
            RETURN NULL;
        END
        $body$ $fn$,
        pg_temp.sponsor_map_new_sql('new_rows'),
        pg_temp.sponsor_fold_sql('', pg_temp.sponsor_delta_sql('new_rows', '')
            || ' UNION ALL ' || pg_temp.sponsor_delta_sql('old_rows', '-')));

    EXECUTE format($fn$
        CREATE FUNCTION sponsor_rollups_on_delete() RETURNS trigger LANGUAGE plpgsql AS $body$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM old_rows) THEN RETURN NULL; END IF;
            %s;
            RETURN NULL;
        END
        $body$ $fn$,
        pg_temp.sponsor_fold_sql('', pg_temp.sponsor_delta_sql('old_rows', '-')));

    -- Catalogue change: recompute the map; when some videos changed sponsor,
    -- update the map and move their aggregates (old sponsor -, new sponsor +)
    -- in one statement. The moved videos are passed as arrays, so a change
    -- that moves nothing (a title, a rule for videos never played) costs one
    -- sponsor_of() pass over the map, and a move reads only the moved videos'
    -- rows of sponsor_daily_stats (its (video_filename, day) index).
    EXECUTE format($fn$
        CREATE FUNCTION sponsor_rollups_on_catalogue() RETURNS trigger LANGUAGE plpgsql AS $body$
        DECLARE
            mv_files text[];
            mv_ids text[];
            mv_old text[];
            mv_new text[];
        BEGIN
            LOCK TABLE sponsor_daily_stats IN SHARE ROW EXCLUSIVE MODE;
            SELECT array_agg(video_filename ORDER BY video_filename, video_id),
                   array_agg(video_id ORDER BY video_filename, video_id),
                   array_agg(old_sponsor ORDER BY video_filename, video_id),
                   array_agg(new_sponsor ORDER BY video_filename, video_id)
              INTO mv_files, mv_ids, mv_old, mv_new
            FROM (SELECT video_filename, video_id, sponsor_id AS old_sponsor,
                         sponsor_of(nullif(video_id, ''), video_filename) AS new_sponsor
                  FROM video_attribution) m
            WHERE old_sponsor IS DISTINCT FROM new_sponsor;
            IF mv_files IS NULL THEN RETURN NULL; END IF;
            UPDATE video_attribution a SET sponsor_id = mv.new_sponsor
            FROM unnest(mv_files, mv_ids, mv_new) AS mv(video_filename, video_id, new_sponsor)
            WHERE a.video_filename = mv.video_filename AND a.video_id = mv.video_id;
            %s;
            RETURN NULL;
        END
        $body$ $fn$,
        pg_temp.sponsor_fold_sql($p$
            mv AS MATERIALIZED (
                SELECT * FROM unnest(mv_files, mv_ids, mv_old, mv_new)
                    AS u(video_filename, video_id, old_sponsor, new_sponsor)
            ), $p$, $d$
                SELECT x.sponsor_id, s.day, s.site_id, s.video_filename, s.video_id, s.period, s.event_type,
                       x.sign * s.impressions AS impressions, x.sign * s.seconds_played AS seconds_played,
                       x.sign * s.completed_count AS completed_count, x.sign * s.audience_sum AS audience_sum
                FROM mv
                CROSS JOIN LATERAL (VALUES (mv.new_sponsor, 1), (mv.old_sponsor, -1)) AS x(sponsor_id, sign)
                JOIN sponsor_daily_stats s ON s.video_filename = mv.video_filename AND s.video_id = mv.video_id
                WHERE x.sponsor_id IS NOT NULL
            $d$));

    -- Rebuilds the map and every rollup from sponsor_daily_stats (repair,
    -- audit; also the backfill of this migration).
    EXECUTE format($fn$
        CREATE FUNCTION sponsor_rollups_rebuild() RETURNS void LANGUAGE plpgsql AS $body$
        BEGIN
            LOCK TABLE sponsor_daily_stats IN SHARE ROW EXCLUSIVE MODE;
            -- Millions of rows: sort and hash in memory (until the end of the transaction).
            PERFORM set_config('work_mem', '256MB', true);
            TRUNCATE video_attribution, sponsor_stats_daily, sponsor_video_daily, sponsor_site_monthly,
                     sponsor_site_weekly, sponsor_site_daily, sponsor_site_daily_detail;
            %s;
            %s;
        END
        $body$ $fn$,
        pg_temp.sponsor_map_new_sql('sponsor_daily_stats'),
        pg_temp.sponsor_fold_sql('', pg_temp.sponsor_delta_sql('sponsor_daily_stats', '')));
END
$do$;

CREATE FUNCTION sponsor_rollups_on_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE video_attribution, sponsor_stats_daily, sponsor_video_daily, sponsor_site_monthly,
             sponsor_site_weekly, sponsor_site_daily, sponsor_site_daily_detail;
    RETURN NULL;
END
$$;

CREATE TRIGGER sponsor_rollups_ins AFTER INSERT ON sponsor_daily_stats
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sponsor_rollups_on_insert();
CREATE TRIGGER sponsor_rollups_upd AFTER UPDATE ON sponsor_daily_stats
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sponsor_rollups_on_update();
CREATE TRIGGER sponsor_rollups_del AFTER DELETE ON sponsor_daily_stats
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sponsor_rollups_on_delete();
CREATE TRIGGER sponsor_rollups_trunc AFTER TRUNCATE ON sponsor_daily_stats
    FOR EACH STATEMENT EXECUTE FUNCTION sponsor_rollups_on_truncate();
CREATE TRIGGER sponsor_rollups_catalogue AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON videos
    FOR EACH STATEMENT EXECUTE FUNCTION sponsor_rollups_on_catalogue();

DROP FUNCTION pg_temp.sponsor_fold_sql(text, text), pg_temp.sponsor_map_new_sql(text),
    pg_temp.sponsor_delta_sql(text, text);

-- Backfill from the existing rows.
SELECT sponsor_rollups_rebuild();
ANALYZE video_attribution, sponsor_stats_daily, sponsor_video_daily, sponsor_site_monthly,
        sponsor_site_weekly, sponsor_site_daily, sponsor_site_daily_detail;
