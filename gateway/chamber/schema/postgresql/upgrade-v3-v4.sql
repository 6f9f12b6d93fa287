-- The chamber, schema version 4, on PostgreSQL: ../upgrade-v3-v4.sql (the audit trail's key) with the key's 32
-- random bytes from PostgreSQL's strong random source (gen_random_uuid, pg_strong_random: 2 x 122 random bits)
-- and its rules as trigger functions.
CREATE TABLE chamber_keys (
    name TEXT PRIMARY KEY,
    key  BYTEA NOT NULL CHECK (length(key) = 32)
);
INSERT INTO chamber_keys (name, key)
    VALUES ('audit-ids', decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
CREATE FUNCTION chamber_keys_are_kept() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'chamber keys are never changed nor deleted';
END $$;
CREATE TRIGGER chamber_keys_are_not_changed BEFORE UPDATE OR DELETE ON chamber_keys
    FOR EACH ROW EXECUTE FUNCTION chamber_keys_are_kept();
