-- One round trip per decision.
--
-- The agent keeps the parties of recent calls (caller, callee, a DID's owner) with a digest
-- of what it read, their "facts". A decision taken from a kept party is admitted only if
-- the party still reads the same: admit_call_checked compares the digests in the same
-- transaction as the admission, and answers "stale" without admitting anything when one
-- moved, so that the agent reads the party again and decides anew.

-- admit_call (0006), its paying account locked rather than upserted (see there).
CREATE OR REPLACE FUNCTION admit_call(p_id uuid, p_node bigint, p_channel text,
                                      p_channel_name text, p_direction text,
                                      p_extension bigint, p_tenant bigint, p_path bigint[],
                                      p_caller text, p_callee text, p_class text,
                                      p_carrier bigint, p_rate jsonb,
                                      p_account_extension bigint, p_floor numeric,
                                      p_seconds integer[], p_amounts numeric[],
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
        -- the paying account first: its lock is per account, not shared by the whole tree.
        -- Locked as it is, not upserted: a row version this transaction wrote would have
        -- the UPDATE below check both its foreign keys again, each a KEY SHARE lock on the
        -- tenant's row that every admission of the tenant also takes (a multixact each).
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

-- Everything a decision reads of an extension: the extension, its tenant and dealer, its
-- plans' rate tables (with the version of their rates, see 0008) and its node's carrier.
CREATE VIEW call_parties AS
SELECT e.id AS extension_id, e.tenant_id, e.number, e.account_code, e.active,
       e.billing_type, e.credit_limit, e.plan_id, e.intl_plan_id, e.allow_local,
       e.allow_national, e.allow_international, e.allow_vc1, e.allow_vc2, e.allow_vc3,
       t.status::text AS tenant_status, t.area_code, t.shared_credit,
       t.billing_mode AS tenant_billing_mode, t.credit_limit AS tenant_credit_limit,
       t.node_id, t.external_ref, d.path AS dealer_path, d.active AS dealer_active,
       pr.id AS plan_rate_table, pr.rates_version AS plan_rates_version,
       ir.id AS intl_rate_table, ir.rates_version AS intl_rates_version,
       c.id AS carrier_id, c.tech_prefix AS carrier_prefix
  FROM extensions e
  JOIN tenants t ON t.id = e.tenant_id
  JOIN dealers d ON d.id = t.dealer_id
  LEFT JOIN LATERAL (SELECT rt.id, rt.rates_version FROM plans pl
                       JOIN rate_tables rt ON rt.id = pl.rate_table_id
                      WHERE pl.id = e.plan_id) AS pr ON true
  LEFT JOIN LATERAL (SELECT rt.id, rt.rates_version FROM plans pl
                       JOIN rate_tables rt ON rt.id = pl.rate_table_id
                      WHERE pl.id = e.intl_plan_id) AS ir ON true
  LEFT JOIN LATERAL (SELECT cr.id, cr.tech_prefix FROM carriers cr
                      WHERE cr.node_id = t.node_id AND cr.active
                      ORDER BY cr.priority, cr.id LIMIT 1) AS c ON true;

-- The digest of a party as the agent's queries compute it (store/calls.py, PARTY_SQL):
-- 'account' by account code, 'did' by the E.164 number it owns, 'number' by extension
-- number within p_tenant. NULL: no such party now.
CREATE FUNCTION call_party_facts(p_kind text, p_key text, p_tenant bigint) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    facts text;
BEGIN
    IF p_kind = 'account' THEN
        -- account_code is char(6): compared as text, its index could not be used
        SELECT md5(p::text) INTO facts FROM call_parties p
         WHERE p.account_code = p_key::bpchar;
    ELSIF p_kind = 'did' THEN
        SELECT md5(p::text) INTO facts FROM call_parties p
         WHERE p.extension_id = (SELECT extension_id FROM dids WHERE e164 = p_key);
    ELSIF p_kind = 'number' THEN
        SELECT md5(p::text) INTO facts FROM call_parties p
         WHERE p.tenant_id = p_tenant AND p.number = p_key;
    ELSE
        RAISE EXCEPTION 'unknown kind of party: %', p_kind;
    END IF;
    RETURN facts;
END $$;

-- admit_call_durably (0008) behind a check of the parties the decision was taken from:
-- p_kinds, p_keys, p_tenants and p_facts say, for each, how it is found and the digest the
-- agent read. p_stale comes back true, and nothing is written, when one of them moved.
CREATE PROCEDURE admit_call_checked(p_kinds text[], p_keys text[], p_tenants bigint[],
                                    p_facts text[], p_id uuid, p_node bigint,
                                    p_channel text, p_channel_name text, p_direction text,
                                    p_extension bigint, p_tenant bigint, p_path bigint[],
                                    p_caller text, p_callee text, p_class text,
                                    p_carrier bigint, p_rate jsonb,
                                    p_account_extension bigint, p_floor numeric,
                                    p_seconds integer[], p_amounts numeric[],
                                    p_lease double precision, INOUT p_grant integer DEFAULT NULL,
                                    INOUT p_stale boolean DEFAULT false)
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_kinds), 0) LOOP
        IF call_party_facts(p_kinds[i], p_keys[i], p_tenants[i])
                IS DISTINCT FROM p_facts[i] THEN
            p_stale := true;
            RETURN;
        END IF;
    END LOOP;
    CALL admit_call_durably(p_id, p_node, p_channel, p_channel_name, p_direction,
                            p_extension, p_tenant, p_path, p_caller, p_callee, p_class,
                            p_carrier, p_rate, p_account_extension, p_floor, p_seconds,
                            p_amounts, p_lease, p_grant);
END $$;
