-- settle_calls (0009) as a few statements over the whole batch instead of a loop of
-- statements per call: the calls are locked and read at once, every CDR is stored by one
-- INSERT, the settled calls deleted by one DELETE. At a few hundred calls a second the
-- loop cost the database about half a millisecond per call, most of it in running a dozen
-- small statements per item; the batch's statements cost about as much for ten calls as
-- for one. What it does is unchanged (see 0007 and 0009):
--
-- * the calls are locked in id order, as every statement changing several calls does;
-- * an item whose call's grant moved since it was priced is 'stale': nothing of it is
--   stored and its call is untouched; the caller prices it again;
-- * an item with a call in progress settles it ('settled'); one without ('no_call': a
--   refused call, or one settled before) only stores its CDR. Of several items of one call,
--   the first (in p_items' order) whose grant matches settles it; those before it are
--   stale, those after it find it settled;
-- * each CDR is stored once (a second line of the same call or of the same node line
--   stores nothing); the tenant's facts are filled in as settle_call does: its external
--   reference and, unless given, its dealer chain; a CDR without a tenant finds it from
--   its account code;
-- * credit accounts, then call counters, each touched once per batch and locked in one
--   global order (accounts by id; counters root dealer first, then tenants, extensions), as
--   admissions take them, so batches and admissions never wait on each other in a cycle;
--   each call's credit movement carries its account's balance right after it.
--
-- Lookups are by key only: a generic plan of a join with an array must never read a whole
-- table (see calls_answered, 0008).
CREATE OR REPLACE FUNCTION settle_calls(p_items jsonb)
RETURNS TABLE (ord integer, outcome text, stored boolean)
SET enable_seqscan = off
LANGUAGE plpgsql AS $$
DECLARE
    v_call uuid[];
    v_granted integer[];
    v_price numeric[];
    v_cdr jsonb[];
    v_code text[];
    v_locked calls[];
    v_outcome text[];
    v_stored integer[];
    v_settled calls[];       -- the calls this batch ends, in id order
    v_settled_price numeric[];
    v_kinds char[];
    v_ids bigint[];
    v_counts integer[];
BEGIN
    SELECT array_agg((e.value->>'call')::uuid ORDER BY e.i),
           array_agg((e.value->>'granted')::integer ORDER BY e.i),
           array_agg((e.value->>'price')::numeric ORDER BY e.i),
           array_agg(e.value->'cdr' ORDER BY e.i),
           array_agg(coalesce(e.value->>'account_code', '') ORDER BY e.i)
      INTO v_call, v_granted, v_price, v_cdr, v_code
      FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(value, i);
    IF v_call IS NULL THEN
        RETURN;
    END IF;

    SELECT array_agg(l.c ORDER BY (l.c).id) INTO v_locked
      FROM (SELECT c FROM calls AS c WHERE c.id = ANY (v_call) ORDER BY c.id FOR UPDATE) AS l;

    -- each item's outcome
    SELECT array_agg(CASE WHEN j.found IS NULL THEN 'no_call'
                          WHEN j.settler IS NULL OR j.i < j.settler THEN 'stale'
                          WHEN j.i = j.settler THEN 'settled'
                          ELSE 'no_call' END ORDER BY j.i)
      INTO v_outcome
      FROM (SELECT x.i, c.id AS found,
                   min(x.i) FILTER (WHERE c.id IS NOT NULL
                                      AND c.granted_seconds IS NOT DISTINCT FROM x.granted)
                       OVER (PARTITION BY x.call) AS settler
              FROM unnest(v_call, v_granted) WITH ORDINALITY AS x(call, granted, i)
              LEFT JOIN unnest(v_locked) AS c ON c.id = x.call) AS j;

    -- the CDRs, with their tenant's facts, stored in the order the calls were locked; of
    -- items with the same CDR identity, the first stored it
    WITH x AS (
        SELECT x.i, x.call, x.cdr,
               coalesce((x.cdr->>'tenant_id')::bigint,
                        CASE WHEN x.code <> '' THEN
                            (SELECT e.tenant_id FROM extensions e
                              WHERE e.account_code = x.code::bpchar) END) AS tenant
          FROM unnest(v_call, v_cdr, v_code, v_outcome) WITH ORDINALITY
               AS x(call, cdr, code, outcome, i)
         WHERE x.outcome <> 'stale' AND jsonb_typeof(x.cdr) = 'object'),
    facts AS (
        SELECT x.i, x.call, r.*
          FROM x
          LEFT JOIN tenants t ON t.id = x.tenant
          LEFT JOIN dealers d ON d.id = t.dealer_id
         CROSS JOIN LATERAL jsonb_populate_record(NULL::cdrs,
               CASE WHEN x.tenant IS NULL THEN x.cdr
                    ELSE x.cdr || jsonb_build_object('tenant_id', x.tenant,
                                                     'external_ref',
                                                     coalesce(t.external_ref, ''))
                         || CASE WHEN NOT x.cdr ? 'dealer_path' AND d.path IS NOT NULL
                                 THEN jsonb_build_object('dealer_path', to_jsonb(d.path))
                                 ELSE '{}'::jsonb END
               END) AS r),
    inserted AS (
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
          FROM facts AS r
         ORDER BY r.call NULLS LAST, r.i
        ON CONFLICT DO NOTHING
        RETURNING node_id, uniqueid, sequence)
    SELECT array_agg(f.i) INTO v_stored
      FROM (SELECT DISTINCT ON (r.node_id, r.uniqueid, r.sequence) r.i
              FROM facts AS r
              JOIN inserted AS n ON n.node_id = r.node_id AND n.uniqueid = r.uniqueid
                                AND n.sequence = r.sequence
             ORDER BY r.node_id, r.uniqueid, r.sequence, r.call NULLS LAST, r.i) AS f;

    -- the settled calls, with the price each is charged
    SELECT array_agg(c ORDER BY c.id), array_agg(x.price ORDER BY c.id)
      INTO v_settled, v_settled_price
      FROM unnest(v_call, v_price, v_outcome) AS x(call, price, outcome)
      JOIN unnest(v_locked) AS c ON c.id = x.call
     WHERE x.outcome = 'settled';

    IF v_settled IS NOT NULL THEN
        DELETE FROM calls WHERE id IN (SELECT c.id FROM unnest(v_settled) AS c);

        -- the accounts: each once, with the sum of its prices and of the reservations it
        -- gets back; each call's movement with its account's balance right after it
        PERFORM 1 FROM credit_accounts
          WHERE id IN (SELECT c.account_id FROM unnest(v_settled) AS c)
          ORDER BY id FOR UPDATE;
        WITH m AS (
            SELECT c.account_id AS account, c.id AS call, c.reserved,
                   v_settled_price[c.ordinality] AS price, c.ordinality AS i
              FROM unnest(v_settled) WITH ORDINALITY AS c
             WHERE c.account_id IS NOT NULL),
        charged AS (
            UPDATE credit_accounts a
               SET balance = a.balance - s.price, reserved = a.reserved - s.reserved,
                   updated_at = now()
              FROM (SELECT m.account, sum(m.price) AS price, sum(m.reserved) AS reserved
                      FROM m GROUP BY m.account) AS s
             WHERE a.id = s.account
            RETURNING a.id, a.balance + s.price AS before)
        INSERT INTO credit_movements (account_id, amount, balance, reason, call_id)
        SELECT m.account, -m.price,
               b.before - sum(m.price) OVER (PARTITION BY m.account ORDER BY m.i), 'call',
               m.call
          FROM m JOIN charged AS b ON b.id = m.account
         WHERE m.price <> 0
         ORDER BY m.i;

        -- the counters: each once, with the slots of all the batch's calls on it
        SELECT array_agg(l.kind ORDER BY l.rank, l.id), array_agg(l.id ORDER BY l.rank, l.id),
               array_agg(l.n ORDER BY l.rank, l.id)
          INTO v_kinds, v_ids, v_counts
          FROM (SELECT l.kind, l.id, count(*)::integer AS n, min(l.rank) AS rank
                  FROM (SELECT 'd'::char AS kind, p.id, p.ord::integer AS rank
                          FROM unnest(v_settled) AS c,
                               unnest(c.dealer_path) WITH ORDINALITY AS p(id, ord)
                        UNION ALL SELECT 't', c.tenant_id, 1000 FROM unnest(v_settled) AS c
                        UNION ALL SELECT 'e', c.extension_id, 1001 FROM unnest(v_settled) AS c
                         WHERE c.extension_id IS NOT NULL) AS l
                 GROUP BY l.kind, l.id) AS l;
        PERFORM 1 FROM call_counters cc
          JOIN unnest(v_kinds, v_ids) WITH ORDINALITY AS l(kind, id, o)
            ON cc.kind = l.kind AND cc.id = l.id
         WHERE cc.active > 0
         ORDER BY l.o FOR UPDATE OF cc;
        UPDATE call_counters cc SET active = greatest(cc.active - l.n, 0)
          FROM unnest(v_kinds, v_ids, v_counts) AS l(kind, id, n)
         WHERE cc.kind = l.kind AND cc.id = l.id AND cc.active > 0;
    END IF;

    RETURN QUERY
        SELECT x.i::integer, x.outcome, coalesce(x.i = ANY (v_stored), false)
          FROM unnest(v_outcome) WITH ORDINALITY AS x(outcome, i);
END $$;
