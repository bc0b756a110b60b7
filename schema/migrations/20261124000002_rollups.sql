-- Daily rollup of plays, the seed's summary view and recompute function.
--
-- sponsor_daily_stats is kept exact incrementally: the ingestor, in the same
-- transaction as its INSERT ... ON CONFLICT DO NOTHING, adds the aggregates
-- of exactly the rows that were new (RETURNING), so a late play (a box back
-- after a week offline) updates its own past day and a replay adds nothing.
-- Days are UTC days.
--
-- Lock protocol between incremental updates and a recompute of a day:
-- writers take lock_rollup_days_shared(days) (shared advisory locks, which do
-- not block each other), calculate_sponsor_daily_stats(day) takes the
-- exclusive one, so a recompute never interleaves with an increment.

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
);
CREATE INDEX sponsor_daily_stats_video_idx ON sponsor_daily_stats (video_filename, day);
CREATE INDEX sponsor_daily_stats_site_idx ON sponsor_daily_stats (site_id, day);

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

-- Recomputes one UTC day of the rollup from the raw rows (repair, audit, or
-- after a manual correction of raw rows). Returns the number of rollup rows.
CREATE FUNCTION calculate_sponsor_daily_stats(p_day date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    PERFORM pg_advisory_xact_lock(1852143727, rollup_day_key(p_day));
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
-- (the seed's dashboard headline figures).
CREATE VIEW sponsor_analytics_summary AS
WITH videos_seen AS (
    SELECT DISTINCT video_id, video_filename FROM sponsor_daily_stats
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
LEFT JOIN sponsor_daily_stats s ON s.video_id = a.video_id AND s.video_filename = a.video_filename
GROUP BY sp.id, sp.name;
