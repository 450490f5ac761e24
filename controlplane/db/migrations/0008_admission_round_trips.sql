-- Fewer round trips per call.
--
-- admit_call_durably: the admission (0006) and its durability barrier in one CALL. The
-- admission commits without waiting for its WAL to reach the disk, so that the counters'
-- locks go back at once; then a transaction of its own with a transaction id commits
-- synchronously as the CALL ends, which flushes the WAL past the admission before the
-- agent hears the answer. Call it outside any transaction block (it commits).
CREATE PROCEDURE admit_call_durably(p_id uuid, p_node bigint, p_channel text,
                                    p_channel_name text, p_direction text, p_extension bigint,
                                    p_tenant bigint, p_path bigint[], p_caller text,
                                    p_callee text, p_class text, p_carrier bigint,
                                    p_rate jsonb, p_account_extension bigint, p_floor numeric,
                                    p_seconds integer[], p_amounts numeric[],
                                    p_lease double precision, INOUT p_grant integer DEFAULT NULL)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    p_grant := admit_call(p_id, p_node, p_channel, p_channel_name, p_direction, p_extension,
                          p_tenant, p_path, p_caller, p_callee, p_class, p_carrier, p_rate,
                          p_account_extension, p_floor, p_seconds, p_amounts, p_lease);
    COMMIT;
    PERFORM pg_current_xact_id();
END $$;

-- Agents keep rate tables in memory; every change to a table's rates moves its version,
-- which the caller's query returns with the table, so a cached copy is never used stale.
CREATE SEQUENCE rate_table_versions;
ALTER TABLE rate_tables ADD COLUMN rates_version bigint NOT NULL
    DEFAULT nextval('rate_table_versions');

CREATE FUNCTION rates_touch_tables() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE rate_tables SET rates_version = nextval('rate_table_versions')
         WHERE id IN (SELECT DISTINCT rate_table_id FROM old_rates);
    ELSE
        UPDATE rate_tables SET rates_version = nextval('rate_table_versions')
         WHERE id IN (SELECT DISTINCT rate_table_id FROM new_rates);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER rates_touch_after_insert AFTER INSERT ON rates
    REFERENCING NEW TABLE AS new_rates FOR EACH STATEMENT EXECUTE FUNCTION rates_touch_tables();
CREATE TRIGGER rates_touch_after_update AFTER UPDATE ON rates
    REFERENCING NEW TABLE AS new_rates FOR EACH STATEMENT EXECUTE FUNCTION rates_touch_tables();
CREATE TRIGGER rates_touch_after_delete AFTER DELETE ON rates
    REFERENCING OLD TABLE AS old_rates FOR EACH STATEMENT EXECUTE FUNCTION rates_touch_tables();

-- Answers recorded together: one statement for every call answered while the previous
-- one ran. Committed without waiting for the disk (see store/calls.py, answered).
CREATE FUNCTION calls_answered(p_ids uuid[], p_channels text[], p_lease double precision)
RETURNS TABLE (id uuid, granted_seconds integer)
-- a few rows by their key: never a scan of the table, whatever its statistics say (a
-- generic plan of a join with unnest hashed the array and read every call in progress)
SET enable_seqscan = off
LANGUAGE sql AS $$
    -- rows locked in id order, as every statement changing several calls does (lease
    -- renewals, settlements): two of them never wait on each other in a cycle
    UPDATE calls c SET answered_at = now(),
           callee_channel = p_channels[array_position(p_ids, c.id)],
           granted_until = now() + make_interval(secs => c.granted_seconds),
           lease_until = greatest(c.lease_until, now() + make_interval(secs => p_lease))
     WHERE c.id IN (SELECT l.id FROM calls l WHERE l.id = ANY (p_ids) AND l.answered_at IS NULL
                     ORDER BY l.id FOR UPDATE)
       AND c.answered_at IS NULL
    RETURNING c.id, c.granted_seconds;
$$;

-- A call's row changes several times while it lasts (answered, extended, its lease renewed
-- every few seconds). None of those columns is indexed any more, and pages keep room, so
-- each change is a heap-only update instead of an insertion into every index of the table:
-- the lease index served only the sweep, which now reads the live calls (a small table)
-- in full; calls_node is the leading column of calls_channel.
DROP INDEX calls_lease;
DROP INDEX calls_node;
ALTER TABLE calls SET (fillfactor = 50);

-- A call's node was checked by a foreign key on every admission: a KEY SHARE lock on the
-- node's row that every concurrent admission of the node also holds, which PostgreSQL
-- records as a multixact, over and over. The node's agent only ever admits calls for its
-- own node; deleting a node that still has calls is refused here instead, as the key did.
ALTER TABLE calls DROP CONSTRAINT calls_node_id_fkey;
CREATE FUNCTION nodes_keep_calls() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM calls WHERE node_id = OLD.id) THEN
        RAISE EXCEPTION 'node % still has calls in progress', OLD.id
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER nodes_keep_calls BEFORE DELETE ON nodes
    FOR EACH ROW EXECUTE FUNCTION nodes_keep_calls();

-- Calls come and go hundreds of times a second: their dealer index takes each insertion at
-- once, rather than in a pending list that some admission then has to merge (a stall while
-- it holds its account's lock). CDRs keep the pending list: they are written by the import,
-- where merging in bulk costs less and delays no decision.
ALTER INDEX calls_dealers SET (fastupdate = off);
