-- A call's dealer is active only while every dealer above it is, as for the API's logins
-- (store/credentials.py): deactivating a distributor stops the calls of its whole subtree.
-- The kept parties' digests cover this column, so a deactivation anywhere above makes the
-- next admission of a kept party read it again (0010).
CREATE OR REPLACE VIEW call_parties AS
SELECT e.id AS extension_id, e.tenant_id, e.number, e.account_code, e.active,
       e.billing_type, e.credit_limit, e.plan_id, e.intl_plan_id, e.allow_local,
       e.allow_national, e.allow_international, e.allow_vc1, e.allow_vc2, e.allow_vc3,
       t.status::text AS tenant_status, t.area_code, t.shared_credit,
       t.billing_mode AS tenant_billing_mode, t.credit_limit AS tenant_credit_limit,
       t.node_id, t.external_ref, d.path AS dealer_path,
       NOT EXISTS (SELECT 1 FROM dealers a WHERE a.id = ANY (d.path) AND NOT a.active)
         AS dealer_active,
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
