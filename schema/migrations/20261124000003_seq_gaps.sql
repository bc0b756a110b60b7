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
