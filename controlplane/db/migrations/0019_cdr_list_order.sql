-- GET /api/v1/cdrs pages by id: a page ends at the highest id it holds and the next one
-- starts after it. A CDR's id comes from a sequence when its row is inserted, not when its
-- transaction commits, so a CDR committed after a page was read could have a lower id than
-- that page's last one and never be listed (two agents settling calls at the same moment).
-- Every statement that stores CDRs holds this lock shared until its transaction ends; the
-- list takes it exclusively for a moment, in a transaction of its own, and reads the last
-- id handed out (CDR_LIST_LOCK_KEY in controlplane/api/resources/cdrs.py): every id up to
-- it belongs to a transaction that has ended, every id handed out later is higher, and the
-- page stops there.
CREATE FUNCTION cdrs_storing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7140019);
    RETURN NULL;
END $$;
CREATE TRIGGER cdrs_storing BEFORE INSERT ON cdrs
    FOR EACH STATEMENT EXECUTE FUNCTION cdrs_storing();
