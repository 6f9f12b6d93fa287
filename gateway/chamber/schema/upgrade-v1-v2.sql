-- The chamber, schema version 2: prescriptions (issue 5) and OAuth2 client credentials (issue 8).
-- Applied after chamber-v1.sql to a new chamber, or on its own to a version-1 chamber, in one transaction.

-- One row per prescription, either direction.
--   to_his:   a platform's prescription on its way to the HIS pharmacy:
--             pending -> active (the HIS accepted every item) | refused (it refused; outcome says why)
--             active -> completed (every item dispensed)
--   released: a prescription the HIS released for outside pharmacies:
--             active -> claimed (one pharmacy took it; claimed_by) -> completed | cancelled
-- payload is the exact canonical JSON that was signed (to_his) or is served and signed (released);
-- signature is the verification result (SignatureCheck as JSON) of the prescriber's jws (to_his); for a
-- released prescription jws is the gateway's own signature, made on first read by the outer gate.
CREATE TABLE prescriptions (
    id          TEXT PRIMARY KEY,
    direction   TEXT NOT NULL CHECK (direction IN ('to_his', 'released')),
    platform    TEXT NOT NULL DEFAULT '',
    number      TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'active', 'refused', 'claimed', 'completed',
                                                'cancelled')),
    outcome     TEXT,
    payload     BLOB NOT NULL,
    jws         TEXT,
    signature   TEXT,
    message_id  INTEGER REFERENCES messages (id),   -- to_his: the RDE/OMP sent (released: see number)
    claimed_by  TEXT,
    claimed_at  REAL,
    version     INTEGER NOT NULL DEFAULT 1,
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    UNIQUE (direction, platform, number)
);
CREATE INDEX prescriptions_released ON prescriptions (direction, status, updated);
CREATE INDEX prescriptions_by_message ON prescriptions (message_id);

-- One row per item of a prescription: a FHIR MedicationRequest. resource is the JSON as served.
CREATE TABLE medication_requests (
    id              TEXT PRIMARY KEY,
    prescription_id TEXT NOT NULL REFERENCES prescriptions (id),
    seq             INTEGER NOT NULL,
    his_order       TEXT,
    status          TEXT NOT NULL,
    resource        TEXT NOT NULL,
    updated         REAL NOT NULL,
    UNIQUE (prescription_id, seq)
);

-- What the HIS pharmacy dispensed (RDS^O13), as FHIR MedicationDispense. A resent RDS adds nothing.
-- control_id: MSH-10 of the RDS it came in (messages: direction 'inbound', the pharmacy's peer name).
CREATE TABLE medication_dispenses (
    id                 TEXT PRIMARY KEY,
    medication_request TEXT NOT NULL REFERENCES medication_requests (id),
    prescription_id    TEXT NOT NULL REFERENCES prescriptions (id),
    his_dispense       TEXT NOT NULL UNIQUE,
    resource           TEXT NOT NULL,
    control_id         TEXT NOT NULL,
    created            REAL NOT NULL
);
CREATE INDEX medication_dispenses_by_request ON medication_dispenses (medication_request);

-- OAuth2 client credentials with signed JWT client assertions (SMART Backend Services).
-- Assertions already used, kept until they expire, so a replayed jti is refused even after a restart.
CREATE TABLE oauth_assertions (
    platform TEXT NOT NULL,
    jti      TEXT NOT NULL,
    expires  REAL NOT NULL,
    PRIMARY KEY (platform, jti)
);
CREATE INDEX oauth_assertions_expiry ON oauth_assertions (expires);

-- Access tokens the gateway issued: only their SHA-256 is stored, never the token.
CREATE TABLE oauth_tokens (
    token_sha256 TEXT PRIMARY KEY,
    platform     TEXT NOT NULL,
    scopes       TEXT NOT NULL,
    expires      REAL NOT NULL
);
CREATE INDEX oauth_tokens_expiry ON oauth_tokens (expires);
