-- The HIS simulator's store, schema version 1 (PRAGMA user_version), created in one transaction by
-- hissim/store.py. A later version adds upgrade-v1-v2.sql, and so on.
--
-- Times: slot starts are hospital local time, ISO 8601 without an offset ('2030-01-07T08:00:00'), as in the
-- inventory; `due` is the reactor clock's seconds since 1970.

-- Master data: one schedule per doctor, as the config last described it.
CREATE TABLE schedules (
    id              TEXT PRIMARY KEY,
    family          TEXT NOT NULL,
    given           TEXT NOT NULL,
    department_code TEXT NOT NULL,
    department_name TEXT NOT NULL,
    service_code    TEXT NOT NULL,
    service_text    TEXT NOT NULL,
    slot_minutes    INTEGER NOT NULL,
    sessions        TEXT NOT NULL              -- 'HH:MM-HH:MM' of each session, comma-separated
);

-- Every slot the HIS ever opened. status: Open | Booked | Blocked (SCH-25).
CREATE TABLE slots (
    schedule_id TEXT NOT NULL REFERENCES schedules (id),
    start       TEXT NOT NULL,
    minutes     INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('Open', 'Booked', 'Blocked')),
    PRIMARY KEY (schedule_id, start)
) WITHOUT ROWID;

-- Every booking the HIS ever made, cancelled ones included (a HIS keeps its history); a live booking is on
-- its slot. booked_by: 'counter' or the placer appointment id (ARQ-1.1) of the sender.
CREATE TABLE bookings (
    appointment_id TEXT PRIMARY KEY,           -- the filler id, H<6 digits>: never given twice
    schedule_id    TEXT NOT NULL,
    start          TEXT NOT NULL,
    booked_by      TEXT NOT NULL,
    placer_id      TEXT,
    tentative      INTEGER NOT NULL DEFAULT 0, -- a hold (ARQ-8 Tentative) not confirmed yet
    cancelled      INTEGER NOT NULL DEFAULT 0,
    FOREIGN KEY (schedule_id, start) REFERENCES slots (schedule_id, start)
);
CREATE UNIQUE INDEX bookings_live_on_slot ON bookings (schedule_id, start) WHERE NOT cancelled;
CREATE UNIQUE INDEX bookings_live_by_placer ON bookings (placer_id) WHERE placer_id IS NOT NULL AND NOT cancelled;

-- Numbers the HIS hands out: 'next_appointment' (the next H<6 digits>).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('next_appointment', 1);

-- The answers given, by role ('his' | 'pharmacy') and received MSH-10, so a resend gets the same bytes
-- (answer NULL for a query: it is answered afresh). seq: the order they were given in.
CREATE TABLE answers (
    seq         INTEGER PRIMARY KEY,
    role        TEXT NOT NULL,
    control_id  TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    code        TEXT NOT NULL,
    answer      BLOB,
    UNIQUE (role, control_id)
);

-- Messages to the gateway not acknowledged yet, per role, in order: built once, resent as they are.
CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY,
    role       TEXT NOT NULL,
    control_id TEXT NOT NULL,
    type       TEXT NOT NULL,
    facts      TEXT NOT NULL,                  -- the sent journal's facts (JSON): ids, never patient data
    payload    BLOB NOT NULL
);

-- Orders the pharmacy accepted and has not dispensed yet: the order as received, its filler numbers.
CREATE TABLE dispenses (
    seq     INTEGER PRIMARY KEY,
    due     REAL NOT NULL,
    charset TEXT NOT NULL,
    message BLOB NOT NULL,
    fillers TEXT NOT NULL                      -- JSON list, one per item
);
