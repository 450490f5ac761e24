-- Foundation: nodes, dealer tree, tenants, extensions, numbering, plans, OAuth2, audit.
-- Business rules live here as constraints and triggers so no writer can bypass them.

CREATE TYPE dealer_level AS ENUM ('operator', 'distributor', 'sub_distributor', 'reseller');
CREATE TYPE billing_mode AS ENUM ('prepaid', 'postpaid');
CREATE TYPE tenant_status AS ENUM ('active', 'suspended', 'cancelled');
CREATE TYPE node_status AS ENUM ('unknown', 'online', 'offline', 'maintenance');

CREATE FUNCTION dealer_level_rank(l dealer_level) RETURNS int
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE l WHEN 'operator' THEN 0 WHEN 'distributor' THEN 1
                  WHEN 'sub_distributor' THEN 2 ELSE 3 END
$$;

CREATE TABLE nodes (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    sip_address   text NOT NULL,
    ami_host      text NOT NULL,
    ami_port      integer NOT NULL DEFAULT 5038 CHECK (ami_port BETWEEN 1 AND 65535),
    ami_username  text NOT NULL,
    ami_secret    text NOT NULL,
    ari_url       text NOT NULL,
    ari_username  text NOT NULL,
    ari_password  text NOT NULL,
    status        node_status NOT NULL DEFAULT 'unknown',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dealers (
    id                    bigserial PRIMARY KEY,
    parent_id             bigint REFERENCES dealers(id) ON DELETE RESTRICT,
    -- ids from the root down to this dealer, itself included; set by trigger, immutable.
    path                  bigint[] NOT NULL DEFAULT '{}',
    level                 dealer_level NOT NULL,
    name                  text NOT NULL,
    login                 text NOT NULL UNIQUE,
    password_hash         text NOT NULL,
    active                boolean NOT NULL DEFAULT true,
    brand_name            text,
    logo                  bytea,
    logo_mime             text CHECK (logo_mime IN ('image/png', 'image/svg+xml', 'image/jpeg')),
    portal_domain         text,
    portal_url            text,
    registration_address  text,
    node_id               bigint REFERENCES nodes(id) ON DELETE RESTRICT,
    max_tenants           integer CHECK (max_tenants >= 0),
    max_extensions        integer CHECK (max_extensions >= 0),
    max_calls             integer CHECK (max_calls >= 0),
    -- tenants (not cancelled) and extensions in this dealer's whole subtree
    tenant_count          integer NOT NULL DEFAULT 0,
    extension_count       integer NOT NULL DEFAULT 0,
    billing_mode          billing_mode NOT NULL DEFAULT 'prepaid',
    balance               numeric(14, 4) NOT NULL DEFAULT 0,
    credit_limit          numeric(14, 4) NOT NULL DEFAULT 0 CHECK (credit_limit >= 0),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dealer_root_is_operator CHECK ((parent_id IS NULL) = (level = 'operator')),
    CONSTRAINT dealer_tenant_cap CHECK (max_tenants IS NULL OR tenant_count <= max_tenants),
    CONSTRAINT dealer_extension_cap CHECK (max_extensions IS NULL OR extension_count <= max_extensions),
    CONSTRAINT dealer_balance_floor CHECK (
        balance >= CASE billing_mode WHEN 'postpaid' THEN -credit_limit ELSE 0 END),
    CONSTRAINT dealer_logo_pair CHECK ((logo IS NULL) = (logo_mime IS NULL)),
    CONSTRAINT dealer_logo_size CHECK (logo IS NULL OR octet_length(logo) <= 524288)
);
CREATE UNIQUE INDEX dealers_one_operator ON dealers ((true)) WHERE level = 'operator';
CREATE INDEX dealers_path ON dealers USING gin (path);
CREATE INDEX dealers_parent ON dealers (parent_id);
CREATE UNIQUE INDEX dealers_portal_domain ON dealers (lower(portal_domain)) WHERE portal_domain IS NOT NULL;

-- Level rules (PortSIP dealers): a dealer only creates levels strictly below its own.
-- Caps: a child's caps never exceed its parent's; a cap left empty inherits the parent's.
CREATE FUNCTION dealers_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    p dealers%ROWTYPE;
    child record;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.parent_id IS DISTINCT FROM OLD.parent_id OR NEW.level <> OLD.level THEN
            RAISE EXCEPTION 'a dealer''s parent and level cannot change'
                USING ERRCODE = 'check_violation', CONSTRAINT = 'dealer_immutable_position';
        END IF;
        NEW.path := OLD.path;
        -- Subtree counters move on every tenant and extension write: keep that path cheap.
        IF (NEW.max_tenants, NEW.max_extensions, NEW.max_calls)
           IS NOT DISTINCT FROM (OLD.max_tenants, OLD.max_extensions, OLD.max_calls) THEN
            IF (NEW.tenant_count, NEW.extension_count) IS NOT DISTINCT FROM
               (OLD.tenant_count, OLD.extension_count) THEN
                NEW.updated_at := now();
            END IF;
            RETURN NEW;
        END IF;
        NEW.updated_at := now();
    END IF;
    IF NEW.parent_id IS NOT NULL THEN
        SELECT * INTO p FROM dealers WHERE id = NEW.parent_id;
        IF TG_OP = 'INSERT' THEN
            IF dealer_level_rank(NEW.level) <= dealer_level_rank(p.level) THEN
                RAISE EXCEPTION 'a % cannot create a %', p.level, NEW.level
                    USING ERRCODE = 'check_violation', CONSTRAINT = 'dealer_level_rule';
            END IF;
            NEW.path := p.path || NEW.id;
            NEW.max_tenants := COALESCE(NEW.max_tenants, p.max_tenants);
            NEW.max_extensions := COALESCE(NEW.max_extensions, p.max_extensions);
            NEW.max_calls := COALESCE(NEW.max_calls, p.max_calls);
            NEW.node_id := COALESCE(NEW.node_id, p.node_id);
        END IF;
        IF (p.max_tenants IS NOT NULL AND (NEW.max_tenants IS NULL OR NEW.max_tenants > p.max_tenants))
           OR (p.max_extensions IS NOT NULL AND (NEW.max_extensions IS NULL OR NEW.max_extensions > p.max_extensions))
           OR (p.max_calls IS NOT NULL AND (NEW.max_calls IS NULL OR NEW.max_calls > p.max_calls)) THEN
            RAISE EXCEPTION 'a dealer''s caps cannot exceed its parent''s (max_tenants %, max_extensions %, max_calls %)',
                p.max_tenants, p.max_extensions, p.max_calls
                USING ERRCODE = 'check_violation', CONSTRAINT = 'dealer_caps_within_parent';
        END IF;
    ELSIF TG_OP = 'INSERT' THEN
        NEW.path := ARRAY[NEW.id];
    END IF;
    IF TG_OP = 'UPDATE' THEN
        SELECT max(max_tenants) AS mt, bool_or(max_tenants IS NULL) AS mt_null,
               max(max_extensions) AS me, bool_or(max_extensions IS NULL) AS me_null,
               max(max_calls) AS mc, bool_or(max_calls IS NULL) AS mc_null
          INTO child FROM dealers WHERE parent_id = NEW.id;
        IF (NEW.max_tenants IS NOT NULL AND (child.mt > NEW.max_tenants OR child.mt_null))
           OR (NEW.max_extensions IS NOT NULL AND (child.me > NEW.max_extensions OR child.me_null))
           OR (NEW.max_calls IS NOT NULL AND (child.mc > NEW.max_calls OR child.mc_null)) THEN
            RAISE EXCEPTION 'a child dealer has caps above the new values; lower the children first'
                USING ERRCODE = 'check_violation', CONSTRAINT = 'dealer_caps_above_children';
        END IF;
        IF EXISTS (SELECT 1 FROM tenants t WHERE t.dealer_id = NEW.id AND
                   ((NEW.max_extensions IS NOT NULL AND t.max_extensions > NEW.max_extensions)
                    OR (NEW.max_calls IS NOT NULL AND t.max_calls > NEW.max_calls))) THEN
            RAISE EXCEPTION 'a tenant has caps above the new values; lower the tenants first'
                USING ERRCODE = 'check_violation', CONSTRAINT = 'dealer_caps_above_tenants';
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER dealers_before_write BEFORE INSERT OR UPDATE ON dealers
    FOR EACH ROW EXECUTE FUNCTION dealers_before_write();

CREATE TABLE plans (
    id          bigserial PRIMARY KEY,
    dealer_id   bigint NOT NULL REFERENCES dealers(id) ON DELETE RESTRICT,
    name        text NOT NULL,
    kind        text NOT NULL DEFAULT 'national' CHECK (kind IN ('national', 'international')),
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (dealer_id, name)
);

CREATE TABLE tenants (
    id              bigserial PRIMARY KEY,
    dealer_id       bigint NOT NULL REFERENCES dealers(id) ON DELETE RESTRICT,
    name            text NOT NULL,
    external_ref    text NOT NULL DEFAULT '',
    country         char(2) NOT NULL DEFAULT 'BR',
    notes           text NOT NULL DEFAULT '',
    product_type    text NOT NULL DEFAULT 'standard',
    trial           boolean NOT NULL DEFAULT false,
    internal        boolean NOT NULL DEFAULT false,
    sip_domain      text NOT NULL,
    node_id         bigint REFERENCES nodes(id) ON DELETE RESTRICT,
    max_extensions  integer CHECK (max_extensions >= 0),
    max_calls       integer CHECK (max_calls >= 0),
    extension_count integer NOT NULL DEFAULT 0,
    status          tenant_status NOT NULL DEFAULT 'active',
    cancelled_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tenant_extension_cap CHECK (max_extensions IS NULL OR extension_count <= max_extensions)
);
CREATE UNIQUE INDEX tenants_sip_domain ON tenants (lower(sip_domain));
CREATE INDEX tenants_dealer ON tenants (dealer_id);

-- A tenant lives on its dealer's node, inside its dealer's caps, and counts toward every
-- ancestor's tenant cap until it is cancelled. A cancelled tenant stays cancelled.
CREATE FUNCTION tenants_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    d dealers%ROWTYPE;
BEGIN
    SELECT * INTO d FROM dealers WHERE id = NEW.dealer_id;
    IF TG_OP = 'UPDATE' THEN
        IF NEW.dealer_id <> OLD.dealer_id THEN
            RAISE EXCEPTION 'a tenant cannot move to another dealer'
                USING ERRCODE = 'check_violation', CONSTRAINT = 'tenant_immutable_dealer';
        END IF;
        IF OLD.status = 'cancelled' AND NEW.status <> 'cancelled' THEN
            RAISE EXCEPTION 'a cancelled tenant cannot be reactivated'
                USING ERRCODE = 'check_violation', CONSTRAINT = 'tenant_cancel_final';
        END IF;
        NEW.updated_at := now();
    ELSE
        NEW.node_id := d.node_id;
        NEW.max_extensions := COALESCE(NEW.max_extensions, d.max_extensions);
        NEW.max_calls := COALESCE(NEW.max_calls, d.max_calls);
    END IF;
    IF (d.max_extensions IS NOT NULL AND (NEW.max_extensions IS NULL OR NEW.max_extensions > d.max_extensions))
       OR (d.max_calls IS NOT NULL AND (NEW.max_calls IS NULL OR NEW.max_calls > d.max_calls)) THEN
        RAISE EXCEPTION 'a tenant''s caps cannot exceed its dealer''s (max_extensions %, max_calls %)',
            d.max_extensions, d.max_calls
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tenant_caps_within_dealer';
    END IF;
    IF NEW.status = 'cancelled' AND NEW.cancelled_at IS NULL THEN
        NEW.cancelled_at := now();
    END IF;
    IF TG_OP = 'INSERT' AND NEW.status <> 'cancelled' THEN
        UPDATE dealers SET tenant_count = tenant_count + 1 WHERE id = ANY (d.path);
    ELSIF TG_OP = 'UPDATE' AND NEW.status = 'cancelled' AND OLD.status <> 'cancelled' THEN
        UPDATE dealers SET tenant_count = tenant_count - 1 WHERE id = ANY (d.path);
        -- Contract cancellation deactivates every extension in the same transaction.
        UPDATE extensions SET active = false WHERE tenant_id = NEW.id AND active;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER tenants_before_write BEFORE INSERT OR UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION tenants_before_write();

CREATE FUNCTION tenants_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE dealers
       SET tenant_count = tenant_count - (CASE WHEN OLD.status <> 'cancelled' THEN 1 ELSE 0 END),
           extension_count = extension_count - OLD.extension_count
     WHERE id = ANY ((SELECT path FROM dealers WHERE id = OLD.dealer_id)::bigint[]);
    RETURN OLD;
END $$;
CREATE TRIGGER tenants_after_delete AFTER DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION tenants_after_delete();

CREATE TABLE extensions (
    id                  bigserial PRIMARY KEY,
    tenant_id           bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    number              text NOT NULL CHECK (number ~ '^[0-9]{2,8}$'),
    name                text NOT NULL DEFAULT '',
    account_code        char(6) NOT NULL UNIQUE CHECK (account_code ~ '^[0-9]{6}$'),
    sip_password        text NOT NULL CHECK (length(sip_password) BETWEEN 8 AND 64),
    active              boolean NOT NULL DEFAULT true,
    max_calls           integer CHECK (max_calls >= 0),
    callerid_enabled    boolean NOT NULL DEFAULT false,
    callerid_number     text CHECK (callerid_number ~ '^\+?[0-9]{2,20}$'),
    billing_type        billing_mode NOT NULL DEFAULT 'prepaid',
    credit_limit        numeric(14, 4) NOT NULL DEFAULT 0 CHECK (credit_limit >= 0),
    plan_id             bigint REFERENCES plans(id) ON DELETE RESTRICT,
    intl_plan_id        bigint REFERENCES plans(id) ON DELETE RESTRICT,
    invoice_day         smallint NOT NULL DEFAULT 1 CHECK (invoice_day BETWEEN 1 AND 28),
    allow_local         boolean NOT NULL DEFAULT true,
    allow_national      boolean NOT NULL DEFAULT true,
    allow_international boolean NOT NULL DEFAULT false,
    allow_vc1           boolean NOT NULL DEFAULT true,
    allow_vc2           boolean NOT NULL DEFAULT true,
    allow_vc3           boolean NOT NULL DEFAULT true,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, number)
);

-- An extension fits its tenant's caps, counts toward the tenant's and every dealer
-- ancestor's extension cap, and cannot be active in a tenant that is not active.
CREATE FUNCTION extensions_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    t tenants%ROWTYPE;
BEGIN
    SELECT * INTO t FROM tenants WHERE id = NEW.tenant_id;
    IF TG_OP = 'UPDATE' THEN
        IF NEW.tenant_id <> OLD.tenant_id THEN
            RAISE EXCEPTION 'an extension cannot move to another tenant'
                USING ERRCODE = 'check_violation', CONSTRAINT = 'extension_immutable_tenant';
        END IF;
        NEW.updated_at := now();
    ELSE
        NEW.max_calls := COALESCE(NEW.max_calls, t.max_calls);
        IF t.status = 'cancelled' THEN
            RAISE EXCEPTION 'tenant % is cancelled', t.id
                USING ERRCODE = 'check_violation', CONSTRAINT = 'extension_tenant_cancelled';
        END IF;
        UPDATE tenants SET extension_count = extension_count + 1 WHERE id = t.id;
        UPDATE dealers SET extension_count = extension_count + 1
         WHERE id = ANY ((SELECT path FROM dealers WHERE id = t.dealer_id)::bigint[]);
    END IF;
    IF NEW.active AND t.status = 'cancelled' THEN
        RAISE EXCEPTION 'tenant % is cancelled: its extensions cannot be activated', t.id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'extension_tenant_cancelled';
    END IF;
    IF t.max_calls IS NOT NULL AND (NEW.max_calls IS NULL OR NEW.max_calls > t.max_calls) THEN
        RAISE EXCEPTION 'an extension''s max_calls cannot exceed its tenant''s (%)', t.max_calls
            USING ERRCODE = 'check_violation', CONSTRAINT = 'extension_calls_within_tenant';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER extensions_before_write BEFORE INSERT OR UPDATE ON extensions
    FOR EACH ROW EXECUTE FUNCTION extensions_before_write();

CREATE FUNCTION extensions_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    dealer_path bigint[];
BEGIN
    SELECT d.path INTO dealer_path FROM tenants t JOIN dealers d ON d.id = t.dealer_id
     WHERE t.id = OLD.tenant_id;
    -- When the tenant itself is being deleted, its trigger settles the counters at once.
    IF FOUND THEN
        UPDATE tenants SET extension_count = extension_count - 1 WHERE id = OLD.tenant_id;
        UPDATE dealers SET extension_count = extension_count - 1 WHERE id = ANY (dealer_path);
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER extensions_after_delete AFTER DELETE ON extensions
    FOR EACH ROW EXECUTE FUNCTION extensions_after_delete();

-- Lowering a tenant's caps below what its extensions use is refused.
CREATE FUNCTION tenants_check_extension_caps() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.max_calls IS NOT NULL AND EXISTS (
        SELECT 1 FROM extensions e WHERE e.tenant_id = NEW.id AND e.max_calls > NEW.max_calls) THEN
        RAISE EXCEPTION 'an extension has max_calls above the new value; lower the extensions first'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tenant_caps_above_extensions';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER tenants_check_extension_caps AFTER UPDATE OF max_calls ON tenants
    FOR EACH ROW EXECUTE FUNCTION tenants_check_extension_caps();

CREATE TABLE number_ranges (
    id            bigserial PRIMARY KEY,
    dealer_id     bigint NOT NULL REFERENCES dealers(id) ON DELETE RESTRICT,
    name          text NOT NULL,
    country_code  text NOT NULL CHECK (country_code ~ '^[1-9][0-9]{0,2}$'),
    area_code     text NOT NULL CHECK (area_code ~ '^[0-9]{0,5}$'),
    first_number  bigint NOT NULL CHECK (first_number >= 0),
    last_number   bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT range_order CHECK (last_number >= first_number),
    CONSTRAINT range_size CHECK (last_number - first_number < 100000)
);

CREATE TABLE dids (
    id            bigserial PRIMARY KEY,
    range_id      bigint NOT NULL REFERENCES number_ranges(id) ON DELETE RESTRICT,
    -- local number inside the range; e164 is country + area + local
    local_number  bigint NOT NULL,
    e164          text NOT NULL UNIQUE,
    extension_id  bigint REFERENCES extensions(id) ON DELETE SET NULL,
    monthly_value numeric(12, 2) NOT NULL DEFAULT 0 CHECK (monthly_value >= 0),
    collect_calls boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (range_id, local_number)
);
CREATE INDEX dids_extension ON dids (extension_id);

CREATE FUNCTION dids_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r number_ranges%ROWTYPE;
BEGIN
    SELECT * INTO r FROM number_ranges WHERE id = NEW.range_id;
    IF NEW.local_number < r.first_number OR NEW.local_number > r.last_number THEN
        RAISE EXCEPTION 'number % is outside range % (% to %)', NEW.local_number, r.name,
            r.first_number, r.last_number
            USING ERRCODE = 'check_violation', CONSTRAINT = 'did_within_range';
    END IF;
    NEW.e164 := '+' || r.country_code || r.area_code || NEW.local_number::text;
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER dids_before_write BEFORE INSERT OR UPDATE ON dids
    FOR EACH ROW EXECUTE FUNCTION dids_before_write();

-- A range cannot shrink away from DIDs already taken from it.
CREATE FUNCTION number_ranges_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM dids WHERE range_id = NEW.id
               AND (local_number < NEW.first_number OR local_number > NEW.last_number)) THEN
        RAISE EXCEPTION 'DIDs in use lie outside the new bounds'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'range_covers_dids';
    END IF;
    IF (NEW.country_code, NEW.area_code) IS DISTINCT FROM (OLD.country_code, OLD.area_code)
       AND EXISTS (SELECT 1 FROM dids WHERE range_id = NEW.id) THEN
        RAISE EXCEPTION 'country and area code cannot change while DIDs are in use'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'range_prefix_in_use';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER number_ranges_before_update BEFORE UPDATE ON number_ranges
    FOR EACH ROW EXECUTE FUNCTION number_ranges_before_update();

CREATE TABLE api_clients (
    id             bigserial PRIMARY KEY,
    client_id      text NOT NULL UNIQUE,
    secret_hash    text NOT NULL,
    dealer_id      bigint NOT NULL REFERENCES dealers(id) ON DELETE CASCADE,
    name           text NOT NULL,
    email          text NOT NULL DEFAULT '',
    allowed_cidrs  cidr[] NOT NULL CHECK (cardinality(allowed_cidrs) > 0),
    revoked_at     timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_clients_dealer ON api_clients (dealer_id);

CREATE TABLE oauth_tokens (
    id                  bigserial PRIMARY KEY,
    access_hash         bytea NOT NULL UNIQUE,
    refresh_hash        bytea UNIQUE,
    client_pk           bigint NOT NULL REFERENCES api_clients(id) ON DELETE CASCADE,
    dealer_id           bigint NOT NULL REFERENCES dealers(id) ON DELETE CASCADE,
    -- set on impersonation tokens: the descendant the principal acts as
    acting_as_id        bigint REFERENCES dealers(id) ON DELETE CASCADE,
    scope               text NOT NULL DEFAULT '',
    expires_at          timestamptz NOT NULL,
    refresh_expires_at  timestamptz,
    revoked_at          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX oauth_tokens_client ON oauth_tokens (client_pk);
CREATE INDEX oauth_tokens_expiry ON oauth_tokens (refresh_expires_at);

CREATE TABLE audit_log (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    actor_id       bigint REFERENCES dealers(id) ON DELETE SET NULL,
    acting_as_id   bigint REFERENCES dealers(id) ON DELETE SET NULL,
    client_id      text,
    source_ip      inet,
    action         text NOT NULL,
    entity         text NOT NULL,
    entity_id      text NOT NULL,
    -- path of the dealer that owns the changed object; drives who may read the entry
    scope_path     bigint[] NOT NULL,
    before         jsonb,
    after          jsonb
);
CREATE INDEX audit_scope ON audit_log USING gin (scope_path);
CREATE INDEX audit_entity ON audit_log (entity, entity_id);
