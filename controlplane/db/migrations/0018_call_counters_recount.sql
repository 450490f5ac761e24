-- Call counters set right again. Admission and settlement move a counter in the same
-- transaction as the call they add or remove, so at any one snapshot a counter equals its
-- level's calls in progress; only a cap set while calls come and go can leave one off
-- (sync_call_counter, 0005, counts the calls it sees, not those being admitted or settled
-- beside it). Housekeeping finds such counters in one statement and sets each right under
-- its own lock, one transaction each (one lock held at a time, so no deadlock with the
-- admissions, which lock several, root dealer first).

-- The counters that disagree with the calls in progress: (kind, id, active, counted).
CREATE FUNCTION call_counters_off() RETURNS TABLE (kind char, id bigint, active integer,
                                                   counted integer)
LANGUAGE sql STABLE AS $$
    WITH counted AS (
        SELECT l.kind, l.id, count(*)::integer AS n
          FROM (SELECT 'd'::char AS kind, p.id FROM calls c, unnest(c.dealer_path) AS p(id)
                UNION ALL SELECT 't', c.tenant_id FROM calls c
                UNION ALL SELECT 'e', c.extension_id FROM calls c
                 WHERE c.extension_id IS NOT NULL) AS l
         GROUP BY l.kind, l.id)
    SELECT cc.kind, cc.id, cc.active, coalesce(n.n, 0)
      FROM call_counters cc LEFT JOIN counted n ON n.kind = cc.kind AND n.id = cc.id
     WHERE cc.active <> coalesce(n.n, 0);
$$;

-- Set one counter to its level's calls in progress. The lock is taken first: every
-- transaction that has added or removed a call of this level and still has to move this
-- counter waits behind it, and the count, in a snapshot taken after the lock, sees every
-- one that has moved it. Returns the correction (0: it was right).
CREATE FUNCTION recount_call_counter(p_kind char, p_id bigint) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    was integer;
    now_ integer;
BEGIN
    SELECT cc.active INTO was FROM call_counters cc
     WHERE cc.kind = p_kind AND cc.id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    SELECT count(*) INTO now_ FROM calls c
     WHERE CASE p_kind WHEN 'd' THEN c.dealer_path @> ARRAY[p_id]
                       WHEN 't' THEN c.tenant_id = p_id
                       ELSE c.extension_id = p_id END;
    IF now_ <> was THEN
        UPDATE call_counters SET active = now_ WHERE kind = p_kind AND id = p_id;
    END IF;
    RETURN now_ - was;
END $$;
