-- The periodic CDR export files (controlplane/billing/export.py), so that every CDR is in
-- exactly one of them: also a CDR stored after its period's file was written (a call in
-- progress at the close, a node's CDRs imported after an outage), which goes into a
-- numbered supplement of that period.

-- Which transaction stored each CDR: every transaction with a lower id than the oldest one
-- still running has ended, so the export knows which CDRs are all committed without a
-- clock (a transaction stamps now() at its start, and may commit long after). CDRs stored
-- before this migration have none: they count as stored first.
ALTER TABLE cdrs ADD COLUMN stored_xid bigint;
ALTER TABLE cdrs ALTER COLUMN stored_xid SET DEFAULT pg_current_xact_id()::text::bigint;
CREATE INDEX cdrs_stored ON cdrs ((coalesce(stored_xid, 0)));

-- One row per file, recorded before the file is written: number 0 is the period's file,
-- 1, 2... its supplements. A file holds the CDRs started in [period_start, period_end) and
-- stored by transactions in [stored_from, stored_before) (cdrs.stored_xid); stored_from is
-- NULL for number 0. Written again if lost before written_at is set.
CREATE TABLE cdr_exports (
    label         text NOT NULL,
    number        integer NOT NULL CHECK (number >= 0),
    period_start  timestamptz NOT NULL,
    period_end    timestamptz NOT NULL CHECK (period_end > period_start),
    stored_from   bigint CHECK ((number = 0) = (stored_from IS NULL)),
    stored_before bigint NOT NULL,
    written_at    timestamptz,
    PRIMARY KEY (label, number)
);
-- the period a late CDR belongs to: the last one starting at or before it
CREATE UNIQUE INDEX cdr_exports_period ON cdr_exports (period_start) WHERE number = 0;

-- How far the export has looked: every CDR stored by a transaction before `stored_before`
-- whose period has a file is in a file recorded above. One row.
CREATE TABLE cdr_export_horizon (
    only_row      boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    stored_before bigint NOT NULL
);
