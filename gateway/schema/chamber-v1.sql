-- The chamber, schema version 1.
-- Everything that crosses the lock is written here before either side is answered.
-- Applied atomically by gateway/chamber.py when chamber_meta has no schema_version.

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
CREATE INDEX slots_by_his_appointment ON slots (his_appointment);

-- Appointments platforms asked for.  status: pending | booked | cancelled | refused
-- patient: JSON with what the HIS needs (identifiers, name, phone) and nothing more.
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
    updated         REAL NOT NULL
);
CREATE INDEX appointments_by_platform ON appointments (platform, created);
CREATE INDEX appointments_pending ON appointments (status, hold_expires);

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
