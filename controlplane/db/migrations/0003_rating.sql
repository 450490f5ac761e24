-- Rating: rate tables imported from CSV, their rates by E.164 prefix, and the plans they price.
-- A dealer's rate tables are offered, read-only, to its whole subtree (like its plans).

CREATE TABLE rate_tables (
    id           bigserial PRIMARY KEY,
    dealer_id    bigint NOT NULL REFERENCES dealers(id) ON DELETE RESTRICT,
    name         text NOT NULL,
    currency     text NOT NULL DEFAULT 'BRL' CHECK (currency ~ '^[A-Z]{3}$'),
    description  text NOT NULL DEFAULT '',
    -- kept by the import, which is the only writer of rates
    rate_count   integer NOT NULL DEFAULT 0 CHECK (rate_count >= 0),
    imported_at  timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (dealer_id, name)
);
CREATE INDEX rate_tables_dealer ON rate_tables (dealer_id);

CREATE FUNCTION rate_tables_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.dealer_id <> OLD.dealer_id OR NEW.currency <> OLD.currency THEN
        RAISE EXCEPTION 'a rate table''s owner and currency cannot change'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'rate_table_immutable';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER rate_tables_before_update BEFORE UPDATE ON rate_tables
    FOR EACH ROW EXECUTE FUNCTION rate_tables_before_update();

CREATE TABLE rates (
    id                bigserial PRIMARY KEY,
    rate_table_id     bigint NOT NULL REFERENCES rate_tables(id) ON DELETE CASCADE,
    -- E.164 digits without '+'; byte order (C collation) keeps prefix searches on the index
    prefix            text COLLATE "C" NOT NULL CHECK (prefix ~ '^[1-9][0-9]{0,14}$'),
    description       text NOT NULL DEFAULT '',
    price_per_minute  numeric(12, 6) NOT NULL CHECK (price_per_minute >= 0),
    connection_fee    numeric(12, 6) NOT NULL DEFAULT 0 CHECK (connection_fee >= 0),
    first_increment   integer NOT NULL DEFAULT 30 CHECK (first_increment BETWEEN 1 AND 3600),
    next_increment    integer NOT NULL DEFAULT 6 CHECK (next_increment BETWEEN 1 AND 3600),
    free_seconds      integer NOT NULL DEFAULT 0 CHECK (free_seconds BETWEEN 0 AND 3600),
    -- when set, the rate applies only to calls of this class (e.g. VC2 and VC3 of one prefix)
    call_class        text CHECK (call_class IN ('local', 'national', 'international',
                                                 'mobile_vc1', 'mobile_vc2', 'mobile_vc3',
                                                 'tollfree', 'emergency', 'special')),
    -- one rate per prefix (per class): also the index of the longest-prefix lookup
    CONSTRAINT rates_prefix_key UNIQUE NULLS NOT DISTINCT (rate_table_id, prefix, call_class)
);

ALTER TABLE plans ADD COLUMN rate_table_id bigint REFERENCES rate_tables(id) ON DELETE RESTRICT;
CREATE INDEX plans_rate_table ON plans (rate_table_id);

-- A plan is priced by a rate table its owner may use: its own or an ancestor's.
CREATE FUNCTION plans_check_rate_table() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.rate_table_id IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM rate_tables rt JOIN dealers d ON d.id = NEW.dealer_id
         WHERE rt.id = NEW.rate_table_id AND rt.dealer_id = ANY (d.path)) THEN
        RAISE EXCEPTION 'rate table % is not offered to dealer %', NEW.rate_table_id,
            NEW.dealer_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'plan_rate_table_visible';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER plans_check_rate_table BEFORE INSERT OR UPDATE OF rate_table_id, dealer_id
    ON plans FOR EACH ROW EXECUTE FUNCTION plans_check_rate_table();
