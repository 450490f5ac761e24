-- Subtree counters that scale, and notifications that let the API cache resolved tokens.
--
-- Counters. Until now every extension written updated its tenant's row and every ancestor
-- dealer's row, one row trigger per extension. Two costs followed: every create on the
-- platform held the same operator row from its insert until its transaction ended, and a
-- bulk INSERT updated the same rows once per extension, each update walking a longer chain
-- of row versions (10,000 rows in one statement: 20 to 45 s).
--
-- Now:
-- * statement-level triggers with transition tables count what a whole INSERT or DELETE
--   did, per tenant and per dealer, and change each counter once per statement;
-- * a counter a cap depends on (every tenant's extension_count; a dealer's tenant_count or
--   extension_count when it has max_tenants or max_extensions) moves at once, its row
--   locked (rows in id order, so concurrent writers cannot deadlock) and its CHECK refusing
--   an over-cap count right there, as before;
-- * a counter no cap depends on (the operator's, and those of uncapped dealers near the
--   root) is not touched during the transaction: the change is added up in the
--   transaction-local setting pbx.uncounted and applied by a deferred trigger at commit,
--   each row once. Those rows are locked only while the transaction commits, so writers
--   under different capped dealers do not wait for each other, and every committed state
--   has exact counters (the API shows them as stored). A rolled back (sub)transaction
--   rolls the setting back with its writes.
-- If a cap is set on a dealer while a transaction that took it for uncapped is still open,
-- that transaction's commit-time update meets the dealer's CHECK and fails: caps stay exact.

-- Adds `later` ({"<dealer id>": [tenants, extensions]}) to what the transaction leaves
-- uncounted until it commits.
CREATE FUNCTION count_at_commit(later jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    pending jsonb := nullif(current_setting('pbx.uncounted', true), '')::jsonb;
BEGIN
    IF later IS NULL OR later = '{}' THEN
        RETURN;
    END IF;
    IF pending IS NOT NULL THEN
        SELECT jsonb_object_agg(k, jsonb_build_array(
                   coalesce((pending -> k ->> 0)::integer, 0)
                   + coalesce((later -> k ->> 0)::integer, 0),
                   coalesce((pending -> k ->> 1)::integer, 0)
                   + coalesce((later -> k ->> 1)::integer, 0)))
          INTO later
          FROM (SELECT jsonb_object_keys(pending) UNION SELECT jsonb_object_keys(later)) AS keys(k);
    END IF;
    PERFORM set_config('pbx.uncounted', later::text, true);
END $$;

-- Adds to the subtree counters of dealers `ids` (one entry per dealer): at once where a cap
-- depends on the counter, at commit elsewhere. The capped rows are locked in id order
-- before any is changed.
CREATE FUNCTION add_to_dealer_counters(ids bigint[], tenant_deltas integer[],
                                       extension_deltas integer[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    later jsonb;
BEGIN
    WITH x AS (SELECT * FROM unnest(ids, tenant_deltas, extension_deltas) AS x(id, nt, ne)),
    capped AS (
        SELECT d.id FROM dealers d JOIN x ON x.id = d.id
         WHERE (x.nt <> 0 AND d.max_tenants IS NOT NULL)
            OR (x.ne <> 0 AND d.max_extensions IS NOT NULL)
         ORDER BY d.id
           FOR NO KEY UPDATE OF d),
    counted AS (
        UPDATE dealers d
           SET tenant_count = d.tenant_count + x.nt,
               extension_count = d.extension_count + x.ne
          FROM x
         WHERE d.id = x.id AND d.id IN (SELECT id FROM capped))
    SELECT jsonb_object_agg(x.id, jsonb_build_array(x.nt, x.ne)) INTO later
      FROM x
     WHERE x.id NOT IN (SELECT id FROM capped) AND (x.nt <> 0 OR x.ne <> 0);
    PERFORM count_at_commit(later);
END $$;

-- At commit: apply what the transaction left uncounted, each dealer once, rows locked in id
-- order. Fires once per row written; the first firing applies everything, the others find
-- nothing to do.
CREATE FUNCTION apply_uncounted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    pending text := current_setting('pbx.uncounted', true);
BEGIN
    IF pending IS NULL OR pending = '' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('pbx.uncounted', '', true);
    WITH x AS (SELECT key::bigint AS id, (value ->> 0)::integer AS nt,
                      (value ->> 1)::integer AS ne
                 FROM jsonb_each(pending::jsonb)),
    locked AS (SELECT d.id, x.nt, x.ne FROM dealers d JOIN x ON x.id = d.id
                ORDER BY d.id
                  FOR NO KEY UPDATE OF d)
    UPDATE dealers d
       SET tenant_count = d.tenant_count + l.nt,
           extension_count = d.extension_count + l.ne
      FROM locked l
     WHERE d.id = l.id AND (l.nt <> 0 OR l.ne <> 0);
    RETURN NULL;
END $$;

-- Extension rules, as in 0001 but without the per-row counting. An insert locks the rows
-- whose counters it will change (its tenant's, its capped dealers') here, before the
-- foreign-key checks that follow take a shared lock on the tenant: taken first, every
-- concurrent writer's shared lock would have to be carried along by each counter update.
CREATE OR REPLACE FUNCTION extensions_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    t tenants%ROWTYPE;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT * INTO t FROM tenants WHERE id = NEW.tenant_id FOR NO KEY UPDATE;
        -- once per tenant in a row of inserts (a bulk insert): the locks stay until the end
        -- of the (sub)transaction, and so does the setting
        IF current_setting('pbx.locked_tenant', true) IS DISTINCT FROM t.id::text THEN
            PERFORM 1 FROM dealers
             WHERE id = ANY ((SELECT path FROM dealers WHERE id = t.dealer_id)::bigint[])
               AND max_extensions IS NOT NULL
             ORDER BY id
               FOR NO KEY UPDATE;
            PERFORM set_config('pbx.locked_tenant', t.id::text, true);
        END IF;
    ELSE
        SELECT * INTO t FROM tenants WHERE id = NEW.tenant_id;
    END IF;
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

-- What one INSERT added, per tenant and per dealer, in one statement. The rows whose
-- counters change at once (the tenants', the capped dealers') were locked by
-- extensions_before_write, row by row; an uncapped dealer's count moves at commit.
CREATE FUNCTION extensions_count_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    later jsonb;
BEGIN
    WITH per_tenant AS (
        SELECT tenant_id AS id, count(*)::integer AS n FROM new_rows GROUP BY tenant_id),
    counted_tenants AS (
        UPDATE tenants t SET extension_count = t.extension_count + p.n
          FROM per_tenant p
         WHERE t.id = p.id
        RETURNING t.dealer_id, p.n),
    per_dealer AS (
        SELECT a.id, sum(c.n)::integer AS n
          FROM counted_tenants c
          JOIN dealers d ON d.id = c.dealer_id
          CROSS JOIN unnest(d.path) AS a(id)
         GROUP BY a.id),
    counted_dealers AS (
        UPDATE dealers d SET extension_count = d.extension_count + p.n
          FROM per_dealer p
         WHERE d.id = p.id AND d.max_extensions IS NOT NULL
        RETURNING d.id)
    SELECT jsonb_object_agg(p.id, jsonb_build_array(0, p.n)) INTO later
      FROM per_dealer p
     WHERE p.id NOT IN (SELECT id FROM counted_dealers);
    PERFORM count_at_commit(later);
    RETURN NULL;
END $$;

-- What one DELETE removed, the same way; its rows were not locked beforehand, so they are
-- here, tenants then capped dealers, each in id order. Extensions of a tenant that is
-- itself being deleted are not counted (it is gone): its delete trigger settles its dealers.
CREATE FUNCTION extensions_count_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    later jsonb;
BEGIN
    WITH per_tenant AS (
        SELECT tenant_id AS id, count(*)::integer AS n FROM old_rows GROUP BY tenant_id),
    locked_tenants AS (
        SELECT t.id FROM tenants t WHERE t.id IN (SELECT id FROM per_tenant)
         ORDER BY t.id
           FOR NO KEY UPDATE),
    counted_tenants AS (
        UPDATE tenants t SET extension_count = t.extension_count - p.n
          FROM per_tenant p
         WHERE t.id = p.id AND t.id IN (SELECT id FROM locked_tenants)
        RETURNING t.dealer_id, p.n),
    per_dealer AS (
        SELECT a.id, sum(c.n)::integer AS n
          FROM counted_tenants c
          JOIN dealers d ON d.id = c.dealer_id
          CROSS JOIN unnest(d.path) AS a(id)
         GROUP BY a.id),
    locked_dealers AS (
        SELECT d.id FROM dealers d
         WHERE d.id IN (SELECT id FROM per_dealer) AND d.max_extensions IS NOT NULL
         ORDER BY d.id
           FOR NO KEY UPDATE),
    counted_dealers AS (
        UPDATE dealers d SET extension_count = d.extension_count - p.n
          FROM per_dealer p
         WHERE d.id = p.id AND d.id IN (SELECT id FROM locked_dealers)
        RETURNING d.id)
    SELECT jsonb_object_agg(p.id, jsonb_build_array(0, -p.n)) INTO later
      FROM per_dealer p
     WHERE p.id NOT IN (SELECT id FROM counted_dealers);
    PERFORM count_at_commit(later);
    RETURN NULL;
END $$;

DROP TRIGGER extensions_after_delete ON extensions;
DROP FUNCTION extensions_after_delete();
CREATE TRIGGER extensions_count_insert AFTER INSERT ON extensions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION extensions_count_insert();
CREATE TRIGGER extensions_count_delete AFTER DELETE ON extensions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION extensions_count_delete();

-- Tenant rules, as in 0001, counting through add_to_dealer_counters.
CREATE OR REPLACE FUNCTION tenants_before_write() RETURNS trigger
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
        PERFORM add_to_dealer_counters(d.path, array_fill(1, ARRAY[cardinality(d.path)]),
                                       array_fill(0, ARRAY[cardinality(d.path)]));
    ELSIF TG_OP = 'UPDATE' AND NEW.status = 'cancelled' AND OLD.status <> 'cancelled' THEN
        PERFORM add_to_dealer_counters(d.path, array_fill(-1, ARRAY[cardinality(d.path)]),
                                       array_fill(0, ARRAY[cardinality(d.path)]));
        -- Contract cancellation deactivates every extension in the same transaction.
        UPDATE extensions SET active = false WHERE tenant_id = NEW.id AND active;
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION tenants_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    dealer_path bigint[];
BEGIN
    SELECT path INTO dealer_path FROM dealers WHERE id = OLD.dealer_id;
    IF dealer_path IS NOT NULL THEN
        PERFORM add_to_dealer_counters(
            dealer_path,
            array_fill(CASE WHEN OLD.status <> 'cancelled' THEN -1 ELSE 0 END,
                       ARRAY[cardinality(dealer_path)]),
            array_fill(-OLD.extension_count, ARRAY[cardinality(dealer_path)]));
    END IF;
    RETURN OLD;
END $$;

CREATE CONSTRAINT TRIGGER extensions_apply_uncounted AFTER INSERT OR DELETE ON extensions
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION apply_uncounted();
CREATE CONSTRAINT TRIGGER tenants_apply_uncounted AFTER INSERT OR DELETE OR UPDATE OF status
    ON tenants
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION apply_uncounted();

-- Token cache: every change that can end a bearer token's validity is announced on
-- `pbx_auth` at commit (controlplane.api.oauth empties its cache on each notification).
CREATE FUNCTION notify_auth_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pbx_auth', TG_TABLE_NAME);
    RETURN NULL;
END $$;
CREATE TRIGGER oauth_tokens_notify_auth
    AFTER UPDATE OF revoked_at, expires_at OR DELETE OR TRUNCATE ON oauth_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION notify_auth_change();
CREATE TRIGGER api_clients_notify_auth
    AFTER UPDATE OR DELETE OR TRUNCATE ON api_clients
    FOR EACH STATEMENT EXECUTE FUNCTION notify_auth_change();
CREATE TRIGGER dealers_notify_auth
    AFTER UPDATE OF active, password_hash, parent_id, path, level OR DELETE OR TRUNCATE
    ON dealers
    FOR EACH STATEMENT EXECUTE FUNCTION notify_auth_change();
