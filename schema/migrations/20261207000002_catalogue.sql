-- The sponsor catalogue: sponsors, the rules that attribute videos to them,
-- and sponsor_of(), the one definition of which sponsor a play belongs to.
--
-- Attribution always follows the current catalogue: changing a rule changes
-- the figures of past plays too. The seed's summary view (…_daily_rollup.sql)
-- calls sponsor_of() at read time; the per-sponsor rollups
-- (…_sponsor_rollups.sql) store its answer in video_attribution, and a trigger
-- on videos re-attributes past plays in the transaction of every catalogue
-- change, whoever makes it (API, CSV/TOML import, psql). Both are defined with
-- the rollups they read and move.

CREATE TABLE sponsors (
    id          text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Video ↔ sponsor association. A rule is either an explicit video_id or a
-- filename glob (`*` any run, `?` one character; the seed matches by filename).
-- filename_like is the glob as a LIKE pattern, with LIKE's own `%`, `_` and `\`
-- escaped, so `sponsor_coca_cola_*` does not treat its underscores as wildcards.
CREATE TABLE videos (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sponsor_id        text NOT NULL REFERENCES sponsors (id) ON DELETE CASCADE,
    video_id          text UNIQUE CHECK (length(video_id) BETWEEN 1 AND 128),
    filename_pattern  text UNIQUE CHECK (length(filename_pattern) BETWEEN 1 AND 255),
    filename_like     text GENERATED ALWAYS AS (
        replace(replace(
            replace(replace(replace(filename_pattern, '\', '\\'), '%', '\%'), '_', '\_'),
        '*', '%'), '?', '_')
    ) STORED,
    title             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (num_nonnulls(video_id, filename_pattern) = 1)
);
CREATE INDEX videos_sponsor_idx ON videos (sponsor_id);

-- Which sponsor a play belongs to, under the current catalogue: an explicit
-- video_id wins; otherwise the most specific (longest) matching filename rule.
CREATE FUNCTION sponsor_of(p_video_id text, p_filename text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT v.sponsor_id
    FROM videos v
    WHERE (v.video_id IS NOT NULL AND v.video_id = p_video_id)
       OR (v.filename_like IS NOT NULL AND p_filename LIKE v.filename_like)
    ORDER BY (v.video_id IS NOT NULL) DESC, length(v.filename_pattern) DESC, v.id
    LIMIT 1
$$;
