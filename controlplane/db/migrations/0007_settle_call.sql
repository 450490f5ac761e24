-- The end of a call as one statement, like its admission (0006). Settling gives back the
-- call's slots on the counters every admission of its dealers takes; a settlement driven
-- from the client held those locks across several round trips and made admissions wait.
--
-- settle_call stores the CDR and, when the call is still in progress, settles it: the
-- price is debited, the unused reservation returned, the call row deleted and its slots
-- released, last and in admission's order. The client reads the call first (no lock) and
-- prices it from what it read; the price depends on the grant only (the cut tolerance), so
-- when the grant moved in between the function changes nothing and answers 'stale', and
-- the client prices again. p_lapsed_only: settle only if the lease lapsed ('renewed' if
-- the node vouched for the call again meanwhile).
--
-- outcome: 'settled' | 'no_call' (the CDR of a refused call, or of one already settled) |
-- 'stale' | 'renewed'; stored: whether the CDR was new (a second import of the same node
-- line, or a second line of the same call, stores nothing).
--
-- p_cdr: the CDR's columns; the tenant's facts are filled in here: its external reference
-- and, unless given (the call's own), its dealer chain. A CDR without a tenant finds it from
-- p_account_code (a call refused before its tenant was known).

CREATE FUNCTION settle_call(p_call uuid, p_granted integer, p_price numeric, p_cdr jsonb,
                            p_account_code text DEFAULT '', p_lapsed_only boolean DEFAULT false,
                            OUT outcome text, OUT stored boolean)
LANGUAGE plpgsql AS $$
DECLARE
    c calls%ROWTYPE;
    new_balance numeric;
    v_tenant bigint;
    v_ref text;
    v_path bigint[];
BEGIN
    stored := false;
    IF p_call IS NOT NULL THEN
        SELECT * INTO c FROM calls WHERE id = p_call FOR UPDATE;
    END IF;
    IF c.id IS NOT NULL THEN
        IF c.granted_seconds IS DISTINCT FROM p_granted THEN
            outcome := 'stale';
            RETURN;
        END IF;
        IF p_lapsed_only AND c.lease_until >= now() THEN
            outcome := 'renewed';
            RETURN;
        END IF;
    END IF;
    IF p_cdr IS NOT NULL THEN
        v_tenant := (p_cdr->>'tenant_id')::bigint;
        IF v_tenant IS NULL AND p_account_code <> '' THEN
            SELECT tenant_id INTO v_tenant FROM extensions WHERE account_code = p_account_code;
        END IF;
        IF v_tenant IS NOT NULL THEN
            SELECT t.external_ref, d.path INTO v_ref, v_path
              FROM tenants t JOIN dealers d ON d.id = t.dealer_id WHERE t.id = v_tenant;
            p_cdr := p_cdr || jsonb_build_object('tenant_id', v_tenant,
                                                 'external_ref', coalesce(v_ref, ''));
            IF NOT p_cdr ? 'dealer_path' AND v_path IS NOT NULL THEN
                p_cdr := p_cdr || jsonb_build_object('dealer_path', to_jsonb(v_path));
            END IF;
        END IF;
        INSERT INTO cdrs (node_id, uniqueid, sequence, call_id, direction, tenant_id,
                          extension_id, dealer_path, external_ref, caller, callee, call_class,
                          carrier_id, started_at, answered_at, ended_at, duration,
                          talk_seconds, billed_seconds, rate_prefix, price_per_minute, price,
                          disposition, hangup_cause, refusal, sip_code)
        SELECT r.node_id, r.uniqueid, r.sequence, r.call_id, r.direction, r.tenant_id,
               r.extension_id, coalesce(r.dealer_path, '{}'), coalesce(r.external_ref, ''),
               coalesce(r.caller, ''), coalesce(r.callee, ''), r.call_class, r.carrier_id,
               r.started_at, r.answered_at, r.ended_at, r.duration, r.talk_seconds,
               r.billed_seconds, r.rate_prefix, r.price_per_minute, r.price, r.disposition,
               coalesce(r.hangup_cause, ''), r.refusal, r.sip_code
          FROM jsonb_populate_record(NULL::cdrs, p_cdr) AS r
        ON CONFLICT DO NOTHING;
        stored := FOUND;
    END IF;
    IF c.id IS NULL THEN
        outcome := 'no_call';
        RETURN;
    END IF;
    IF c.account_id IS NOT NULL THEN
        UPDATE credit_accounts SET balance = balance - p_price, reserved = reserved - c.reserved,
               updated_at = now()
         WHERE id = c.account_id RETURNING balance INTO new_balance;
        IF p_price <> 0 AND new_balance IS NOT NULL THEN
            INSERT INTO credit_movements (account_id, amount, balance, reason, call_id)
            VALUES (c.account_id, -p_price, new_balance, 'call', c.id);
        END IF;
    END IF;
    DELETE FROM calls WHERE id = c.id;
    -- the shared counters last, so their locks are held the shortest time
    PERFORM release_call_slots(c.dealer_path, c.tenant_id, c.extension_id);
    outcome := 'settled';
END $$;
