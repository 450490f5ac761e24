-- Answers carry the node's own time of the answer (the AMI event's timestamp), so that an
-- answer recorded a moment after the node raised it, with others in one statement, still
-- starts its grant when the callee picked up. The time is kept within what the database
-- can vouch for: not before the call was admitted, not after the statement's own now()
-- (a node clock running ahead or behind). NULL: now().
CREATE FUNCTION answered_time(p_at timestamptz, p_started timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT least(greatest(coalesce(p_at, now()), p_started), now());
$$;

CREATE FUNCTION calls_answered_at(p_ids uuid[], p_channels text[], p_at timestamptz[],
                                  p_lease double precision)
RETURNS TABLE (id uuid, granted_seconds integer)
-- a few rows by their key: never a scan of the table (see calls_answered, 0008)
SET enable_seqscan = off
LANGUAGE sql AS $$
    -- rows locked in id order, as every statement changing several calls does
    WITH a AS (
        SELECT l.id, l.started_at, p_channels[array_position(p_ids, l.id)] AS channel,
               p_at[array_position(p_ids, l.id)] AS at
          FROM calls l WHERE l.id = ANY (p_ids) AND l.answered_at IS NULL
         ORDER BY l.id FOR UPDATE
    )
    UPDATE calls c SET answered_at = answered_time(a.at, a.started_at),
           callee_channel = a.channel,
           granted_until = answered_time(a.at, a.started_at)
                           + make_interval(secs => c.granted_seconds),
           lease_until = greatest(c.lease_until, now() + make_interval(secs => p_lease))
      FROM a
     WHERE c.id = a.id AND c.answered_at IS NULL
    RETURNING c.id, c.granted_seconds;
$$;

DROP FUNCTION calls_answered(uuid[], text[], double precision);
