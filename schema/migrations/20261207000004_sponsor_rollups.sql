-- Per-sponsor rollups, attributed at write time and folded from a queue of
-- deltas off the ingest path, so that the sponsor stats API answers a big
-- sponsor's year from a few thousand rows.
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
-- How they are kept:
--   * statement-level triggers with transition tables on sponsor_daily_stats
--     (INSERT, UPDATE, DELETE, TRUNCATE) only append the statement's signed
--     delta to sponsor_rollup_pending, in the writer's transaction
--     (append-only heap, no index: no conflict, no hot row, nothing to lock);
--   * sponsor_rollups_fold() folds the daily queue (previous migration), then
--     moves the pending deltas of mapped videos into the six rollups with ONE
--     statement (DELETE ... RETURNING, merged per key, feeding data-modifying
--     CTEs: one grouped upsert per table, rows in primary-key order, tables
--     always in the same order), under the fold lock so folds never
--     interleave; videos never seen are first added to the map (sponsor_of()
--     runs only for them). The batches folded together touch mostly the same
--     sponsor-day-site keys, so folding many at once merges them before the
--     upserts: the same work, done once instead of once per batch. Readers
--     call sponsor_rollups_fold() before reading (neopro-analytics does, per
--     request); the ingestor also folds about once a second so the queue
--     stays short;
--   * catalogue changes: a BEFORE statement trigger on videos takes the fold
--     lock, then the SHARE ROW EXCLUSIVE lock on sponsor_daily_stats (waits
--     for in-flight writers to commit, holds new ones back until the
--     catalogue transaction ends, serialises catalogue changes), and folds, so
--     the queue is empty; the AFTER statement trigger (INSERT, UPDATE, DELETE,
--     TRUNCATE; also fired by the cascade of a sponsor deletion) recomputes
--     the map and, for each video whose sponsor changed, moves its aggregates
--     (read from sponsor_daily_stats through its (video_filename, day) index)
--     from the old sponsor to the new one, in the catalogue's own transaction.
--     So an unattributed video becomes attributed when a matching rule is
--     added, and past plays follow every catalogue change, whoever makes it
--     (API, CSV/TOML import, psql);
--   * sponsor_rollups_rebuild() recomputes the map and every rollup from
--     sponsor_daily_stats and empties the queue (repair, audit); TRUNCATE of
--     sponsor_daily_stats empties the queues, the map and the rollups.
--
-- Invariants, at every commit:
--   * video_attribution holds every (video_filename, video_id) of
--     sponsor_daily_stats whose deltas were folded (a fold adds the new
--     ones first), with sponsor_id = sponsor_of(nullif(video_id, ''), video_filename);
--   * for each rollup, rollup + the pending deltas of attributed videos folded
--     through video_attribution = the aggregate of sponsor_daily_stats joined
--     with video_attribution (zero rows may remain after a re-attribution).
--     So a reader that folds and then reads (a new snapshot, READ COMMITTED)
--     sees every write committed before its fold began: a fold sees only
--     committed pending rows; rows committed after its DELETE's snapshot stay
--     for the next fold, and rows of videos not yet in the map stay too
--     (never deleted without being folded).

CREATE TABLE video_attribution (
    video_filename  text NOT NULL,
    video_id        text NOT NULL,
    sponsor_id      text,
    PRIMARY KEY (video_filename, video_id)
);
CREATE INDEX video_attribution_sponsor_idx ON video_attribution (sponsor_id);

-- fillfactor 70: every fold increments existing rows and no updated column
-- is indexed, so with free space on the page PostgreSQL updates in place
-- (HOT: no new index entry, dead versions pruned on the page).
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

-- The signed deltas of sponsor_daily_stats not yet folded: the same shape as
-- the daily queue (the rollup's key and sums). Short-lived rows: vacuum it
-- eagerly.
CREATE TABLE sponsor_rollup_pending (LIKE sponsor_daily_pending)
    WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);

-- The triggers on sponsor_daily_stats: one function per event (transition
-- tables exist only on single-event triggers).
CREATE FUNCTION sponsor_rollups_on_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sponsor_rollup_pending
    SELECT day, site_id, video_filename, video_id, period, event_type,
           impressions, seconds_played, completed_count, audience_sum
    FROM new_rows;
    RETURN NULL;
END
$$;

-- One delta per changed key (new - old), not two rows (+new, -old): every
-- daily fold updates most of the keys it touches. The statement's transition
-- tables are joined on the table's primary key; the FULL JOIN keeps the
-- general case exact: an UPDATE that changed a key column leaves the old key only in
-- old_rows (its row negated) and the new key only in new_rows (added as is).
-- Within one statement a key appears at most once in each transition table,
-- so the join never multiplies rows.
CREATE FUNCTION sponsor_rollups_on_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sponsor_rollup_pending
    SELECT day, site_id, video_filename, video_id, period, event_type,
           coalesce(n.impressions, 0) - coalesce(o.impressions, 0),
           coalesce(n.seconds_played, 0) - coalesce(o.seconds_played, 0),
           coalesce(n.completed_count, 0) - coalesce(o.completed_count, 0),
           coalesce(n.audience_sum, 0) - coalesce(o.audience_sum, 0)
    FROM new_rows n
    FULL JOIN old_rows o USING (day, site_id, video_filename, video_id, period, event_type);
    RETURN NULL;
END
$$;

CREATE FUNCTION sponsor_rollups_on_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sponsor_rollup_pending
    SELECT day, site_id, video_filename, video_id, period, event_type,
           -impressions, -seconds_played, -completed_count, -audience_sum
    FROM old_rows;
    RETURN NULL;
END
$$;

CREATE FUNCTION sponsor_rollups_on_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE sponsor_daily_pending, sponsor_rollup_pending, video_attribution, sponsor_stats_daily,
             sponsor_video_daily, sponsor_site_monthly, sponsor_site_weekly, sponsor_site_daily,
             sponsor_site_daily_detail;
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

-- Three functions add a delta relation to the six rollups: the fold (the
-- queue), the catalogue trigger (the moved videos) and the recompute (all of
-- sponsor_daily_stats). That statement is written once, in the generator
-- below, and instantiated (static SQL, plans cached) in each of them by the
-- DO block; the generators are temporary (pg_temp), dropped right after it.

-- One statement that adds a signed delta relation `d` (sponsor_id,
-- day, site_id, video_filename, video_id, period, event_type, impressions,
-- seconds_played, completed_count, audience_sum) to every rollup.
-- p_with: CTEs that d reads, each followed by a comma; p_delta: the query of
-- d; p_last: how the last upsert ends the statement, '%s' for the upsert
-- itself (the statement's main query).
CREATE FUNCTION pg_temp.sponsor_fold_sql(p_with text, p_delta text, p_last text DEFAULT '%s') RETURNS text
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
    %s
$q$, p_with, p_delta, format(p_last, $q$
    INSERT INTO sponsor_site_daily_detail AS t
        (sponsor_id, period, event_type, day, site_id, impressions, seconds_played, completed_count, audience_sum)
    SELECT sponsor_id, period, event_type, day, site_id,
           sum(impressions), sum(seconds_played), sum(completed_count), sum(audience_sum)
    FROM d GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (sponsor_id, period, event_type, day, site_id) DO UPDATE SET
        impressions = t.impressions + excluded.impressions, seconds_played = t.seconds_played + excluded.seconds_played,
        completed_count = t.completed_count + excluded.completed_count, audience_sum = t.audience_sum + excluded.audience_sum
$q$))
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

DO $do$
BEGIN
    -- The per-sponsor fold: moves the pending deltas of mapped videos into
    -- the rollups; returns how many pending rows it consumed. Cheap when there
    -- is nothing to fold (no lock taken). The deltas taken are merged per key
    -- first: the batches folded together touch mostly the same keys, so the
    -- six upserts group the merged rows instead of all of them.
    EXECUTE format($fn$
        CREATE FUNCTION sponsor_rollups_fold_sponsors() RETURNS bigint LANGUAGE plpgsql AS $body$
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
            %s;
            %s;
            RETURN consumed;
        END
        $body$ $fn$,
        pg_temp.sponsor_map_new_sql('sponsor_rollup_pending'),
        pg_temp.sponsor_fold_sql($p$
            taken AS MATERIALIZED (
                DELETE FROM sponsor_rollup_pending p
                USING video_attribution a
                WHERE a.video_filename = p.video_filename AND a.video_id = p.video_id
                RETURNING a.sponsor_id, p.day, p.site_id, p.video_filename, p.video_id, p.period, p.event_type,
                          p.impressions, p.seconds_played, p.completed_count, p.audience_sum
            ),
            counted AS (SELECT count(*) AS n FROM taken),
            $p$, $d$
                SELECT sponsor_id, day, site_id, video_filename, video_id, period, event_type,
                       sum(impressions) AS impressions, sum(seconds_played) AS seconds_played,
                       sum(completed_count) AS completed_count, sum(audience_sum) AS audience_sum
                FROM taken WHERE sponsor_id IS NOT NULL
                GROUP BY 1, 2, 3, 4, 5, 6, 7
            $d$, $l$,
    u_detail AS (%s)
    SELECT counted.n INTO consumed FROM counted$l$));

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

    -- Recomputes the map and every rollup from sponsor_daily_stats;
    -- sponsor_rollups_rebuild() calls it with the queue emptied.
    EXECUTE format($fn$
        CREATE FUNCTION sponsor_rollups_recompute() RETURNS void LANGUAGE plpgsql AS $body$
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
        pg_temp.sponsor_fold_sql('', $d$
        SELECT a.sponsor_id, r.day, r.site_id, r.video_filename, r.video_id, r.period, r.event_type,
               r.impressions AS impressions, r.seconds_played AS seconds_played,
               r.completed_count AS completed_count, r.audience_sum AS audience_sum
        FROM sponsor_daily_stats r JOIN video_attribution a ON a.video_filename = r.video_filename AND a.video_id = r.video_id
        WHERE a.sponsor_id IS NOT NULL
$d$));
END
$do$;

DROP FUNCTION pg_temp.sponsor_fold_sql(text, text, text), pg_temp.sponsor_map_new_sql(text);

-- The fold every reader and the ingestor call: the daily queue first (its
-- upsert queues per-sponsor deltas), then the per-sponsor one, so one call
-- makes every rollup exact. Returns the pending rows consumed.
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

-- Before a catalogue change: hold writers back and empty the queues, so the
-- AFTER trigger's move works on complete rollups. Fold lock before the table
-- lock (a fold writes sponsor_daily_stats: the other order could deadlock
-- with a reader's fold).
CREATE FUNCTION sponsor_rollups_before_catalogue() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sponsor_rollups_fold_lock();
    LOCK TABLE sponsor_daily_stats IN SHARE ROW EXCLUSIVE MODE;
    PERFORM sponsor_rollups_fold();
    RETURN NULL;
END
$$;
CREATE TRIGGER sponsor_rollups_catalogue_before BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON videos
    FOR EACH STATEMENT EXECUTE FUNCTION sponsor_rollups_before_catalogue();
CREATE TRIGGER sponsor_rollups_catalogue AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON videos
    FOR EACH STATEMENT EXECUTE FUNCTION sponsor_rollups_on_catalogue();

-- Full rebuild (repair, audit): the map and every rollup recomputed from
-- sponsor_daily_stats, with the per-sponsor queue emptied under the same locks.
CREATE FUNCTION sponsor_rollups_rebuild() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sponsor_rollups_fold_lock();
    LOCK TABLE sponsor_daily_stats IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM sponsor_rollup_pending;
    PERFORM sponsor_rollups_recompute();
END
$$;
