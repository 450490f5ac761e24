-- admit_call_checked (0010) in one body: the check of the parties, the admission of
-- admit_call (0010) and take_call_slots (0005), and the durability barrier of
-- admit_call_durably (0008), without calling through three more layers of functions and
-- procedures (about 0.05 ms of the database per admission, in a loop of admissions on one
-- connection). What each step does, and why in that order, is said where it was
-- introduced: the paying account first (0006, 0010), the shared counters last, root
-- dealer first (0005, 0006), the admission committed without waiting for the disk and a
-- synchronous commit after it (0008).
--
-- The counters stay one UPDATE per capped level, each with its cap in its WHERE. Locking
-- them all first (SELECT ... ORDER BY ... FOR UPDATE) and moving them with one UPDATE
-- took fewer statements but longer: the UPDATE over an array was planned again at most
-- executions while the locks were held, and at 500 admissions a second the locking
-- statement alone cost more than the four UPDATEs.
CREATE OR REPLACE PROCEDURE admit_call_checked(p_kinds text[], p_keys text[],
                                               p_tenants bigint[], p_facts text[], p_id uuid,
                                               p_node bigint, p_channel text,
                                               p_channel_name text, p_direction text,
                                               p_extension bigint, p_tenant bigint,
                                               p_path bigint[], p_caller text, p_callee text,
                                               p_class text, p_carrier bigint, p_rate jsonb,
                                               p_account_extension bigint, p_floor numeric,
                                               p_seconds integer[], p_amounts numeric[],
                                               p_lease double precision,
                                               INOUT p_grant integer DEFAULT NULL,
                                               INOUT p_stale boolean DEFAULT false)
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    account credit_accounts%ROWTYPE;
    held numeric := 0;
    level record;
    taken integer;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_kinds), 0) LOOP
        IF call_party_facts(p_kinds[i], p_keys[i], p_tenants[i])
                IS DISTINCT FROM p_facts[i] THEN
            p_stale := true;
            RETURN;
        END IF;
    END LOOP;
    PERFORM set_config('synchronous_commit', 'off', true);
    IF cardinality(p_seconds) > 0 THEN
        IF p_account_extension IS NULL THEN
            SELECT * INTO account FROM credit_accounts
             WHERE tenant_id = p_tenant AND extension_id IS NULL FOR UPDATE;
        ELSE
            SELECT * INTO account FROM credit_accounts
             WHERE extension_id = p_account_extension FOR UPDATE;
        END IF;
        IF NOT FOUND THEN  -- the account's first call
            IF p_account_extension IS NULL THEN
                INSERT INTO credit_accounts (tenant_id) VALUES (p_tenant)
                ON CONFLICT (tenant_id) WHERE extension_id IS NULL
                DO UPDATE SET updated_at = credit_accounts.updated_at
                RETURNING * INTO account;
            ELSE
                INSERT INTO credit_accounts (tenant_id, extension_id)
                VALUES (p_tenant, p_account_extension)
                ON CONFLICT (extension_id) DO UPDATE SET updated_at = credit_accounts.updated_at
                RETURNING * INTO account;
            END IF;
        END IF;
        FOR i IN 1 .. cardinality(p_seconds) LOOP
            IF p_amounts[i] <= account.balance - account.reserved - p_floor THEN
                p_grant := p_seconds[i];
                held := p_amounts[i];
                EXIT;
            END IF;
        END LOOP;
        IF p_grant IS NULL THEN
            RAISE EXCEPTION 'no_credit' USING ERRCODE = 'PX002';
        END IF;
        UPDATE credit_accounts SET reserved = reserved + held, updated_at = now()
         WHERE id = account.id;
    END IF;
    INSERT INTO calls (id, node_id, channel, channel_name, direction, extension_id, tenant_id,
                       dealer_path, caller, callee, call_class, carrier_id, account_id, rate,
                       reserved, granted_seconds, lease_until)
    VALUES (p_id, p_node, p_channel, p_channel_name, p_direction, p_extension, p_tenant,
            p_path, p_caller, p_callee, p_class, p_carrier, account.id, p_rate, held,
            p_grant, now() + make_interval(secs => p_lease));
    -- the shared counters last, so their locks are held the shortest time
    FOR level IN
        SELECT 'd'::char AS kind, p.id, d.max_calls AS cap, p.ord
          FROM unnest(p_path) WITH ORDINALITY AS p(id, ord) JOIN dealers d ON d.id = p.id
         WHERE d.max_calls IS NOT NULL
        UNION ALL
        SELECT 't', t.id, t.max_calls, 1000 FROM tenants t
         WHERE t.id = p_tenant AND t.max_calls IS NOT NULL
        UNION ALL
        SELECT 'e', e.id, e.max_calls, 1001 FROM extensions e
         WHERE e.id = p_extension AND e.max_calls IS NOT NULL
        ORDER BY ord
    LOOP
        UPDATE call_counters SET active = active + 1
         WHERE kind = level.kind AND id = level.id AND active < level.cap
        RETURNING active INTO taken;
        IF taken IS NULL THEN
            RAISE EXCEPTION 'full:%', level.kind || ':' || level.id USING ERRCODE = 'PX001';
        END IF;
    END LOOP;
    COMMIT;
    -- a transaction of its own, committed synchronously as the CALL ends: it flushes the
    -- WAL past the admission before the agent hears the answer
    PERFORM pg_current_xact_id();
END $$;

-- Nothing else calls the layers the admission no longer goes through.
DROP PROCEDURE admit_call_durably(uuid, bigint, text, text, text, bigint, bigint, bigint[], text,
                                  text, text, bigint, jsonb, bigint, numeric, integer[],
                                  numeric[], double precision, integer);
DROP FUNCTION admit_call(uuid, bigint, text, text, text, bigint, bigint, bigint[], text, text,
                         text, bigint, jsonb, bigint, numeric, integer[], numeric[],
                         double precision);
DROP FUNCTION take_call_slots(bigint[], bigint, bigint);
