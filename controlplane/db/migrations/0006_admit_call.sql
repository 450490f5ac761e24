-- Admission as one statement. The counters of capped levels are the platform's hottest rows
-- (every call of a reseller takes its reseller's); a transaction driven from the client
-- holds their locks across several network round trips, and at a few hundred calls a
-- second calls queue behind each other. One function call, committed as it returns, holds
-- them for the function's own run time. A refusal raises, so whatever was taken before it
-- is undone with the statement.
--
-- p_seconds/p_amounts: the grants the caller may get, longest first, and the credit each
-- needs (computed from the rate by the client); empty: the call is not limited.
-- Raises SQLSTATE 'PX001' with message 'full:<kind>:<id>' or 'PX002' 'no_credit'.

CREATE FUNCTION admit_call(p_id uuid, p_node bigint, p_channel text, p_channel_name text,
                           p_direction text, p_extension bigint, p_tenant bigint,
                           p_path bigint[], p_caller text, p_callee text, p_class text,
                           p_carrier bigint, p_rate jsonb, p_account_extension bigint,
                           p_floor numeric, p_seconds integer[], p_amounts numeric[],
                           p_lease double precision)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    full_level text;
    account credit_accounts%ROWTYPE;
    grant_seconds integer;
    held numeric := 0;
    i integer;
BEGIN
    IF cardinality(p_seconds) > 0 THEN
        -- the paying account first: its lock is per account, not shared by the whole tree
        IF p_account_extension IS NULL THEN
            INSERT INTO credit_accounts (tenant_id) VALUES (p_tenant)
            ON CONFLICT (tenant_id) WHERE extension_id IS NULL
            DO UPDATE SET updated_at = credit_accounts.updated_at
            RETURNING * INTO account;
        ELSE
            INSERT INTO credit_accounts (tenant_id, extension_id) VALUES (p_tenant, p_account_extension)
            ON CONFLICT (extension_id) DO UPDATE SET updated_at = credit_accounts.updated_at
            RETURNING * INTO account;
        END IF;
        FOR i IN 1 .. cardinality(p_seconds) LOOP
            IF p_amounts[i] <= account.balance - account.reserved - p_floor THEN
                grant_seconds := p_seconds[i];
                held := p_amounts[i];
                EXIT;
            END IF;
        END LOOP;
        IF grant_seconds IS NULL THEN
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
            grant_seconds, now() + make_interval(secs => p_lease));
    -- the shared counters last, so their locks are held the shortest time
    full_level := take_call_slots(p_path, p_tenant, p_extension);
    IF full_level IS NOT NULL THEN
        RAISE EXCEPTION 'full:%', full_level USING ERRCODE = 'PX001';
    END IF;
    RETURN grant_seconds;
END $$;

-- Giving slots back takes the counters in the same order as taking them (root first, then
-- the tenant, then the extension), so a release and an admission never wait on each other
-- in a cycle.
CREATE OR REPLACE FUNCTION release_call_slots(path bigint[], tenant bigint, ext bigint)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    level record;
BEGIN
    FOR level IN
        SELECT 'd'::char AS kind, p.id, p.ord FROM unnest(path) WITH ORDINALITY AS p(id, ord)
        UNION ALL SELECT 't', tenant, 1000
        UNION ALL SELECT 'e', ext, 1001 WHERE ext IS NOT NULL
        ORDER BY ord
    LOOP
        UPDATE call_counters SET active = active - 1
         WHERE kind = level.kind AND id = level.id AND active > 0;
    END LOOP;
END $$;
