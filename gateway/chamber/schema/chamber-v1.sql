-- The chamber, schema version 1.
-- Everything that crosses the lock is written here before either side is answered.
-- Applied atomically by gateway/chamber/upgrades.py when chamber_meta has no schema_version.

CREATE TABLE chamber_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Every HL7 message that crossed the lock, in either direction, as raw bytes (kept for reprocessing).
-- One state machine for both directions:
--   inbound  (HIS -> gateway): committed -> delivered (applied to the slot book) | refused (we NAKed it)
--   outbound (gateway -> HIS): committed -> sending -> delivered (AA) | refused (AR: never resent)
--                              sending -> retrying -> sending ...      (no answer: the same bytes and MSH-10)
--                              sending -> dead   (AE, or max attempts / max age: last_error says why)
--                              committed | retrying -> withdrawn        (the booking it carried expired)
--                              dead -> committed                        (an operator's `queue retry`)
-- order_key: the patient a message is about (a hash, never the identifier) for `ordering: patient`.
CREATE TABLE messages (
    id           INTEGER PRIMARY KEY,
    direction    TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    peer         TEXT NOT NULL,
    control_id   TEXT NOT NULL,
    type         TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('committed', 'sending', 'retrying', 'delivered', 'refused',
                                                'dead', 'withdrawn')),
    body         BLOB NOT NULL,
    charset      TEXT NOT NULL,
    subject      TEXT,
    order_key    TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL,
    answer_code  TEXT,
    answer_text  TEXT,
    last_error   TEXT,
    created      REAL NOT NULL,
    updated      REAL NOT NULL,
    UNIQUE (direction, peer, control_id)
);
CREATE INDEX messages_by_state ON messages (direction, peer, state, id);
CREATE INDEX messages_by_subject ON messages (subject);

-- The story of each message: one row per state it entered.
CREATE TABLE message_events (
    message_id INTEGER NOT NULL REFERENCES messages (id),
    at         REAL NOT NULL,
    state      TEXT NOT NULL,
    detail     TEXT
);
CREATE INDEX message_events_by_message ON message_events (message_id);

-- The slot book mirrored from the HIS.
CREATE TABLE schedules (
    id                TEXT PRIMARY KEY,
    display           TEXT NOT NULL,
    practitioner_id   TEXT NOT NULL,
    practitioner_name TEXT NOT NULL,
    department_code   TEXT NOT NULL,
    department_name   TEXT NOT NULL,
    updated           REAL NOT NULL
);

-- his_status: what the HIS last said (free | busy | busy-unavailable).
-- held_by:    a gateway appointment waiting for the HIS's answer (the slot shows busy-tentative).
-- booked_by:  the gateway appointment the HIS accepted on this slot.
CREATE TABLE slots (
    id              TEXT PRIMARY KEY,
    schedule_id     TEXT NOT NULL REFERENCES schedules (id),
    start_local     TEXT NOT NULL,
    start_ts        REAL NOT NULL,
    end_ts          REAL NOT NULL,
    minutes         INTEGER NOT NULL,
    service_code    TEXT NOT NULL,
    service_text    TEXT NOT NULL,
    his_status      TEXT NOT NULL,
    his_appointment TEXT,
    held_by         TEXT,
    booked_by       TEXT,
    updated         REAL NOT NULL
);
CREATE INDEX slots_by_start ON slots (start_ts);
CREATE INDEX slots_by_schedule_day ON slots (schedule_id, start_local);  -- quotas: a schedule's slots per day
CREATE INDEX slots_by_his_appointment ON slots (his_appointment);

-- Appointments platforms asked for.  status: pending | booked | cancelled | refused
-- patient: JSON with what the HIS needs (identifiers, name, phone) and nothing more.
-- replaces: the booked appointment this one moves (IHE $book rescheduling): once the HIS accepts this
--           one, the old one is cancelled at the HIS (cancel + new).
CREATE TABLE appointments (
    id              TEXT PRIMARY KEY,
    platform        TEXT NOT NULL,
    slot_id         TEXT NOT NULL REFERENCES slots (id),
    status          TEXT NOT NULL,
    patient         TEXT NOT NULL,
    description     TEXT,
    his_appointment TEXT,
    hold_expires    REAL,
    outcome         TEXT,
    pending_change  TEXT,
    version         INTEGER NOT NULL DEFAULT 1,
    created         REAL NOT NULL,
    updated         REAL NOT NULL,
    replaces        TEXT
);
CREATE INDEX appointments_by_platform ON appointments (platform, created);
CREATE INDEX appointments_pending ON appointments (status, hold_expires);
CREATE INDEX appointments_by_platform_status ON appointments (platform, status, slot_id);  -- quota usage

-- Platform requests that must not be applied twice: POST with an Idempotency-Key header ...
CREATE TABLE idempotency_keys (
    platform       TEXT NOT NULL,
    key            TEXT NOT NULL,
    request_hash   TEXT NOT NULL,
    appointment_id TEXT NOT NULL REFERENCES appointments (id),
    created        REAL NOT NULL,
    PRIMARY KEY (platform, key)
);

-- ... and the platform's own Appointment.identifier values (for If-None-Exist: identifier=system|value).
CREATE TABLE appointment_identifiers (
    platform       TEXT NOT NULL,
    system         TEXT NOT NULL,
    value          TEXT NOT NULL,
    appointment_id TEXT NOT NULL REFERENCES appointments (id),
    PRIMARY KEY (platform, system, value)
);

-- The audit trail: every access to patient data and every refusal, one row each, append-only.
-- Hash-chained: hash = sha256(previous record's hash + this record's canonical content) (gateway/domain/audit.py).
-- Rows carry ids, never patient names or identifiers.
--   at_us:   when, microseconds since 1970-01-01 UTC
--   platform / subject / serial: who (platform name, client certificate subject and serial in hex)
--   source:  where from (the client's address, or 'his:<name>' for the HIS's answers)
--   action, resource_type, resource_id: what; outcome: the HTTP status (or the status the HIS's answer gives)
CREATE TABLE audit_records (
    seq           INTEGER PRIMARY KEY,
    at_us         INTEGER NOT NULL,
    platform      TEXT,
    subject       TEXT,
    serial        TEXT,
    source        TEXT,
    action        TEXT NOT NULL,
    resource_type TEXT,
    resource_id   TEXT,
    outcome       INTEGER NOT NULL,
    detail        TEXT,
    hash          TEXT NOT NULL
);
CREATE INDEX audit_records_by_time ON audit_records (at_us);

-- The chain's two ends: the anchor (the last record removed by `gatewayd audit prune`, or seq 0 with the
-- genesis hash) and the head (the last record appended).
CREATE TABLE audit_chain (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    anchor_seq  INTEGER NOT NULL,
    anchor_hash TEXT NOT NULL,
    head_seq    INTEGER NOT NULL,
    head_hash   TEXT NOT NULL
);
INSERT INTO audit_chain (id, anchor_seq, anchor_hash, head_seq, head_hash) VALUES
    (1, 0, '0000000000000000000000000000000000000000000000000000000000000000',
        0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Records are never changed, and removed only once the anchor has moved past them (audit prune).
CREATE TRIGGER audit_records_are_not_changed BEFORE UPDATE ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'audit records cannot be changed');
END;
CREATE TRIGGER audit_records_are_pruned_only_behind_the_anchor BEFORE DELETE ON audit_records
WHEN OLD.seq > (SELECT anchor_seq FROM audit_chain WHERE id = 1)
BEGIN
    SELECT RAISE(ABORT, 'audit records are removed only by gatewayd audit prune');
END;

-- What a platform sent, byte for byte, for the appointment it created (kept for audit and reprocessing).
CREATE TABLE platform_requests (
    appointment_id TEXT PRIMARY KEY REFERENCES appointments (id),
    received       REAL NOT NULL,
    body           BLOB NOT NULL
);
