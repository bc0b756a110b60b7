-- Impressions: the raw plays, their monthly partitions and retention, the
-- dead letters of everything refused, the known sites, and the sequence gaps
-- that tell what the centre has not received.
--
-- Invariants (the ingestor is the only writer of sponsor_impressions and
-- impressions_rejected):
--   * one row per (site_id, impression_id, played_at): replays are absorbed by
--     the primary key with ON CONFLICT DO NOTHING;
--   * nothing is dropped silently: a refused message or row is kept in
--     impressions_rejected with its raw bytes and reason;
--   * every seq a box numbered is either in sponsor_impressions, in
--     impressions_rejected, or reported by site_seq_gaps().

CREATE TABLE sites (
    site_id       text PRIMARY KEY CHECK (site_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    name          text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz
);

-- Raw plays, range-partitioned by month on played_at.
-- The unique key covers (site_id, impression_id, played_at); its column order
-- (site_id, played_at, impression_id) makes it serve the site/time queries as
-- well, and keeps index inserts local: ids are time-ordered (UUIDv7 layout
-- whose time part is the play time), and each site's plays arrive in time order.
CREATE TABLE sponsor_impressions (
    impression_id      uuid NOT NULL,
    site_id            text NOT NULL,
    seq                bigint CHECK (seq >= 1),
    video_id           text,
    video_filename     text NOT NULL,
    played_at          timestamptz NOT NULL,
    duration_played    double precision NOT NULL CHECK (duration_played >= 0),
    video_duration     double precision NOT NULL CHECK (video_duration >= 0),
    completed          boolean NOT NULL,
    event_type         text NOT NULL CHECK (event_type IN ('match', 'training', 'tournament', 'other')),
    period             text NOT NULL CHECK (period IN ('pre_match', 'halftime', 'post_match', 'loop')),
    trigger_type       text NOT NULL CHECK (trigger_type IN ('auto', 'manual')),
    audience_estimate  integer CHECK (audience_estimate >= 0),
    batch_id           uuid,
    received_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sponsor_impressions_pkey PRIMARY KEY (site_id, played_at, impression_id)
) PARTITION BY RANGE (played_at);

CREATE INDEX sponsor_impressions_video_time_idx ON sponsor_impressions (video_filename, played_at);

-- A play from any date is accepted: what no monthly partition covers lands
-- here, and create_impression_partitions() moves it out when it makes the month.
CREATE TABLE sponsor_impressions_default PARTITION OF sponsor_impressions DEFAULT;

-- Creates the monthly partitions covering [from_month, from_month + months).
-- Idempotent. Rows already sitting in the default partition for a new month
-- are moved into it (a partition cannot be attached over them otherwise).
-- Returns the number of partitions created.
CREATE FUNCTION create_impression_partitions(from_month date, months integer DEFAULT 3)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    m       date := date_trunc('month', from_month)::date;
    lo      timestamptz;
    hi      timestamptz;
    part    text;
    created integer := 0;
BEGIN
    FOR i IN 0 .. months - 1 LOOP
        lo   := (m + make_interval(months => i))::timestamp AT TIME ZONE 'UTC';
        hi   := (m + make_interval(months => i + 1))::timestamp AT TIME ZONE 'UTC';
        part := format('sponsor_impressions_y%sm%s',
                       to_char(lo AT TIME ZONE 'UTC', 'YYYY'), to_char(lo AT TIME ZONE 'UTC', 'MM'));
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
        -- Serialise partition maintenance; ingest keeps flowing into the
        -- default partition until the attach takes its brief lock.
        PERFORM pg_advisory_xact_lock(hashtext('create_impression_partitions'));
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
        EXECUTE format('CREATE TABLE %I (LIKE sponsor_impressions INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
        EXECUTE format(
            'WITH moved AS (DELETE FROM sponsor_impressions_default WHERE played_at >= %L AND played_at < %L RETURNING *)
             INSERT INTO %I SELECT * FROM moved', lo, hi, part);
        EXECUTE format('ALTER TABLE sponsor_impressions ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
        created := created + 1;
    END LOOP;
    RETURN created;
END
$$;

-- Drops monthly partitions whose whole range is older than `max_age`
-- (the seed keeps 1-2 years). The daily rollup is kept: it is the billing
-- history and is small. Returns the names dropped.
CREATE FUNCTION drop_impression_partitions_older_than(max_age interval)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    r record;
    upper_bound timestamptz;
BEGIN
    FOR r IN
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'sponsor_impressions'::regclass
          AND c.relname ~ '^sponsor_impressions_y[0-9]{4}m[0-9]{2}$'
    LOOP
        upper_bound := substring(r.bound FROM 'TO \(''([^'']+)''\)')::timestamptz;
        IF upper_bound <= now() - max_age THEN
            EXECUTE format('DROP TABLE %I', r.relname);
            RETURN NEXT r.relname;
        END IF;
    END LOOP;
END
$$;

-- Partitions for last month through the next twelve; the ingestor keeps
-- creating them ahead at start and daily.
SELECT create_impression_partitions((date_trunc('month', now()) - interval '1 month')::date, 14);

-- Dead letters: every refused message or row, with its raw bytes and reason.
CREATE TABLE impressions_rejected (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at    timestamptz NOT NULL DEFAULT now(),
    source         text NOT NULL CHECK (source IN ('mqtt', 'http')),
    topic          text,
    site_id        text,
    batch_id       uuid,
    impression_id  uuid,
    seq            bigint,
    reason_code    text NOT NULL,
    reason         text NOT NULL,
    payload        bytea NOT NULL
);
CREATE INDEX impressions_rejected_received_idx ON impressions_rejected (received_at);
CREATE INDEX impressions_rejected_site_idx ON impressions_rejected (site_id, received_at);

-- Gap detection on the edge's per-site sequence numbers.
--
-- Each edge numbers its impressions 1, 2, 3… in outbox order. A seq that is
-- neither in sponsor_impressions nor in impressions_rejected is an
-- impression the centre has not received (yet): still in the box's outbox,
-- or lost upstream of the edge. Seqs restart at 1 if a box's outbox is
-- re-created (new outbox_id); look at played_at to tell epochs apart.
CREATE FUNCTION site_seq_gaps(p_site_id text, p_since timestamptz DEFAULT '-infinity')
RETURNS TABLE (first_missing bigint, last_missing bigint, missing bigint)
LANGUAGE sql STABLE AS $$
    WITH seen AS (
        SELECT seq FROM sponsor_impressions
        WHERE site_id = p_site_id AND seq IS NOT NULL AND played_at >= p_since
        UNION
        SELECT seq FROM impressions_rejected
        WHERE site_id = p_site_id AND seq IS NOT NULL AND received_at >= p_since
    ), ordered AS (
        SELECT seq, lead(seq) OVER (ORDER BY seq) AS next_seq FROM seen
    )
    SELECT seq + 1, next_seq - 1, next_seq - seq - 1
    FROM ordered
    WHERE next_seq > seq + 1
    ORDER BY seq
$$;
