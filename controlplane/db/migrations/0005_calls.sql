-- Real-time call control: carriers, credit accounts, calls in progress with their leases,
-- simultaneous-call counters for every capped level, and CDRs.
--
-- Admission is one transaction: it locks the counters of the capped levels of the call
-- (dealers root first, then the tenant, then the extension: one order for every call, so
-- two admissions never deadlock), reserves credit on the paying account, and inserts the
-- call with its lease. Finishing a call (from the node's CDR) releases all of it and writes
-- the CDR in one transaction; a call whose lease lapses (node or agent gone) is released the
-- same way by whichever process sweeps first.

-- Carrier trunks of a node: outbound gateway, identified by address for inbound calls.
CREATE TABLE carriers (
    id          bigserial PRIMARY KEY,
    node_id     bigint NOT NULL REFERENCES nodes(id) ON DELETE RESTRICT,
    name        text NOT NULL,
    host        text NOT NULL,
    port        integer NOT NULL DEFAULT 5060 CHECK (port BETWEEN 1 AND 65535),
    transport   text NOT NULL DEFAULT 'udp' CHECK (transport IN ('udp', 'tcp')),
    -- prepended to the E.164 digits sent to the carrier (a technical prefix)
    tech_prefix text NOT NULL DEFAULT '' CHECK (tech_prefix ~ '^[0-9#*]{0,10}$'),
    priority    integer NOT NULL DEFAULT 100 CHECK (priority BETWEEN 0 AND 1000),
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (node_id, name)
);

CREATE FUNCTION notify_carrier_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pbx_changes', json_build_object(
        'kind', 'carrier', 'op', lower(TG_OP),
        'id', CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END,
        'node_id', CASE WHEN TG_OP = 'DELETE' THEN OLD.node_id ELSE NEW.node_id END)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER carriers_notify AFTER INSERT OR UPDATE OR DELETE ON carriers
    FOR EACH ROW EXECUTE FUNCTION notify_carrier_change();

-- Who pays for a tenant's calls, and the caller's area for classification.
ALTER TABLE tenants
    ADD COLUMN area_code     text NOT NULL DEFAULT '11' CHECK (area_code ~ '^[1-9][0-9]$'),
    ADD COLUMN shared_credit boolean NOT NULL DEFAULT false,
    ADD COLUMN billing_mode  billing_mode NOT NULL DEFAULT 'prepaid',
    ADD COLUMN credit_limit  numeric(14, 4) NOT NULL DEFAULT 0 CHECK (credit_limit >= 0);

-- Balances move on every call: they live apart from the extension and tenant rows, whose
-- changes are provisioning events for the nodes. One account per extension, and one per
-- tenant (extension_id NULL) that pays for all its extensions when tenants.shared_credit.
CREATE TABLE credit_accounts (
    id            bigserial PRIMARY KEY,
    tenant_id     bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    extension_id  bigint UNIQUE REFERENCES extensions(id) ON DELETE CASCADE,
    balance       numeric(14, 4) NOT NULL DEFAULT 0,
    -- credit held by calls in progress; never negative
    reserved      numeric(14, 4) NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX credit_accounts_tenant ON credit_accounts (tenant_id)
    WHERE extension_id IS NULL;

CREATE TABLE credit_movements (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES credit_accounts(id) ON DELETE CASCADE,
    amount      numeric(14, 4) NOT NULL,
    balance     numeric(14, 4) NOT NULL,
    reason      text NOT NULL,
    call_id     uuid,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_movements_account ON credit_movements (account_id, id);

-- Simultaneous calls per capped level. A counter exists exactly while its level has a cap:
-- uncapped levels (the operator always) are never locked by admission.
CREATE TABLE call_counters (
    kind    char(1) NOT NULL CHECK (kind IN ('d', 't', 'e')),
    id      bigint NOT NULL,
    active  integer NOT NULL DEFAULT 0 CHECK (active >= 0),
    PRIMARY KEY (kind, id)
);

CREATE TABLE calls (
    id              uuid PRIMARY KEY,
    node_id         bigint NOT NULL REFERENCES nodes(id) ON DELETE RESTRICT,
    channel         text NOT NULL,          -- the caller's channel unique id on the node
    channel_name    text NOT NULL DEFAULT '',
    callee_channel  text,                   -- the answering channel's name, once answered
    direction       text NOT NULL CHECK (direction IN ('internal', 'outbound', 'inbound')),
    extension_id    bigint,                 -- the extension the call counts for
    tenant_id       bigint NOT NULL,
    dealer_path     bigint[] NOT NULL,
    caller          text NOT NULL,
    callee          text NOT NULL,
    call_class      text NOT NULL,
    carrier_id      bigint,
    account_id      bigint REFERENCES credit_accounts(id) ON DELETE SET NULL,
    rate            jsonb,                  -- the rate the call is billed at, as admitted
    reserved        numeric(14, 4) NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    granted_seconds integer,                -- talk time paid for so far; NULL: unlimited
    exhausted       boolean NOT NULL DEFAULT false,  -- no more credit: ends at granted_until
    started_at      timestamptz NOT NULL DEFAULT now(),
    answered_at     timestamptz,
    granted_until   timestamptz,
    lease_until     timestamptz NOT NULL
);
CREATE INDEX calls_node ON calls (node_id);
CREATE INDEX calls_lease ON calls (lease_until);
CREATE INDEX calls_tenant ON calls (tenant_id);
CREATE INDEX calls_extension ON calls (extension_id);
CREATE INDEX calls_dealers ON calls USING gin (dealer_path);
CREATE UNIQUE INDEX calls_channel ON calls (node_id, channel);

-- A cap set where there was none starts its counter at the calls already in progress.
CREATE FUNCTION sync_call_counter(k char, key bigint, cap integer) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF cap IS NULL THEN
        DELETE FROM call_counters WHERE kind = k AND id = key;
    ELSE
        INSERT INTO call_counters (kind, id, active)
        SELECT k, key, count(*) FROM calls c
         WHERE CASE k WHEN 'd' THEN c.dealer_path @> ARRAY[key]
                      WHEN 't' THEN c.tenant_id = key
                      ELSE c.extension_id = key END
        ON CONFLICT (kind, id) DO NOTHING;
    END IF;
END $$;

CREATE FUNCTION call_caps_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.max_calls IS DISTINCT FROM OLD.max_calls THEN
        PERFORM sync_call_counter(CASE TG_TABLE_NAME WHEN 'dealers' THEN 'd'
                                  WHEN 'tenants' THEN 't' ELSE 'e' END, NEW.id, NEW.max_calls);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER dealers_call_caps AFTER INSERT OR UPDATE OF max_calls ON dealers
    FOR EACH ROW EXECUTE FUNCTION call_caps_changed();
CREATE TRIGGER tenants_call_caps AFTER INSERT OR UPDATE OF max_calls ON tenants
    FOR EACH ROW EXECUTE FUNCTION call_caps_changed();
CREATE TRIGGER extensions_call_caps AFTER INSERT OR UPDATE OF max_calls ON extensions
    FOR EACH ROW EXECUTE FUNCTION call_caps_changed();

CREATE FUNCTION call_counters_gone() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM call_counters WHERE kind = CASE TG_TABLE_NAME WHEN 'dealers' THEN 'd'
        WHEN 'tenants' THEN 't' ELSE 'e' END AND id = OLD.id;
    RETURN NULL;
END $$;
CREATE TRIGGER dealers_call_counters_gone AFTER DELETE ON dealers
    FOR EACH ROW EXECUTE FUNCTION call_counters_gone();
CREATE TRIGGER tenants_call_counters_gone AFTER DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION call_counters_gone();
CREATE TRIGGER extensions_call_counters_gone AFTER DELETE ON extensions
    FOR EACH ROW EXECUTE FUNCTION call_counters_gone();

INSERT INTO call_counters (kind, id)
SELECT 'd', id FROM dealers WHERE max_calls IS NOT NULL
UNION ALL SELECT 't', id FROM tenants WHERE max_calls IS NOT NULL
UNION ALL SELECT 'e', id FROM extensions WHERE max_calls IS NOT NULL;

-- Take one slot on every capped level of a call, in the one global order. Returns the
-- level that is full ('d:<id>', 't:<id>', 'e:<id>') or NULL when every level had room.
CREATE FUNCTION take_call_slots(path bigint[], tenant bigint, ext bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    level record;
    taken integer;
BEGIN
    FOR level IN
        SELECT 'd'::char AS kind, p.id, d.max_calls AS cap, p.ord
          FROM unnest(path) WITH ORDINALITY AS p(id, ord) JOIN dealers d ON d.id = p.id
         WHERE d.max_calls IS NOT NULL
        UNION ALL
        SELECT 't', t.id, t.max_calls, 1000 FROM tenants t
         WHERE t.id = tenant AND t.max_calls IS NOT NULL
        UNION ALL
        SELECT 'e', e.id, e.max_calls, 1001 FROM extensions e
         WHERE e.id = ext AND e.max_calls IS NOT NULL
        ORDER BY ord
    LOOP
        UPDATE call_counters SET active = active + 1
         WHERE kind = level.kind AND id = level.id AND active < level.cap
        RETURNING active INTO taken;
        IF taken IS NULL THEN
            RETURN level.kind || ':' || level.id;
        END IF;
    END LOOP;
    RETURN NULL;
END $$;

CREATE FUNCTION release_call_slots(path bigint[], tenant bigint, ext bigint) RETURNS void
LANGUAGE sql AS $$
    UPDATE call_counters SET active = active - 1
     WHERE active > 0 AND ((kind = 'd' AND id = ANY (path)) OR (kind = 't' AND id = tenant)
                           OR (kind = 'e' AND id = ext));
$$;

CREATE TABLE cdrs (
    id               bigserial PRIMARY KEY,
    node_id          bigint NOT NULL REFERENCES nodes(id) ON DELETE RESTRICT,
    -- the node's CDR identity: its lines are imported at least once, stored exactly once
    uniqueid         text NOT NULL,
    sequence         integer NOT NULL DEFAULT 0,
    call_id          uuid,
    direction        text,
    tenant_id        bigint,
    extension_id     bigint,
    dealer_path      bigint[] NOT NULL DEFAULT '{}',
    external_ref     text NOT NULL DEFAULT '',
    caller           text NOT NULL DEFAULT '',
    callee           text NOT NULL DEFAULT '',
    call_class       text,
    carrier_id       bigint,
    started_at       timestamptz NOT NULL,
    answered_at      timestamptz,
    ended_at         timestamptz NOT NULL,
    duration         numeric(12, 3) NOT NULL DEFAULT 0,
    talk_seconds     numeric(12, 3) NOT NULL DEFAULT 0,
    billed_seconds   integer NOT NULL DEFAULT 0,
    rate_prefix      text,
    price_per_minute numeric(12, 6),
    price            numeric(14, 4) NOT NULL DEFAULT 0,
    disposition      text NOT NULL DEFAULT '',
    hangup_cause     text NOT NULL DEFAULT '',
    refusal          text,
    sip_code         integer,
    imported_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (node_id, uniqueid, sequence)
);
-- one CDR a call, whatever number of node lines it left (one per device it rang)
CREATE UNIQUE INDEX cdrs_call ON cdrs (call_id) WHERE call_id IS NOT NULL;
CREATE INDEX cdrs_started ON cdrs (started_at, id);
CREATE INDEX cdrs_tenant ON cdrs (tenant_id, started_at);
CREATE INDEX cdrs_extension ON cdrs (extension_id, started_at);
CREATE INDEX cdrs_dealers ON cdrs USING gin (dealer_path);

-- Where the import of each node's CDR file stands (the file only grows).
CREATE TABLE cdr_import_state (
    node_id   bigint PRIMARY KEY REFERENCES nodes(id) ON DELETE CASCADE,
    file_id   text NOT NULL,            -- device:inode of the file, to notice a new file
    offset_   bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
