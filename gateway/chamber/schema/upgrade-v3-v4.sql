-- The chamber, schema version 4: the audit trail's key (issue 15).
-- Applied after upgrade-v2-v3.sql to a new chamber, or on its own to a version-3 chamber, in one transaction.

-- Secrets of this chamber, generated inside it: in no repository and no config file. 'audit-ids' keys the
-- names the audit trail gives to ids the gateway did not issue (an id a platform put in a URL that the
-- chamber does not know, which may be a patient's identifier): 'hmac:' and HMAC-SHA256(key, id), cut to 32
-- hex digits (gateway/domain/audit.py; `gatewayd audit find` computes them). 32 bytes from SQLite's randomblob()
-- (its generator is seeded from the operating system's random source). A key is never changed nor deleted:
-- the records named with it could no longer be found.
CREATE TABLE chamber_keys (
    name TEXT PRIMARY KEY,
    key  BLOB NOT NULL CHECK (length(key) = 32)
);
INSERT INTO chamber_keys (name, key) VALUES ('audit-ids', randomblob(32));
CREATE TRIGGER chamber_keys_are_not_changed BEFORE UPDATE ON chamber_keys
BEGIN
    SELECT RAISE(ABORT, 'chamber keys are never changed');
END;
CREATE TRIGGER chamber_keys_are_not_deleted BEFORE DELETE ON chamber_keys
BEGIN
    SELECT RAISE(ABORT, 'chamber keys are never changed nor deleted');
END;
