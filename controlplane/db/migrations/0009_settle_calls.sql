-- The ends of many calls in one statement (the CDR import settles what a node wrote since
-- its last read). Per call as in settle_call (0007): the call row is locked and checked,
-- its CDR stored, the row deleted. What every admission also needs is done once, at the
-- end, for the whole batch: one update per credit account (sums of prices and of
-- reservations given back, with each call's movement and the balance after it) and one
-- per call counter (the slots of all the batch's calls on it). Those locks are therefore
-- held only for the last moments of the statement, and taken in one global order (dealers
-- root first, then tenants, then extensions; accounts by id), so batches and admissions
-- never wait on each other in a cycle.

-- p_items: [{"call": uuid or null, "granted": seconds or null, "price": "0.1234",
--            "cdr": {...} or null, "account_code": "..."}, ...]
-- One row per item (ord: its place in p_items, from 1): outcome and stored as settle_call's.
CREATE FUNCTION settle_calls(p_items jsonb)
RETURNS TABLE (ord integer, outcome text, stored boolean)
LANGUAGE plpgsql AS $$
DECLARE
    item record;
    c calls%ROWTYPE;
    charged_accounts bigint[] := '{}';
    charged_prices numeric[] := '{}';
    charged_reserved numeric[] := '{}';
    charged_calls uuid[] := '{}';
    level_kinds char[] := '{}';
    level_ids bigint[] := '{}';
    level_ranks integer[] := '{}';
    balance_ids bigint[] := '{}';
    balances_before numeric[] := '{}';
    acc record;
    level record;
    new_balance numeric;
BEGIN
    -- calls locked in id order, as every statement changing several calls does (lease
    -- renewals, answers): two of them never wait on each other in a cycle
    FOR item IN SELECT e.value AS v, e.ordinality::integer AS i
                  FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e
                 ORDER BY (e.value->>'call')::uuid NULLS LAST, e.ordinality LOOP
        ord := item.i;
        stored := false;
        c := NULL;
        IF item.v->>'call' IS NOT NULL THEN
            SELECT * INTO c FROM calls WHERE id = (item.v->>'call')::uuid FOR UPDATE;
        END IF;
        IF c.id IS NOT NULL AND c.granted_seconds IS DISTINCT FROM (item.v->>'granted')::integer
        THEN
            outcome := 'stale';
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF jsonb_typeof(item.v->'cdr') = 'object' THEN
            -- settle_call without a call stores the CDR only, with the tenant's facts
            SELECT s.stored INTO stored
              FROM settle_call(NULL, NULL, 0, item.v->'cdr',
                               coalesce(item.v->>'account_code', '')) AS s;
        END IF;
        IF c.id IS NULL THEN
            outcome := 'no_call';
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF c.account_id IS NOT NULL THEN
            charged_accounts := charged_accounts || c.account_id;
            charged_prices := charged_prices || (item.v->>'price')::numeric;
            charged_reserved := charged_reserved || c.reserved;
            charged_calls := charged_calls || c.id;
        END IF;
        DELETE FROM calls WHERE id = c.id;
        SELECT level_kinds || array_agg(l.kind), level_ids || array_agg(l.id),
               level_ranks || array_agg(l.rank)
          INTO level_kinds, level_ids, level_ranks
          FROM (SELECT 'd'::char AS kind, p.id, p.ord::integer AS rank
                  FROM unnest(c.dealer_path) WITH ORDINALITY AS p(id, ord)
                UNION ALL SELECT 't', c.tenant_id, 1000
                UNION ALL SELECT 'e', c.extension_id, 1001 WHERE c.extension_id IS NOT NULL
               ) AS l;
        outcome := 'settled';
        RETURN NEXT;
    END LOOP;
    FOR acc IN SELECT a.id, sum(a.price) AS price, sum(a.reserved) AS reserved
                 FROM unnest(charged_accounts, charged_prices, charged_reserved)
                      AS a(id, price, reserved)
                GROUP BY a.id ORDER BY a.id LOOP
        UPDATE credit_accounts SET balance = balance - acc.price,
               reserved = reserved - acc.reserved, updated_at = now()
         WHERE id = acc.id RETURNING balance INTO new_balance;
        IF new_balance IS NOT NULL THEN
            balance_ids := balance_ids || acc.id;
            balances_before := balances_before || (new_balance + acc.price);
        END IF;
    END LOOP;
    -- each call's movement with its account's balance right after it, in the batch's order
    INSERT INTO credit_movements (account_id, amount, balance, reason, call_id)
    SELECT m.account, -m.price,
           b.before - sum(m.price) OVER (PARTITION BY m.account ORDER BY m.i), 'call', m.call
      FROM unnest(charged_accounts, charged_prices, charged_calls)
           WITH ORDINALITY AS m(account, price, call, i)
      JOIN unnest(balance_ids, balances_before) AS b(id, before) ON b.id = m.account
     WHERE m.price <> 0
     ORDER BY m.i;
    FOR level IN SELECT l.kind, l.id, count(*)::integer AS n
                   FROM unnest(level_kinds, level_ids, level_ranks) AS l(kind, id, rank)
                  GROUP BY l.kind, l.id ORDER BY min(l.rank), l.id LOOP
        UPDATE call_counters SET active = greatest(active - level.n, 0)
         WHERE kind = level.kind AND id = level.id AND active > 0;
    END LOOP;
END $$;
