-- Change notifications for the node agents, and the registrations they observe.
-- NOTIFY is delivered at commit, so an agent never sees a change that was rolled back;
-- an agent that was not listening reconciles against these tables when it starts.

CREATE FUNCTION notify_extension_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row_new extensions;
    row_old extensions;
BEGIN
    IF TG_OP <> 'DELETE' THEN row_new := NEW; END IF;
    IF TG_OP <> 'INSERT' THEN row_old := OLD; END IF;
    PERFORM pg_notify('pbx_changes', json_build_object(
        'kind', 'extension', 'op', lower(TG_OP),
        'id', COALESCE(row_new.id, row_old.id),
        'tenant_id', COALESCE(row_new.tenant_id, row_old.tenant_id),
        'node_id', (SELECT node_id FROM tenants WHERE id = COALESCE(row_new.tenant_id,
                                                                       row_old.tenant_id)),
        'account_codes', array_remove(ARRAY[row_new.account_code::text,
                                            row_old.account_code::text], NULL))::text);
    RETURN NULL;
END $$;
CREATE TRIGGER extensions_notify AFTER INSERT OR UPDATE OR DELETE ON extensions
    FOR EACH ROW EXECUTE FUNCTION notify_extension_change();

CREATE FUNCTION notify_tenant_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Extension counters move on every extension write: those are not tenant changes.
    IF TG_OP = 'UPDATE' AND (to_jsonb(NEW) - 'extension_count' - 'updated_at')
                          = (to_jsonb(OLD) - 'extension_count' - 'updated_at') THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('pbx_changes', json_build_object(
        'kind', 'tenant', 'op', lower(TG_OP),
        'id', CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END,
        'node_id', CASE WHEN TG_OP = 'DELETE' THEN OLD.node_id ELSE NEW.node_id END,
        'old_node_id', CASE WHEN TG_OP = 'UPDATE' THEN OLD.node_id END)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER tenants_notify AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION notify_tenant_change();

-- Registration addresses and node assignments shape a node's transports.
CREATE FUNCTION notify_dealer_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.registration_address IS NOT DISTINCT FROM OLD.registration_address
       AND NEW.node_id IS NOT DISTINCT FROM OLD.node_id AND NEW.active = OLD.active THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('pbx_changes', json_build_object(
        'kind', 'dealer', 'op', lower(TG_OP),
        'id', CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END,
        'node_id', CASE WHEN TG_OP = 'DELETE' THEN OLD.node_id ELSE NEW.node_id END,
        'old_node_id', CASE WHEN TG_OP = 'UPDATE' THEN OLD.node_id END)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER dealers_notify AFTER INSERT OR UPDATE OR DELETE ON dealers
    FOR EACH ROW EXECUTE FUNCTION notify_dealer_change();

-- SIP contacts seen on the nodes (AMI ContactStatus, resynced on every agent login).
CREATE TABLE registrations (
    node_id       bigint NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    account_code  char(6) NOT NULL,
    uri           text NOT NULL,
    user_agent    text NOT NULL DEFAULT '',
    via_address   text NOT NULL DEFAULT '',
    status        text NOT NULL DEFAULT 'registered',
    expires_at    timestamptz,
    registered_at timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, account_code, uri)
);
CREATE INDEX registrations_account ON registrations (account_code);

-- What each agent last applied, for operators: the node's provisioning health.
ALTER TABLE nodes ADD COLUMN last_reconciled_at timestamptz;
ALTER TABLE nodes ADD COLUMN last_error text;
