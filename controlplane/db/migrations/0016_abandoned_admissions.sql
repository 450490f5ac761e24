-- An admission that committed after the agent stopped waiting for it: the node was already
-- answered by the fail policy, so the call it recorded never rang. It is released at once,
-- without a CDR (the node writes the refused call's own): the reservation goes back to its
-- account, the slots to their counters, in the global lock order (account, then counters
-- root dealer first), as settle_calls (0013) does.
CREATE FUNCTION release_abandoned_call(p_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    c calls%ROWTYPE;
BEGIN
    DELETE FROM calls WHERE id = p_id AND answered_at IS NULL RETURNING * INTO c;
    IF NOT FOUND THEN
        RETURN false;  -- settled already, or its node answered it after all
    END IF;
    IF c.account_id IS NOT NULL AND c.reserved <> 0 THEN
        UPDATE credit_accounts SET reserved = reserved - c.reserved, updated_at = now()
         WHERE id = c.account_id;
    END IF;
    PERFORM 1 FROM call_counters cc
      JOIN (SELECT 'd'::char AS kind, p.id, p.ord::integer AS rank
              FROM unnest(c.dealer_path) WITH ORDINALITY AS p(id, ord)
            UNION ALL SELECT 't', c.tenant_id, 1000
            UNION ALL SELECT 'e', c.extension_id, 1001 WHERE c.extension_id IS NOT NULL) AS l
        ON cc.kind = l.kind AND cc.id = l.id
     WHERE cc.active > 0
     ORDER BY l.rank FOR UPDATE OF cc;
    UPDATE call_counters cc SET active = cc.active - 1
     WHERE cc.active > 0
       AND ((cc.kind = 'd' AND cc.id = ANY (c.dealer_path))
            OR (cc.kind = 't' AND cc.id = c.tenant_id)
            OR (cc.kind = 'e' AND cc.id = c.extension_id));
    RETURN true;
END $$;
