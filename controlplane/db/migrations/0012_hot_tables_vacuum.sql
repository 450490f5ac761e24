-- The tables every call writes: calls in progress (a row inserted at admission, deleted at
-- settlement), the call counters and the credit accounts (updated by every admission and
-- settlement). At a few hundred calls a second their dead rows pile up by the tens of
-- thousands a minute, and every lookup walks past them. Vacuum them as soon as a few
-- thousand are dead, at full speed (no cost-based pauses); how often autovacuum looks is
-- the server's autovacuum_naptime (the embedded server sets 5 s; see README).
ALTER TABLE calls SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000,
                       autovacuum_vacuum_insert_scale_factor = 0,
                       autovacuum_vacuum_insert_threshold = 2000,
                       autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 5000,
                       autovacuum_vacuum_cost_delay = 0);
ALTER TABLE call_counters SET (autovacuum_vacuum_scale_factor = 0,
                               autovacuum_vacuum_threshold = 2000,
                               autovacuum_vacuum_cost_delay = 0);
ALTER TABLE credit_accounts SET (autovacuum_vacuum_scale_factor = 0,
                                 autovacuum_vacuum_threshold = 2000,
                                 autovacuum_vacuum_cost_delay = 0);
